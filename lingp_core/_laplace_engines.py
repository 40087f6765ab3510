"""The two Laplace engines of :class:`lingp_core.laplace.LaplaceClassifier` (weight space and function space),
the float64 likelihood pieces they share, and prediction from a fitted state."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from backends import Backend
from backends._triangles import clear_upper
from lingp_core import _validate as v
from lingp_core._ggn import WORK_ELEMENTS, chunks, dense_ggn, example_grams
from lingp_core._precision import eps
from lingp_core.fisher import apply_factors, fisher
from lingp_core.jacobian import J_times_float64, JacobianBlocks
from lingp_core.kernels import kernel
from lingp_core.likelihoods import Likelihood
from lingp_core.operators import LinearOperator
from lingp_core.solvers import cg, cholesky_from_upper, safe_cholesky
from lingp_core.solvers.preconditioners import _DiagonalInverse

_ARMIJO = 1e-4  # sufficient-decrease constant of the backtracking line search
_MAX_HALVINGS = 40
# Hutchinson probes for γ and dγ/d log s while the prior-scale steps are far from the fixed point (the last steps use
# the exact γ): ~0.3 % on γ for the digits benchmark's p = 4,810
_SLOPE_PROBES = 128
_PREDICT_COLUMNS = 128  # columns of R⁻ᵀ per chunk of the predictive covariance (see predict_weight)


# ----- likelihood pieces in float64 ---------------------------------------------------------------------------------

class Targets:
    """Labels as the likelihood's float64 (n, c) target matrix T and the NLL pieces (∇_g NLL = mean(g) − T)."""

    def __init__(self, likelihood: Likelihood, y: Any, n: int, c: int, backend: Backend) -> None:
        self.likelihood, self.backend = likelihood, backend
        self.T = likelihood.targets(y, n, c)

    def nll(self, g: Any) -> float:
        return self.likelihood.nll(g, self.T)

    def residual(self, g: Any) -> Any:
        """∇_g NLL: (n, c)."""
        return self.likelihood.mean(g) - self.T


def _square_factors(likelihood: Likelihood, g: Any) -> Any:
    """Per-example L_i (n, c, c) with L_i L_iᵀ = Λ_i at logits g (float64); diagonal factors become c × c."""
    factor = likelihood.sqrt_curvature(g)
    if factor.ndim == 3:
        return factor
    n, c = factor.shape
    out = v.backend_of(factor).xp.zeros((n, c, c), dtype=factor.dtype)
    out[:, np.arange(c), np.arange(c)] = factor
    return out


def _curvature_term(likelihood: Likelihood, g: Any, moved: Any, left: Any, right: Any) -> float:
    """Hutchinson's mean of leftᵀ Λ' right over probe columns (n·c, k), Λ' = the likelihood's ``curvature_change``
    in the direction ``moved`` = J dŵ/dt (n·c,): the part of dγ/d log s that the moving curvature adds.

    γ = p − tr(H⁻¹)/s and dH/dt = Jᵀ Λ' J − I/s give dγ/dt = tr(M (I − M)) + tr(H⁻¹ Jᵀ Λ' J H⁻¹)/s with
    M = I − H⁻¹/s (eigenvalues sλ/(1 + sλ)); each engine writes the second trace as a trace in n·c space.
    """
    n, c = g.shape
    change = likelihood.curvature_change(g, moved.reshape(n, c))  # Λ' (n, c, c)
    product = change @ right.reshape(n, c, -1)
    return _hutchinson(left.reshape(n * c, -1), product.reshape(n * c, -1))


def _rademacher(dimension: int, backend: Backend) -> Any:
    """_SLOPE_PROBES seeded ±1 columns (dimension, k), the same on every backend."""
    rng = np.random.default_rng(0)
    return backend.asarray(rng.choice(np.array([-1.0, 1.0]), size=(dimension, _SLOPE_PROBES)))


def _hutchinson(left: Any, right: Any) -> float:
    """Mean over probe columns of leftᵀ right: Hutchinson's estimate of tr(A) when left = z and right = A z (or of
    tr(P Q) with left = P z, right = Q z for commuting symmetric P, Q)."""
    return float((left * right).sum()) / left.shape[1]


