"""log det A for SPD A: exact by Cholesky, or stochastic Lanczos quadrature with a standard error."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

import backends
from lingp_core import _validate as v
from lingp_core.operators import DenseOperator, as_operator
from lingp_core.solvers._common import check_dense_symmetric, check_seed, seeded_rademacher
from lingp_core.solvers.cholesky import safe_cholesky
from lingp_core.solvers.lanczos import lanczos_columns

METHODS = ("auto", "cholesky", "slq")
AUTO_CHOLESKY_MAX_N = 6000  # dense and at most this size: the exact answer is cheap enough


class LogdetResult(NamedTuple):
    """``logdet`` (float); ``std_error`` (float, 0.0 for the exact method); ``method`` used; ``num_probes`` and
    ``lanczos_steps`` of SLQ (0 for Cholesky); ``jitter`` added by the Cholesky path (0.0 otherwise);
    ``probe_estimates`` (num_probes,) the per-probe SLQ estimates (empty for Cholesky)."""

    logdet: float
    std_error: float
    method: str
    num_probes: int
    lanczos_steps: int
    jitter: float
    probe_estimates: np.ndarray


def logdet(A: Any, *, method: str = "auto", num_probes: int = 30, lanczos_steps: int | None = None,
           seed: int = 0, memory_budget: Any = None) -> LogdetResult:
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
        SLQ probes (the standard error falls as 1/sqrt(num_probes)).
    lanczos_steps : int, optional
        SLQ quadrature nodes per probe (default min(n, 50)).
    seed : int
        Seed of the probes, ≥ 0: the same estimate on every run and backend (to rounding).
    memory_budget : float, optional
        Bytes allowed (default: half the free memory where the backend allocates): for Cholesky the n × n float64
        factor (plus the dense matrix of an operator), for SLQ the Lanczos bases, (lanczos_steps + 6)·n·num_probes
        values of A's dtype. More raises MemoryBudgetError before anything is allocated.

    Raises
    ------
    ShapeError
        For a 0 × 0 A.
    ValueRangeError
        When a dense A is not symmetric, or (SLQ) A's scale is outside the range Lanczos can handle.
    NotPositiveDefiniteError
        When A is not positive definite.
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
    steps = min(n, 50) if lanczos_steps is None else v.check_int(lanczos_steps, "lanczos_steps", minimum=1, maximum=n)
    seed = check_seed(seed)
    check_dense_symmetric(op)  # as Cholesky does: on a non-symmetric A, SLQ would estimate nothing
    v.check_memory(v.nbytes_of((steps + 6, n, num_probes), op.dtype), budget,
                   what=f"logdet by SLQ with {num_probes} probes of {steps} Lanczos steps, n = {n} ({op.dtype})",
                   alternative="use fewer num_probes or lanczos_steps")
    probes = seeded_rademacher((n, num_probes), seed, op.dtype, op.backend)
    _, alpha, beta, valid = lanczos_columns(op, probes, steps, reorthogonalize="full")
    estimates = np.empty(num_probes)
    host = backends.get_backend("numpy")  # the tridiagonals are small float64 host arrays already
    for j in range(num_probes):
        m = int(valid[j])
        theta, vectors = host.eigh_tridiagonal(alpha[:m, j], beta[: m - 1, j])
        if theta.min() <= 0:
            raise v.NotPositiveDefiniteError(f"A is not positive definite: a Lanczos Ritz value is {theta.min():.3g} "
                                             f"(probe {j}); SLQ needs an SPD operator")
        estimates[j] = n * float(np.sum(vectors[0] ** 2 * np.log(theta)))  # ‖z‖² = n for Rademacher z
    std_error = float(estimates.std(ddof=1) / np.sqrt(num_probes))
    return LogdetResult(float(estimates.mean()), std_error, "slq", num_probes, steps, 0.0, estimates)

