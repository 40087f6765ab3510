"""The demo's metrics (accuracy, NLL, ECE, reliability bins) and its GP-score → class-probability rule, each against
a straightforward independent computation (loops over examples and bins, a closed form, Monte Carlo)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lingp_core._validate import DTypeError, LingpError, NonFiniteError, ShapeError, ValueRangeError
from lingp_core.class_probabilities import probability_of_largest
from lingp_core.demo.metrics import (
    accuracy,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)


def random_predictions(rng: np.random.Generator, n: int = 300, c: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Softmax rows of widely spread logits (confidences over the whole range) and labels that often agree."""
    logits = rng.standard_normal((n, c)) * rng.uniform(0.1, 4.0, size=(n, 1))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    labels = np.where(rng.random(n) < 0.6, probs.argmax(axis=1), rng.integers(0, c, size=n))
    return probs, labels.astype(np.int64)


def loop_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> list[list[tuple[float, bool]]]:
    """(confidence, correct) of each example, put in bin b when b/B < confidence ≤ (b+1)/B (0 goes to bin 0)."""
    edges = [b / n_bins for b in range(n_bins + 1)]
    bins: list[list[tuple[float, bool]]] = [[] for _ in range(n_bins)]
    for row, label in zip(probs, labels):
        confidence = max(row)
        predicted = list(row).index(confidence)
        for b in range(n_bins):
            if edges[b] < confidence <= edges[b + 1] or (b == 0 and confidence == 0):
                bins[b].append((confidence, predicted == label))
    return bins


def test_accuracy_and_nll_match_loops(rng):
    probs, labels = random_predictions(rng)
    correct = sum(1 for row, y in zip(probs, labels) if list(row).index(max(row)) == y)
    nll = -sum(math.log(row[y]) for row, y in zip(probs, labels)) / len(labels)
    assert isinstance(accuracy(probs, labels), float)
    assert accuracy(probs, labels) == correct / len(labels)
    assert negative_log_likelihood(probs, labels) == pytest.approx(nll, rel=1e-12)


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_reliability_bins_and_ece_match_loops(rng, n_bins):
    probs, labels = random_predictions(rng)
    bins = loop_bins(probs, labels, n_bins)
    result = reliability_bins(probs, labels, n_bins)
    assert result.edges.shape == (n_bins + 1,) and result.counts.dtype == np.int64
    assert result.confidence.shape == result.accuracy.shape == (n_bins,)
    ece = 0.0
    for b, members in enumerate(bins):
        assert result.counts[b] == len(members)
        if members:
            mean_conf = sum(c for c, _ in members) / len(members)
            mean_acc = sum(ok for _, ok in members) / len(members)
            assert result.confidence[b] == pytest.approx(mean_conf, rel=1e-12)
            assert result.accuracy[b] == pytest.approx(mean_acc, rel=1e-12)
            ece += len(members) / len(labels) * abs(mean_acc - mean_conf)
        else:
            assert np.isnan(result.confidence[b]) and np.isnan(result.accuracy[b])
    assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(ece, rel=1e-12, abs=1e-15)


def test_ece_edge_cases():
    labels = np.array([0, 1, 1, 0])
    # confidence exactly on a bin edge (0.6 = 9/15) goes to the bin that ends there
    probs = np.array([[0.6, 0.4], [0.6, 0.4], [0.4, 0.6], [0.4, 0.6]])
    bins = reliability_bins(probs, labels, 15)
    edge = int(np.flatnonzero(bins.counts)[0])
    assert bins.counts[edge] == 4 and bins.edges[edge] < 0.6 <= bins.edges[edge + 1]
    # half right at confidence 0.6: |0.5 − 0.6|
    assert expected_calibration_error(probs, labels) == pytest.approx(0.1, rel=1e-12)
    # perfectly confident and right: zero ECE, zero NLL
    sure = np.eye(2)[labels]
    assert expected_calibration_error(sure, labels) == 0.0
    assert negative_log_likelihood(sure, labels) == 0.0


def test_nll_is_infinite_when_the_label_has_probability_zero():
    assert negative_log_likelihood(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([1, 0])) == math.inf


@pytest.mark.parametrize(("probs", "labels", "error"), [
    (np.full((3, 2), 0.5), np.zeros(4, dtype=np.int64), ShapeError),
    (np.full(3, 0.5), np.zeros(3, dtype=np.int64), ShapeError),
    (np.full((3, 2), 0.5), np.zeros(3), DTypeError),
    (np.full((3, 2), 0.5, dtype=np.float32).astype(np.int64), np.zeros(3, dtype=np.int64), DTypeError),
    (np.array([[0.5, np.nan]]), np.zeros(1, dtype=np.int64), NonFiniteError),
    (np.array([[0.7, 0.7]]), np.zeros(1, dtype=np.int64), ValueRangeError),
    (np.array([[1.2, -0.2]]), np.zeros(1, dtype=np.int64), ValueRangeError),
    (np.full((3, 2), 0.5), np.array([0, 1, 2]), ValueRangeError),
])
def test_metrics_reject_bad_inputs(probs, labels, error):
    for fn in (accuracy, negative_log_likelihood, expected_calibration_error):
        with pytest.raises(error):
            fn(probs, labels)


