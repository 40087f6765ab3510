"""The Fisher / generalized Gauss–Newton matrix F = Jᵀ Λ J as an operator, and low-rank eigen-approximations.

F is never formed: with per-example factors L_i L_iᵀ = Λ_i (from a likelihood) the rows of each example are
transformed once, G_i = L_iᵀ J_i (for factored blocks only Δ changes), and then F V = Gᵀ (G V) and
diag(F) = column sums of squares of G, both without forming J. A matrix-free Jacobian (AutogradJacobian) gets
F V = Jᵀ (Λ (J V)) with Λ applied blockwise per example instead, without a diagonal.

Low rank: the top-k eigenpairs of F (p-space) or of the kernel K = s·J Jᵀ (n·c-space), by Lanczos on the operator
or by a randomized SVD (Halko–Martinsson–Tropp) of G = Λ^½ J, returned with the trace the truncation dropped.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from lingp_core import _validate as v
from lingp_core.jacobian import JacobianBlocks, JacobianShape
from lingp_core.kernels import KernelOperator, check_scale
from lingp_core.likelihoods import Likelihood, as_likelihood
from lingp_core.operators import LinearOperator, LowRankPlusDiagonal, check_operand
from lingp_core.sharded import ShardedJacobian
from lingp_core.solvers._common import check_seed, seeded_normal
from lingp_core.solvers.lanczos import lanczos_eigsh

__all__ = ["FisherOperator", "LowRankResult", "fisher", "fisher_lowrank", "kernel_lowrank", "LOWRANK_METHODS"]

LOWRANK_METHODS = ("lanczos", "randomized")


# ----- the operator -------------------------------------------------------------------------------------------------

class FisherOperator(LinearOperator):
    """F + damping·I = Jᵀ Λ J + damping·I as a (p, p) operator; made by :func:`fisher`.

    Attributes
    ----------
    J : JacobianBlocks or JacobianShape
        The Jacobian.
    factors : array of shape (n, c) or (n, c, c)
        Per-example L_i with L_i L_iᵀ = Λ_i.
    G : JacobianBlocks or None
        The transformed rows L_iᵀ J_i when J is a JacobianBlocks (F = Gᵀ G), else None.
    damping : float
        Added to the diagonal.
    """

    def __init__(self, J: JacobianShape, likelihood: Likelihood, factors: Any, damping: float) -> None:
        self.J, self.likelihood, self.factors, self.damping = J, likelihood, factors, damping
        self.shape = (J.p, J.p)
        self.dtype = J.dtype
        self.backend = J.backend
        self.G = J.transform_rows(factors) if isinstance(J, (JacobianBlocks, ShardedJacobian)) else None
        self._diag: Any = None

    def __repr__(self) -> str:
        return (f"FisherOperator(p={self.shape[0]}, n={self.J.n}, c={self.J.n_outputs}, "
                f"likelihood={self.likelihood!r}, damping={self.damping}, dtype={self.dtype}, "
                f"backend={self.backend.name!r})")

    def _matmat(self, x: Any) -> Any:
        if isinstance(self.G, ShardedJacobian):  # Σ_i G_iᵀ (G_i x): one round on the shards, one reduction
            out = self.G.normal_matmat(x)
        elif self.G is not None:
            # block by block, skipping the operand checks of the public products (x is the operator's own input)
            gx = self.backend.xp.zeros((self.G.shape[0], x.shape[1]), dtype=self.dtype)
            start = 0
            for block in self.G.blocks:
                gx += block.matmat(x[start: start + block.p])
                start += block.p
            out = self.backend.xp.concatenate([block.rmatmat(gx) for block in self.G.blocks], axis=0)
        else:
            # Λ = L Lᵀ, so F x = Jᵀ L (Lᵀ (J x))
            u = apply_factors(self.factors, self.J.matmat(x), transpose=True)
            out = self.J.rmatmat(apply_factors(self.factors, u, transpose=False))
        return out + self.damping * x if self.damping else out

    def diagonal(self) -> Any:
        """diag(F) + damping: (p,), the column sums of squares of G (computed once, then cached)."""
        if self.G is None:
            raise v.MissingCapabilityError(f"{type(self.J).__name__} has no cheap column norms: the diagonal of F "
                                           "needs exported blocks (export_jacobian)")
        if self._diag is None:
            self._diag = self.G.column_sq_norms()
        return self._diag + self.damping

    def to_dense(self, memory_budget: Any = None) -> Any:
        """F + damping·I as a (p, p) array: Gᵀ G from the dense G (n·c, p), after checking both fit the budget."""
        if self.G is None:
            return super().to_dense(memory_budget)
        budget = v.resolve_memory_budget(memory_budget, self.backend)
        needed = v.nbytes_of(self.shape, self.dtype) + v.nbytes_of(self.G.shape, self.dtype)
        v.check_memory(needed, budget, what=f"to_dense of {self!r} (with the dense G of shape {self.G.shape})",
                       alternative="keep using matrix-free products, or fisher_lowrank")
        g = self.G.to_dense(memory_budget=budget)
        out = g.T @ g
        if self.damping:
            out[np.arange(self.shape[0]), np.arange(self.shape[0])] += self.damping
        return out


def apply_factors(factors: Any, u: Any, transpose: bool) -> Any:
    """L_i u_i (or L_iᵀ u_i) per example for u (n·c, k), with factors (n, c) (diagonal L_i) or (n, c, c), blockwise:
    never an n·c × n·c matrix."""
    n, c = factors.shape[:2]
    if factors.ndim == 2:
        return u * factors.reshape(n * c, 1)
    f = factors.transpose(0, 2, 1) if transpose else factors
    return (f @ u.reshape(n, c, -1)).reshape(n * c, -1)


def fisher(J: JacobianShape, likelihood: Any, f: Any = None, *, damping: float = 0.0) -> FisherOperator:
    """The Fisher / GGN operator F = Jᵀ Λ J + damping·I for the likelihood's curvature Λ at outputs f.

    Parameters
    ----------
    J : JacobianBlocks or AutogradJacobian
        The Jacobian (n·c, p). Exported blocks give products and a diagonal; a matrix-free Jacobian products only.
    likelihood : Likelihood or {"gaussian", "bernoulli", "categorical"}
        Gives Λ_i per example (c × c, applied blockwise).
    f : array of shape (n, c), optional
        Outputs (logits) where Λ is evaluated; default ``J.f0``. J's dtype and backend.
    damping : float
        ≥ 0, added to the diagonal.

    Returns
    -------
    FisherOperator
        (p, p) operator: ``matmat`` (many columns), ``diagonal`` (for Jacobi preconditioning), ``to_dense``.
    """
    J, lik, f = _check_common(J, likelihood, f)
    damping = v.check_positive(damping, "damping", allow_zero=True)
    check_scale(damping, "damping", J.dtype, allow_zero=True)  # added in J's dtype
    return FisherOperator(J, lik, lik._sqrt_curvature(f), damping)


def _check_common(J: Any, likelihood: Any, f: Any) -> tuple[JacobianShape, Likelihood, Any]:
    if not isinstance(J, JacobianShape):
        raise v.ArgumentTypeError(f"J must be a JacobianBlocks (export_jacobian) or an AutogradJacobian, got "
                        f"{type(J).__name__}")
    lik = as_likelihood(likelihood)
    if f is None:
        f = J.f0
    else:
        f = v.as_float_array(f, "f", J.backend, ndim=2, dtypes=(J.dtype,))
        if tuple(f.shape) != (J.n, J.n_outputs):
            raise v.ShapeError(f"f has shape {tuple(f.shape)}; expected (n, c) = {(J.n, J.n_outputs)} to match the "
                               f"Jacobian of shape {J.shape}")
    return J, lik, lik.check_outputs(f)


# ----- low rank -----------------------------------------------------------------------------------------------------

class LowRankResult:
    """Top-k eigenpairs of a PSD matrix (F or K) and what the truncation dropped.

    Attributes
    ----------
    values : array of shape (k,)
        Eigenvalues, float64, descending, clipped at 0; on the backend.
    vectors : array of shape (d, k)
        Orthonormal eigenvectors in the operator's dtype, on the backend.
    shift : float
        The diagonal added by :attr:`operator` (damping for F, noise σ² for K).
    trace : float
        trace of the exact matrix (without shift), from its exact diagonal.
    truncated_trace : float
        trace − Σ values (≥ 0): the eigenvalue mass the rank-k approximation leaves out.
    method : str
        "lanczos" or "randomized".
    residual_norms : array of shape (k,)
        ‖A u − λ u‖ per pair, float64.
    """

    def __init__(self, values: Any, vectors: Any, shift: float, trace: float, method: str, residual_norms: Any,
                 backend: Any) -> None:
        self.values, self.vectors, self.shift, self.trace = values, vectors, shift, trace
        self.method, self.residual_norms, self.backend = method, residual_norms, backend
        self.truncated_trace = max(0.0, trace - float(values.sum()))  # ≥ 0 by Ky Fan; rounding may go below
        self._operator: LowRankPlusDiagonal | None = None

    def __repr__(self) -> str:
        return (f"LowRankResult(k={self.values.shape[0]}, d={self.vectors.shape[0]}, method={self.method!r}, "
                f"shift={self.shift}, trace={self.trace:.6g}, truncated_trace={self.truncated_trace:.6g})")

    @property
    def operator(self) -> LowRankPlusDiagonal:
        """U diag(λ) Uᵀ + shift·I as a LowRankPlusDiagonal (Woodbury ``solve``, determinant-lemma ``logdet``).

        Raises
        ------
        ValueRangeError
            When shift is 0: the Woodbury identity needs an invertible diagonal.
        """
        if self.shift <= 0:
            raise v.ValueRangeError("the low-rank + diagonal operator needs a diagonal shift > 0 (damping for the "
                                    "Fisher, shift for the kernel) to solve and take log-determinants, got "
                                    f"{self.shift}; the eigenpairs are in .values and .vectors")
        if self._operator is None:
            dtype = self.vectors.dtype
            self._operator = LowRankPlusDiagonal(self.vectors, self.values.astype(dtype), float(self.shift),
                                                 self.backend)
        return self._operator

    def matmat(self, x: Any) -> Any:
        """(U diag(λ) Uᵀ + shift·I) X for X (d, k) or (d,) of the vectors' dtype and backend, also when shift is 0.

        Raises
        ------
        ShapeError, DTypeError, BackendMismatchError, NonFiniteError
        """
        u = self.vectors
        x = check_operand(x, "x", u.shape[0], u.dtype, self.backend,
                          f"the {u.shape[0]} × {u.shape[0]} low-rank operator")
        lam = self.values.astype(u.dtype)
        col = x[:, None] if x.ndim == 1 else x
        out = u @ (lam[:, None] * (u.T @ col)) + self.shift * col
        return out[:, 0] if x.ndim == 1 else out


def fisher_lowrank(J: JacobianBlocks, likelihood: Any, k: int, *, method: str = "lanczos", f: Any = None,
                   damping: float = 0.0, oversample: int = 10, power_iters: int = 2, steps: int | None = None,
                   seed: int = 0) -> LowRankResult:
    """Top-k eigenpairs of F = Jᵀ Λ J (p-space) as a low-rank + damping·I approximation.

    Parameters
    ----------
    J : JacobianBlocks
        Exported Jacobian (n·c, p).
    likelihood : Likelihood or str
        Gives Λ.
    k : int
        Rank, 1 ≤ k ≤ min(p, n·c) (F has rank ≤ n·c).
    method : {"lanczos", "randomized"}
        "lanczos": :func:`~lingp_core.solvers.lanczos_eigsh` on F (``steps`` Lanczos steps); "randomized": randomized
        SVD of G = Λ^½ J with ``oversample`` extra columns and ``power_iters`` power iterations.
    f : array of shape (n, c), optional
        Where Λ is evaluated (default J.f0).
    damping : float
        ≥ 0; the operator's diagonal (must be > 0 to solve with it).
    seed : int
        Seed of the random start vector / test matrix, ≥ 0 (the same numbers on every backend).

    Returns
    -------
    LowRankResult
        ``.operator`` = U diag(λ) Uᵀ + damping·I; ``.truncated_trace`` = trace(F) − Σλ from the exact diag(F).
    """
    op = fisher(J, likelihood, f)  # F without damping: the eigenpairs are F's, the damping is the diagonal
    if op.G is None:
        raise v.ArgumentTypeError(f"fisher_lowrank needs exported blocks (JacobianBlocks), got {type(J).__name__}")
    damping = v.check_positive(damping, "damping", allow_zero=True)
    check_scale(damping, "damping", J.dtype, allow_zero=True)  # the operator's diagonal, in J's dtype
    k, method, oversample, power_iters, seed = _check_lowrank_args(k, method, oversample, power_iters, seed,
                                                                   min(op.G.shape))
    trace = float(op.diagonal().astype(np.float64).sum())
    if method == "lanczos":
        values, vectors, res = _lanczos_pairs(op, k, steps, seed)
    else:
        values, vectors, res = _randomized_pairs(op.G.matmat, op.G.rmatmat, op.G.shape, k, oversample, power_iters,
                                                 seed, op.dtype, op.backend, right=True)
    return LowRankResult(values, vectors, damping, trace, method, res, op.backend)


def kernel_lowrank(J: JacobianBlocks, k: int, *, prior_scale: float = 1.0, shift: float = 0.0,
                   method: str = "lanczos", oversample: int = 10, power_iters: int = 2, steps: int | None = None,
                   seed: int = 0) -> LowRankResult:
    """Top-k eigenpairs of the kernel K = s·J Jᵀ (n·c-space) as a low-rank + shift·I approximation (K + σ²I).

    Parameters
    ----------
    J : JacobianBlocks
        Exported Jacobian (n·c, p).
    k : int
        Rank, 1 ≤ k ≤ min(n·c, p).
    prior_scale : float
        s > 0.
    shift : float
        σ² ≥ 0, the operator's diagonal (must be > 0 to solve with it).
    method, oversample, power_iters, steps, seed
        As for :func:`fisher_lowrank` (the randomized SVD is of J, the kernel's eigenvalues s·σ_j²).

    Returns
    -------
    LowRankResult
        ``.operator`` = U diag(λ) Uᵀ + shift·I; ``.truncated_trace`` = s·Σ diag(J Jᵀ) − Σλ.
    """
    if not isinstance(J, JacobianBlocks):
        raise v.ArgumentTypeError(f"kernel_lowrank needs exported blocks (JacobianBlocks), got {type(J).__name__}")
    s = v.check_positive(prior_scale, "prior_scale")
    shift = v.check_positive(shift, "shift", allow_zero=True)
    check_scale(s, "prior_scale", J.dtype)  # the operator's eigenvalues s·σ² and shift live in J's dtype
    check_scale(shift, "shift", J.dtype, allow_zero=True)
    k, method, oversample, power_iters, seed = _check_lowrank_args(k, method, oversample, power_iters, seed,
                                                                   min(J.shape))
    trace = s * float(J.gram_diagonal().astype(np.float64).sum())
    if method == "lanczos":
        values, vectors, res = _lanczos_pairs(KernelOperator(J, prior_scale=s), k, steps, seed)
    else:
        values, vectors, res = _randomized_pairs(J.matmat, J.rmatmat, J.shape, k, oversample, power_iters, seed,
                                                 J.dtype, J.backend, right=False)
        values, res = values * s, res * s
    return LowRankResult(values, vectors, shift, trace, method, res, J.backend)


def _check_lowrank_args(k: Any, method: Any, oversample: Any, power_iters: Any, seed: Any, max_rank: int) -> tuple:
    k = v.check_int(k, "k", minimum=1, maximum=max_rank)
    v.check_choice(method, "method", LOWRANK_METHODS)
    oversample = v.check_int(oversample, "oversample", minimum=0)
    power_iters = v.check_int(power_iters, "power_iters", minimum=0)
    return k, method, oversample, power_iters, check_seed(seed)


def _lanczos_pairs(op: LinearOperator, k: int, steps: int | None, seed: int) -> tuple[Any, Any, Any]:
    """Top-k pairs by fully reorthogonalized Lanczos; values clipped at 0 (the matrix is PSD)."""
    result = lanczos_eigsh(op, k, steps=steps, seed=seed)
    values = op.backend.xp.maximum(result.values, 0.0)
    return values, result.vectors, result.residual_norms


def _randomized_pairs(matmat: Any, rmatmat: Any, shape: tuple[int, int], k: int, oversample: int,
                      power_iters: int, seed: int, dtype: np.dtype, backend: Any, *, right: bool
                      ) -> tuple[Any, Any, Any]:
    """Top-k singular pairs of G (m, q), given by its products, as eigenpairs of Gᵀ G (right) or G Gᵀ (left).

    Halko–Martinsson–Tropp: a seeded Gaussian sketch of G's row space (right) or column space (left), power
    iterations with QR between products (on the backend, in G's dtype), then the SVD of the small projection in
    float64. Returns values σ² (k,) float64 descending, vectors (q or m, k) in ``dtype``, residual norms ‖A u − λu‖.
    """
    xp = backend.xp
    # "forward" maps the eigen-space to the other one, "back" returns
    forward, back = (matmat, rmatmat) if right else (rmatmat, matmat)
    m, q = shape if right else shape[::-1]
    width = min(k + oversample, m, q)
    y = back(seeded_normal((m, width), seed, dtype, backend))  # (q, width): a sketch of the eigen-space
    basis = backend.qr(y)[0]
    for _ in range(power_iters):
        basis = backend.qr(back(backend.qr(forward(basis))[0]))[0]
    small = forward(basis).astype(np.float64)  # (m, width) = G Q: its SVD gives Q's rotation to singular vectors
    _, sv, vh = backend.svd(small)
    rotation = vh[:k].T.astype(dtype)
    vectors = basis @ rotation
    values = sv[:k] ** 2
    residual = back(forward(vectors)) - vectors * values.astype(dtype)
    norms = xp.sqrt((residual.astype(np.float64) ** 2).sum(axis=0))
    return values, vectors, norms
