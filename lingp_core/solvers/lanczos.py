"""Lanczos tridiagonalization (many start vectors at once) and top-k eigenpairs from it."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

import backends
from backends import Backend
from lingp_core import _validate as v
from lingp_core._precision import default_rtol
from lingp_core.operators import LinearOperator, as_operator
from lingp_core.solvers._common import (
    check_dense_symmetric,
    check_seed,
    column_norms,
    seeded_normal,
)

REORTHOGONALIZE = ("full", "none")


class LanczosResult(NamedTuple):
    """What :func:`lanczos` returns.

    Attributes
    ----------
    Q : array (n, m)
        Orthonormal Lanczos basis, A's dtype and backend; m ≤ k steps (fewer when the Krylov space was exhausted).
    alpha : array (m,)
        Diagonal of the tridiagonal T = Qᵀ A Q, float64, on A's backend.
    beta : array (m − 1,)
        Off-diagonal of T, float64, on A's backend.
    breakdown : bool
        True when the iteration stopped early because the Krylov space became invariant (exact in its span).
    """

    Q: Any
    alpha: Any
    beta: Any
    breakdown: bool


class EigenResult(NamedTuple):
    """What :func:`lanczos_eigsh` returns.

    Attributes
    ----------
    values : array (k,)
        Eigenvalues, float64, descending, on A's backend; repeated eigenvalues appear as often as they occur.
    vectors : array (n, k)
        Orthonormal eigenvectors in A's dtype, on A's backend.
    residual_norms : array (k,)
        True residuals ‖A v − λ v‖, float64, on A's backend (computed with one product, not from the recurrence).
    converged : ndarray of bool (k,)
        Where the residual met tol·max|λ|.
    runs : int
        Lanczos runs made: the first, one per group of pairs it could not see (repeated eigenvalues), and the last
        one that confirmed nothing larger was left.
    """

    values: Any
    vectors: Any
    residual_norms: Any
    converged: np.ndarray | None = None
    runs: int = 1


def lanczos(A: Any, k: int, *, v0: Any = None, reorthogonalize: str = "full", seed: int = 0,
            memory_budget: Any = None) -> LanczosResult:
    """k steps of Lanczos on a symmetric (n, n) matrix or operator.

    Parameters
    ----------
    A : array (n, n) or operator
    k : int
        Steps, 1 ≤ k ≤ n.
    v0 : array (n,), optional
        Start vector (default: seeded standard normal, the same on every backend).
    reorthogonalize : {"full", "none"}
        "full" orthogonalizes every new vector against the whole basis twice (classical Gram–Schmidt, run twice:
        GEMMs, GPU-friendly), which keeps Qᵀ Q = I to ~n·eps; "none" is the plain three-term recurrence.
    seed : int
        Seed of the default start vector, ≥ 0.
    memory_budget : float, optional
        Bytes allowed for the basis and its returned copy, 2·k·n values of A's dtype (default: half the free memory
        where the backend allocates); more raises MemoryBudgetError before anything is allocated.

    Raises
    ------
    ValueRangeError
        When a dense A is not symmetric, or A's scale lies outside the range where Lanczos's inner products stay
        finite and normal in its dtype (see :func:`lanczos_columns`).
    """
    op = as_operator(A, "A")
    n = op.shape[0]
    k = v.check_int(k, "k", minimum=1, maximum=n)
    v.check_choice(reorthogonalize, "reorthogonalize", REORTHOGONALIZE)
    seed = check_seed(seed)
    check_dense_symmetric(op)
    if v0 is None:
        start = seeded_normal((n, 1), seed, op.dtype, op.backend)
    else:
        start = _checked_start(v0, n, op)
    # the basis (k, n) and the contiguous Q returned from it, plus a few n-vectors of the recurrence
    v.check_memory(v.nbytes_of((2 * k + 6, n), op.dtype), v.resolve_memory_budget(memory_budget, op.backend),
                   what=f"lanczos with k = {k} steps on an operator of size n = {n} ({op.dtype})",
                   alternative="take fewer steps k")
    basis, alpha, beta, steps = lanczos_columns(op, start, k, reorthogonalize=reorthogonalize, keep_basis=True)
    m = int(steps[0])
    xp = op.backend.xp
    return LanczosResult(xp.ascontiguousarray(basis[:m, :, 0].T), op.backend.asarray(alpha[:m, 0]),
                         op.backend.asarray(beta[:m - 1, 0]), m < k)


def lanczos_columns(op: LinearOperator, start: Any, k: int, *, reorthogonalize: str = "full",
                    keep_basis: bool = False, deflate: Any = None) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """Independent Lanczos runs from each column of ``start`` (n, m), advanced together with one product per step.

    Returns the basis (k, n, m) (or None without ``keep_basis`` and reorthogonalization), alpha (k, m) and
    beta (k − 1, m) as float64 NumPy arrays, and the valid number of steps of each column (m,): a column whose
    β fell to rounding level stopped there (its Krylov space is invariant); entries after it are meaningless.
    ``deflate`` (n, l), orthonormal columns (e.g. converged eigenvectors), is projected out of every new vector
    with full reorthogonalization: the runs then see A restricted to the complement of its span (``start`` must
    already be orthogonal to it). The caller checks the memory: k·n·m values for the basis.

    β is sqrt(Σ w²) in float64 with no per-step rescaling, so A's scale must keep the entries of the Lanczos vectors,
    down to the breakdown level, normal and their squares finite: ValueRangeError (after the run, from the
    tridiagonals) otherwise, with the advice to rescale A.
    """
    backend: Backend = op.backend
    n, m = start.shape
    # the start vector's norm is taken once, so it can afford the rescue of tiny or huge entries
    q = start / backend.asarray(column_norms(start, backend)).astype(start.dtype)
    # an overflow shows as Inf in α or β, which _check_scale turns into an error that says what to do
    with np.errstate(over="ignore", invalid="ignore"):
        basis, alphas, betas = _recurrence(op, q, k, reorthogonalize, keep_basis or reorthogonalize == "full",
                                           deflate)
    alpha_host = np.stack([backend.to_numpy(a) for a in alphas]).astype(np.float64)
    beta_host = (np.stack([backend.to_numpy(b) for b in betas]).astype(np.float64) if betas
                 else np.zeros((0, m)))
    _check_scale(alpha_host, beta_host, n, op.dtype)
    steps = _valid_steps(alpha_host, beta_host, op.dtype)
    return basis, alpha_host, beta_host, steps


def _recurrence(op: LinearOperator, q: Any, k: int, reorthogonalize: str, keep: bool, deflate: Any
                ) -> tuple[Any, list, list]:
    """The Lanczos steps of :func:`lanczos_columns` from unit columns q (n, m): basis (or None), α's and β's (device
    arrays (m,) each), with no host synchronization."""
    xp = op.backend.xp
    n, m = q.shape
    basis: Any = xp.zeros((k, n, m), dtype=op.dtype) if keep else None
    alphas: list = []
    betas: list = []
    q_prev = xp.zeros_like(q)
    beta_prev = xp.zeros(m, dtype=op.dtype)
    # running size of T per column: a β at rounding level against it means an invariant subspace (see _valid_steps)
    scale = xp.zeros(m, dtype=op.dtype)
    eps = 100 * np.finfo(op.dtype).eps
    for j in range(k):
        if keep:
            basis[j] = q
        w = op._matmat(q)  # unchecked: the inputs were checked once, at the boundary
        alpha = (q * w).sum(axis=0)
        w = w - alpha * q - beta_prev * q_prev
        if reorthogonalize == "full":
            for _ in range(2):  # twice is enough (Kahan–Parlett)
                w = w - xp.einsum("jnm,jm->nm", basis[: j + 1], xp.einsum("jnm,nm->jm", basis[: j + 1], w))
                if deflate is not None:
                    w = w - deflate @ (deflate.T @ w)
        alphas.append(alpha)
        if j == k - 1:
            break
        beta = xp.sqrt((w.astype(np.float64) ** 2).sum(axis=0)).astype(op.dtype)
        betas.append(beta)
        scale = xp.maximum(scale, xp.maximum(xp.abs(alpha), beta))
        # after a breakdown the column stops (q = 0): dividing rounding noise by a tiny β would blow the basis up
        # and make later α, β huge, so the breakdown would no longer look like one
        alive = beta > eps * scale
        q_next = xp.where(alive, w / xp.where(alive, beta, 1), 0)
        q_prev, q, beta_prev = q, q_next, xp.where(alive, beta, 0)
    return basis, alphas, betas


def scale_range(n: int, dtype: Any) -> tuple[float, float]:
    """(low, high) bounds on the size of T (max |α|, β) for which Lanczos's products stay normal and finite.

    Low: at the breakdown level β = 100·eps·scale, the largest entry of w (≥ β/√n) must still be a normal number of
    the dtype and, for float64, have a normal square (β is summed from squares in float64). High: β² = Σ w² must
    not overflow float64 nor the products the dtype (with a margin of 16 for ‖A‖ above the T seen so far).
    """
    info, info64 = np.finfo(dtype), np.finfo(np.float64)
    entry_low = max(float(info.tiny), float(np.sqrt(info64.tiny)))
    low = np.sqrt(max(n, 1)) * entry_low / (100 * float(info.eps))
    high = min(float(info.max), float(np.sqrt(info64.max))) / 16
    return float(low), float(high)


def _check_scale(alpha: np.ndarray, beta: np.ndarray, n: int, dtype: Any) -> None:
    """ValueRangeError (or NonFiniteError for NaN products) when a run's tridiagonal shows A outside
    :func:`scale_range`: its β would have under- or overflowed, so eigenvalues and breakdowns would be wrong."""
    low, high = scale_range(n, dtype)
    values = np.concatenate([np.abs(alpha), beta])
    finite = np.where(np.isfinite(values), values, 0.0)
    scale = finite.max(axis=0, initial=0.0)  # per column (start vector)
    advice = ("rescale A by a common factor (a power of 2 is exact): eigenvalues scale with it and log det A shifts "
              "by n·log(factor)")
    what = f"Lanczos on A (n = {n}, {np.dtype(dtype)})"
    if np.isinf(values).any() or (scale > high).any():
        raise v.ValueRangeError(f"{what} met |α|, β up to {float(np.max(finite)):.3g}"
                                f"{' and Inf' if np.isinf(values).any() else ''}, beyond {high:.3g} where its inner "
                                f"products stay finite; {advice}")
    if np.isnan(values).any():
        raise v.NonFiniteError(f"{what} met NaN: A's products are not finite")
    tiny = (scale > 0) & (scale < low)
    if tiny.any():
        raise v.ValueRangeError(f"{what} met |α|, β only up to "
                                f"{float(scale[tiny].max()):.3g}, below {low:.3g} where its inner products stay "
                                f"normal; {advice}")


def _valid_steps(alpha: np.ndarray, beta: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Per column: steps before the first β at rounding level relative to the size of T (an invariant subspace)."""
    k, m = alpha.shape
    scale = np.maximum(np.abs(alpha).max(axis=0), np.abs(beta).max(axis=0, initial=0.0))
    tiny = 100 * np.finfo(dtype).eps * np.maximum(scale, np.finfo(np.float64).tiny)
    steps = np.full(m, k, dtype=np.int64)
    for col in range(m):
        small = np.flatnonzero(beta[:, col] <= tiny[col])
        if small.size:
            steps[col] = small[0] + 1
    return steps