# ----- products with J in float64 -----------------------------------------------------------------------------------

def _sq(x: Any) -> float:
    """‖x‖² as a float."""
    return float(x @ x)


def _Jt_times(J: JacobianBlocks, u: Any) -> Any:
    """Jᵀ u in J's dtype, returned as float64 (p,) or (p, k)."""
    return J.rmatmat(u.astype(J.dtype, copy=False)).astype(np.float64, copy=False)


class _Float64Operator(LinearOperator):
    """An operator in J's dtype (e.g. a float32 FisherOperator) seen as a float64 one, for float64 CG, plus a float64
    diagonal (the prior precision, one value per column)."""

    def __init__(self, op: LinearOperator, diagonal: Any) -> None:
        self.op, self.shape, self.backend = op, op.shape, op.backend
        self.dtype = np.dtype(np.float64)
        self.added = diagonal  # (p,) float64

    def _matmat(self, x: Any) -> Any:
        out = self.op._matmat(x.astype(self.op.dtype, copy=False)).astype(np.float64, copy=False)
        return out + self.added[:, None] * x


class _CholeskyInverse(LinearOperator):
    """x ↦ (R Rᵀ)⁻¹ x by two triangular solves: an earlier Hessian as preconditioner."""

    def __init__(self, factor: Any, backend: Backend) -> None:
        self.factor, self.backend = factor, backend
        self.shape, self.dtype = (int(factor.shape[0]),) * 2, np.dtype(np.float64)

    def _matmat(self, x: Any) -> Any:
        return self.backend.cho_solve(self.factor, x)


def _triangular_inverse(factor: Any, backend: Backend) -> Any:
    """R⁻¹ for a lower triangular R: LAPACK's triangular inverse on the host (p³/3 flops, a third of a triangular
    solve with p right-hand sides), a triangular solve against I elsewhere."""
    if backend.name == "numpy":
        import scipy.linalg

        # (R⁻¹)ᵀ = (Rᵀ)⁻¹, and Rᵀ of a C-ordered R is Fortran-ordered: LAPACK then works without copying R
        inv, info = scipy.linalg.lapack.dtrtri(factor.T, lower=0)
        if info != 0:
            raise v.NotPositiveDefiniteError(f"the Cholesky factor is singular (LAPACK dtrtri info = {info})")
        return inv.T
    return backend.solve_triangular(factor, backend.xp.eye(factor.shape[0]), lower=True)


def _symmetric_cholesky_in_place(a: Any, backend: Backend) -> Any:
    """The lower Cholesky factor of the symmetric positive definite ``a`` ((n, n) float64, C-ordered, both triangles
    filled), written over ``a`` (its strict upper triangle then cleared), with :func:`safe_cholesky`'s jitter policy.

    ``cholesky_from_upper(lower_filled=True)``: no passes over all of ``a`` to check its symmetry and finiteness
    before LAPACK runs (0.3 s next to LAPACK's 0.9 s at p = 4,810 on one core) and no copy on CuPy — the callers build
    ``a`` symmetric; a failed attempt is retried from the upper triangle, which LAPACK leaves untouched.
    """
    index = backend.xp.arange(a.shape[0])
    cholesky_from_upper(a, a[index, index], out=a, lower_filled=True)  # the diagonal: a copy (advanced indexing)
    clear_upper(a, backend.xp)
    return a


