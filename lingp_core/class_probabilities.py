"""Class probabilities from a Gaussian over class scores: the probability that each class scores highest.

A GP over class scores (:class:`~lingp_core.DirichletClassifier`'s latent log-probabilities, or a regression on
one-hot labels) predicts, for each test example, independent Gaussians y_k ~ N(m_k, v_k) over the c class scores.
They become class probabilities by the rule that follows from the model itself: the predicted class is the largest
score, so

    P(class k) = P(y_k > y_j for all j ≠ k) = ∫ φ_k(y) Π_{j≠k} Φ_j(y) dy,

with φ_k, Φ_k the density and distribution function of y_k: a one-dimensional integral. Its integrand has a feature
of width √v_j at every m_j — a near-step where one variance is far below another — so it is integrated by a
composite Gauss–Legendre rule whose cells are laid out per class, on the scale of each class's own standard
deviation, and summed in log space (no probability is floored or clipped). A class with variance 0 is a point mass:
its probability has a closed form and, in the others' integrals, its Φ_j is an exact step at a cell edge. The rule
has no free parameter (no temperature to tune on test data) and grows less confident as the variances grow.
"""
from __future__ import annotations

import numpy as np

import backends
from lingp_core import _validate as v
from lingp_core._validate import NonFiniteError, ShapeError, ValueRangeError

__all__ = ["probability_of_largest"]

_CHUNK = 256  # examples per block: the work arrays are (chunk, c, nodes of one example)
# (chunk, c, nodes) float64 arrays counted per block: the standardised scores (reused for the log terms) and log Φ,
# plus one for the boolean masks and temporaries
_WORK_ARRAYS = 3
_MAX_NODES = 360  # nodes per class (the cap of the former Gauss–Hermite rule, kept)
# Cell edges of each class at m_j ± _HALF_WIDTH·sd_j: beyond them Φ_j is 0 or 1 and φ_j is 0 to Φ(−8) = 6e-16
_HALF_WIDTH = 8.0
_NODES_PER_CELL = 8  # Gauss–Legendre nodes per cell (fewer only when n_nodes < 8)


