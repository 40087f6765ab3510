"""probability_of_largest at any ratio of the variances, point masses included, against independent oracles.

Oracles: two classes, the closed form P(y0 > y1) = Φ((m0 − m1) / √(v0 + v1)) (math.erfc); three classes, the
bivariate normal orthant probability by Owen's T function (scipy.special.owens_t); any c, scipy's adaptive
quadrature of P(y_k largest) = ∫ φ(z) Π_{j≠k} Φ((m_k + s_k z − m_j) / s_j) dz in the variable of class k, cut at every
other class's step so each near-step is a piece of its own, a point mass's Φ being the exact step; a point mass's own
probability is P(every other score below its mean), its definition, shared evenly on exact ties.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.special

import lingp_core as lg
from lingp_core import class_probabilities

EPS = np.finfo(np.float64).eps
# The docstring's stated absolute accuracy of the default rule, checked against the exact closed forms (c = 2, 3)
ACCURACY = 1e-12
# scipy.integrate.quad at epsabs 1e-14 per piece is itself good to about 1e-12: 100× margin against it
QUAD_ATOL = 1e-10
RATIOS = [1.0, 60.0, 1e3, 1e5, 1e12]


def quadrature_probabilities(mean, var):
    """P(y_k largest) of one example (c,): by adaptive quadrature in the standard variable of class k where
    var_k > 0 (a point mass j there is the exact step 1[y > m_j]); for a point mass k, P(every other y_j < m_k),
    shared evenly among the point masses tied at m_k."""
    mean, var = np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    sd, point, c = np.sqrt(var), var == 0, mean.size
    out = np.empty(c)
    for k in range(c):
        others = np.arange(c) != k
        if point[k]:
            tied = point & (mean == mean[k])
            below = [0.5 * math.erfc(-(mean[k] - mean[j]) / (math.sqrt(2.0) * sd[j])) if not point[j]
                     else float(mean[j] < mean[k]) for j in range(c) if not tied[j]]
            out[k] = math.prod(below) / tied.sum()
            continue

        def integrand(z, k=k, others=others):
            above = [(mean[k] - mean[j]) + sd[k] * z for j in range(c)]  # y_k − m_j, means' difference first
            factors = [float(above[j] > 0) if point[j] else 0.5 * math.erfc(-above[j] / (math.sqrt(2.0) * sd[j]))
                       for j in np.flatnonzero(others)]
            return math.exp(-z * z / 2) / math.sqrt(2 * math.pi) * math.prod(factors)

        # each other class's step, in class k's units: its centre and ±1, ±4, ±9 of its own widths
        widths = sd[others] / sd[k]
        centres = (mean[others] - mean[k]) / sd[k]
        cuts = (centres[:, None] + widths[:, None] * np.array([-9.0, -4.0, -1.0, 0.0, 1.0, 4.0, 9.0])).ravel()
        edges = np.unique(np.concatenate([[-12.0, 12.0], cuts[(cuts > -12.0) & (cuts < 12.0)]]))
        out[k] = sum(scipy.integrate.quad(integrand, a, b, epsabs=1e-14, epsrel=1e-13, limit=200)[0]
                     for a, b in zip(edges[:-1], edges[1:]))
    return out


def two_class_probability(m0, m1, v0, v1):
    """P(y0 > y1) in closed form."""
    return 0.5 * math.erfc(-(m0 - m1) / math.sqrt(2.0 * (v0 + v1)))


def three_class_probability(mean, var, k):
    """P(y_k largest) of three classes: P(y_k − y_i > 0, y_k − y_j > 0), a bivariate normal orthant with correlation
    ρ = v_k / √((v_k + v_i)(v_k + v_j)), by Owen's (1956) formula in his T function."""
    i, j = (x for x in range(3) if x != k)
    s_i, s_j = var[k] + var[i], var[k] + var[j]
    h, g = (mean[k] - mean[i]) / math.sqrt(s_i), (mean[k] - mean[j]) / math.sqrt(s_j)
    rho = var[k] / math.sqrt(s_i * s_j)
    root = math.sqrt((var[k] * var[i] + var[k] * var[j] + var[i] * var[j]) / (s_i * s_j))  # √(1 − ρ²), no cancelling
    beta = 0.0 if h * g > 0 else 0.5
    return (0.5 * (scipy.special.ndtr(h) + scipy.special.ndtr(g)) - scipy.special.owens_t(h, (g - rho * h) / (h * root))
            - scipy.special.owens_t(g, (h - rho * g) / (g * root)) - beta)


