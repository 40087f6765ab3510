"""The demo's domains: upright scikit-learn digits (source) and rotated, noisy digits (target).

scikit-learn's digits (1797 grey 8×8 images, 10 classes) ship with scikit-learn, so nothing is downloaded. A seeded
shuffle splits the images in half. Source domain: one half, upright, split into training and held-out images.
Target domain: the other half, each image rotated by a random angle in [30°, 60°] (bilinear, zero fill) and given
Gaussian pixel noise (σ = 0.1 on the [0, 1] pixel scale); it splits into a labelled pool (the first
``pool_per_class`` images of each class, where the few labelled target examples are drawn from) and a test set
(everything else). No target image is ever seen by the source network's training.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from lingp_core._validate import ValueRangeError

__all__ = ["Domains", "few_shot_indices", "load_domains", "shift_images"]

N_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Domains:
    """Images as float32 arrays of shape (n, 1, 8, 8) on [0, 1] (target: plus noise), labels int64 (n,)."""

    source_train_x: np.ndarray
    source_train_y: np.ndarray
    source_test_x: np.ndarray
    source_test_y: np.ndarray
    pool_x: np.ndarray
    pool_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    description: str


def shift_images(images: np.ndarray, rng: np.random.Generator, *, angles: tuple[float, float] = (30.0, 60.0),
                 noise: float = 0.1) -> np.ndarray:
    """Rotate each (8, 8) image by an angle drawn uniformly from ``angles`` (degrees) and add N(0, noise²) pixels.

    Parameters
    ----------
    images : ndarray of shape (n, 8, 8)
    rng : numpy Generator, consumed in a fixed order (angles, then noise), so a seed fixes the result
    """
    from scipy import ndimage

    drawn = rng.uniform(angles[0], angles[1], size=images.shape[0])
    rotated = np.stack([ndimage.rotate(img, angle, reshape=False, order=1, mode="constant", cval=0.0)
                        for img, angle in zip(images, drawn)])
    return rotated + noise * rng.standard_normal(rotated.shape)


def load_domains(seed: int, *, source_test_fraction: float = 0.15, pool_per_class: int = 20,
                 max_test: int | None = None) -> Domains:
    """Split and shift scikit-learn's digits into the source and target domains, all fixed by ``seed``.

    Parameters
    ----------
    seed : int
    source_test_fraction : float
        Share of the source half held out to show the source network works on its own domain.
    pool_per_class : int
        Target images per class kept for drawing labelled examples (the largest label budget must not exceed it).
    max_test : int, optional
        Keep at most this many target test images (a seeded subset; the quick mode's shortcut).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float64)  # pixel counts 0..16 → [0, 1]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(labels.shape[0])
    source, target = order[: order.shape[0] // 2], order[order.shape[0] // 2:]
    n_source_test = int(round(source_test_fraction * source.shape[0]))
    target_images = shift_images(images[target], rng)
    target_labels = labels[target]
    pool = np.concatenate([np.flatnonzero(target_labels == k)[:pool_per_class] for k in range(N_CLASSES)])
    test = np.setdiff1d(np.arange(target.shape[0]), pool)
    if max_test is not None and test.shape[0] > max_test:
        test = np.sort(rng.choice(test, size=max_test, replace=False))

    def as_images(x: np.ndarray) -> np.ndarray:
        return x[:, None, :, :].astype(np.float32)

    return Domains(
        source_train_x=as_images(images[source[n_source_test:]]), source_train_y=labels[source[n_source_test:]],
        source_test_x=as_images(images[source[:n_source_test]]), source_test_y=labels[source[:n_source_test]],
        pool_x=as_images(target_images[pool]), pool_y=target_labels[pool],
        test_x=as_images(target_images[test]), test_y=target_labels[test],
        description=(f"source: {source.shape[0] - n_source_test} upright digits for training, {n_source_test} held "
                     f"out; target: rotated 30–60° + N(0, 0.1²) pixel noise, {pool.shape[0]} in the labelled pool, "
                     f"{test.shape[0]} for testing"),
    )


def few_shot_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` indices of each class, drawn without replacement, in class order.

    Raises
    ------
    lingp_core.ValueRangeError
        When some class has fewer than ``per_class`` examples (a ValueError).
    """
    chosen = []
    for k in range(N_CLASSES):
        members = np.flatnonzero(labels == k)
        if members.shape[0] < per_class:
            raise ValueRangeError(f"class {k} has {members.shape[0]} pool examples, fewer than the {per_class} labels "
                                  "per class asked for; raise pool_per_class or lower --labels-per-class")
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.concatenate(chosen)