def probability_of_largest(mean: np.ndarray, var: np.ndarray, *, n_nodes: int = 128) -> np.ndarray:
    """P(score k is the largest) for independent Gaussian scores N(mean, var), per example.

    Each class j places max(2, ⌈n_nodes / 8⌉) cell edges (16 by default), evenly spaced over m_j ± 8·√var_j; the
    edges of all classes of an example, sorted, cut the line into cells, each integrated by ⌈n_nodes / edges⌉
    (8 by default) Gauss–Legendre nodes: about c · n_nodes nodes per example, for all c classes at once (the same
    c² · n_nodes evaluations of log Φ as the former Gauss–Hermite rule). Every cell lies within one cell of each
    class whose Φ_j or φ_j changes across it, at most 16/15 of that class's standard deviations wide, so the
    integrand is smooth on every cell whatever the ratio of the variances. Cell edges are carried as exact sums of
    two floats, so a class whose standard deviation is far below a rounding step of its mean is resolved too.

    Parameters
    ----------
    mean : ndarray of shape (n, c)
        Predictive means of the class scores (host, floating).
    var : ndarray of shape (n, c)
        Their predictive variances, all ≥ 0, in any ratio to each other. A variance of 0 is a point mass: that
        class scores exactly its mean, and point masses tied at the same mean share their probability equally (the
        limit of equal vanishing variances; all variances zero: 1 for the largest mean, shared on exact ties).
    n_nodes : int
        Quadrature nodes per class, 1 to 360. With the default 128 the absolute error of every probability is
        ≤ 1e-12 whatever the ratios of the variances, zeros included; the tails beyond ±8 standard deviations
        add at most c · 6e-16. Measured: ≤ 2e-15 against 30-digit quadrature (c ≤ 10, ratios 1 to 1e12) and
        against the exact two- and three-class forms (ratios 1 to 1e300; the tests hold it to 1e-12 there and to
        1e-10 against SciPy's adaptive quadrature at c = 10). Fewer nodes are faster and coarser: worst errors
        measured 1e-11 at 64, 2e-9 at 48, 2e-6 at 32 and O(1) below 16.

    Returns
    -------
    ndarray of shape (n, c), float64
        Rows on the simplex: in [0, 1] and normalised to sum to 1 (removing the quadrature's error of the total,
        which is within the stated accuracy).

    Raises
    ------
    ValueRangeError
        Negative variances, n_nodes outside [1, 360], or an example whose m ± 8 standard deviations span more than
        float64 holds (about 1.8e308).
    MemoryBudgetError
        When one example's work, three c × (about c·n_nodes) float64 arrays, exceeds half the host's free memory;
        examples are otherwise taken in chunks that fit.
    """
    n_nodes = v.check_int(n_nodes, "n_nodes", minimum=1, maximum=_MAX_NODES)
    for name, arr in (("mean", mean), ("var", var)):
        v.refuse_masked(arr, name)
    mean, var = np.asarray(mean), np.asarray(var)
    for name, arr in (("mean", mean), ("var", var)):
        if arr.dtype.kind not in "iuf":
            raise v.DTypeError(f"{name} has dtype {arr.dtype}; expected real numbers")
    mean, var = mean.astype(np.float64), var.astype(np.float64)
    if mean.ndim != 2 or mean.shape[1] < 2 or var.shape != mean.shape:
        raise ShapeError(f"mean and var must both have shape (n, c) with c ≥ 2, got {mean.shape} and {var.shape}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
        raise NonFiniteError("mean or var hold NaN or Inf")
    if mean.shape[0] == 0:
        return np.empty_like(mean)
    if var.min() < 0:
        raise ValueRangeError(f"var must be ≥ 0 everywhere, found {var.min()}")
    sd = np.sqrt(var)
    with np.errstate(over="ignore", invalid="ignore"):  # the span bounds every difference the rule takes
        span = (mean + _HALF_WIDTH * sd).max(axis=1) - (mean - _HALF_WIDTH * sd).min(axis=1)
    if not np.all(np.isfinite(span)):
        i = int(np.flatnonzero(~np.isfinite(span))[0])
        raise ValueRangeError(f"example {i}: its means ± {_HALF_WIDTH:g} standard deviations span more than float64 "
                              f"holds (mean {mean[i].tolist()}, var {var[i].tolist()})")
    rule = _rule(n_nodes)
    chunk = _chunk_rows(mean.shape[1], n_nodes)
    out = np.empty_like(mean)
    for start in range(0, mean.shape[0], chunk):
        out[start:start + chunk] = _log_probabilities(mean[start:start + chunk], sd[start:start + chunk], *rule)
    top = out.max(axis=1, keepdims=True)  # finite: some class of every example has a positive probability
    probs = np.exp(out - top)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs


def _rule(n_nodes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: the cell edges in standard deviations from its mean, (edges,); per cell: Gauss–Legendre nodes
    as fractions of the cell, (per_cell,), and their log weights for a cell of width 1, (per_cell,)."""
    n_edges = max(2, -(-n_nodes // _NODES_PER_CELL))  # two at least: a class's cells must have width
    per_cell = -(-n_nodes // n_edges)
    offsets = np.linspace(-_HALF_WIDTH, _HALF_WIDTH, n_edges)
    x, w = np.polynomial.legendre.leggauss(per_cell)  # on [-1, 1]
    return offsets, (x + 1.0) / 2.0, np.log(w / 2.0)


def _nodes_per_example(c: int, n_nodes: int) -> int:
    """Quadrature nodes of one example: (c · edges − 1) cells of per_cell nodes."""
    offsets, fractions, _ = _rule(n_nodes)
    return (c * offsets.size - 1) * fractions.size


def _sorted_edges(mean: np.ndarray, sd: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All classes' cell edges m_j + sd_j·offset of each example in increasing order, each the exact sum hi + lo of
    two floats (Knuth's two-sum), so edges closer than a rounding step of the mean keep their order and spacing.
    Returns hi, lo of shape (b, c · edges)."""
    b = mean.shape[0]
    step = (sd[:, :, None] * offsets).reshape(b, -1)  # the rounded product is the edge's definition: no error
    base = np.repeat(mean, offsets.size, axis=1)
    hi = base + step
    back = hi - base
    lo = (base - (hi - back)) + (step - back)
    order = np.lexsort((lo, hi), axis=1)  # by hi, ties by lo
    return np.take_along_axis(hi, order, axis=1), np.take_along_axis(lo, order, axis=1)


def _log_probabilities(mean: np.ndarray, sd: np.ndarray, offsets: np.ndarray, fractions: np.ndarray,
                       log_weights: np.ndarray) -> np.ndarray:
    """log P(y_k largest), (b, c), for a block of examples: by the composite rule where sd_k > 0, in closed form
    for point masses."""
    point = sd == 0
    hi, lo = _sorted_edges(mean, sd, offsets)
    width = np.maximum((hi[:, 1:] - hi[:, :-1]) + (lo[:, 1:] - lo[:, :-1]), 0.0)      # (b, cells)
    # y − m_j at every node, from the cell's left edge: hi − m_j is exact where it matters (Sterbenz)
    start = (hi[:, None, :-1] - mean[:, :, None]) + lo[:, None, :-1]                   # (b, c, cells)
    scale = np.where(point, 1.0, sd)[:, :, None, None]
    with np.errstate(over="ignore"):  # ±inf for far classes: log Φ and log φ take them exactly
        t = start[..., None] + width[:, None, :, None] * fractions                    # (b, c, cells, per_cell)
        t /= scale
    t = t.reshape(t.shape[0], t.shape[1], -1)
    with np.errstate(divide="ignore"):  # empty cells (at point masses, or coinciding edges) weigh nothing
        log_w = (np.log(width)[:, :, None] + log_weights).reshape(t.shape[0], 1, -1)
    log_cdf = _log_cdf(t, point)
    log_w += log_cdf.sum(axis=1, keepdims=True)                                         # + log Π_j Φ_j(y)
    # log φ_k(y)·√(2π)·sd_k + log Π_{j≠k} Φ_j(y) + log weight, reusing t; where Φ_k(y) is 0, so is φ_k(y)
    with np.errstate(over="ignore", invalid="ignore"):
        t *= t
        t *= -0.5
        t += log_w
        t -= log_cdf
    t[log_cdf == -np.inf] = -np.inf
    out = _log_sum_exp(t) - (0.5 * np.log(2.0 * np.pi) + np.log(scale[:, :, 0, 0]))
    if point.any():
        out = np.where(point, _log_point_masses(mean, sd, point), out)
    return out


def _log_cdf(t: np.ndarray, point: np.ndarray) -> np.ndarray:
    """log Φ_j at the nodes, (b, c, nodes); a point mass's is the exact step (0 above its mean, −inf at and
    below it)."""
    from scipy.special import log_ndtr  # scipy loads on use, not when lingp_core is imported

    log_cdf = log_ndtr(t)
    if point.any():  # in place: no third work array
        log_cdf[point[:, :, None] & (t > 0)] = 0.0
        log_cdf[point[:, :, None] & (t <= 0)] = -np.inf
    return log_cdf


def _log_sum_exp(a: np.ndarray) -> np.ndarray:
    """log Σ exp(a) over the last axis, in place of a; −inf where all are −inf."""
    top = a.max(axis=-1, keepdims=True)
    top[~np.isfinite(top)] = 0.0
    a -= top
    np.exp(a, out=a)
    with np.errstate(divide="ignore"):
        return np.log(a.sum(axis=-1)) + top[..., 0]


def _log_point_masses(mean: np.ndarray, sd: np.ndarray, point: np.ndarray) -> np.ndarray:
    """log P(y_k largest) of the point masses, (b, c): Π_{j≠k} P(y_j < m_k) over the others, divided by the
    number of point masses tied at m_k (their order is a fair draw)."""
    from scipy.special import log_ndtr

    with np.errstate(over="ignore"):  # a gap of many standard deviations: log Φ is exactly 0 or −inf
        gap = mean[:, :, None] - mean[:, None, :]                                       # (b, k, j): m_k − m_j
        log_below = log_ndtr(gap / np.where(point, 1.0, sd)[:, None, :])
    tied = point[:, None, :] & (gap == 0)                                               # includes j = k
    log_below = np.where(point[:, None, :], np.where(gap > 0, 0.0, -np.inf), log_below)
    log_below[tied] = 0.0
    return log_below.sum(axis=2) - np.log(np.maximum(tied.sum(axis=2), 1))  # 1: classes that are not point masses


def _chunk_rows(c: int, n_nodes: int) -> int:
    """Examples per chunk: _CHUNK, or fewer when their work arrays would exceed the host's memory budget;
    MemoryBudgetError when one example's do."""
    per_example = _WORK_ARRAYS * v.nbytes_of((c, _nodes_per_example(c, n_nodes)), np.float64)
    budget = v.resolve_memory_budget(None, backends.get_backend("numpy"))
    if per_example > budget:
        raise v.MemoryBudgetError(f"probability_of_largest needs {v.format_bytes(per_example)} of work per example "
                                  f"for c = {c} classes and n_nodes = {n_nodes} (three c × c·n_nodes float64 "
                                  f"arrays) but the host's memory budget (half its free memory) is "
                                  f"{v.format_bytes(budget)}; use fewer n_nodes")
    return max(1, min(_CHUNK, budget // per_example))