class _Pairs(NamedTuple):
    """Ritz pairs: values (l,) host float64, descending; vectors (n, l) on the backend; residual norms (l,) host."""

    values: np.ndarray
    vectors: Any
    residuals: np.ndarray

    def take(self, index: np.ndarray, xp: Any) -> _Pairs:
        return _Pairs(self.values[index], self.vectors[:, xp.asarray(index)], self.residuals[index])


def lanczos_eigsh(A: Any, k: int, *, steps: int | None = None, v0: Any = None, seed: int = 0,
                  tol: float | None = None, memory_budget: Any = None) -> EigenResult:
    """The k largest eigenpairs of a symmetric (n, n) matrix or operator by fully reorthogonalized Lanczos with
    deflation, so that a repeated eigenvalue comes out as often as it occurs.

    One Lanczos run sees a single direction of each eigenspace (the start vector's projection on it): it cannot see
    multiplicity. So the converged pairs of each run are locked and the next run, from a fresh seeded start vector,
    works on the orthogonal complement of their span; the runs stop when one finds nothing above the k-th locked
    value. When all eigenvalues are simple that confirming run is the only extra cost (a second ``steps`` products).

    Parameters
    ----------
    A : array (n, n) or operator
    k : int
        Eigenpairs wanted, 1 ≤ k ≤ n.
    steps : int, optional
        Lanczos steps per run (default min(n, max(2k + 20, 40))): more steps, more accurate trailing pairs.
    v0 : array (n,), optional
        Start vector of the first run (default: seeded standard normal); later runs draw seeded vectors.
    seed : int
        Seed of the start vectors, ≥ 0 (the same on every backend).
    tol : float, optional
        A pair is converged, and locked, when ‖A v − λ v‖ ≤ tol·max|λ| (default sqrt(eps) of A's dtype).
    memory_budget : float, optional
        Bytes allowed for the Lanczos basis and the locked and Ritz vectors, (steps + 6k + 4)·n values of A's dtype
        plus 2·k·n float64 (the operator's own products come on top); default: half the free memory where the
        backend allocates. More raises MemoryBudgetError before anything is allocated.

    Returns
    -------
    EigenResult
        Pairs that did not converge (too few steps) are returned with their residuals and ``converged`` False.
    """
    op = as_operator(A, "A")
    backend, n = op.backend, op.shape[0]
    k = v.check_int(k, "k", minimum=1, maximum=n)
    seed = check_seed(seed)
    steps = min(n, max(2 * k + 20, 40)) if steps is None else v.check_int(steps, "steps", minimum=k, maximum=n)
    tol = default_rtol(op.dtype) if tol is None else v.check_positive(tol, "tol")
    first = None if v0 is None else _checked_start(v0, n, op)
    check_dense_symmetric(op)
    v.check_memory(v.nbytes_of((steps + 6 * k + 4, n), op.dtype) + v.nbytes_of((2 * k, n), np.float64),
                   v.resolve_memory_budget(memory_budget, backend),
                   what=f"lanczos_eigsh with k = {k} pairs and {steps} steps on an operator of size n = {n} "
                        f"({op.dtype})", alternative="ask for fewer pairs k or fewer steps")
    pairs, runs, scale = _deflated_runs(op, k, steps, first, seed, tol)
    if pairs.values.size < k:
        raise v.ConvergenceError(f"lanczos_eigsh found only {pairs.values.size} of k = {k} eigenpairs in {runs} "
                                 "Lanczos runs; pass more steps, another v0 or seed")
    return EigenResult(backend.asarray(pairs.values), pairs.vectors, backend.asarray(pairs.residuals),
                       pairs.residuals <= tol * scale, runs)


