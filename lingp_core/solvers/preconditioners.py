"""Preconditioners for CG, each an operator applying an approximation of A⁻¹ (SciPy's convention for M)."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from lingp_core import _validate as v
from lingp_core._precision import eps
from lingp_core.operators import LinearOperator, as_operator, check_diagonal
from lingp_core.solvers._common import check_dense_symmetric, check_seed, seeded_normal

# A residual diagonal d_i − Σ L_ij² below −NEGATIVE_RESIDUAL·eps·trace(A) is no rounding error: A is indefinite
# (or not symmetric), and clamping it to 0 would report an exact factorization of a matrix that has none.
NEGATIVE_RESIDUAL = 100.0


class _DiagonalInverse(LinearOperator):
    def __init__(self, diag: Any, op: LinearOperator):
        self.inv = 1.0 / diag
        self.shape, self.dtype, self.backend = op.shape, op.dtype, op.backend

    def _matmat(self, x: Any) -> Any:
        return self.inv[:, None] * x


def jacobi_preconditioner(A: Any) -> LinearOperator:
    """diag(A)⁻¹. A must expose its diagonal (dense arrays do); a non-positive diagonal entry raises."""
    op = as_operator(A, "A")
    diag = check_diagonal(op.diagonal(), op, "A")
    if not bool((diag > 0).all()):
        worst = int(op.backend.xp.argmin(diag))
        raise v.NotPositiveDefiniteError(f"A has diagonal entry {float(diag[worst]):.3g} ≤ 0 at index {worst}: "
                                         "not positive definite, no Jacobi preconditioner")
    return _DiagonalInverse(diag, op)


class PivotedCholesky(NamedTuple):
    """Partial pivoted Cholesky: A ≈ L Lᵀ with L (n, r) float64; ``pivots`` (r,) the chosen indices in order;
    ``residual_diagonal`` (n,) the diagonal of A − L Lᵀ (≥ 0); ``residual_trace`` its sum (float), the error
    bound in trace norm."""

    factor: Any
    pivots: np.ndarray
    residual_diagonal: Any
    residual_trace: float


def pivoted_cholesky(A: Any, rank: int, *, rtol: float = 0.0, memory_budget: Any = None) -> PivotedCholesky:
    """Rank-r partial Cholesky with greedy diagonal pivoting (Harbrecht, Peters and Schneider 2012).

    Needs A's diagonal and r of its columns: O(n r²) flops plus r column fetches. Stops early once the residual
    trace falls below rtol·trace(A). Computed in float64; the factor, (n, r) float64, is checked against
    ``memory_budget`` (bytes; default half the free memory where the backend allocates) before it is allocated.

    Raises
    ------
    NotPositiveDefiniteError
        When A's diagonal is not positive, or a residual diagonal falls below −100·eps·trace(A) (eps of A's dtype):
        A is not positive semi-definite (or not symmetric).
    ValueRangeError
        When a dense A is not symmetric.
    """
    op = as_operator(A, "A")
    xp = op.backend.xp
    n = op.shape[0]
    rank = v.check_int(rank, "rank", minimum=1, maximum=n)
    rtol = v.check_positive(rtol, "rtol", allow_zero=True)
    _check_factor_memory(n, rank + 4, memory_budget, op, "pivoted_cholesky")
    check_dense_symmetric(op)
    d = check_diagonal(op.diagonal(), op, "A").astype(np.float64)
    if not bool((d > 0).all()):
        bad = op.backend.to_numpy(d <= 0)
        raise v.NotPositiveDefiniteError(f"A ({op.shape}) must be symmetric positive definite, but its diagonal holds "
                                         f"{int(bad.sum())} entries ≤ 0 (the smallest {float(d.min()):.3g}); a "
                                         "pivoted Cholesky needs positive pivots")
    trace0 = float(d.sum())
    floor = -NEGATIVE_RESIDUAL * eps(op.dtype) * trace0
    factor = xp.zeros((n, rank), dtype=np.float64)
    pivots: list[int] = []
    for m in range(rank):
        i = int(xp.argmax(d))
        pivot = float(d[i])
        if pivot <= max(rtol * trace0, 0.0) or pivot <= 0:
            break
        column = op.columns([i])[:, 0].astype(np.float64)
        column = (column - factor[:, :m] @ factor[i, :m]) / np.sqrt(pivot)
        factor[:, m] = column
        residual = d - column**2
        _check_residual(residual, floor, m + 1, trace0, op)
        d = xp.maximum(residual, 0.0)
        d[xp.asarray(pivots + [i])] = 0.0  # pivoted rows are exact; rounding must not revive them
        pivots.append(i)
    r = len(pivots)
    return PivotedCholesky(factor[:, :r], np.asarray(pivots, dtype=np.int64), d, float(d.sum()))


def _check_residual(residual: Any, floor: float, pivots: int, trace0: float, op: LinearOperator) -> None:
    """NotPositiveDefiniteError when the residual diagonal of A − L Lᵀ fell below ``floor`` (beyond rounding)."""
    value = float(residual.min())  # one synchronisation per pivot; where it lies only matters for the message
    if value < floor:
        lowest = int(op.backend.xp.argmin(residual))
        raise v.NotPositiveDefiniteError(
            f"A ({op.shape}, {op.dtype}) is not positive semi-definite (or not symmetric): after {pivots} pivots of "
            f"a pivoted Cholesky the residual diagonal at index {lowest} is {value:.3g}, below "
            f"−{NEGATIVE_RESIDUAL:g}·eps·trace(A) = {floor:.3g} (trace {trace0:.3g})")


class _SpectralInverse(LinearOperator):
    """P⁻¹ for P = U diag(values) Uᵀ + tail·(I − U Uᵀ), U (n, r) orthonormal: P⁻¹x = U (1/values − 1/tail) Uᵀx + x/tail.

    The spectral form is stable where a Woodbury solve with a tiny diagonal would cancel catastrophically.
    """

    def __init__(self, u: Any, values: Any, tail: float, op: LinearOperator):
        self.u = u.astype(op.dtype)
        # when U spans everything there is no complement: its 1/tail terms would only cancel, badly for a tiny tail
        self.tail = None if u.shape[1] >= op.shape[0] else tail
        self.coeff = (1.0 / values - (0.0 if self.tail is None else 1.0 / tail)).astype(op.dtype)
        self.shape, self.dtype, self.backend = op.shape, op.dtype, op.backend

    def _matmat(self, x: Any) -> Any:
        out = self.u @ (self.coeff[:, None] * (self.u.T @ x))
        return out if self.tail is None else out + x / self.dtype.type(self.tail)


def pivoted_cholesky_preconditioner(A: Any, rank: int = 100, *, memory_budget: Any = None) -> LinearOperator:
    """(L Lᵀ + μ I)⁻¹ from a rank-r pivoted Cholesky L of A, μ the mean of the residual diagonal of A − L Lᵀ
    (floored at eps·mean diag A): for A = K + σ²I, μ ≈ σ² plus what the rank-r factor missed of K.

    Applied through the thin SVD of L in O(n r) per column. Best on kernels with decaying spectra plus noise.
    The factor, its SVD and the preconditioner's basis, about 3·n·r float64, are checked against
    ``memory_budget`` (bytes; default half the free memory where the backend allocates) before they are allocated.
    """
    op = as_operator(A, "A")
    backend = op.backend
    rank = min(v.check_int(rank, "rank", minimum=1), op.shape[0])
    _check_factor_memory(op.shape[0], 3 * rank + 4, memory_budget, op, "pivoted_cholesky_preconditioner")
    pc = pivoted_cholesky(op, rank, memory_budget=memory_budget)
    mean_diag = float(check_diagonal(op.diagonal(), op, "A").astype(np.float64).mean())
    mu = max(pc.residual_trace / op.shape[0], eps(op.dtype) * mean_diag)
    u, sigma, _ = backend.svd(pc.factor)
    return _SpectralInverse(u, sigma**2 + mu, mu, op)


def nystrom_preconditioner(A: Any, rank: int = 100, *, shift: float = 0.0, seed: int = 0,
                           memory_budget: Any = None) -> LinearOperator:
    """Randomized Nyström preconditioner (Frangella, Tropp and Udell 2023) for A + shift·I, from r products with A.

    A ≈ U Λ Uᵀ from a seeded Gaussian sketch (``seed`` ≥ 0; the same on every backend), computed in float64;
    eigenvalues that the sketch cannot resolve (≤ its stabilizing shift) are dropped.
    P = U (Λ + shift) Uᵀ + (λ_r + shift)(I − UUᵀ).
    The sketch and its factors, about 8·n·r float64, are checked against ``memory_budget`` (bytes; default half the
    free memory where the backend allocates) before they are allocated.

    Raises
    ------
    NotPositiveDefiniteError
        When the sketch's core Ωᵀ A Ω + νI is not positive definite: A is zero or not positive semi-definite.
    ValueRangeError
        When a dense A is not symmetric, or the sketch resolves no positive eigenvalue.
    """
    op = as_operator(A, "A")
    backend, xp = op.backend, op.backend.xp
    n = op.shape[0]
    rank = v.check_int(rank, "rank", minimum=1, maximum=n)
    shift = v.check_positive(shift, "shift", allow_zero=True)
    seed = check_seed(seed)
    _check_factor_memory(n, 8 * rank, memory_budget, op, "nystrom_preconditioner")
    check_dense_symmetric(op)
    omega, _ = backend.qr(seeded_normal((n, rank), seed, np.float64, backend))
    y = op._matmat(omega.astype(op.dtype)).astype(np.float64)
    nu = np.sqrt(n) * eps(op.dtype) * float(xp.sqrt((y**2).sum()))  # stabilizing shift of the sketch
    y_nu = y + nu * omega
    core = omega.T @ y_nu
    try:
        lower = backend.cholesky((core + core.T) / 2)
    except np.linalg.LinAlgError:
        raise v.NotPositiveDefiniteError(f"the Nyström core Ωᵀ A Ω + νI ({rank} × {rank}, ν = {nu:.3g}) of A "
                                         f"({op.shape}) is not positive definite: A is zero or not positive "
                                         "semi-definite") from None
    b = backend.solve_triangular(lower, y_nu.T, lower=True).T  # B = Y_ν L⁻ᵀ
    u, sigma, _ = backend.svd(b)
    lam = sigma**2 - nu
    keep = backend.to_numpy(lam > 0)
    if not keep.any():
        raise v.ValueRangeError("the Nyström sketch of A is zero to rounding: A has no resolvable spectrum")
    idx = xp.asarray(np.flatnonzero(keep))
    lam = lam[idx]
    return _SpectralInverse(u[:, idx], lam + shift, float(lam.min()) + shift, op)


def _check_factor_memory(n: int, columns: int, memory_budget: Any, op: LinearOperator, caller: str) -> None:
    """MemoryBudgetError before a preconditioner allocates ``columns`` float64 n-vectors (its factors)."""
    v.check_memory(v.nbytes_of((n, columns), np.float64), v.resolve_memory_budget(memory_budget, op.backend),
                   what=f"{caller} on an operator of size n = {n} ({columns} float64 n-vectors)",
                   alternative="use a lower rank, or jacobi_preconditioner (n values)")
