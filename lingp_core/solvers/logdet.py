"""log det A for SPD A: exact by Cholesky, or stochastic Lanczos quadrature with a standard error."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

import backends
from lingp_core import _validate as v
from lingp_core._precision import eps
from lingp_core.operators import DenseOperator, as_operator
from lingp_core.solvers._common import check_dense_symmetric, check_seed, seeded_rademacher
from lingp_core.solvers.cholesky import safe_cholesky
from lingp_core.solvers.lanczos import lanczos_columns

METHODS = ("auto", "cholesky", "slq")
AUTO_CHOLESKY_MAX_N = 6000  # dense and at most this size: the exact answer is cheap enough
# A Ritz value at most this many eps (of A's dtype) times the largest is zero to rounding (a zero eigenvalue's came
# out within ±0.2 eps of it, float32 and float64, n = 60–300): A is singular to working precision, or indefinite
RITZ_FLOOR = 1.0
# The truncation error (see _truncation_error) is extrapolated geometrically only from this many steps on (with
# fewer, the m/2-, 3m/4- and m-step rules lie too close together to show a rate) and only where the last quarter of the
# steps changed the estimate by less than this fraction of what the quarter before did; otherwise it is taken as
# SLOW_FACTOR times the change from m/2 to m steps. Chosen on 235 runs (n = 100–1000; log-spaced and kernel-like
# spectra of condition 1e4–1e10; 4–100 steps; exact per-probe values as the oracle): the true truncation error was at
# most 2.6× the estimate (2× or more in 3%), the estimate a median 1.7× the truth. With a ratio of 2/3, or a factor 2,
# the truth reached 8× the estimate.
EXTRAPOLATE_MIN_STEPS = 8
GEOMETRIC_RATIO = 0.5
SLOW_FACTOR = 4.0


class LogdetResult(NamedTuple):
    """What :func:`logdet` returns.

    Attributes
    ----------
    logdet : float
        The value (exact for Cholesky, an estimate for SLQ).
    std_error : float
        0.0 for Cholesky. For SLQ the error bar of the estimate: the probes' standard error (their spread over
        sqrt(num_probes)) and ``truncation_error`` added in quadrature.
    method : str
        "cholesky" or "slq".
    num_probes, lanczos_steps : int
        SLQ's probes and Lanczos steps per probe (0 for Cholesky).
    jitter : float
        Added to the diagonal by the Cholesky path (0.0 otherwise).
    probe_estimates : ndarray (num_probes,)
        The per-probe SLQ estimates (empty for Cholesky).
    truncation_error : float
        SLQ: estimated error of the m-step Gauss quadrature against the exact zᵀ log(A) z, averaged over the probes
        (0.0 where the Krylov spaces are exhausted, and for Cholesky). See :func:`logdet`.
    """

    logdet: float
    std_error: float
    method: str
    num_probes: int
    lanczos_steps: int
    jitter: float
    probe_estimates: np.ndarray
    truncation_error: float = 0.0


def logdet(A: Any, *, method: str = "auto", num_probes: int = 30, lanczos_steps: int | None = None,
           seed: int = 0, memory_budget: Any = None, warn: bool = True) -> LogdetResult:
    """log det A of a symmetric positive-definite (n, n) matrix or operator.

    Parameters
    ----------
    A : array (n, n) or operator
    method : {"auto", "cholesky", "slq"}
        "cholesky": exact, through :func:`safe_cholesky` in float64 (operators are densified behind the memory
        guard). "slq": stochastic Lanczos quadrature — log det A = E[zᵀ log(A) z] with seeded Rademacher probes z,
        each quadrature from ``lanczos_steps`` fully reorthogonalized Lanczos steps. "auto": Cholesky for dense
        arrays with n ≤ 6000, SLQ otherwise.
    num_probes : int
        SLQ probes, ≥ 2 (the probes' standard error falls as 1/sqrt(num_probes)).
    lanczos_steps : int, optional
        SLQ quadrature nodes per probe, 2 ≤ m ≤ n (default min(n, 50); 1 only when n = 1).
    seed : int
        Seed of the probes, ≥ 0: the same estimate on every run and backend (to rounding).
    memory_budget : float, optional
        Bytes allowed (default: half the free memory where the backend allocates): for Cholesky the n × n float64
        factor (plus the dense matrix of an operator), for SLQ the Lanczos bases, (lanczos_steps + 6)·n·num_probes
        values of A's dtype. More raises MemoryBudgetError before anything is allocated.
    warn : bool
        Warn (ConvergenceWarning) when SLQ's estimated truncation error exceeds the probes' standard error (both
        are in ``std_error`` either way); callers with a message of their own pass False.

    Returns
    -------
    LogdetResult
        For SLQ, ``std_error`` holds both errors of the estimate: the probes' spread, and the truncation of each
        probe's m-node Gauss quadrature, which on ill-conditioned A (small eigenvalues the nodes have not reached)
        overestimates log det by far more than the spread. The truncation error is estimated from the m/2- and
        3m/4-step quadratures of the same runs (the leading blocks of their tridiagonals, no extra products): where
        the change from 3m/4 to m steps is below half the change from m/2 to 3m/4 (geometric convergence, m ≥ 8) it
        is extrapolated geometrically; otherwise convergence has not set in and the estimate is 4× the change from
        m/2 to m steps. It is an estimate, not a bound: in 235 test runs (n = 100–1000, condition 1e4–1e10, 4–100
        steps) the true truncation error was at most 2.6× the estimate, and the estimate a median 1.7× the truth
        (up to 9× in 10% of them). A ConvergenceWarning says when it exceeds the probes' standard error: the
        quadrature has not converged, raise lanczos_steps.

    Raises
    ------
    ShapeError
        For a 0 × 0 A.
    ValueRangeError
        When a dense A is not symmetric, (SLQ) A's scale is outside the range Lanczos can handle, or
        lanczos_steps is outside [2, n] (n > 1).
    NotPositiveDefiniteError
        When A is not positive definite: Cholesky fails even with jitter, or (SLQ) a Ritz value is at most
        eps·(the largest Ritz value) on some probe (a condition beyond 1/eps of A's dtype is singular to rounding).
        SLQ sees only what its Krylov spaces reach: a zero or negative eigenvalue that ``lanczos_steps`` steps do
        not resolve goes undetected, and so does the error of an isolated eigenvalue far below the rest (one
        eigenvalue 0 or 1e-12 under 199 in [1e-2, 1e2] is invisible to 50 steps); pass lanczos_steps = n, or use
        Cholesky, where that matters.
    """
    v.check_choice(method, "method", METHODS)
    op = as_operator(A, "A")
    n = op.shape[0]
    if n == 0:
        raise v.ShapeError(f"A has shape {op.shape}: log det needs a matrix of size at least 1 × 1")
    if method == "auto":
        method = "cholesky" if isinstance(op, DenseOperator) and n <= AUTO_CHOLESKY_MAX_N else "slq"
    budget = v.resolve_memory_budget(memory_budget, op.backend)
    if method == "cholesky":
        dense = 0 if isinstance(op, DenseOperator) else v.nbytes_of(op.shape, op.dtype)
        v.check_memory(v.nbytes_of(op.shape, np.float64) + dense, budget,
                       what=f"logdet by Cholesky of an n × n operator, n = {n}", alternative="use method='slq'")
        chol = safe_cholesky(op.to_dense(memory_budget=budget))
        value = 2.0 * float(op.backend.xp.log(op.backend.xp.diagonal(chol.factor)).sum())
        return LogdetResult(value, 0.0, "cholesky", 0, 0, chol.jitter, np.zeros(0))
    num_probes = v.check_int(num_probes, "num_probes", minimum=2)
    # one node cannot estimate its own truncation error, so at least two unless one step spans the space
    steps = min(n, 50) if lanczos_steps is None else v.check_int(lanczos_steps, "lanczos_steps", minimum=min(n, 2),
                                                                  maximum=n)
    seed = check_seed(seed)
    warn = v.check_bool(warn, "warn")
    check_dense_symmetric(op)  # as Cholesky does: on a non-symmetric A, SLQ would estimate nothing
    v.check_memory(v.nbytes_of((steps + 6, n, num_probes), op.dtype), budget,
                   what=f"logdet by SLQ with {num_probes} probes of {steps} Lanczos steps, n = {n} ({op.dtype})",
                   alternative="use fewer num_probes or lanczos_steps")
    probes = seeded_rademacher((n, num_probes), seed, op.dtype, op.backend)
    _, alpha, beta, valid = lanczos_columns(op, probes, steps, reorthogonalize="full")
    rules = _quadratures(alpha, beta, valid, _levels(steps), n, op.dtype)  # (3, num_probes): m/2, 3m/4, m steps
    estimates = rules[-1]
    probe_error = float(estimates.std(ddof=1) / np.sqrt(num_probes))
    truncation = 0.0 if steps == n else _truncation_error(rules.mean(axis=1), steps)  # n steps: exact
    if warn and truncation > probe_error:
        v.warn(f"logdet (SLQ): the {steps}-step Lanczos quadrature has not converged (n = {n}): its truncation "
               f"error, estimated at {truncation:.3g}, exceeds the probes' standard error {probe_error:.3g}; both "
               f"are in std_error. Raise lanczos_steps (now {steps}) for a more accurate estimate",
               v.ConvergenceWarning)
    return LogdetResult(float(estimates.mean()), float(np.hypot(probe_error, truncation)), "slq", num_probes, steps,
                        0.0, estimates, truncation)


def _levels(steps: int) -> tuple[int, int, int]:
    """Steps of the three nested Gauss rules compared: m/2, 3m/4 and m (m ≥ 2)."""
    half = max(1, steps // 2)
    return half, (half + steps) // 2, steps


def _quadratures(alpha: np.ndarray, beta: np.ndarray, valid: np.ndarray, levels: tuple[int, ...], n: int,
                 dtype: Any) -> np.ndarray:
    """n·e₁ᵀ log(T_k) e₁ for each probe's tridiagonal cut to k = each level, (len(levels), probes) float64.

    A probe whose run broke down (an invariant Krylov space, exact from there on) keeps its last value. Raises
    NotPositiveDefiniteError for a Ritz value at rounding level of the largest or below (by interlacing, the
    leading blocks' Ritz values lie within the full run's, so checking the full run covers them).
    """
    host = backends.get_backend("numpy")  # the tridiagonals are small float64 host arrays already
    out = np.empty((len(levels), alpha.shape[1]))
    for j in range(alpha.shape[1]):
        m = int(valid[j])
        for row in reversed(range(len(levels))):  # the full run first: its Ritz values are checked
            k = min(levels[row], m)
            theta, vectors = host.eigh_tridiagonal(alpha[:k, j], beta[: k - 1, j])
            if row == len(levels) - 1:
                _check_ritz(theta, j, dtype)
            out[row, j] = n * float(np.sum(vectors[0] ** 2 * np.log(theta)))  # ‖z‖² = n for Rademacher z
    return out


def _check_ritz(theta: np.ndarray, probe: int, dtype: Any) -> None:
    """NotPositiveDefiniteError unless every Ritz value lies above rounding level of the largest: in exact
    arithmetic an SPD matrix has only positive ones, and a zero eigenvalue's comes out either sign by rounding."""
    floor = RITZ_FLOOR * eps(dtype) * max(float(theta.max()), 0.0)
    if theta.min() <= floor:
        raise v.NotPositiveDefiniteError(
            f"A is not positive definite: a Lanczos Ritz value is {theta.min():.3g} (probe {probe}), at most "
            f"{RITZ_FLOOR:g}·eps·(the largest Ritz value {theta.max():.3g}) = {floor:.3g}: A is singular to rounding "
            "or indefinite, and SLQ needs an SPD operator (add jitter or noise to its diagonal)")


def _truncation_error(means: np.ndarray, steps: int) -> float:
    """Estimated error of the m-step quadrature from the probe means of the m/2-, 3m/4- and m-step rules.

    For log, Gauss quadrature overestimates and falls towards the exact value as nodes are added. Where the last
    quarter of the steps changed the estimate by less than half what the quarter before did, convergence is geometric
    and its rest is extrapolated (Aitken: d_late² / (d_early − d_late)). Otherwise it has not set in — the rest was
    then measured at up to 10× the change from m/2 to m steps, with no rate to extrapolate — and SLOW_FACTOR times
    that change is taken.
    """
    half, three_quarters, full = means
    d_early, d_late = half - three_quarters, three_quarters - full
    if steps >= EXTRAPOLATE_MIN_STEPS and d_early > 0 and 0 <= d_late < GEOMETRIC_RATIO * d_early:
        return float(d_late**2 / (d_early - d_late))
    return SLOW_FACTOR * abs(half - full)