def variances_with_ratio(rng, n, c, ratio):
    """(n, c) variances whose largest / smallest is `ratio` in every row (class order shuffled), overall scale
    random."""
    var = np.exp(rng.uniform(0.0, np.log(ratio), size=(n, c)))
    var[:, 0], var[:, 1] = ratio, 1.0
    var = rng.permuted(var, axis=1)
    return var * np.exp(rng.uniform(np.log(0.01), np.log(100.0), size=(n, 1)))


def assert_on_the_simplex(probs, shape):
    assert probs.dtype == np.float64 and probs.shape == shape
    assert np.all((probs >= 0) & (probs <= 1))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=ACCURACY)


@pytest.mark.parametrize("ratio", RATIOS + [1e300, np.inf])
@pytest.mark.parametrize("spread", [0.05, 3.0])
def test_two_classes_match_the_closed_form_at_any_variance_ratio(ratio, spread):
    # ratio inf: one class a point mass (variance 0); 1e300: a standard deviation 1e-150 times the other's
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((200, 2)) * spread
    var = np.stack([np.ones(200), np.full(200, 0.0 if np.isinf(ratio) else 1.0 / ratio)], axis=1)
    var = rng.permuted(var, axis=1) * np.exp(rng.uniform(np.log(0.01), np.log(100.0), size=(200, 1)))
    probs = lg.probability_of_largest(mean, var)
    want = [two_class_probability(*m, *s) for m, s in zip(mean, var)]
    assert_on_the_simplex(probs, (200, 2))
    np.testing.assert_allclose(probs[:, 0], want, rtol=0, atol=ACCURACY)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("spread", [0.05, 3.0])
def test_three_classes_match_owens_t_at_any_variance_ratio(ratio, spread):
    rng = np.random.default_rng(1)
    mean = rng.standard_normal((40, 3)) * spread
    var = variances_with_ratio(rng, 40, 3, ratio)
    probs = lg.probability_of_largest(mean, var)
    want = np.array([[three_class_probability(m, s, k) for k in range(3)] for m, s in zip(mean, var)])
    assert_on_the_simplex(probs, (40, 3))
    np.testing.assert_allclose(probs, want, rtol=0, atol=ACCURACY)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("spread", [0.05, 3.0])
@pytest.mark.parametrize("c", [2, 3, 10])
def test_matches_adaptive_quadrature_at_any_variance_ratio(c, ratio, spread):
    rng = np.random.default_rng(2)
    n = 2 if c == 10 else 4
    mean = rng.standard_normal((n, c)) * spread
    var = variances_with_ratio(rng, n, c, ratio)
    probs = lg.probability_of_largest(mean, var)
    assert_on_the_simplex(probs, (n, c))
    np.testing.assert_allclose(probs, [quadrature_probabilities(m, s) for m, s in zip(mean, var)], rtol=0,
                               atol=QUAD_ATOL)


def test_the_reviewed_case_is_now_exact():
    # the review's example: 128 Gauss–Hermite nodes in class 0's variable were off by 1.6e-4 at ratio 60, 5.8e-3 at
    # 1e3 and 2.1e-2 at 1e5
    for ratio in (60.0, 1e3, 1e5):
        mean, var = np.array([0.0, 0.3, -0.2]), np.array([1.0, 1.0 / ratio, 0.5])
        probs = lg.probability_of_largest(mean[None], var[None])[0]
        np.testing.assert_allclose(probs, [three_class_probability(mean, var, k) for k in range(3)], rtol=0,
                                   atol=ACCURACY)


def test_point_masses_mixed_with_gaussians_match_the_quadrature():
    # var 0 for some classes: above, below and among the Gaussians, tied with each other and with a Gaussian's mean
    mean = np.array([[0.0, 0.0, 0.5], [3.0, 0.0, 0.0], [0.4, 0.4, 0.0], [0.4, 0.4, 0.4], [-1.0, 0.2, 0.0],
                     [5.0, 5.0, 0.0], [0.3, -0.3, 2.0]])
    var = np.array([[0.0, 1.0, 0.2], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1e-4, 1.0],
                    [0.0, 0.0, 100.0], [1e-12, 0.0, 4.0]])
    probs = lg.probability_of_largest(mean, var)
    assert_on_the_simplex(probs, mean.shape)
    np.testing.assert_allclose(probs, [quadrature_probabilities(m, s) for m, s in zip(mean, var)], rtol=0,
                               atol=QUAD_ATOL)
    # a point mass at 3 above two standard Gaussians wins unless both exceed it: Φ(3)²
    assert probs[1, 0] == pytest.approx(two_class_probability(3.0, 0.0, 0.0, 1.0) ** 2, abs=ACCURACY)