def test_reliability_bins_rejects_bad_bin_counts(rng):
    probs, labels = random_predictions(rng, n=10)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueRangeError, match="n_bins"):
            reliability_bins(probs, labels, bad)


# ----- probability that a Gaussian class score is the largest ------------------------------------------------------

@pytest.mark.parametrize(("variance_range", "atol"), [
    ((0.5, 2.0), 1e-12),   # variances within 4× of each other
    ((0.05, 3.0), 1e-12),  # up to 60× (the former fixed-node rule erred by 2e-4 here): the documented accuracy
])
def test_two_classes_match_the_closed_form(rng, variance_range, atol):
    # P(y0 > y1) = Φ((m0 − m1) / √(v0 + v1)) for independent Gaussians
    mean = rng.standard_normal((500, 2)) * 2.0
    var = rng.uniform(*variance_range, size=(500, 2))
    probs = probability_of_largest(mean, var)
    z = (mean[:, 0] - mean[:, 1]) / np.sqrt(var.sum(axis=1))
    expected = np.array([0.5 * math.erfc(-t / math.sqrt(2.0)) for t in z])
    assert probs.dtype == np.float64 and probs.shape == (500, 2)
    np.testing.assert_allclose(probs[:, 0], expected, rtol=0, atol=atol)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-14)


def test_many_classes_match_monte_carlo(rng):
    mean = rng.standard_normal((6, 5))
    var = rng.uniform(0.1, 2.0, size=(6, 5))
    probs = probability_of_largest(mean, var)
    draws = 200_000
    scores = mean[:, None, :] + np.sqrt(var)[:, None, :] * rng.standard_normal((6, draws, 5))
    winners = scores.argmax(axis=2)
    frequency = np.stack([(winners == k).mean(axis=1) for k in range(5)], axis=1)
    # 5 standard errors of a frequency estimate at p(1 − p) ≤ 1/4
    np.testing.assert_allclose(probs, frequency, atol=5 * 0.5 / math.sqrt(draws))


def test_equal_scores_give_uniform_probabilities_and_chunks_agree(rng):
    probs = probability_of_largest(np.zeros((3, 4)), np.ones((3, 4)))
    np.testing.assert_allclose(probs, 0.25, rtol=1e-13)
    mean = rng.standard_normal((600, 3))  # more rows than one chunk
    var = rng.uniform(0.1, 1.0, size=(600, 3))
    whole = probability_of_largest(mean, var)
    np.testing.assert_array_equal(whole[300:310], probability_of_largest(mean[300:310], var[300:310]))


def test_probability_of_largest_rejects_bad_inputs():
    with pytest.raises(ShapeError):
        probability_of_largest(np.zeros((3, 2)), np.ones((3, 3)))
    with pytest.raises(ShapeError):
        probability_of_largest(np.zeros((3, 1)), np.ones((3, 1)))
    with pytest.raises(ValueRangeError, match="≥ 0"):
        probability_of_largest(np.zeros((3, 2)), -np.ones((3, 2)))


def test_probability_of_largest_of_point_masses_is_the_argmax():
    # all of an example's variances zero: the largest mean wins outright; exact ties share
    probs = probability_of_largest(np.array([[0.0, 2.0, 1.0], [3.0, 3.0, -1.0], [1.0, 1.0 + 2.2e-16, 0.0],
                                             [1e20, 1e20 + 2e4, 0.0], [5.0, 5.0, 5.0]]), np.zeros((5, 3)))
    third = 1.0 / 3.0
    np.testing.assert_allclose(probs, [[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0],
                                       [third, third, third]], atol=1e-15)


def test_probability_of_largest_validates_its_options_and_takes_empty_input():
    assert probability_of_largest(np.zeros((0, 3)), np.zeros((0, 3))).shape == (0, 3)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(LingpError):
            probability_of_largest(np.zeros((1, 2)), np.ones((1, 2)), n_nodes=bad)
    with pytest.raises(DTypeError):
        probability_of_largest(np.zeros((1, 2), dtype=complex), np.ones((1, 2)))
    with pytest.raises(DTypeError):
        probability_of_largest(np.array([["a", "b"]]), np.ones((1, 2)))
    with pytest.raises(NonFiniteError):
        probability_of_largest(np.array([[0.0, np.inf]]), np.ones((1, 2)))
