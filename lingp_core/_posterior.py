"""Posterior engines of :class:`lingp_core.gp.LinearizedGP`: one Gaussian-process regression problem each.

A problem ("task") is m rows of the Jacobian J (m × p, kernel K = s·K0 with K0 = J Jᵀ in function space), targets
R (m, q) that share the kernel, and noise variances given as a host float64 array broadcastable to (m, q) — one value
per column (the usual case) or one per row (per-output noise in the "full" output mode). Every engine computes, in
float64:

- the posterior mean at test rows, s·K0(X*, X) α (function space) or J* μ (parameter space);
- latent variances and covariances;
- the log marginal likelihood log N(R | 0, s·K0 + diag(noise)).

Engines: ``FunctionCholesky`` (factor s·K0 + D), ``FunctionSpectral`` (one eigendecomposition of K0, then any (s, σ²)
in O(m)), ``ParameterCholesky`` (factor the p × p precision Jᵀ D⁻¹ J + I/s), ``ParameterSpectral`` (eigendecomposition
of Jᵀ J), ``Iterative`` (preconditioned CG through matrix-free kernel products, LOVE-style Lanczos variances, SLQ log
determinant). Their ``state()`` holds what prediction needs, so a fitted model can be saved and loaded.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

import backends
from backends import Backend
from backends._triangles import TILE, fill_lower
from lingp_core import _validate as v
from lingp_core._cluster_cholesky import ClusterCholesky
from lingp_core._energy import (
    _as_float64,
    cancelled,
    covariance_row_bytes,
    energy_covariance,
    energy_error_bound,
    energy_variance,
    energy_variance_and_residual,
    rescue_cancelled,
    rescue_cancelled_cov,
    warn_unresolved,
)
from lingp_core._layout import noise_groups
from lingp_core._precision import largest_eigenvalue as power_largest_eigenvalue
from lingp_core._progress import iteration_callback, progress_bar
from lingp_core.jacobian import JacobianBlocks
from lingp_core.kernels import KernelOperator, kernel, kernel_diag
from lingp_core.operators import AddedDiagonalOperator
from lingp_core.sharded import ShardedKernelOperator, is_sharded
from lingp_core.solvers import cg, lanczos, logdet, pivoted_cholesky_preconditioner, safe_cholesky
from lingp_core.solvers.cholesky import cholesky_from_upper

_LOG_2PI = float(np.log(2 * np.pi))
#: bound on the relative error of a Lanczos-cache variance (checked on every test row) above which the iterative
#: path computes that row's variance by CG instead
VARIANCE_TOLERANCE = 0.01


def largest_eigenvalue(K: Any, steps: int = 20) -> float:
    """λmax of a symmetric PSD K (m × m, any float dtype): :func:`~lingp_core._precision.largest_eigenvalue` through
    K's own products (in K's dtype, accumulated in float64)."""
    xp = backends.infer(K).xp
    return power_largest_eigenvalue(lambda x: (K @ x.astype(K.dtype)).astype(np.float64), K.shape[0], xp, steps)


def clamp_variances(var: Any, scale: Any, xp: Any) -> tuple[Any, int, int]:
    """max(var, 0): returns (clamped, how many were negative, how many beyond rounding of ``scale`` (prior var))."""
    negative = var < 0
    n_negative = int(negative.sum())
    if not n_negative:
        return var, 0, 0
    significant = int((var < -1e-6 * xp.maximum(scale, 1e-300)).sum())
    return xp.maximum(var, 0.0), n_negative, significant


class StarRows:
    """Test-side quantities of one task, computed once per predict call and shared by the engines' methods."""

    def __init__(self, J_star: JacobianBlocks, J: JacobianBlocks | None, mode: Any, memory_budget: Any,
                 kernel_dtype: Any = np.float64):
        self.J_star, self.J, self.mode, self.budget = J_star, J, mode, memory_budget
        self.kernel_dtype = kernel_dtype
        self._cross = self._dense = self._diag = self._float64 = None
        self._memo: dict[Any, Any] = {}

    @property
    def rows(self) -> int:
        """m*, the test rows of the task: n*·c in output mode "full", n* otherwise."""
        return self.J_star.n * (self.J_star.n_outputs if self.mode == "full" else 1)

    def memo(self, key: Any, compute: Any) -> Any:
        """``compute()`` once per predict call under ``key`` (an engine's projections of the test rows)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def cross(self) -> Any:
        """K0(X*, X): (m*, m), float64."""
        if self._cross is None:
            self._cross = kernel(self.J_star, self.J, output_mode=self.mode, dtype=self.kernel_dtype,
                                 memory_budget=self.budget)
        return self._cross

    @property
    def J_star_float64(self) -> JacobianBlocks:
        """J* with float64 blocks (converted once per predict call; J* itself when float64)."""
        if self._float64 is None:
            self._float64 = _as_float64(self.J_star)
        return self._float64

    def prior_diag(self) -> Any:
        """diag K0(X*, X*): (m*,), float64 (computed once; the engines and the variance clamp all need it)."""
        if self._diag is None:
            self._diag = kernel_diag(self.J_star, output_mode=self.mode)
        return self._diag

    def prior_full(self) -> Any:
        """K0(X*, X*): (m*, m*), float64."""
        return kernel(self.J_star, output_mode=self.mode, memory_budget=self.budget)

    @property
    def dense(self) -> Any:
        """J* as a dense float64 (m*, p) array (parameter space)."""
        if self._dense is None:
            self._dense = self.J_star.to_dense(memory_budget=self.budget).astype(np.float64)
        return self._dense


# ----- function space -----------------------------------------------------------------------------------------------

class _GroupedCholesky:
    """What both Cholesky engines share: one factor L per noise group and test rows B (K0(X*, X) in function space,
    J* in parameter space) whitened as W = L⁻¹ Bᵀ; var = outer·(prior + inner·Σ W²), cov = outer·(prior +
    inner·Wᵀ W) — in function space outer = s, inner = −s, so no s² is formed (it overflows long before the
    variance does)."""

    weights = ""  # name of the fitted weights (alpha or mu) in state()

    def _test_rows(self, star: StarRows) -> Any:
        raise NotImplementedError

    def _prior_and_scale(self, star: StarRows, full: bool) -> tuple[Any, float, float]:
        """(prior, inner, outer) of the class docstring."""
        raise NotImplementedError

    def _whitened(self, star: StarRows) -> list[Any]:
        rows = self._test_rows(star).T
        return [self.backend.solve_triangular(L, rows, lower=True) for L in self.factors]

    def var(self, star: StarRows) -> Any:
        prior, inner, outer = self._prior_and_scale(star, full=False)
        out = self.backend.xp.empty((self._test_rows(star).shape[0], self.q))
        for (cols, _), w in zip(self.groups, self._whitened(star)):
            out[:, cols] = (outer * (prior + inner * (w**2).sum(axis=0)))[:, None]
        return out

    def cov(self, star: StarRows) -> Any:
        prior, inner, outer = self._prior_and_scale(star, full=True)
        m_star = self._test_rows(star).shape[0]
        out = self.backend.xp.empty((self.q, m_star, m_star))
        for (cols, _), w in zip(self.groups, self._whitened(star)):
            out[cols] = outer * (prior + inner * (w.T @ w))
        return out

    def state(self) -> dict[str, Any]:
        out = {self.weights: getattr(self, self.weights)}
        out.update({f"factor{g}": L for g, L in enumerate(self.factors)})
        return out


def cholesky_condition_bound(diagonal: Any, factor: Any, xp: Any) -> float:
    """A lower bound, in O(m), on the condition number of the diagonally scaled S = D^-½ C D^-½ (D = diag C), which
    is what limits a Cholesky solve's accuracy (van der Sluis) whatever the rows' scales: S has a unit diagonal, so
    λmax(S) ≥ 1, and its pivots L_ii²/C_ii = 1/((S_{≤i})⁻¹)_ii ≥ λmin(S_{≤i}) ≥ λmin(S) (interlacing), so
    1 / min(L_ii²/C_ii) ≤ κ(S): it never raises a false alarm."""
    ratios = xp.diagonal(factor).astype(np.float64) ** 2 / diagonal
    return 1.0 / max(float(ratios.min()), np.finfo(np.float64).tiny)


class FunctionCholesky(_GroupedCholesky):
    """Exact: L Lᵀ = s·K0 + D per noise group; α = (s·K0 + D)⁻¹ R.

    K0 is never copied: the first group's factor is written over K0's lower triangle by cholesky_from_upper, which
    reads and keeps K0's strict upper triangle, and K0's diagonal is kept aside; refits at other (s, D), the gradient
    and a change of method rebuild from those. Further noise groups, and a float32 kernel (which cannot hold a
    float64 factor), get arrays of their own.
    """

    space, solver, weights = "function", "cholesky", "alpha"

    @staticmethod
    def state_shapes(m: int, p: int, q: int, groups: int) -> dict[str, tuple]:
        return {"alpha": (m, q), **{f"factor{g}": (m, m) for g in range(groups)}}

    def __init__(self, K0: Any, backend: Backend):
        self.backend, self.m = backend, int(K0.shape[0])
        self._kernel = K0  # strict upper triangle: K0; lower triangle: K0, then the first group's factor
        self._kernel_diagonal = backend.xp.diagonal(K0).astype(np.float64)  # a copy
        self._in_place = K0.dtype == np.float64 and K0.flags.c_contiguous

    @property
    def K0(self) -> Any:
        """The kernel (m, m), rebuilt from its kept triangle and diagonal (a new array)."""
        xp = self.backend.xp
        K0 = self._kernel.copy()
        fill_lower(K0, K0, 1.0, xp)
        K0[xp.arange(self.m), xp.arange(self.m)] = self._kernel_diagonal.astype(K0.dtype)
        return K0

    def fit(self, s: float, noise: np.ndarray, R: Any) -> None:
        xp, be = self.backend.xp, self.backend
        self.s, self.q = s, int(R.shape[1])
        self.alpha = xp.zeros(R.shape, dtype=np.float64)
        self.groups, self.factors, self.jitter = noise_groups(noise, self.q), [], 0.0
        self._lml, self._fit_terms, self.condition = 0.0, np.zeros(self.q), 1.0
        for g, (cols, d) in enumerate(self.groups):
            diagonal = s * self._kernel_diagonal + xp.asarray(np.broadcast_to(d, (self.m,)))
            out = self._kernel if (g == 0 and self._in_place) else None
            chol = cholesky_from_upper(self._kernel, diagonal, scale=s, out=out)
            self.jitter = max(self.jitter, chol.jitter)
            self.condition = max(self.condition, cholesky_condition_bound(diagonal, chol.factor, xp))
            alpha = be.cho_solve(chol.factor, R[:, cols])
            self.alpha[:, cols] = alpha
            self.factors.append(chol.factor)
            half_logdet = float(xp.log(xp.diagonal(chol.factor)).sum())
            fit = be.to_numpy((R[:, cols] * alpha).sum(axis=0))  # rᵀ C⁻¹ r per column
            self._fit_terms[cols] = fit
            self._lml += -0.5 * float(fit.sum()) - len(cols) * (half_logdet + 0.5 * self.m * _LOG_2PI)

    def _group_solve(self, g: int, rhs: Any) -> Any:
        return self.backend.cho_solve(self.factors[g], rhs)

    def kernel_largest_eigenvalue(self) -> float | None:
        """λmax of a float32 K0, kept whole in _kernel (its factor lives elsewhere); None for a float64 K0, whose
        lower triangle holds the factor."""
        return largest_eigenvalue(self._kernel) if self._kernel.dtype == np.float32 else None

    def var(self, star: StarRows) -> Any:
        return rescue_cancelled(super().var(star), star, self.s, self.groups, self._group_solve)

    def cov(self, star: StarRows) -> Any:
        return rescue_cancelled_cov(super().cov(star), star, self.s, self.groups, self._group_solve)

    def state(self) -> dict[str, Any]:
        # the factors' strict upper triangles hold K0 or nothing: an archive gets the triangular factors alone
        return {"alpha": self.alpha, **{f"factor{g}": self.backend.xp.tril(L) for g, L in enumerate(self.factors)}}

    def lml(self) -> float:
        return self._lml

    def mean(self, star: StarRows) -> Any:
        return self.s * (star.cross @ self.alpha)

    def _test_rows(self, star: StarRows) -> Any:
        return star.cross

    def _prior_and_scale(self, star: StarRows, full: bool) -> tuple[Any, float, float]:
        return star.prior_full() if full else star.prior_diag(), -self.s, self.s

    def gradient(self, noise_index: np.ndarray) -> np.ndarray:
        """d lml / d(log s, log σ²_g) for the noise parameters g; ``noise_index`` (m, q) maps entries to g.

        With C = s·K0 + D, α = C⁻¹ r and c = diag(C⁻¹): d/d log σ²_g = ½ Σ_{i in g} D_i (α_i² − c_i), and, since
        s·K0 = C − D, d/d log s = ½ (s αᵀ K0 α − s tr(C⁻¹ K0)) = ½ (αᵀ r − Σ D α² − m + Σ D c): no product with K0
        and no m × m inverse, only diag(C⁻¹) = column norms of L⁻¹, taken a block of columns at a time.
        """
        xp = self.backend.xp
        grads = np.zeros(1 + int(noise_index.max()) + 1)
        for (cols, d), L in zip(self.groups, self.factors):
            c = self._inverse_diagonal(L)
            noise = xp.asarray(np.broadcast_to(d, (self.m,)))
            for j in cols:
                a = self.alpha[:, j]
                grads[0] += 0.5 * (self._fit_terms[j] - float((noise * a**2).sum()) - self.m + float((noise * c).sum()))
                per_row = self.backend.to_numpy(0.5 * (a**2 - c)) * np.broadcast_to(d, (self.m,))
                np.add.at(grads, 1 + noise_index[:, j], per_row)
        return grads

    def _inverse_diagonal(self, L: Any) -> Any:
        """diag((L Lᵀ)⁻¹) (m,): the squared column norms of L⁻¹, by triangular solves on blocks of the identity."""
        xp, m = self.backend.xp, self.m
        out = xp.empty(m, dtype=np.float64)
        for start in range(0, m, TILE):
            stop = min(start + TILE, m)
            unit = xp.zeros((m, stop - start), dtype=np.float64)
            unit[xp.arange(start, stop), xp.arange(stop - start)] = 1.0
            out[start:stop] = (self.backend.solve_triangular(L, unit, lower=True) ** 2).sum(axis=0)
        return out


class FunctionSpectral:
    """One eigendecomposition K0 = U diag(λ) Uᵀ; then for any (s, σ²): α = U (Uᵀ r / (sλ + σ²))."""

    space, solver = "function", "spectral"

    @staticmethod
    def state_shapes(m: int, p: int, q: int, groups: int) -> dict[str, tuple]:
        return {"alpha": (m, q), "U": (m, m), "lam": (m,), "Z": (m, q)}

    def __init__(self, K0: Any, backend: Backend):
        self.K0, self.backend = K0, backend
        self.m = int(K0.shape[0])
        lam, self.U = backend.eigh(K0.astype(np.float64, copy=False))
        self.lam = backend.xp.maximum(lam, 0.0)  # K0 is PSD: negative eigenvalues are rounding

    def fit(self, s: float, noise: np.ndarray, R: Any) -> None:
        xp = self.backend.xp
        if noise.shape[0] != 1:
            raise v.InvalidOptionError("the spectral method needs one noise variance per output column")
        self.s, self.q = s, int(R.shape[1])
        self.noise = np.broadcast_to(noise[0], (self.q,)).astype(np.float64)
        self.Z = self.U.T @ R
        self.d = s * self.lam[:, None] + xp.asarray(self.noise)[None, :]
        self.alpha = self.U @ (self.Z / self.d)
        self.condition = float(self.conditions_at(np.full(self.q, s), self.noise).max())

    def kernel_largest_eigenvalue(self) -> float | None:
        """λmax of a float32 K0 (None for a float64 one: its rounding is not the float32 kernel's)."""
        return largest_eigenvalue(self.K0) if self.K0.dtype == np.float32 else None

    def spectrum(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(λ (k,), weights (k, q), rest (q,), m) for :func:`spectral_lml`."""
        be = self.backend
        return be.to_numpy(self.lam), be.to_numpy(self.Z**2), np.zeros(self.q), self.m

    def lml(self) -> float:
        return spectral_lml(*self.spectrum(), self.s, self.noise)[0]

    def mean(self, star: StarRows) -> Any:
        return self.s * (star.cross @ self.alpha)

    def var(self, star: StarRows) -> Any:
        return self.var_at(star, self.s, self.noise)

    def _projection(self, star: StarRows) -> Any:
        """K0(X*, X) U (m*, m), once per predict call."""
        return star.memo((id(self), "KU"), lambda: star.cross @ self.U)

    def _squares(self, star: StarRows) -> Any:
        """The projection's elementwise squares (m*, m), once per predict call."""
        return star.memo((id(self), "KU²"), lambda: self._projection(star) ** 2)

    def conditions_at(self, scales: np.ndarray, noises: np.ndarray) -> np.ndarray:
        """The condition numbers (sλmax + σ²) / (sλmin + σ²) of s·K0 + σ²I at k hyperparameter points: (k,), host."""
        lam = self.backend.to_numpy(self.lam)
        return (scales * lam.max() + noises) / (scales * lam.min() + noises)

    def moments_at(self, star: StarRows, scales: np.ndarray, noises: np.ndarray,
                   return_var: bool) -> tuple[Any, Any]:
        """Posterior means (m*, q, k) and (with return_var) latent variances (m*, 1, k: alike for every column) at k
        other hyperparameter points (s_g, σ²_g), from the kept spectrum, stacked along a last axis. Two matrix
        products serve all k points (O(m*·m·q·k)); the points where some variance may have cancelled
        (:func:`cancelled`) are recomputed one by one through :meth:`var_at`, which rescues them."""
        xp = self.backend.xp
        s, noise = xp.asarray(scales, dtype=np.float64), xp.asarray(noises, dtype=np.float64)
        d = self.lam[:, None] * s[None, :] + noise[None, :]  # (m, k)
        projection = self._projection(star)
        (m, q), m_star, k = self.Z.shape, int(projection.shape[0]), int(s.shape[0])  # a loaded engine keeps Z
        coefficients = self.Z[:, :, None] * (s / d)[:, None, :]  # (m, q, k)
        means = (projection @ coefficients.reshape(m, q * k)).reshape(m_star, q, k)
        if not return_var:
            return means, None
        prior = star.prior_diag()[:, None]
        var = s * (prior - s * (self._squares(star) @ (1.0 / d)))  # (m*, k): one σ² per point, for every column
        flagged = self.backend.to_numpy(cancelled(var, s * xp.maximum(prior, 0.0), star).any(axis=0))
        for g in np.flatnonzero(flagged):  # one noise group per point: var_at's columns are all alike
            var[:, int(g)] = self.var_at(star, float(scales[g]), np.full(q, float(noises[g])))[:, 0]
        return means, var[:, None, :]  # (m*, 1, k): the same for every column, broadcast by the caller

    def var_at(self, star: StarRows, s: float, noise: np.ndarray) -> Any:
        """The latent variances at other hyperparameters: s·k** − s²·Σ_i w_i² / (sλ_i + σ²)."""
        d = s * self.lam[:, None] + self.backend.xp.asarray(noise)[None, :]
        var = s * (star.prior_diag()[:, None] - s * (self._squares(star) @ (1.0 / d)))
        groups = noise_groups(np.asarray(noise, dtype=np.float64)[None, :], var.shape[1])
        return rescue_cancelled(var, star, s, groups, self._solver(s, groups))

    def _solver(self, s: float, groups: list) -> Any:
        def solve(g: int, rhs: Any) -> Any:  # (s·K0 + σ_g²)⁻¹ rhs from the eigendecomposition
            return self.U @ ((self.U.T @ rhs) / (s * self.lam + float(groups[g][1][0]))[:, None])
        return solve

    def cov(self, star: StarRows) -> Any:
        w = self._projection(star)
        prior = self.s * star.prior_full()
        cov = self.backend.xp.stack([prior - self.s * (self.s * ((w / self.d[:, j]) @ w.T)) for j in range(self.q)])
        groups = noise_groups(self.noise[None, :], self.q)
        return rescue_cancelled_cov(cov, star, self.s, groups, self._solver(self.s, groups))

    def state(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "U": self.U, "lam": self.lam, "Z": self.Z}


def spectral_lml(lam: np.ndarray, weights: np.ndarray, rest: np.ndarray, m: int, s: float,
                 noise: np.ndarray) -> tuple[float, float, np.ndarray]:
    """log N(R | 0, s·J Jᵀ + σ²_j I) summed over columns j, from a spectrum, with its gradient.

    ``lam`` (k,) eigenvalues of J Jᵀ or Jᵀ J (k ≤ m kept), ``weights`` (k, q) the squared projections of the targets
    on the eigenvectors in the form w_ij = (u_iᵀ r_j)², ``rest`` (q,) the squared norm of each target outside their
    span, ``noise`` (q,). With d = sλ + σ²: data_j = rest_j/σ²_j + Σ_i w_ij/d_ij, logdet_j = Σ_i log d_ij +
    (m − k) log σ²_j. Returns (lml, d lml/d log s, d lml/d log σ²_j (q,)).
    """
    k = lam.shape[0]
    d = s * lam[:, None] + noise[None, :]
    data = rest / noise + (weights / d).sum(axis=0)
    logdet = np.log(d).sum(axis=0) + (m - k) * np.log(noise)
    lml = float(-0.5 * (data + logdet).sum() - 0.5 * m * weights.shape[1] * _LOG_2PI)
    d_data_s = -(weights * lam[:, None] / d**2).sum(axis=0)
    d_logdet_s = (lam[:, None] / d).sum(axis=0)
    d_data_n = -rest / noise**2 - (weights / d**2).sum(axis=0)
    d_logdet_n = (1.0 / d).sum(axis=0) + (m - k) / noise
    grad_log_s = float(-0.5 * s * (d_data_s + d_logdet_s).sum())
    grad_log_noise = -0.5 * noise * (d_data_n + d_logdet_n)
    return lml, grad_log_s, grad_log_noise


# ----- parameter space ----------------------------------------------------------------------------------------------

class ParameterCholesky(_GroupedCholesky):
    """Exact in weight space: A = Jᵀ D⁻¹ J + I/s (p × p), μ = A⁻¹ Jᵀ D⁻¹ r, mean* = J* μ, var* = diag(J* A⁻¹ J*ᵀ)."""

    space, solver, weights = "parameter", "cholesky", "mu"

    @staticmethod
    def state_shapes(m: int, p: int, q: int, groups: int) -> dict[str, tuple]:
        return {"mu": (p, q), **{f"factor{g}": (p, p) for g in range(groups)}}

    def __init__(self, Jd: Any, backend: Backend):
        self.Jd, self.backend = Jd, backend
        self.m, self.p = (int(x) for x in Jd.shape)

    def fit(self, s: float, noise: np.ndarray, R: Any) -> None:
        xp, be = self.backend.xp, self.backend
        self.s, self.q = s, int(R.shape[1])
        self.mu = xp.zeros((self.p, self.q))
        self.groups, self.factors, self.jitter, self._lml = noise_groups(noise, self.q), [], 0.0, 0.0
        self.condition = 1.0
        for cols, d in self.groups:
            dinv = xp.asarray(1.0 / np.broadcast_to(d, (self.m,)))
            A = self.Jd.T @ (self.Jd * dinv[:, None])
            A[xp.arange(self.p), xp.arange(self.p)] += 1.0 / s
            diagonal = xp.diagonal(A).copy()
            chol = safe_cholesky(A)
            self.jitter = max(self.jitter, chol.jitter)
            self.condition = max(self.condition, cholesky_condition_bound(diagonal, chol.factor, xp))
            r = R[:, cols]
            b = self.Jd.T @ (r * dinv[:, None])
            mu = be.cho_solve(chol.factor, b)
            self.mu[:, cols] = mu
            self.factors.append(chol.factor)
            # determinant lemma: log det(s J Jᵀ + D) = log det D + p log s + log det A;  Woodbury for the data term
            logdet_ = (float(np.log(np.broadcast_to(d, (self.m,))).sum()) + self.p * np.log(s)
                       + 2.0 * float(xp.log(xp.diagonal(chol.factor)).sum()))
            data = float((r * r * dinv[:, None]).sum() - (b * mu).sum())
            self._lml += -0.5 * data - len(cols) * 0.5 * (logdet_ + self.m * _LOG_2PI)

    def lml(self) -> float:
        return self._lml

    def mean(self, star: StarRows) -> Any:
        return star.dense @ self.mu

    def _test_rows(self, star: StarRows) -> Any:
        return star.dense

    def _prior_and_scale(self, star: StarRows, full: bool) -> tuple[Any, float, float]:
        return 0.0, 1.0, 1.0  # J* A⁻¹ J*ᵀ is the posterior covariance itself


class ParameterSpectral:
    """One eigendecomposition Jᵀ J = V diag(λ) Vᵀ (p × p); then for any (s, σ²): μ = V (Vᵀ Jᵀ r / (λ + σ²/s))."""

    space, solver = "parameter", "spectral"

    @staticmethod
    def state_shapes(m: int, p: int, q: int, groups: int) -> dict[str, tuple]:
        return {"mu": (p, q), "V": (p, p), "lam": (p,), "shrink": (p, q)}

    def __init__(self, Jd: Any, backend: Backend):
        self.Jd, self.backend = Jd, backend
        self.m, self.p = (int(x) for x in Jd.shape)
        lam, self.V = backend.eigh(Jd.T @ Jd)
        # directions with λ at rounding level are J's null space (p > m leaves p − m of them): exact zeros, or
        # the mean would carry their rounding times s/σ² (1e9 relative at s/σ² = 1e24) and the variances would
        # shrink below the prior s there
        self.keep = lam > float(lam.max()) * self.p * np.finfo(np.float64).eps
        self.lam = backend.xp.where(self.keep, lam, 0.0)

    def fit(self, s: float, noise: np.ndarray, R: Any) -> None:
        xp = self.backend.xp
        if noise.shape[0] != 1:
            raise v.InvalidOptionError("the spectral method needs one noise variance per output column")
        self.s, self.q = s, int(R.shape[1])
        self.noise = np.broadcast_to(noise[0], (self.q,)).astype(np.float64)
        self.Qc = self.V.T @ (self.Jd.T @ R) * self.keep[:, None]  # (p, q); J's null space carries no signal
        kept = self.Qc[self.keep] / self.lam[self.keep][:, None]
        residual = R - self.Jd @ (self.V[:, self.keep] @ kept)
        self.rest = (residual**2).sum(axis=0)
        self.weights = self.Qc[self.keep] * kept  # (uᵀ r)² = (vᵀ Jᵀ r)² / λ
        self.shrink = 1.0 / (self.lam[:, None] + xp.asarray(self.noise)[None, :] / s)
        self.mu = self.V @ (self.Qc * self.shrink)
        self.condition = float((self.shrink.max(axis=0) / self.shrink.min(axis=0)).max())

    def spectrum(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        be = self.backend
        return be.to_numpy(self.lam[self.keep]), be.to_numpy(self.weights), be.to_numpy(self.rest), self.m

    def lml(self) -> float:
        return spectral_lml(*self.spectrum(), self.s, self.noise)[0]

    def mean(self, star: StarRows) -> Any:
        return star.dense @ self.mu

    def var(self, star: StarRows) -> Any:
        w = self._projection(star)  # var = Σ_i w_i² / (λ_i/σ² + 1/s) = Σ_i w_i² σ² · shrink_i
        return (w**2) @ (self.shrink * self.backend.xp.asarray(self.noise)[None, :])

    def _projection(self, star: StarRows) -> Any:
        """J* V (m*, p), once per predict call."""
        return star.memo((id(self), "JV"), lambda: star.dense @ self.V)

    def moments_at(self, star: StarRows, scales: np.ndarray, noises: np.ndarray,
                   return_var: bool) -> tuple[Any, Any]:
        """Posterior means (m*, q, k) and (with return_var) latent variances (m*, 1, k: alike for every column) at k
        other hyperparameter points (s_g, σ²_g), stacked along a last axis. Means J* V (Vᵀ Jᵀ r · shrink_g), Vᵀ Jᵀ r
        recovered from the fitted μ (= V (Vᵀ Jᵀ r · shrink)) so a loaded model can do it too; variances
        Σ_i (J* V)_i² σ²_g shrink_ig, sums of positive terms. Two matrix products serve all k points."""
        xp = self.backend.xp
        s, noise = xp.asarray(scales, dtype=np.float64), xp.asarray(noises, dtype=np.float64)
        shrink = 1.0 / (self.lam[:, None] + (noise / s)[None, :])  # (p, k)
        projected_targets = star.memo((id(self), "VtJtR"), lambda: (self.V.T @ self.mu) / self.shrink)
        projection = self._projection(star)
        (p, q), m_star, k = projected_targets.shape, int(projection.shape[0]), int(s.shape[0])
        coefficients = projected_targets[:, :, None] * shrink[:, None, :]  # (p, q, k)
        means = (projection @ coefficients.reshape(p, q * k)).reshape(m_star, q, k)
        if not return_var:
            return means, None
        squares = star.memo((id(self), "JV²"), lambda: projection * projection)  # once per predict call
        var = squares @ (shrink * noise[None, :])  # (m*, k)
        return means, var[:, None, :]  # (m*, 1, k): the same for every column, broadcast by the caller

    def cov(self, star: StarRows) -> Any:
        w = self._projection(star)
        scale = self.shrink * self.backend.xp.asarray(self.noise)[None, :]
        return self.backend.xp.stack([(w * scale[:, j]) @ w.T for j in range(self.q)])

    def state(self) -> dict[str, Any]:
        return {"mu": self.mu, "V": self.V, "lam": self.lam, "shrink": self.shrink}


# ----- matrix-free ---------------------------------------------------------------------------------------------------

class Iterative:
    """Function space without forming K: CG with a pivoted-Cholesky preconditioner for α, variances by batched CG
    (small test sets) or a Lanczos cache (LOVE), log-determinant by stochastic Lanczos quadrature.

    Computes in float64 (on a float64 copy of a float32 Jacobian's blocks). Variances are sums of squares in
    parameter space, s·‖j* − Jᵀ w‖² + wᵀ D w with w ≈ C⁻¹ s·k* from CG or the Lanczos cache
    (:meth:`_energy_variance`; "trace" mode on the per-output Jacobians stacked): no subtraction of nearly equal
    numbers, never negative, and exact to the square of the solve's error.
    """

    space, solver = "function", "iterative"

    @staticmethod
    def state_shapes(m: int, p: int, q: int, groups: int) -> dict[str, tuple]:
        return {"alpha": (m, q)}

    def __init__(self, J: JacobianBlocks, mode: Any, *, rtol: float | None, maxiter: int | None, precond_rank: int,
                 variance_rank: int, variance_cg_max: int, num_probes: int, seed: int, progress: bool = False,
                 memory_budget: float | None = None):
        # float64 throughout: where the noise is small against the kernel, float32 products leave CG's mean and the
        # variances' solves orders of magnitude off (measured: 3e3× for σ² = 1e-3); on a GPU float64 costs little
        J = _as_float64(J)
        self.J, self.mode, self.backend, self.progress = J, mode, J.backend, progress
        self.dtype = J.dtype
        self.rtol, self.maxiter, self.precond_rank = rtol, maxiter, precond_rank
        self.variance_rank, self.variance_cg_max = variance_rank, variance_cg_max
        self.num_probes, self.seed, self.memory_budget = num_probes, seed, memory_budget
        self.m = J.n * J.n_outputs if mode == "full" else J.n
        self.info: dict[str, Any] = {}

    def _operator(self, s: float, d: np.ndarray, J: JacobianBlocks | None = None) -> Any:
        J = self.J if J is None else J
        make = ShardedKernelOperator if is_sharded(J) else KernelOperator
        if d.shape[0] == 1:
            return make(J, prior_scale=s, output_mode=self.mode, noise=float(d[0]))
        base = make(J, prior_scale=s, output_mode=self.mode)
        return AddedDiagonalOperator(base, self.backend.xp.asarray(d.astype(J.dtype)))

    def fit(self, s: float, noise: np.ndarray, R: Any) -> None:
        xp = self.backend.xp
        self.R = R
        self._prepare(s, noise, int(R.shape[1]))
        self.alpha = xp.zeros(R.shape, dtype=np.float64)
        self.info = {"cg_iterations": [], "cg_residuals": [], "preconditioner_rank": int(min(self.precond_rank,
                                                                                               self.m))}
        for (cols, _), op, M in zip(self.groups, self.ops, self.preconditioners):
            with progress_bar(None, enabled=self.progress, desc="LinearizedGP CG", unit="it") as bar:
                result = cg(op, R[:, cols].astype(self.dtype), M=M, rtol=self.rtol, maxiter=self.maxiter,
                            callback=iteration_callback(bar) if self.progress else None)
            self.alpha[:, cols] = result.x.astype(np.float64)
            self.info["cg_iterations"].append(result.iterations.tolist())
            self.info["cg_residuals"].append((result.residual_norms / np.maximum(result.thresholds, 1e-300)).tolist())

    def _prepare(self, s: float, noise: np.ndarray, q: int) -> None:
        """Operators s·K0 + D and their preconditioners, one per noise group."""
        self.s, self.q = s, q
        self.groups = noise_groups(noise, q)
        self.ops = [self._operator(s, d) for _, d in self.groups]
        self.preconditioners = [pivoted_cholesky_preconditioner(op, rank=min(self.precond_rank, self.m),
                                                                 memory_budget=self.memory_budget)
                                for op in self.ops]
        self._love: dict[int, Any] = {}

    def lml(self, task: int = 0) -> tuple[float, float]:
        """(estimate, standard error): the data term from the CG solution, log det by SLQ. Each (task, noise group)
        draws its own probes from ``seed``: with one probe set for all, their errors were alike and the summed
        standard error (their squares added) was 1.6× too small (measured over 40 seeds, output_mode
        "independent")."""
        total, variance = 0.0, 0.0
        for g, ((cols, _), op) in enumerate(zip(self.groups, self.ops)):
            stream = int(np.random.SeedSequence([self.seed, task, g]).generate_state(1)[0])
            ld = logdet(op, method="slq", num_probes=self.num_probes, seed=stream, memory_budget=self.memory_budget,
                        warn=False)
            if ld.truncation_error > ld.probe_estimates.std(ddof=1) / np.sqrt(ld.num_probes):  # as logdet's own
                v.warn(f"the iterative log marginal likelihood's log det (SLQ, {ld.lanczos_steps} Lanczos steps on "
                       f"{self.m} rows) has not converged: its estimated truncation error {ld.truncation_error:.3g} "
                       "exceeds the probes' standard error; lml_std_error_ includes both. For an exact evidence use "
                       "an exact method (method='function-cholesky')", v.ConvergenceWarning)
            data = float((self.R[:, cols] * self.alpha[:, cols]).sum())
            total += -0.5 * data - len(cols) * 0.5 * (ld.logdet + self.m * _LOG_2PI)
            variance += (len(cols) * 0.5 * ld.std_error) ** 2
        return total, float(np.sqrt(variance))

    def mean(self, star: StarRows) -> Any:
        return self.s * (star.cross @ self.alpha)

    def _solve(self, g: int, rhs: Any) -> Any:
        result = cg(self.ops[g], rhs.astype(self.dtype), M=self.preconditioners[g], rtol=self.rtol,
                    maxiter=self.maxiter)
        return result.x.astype(np.float64)

    def _love_cache(self, g: int) -> Any:
        """C (m, k) with C Cᵀ ≈ (s·K0 + D)⁻¹ from k Lanczos steps (seeded start vector: the same cache after load)."""
        if g not in self._love:
            be, xp = self.backend, self.backend.xp
            run = lanczos(self.ops[g], min(self.variance_rank, self.m), seed=self.seed,
                          memory_budget=self.memory_budget)
            k = run.alpha.shape[0]
            T = xp.diag(run.alpha) + xp.diag(run.beta, 1) + xp.diag(run.beta, -1)
            L = be.cholesky(T)
            self._love[g] = be.solve_triangular(L, run.Q.astype(np.float64).T, lower=True).T  # Q L⁻ᵀ
            self.info["lanczos_rank"] = int(k)
        return self._love[g]

    def var(self, star: StarRows) -> Any:
        """Variances (m*, q). Test sets over ``variance_cg_max`` rows start from the Lanczos cache and recompute by
        CG every (row, noise group) whose error bound (:meth:`_love_variances`) exceeds VARIANCE_TOLERANCE; the
        diagnostics cover every noise group (:meth:`_describe_variances`)."""
        xp = self.backend.xp
        m_star = int(star.cross.shape[0])
        out = xp.empty((m_star, self.q))
        cached = m_star > self.variance_cg_max
        errors, recomputed = [], 0
        for g, (cols, _) in enumerate(self.groups):
            if cached:
                values, bound = self._love_variances(g, star)
                errors.append(float(xp.max(bound)))
                redo = np.flatnonzero(self.backend.to_numpy(~(bound <= VARIANCE_TOLERANCE)))  # NaN: redo too
                recomputed += redo.size
            else:
                values, redo = None, np.arange(m_star)
            if redo.size:
                rows = xp.asarray(redo)
                w = self._solve(g, self.s * (star.cross if redo.size == m_star else star.cross[rows]).T)
                redone = self._energy_variance(g, star, w, redo)
                if values is None:
                    values = redone
                else:
                    values[rows] = redone
            out[:, cols] = values[:, None]
            warn_unresolved(out[:, cols[0]], self.s * xp.maximum(star.prior_diag(), 0.0), self.s)
        self._describe_variances(m_star, errors, recomputed)
        return out

    def _describe_variances(self, m_star: int, errors: list[float], recomputed: int) -> None:
        """``info`` for the variances of one predict call, over every noise group: ``variance_error`` the largest
        relative error bound of the Lanczos cache over every test row and group (absent without the cache),
        ``variance_method`` what computed them and, where CG took over, for how many (row, group) pairs."""
        self.info.pop("variance_error", None)
        if not errors:
            self.info["variance_method"] = "cg, energy form"
            return
        error, total = max(errors), m_star * len(self.groups)
        self.info["variance_error"] = error
        if not recomputed:
            self.info["variance_method"] = "lanczos, energy form"
            return
        amount = f"up to {error:.2g} by its error bound" if np.isfinite(error) else \
            "an unknown amount, its error bound reaching the variance itself"
        cause = f"the rank-{self.info.get('lanczos_rank')} Lanczos cache was off by {amount}; every test row checked"
        if recomputed == total:
            self.info["variance_method"] = f"cg, energy form ({cause}: above {VARIANCE_TOLERANCE:g} on all)"
            return
        where = f"{recomputed} of {m_star} test rows" if len(self.groups) == 1 else \
            f"{recomputed} of {total} (test row, noise group) pairs"
        self.info["variance_method"] = (f"lanczos, energy form; cg on {where}, above {VARIANCE_TOLERANCE:g} by the "
                                        f"bound ({cause})")

    def _energy_variance(self, g: int, star: StarRows, w: Any, rows: np.ndarray) -> Any:
        """:func:`energy_variance` for noise group g, with this engine's float64 training Jacobian."""
        return energy_variance(self.J, star, self.s, self.groups[g][1], w, rows, self.memory_budget)

    def _love_solve(self, g: int, rhs: Any) -> Any:
        """C⁻¹ s·rhs ≈ cache (cacheᵀ s·rhs) from the Lanczos cache: (m, k)."""
        cache = self._love_cache(g)
        return cache @ (cache.T @ (self.s * rhs))

    def _love_variances(self, g: int, star: StarRows) -> tuple[Any, Any]:
        """The Lanczos cache's energy-form variances at every test row of noise group g and a bound on each one's
        relative error (both (m*,), float64): :func:`energy_error_bound` from the residual C ŵ − s·k* of the cache's
        solve ŵ, whose product with C reuses the energy form's Jᵀ ŵ (one more product with J). Every row is
        checked, so no test row the cache resolves poorly can hide from a sample."""
        w = self._love_solve(g, star.cross.T)
        values, squares = energy_variance_and_residual(self.J, star, self.s, self.groups[g][1], w,
                                                       np.arange(w.shape[1]), self.memory_budget, star.cross.T)
        return values, energy_error_bound(values, squares, self.groups[g][1])

    def cov(self, star: StarRows) -> Any:
        """In the energy form, as the variances (its diagonal equals them to the solves' accuracy: both by CG,
        or the variances from the Lanczos cache): CG's error enters squared and keeps the covariance positive
        semi-definite."""
        xp = self.backend.xp
        m_star = int(star.cross.shape[0])
        prior = self.s * xp.maximum(star.prior_diag(), 0.0)
        v.check_memory(covariance_row_bytes(self.J.p), v.resolve_memory_budget(self.memory_budget, self.backend),
                       what=f"the covariance's parameter-space residuals (p = {self.J.p}, one test row)",
                       alternative="raise memory_budget")
        out = xp.empty((self.q, m_star, m_star))
        for g, (cols, noise) in enumerate(self.groups):
            w = self._solve(g, self.s * star.cross.T)
            out[cols] = energy_covariance(self.J, star, self.s, noise, w, self.memory_budget)
            warn_unresolved(xp.diagonal(out[cols[0]]), prior, self.s)
        return out

    def state(self) -> dict[str, Any]:
        return {"alpha": self.alpha}


# ----- the registry ----------------------------------------------------------------------------------------------

class Engine(Protocol):
    """What every engine provides (one GP problem; module docstring)."""

    space: str   # "function" or "parameter"
    solver: str  # "cholesky", "spectral" or "iterative"

    def fit(self, s: float, noise: np.ndarray, R: Any) -> None: ...
    def lml(self) -> Any: ...
    def mean(self, star: StarRows) -> Any: ...
    def var(self, star: StarRows) -> Any: ...
    def cov(self, star: StarRows) -> Any: ...
    def state(self) -> dict[str, Any]: ...


#: Method name → engine class: the one place a new engine is registered.
ENGINES: dict[str, Any] = {"function-cholesky": FunctionCholesky, "function-spectral": FunctionSpectral,
                           "parameter-cholesky": ParameterCholesky, "parameter-spectral": ParameterSpectral,
                           "iterative": Iterative}


def engine_class(method: str) -> Any:
    if method not in ENGINES:
        raise v.InvalidOptionError(f"unknown method {method!r}; one of {', '.join(map(repr, ENGINES))}")
    return ENGINES[method]


def _iterative(J: JacobianBlocks | None, mode: Any, settings: Any) -> Iterative:
    return Iterative(J, mode, rtol=settings.rtol, maxiter=settings.maxiter, precond_rank=settings.preconditioner_rank,
                     variance_rank=settings.variance_rank, variance_cg_max=settings.variance_cg_max,
                     num_probes=settings.num_probes, seed=settings.seed, progress=settings.progress,
                     memory_budget=settings.memory_budget)


def check_kernel_scale(diag: Any, s: float) -> None:
    """The kernel's diagonal s·‖J(x)‖² (m,) must be finite in float64: every kernel entry, factor and product is
    bounded by it (Cauchy–Schwarz), so this one check stands for them all. NonFiniteError in the user's terms."""
    xp = backends.infer(diag).xp
    with np.errstate(over="ignore", invalid="ignore"):
        largest = float(xp.max(diag)) if diag.size else 0.0
        bad = not np.isfinite(s * largest * max(1, diag.size)) or bool(xp.isnan(diag).any())
    if bad:
        raise v.NonFiniteError(f"the kernel s·J Jᵀ overflows float64: the training Jacobian's squared row norms reach "
                               f"{largest:.3g} (prior_scale = {s:.3g}, {diag.size} rows); the exported Jacobian is "
                               "far too large — rescale the network's inputs or outputs")


def source_of(engine: Any) -> Any:
    """What another exact engine of the same space can be built from without recomputing: a fresh copy of the
    kernel K0 (function space) or the dense Jacobian (parameter space, shared: engines only read it); None if the
    engine holds neither (iterative, or a loaded model)."""
    if getattr(engine, "space", None) == "function" and hasattr(engine, "_kernel"):
        return engine.K0  # FunctionCholesky: rebuilt into a new array (its own buffer holds its factor)
    if isinstance(engine, FunctionSpectral):
        return engine.K0.copy()
    return getattr(engine, "Jd", None)


def build(method: str, J: JacobianBlocks, mode: Any, settings: Any, source: Any = None) -> Any:
    """A new, unfitted engine for ``method`` on the task's Jacobian J, or on ``source`` (from :func:`source_of`)."""
    cls = engine_class(method)
    if cls is Iterative:
        check_kernel_scale(kernel_diag(J, output_mode=mode), settings.prior_scale)
        return _iterative(J, mode, settings)
    if is_sharded(J):
        if method != "function-cholesky":
            raise v.MissingCapabilityError(f"method {method!r} needs the Jacobian in memory; a Jacobian sharded on a "
                                           "Dask cluster is fitted by 'function-cholesky' (a blocked Cholesky over "
                                           "the kernel's tiles) or 'iterative'")
        check_kernel_scale(kernel_diag(J, output_mode=mode), settings.prior_scale)
        return ClusterCholesky(J, mode, settings.kernel_dtype, settings.memory_budget)
    if source is None and cls.space == "function":
        source = kernel(J, output_mode=mode, dtype=settings.kernel_dtype, memory_budget=settings.memory_budget,
                        progress=settings.progress)
    elif source is None:
        source = J.to_dense(memory_budget=settings.memory_budget).astype(np.float64)
    xp = J.backend.xp
    with np.errstate(over="ignore", invalid="ignore"):  # the check below names an overflow in the user's terms
        diag = xp.diagonal(source).astype(np.float64) if cls.space == "function" else \
            xp.einsum("ij,ij->i", source, source)
    check_kernel_scale(diag, settings.prior_scale)
    return cls(source, J.backend)


def restore(method: str, J: JacobianBlocks | None, mode: Any, backend: Backend, state: dict[str, Any], s: float,
            noise: np.ndarray, settings: Any) -> Any:
    """Rebuild a fitted engine from its :meth:`state` (arrays on ``backend``) and hyperparameters, without data."""
    cls = engine_class(method)
    if cls is Iterative:
        engine = _iterative(J, mode, settings)
        engine.alpha, engine.R = state["alpha"], None
        engine._prepare(s, noise, int(state["alpha"].shape[1]))
        return engine
    engine = object.__new__(cls)
    engine.backend, engine.s = backend, s
    for name, array in state.items():
        if not name.startswith("factor"):
            setattr(engine, name, array)
    q = int((state["alpha"] if "alpha" in state else state["mu"]).shape[1])
    engine.q, engine.noise = q, np.broadcast_to(noise[0], (q,)).astype(np.float64)
    engine.groups = noise_groups(noise, q)
    engine.factors = [state[f"factor{g}"] for g in range(len(engine.groups))] if cls.solver == "cholesky" else None
    if cls is FunctionSpectral:
        engine.d = s * engine.lam[:, None] + backend.xp.asarray(engine.noise)[None, :]
    return engine


def warn_clamped(n_negative: int, significant: int, total: int) -> None:
    """Announce variances clamped at 0 when some were negative beyond rounding."""
    if significant:
        v.warn(f"{significant} of {total} predictive variances were negative beyond rounding and were set to 0 "
               f"({n_negative} negative in all): the solve is inaccurate; use an exact method, tighter rtol or more "
               "noise", v.NumericalWarning)