def _example_chunks(n: int, per_example: int) -> list[slice]:
    return list(chunks(n, WORK_ELEMENTS // max(1, per_example)))


def block_groups(J: JacobianBlocks) -> list[slice]:
    """The columns of each of J's blocks (one prior group per block: a layer's weight and bias, as exported)."""
    starts = np.cumsum([0] + list(J.block_sizes))
    return [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


def _group_sums(values: Any, groups: list[slice]) -> np.ndarray:
    """Sums of ``values`` (p,) or (p, k) over each group's rows (all columns), as a float64 host array (G,)."""
    return np.array([float(values[g].sum()) for g in groups])


# ----- the two engines ----------------------------------------------------------------------------------------------

def _accept(new: float, old: float, alpha: float, slope: float) -> bool:
    """Armijo's sufficient decrease; near the optimum a full Newton step whose change of Ψ is below rounding is
    accepted too (it still shrinks the gradient, which Ψ's float64 value can no longer show)."""
    if new <= old + _ARMIJO * alpha * slope:
        return True
    return alpha == 1.0 and new - old <= 16 * eps(np.float64) * max(1.0, abs(old))


class _Newton:
    """Convergence bookkeeping shared by the engines."""

    def __init__(self) -> None:
        self.iterations, self.cg_iterations, self.converged, self.gradient_ratio = 0, 0, False, float("nan")


class _ProbeSolves:
    """The Hutchinson probes z of both engines' estimates and their solves with the engine's Cholesky factor R
    (``self.factor``, of H or of B), drawn and solved once per fit (``fit`` resets ``self._probes``)."""

    factor: Any
    backend: Backend
    _probes: tuple | None = None

    def _probe_solves(self) -> tuple:
        """(z, R⁻¹ z, (R Rᵀ)⁻¹ z)."""
        if self._probes is None:
            probes = _rademacher(self.factor.shape[0], self.backend)
            reduced = self.backend.solve_triangular(self.factor, probes, lower=True)
            self._probes = (probes, reduced, self.backend.solve_triangular(self.factor, reduced, lower=True,
                                                                           trans=True))
        return self._probes


class WeightEngine(_ProbeSolves):
    """Parameter space: Newton–CG for ŵ; the dense H(ŵ) = F + S⁻¹, its Cholesky factor R and R⁻¹ for the posterior.
    S = s·I, or block diagonal with one s_g per block of J (per-layer prior variances)."""

    method = "parameter"

    def __init__(self, J: JacobianBlocks, targets: Targets, likelihood: Likelihood, prior_mean: Any,
                 memory_budget: Any) -> None:
        self.J, self.targets, self.likelihood, self.budget = J, targets, likelihood, memory_budget
        self.m = prior_mean  # (p,) float64: the prior mean of w
        self.backend = J.backend
        self.dimension = J.p  # of the posterior's matrices
        self.blocks = block_groups(J)
        self.factor: Any = None  # the lower Cholesky factor R of H at the last MAP
        self._owns_factor = False  # whether no other engine (a copy) shares ``factor``: a refit may write over it
        self._inverse_factor: Any = None  # R⁻¹, computed when first needed
        self._direction: Any = None  # H⁻¹ (ŵ − m), computed when first needed

    def __copy__(self) -> WeightEngine:
        """A shallow copy (the engine of a refit's draft): it shares the factor with this engine, so from now on
        neither writes over it."""
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        self._owns_factor = twin._owns_factor = False
        return twin

    def set_prior(self, scales: np.ndarray) -> None:
        """Prior variances: one for all columns (``scales`` of length 1) or one per block of J. Called by ``fit``;
        called alone only with every block's scale equal to the fitted one (the same H: no refit needed)."""
        xp = self.backend.xp
        self.scales = scales
        self.groups = [slice(0, self.J.p)] if len(scales) == 1 else self.blocks
        self.s = float(scales[0]) if len(scales) == 1 else None  # the scalar model's s
        self.precision = xp.concatenate([xp.full(g.stop - g.start, 1.0 / float(sg), dtype=np.float64)
                                         for g, sg in zip(self.groups, scales)])  # D = S⁻¹ per column (p,)

    def _prior_term(self, w: Any) -> float:
        """½ (w − m)ᵀ S⁻¹ (w − m)."""
        d = w - self.m
        return 0.5 * float(d @ (self.precision * d))

    def fit(self, scales: np.ndarray, w0: Any, rtol: float, maxiter: int, cg_maxiter: int | None, bar: Any) -> dict:
        """The MAP and H at prior variances ``scales`` (G,): G = 1 for all columns, else one per block of J."""
        xp, J = self.backend.xp, self.J
        p = J.p
        self.set_prior(scales)
        w = xp.zeros(p, dtype=np.float64) if w0 is None else w0.copy()
        f0 = J.f0.astype(np.float64)
        g = f0 + J_times_float64(J, w).reshape(f0.shape)
        objective = self.targets.nll(g) + self._prior_term(w)
        # an earlier Hessian (another s or the previous fit) is a far better preconditioner than Jacobi
        precond = None if self.factor is None else _CholeskyInverse(self.factor, self.backend)
        info = _Newton()
        floor = 10 * eps(J.dtype)  # products in J's dtype: no inner solve is more accurate than this
        for _ in range(maxiter):
            data_grad = _Jt_times(J, self.targets.residual(g).reshape(-1))
            prior_grad = self.precision * (w - self.m)
            grad = data_grad + prior_grad
            scale = float(xp.linalg.norm(data_grad)) + float(xp.linalg.norm(prior_grad))
            grad_norm = float(xp.linalg.norm(grad))
            info.gradient_ratio = grad_norm / scale if scale > 0 else 0.0
            if info.gradient_ratio <= rtol:
                info.converged = True
                break
            op = _Float64Operator(fisher(J, self.likelihood, g.astype(J.dtype)), self.precision)
            M = precond if precond is not None else _DiagonalInverse(
                op.op.diagonal().astype(np.float64) + self.precision, op)
            forcing = max(min(0.5, math.sqrt(info.gradient_ratio)) * min(1.0, info.gradient_ratio), floor)
            solve = cg(op, -grad, M=M, rtol=forcing, maxiter=cg_maxiter or 10 * p, warn=False)
            info.cg_iterations += int(solve.iterations.max())
            step = solve.x[:, 0] if solve.x.ndim == 2 else solve.x
            moved = self._line_search(w, g, objective, grad, step)
            info.iterations += 1
            bar.update(1)
            if moved is None:
                break
            w, g, objective = moved
        self.w, self.g = w, g
        # Newton is done with the last factor: its memory takes the new F unless another engine shares it
        recycled = self.factor if self._owns_factor else None
        self.factor = None
        F = dense_ggn(J, _square_factors(self.likelihood, g), self.budget, out=recycled)
        self.factor, self._inverse_factor, self._probes, self._direction = self._factorize(F), None, None, None
        self._owns_factor = True
        del F, recycled
        self.objective = objective
        return {"newton_iterations": info.iterations, "cg_iterations": info.cg_iterations,
                "converged": info.converged, "gradient_ratio": info.gradient_ratio}

    def _factorize(self, F: Any) -> Any:
        """Cholesky factor of H = F + S⁻¹, adding the prior to F in place (F is not needed afterwards)."""
        idx = self.backend.xp.arange(F.shape[0])
        F[idx, idx] += self.precision
        # positive definite by construction (≥ S⁻¹): jitter only for rounding; F is factored in place
        return _symmetric_cholesky_in_place(F, self.backend)

    def _line_search(self, w: Any, g: Any, objective: float, grad: Any, step: Any) -> tuple | None:
        J = self.J
        slope = float(grad @ step)
        if slope >= 0:  # an inexact inner solve can only fail this way by rounding: fall back to steepest descent
            step, slope = -grad, -float(grad @ grad)
        dg = J_times_float64(J, step).reshape(g.shape)
        alpha = 1.0
        for _ in range(_MAX_HALVINGS):
            w_new, g_new = w + alpha * step, g + alpha * dg
            obj_new = self.targets.nll(g_new) + self._prior_term(w_new)
            if _accept(obj_new, objective, alpha, slope):
                return w_new, g_new, obj_new
            alpha *= 0.5
        return None  # no decrease at machine precision: the iterate is as good as it gets

    # ----- posterior quantities --------------------------------------------------------------------------------
    @property
    def inverse_factor(self) -> Any:
        """R⁻¹ (p³/3 flops, like the factorization): tr(H⁻¹) for the exact γ, and every predictive covariance as
        products J* R⁻ᵀ through the blocks instead of triangular solves with dense rows of J*."""
        if self._inverse_factor is None:
            self._inverse_factor = _triangular_inverse(self.factor, self.backend)
        return self._inverse_factor

    def _solve(self, x: Any) -> Any:
        """H⁻¹ x by the Cholesky factor."""
        return self.backend.cho_solve(self.factor, x)

    def half_logdet(self) -> float:
        """½ log det(S H) = Σ log R_jj + ½ Σ_g p_g log s_g."""
        xp = self.backend.xp
        prior = sum((g.stop - g.start) * math.log(float(sg)) for g, sg in zip(self.groups, self.scales))
        return float(xp.log(xp.diagonal(self.factor)).sum()) + 0.5 * prior

    def sq_norm_w(self) -> float:
        """‖ŵ − m‖²."""
        return _sq(self.w - self.m)

    def group_sq_norms(self) -> np.ndarray:
        """‖ŵ_g − m_g‖² per prior group (G,)."""
        d = self.w - self.m
        return _group_sums(d * d, self.groups)

    def effective_parameters(self, exact: bool = True) -> float:
        """γ = p − tr(S⁻¹ H⁻¹) (= p − tr(H⁻¹)/s for one scale), summed over :meth:`group_effective_parameters`."""
        return float(self.group_effective_parameters(exact).sum())

    def group_effective_parameters(self, exact: bool = True) -> np.ndarray:
        """γ_g = p_g − tr(Σ_gg)/s_g per prior group (G,): from the column norms of R⁻¹ ((H⁻¹)_jj = ‖R⁻¹ e_j‖²), or
        (``exact=False``) Hutchinson's mean of z_gᵀ (z − S⁻¹ H⁻¹ z)_g over the probes (unbiased for each group's
        trace of I − S⁻¹ H⁻¹, whose eigenvalues lie in [0, 1))."""
        xp = self.backend.xp
        if exact:
            inverse = self.inverse_factor
            variances = xp.einsum("ij,ij->j", inverse, inverse)  # diag(H⁻¹) without a p × p temporary
            return np.array([(g.stop - g.start) - float(variances[g].sum()) / float(sg)
                             for g, sg in zip(self.groups, self.scales)])
        probes, _, inverse = self._probe_solves()  # z and H⁻¹ z
        kept = probes * (probes - self.precision[:, None] * inverse)
        return _group_sums(kept, self.groups) / probes.shape[1]

    def sq_norm_w_slope(self) -> float:
        """d‖ŵ − m‖²/d log s = 2 (ŵ − m)ᵀ H⁻¹ (ŵ − m) / s (the MAP condition differentiated; exact; one scale)."""
        return 2.0 * float((self.w - self.m) @ self._map_direction()) / self._one_scale()

    def _one_scale(self) -> float:
        if self.s is None:  # the callers check this; an internal misuse otherwise
            raise v.InvalidOptionError("the prior-scale slopes are defined for one prior scale, got per-block scales")
        return self.s

    def _map_direction(self) -> Any:
        """H⁻¹ (ŵ − m) = s·dŵ/d log s, once per fit."""
        if self._direction is None:
            self._direction = self._solve(self.w - self.m)
        return self._direction

    def effective_parameters_slope(self) -> float:
        """dγ/d log s, estimated (see :func:`_curvature_term`), with H⁻¹ z and J H⁻¹ z by the Cholesky factor."""
        s = self._one_scale()
        probes, _, inverse = self._probe_solves()  # z and H⁻¹ z
        held = _hutchinson(probes - inverse / s, inverse / s)
        moved = J_times_float64(self.J, self._map_direction() / s)  # J dŵ/dt
        projected = J_times_float64(self.J, inverse)  # J H⁻¹ z: tr(H⁻¹ Jᵀ Λ' J H⁻¹) is Hutchinson's mean of its Λ' form
        return held + _curvature_term(self.likelihood, self.g, moved, projected, projected) / s

    def state(self) -> dict:
        return {"w": self.w, "inverse_factor": self.inverse_factor}


class FunctionEngine(_ProbeSolves):
    """Function space: Newton on h = J w with prior N(0, K), K = s·J Jᵀ (n·c × n·c); w = s Jᵀ a."""

    method = "function"

    def __init__(self, J: JacobianBlocks, targets: Targets, likelihood: Likelihood, prior_mean: Any,
                 memory_budget: Any) -> None:
        self.J, self.targets, self.likelihood, self.budget = J, targets, likelihood, memory_budget
        self.m = prior_mean
        # the prior mean J m of h moves into the offset: h − J m ~ N(0, K) around logits f0 + J m
        self.offset = J.f0.astype(np.float64) + J_times_float64(J, prior_mean).reshape(J.f0.shape)
        self.backend = J.backend
        self.K0 = kernel(J, memory_budget=memory_budget)  # J Jᵀ in float64, computed once for every s
        self.dimension = self.K0.shape[0]  # n·c, of the posterior's matrices

    def fit(self, scales: np.ndarray, a0: Any, rtol: float, maxiter: int, cg_maxiter: int | None, bar: Any) -> dict:
        """The MAP and B at the prior variance ``scales`` (1,): one for all parameters (the kernel takes one)."""
        xp, J = self.backend.xp, self.J
        s = float(scales[0])
        m = self.K0.shape[0]
        a = xp.zeros(m, dtype=np.float64) if a0 is None else a0.copy()
        h = s * (self.K0 @ a)  # K = s·K0 enters through products only: no scaled copy of K0
        f0 = self.offset
        objective = self.targets.nll(f0 + h.reshape(f0.shape)) + 0.5 * float(a @ h)
        info = _Newton()
        for _ in range(maxiter):
            r = self.targets.residual(f0 + h.reshape(f0.shape)).reshape(-1)
            scale = float(xp.linalg.norm(r)) + float(xp.linalg.norm(a))
            info.gradient_ratio = float(xp.linalg.norm(r + a)) / scale if scale > 0 else 0.0
            if info.gradient_ratio <= rtol:  # ∇_h Ψ = r + K⁻¹h = r + a
                info.converged = True
                break
            factors = _square_factors(self.likelihood, f0 + h.reshape(f0.shape))
            chol = self._b_factor(s, factors)
            b = apply_factors(factors, apply_factors(factors, h[:, None], True), False)[:, 0] - r
            kb = s * (self.K0 @ b)
            inner = self.backend.cho_solve(chol, apply_factors(factors, kb[:, None], True))
            a_new = b - apply_factors(factors, inner, False)[:, 0]
            moved = self._line_search(a, h, objective, a_new - a, s, f0, r)
            info.iterations += 1
            bar.update(1)
            if moved is None:
                break
            a, h, objective = moved
        self.a, self.h, self.s = a, h, s
        g = f0 + h.reshape(f0.shape)
        self.factors = _square_factors(self.likelihood, g)
        self.factor, self._probes = self._b_factor(s, self.factors), None
        self.w = self.m + s * _Jt_times(J, a)
        self.objective = objective
        return {"newton_iterations": info.iterations, "cg_iterations": 0, "converged": info.converged,
                "gradient_ratio": info.gradient_ratio}

    def _b_factor(self, s: float, factors: Any) -> Any:
        """Cholesky factor of B = I + s·Lᵀ K0 L (n·c × n·c), in one m × m array: Lᵀ K0 row-blockwise, then · L on
        chunks of its rows, scaled, and factored in place."""
        xp, m = self.backend.xp, self.dimension
        n, c = factors.shape[:2]
        B = apply_factors(factors, self.K0, True)  # rows i·c..: L_iᵀ K0[i, :]
        for rows in chunks(m, max(1, WORK_ELEMENTS // m)):
            k = rows.stop - rows.start
            B[rows] = (B[rows].reshape(k, n, 1, c) @ factors).reshape(k, m)  # columns j·c..: · L_j
        B *= s
        idx = xp.arange(m)
        B[idx, idx] += 1.0
        return safe_cholesky(B, overwrite_a=True).factor  # ≥ I by construction; jitter only for rounding

    def _line_search(self, a: Any, h: Any, objective: float, step: Any, s: float, f0: Any, r: Any) -> tuple | None:
        dh = s * (self.K0 @ step)
        slope = float((r + a) @ dh)  # directional derivative of Ψ(a) = NLL(f0 + K a) + ½ aᵀ K a
        alpha = 1.0
        for _ in range(_MAX_HALVINGS):
            a_new, h_new = a + alpha * step, h + alpha * dh
            obj_new = self.targets.nll(f0 + h_new.reshape(f0.shape)) + 0.5 * float(a_new @ h_new)
            if _accept(obj_new, objective, alpha, min(slope, 0.0)):
                return a_new, h_new, obj_new
            alpha *= 0.5
        return None

    def half_logdet(self) -> float:
        """½ log det(s·H) = ½ log det(B) = Σ log diag(chol B)."""
        xp = self.backend.xp
        return float(xp.log(xp.diagonal(self.factor)).sum())

    def sq_norm_w(self) -> float:
        return self.s * float(self.a @ self.h)  # ‖s Jᵀ a‖² = s·aᵀ K a

    def effective_parameters(self, exact: bool = True) -> float:
        """γ = n·c − tr(B⁻¹): exactly by the triangular inverse, or (``exact=False``) by Hutchinson."""
        rows = self.factor.shape[0]
        if exact:
            return rows - _sq(_triangular_inverse(self.factor, self.backend).reshape(-1))
        _, reduced, _ = self._probe_solves()
        return rows - _hutchinson(reduced, reduced)

    def sq_norm_w_slope(self) -> float:
        """d‖ŵ − m‖²/d log s = 2 (ŵ − m)ᵀ H⁻¹ (ŵ − m) / s = 2s (aᵀ h − ‖chol(B)⁻¹ Lᵀ h‖²) with h = K a, by Woodbury:
        H⁻¹ = s I − s² Jᵀ L B⁻¹ Lᵀ J and ŵ − m = s Jᵀ a."""
        projected = apply_factors(self.factors, self.h[:, None], True)
        reduced = self.backend.solve_triangular(self.factor, projected, lower=True)
        return 2.0 * self.s * (float(self.a @ self.h) - _sq(reduced.reshape(-1)))

    def effective_parameters_slope(self) -> float:
        """dγ/d log s, estimated over probes u of length n·c (see :func:`_curvature_term`): tr(M (I − M)) =
        tr(B⁻¹ − B⁻²) (B has eigenvalues 1 + sλ), and tr(H⁻¹ Jᵀ Λ' J H⁻¹)/s = tr(Λ' P K Pᵀ) by Woodbury, with
        J H⁻¹ = s P J and P = I − K L B⁻¹ Lᵀ."""
        probes, _, inverse = self._probe_solves()  # u and B⁻¹ u
        held = _hutchinson(probes - inverse, inverse)
        moved = self._posterior_map(self.h[:, None])[:, 0]  # J dŵ/dt = J H⁻¹ Jᵀ a
        kernel_probes = self.s * (self.K0 @ probes)  # K u
        transposed = probes - apply_factors(self.factors, self.backend.cho_solve(
            self.factor, apply_factors(self.factors, kernel_probes, True)), False)  # Pᵀ u = u − L B⁻¹ Lᵀ K u
        right = self._posterior_map(self.s * (self.K0 @ transposed))  # P K Pᵀ u
        g = self.offset + self.h.reshape(self.offset.shape)
        return held + _curvature_term(self.likelihood, g, moved, probes, right)

    def _posterior_map(self, x: Any) -> Any:
        """P x = (I − K L B⁻¹ Lᵀ) x for x (n·c, k): J H⁻¹ Jᵀ = K − K L B⁻¹ Lᵀ K (Woodbury), so J H⁻¹ Jᵀ a is P h
        with h = K a."""
        inner = self.backend.cho_solve(self.factor, apply_factors(self.factors, x, True))
        return x - self.s * (self.K0 @ apply_factors(self.factors, inner, False))

    def state(self) -> dict:
        return {"a": self.a, "factors": self.factors, "factor": self.factor, "prior_mean": self.m}


# ----- prediction from a saved state (no training labels needed) ----------------------------------------------------

def predict_weight(state: dict, J_star: JacobianBlocks, cov: str | None) -> tuple:
    """Mean f0* + J* ŵ and, per example, the c × c blocks (or diagonals) of J* Σ J*ᵀ = Z Zᵀ with Z = J* R⁻ᵀ
    computed through the blocks, summed over chunks of Z's columns (each column of R⁻ᵀ is rearranged for the blocks
    once, whatever the number of test examples).

    R⁻ᵀ is upper triangular: its columns ``cols`` vanish below row cols.stop, so the blocks of J* whose parameters
    all come later add nothing there and are skipped. Chunks of at most ``_PREDICT_COLUMNS`` columns keep a factored
    block's intermediate (n*·out·k) small enough to stay near the cache (1.5× faster than 2,810-column chunks for the
    digits MLP's 597 test examples).
    """
    xp = J_star.xp
    n, c, p = J_star.n, J_star.n_outputs, J_star.p
    mean = J_star.f0.astype(np.float64) + J_times_float64(J_star, state["w"]).reshape(n, c)
    if cov is None:
        return mean, None
    out = xp.zeros((n, c, c) if cov == "full" else (n, c), dtype=np.float64)
    starts = np.cumsum([0] + list(J_star.block_sizes))
    for cols in chunks(p, max(1, min(_PREDICT_COLUMNS, WORK_ELEMENTS // max(1, n * c)))):
        live = int(np.searchsorted(starts, cols.stop))  # blocks starting before cols.stop: the others meet zeros
        # R⁻ᵀ[:end, cols] in J*'s dtype, rows up to the end of the last live block
        right = xp.ascontiguousarray(state["inverse_factor"][cols, : starts[live]].T, dtype=J_star.dtype)
        z = xp.zeros((n * c, cols.stop - cols.start), dtype=J_star.dtype)
        for block, start in zip(J_star.blocks[:live], starts[:live]):
            z += block.matmat(right[start: start + block.p])
        z = z.astype(np.float64).reshape(n, c, cols.stop - cols.start)
        out += z @ z.transpose(0, 2, 1) if cov == "full" else (z * z).sum(axis=2)
    return mean, out


def predict_function(state: dict, J_train: JacobianBlocks, J_star: JacobianBlocks, s: float, cov: str | None,
                      budget: Any) -> tuple:
    """Mean f0* + J* m + K* a and covariances K**_i − (K* L B⁻¹ Lᵀ K*ᵀ)_i from the training Jacobian's kernel, in
    chunks of test examples."""
    xp, be = J_star.xp, J_star.backend
    n, c = J_star.n, J_star.n_outputs
    m = J_train.n * J_train.n_outputs
    mean = xp.empty((n, c), dtype=np.float64)
    out = None if cov is None else xp.empty((n, c, c) if cov == "full" else (n, c), dtype=np.float64)
    for rows in _example_chunks(n, 2 * c * m):
        part = J_star.examples(rows)
        K_cross = kernel(part, J_train, prior_scale=s, memory_budget=budget)  # (k·c, n·c)
        mean[rows] = part.f0.astype(np.float64) + (J_times_float64(part, state["prior_mean"]) +
                                                    K_cross @ state["a"]).reshape(-1, c)
        if cov is None:
            continue
        y = apply_factors(state["factors"], K_cross.T, True)  # Lᵀ K*ᵀ (n·c, k·c)
        z = be.solve_triangular(state["factor"], y, lower=True).reshape(m, -1, c)
        prior = s * example_grams(J_star, rows)
        if cov == "full":
            out[rows] = prior - xp.einsum("jik,jil->ikl", z, z)
        else:
            out[rows] = xp.diagonal(prior, axis1=1, axis2=2) - (z * z).sum(axis=0)
    return mean, out
