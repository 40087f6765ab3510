"""Classification metrics of predicted class probabilities: accuracy, negative log-likelihood, calibration.

All functions take host (NumPy) arrays: ``probs`` of shape (n, c), rows on the probability simplex, and integer
``labels`` of shape (n,) in [0, c). They check their inputs and raise lingp's error types.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lingp_core._validate import ArgumentTypeError, DTypeError, NonFiniteError, ShapeError, ValueRangeError

__all__ = ["ReliabilityBins", "accuracy", "expected_calibration_error", "negative_log_likelihood",
           "reliability_bins"]

_SIMPLEX_TOLERANCE = 1e-6  # rows may miss a sum of 1 by float rounding, not by more


def _check(probs: np.ndarray, labels: np.ndarray) -> None:
    """Shapes, dtypes and ranges of a (probs, labels) pair, with the offending values in the message."""
    if not isinstance(probs, np.ndarray) or not isinstance(labels, np.ndarray):
        raise ArgumentTypeError(f"probs and labels must be NumPy arrays, got {type(probs).__name__} and "
                                f"{type(labels).__name__}")
    if probs.ndim != 2 or probs.shape[0] < 1 or probs.shape[1] < 2:
        raise ShapeError(f"probs must have shape (n, c) with n ≥ 1 and c ≥ 2, got {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ShapeError(f"labels must have shape ({probs.shape[0]},) to match probs {probs.shape}, got "
                         f"{labels.shape}")
    if probs.dtype.kind != "f":
        raise DTypeError(f"probs must be floating, got dtype {probs.dtype}")
    if labels.dtype.kind not in "iu":
        raise DTypeError(f"labels must be integers, got dtype {labels.dtype}")
    if not np.all(np.isfinite(probs)):
        raise NonFiniteError(f"probs (shape {probs.shape}) hold NaN or Inf")
    if probs.min() < 0:
        raise ValueRangeError(f"probs must be non-negative, found {probs.min()}")
    worst = float(np.max(np.abs(probs.sum(axis=1) - 1.0)))
    if worst > _SIMPLEX_TOLERANCE:
        raise ValueRangeError(f"each row of probs must sum to 1; the worst row is off by {worst:.3g}")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueRangeError(f"labels must lie in [0, {probs.shape[1]}), found [{labels.min()}, {labels.max()}]")


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of examples whose most probable class (the first one on ties) is the label.

    Parameters
    ----------
    probs : ndarray of shape (n, c)
    labels : int ndarray of shape (n,)
    """
    _check(probs, labels)
    return float(np.mean(np.argmax(probs, axis=1) == labels))


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean of −log probs[i, labels[i]] in nats; ``inf`` when a label got probability exactly 0 (never clipped).

    Parameters
    ----------
    probs : ndarray of shape (n, c)
    labels : int ndarray of shape (n,)
    """
    _check(probs, labels)
    picked = probs[np.arange(labels.shape[0]), labels].astype(np.float64)
    with np.errstate(divide="ignore"):  # log(0) = -inf is the honest answer, reported as an infinite NLL
        return float(-np.mean(np.log(picked)))


class ReliabilityBins(NamedTuple):
    """Equal-width confidence bins: ``edges`` (n_bins + 1,); per bin the example ``counts``, mean ``confidence``
    and ``accuracy`` (both NaN in empty bins)."""

    edges: np.ndarray
    counts: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> ReliabilityBins:
    """Group examples by confidence (their largest probability) into ``n_bins`` equal-width bins over [0, 1].

    Bin b holds confidences in (edges[b], edges[b+1]]; the first bin also holds a confidence of exactly 0.

    Parameters
    ----------
    probs : ndarray of shape (n, c)
    labels : int ndarray of shape (n,)
    n_bins : int, ≥ 1

    Returns
    -------
    ReliabilityBins
        Arrays of shape (n_bins,) (edges: (n_bins + 1,)), float64 but ``counts`` (int64).
    """
    _check(probs, labels)
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueRangeError(f"n_bins must be an integer ≥ 1, got {n_bins!r}")
    confidence = probs.max(axis=1).astype(np.float64)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(side="left") puts c in bin b exactly when edges[b] < c <= edges[b+1]
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore"):  # 0/0 in empty bins is NaN on purpose
        mean_confidence = np.bincount(which, weights=confidence, minlength=n_bins) / counts
        mean_accuracy = np.bincount(which, weights=correct, minlength=n_bins) / counts
    return ReliabilityBins(edges, counts, mean_confidence, mean_accuracy)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE: Σ_b (n_b / n) · |accuracy_b − confidence_b| over ``n_bins`` equal-width confidence bins (see
    :func:`reliability_bins`); empty bins contribute nothing.

    Parameters
    ----------
    probs : ndarray of shape (n, c)
    labels : int ndarray of shape (n,)
    n_bins : int, ≥ 1 (15 by default, the usual choice since Guo et al., 2017)
    """
    bins = reliability_bins(probs, labels, n_bins)
    filled = bins.counts > 0
    gaps = np.abs(bins.accuracy[filled] - bins.confidence[filled])
    return float(np.sum(bins.counts[filled] * gaps) / labels.shape[0])