def _deflated_runs(op: LinearOperator, k: int, steps: int, first: Any, seed: int, tol: float
                   ) -> tuple[_Pairs, int, float]:
    """Lanczos runs, each on the complement of the pairs locked so far, until one finds nothing above the k-th
    locked value (at most k + 1 runs: each run before the last locks a pair among the top k).

    Returns the k largest pairs (converged ones, topped up with the last run's unconverged ones when too few
    converged), the number of runs and the spectral scale max|λ| seen.
    """
    xp, n = op.backend.xp, op.shape[0]
    locked = _Pairs(np.zeros(0), xp.zeros((n, 0), dtype=op.dtype), np.zeros(0))
    pending = locked  # the last run's unconverged pairs
    scale, runs = 0.0, 0
    while runs <= k and locked.values.size < n:
        start = _deflated_start(op, first if runs == 0 else None, [seed, runs] if runs else seed, locked.vectors)
        if start is None:  # the locked vectors span all the start vector could reach
            break
        basis, alpha, beta, valid = lanczos_columns(op, start, min(steps, n - locked.values.size), keep_basis=True,
                                                    deflate=locked.vectors if locked.values.size else None)
        runs += 1
        found = _ritz_pairs(op, basis, alpha, beta, int(valid[0]), k)
        del basis
        scale = max(scale, float(np.abs(found.values).max()))
        kth = locked.values[k - 1] if locked.values.size >= k else -np.inf
        if found.values[0] <= kth + tol * scale:  # nothing left above the k-th locked value
            break
        converged = found.residuals <= tol * scale
        pending = found.take(np.flatnonzero(~converged), xp)
        if not converged.any():
            break
        locked = _top(locked, found.take(np.flatnonzero(converged), xp), k, xp)
    return (locked if locked.values.size >= k else _top(locked, pending, k, xp)), runs, scale


