"""Lanczos tridiagonalization (many start vectors at once) and top-k eigenpairs from it."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from backends import Backend
from lingp_core import _validate as v
from lingp_core.operators import LinearOperator, as_operator
from lingp_core.solvers._common import seeded_normal

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
    """Top eigenpairs: values (k,) float64 descending, vectors (n, k) in A's dtype, residual_norms (k,) float64
    (‖A v − λ v‖ estimated from the Lanczos recurrence), all on A's backend."""

    values: Any
    vectors: Any
    residual_norms: Any


def lanczos(A: Any, k: int, *, v0: Any = None, reorthogonalize: str = "full", seed: int = 0) -> LanczosResult:
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
        Seed of the default start vector.
    """
    op = as_operator(A, "A")
    n = op.shape[0]
    k = v.check_int(k, "k", minimum=1, maximum=n)
    v.check_choice(reorthogonalize, "reorthogonalize", REORTHOGONALIZE)
    if v0 is None:
        start = seeded_normal((n, 1), seed, op.dtype, op.backend)
    else:
        start = v.as_float_array(v0, "v0", op.backend, shape=(n,), dtypes=[op.dtype])[:, None]
    basis, alpha, beta, steps = lanczos_columns(op, start, k, reorthogonalize=reorthogonalize, keep_basis=True)
    m = int(steps[0])
    xp = op.backend.xp
    return LanczosResult(xp.ascontiguousarray(basis[:m, :, 0].T), op.backend.asarray(alpha[:m, 0]),
                         op.backend.asarray(beta[:m - 1, 0]), m < k)


def lanczos_columns(op: LinearOperator, start: Any, k: int, *, reorthogonalize: str = "full",
                    keep_basis: bool = False) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """Independent Lanczos runs from each column of ``start`` (n, m), advanced together with one product per step.

    Returns the basis (k, n, m) (or None without ``keep_basis`` and reorthogonalization), alpha (k, m) and
    beta (k − 1, m) as float64 NumPy arrays, and the valid number of steps of each column (m,): a column whose
    β fell to rounding level stopped there (its Krylov space is invariant); entries after it are meaningless.
    """
    backend: Backend = op.backend
    xp = backend.xp
    n, m = start.shape
    q = start / xp.sqrt((start.astype(np.float64) ** 2).sum(axis=0)).astype(start.dtype)
    keep = keep_basis or reorthogonalize == "full"
    basis = xp.zeros((k, n, m), dtype=op.dtype) if keep else None
    alphas, betas = [], []
    q_prev = xp.zeros_like(q)
    beta_prev = xp.zeros(m, dtype=op.dtype)
    # running size of T per column: a β at rounding level against it means an invariant subspace (see _valid_steps)
    scale = xp.zeros(m, dtype=op.dtype)
    eps = 100 * np.finfo(op.dtype).eps
    for j in range(k):
        if keep:
            basis[j] = q
        w = op.matmat(q)
        alpha = (q * w).sum(axis=0)
        w = w - alpha * q - beta_prev * q_prev
        if reorthogonalize == "full":
            for _ in range(2):  # twice is enough (Kahan–Parlett)
                w = w - xp.einsum("jnm,jm->nm", basis[: j + 1], xp.einsum("jnm,nm->jm", basis[: j + 1], w))
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
    alpha_host = np.stack([backend.to_numpy(a) for a in alphas]).astype(np.float64)
    beta_host = (np.stack([backend.to_numpy(b) for b in betas]).astype(np.float64) if betas
                 else np.zeros((0, m)))
    steps = _valid_steps(alpha_host, beta_host, op.dtype)
    return basis, alpha_host, beta_host, steps


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


def lanczos_eigsh(A: Any, k: int, *, steps: int | None = None, v0: Any = None, seed: int = 0) -> EigenResult:
    """The k largest eigenpairs of a symmetric (n, n) matrix or operator by fully reorthogonalized Lanczos.

    Parameters
    ----------
    A : array (n, n) or operator
    k : int
        Eigenpairs wanted, 1 ≤ k ≤ n.
    steps : int, optional
        Lanczos steps (default min(n, max(2k + 20, 40))): more steps, more accurate trailing pairs.
    """
    op = as_operator(A, "A")
    n = op.shape[0]
    k = v.check_int(k, "k", minimum=1, maximum=n)
    steps = min(n, max(2 * k + 20, 40)) if steps is None else v.check_int(steps, "steps", minimum=k, maximum=n)
    result = lanczos(op, steps, v0=v0, seed=seed)
    m = result.Q.shape[1]
    if m < k:
        raise v.ConvergenceError(f"the Krylov space of the start vector has dimension {m} < k = {k}; "
                                 "pass another v0 or seed")
    theta, s = op.backend.eigh_tridiagonal(result.alpha, result.beta)
    order = op.backend.xp.argsort(theta)[::-1][:k]
    values = theta[order]
    vectors = (result.Q @ s[:, order].astype(op.dtype))
    # the true residual costs one product and, unlike the recurrence's |β s|, stays honest after rounding
    residual = op.matmat(vectors) - vectors * values.astype(op.dtype)
    norms = op.backend.xp.sqrt((residual.astype(np.float64) ** 2).sum(axis=0))
    return EigenResult(values, vectors, norms)