def test_a_vanishing_variance_tends_to_the_point_mass():
    # the closed form of a point mass and the quadrature of a class of variance 1e-24 agree (equal variances for the
    # tied pair: their limit is the even share)
    mean = np.array([[0.0, 0.0, 0.5], [0.4, 0.4, 0.0], [0.3, -0.3, 2.0], [2.0, 0.0, 1.0]])
    var = np.array([[0.0, 1.0, 0.2], [0.0, 0.0, 1.0], [0.0, 0.0, 4.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(lg.probability_of_largest(mean, np.where(var == 0, 1e-24, var)),
                               lg.probability_of_largest(mean, var), rtol=0, atol=QUAD_ATOL)


def test_all_point_masses_give_the_argmax_with_ties_shared():
    mean = np.array([[0.0, 2.0, 1.0], [3.0, 3.0, -1.0], [1.0, 1.0 + EPS, 0.0], [1e20, 1e20 + 2e4, 0.0],
                     [5.0, 5.0, 5.0], [0.0, 1e-300, -1e-300]])
    probs = lg.probability_of_largest(mean, np.zeros(mean.shape))
    top = mean == mean.max(axis=1, keepdims=True)
    np.testing.assert_array_equal(probs, top / top.sum(axis=1, keepdims=True))


def test_tiny_standard_deviations_next_to_large_means_are_resolved():
    # sd 1e-15 beside a mean of 1e6: the cells of that class are far below one rounding step of the mean (1.2e-10);
    # the quadrature in class k's variable takes the means' differences, exact here, so it is a fair oracle
    mean = 1e6 + np.array([[0.0, 1e-3, -1e-3, 2e-15]])
    var = np.array([[1e-6, 1e-20, 1e-30, 4e-30]])
    probs = lg.probability_of_largest(mean, var)
    assert_on_the_simplex(probs, mean.shape)
    np.testing.assert_allclose(probs[0], quadrature_probabilities(mean[0], var[0]), rtol=0, atol=QUAD_ATOL)
    assert probs[0, 1] > 0.5  # the near point mass at +1e-3 is above class 0 with probability Φ(1)


def test_every_node_count_gives_rows_on_the_simplex_and_the_most_are_accurate():
    # a node count too small for accuracy must still give probabilities (it gave NaN where all edges coincided)
    mean, var = np.array([[0.0, 0.0], [0.0, 0.3], [1.0, -1.0]]), np.array([[1.0, 1.0], [1.0, 1e-8], [0.0, 2.0]])
    want = [two_class_probability(*m, *s) for m, s in zip(mean, var)]
    for n_nodes in (1, 2, 7, 8, 9, 17, 64, class_probabilities._MAX_NODES):
        probs = lg.probability_of_largest(mean, var, n_nodes=n_nodes)
        assert np.all(np.isfinite(probs)) and np.all((probs >= 0) & (probs <= 1)), n_nodes
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=4 * EPS)
        if n_nodes >= 64:  # the closed form is exact: the documented accuracy from 128 nodes (64 measured 3.5e-12)
            np.testing.assert_allclose(probs[:, 0], want, rtol=0, atol=ACCURACY if n_nodes >= 128 else QUAD_ATOL)


def test_each_example_is_computed_alone_whatever_shares_its_chunk(monkeypatch):
    # point masses, extreme ratios and ordinary rows in one chunk: each row as if computed by itself
    rng = np.random.default_rng(3)
    mean = rng.standard_normal((7, 4))
    var = rng.uniform(0.5, 2.0, (7, 4))
    var[1, 2] = 0.0
    var[3] = 0.0
    var[5, 0] = 1e-14
    whole = lg.probability_of_largest(mean, var)
    monkeypatch.setattr(class_probabilities, "_CHUNK", 3)
    np.testing.assert_array_equal(lg.probability_of_largest(mean, var), whole)
    for i in range(7):
        np.testing.assert_array_equal(lg.probability_of_largest(mean[i:i + 1], var[i:i + 1])[0], whole[i])


def test_a_span_beyond_float64_is_refused_by_name():
    with pytest.raises(lg.ValueRangeError, match=r"example 1: .*span more than float64"):
        lg.probability_of_largest(np.array([[0.0, 1.0], [1e308, -1e308]]), np.ones((2, 2)))