def _checked_start(v0: Any, n: int, op: LinearOperator) -> Any:
    """v0 as an (n, 1) array of A's dtype and backend; a zero vector has no direction to start from."""
    start = v.as_float_array(v0, "v0", op.backend, shape=(n,), dtypes=[op.dtype])[:, None]
    if not bool((start != 0).any()):
        raise v.ValueRangeError(f"v0 (shape ({n},)) is zero: Lanczos needs a start vector with a direction")
    return start


def _deflated_start(op: LinearOperator, start: Any, seed: Any, locked: Any) -> Any:
    """The start vector (or a seeded one) orthogonalized twice against the locked vectors (n, l); None when nothing
    is left of it beyond rounding."""
    if start is None:
        start = seeded_normal((op.shape[0], 1), seed, op.dtype, op.backend)
    if not locked.shape[1]:
        return start
    before = float(column_norms(start, op.backend)[0])
    for _ in range(2):
        start = start - locked @ (locked.T @ start)
    after = float(column_norms(start, op.backend)[0])
    return start if after > 100 * np.finfo(op.dtype).eps * before else None


def _ritz_pairs(op: LinearOperator, basis: Any, alpha: np.ndarray, beta: np.ndarray, m: int, top: int) -> _Pairs:
    """The ``top`` largest Ritz pairs of an m-step single-column run, with their true residual norms."""
    host = backends.get_backend("numpy")  # the tridiagonal is a small float64 host array already
    theta, s = host.eigh_tridiagonal(alpha[:m, 0], beta[: m - 1, 0])
    order = np.argsort(-theta, kind="stable")[:top]
    values = theta[order]
    vectors = basis[:m, :, 0].T @ op.backend.asarray(s[:, order].astype(op.dtype))
    # the true residual costs one product and, unlike the recurrence's |β s|, stays honest after rounding
    residual = op._matmat(vectors) - vectors * op.backend.asarray(values.astype(op.dtype))
    return _Pairs(values, vectors, column_norms(residual, op.backend))


def _top(a: _Pairs, b: _Pairs, keep: int, xp: Any) -> _Pairs:
    """The ``keep`` largest pairs of both sets, descending (a stable order keeps a's pairs first among equals)."""
    values = np.concatenate([a.values, b.values])
    order = np.argsort(-values, kind="stable")[:keep]
    vectors = xp.concatenate([a.vectors, b.vectors], axis=1)[:, xp.asarray(order)]
    return _Pairs(values[order], vectors, np.concatenate([a.residuals, b.residuals])[order])
