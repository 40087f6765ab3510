"""Classification with the linearized network: the Laplace approximation of a generalized linear model.

The model (Maddox et al. 2021; Immer et al. 2021): logits g(x) = f₀(x) + J(x) w with w = θ − θ̂ ~ N(0, s·I), a
categorical (softmax, c ≥ 2 logits) or Bernoulli (sigmoid, one logit) likelihood. Because g is linear in w the
negative log joint

    Ψ(w) = NLL(y, f₀ + J w) + ‖w − m‖² / (2s)

(prior mean m = 0 by default; ``fit(..., prior_mean=-θ̂)`` puts the prior on θ itself, centred at the origin) is
convex and its Hessian is exactly the generalized Gauss–Newton H(w) = Jᵀ Λ(g) J + I/s (Λ_i the c × c curvature of
the NLL in the logits of example i). :class:`LaplaceClassifier` finds the MAP ŵ by Newton's method and approximates
the posterior by N(ŵ, Σ), Σ = H(ŵ)⁻¹. Two ways to compute it, chosen by the sizes n·c (training rows) and p:

- ``"parameter"`` (weight space, p × p): Newton–CG on w with Fisher products on the exported blocks (inner solves by
  :func:`~lingp_core.solvers.cg`, Jacobi-preconditioned, or preconditioned by the factor of an earlier H on refits),
  Armijo backtracking; then the dense H(ŵ) = Jᵀ Λ J + I/s, its Cholesky factor R (R Rᵀ = H) and R⁻¹. The dense GGN
  is assembled without forming J: for factored Linear blocks Σ_i (Δ_iᵀ Λ_i Δ_i) ⊗ (a_i a_iᵀ) as one GEMM over
  examples (n·p² flops instead of n·c·p² for Gᵀ G; a quarter of that for a block with itself). Predictive
  covariance of the logits at x*: Z Zᵀ with Z = J* R⁻ᵀ, a product through the blocks (no dense J*).
- ``"function"`` (n·c × n·c): Newton on the latent h = J (w − m) with prior N(0, K), K = s·J Jᵀ (Rasmussen &
  Williams Alg. 3.3, multiclass through the per-example factors L_i L_iᵀ = Λ_i): with B = I + Lᵀ K L,
  h ← K a, a = b − L B⁻¹ Lᵀ K b, b = Λ h − ∇NLL; ŵ = m + s Jᵀ â. Predictive covariance K** − K*ᵀ L B⁻¹ Lᵀ K*.

Both give the same MAP, posterior and evidence (the tests check this against a dense float64 Newton solve).

Laplace evidence (log marginal likelihood), with H at the MAP:

    log p(y | s) ≈ −NLL(ĝ) − ‖ŵ − m‖²/(2s) − ½ log det(s·H) ,   det(s·H) = det(I_p + s Jᵀ Λ J) = det(I_nc + Lᵀ K L)

(the Gaussian integral of the log joint's second-order expansion; the two determinants agree by Sylvester's identity).
:meth:`LaplaceClassifier.optimize_prior_scale` maximizes it over s by MacKay's fixed point s ← ‖ŵ − m‖² / γ,
γ = p − tr(Σ)/s (the effective number of parameters, = n·c − tr(B⁻¹) in function space), re-solving the MAP and the
curvature at every step (Newton steps on the fixed-point condition in log s); the condition is the stationarity of
the evidence when Λ's own dependence on ŵ(s) is neglected (the standard evidence-framework approximation).

Per-layer prior variances: ``prior_scale`` may give one s_g per block of the exported Jacobian (``J.blocks``: one
per layer, a Linear layer's weight and bias together), a block-diagonal prior S. The weight-space engine handles it
(H = F + S⁻¹, log det(S·H) in the evidence); the function-space kernel takes one scale, so per-layer scales need
``method="parameter"`` ("auto" picks it). ``optimize_prior_scale(layerwise=True)`` maximizes the evidence over the
s_g by MacKay's fixed point per group, s_g ← ‖ŵ_g − m_g‖² / γ_g with γ_g = p_g − tr(Σ_gg)/s_g (Σ_g γ_g = γ); as
for one scale, this is the stationarity of the evidence with Λ held at the MAP. A group whose s_g falls to the
lower bound is one the evidence switches off: its parameters stay at their prior mean.

Predictive class probabilities: the probit approximation softmax_k(μ_k / √(1 + π σ²_k / 8)) (sigmoid for Bernoulli),
or a seeded Monte Carlo average of softmax over logits drawn from N(μ_i, Σ_i) per example.

Precision: products with J run in the Jacobian's dtype; logits, objectives, factorizations and results are float64.

Saved models (:meth:`LaplaceClassifier.save`) hold what prediction needs and no training labels: parameter space ŵ
and R⁻¹ (p × p); function space the representer weights, the curvature factors, chol(B) and the training Jacobian
blocks (the kernel with test points needs them), plus the prior mean.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

from lingp_core import _validate as v
from lingp_core._averaging import check_keep_mass, posterior_weights
from lingp_core._estimator import (
    FLOAT64,
    Estimator,
    archived_count,
    archived_length,
    archived_number,
    archived_signature,
    check_same_parameters,
    check_triangular_factor,
    checked_weight_mean,
    float_errors_checked,
    jacobian_from_archive,
)
from lingp_core._ggn import WORK_ELEMENTS, chunks
from lingp_core._hyperparameters import check_hyperprior, log_normal
from lingp_core._laplace_engines import (
    FunctionEngine,
    Targets,
    WeightEngine,
    predict_function,
    predict_weight,
)
from lingp_core._plan import Plan
from lingp_core._precision import eps
from lingp_core._progress import progress_bar
from lingp_core._validate import NotFittedError
from lingp_core.io import ArchiveError, fingerprint, fingerprint_json, jacobian_to_arrays
from lingp_core.jacobian import JacobianBlocks
from lingp_core.kernels import kernel_diag
from lingp_core.likelihoods import Likelihood, as_likelihood
from lingp_core.sharded import is_sharded, training_pair

__all__ = ["LAPLACE_METHODS", "PREDICTIVE_METHODS", "LaplaceClassifier", "NotFittedError"]

#: Accepted ``method`` values: "auto" picks the smaller of the function-space (n·c) and weight-space (p) systems.
LAPLACE_METHODS = ("auto", "parameter", "function")
#: Accepted ``predict_proba`` methods.
PREDICTIVE_METHODS = ("probit", "mc")
_LIKELIHOODS = ("categorical", "bernoulli")  # of likelihoods.LIKELIHOODS, those with class labels
_LOG_STEP_CAP = 2.0  # largest change of log s per prior-scale step, before doubling
_EXACT_TRACE_MAX = 1024  # above this p (or n·c), prior-scale steps estimate γ until the last ones
_MIN_GAIN, _MAX_GAIN = 0.25, 8.0  # layerwise steps: multiples of MacKay's plain update


def _check_prior_scale(value: Any) -> float | tuple[float, ...]:
    """One prior variance s > 0 (a float), or a non-empty 1-D sequence of them (one per block, a tuple)."""
    v.refuse_masked(value, "prior_scale")
    if isinstance(value, (list, tuple, np.ndarray)):
        array = np.asarray(value, dtype=object)
        if array.ndim != 1 or array.size == 0:
            raise v.ShapeError(f"prior_scale must be one number or a non-empty 1-D sequence (one prior variance per "
                               f"block of the Jacobian), got shape {array.shape}")
        return tuple(_normal_positive(x.item() if isinstance(x, np.generic) else x, f"prior_scale[{i}]")
                     for i, x in enumerate(array))
    if isinstance(value, np.generic):
        value = value.item()
    return _normal_positive(value, "prior_scale")


def _normal_positive(value: Any, name: str) -> float:
    """A positive float whose inverse (the prior precision) is finite too: subnormal variances overflow 1/s."""
    value = v.check_positive(value, name)
    if not np.finfo(np.float64).tiny <= value <= 1 / np.finfo(np.float64).tiny:
        raise v.ValueRangeError(f"{name} = {value:.3g} is outside [{np.finfo(np.float64).tiny:.3g}, "
                                f"{1 / np.finfo(np.float64).tiny:.3g}], where the prior precision 1/{name} is finite")
    return value


def _format_scale(value: float | tuple[float, ...]) -> str:
    return f"{value:.6g}" if isinstance(value, float) else "(" + ", ".join(f"{x:.6g}" for x in value) + ")"


# ----- the estimator ------------------------------------------------------------------------------------------------

class LaplaceClassifier(Estimator):
    """Laplace approximation of the linearized network for classification (categorical or Bernoulli).

    Parameters
    ----------
    prior_scale : float or sequence of float
        s > 0, the prior variance of every θ − θ̂ (kernel s·J Jᵀ); or one s_g > 0 per block of the Jacobian given to
        :meth:`fit` (``J.blocks``, one per layer: see :attr:`JacobianBlocks.param_names` and ``block_sizes``), a
        per-layer prior (weight space only).
    likelihood : {"categorical", "bernoulli"}
        Softmax over c ≥ 2 logits with integer labels in [0, c), or a sigmoid of one logit with labels 0/1 (or
        probabilities in [0, 1]).
    method : {"auto", "parameter", "function"}
        How to compute the posterior: "parameter" (weight space, p × p), "function" (n·c × n·c), or "auto": the
        smaller system. The choice and its reason are in :attr:`plan_`.
    rtol : float, optional
        Newton stops when ‖∇Ψ‖ ≤ rtol·(‖∇NLL‖ + ‖ŵ − m‖/s) (a relative balance of the two gradient terms, which
        cancel at the MAP). Default sqrt(eps) of the Jacobian's dtype (1.5e-8 float64, 3.5e-4 float32).
    maxiter : int
        Newton iterations at most (default 100); a ConvergenceWarning says when they ran out.
    cg_maxiter : int, optional
        CG iterations per Newton step at most (weight space; default 10·p).
    memory_budget : float, optional
        Bytes for the dense p × p or n·c × n·c matrices (default: half the free memory where the arrays live).
    progress : bool
        A progress bar over Newton iterations (needs tqdm).

    Attributes (after fit)
    ----------------------
    plan_ : Plan
        ``method`` and ``space`` ("parameter" or "function"), ``solver``, ``rows`` (n·c), ``p`` and ``reason``.
    fit_info_ : dict
        Newton and CG iteration counts, convergence flag, final relative gradient.
    w_map_ : array of shape (p,)
        ŵ = θ_MAP − θ̂, float64, on the Jacobian's backend.
    prior_scale_history_ : list of (float or tuple, float)
        (s, log evidence) visited by :meth:`optimize_prior_scale` (s a tuple of per-block scales when layerwise).

    Examples
    --------
    >>> J = lg.export_jacobian(model, X_train)                      # doctest: +SKIP
    >>> clf = LaplaceClassifier(prior_scale=1.0).fit(J, y_train).optimize_prior_scale()  # doctest: +SKIP
    >>> proba = clf.predict_proba(lg.export_jacobian(model, X_test))  # doctest: +SKIP
    """

    _POSTERIOR_PARAMS = ("prior_scale", "likelihood", "method")

    _KIND = "LaplaceClassifier"

    def __init__(self, prior_scale: float = 1.0, likelihood: str = "categorical", method: str = "auto", *,
                 rtol: float | None = None, maxiter: int = 100, cg_maxiter: int | None = None,
                 memory_budget: float | None = None, progress: bool = False) -> None:
        self.prior_scale = _check_prior_scale(prior_scale)
        self.likelihood = v.check_choice(likelihood, "likelihood", _LIKELIHOODS)
        self.method = v.check_choice(method, "method", LAPLACE_METHODS)
        self.rtol = None if rtol is None else v.check_positive(rtol, "rtol")
        self.maxiter = v.check_int(maxiter, "maxiter", minimum=1)
        self.cg_maxiter = None if cg_maxiter is None else v.check_int(cg_maxiter, "cg_maxiter", minimum=1)
        self.memory_budget = None if memory_budget is None else v.check_positive(memory_budget, "memory_budget")
        self.progress = v.check_bool(progress, "progress")
        self._engine: Any = None
        self._state: dict | None = None  # what prediction needs: built from the engine when first asked, or loaded
        self._signature: dict | None = None  # set by a complete fit or load: the model is fitted
        self._J_train: JacobianBlocks | None = None
        self._evidence: float | None = None
        self.prior_scale_history_: list[tuple[Any, float]] = []

    def __repr__(self) -> str:
        fitted = f", fitted: {self.plan_.method}" if self.is_fitted else ""
        return (f"LaplaceClassifier(prior_scale={_format_scale(self.prior_scale)}, likelihood={self.likelihood!r}, "
                f"method={self.method!r}{fitted})")

    # ----- fitting ---------------------------------------------------------------------------------------------
    def _lik(self) -> Likelihood:
        return as_likelihood(self.likelihood)

    def fit(self, J: JacobianBlocks, y: Any, *, prior_mean: Any = None) -> LaplaceClassifier:
        """Find the MAP of the linearized model and its Laplace posterior.

        Parameters
        ----------
        J : JacobianBlocks
            From :func:`~lingp_core.export_jacobian` at the training inputs; ``J.f0`` (n, c) are the network's
            logits (c ≥ 2 for categorical, c = 1 for Bernoulli).
        y : array of shape (n,)
            Integer labels in [0, c) (categorical) or 0/1 labels or probabilities (Bernoulli); J's backend.
        prior_mean : array of shape (p,), optional
            The prior mean m of w = θ − θ̂ (J's column order, J's backend, float32/float64). Default 0: the prior is
            centred at the trained network (the paper's GP prior, natural for adapting to new data). Pass −θ̂ (the
            network's parameters, negated) for a prior N(0, s·I) on θ itself, centred at the origin as in
            laplace-torch and Immer et al. (2021); this is the one whose evidence is informative on the data the
            network was trained on: there ∇NLL(θ̂) ≈ 0, so with m = 0 the evidence only grows as s → 0.

        Returns
        -------
        self
        """
        J = self._check_jacobian(J)
        lik = self._lik()
        y = lik.check_labels(training_pair(J, y), J.f0)
        n, c, p = J.n, J.n_outputs, J.p
        grouped = isinstance(self.prior_scale, tuple)
        if grouped and len(self.prior_scale) != len(J.block_names):
            raise v.ShapeError(f"prior_scale gives {len(self.prior_scale)} prior variances but J has "
                               f"{len(J.block_names)} blocks ({[list(b) for b in J.block_names]}, sizes "
                               f"{list(J.block_sizes)}); give one per block, or one number for all parameters")
        if prior_mean is None:
            m = J.xp.zeros(p, dtype=np.float64)
        else:
            m = checked_weight_mean(prior_mean, J)
        method, reason = self._choose(n * c, p, J.backend, grouped, is_sharded(J))
        draft = self._draft()
        for stale in ("fit_info_", "w_map_"):
            draft.__dict__.pop(stale, None)
        draft._state, draft._evidence = None, None
        draft._backend = J.backend
        draft._engine = _ENGINES[method](J, Targets(lik, y, n, c, J.backend), lik, m, self.memory_budget)
        solver = "newton-cg, cholesky of H" if method == "parameter" else "newton, cholesky of B"
        draft.plan_ = Plan(method, method, solver, 1, n * c, p, reason)
        draft.data_hash_ = fingerprint(y, J.f0, m)
        draft._J_train = J
        draft.prior_scale_history_ = []
        with float_errors_checked():
            draft._fit_at(self.prior_scale, warm=False)
        draft._signature = J.signature()  # last: the draft is fitted
        self._commit(draft)
        return self

    def _draft(self) -> LaplaceClassifier:
        """A shallow copy with a copy of the engine: refits rebind the engine's attributes, never the committed's."""
        draft = super()._draft()
        draft._engine = copy.copy(self._engine)
        draft.prior_scale_history_ = list(self.prior_scale_history_)
        for stale in ("_mixture", "mixture_scales_", "mixture_weights_", "averaging_"):  # a refit ends an average
            draft.__dict__.pop(stale, None)
        return draft

    def _choose(self, nc: int, p: int, backend: Any, grouped: bool, sharded: bool) -> tuple[str, str]:
        """The space to work in and why; MemoryBudgetError when its dense matrices do not fit the budget."""
        if grouped and self.method == "function":
            raise v.InvalidOptionError("per-block prior scales need the weight-space engine (method='parameter' or "
                                       "'auto'): the function-space kernel s·J Jᵀ takes one prior scale")
        if sharded and self.method == "function":
            raise v.InvalidOptionError("a Jacobian sharded on a Dask cluster is fitted in weight space "
                                       "(method='parameter' or 'auto'): Newton's Fisher products and the p × p "
                                       "Hessian are reductions over the shards")
        if sharded:
            method, reason = "parameter", ("sharded on a Dask cluster: weight space, Fisher products and the p × p "
                                           "Hessian reduced over the shards")
        elif self.method in ("parameter", "function"):
            method, reason = self.method, f"forced by method={self.method!r}"
        elif grouped:
            method, reason = "parameter", "per-block prior scales: the weight-space engine (the kernel takes one scale)"
        elif nc <= p:
            method, reason = "function", f"n·c = {nc} ≤ p = {p}: the n·c × n·c function-space system is the smaller one"
        else:
            method, reason = "parameter", f"p = {p} < n·c = {nc}: the p × p weight-space system is the smaller one"
        # weight space: the GGN (factored in place) and R⁻¹, p × p each; function space: K and B, n·c × n·c each
        size = p if method == "parameter" else nc
        other = "function" if method == "parameter" else "parameter"
        v.check_memory(2 * v.nbytes_of((size, size), np.float64), v.resolve_memory_budget(self.memory_budget, backend),
                       what=f"the {method}-space Laplace posterior (two {size} × {size} float64 matrices)",
                       alternative=f"use method={other!r} ({nc if other == 'function' else p} rows), or fewer "
                                   "parameters (export_jacobian's params=, e.g. the last layer)")
        return method, reason

    def _one_scale(self) -> float:
        """The prior scale of a one-scale model (function space and the one-scale search have no other)."""
        if isinstance(self.prior_scale, tuple):  # fit and optimize_prior_scale rule this out before
            raise v.InvalidOptionError(f"one prior scale expected, got per-block scales {self.prior_scale}")
        return self.prior_scale

    def _fit_at(self, scale: float | tuple[float, ...], warm: bool) -> None:
        """Refit the MAP and posterior at the prior variance ``scale``: one float, or a tuple with one per block."""
        engine = self._engine
        scales = np.atleast_1d(np.asarray(scale, dtype=np.float64))
        start = None
        if warm:
            start = engine.w if engine.method == "parameter" else engine.a
        rtol = self.rtol if self.rtol is not None else float(np.sqrt(eps(self._engine.J.dtype)))
        with progress_bar(self.maxiter, enabled=self.progress, desc="LaplaceClassifier Newton") as bar:
            info = engine.fit(scales, start, rtol, self.maxiter, self.cg_maxiter, bar)
        if not info["converged"]:
            v.warn(f"LaplaceClassifier: Newton stopped after {info['newton_iterations']} iterations with "
                   f"relative gradient {info['gradient_ratio']:.3g} > rtol {rtol:.3g}; raise maxiter or rtol",
                   v.ConvergenceWarning)
        evidence = -engine.objective - engine.half_logdet()
        if not (np.isfinite(evidence) and bool(engine.backend.xp.isfinite(engine.w).all())):
            raise v.NonFiniteError(f"the Laplace fit at prior_scale = {_format_scale(scale)} overflowed float64 "
                                   f"(evidence {evidence}): the training Jacobian or the network's logits are far too "
                                   "large for the prior scale; rescale the network's inputs or use a smaller "
                                   "prior_scale")
        self.prior_scale = scale
        self.fit_info_ = info
        self.w_map_ = engine.w
        self._state = None
        self._evidence = evidence

    # ----- evidence ----------------------------------------------------------------------------------------------
    def log_marginal_likelihood(self) -> float:
        """The Laplace approximation of log p(y | s) at the fitted prior scale (see the module docstring).

        A loaded model returns the value stored when it was saved. Also available as :meth:`log_evidence`.
        """
        self._check_posterior()
        return float(self._evidence)

    log_evidence = log_marginal_likelihood

    def optimize_prior_scale(self, *, max_iter: int = 50, tol: float = 1e-4, bounds: tuple[float, float] = (1e-8, 1e8),
                             layerwise: bool = False, hyperprior: Any = None) -> LaplaceClassifier:
        """Maximize the Laplace evidence over the prior scale s by MacKay's fixed point s = ‖ŵ − m‖² / γ.

        Each step re-solves the MAP (warm-started, preconditioned by the previous Hessian) and the posterior at the
        new s. The fixed point is where d log p(y | s) / d log s = ‖ŵ − m‖²/(2s) − γ/2 vanishes with Λ held at the MAP.
        Steps are Newton steps on φ(t) = log(‖ŵ − m‖²/γ) − t, t = log s: d‖ŵ − m‖²/dt is exact (the MAP condition
        differentiated) and dγ/dt, including the change of the curvature as the MAP moves, is a seeded Hutchinson
        estimate (128 probes); where that slope is not negative the plain update t ← log(‖ŵ − m‖²/γ) is taken. Above
        p (or n·c) = 1024, γ itself is estimated the same way until a step falls within ``tol``; the steps from then
        on, and so the stopping test, use the exact γ: the estimates only decide how many refits it takes. Steps are
        capped at a factor e² in s, the cap doubling (in log s) while successive steps hit it in one direction.

        Parameters
        ----------
        max_iter : int
            Steps at most; a ConvergenceWarning says when they ran out.
        tol : float
            Stop when |log s_new − log s| ≤ tol.
        bounds : (float, float)
            s is kept inside; hitting a bound warns (the evidence keeps rising beyond it).
        layerwise : bool
            Maximize over one prior variance per block of the Jacobian (per layer) instead of one for all: MacKay's
            fixed point per group, s_g ← ‖ŵ_g − m_g‖² / γ_g, γ_g = p_g − tr(Σ_gg)/s_g, starting from the current
            scale(s). Each step moves log s_g by a gain times the plain update φ_g = log(‖ŵ_g − m_g‖²/γ_g) − log s_g:
            gain 1 at first, then a secant estimate of Newton's from how much the last step shrank φ_g, within
            [0.25, 8] (φ_g also moves with the other groups), capped as above per group. γ_g is estimated above
            p = 1024 until all steps fall within ``tol``, exact from then on. Weight space only. A group reaching
            the lower bound is one the evidence switches off (a NumericalWarning names it). The model's
            ``prior_scale`` becomes a tuple.
        hyperprior : None, "data" or Hyperprior
            A log-normal hyperprior on s, log s ~ N(μ, w²), making the result the MAP of s rather than the evidence's
            maximum (for few labels, where the evidence alone can drive s to a bound). The fixed point becomes
            ‖ŵ − m‖²/s = γ + 2(log s − μ)/w² (the hyperprior's slope added to the evidence's). ``"data"`` (or a
            :class:`~lingp_core.Hyperprior` without ``log_prior_scale``) centres it where the prior's function-space
            variance s·mean diag(J Jᵀ) equals the spread of the network's logits about their per-class means, with
            width ``prior_scale_width`` (default 1). One prior scale only (not with ``layerwise``).

        Returns
        -------
        self
            Refit at the chosen s; the path is in :attr:`prior_scale_history_`.
        """
        self._check_refittable("optimize_prior_scale")
        max_iter = v.check_int(max_iter, "max_iter", minimum=1)
        tol = v.check_positive(tol, "tol")
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise v.ArgumentTypeError(f"bounds must be a pair (lower, upper), got {bounds!r}")
        lo, hi = (v.check_positive(b, "bounds") for b in bounds)
        if not lo < hi:
            raise v.ValueRangeError(f"bounds must satisfy lower < upper, got {bounds}")
        layerwise = v.check_bool(layerwise, "layerwise")
        hyperprior = check_hyperprior(hyperprior)
        if hyperprior is not None and layerwise:
            raise v.InvalidOptionError("hyperprior= applies to one prior scale; it is not available with "
                                       "layerwise=True")
        centre = None if hyperprior is None else self._hyperprior_centre(hyperprior)
        if layerwise and self.plan_.space != "parameter":
            raise v.InvalidOptionError("optimize_prior_scale(layerwise=True) needs the weight-space engine: fit with "
                                       "method='parameter' (the function-space kernel takes one prior scale)")
        if not layerwise and isinstance(self.prior_scale, tuple):
            raise v.InvalidOptionError(f"the model has per-block prior scales {_format_scale(self.prior_scale)}: "
                                       "optimize them with layerwise=True, or refit with one prior_scale")
        draft = self._draft()
        if layerwise:
            draft._search_layerwise(max_iter, tol, lo, hi)
        else:
            draft._search_prior_scale(max_iter, tol, lo, hi, centre)
        self._commit(draft)
        return self

    def average_prior_scale(self, *, grid_size: int = 9, span: float = 1.0, hyperprior: Any = None,
                            keep_mass: float = 1 - 1e-6) -> LaplaceClassifier:
        """Average the predictions over the prior scale s (Bayesian model averaging over s).

        A log grid of ``grid_size`` values within ±``span`` decades of the current s (e.g. after
        :meth:`optimize_prior_scale`); at each the MAP and Laplace posterior are refitted (warm-started) and weighted
        by the Laplace evidence × the hyperprior: None, uniform in log s over the grid; "data" or a Hyperprior, the
        log-normal prior of :meth:`optimize_prior_scale`. Points holding less than 1 − ``keep_mass`` of the weight
        together are dropped. Predictions are then the mixture: :meth:`predict_proba` averages the points' class
        probabilities, :meth:`predict_logits` returns the mixture's mean and (co)variance. The model is refitted at
        the heaviest point, which ``prior_scale`` and :meth:`log_evidence` report; ``averaging_`` describes the grid
        and ``mixture_scales_`` / ``mixture_weights_`` hold the kept points. A refit or an optimization ends the
        average. Each kept point keeps its posterior state (weight space p × p, function space (n·c)²), checked
        against the memory budget. One prior scale only. Like fit, it runs aside: if it fails the model is unchanged.
        """
        self._check_refittable("average_prior_scale")
        grid_size = v.check_int(grid_size, "grid_size", minimum=3)
        span = v.check_positive(span, "span")
        keep_mass = check_keep_mass(keep_mass)
        hyperprior = check_hyperprior(hyperprior)
        if isinstance(self.prior_scale, tuple):
            raise v.InvalidOptionError(f"the model has per-block prior scales {_format_scale(self.prior_scale)}: "
                                       "averaging is over one prior scale; refit with one prior_scale")
        if is_sharded(self._J_train):
            raise v.MissingCapabilityError("average_prior_scale keeps one posterior per grid point in memory; this "
                                           "model was fitted on a Jacobian sharded on a Dask cluster")
        centre = math.log(self._one_scale())
        log_s = centre + np.linspace(-span, span, grid_size) * math.log(10.0)
        if abs(log_s).max() > 700:
            raise v.ValueRangeError(f"span = {span} decades around s = {self._one_scale():.3g} leaves float64")
        if hyperprior is None:
            log_prior = np.full(grid_size, -math.log(2 * span * math.log(10.0)))
        else:
            log_prior = log_normal(log_s, *self._hyperprior_centre(hyperprior))[0]
        draft = self._draft()
        xp = draft._engine.backend.xp
        budget = v.resolve_memory_budget(self.memory_budget, draft._engine.backend)
        states, log_joint = [], np.empty(grid_size)
        for g, t in enumerate(log_s):
            draft._fit_at(math.exp(t), warm=True)
            log_joint[g] = draft._evidence + log_prior[g]
            states.append({k: xp.array(a, copy=True) for k, a in draft._prediction_state().items()})
            if g == 0:
                v.check_memory(grid_size * sum(int(a.nbytes) for a in states[0].values()), budget,
                               what=f"{grid_size} posterior states for averaging over s",
                               alternative="use a smaller grid_size")
        kept, weights = posterior_weights(log_joint, np.zeros(grid_size), keep_mass)
        top = int(np.argmax(log_joint))  # the heaviest point is always kept
        draft._fit_at(math.exp(log_s[top]), warm=True)
        draft._mixture = [states[g] for g in kept]
        draft.mixture_scales_, draft.mixture_weights_ = np.exp(log_s[kept]), weights
        edge = float(weights[(kept == 0) | (kept == grid_size - 1)].sum())
        draft.averaging_ = {"grid_size": grid_size, "span_decades": span, "centre": math.exp(centre),
                            "points_kept": int(kept.size), "weight_on_grid_edge": edge,
                            "log_evidence": [float(x) for x in log_joint - log_prior]}
        if edge > 0.01:  # warned before the commit: a warning raised as an error leaves the model unchanged
            v.warn(f"{edge:.1%} of the posterior of s lies on the edge of the averaging grid (±{span} decades "
                   f"around s = {math.exp(centre):.3g}): widen span", v.NumericalWarning)
        self._commit(draft)
        return self

    def _check_refittable(self, what: str) -> None:
        """NotFittedError unless the model holds its training data (a fit, not a load): ``what`` refits on them."""
        self._check_fitted()
        if self._engine is None:
            raise NotFittedError(f"{what} refits on the training data, which a loaded model does not keep: call "
                                 "fit(J, y) first")

    def _hyperprior_centre(self, hyperprior: Any) -> tuple[float, float]:
        """(μ, w) of the log-normal hyperprior on s: its centre, from the data when not given, and width."""
        if hyperprior.log_prior_scale is not None:
            return hyperprior.log_prior_scale, hyperprior.prior_scale_width
        J = self._J_train
        f0 = J.backend.to_numpy(J.f0).astype(np.float64)
        spread = float(((f0 - f0.mean(axis=0)) ** 2).mean())
        diag = float(J.backend.to_numpy(kernel_diag(J, output_mode="full")).mean())
        if not (spread > 0 and diag > 0):
            raise v.ValueRangeError(f"hyperprior='data' centres s where s·mean diag(J Jᵀ) matches the spread of the "
                                    f"network's logits, but the spread is {spread:.3g} and the mean diagonal "
                                    f"{diag:.3g}: give the centre (Hyperprior(log_prior_scale=...))")
        return math.log(spread / diag), hyperprior.prior_scale_width

    def _search_prior_scale(self, max_iter: int, tol: float, lo: float, hi: float,
                            centre: tuple[float, float] | None = None) -> None:
        """optimize_prior_scale's steps, on a draft; ``centre`` (μ, w): a log-normal hyperprior on s."""
        engine = self._engine
        t = math.log(self._one_scale())
        self.prior_scale_history_ = [(self.prior_scale, self.log_evidence())]
        cap, capped = _LOG_STEP_CAP, 0  # capped: the direction of the last step if the cap cut it, else 0
        # the exact γ costs a triangular inverse (dimension³/3 flops): above _EXACT_TRACE_MAX the steps use
        # Hutchinson's estimate until one is within tol, and every step from then on uses the exact γ
        exact = engine.dimension <= _EXACT_TRACE_MAX
        for _ in range(max_iter):
            slopes = (engine.sq_norm_w_slope(), engine.effective_parameters_slope())  # once per fit
            step = _newton_step(engine, t, engine.effective_parameters(exact), slopes, lo, hi, centre)
            if abs(step) <= tol and not exact:
                exact = True
                step = _newton_step(engine, t, engine.effective_parameters(exact), slopes, lo, hi, centre)
            direction = 1 if step > 0 else -1
            # a long way to go in one direction (e.g. towards a bound): double the cap while steps keep hitting it
            cap = 2 * cap if capped == direction else _LOG_STEP_CAP
            capped = direction if abs(step) > cap else 0
            step = direction * min(abs(step), cap)
            t_new = min(math.log(hi), max(math.log(lo), t + step))
            if abs(t_new - t) <= tol:
                break
            t = t_new
            self._fit_at(math.exp(t), warm=True)
            self.prior_scale_history_.append((self.prior_scale, self.log_evidence()))
        else:
            v.warn(f"optimize_prior_scale: no fixed point within {max_iter} steps (last s = "
                   f"{self.prior_scale:.6g}); raise max_iter", v.ConvergenceWarning)
        if t <= math.log(lo) + 1e-12 or t >= math.log(hi) - 1e-12:
            v.warn(f"optimize_prior_scale: s reached the bound {math.exp(t):.3g}; the evidence keeps rising "
                   "beyond it", v.NumericalWarning)

    def _search_layerwise(self, max_iter: int, tol: float, lo: float, hi: float) -> None:
        """optimize_prior_scale(layerwise=True)'s steps, on a draft (see its docstring)."""
        engine = self._engine
        G = len(engine.blocks)
        if not isinstance(self.prior_scale, tuple):  # one scale for all = the same value for every block: no refit
            self.prior_scale = (self.prior_scale,) * G
            engine.set_prior(np.asarray(self.prior_scale))
        t = np.log(np.asarray(self.prior_scale))
        self.prior_scale_history_ = [(self.prior_scale, self.log_evidence())]
        bounds = (math.log(lo), math.log(hi))
        exact = engine.dimension <= _EXACT_TRACE_MAX
        steps = _GroupSteps(G)
        for _ in range(max_iter):
            phi = _fixed_point_gap(engine, t, exact, bounds)
            steps.learn(phi)
            if np.abs(steps.propose(t, phi, bounds)).max() <= tol and not exact:
                exact = True  # the steps from here on, and the stopping test, use the exact γ_g
                steps.forget()  # a secant through an estimated and an exact φ would be noise
                phi = _fixed_point_gap(engine, t, exact, bounds)
                steps.learn(phi)
            t_new = np.clip(t + steps.take(t, phi, bounds), *bounds)
            if np.abs(t_new - t).max() <= tol:
                break
            t = t_new
            scales = np.where(t <= bounds[0], lo, np.where(t >= bounds[1], hi, np.exp(t)))  # a bound exactly
            self._fit_at(tuple(float(x) for x in scales), warm=True)
            self.prior_scale_history_.append((self.prior_scale, self.log_evidence()))
        else:
            v.warn(f"optimize_prior_scale: no per-block fixed point within {max_iter} steps (last s = "
                   f"{_format_scale(self.prior_scale)}); raise max_iter", v.ConvergenceWarning)
        names = [list(b) for b in engine.J.block_names]
        off = [names[g] for g in range(G) if t[g] <= bounds[0] + 1e-12]
        up = [names[g] for g in range(G) if t[g] >= bounds[1] - 1e-12]
        if off:
            v.warn(f"optimize_prior_scale(layerwise=True): the prior variance of {off} reached the lower bound "
                   f"{lo:.3g}: the evidence keeps rising below it, it switches those parameters off (they stay "
                   "at the prior mean)", v.NumericalWarning)
        if up:
            v.warn(f"optimize_prior_scale(layerwise=True): the prior variance of {up} reached the upper bound "
                   f"{hi:.3g}; the evidence keeps rising beyond it", v.NumericalWarning)

    # ----- prediction --------------------------------------------------------------------------------------------
    def _prediction_state(self) -> dict:
        """The fitted state's arrays (parameter space: ŵ and R⁻¹, computed on first use)."""
        if self._state is None:
            self._state = self._engine.state()
        return self._state

    def predict_logits(self, J_star: JacobianBlocks, *, return_var: bool | str = False) -> Any:
        """Posterior predictive mean of the logits and, optionally, their covariance per example.

        Parameters
        ----------
        J_star : JacobianBlocks
            Exported at the test inputs with the same parameters, outputs and dtype as the training Jacobian.
        return_var : bool or {"diag", "full"}
            False: the mean only. True or "diag": also the variances (n*, c). "full": also the c × c covariance of
            each example's logits (n*, c, c).

        Returns
        -------
        mean : array of shape (n*, c), float64, on J_star's backend
        var : array of shape (n*, c) or (n*, c, c), float64 (with ``return_var``)
        """
        if not any(return_var is option or (isinstance(return_var, str) and return_var == option)
                   for option in (False, True, "diag", "full")):
            raise v.InvalidOptionError(f"return_var must be False, True, 'diag' or 'full'; got {return_var!r}")
        J_star = self._check_star(J_star)
        cov = None if return_var is False else ("full" if return_var == "full" else "diag")
        parts = [self._checked_logits(state, scale, J_star, cov) for _, scale, state in self._components()]
        mean, var = parts[0] if len(parts) == 1 else _mixture_logits(parts, self.mixture_weights_, cov)
        return mean if cov is None else (mean, var)

    def _checked_logits(self, state: dict, scale: float | None, J_star: JacobianBlocks, cov: str | None) -> tuple:
        """One posterior's logits at J_star (mean, var or None), NaN/Inf refused, variances clamped at 0."""
        with float_errors_checked():
            mean, var = self._component_logits(state, scale, J_star, cov)
        xp = J_star.xp
        if not (bool(xp.isfinite(mean).all()) and (var is None or bool(xp.isfinite(var).all()))):
            raise v.NonFiniteError("the predicted logits at J_star overflow float64 (NaN/Inf) although J_star is "
                                   "finite: the test inputs are far outside the training range or the exported "
                                   "Jacobian is far too large; rescale the inputs")
        return mean, None if var is None else self._clamp(var, cov)

    def _components(self) -> list[tuple[float, float | None, dict]]:
        """(weight, s, state) of each point of an average over s, or of the one fitted posterior (s None: the
        model's)."""
        mixture = getattr(self, "_mixture", None)
        if mixture is None:
            return [(1.0, None, self._prediction_state())]
        return [(float(w), float(s), state) for w, s, state in zip(self.mixture_weights_, self.mixture_scales_,
                                                                    mixture)]

    def _component_logits(self, state: dict, scale: float | None, J_star: JacobianBlocks, cov: str | None) -> tuple:
        if self.plan_.space == "parameter":
            return predict_weight(state, J_star, cov)
        return predict_function(state, self._J_train, J_star, self._one_scale() if scale is None else scale, cov,
                                self.memory_budget)

    @staticmethod
    def _clamp(var: Any, cov: str) -> Any:
        """Rounding can leave variances slightly below 0 where the posterior is tight: clamp those at 0."""
        xp = v.backend_of(var).xp
        if cov == "diag":
            return xp.maximum(var, 0.0)
        c = var.shape[1]
        idx = np.arange(c)
        var[:, idx, idx] = xp.maximum(var[:, idx, idx], 0.0)
        return var

    def predict_proba(self, J_star: JacobianBlocks, *, method: str = "probit", n_samples: int = 1000,
                      seed: int = 0) -> Any:
        """Predictive class probabilities.

        Parameters
        ----------
        J_star : JacobianBlocks
            As in :meth:`predict_logits`.
        method : {"probit", "mc"}
            "probit": softmax_k(μ_k / √(1 + π σ²_k / 8)) (sigmoid for Bernoulli), from the logit variances;
            "mc": the average of softmax (sigmoid) over ``n_samples`` logit vectors drawn from N(μ_i, Σ_i) per example
            (full c × c covariance), with standard normals from ``seed`` (the same on every backend).
        n_samples, seed : int
            For "mc".

        Returns
        -------
        array of shape (n*, c), float64, rows summing to 1
            For Bernoulli (c = 1) the shape is (n*, 2): [P(y = 0), P(y = 1)], as scikit-learn's ``predict_proba``.
        """
        v.check_choice(method, "method", PREDICTIVE_METHODS)
        n_samples = v.check_int(n_samples, "n_samples", minimum=1)
        seed = v.check_int(seed, "seed", minimum=0)
        lik = self._lik()
        J_star = self._check_star(J_star)
        cov = "diag" if method == "probit" else "full"
        proba = 0.0  # an average over s: the points' probabilities, weighted
        for weight, scale, state in self._components():
            mean, var = self._checked_logits(state, scale, J_star, cov)
            if method == "probit":
                part = lik.mean(mean / v.backend_of(mean).xp.sqrt(1.0 + (math.pi / 8.0) * var))
            else:
                part = _monte_carlo(mean, var, lik, n_samples, seed)
            proba = proba + weight * part
        return lik.class_probabilities(proba)

    # ----- persistence -------------------------------------------------------------------------------------------
    def _archive(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Parameter space: ŵ (p,) and the inverse R⁻¹ of H's Cholesky factor (p, p). Function space: the
        representer weights a (n·c,), the curvature factors L (n, c, c), the Cholesky factor of B (n·c, n·c), the
        prior mean, ŵ and the training Jacobian blocks (the kernel with test points needs them). Plus the
        hyperparameters and their hash, the parameter signature, a fingerprint of the training labels and logits
        (:attr:`data_hash_`), the evidence and the format version; no training labels."""
        arrays = {f"state_{k}": a for k, a in self._prediction_state().items()}
        if "state_w" not in arrays:  # weight space already stores ŵ as its state
            arrays["w_map"] = self.w_map_
        hyper = {"prior_scale": self.prior_scale, "likelihood": self.likelihood}
        config = {**hyper, "settings": {"method": self.method, "rtol": self.rtol, "maxiter": self.maxiter,
                                        "cg_maxiter": self.cg_maxiter, "memory_budget": self.memory_budget},
                  "plan": {**self.plan_.__dict__}, "signature": self._signature, "data_hash": self.data_hash_,
                  "hyper_hash": fingerprint_json(hyper), "log_evidence": self._evidence, "fit_info": self.fit_info_,
                  "jacobian": None}
        if self.plan_.space == "function":
            J_arrays, config["jacobian"] = jacobian_to_arrays(self._J_train)
            arrays.update(J_arrays)
        mixture = getattr(self, "_mixture", None)
        if mixture is not None:  # an average over s: every kept point's state, its s and weight
            for g, state in enumerate(mixture):
                arrays.update({f"point{g}_state_{k}": a for k, a in state.items()})
            arrays.update({"mixture_scales": self.mixture_scales_, "mixture_weights": self.mixture_weights_})
            config["averaging"] = {"points": len(mixture), "summary": self.averaging_}
        return arrays, config

    @classmethod
    def _check_archive_config(cls, config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
        p_sig, c = archived_signature(config["signature"])
        likelihood = v.check_choice(config["likelihood"], "likelihood", _LIKELIHOODS)
        if likelihood == "bernoulli" and c != 1:
            raise ArchiveError(f"the saved likelihood is Bernoulli (one logit per example) but the signature has {c} "
                               "outputs; the file was modified")
        plan = config["plan"]
        rows, p = archived_count(plan["rows"], "plan.rows"), archived_count(plan["p"], "plan.p", minimum=0)
        if p != p_sig or rows % c:
            raise ArchiveError(f"the saved plan's {rows} rows and {p} parameters do not fit the signature's {c} "
                               f"outputs per example and {p_sig} parameters; the file was modified")
        space = plan["space"]
        if space not in _ENGINES or plan["method"] != space or plan["tasks"] != 1:
            raise ArchiveError(f"the saved plan's method {plan['method']!r:.40}, space {space!r:.40} and tasks "
                               f"{plan['tasks']!r:.40} are not those of a fit ('parameter' or 'function', one task); "
                               "the file was modified")
        if (config["jacobian"] is not None) != (space == "function"):
            raise ArchiveError(f"the saved plan is {space}-space but the saved 'jacobian' is "
                               f"{'null' if config['jacobian'] is None else 'present'}: a function-space model "
                               "predicts through its training Jacobian, a parameter-space one keeps none; the file was "
                               "modified")
        if "averaging" in config:
            archived_length(archived_count(config["averaging"]["points"], "averaging.points"), "averaging.points",
                            shapes, "mixture_weights")
        scales = config["prior_scale"]
        if isinstance(scales, list):  # per-block scales: weight space only, one per block of the signature
            blocks = len(config["signature"]["blocks"])
            if config["plan"]["space"] != "parameter" or len(scales) != blocks:
                raise ArchiveError(f"the saved prior_scale has {len(scales)} per-block values for a "
                                   f"{config['plan']['space']}-space fit of {blocks} blocks (per-block scales need "
                                   "weight space and one value per block); the file was modified")

    @classmethod
    def _expected_arrays(cls, config: dict[str, Any]) -> dict[str, Any]:
        nc, p = config["plan"]["rows"], config["plan"]["p"]
        c = len(config["signature"]["outputs"])  # 1 for Bernoulli
        if config["plan"]["space"] == "parameter":
            state = {"w": (p,), "inverse_factor": (p, p)}
            expected: dict[str, Any] = {}
        else:
            state = {"a": (nc,), "factors": (nc // c, c, c), "factor": (nc, nc), "prior_mean": (p,)}
            expected = {"w_map": ((p,), FLOAT64),
                        "J_f0": ((nc // c, c), (np.dtype(config["signature"]["dtype"]),))}
        expected.update({f"state_{k}": (shape, FLOAT64) for k, shape in state.items()})
        if "averaging" in config:
            points = config["averaging"]["points"]
            expected.update({"mixture_scales": ((points,), FLOAT64), "mixture_weights": ((points,), FLOAT64)})
            expected.update({f"point{g}_state_{k}": (shape, FLOAT64) for g in range(points)
                             for k, shape in state.items()})
        return expected

    @classmethod
    def _from_archive(cls, arrays: dict[str, np.ndarray], config: dict[str, Any], be: Any) -> LaplaceClassifier:
        model = cls(config["prior_scale"], config["likelihood"], **config["settings"])
        model.plan_, model._backend = Plan(**config["plan"]), be
        model.data_hash_, model.fit_info_ = config["data_hash"], config["fit_info"]
        model._evidence = archived_number(config["log_evidence"], "log_evidence")
        factor = "inverse_factor" if model.plan_.space == "parameter" else "factor"  # R⁻¹, or B's Cholesky factor
        for name in arrays:
            if name == f"state_{factor}" or (name.startswith("point") and name.endswith(f"_state_{factor}")):
                check_triangular_factor(arrays, name)
        model._state = {k[len("state_"):]: be.asarray(a) for k, a in arrays.items() if k.startswith("state_")}
        model.w_map_ = model._state["w"] if "w" in model._state else be.asarray(arrays["w_map"])
        if config["jacobian"] is not None:
            model._J_train = jacobian_from_archive(arrays, config["jacobian"], be)
            check_same_parameters(model._J_train, config["signature"])
            if model._J_train.n * model._J_train.n_outputs != model.plan_.rows:
                raise ArchiveError(f"the saved training Jacobian has {model._J_train.n} × {model._J_train.n_outputs} "
                                   f"rows, the saved plan {model.plan_.rows}; the file was modified")
        if "averaging" in config:
            scales = np.asarray(arrays["mixture_scales"], dtype=np.float64)
            weights = np.asarray(arrays["mixture_weights"], dtype=np.float64)
            if not (np.isfinite(scales).all() and (scales > 0).all() and (weights >= 0).all()
                    and np.isclose(weights.sum(), 1.0, rtol=1e-9)):
                raise ArchiveError("the saved average over s is not valid (scales finite and > 0, weights ≥ 0 "
                                   "summing to 1); the file was modified")
            model._mixture = [{k[len(f"point{g}_state_"):]: be.asarray(a) for k, a in arrays.items()
                               if k.startswith(f"point{g}_state_")} for g in range(scales.size)]
            model.mixture_scales_, model.mixture_weights_ = scales, weights
            model.averaging_ = config["averaging"]["summary"]
        model._signature = config["signature"]
        return model


_ENGINES = {"parameter": WeightEngine, "function": FunctionEngine}


def _mixture_logits(parts: list[tuple], weights: np.ndarray, cov: str | None) -> tuple:
    """Mean Σ w m_g and (co)variance Σ w (C_g + (m_g − mean)(m_g − mean)ᵀ) per example of a mixture of Gaussian
    logits ``parts`` = [(mean (n*, c), var (n*, c) or cov (n*, c, c) or None)]."""
    mean = sum(w * m for w, (m, _) in zip(weights, parts))
    if cov is None:
        return mean, None
    spread = 0.0
    for w, (m, var) in zip(weights, parts):
        d = m - mean
        spread = spread + w * (var + (d * d if cov == "diag" else d[:, :, None] * d[:, None, :]))
    return mean, spread


def _newton_step(engine: Any, t: float, gamma: float, slopes: tuple[float, float], lo: float, hi: float,
                 centre: tuple[float, float] | None = None) -> float:
    """The step in t = log s towards MacKay's fixed point φ(t) = log(‖ŵ − m‖²/γ) − t = 0, given γ and
    (d‖ŵ − m‖²/dt, dγ/dt): Newton's −φ/φ' where φ' < 0 (a stable fixed point), else φ itself (the plain update
    s ← ‖ŵ − m‖²/γ); towards a bound when γ or ‖ŵ − m‖² vanish. A log-normal hyperprior ``centre`` = (μ, w) adds
    its slope: γ is replaced by γ + 2(t − μ)/w² (and dγ/dt by dγ/dt + 2/w²); where that is ≤ 0 the hyperprior
    alone pushes s up."""
    sq = engine.sq_norm_w()
    gamma_slope = slopes[1]
    if centre is not None:
        gamma, gamma_slope = gamma + 2 * (t - centre[0]) / centre[1] ** 2, gamma_slope + 2 / centre[1] ** 2
    if gamma <= 0 or sq <= 0:
        return (math.log(lo) if sq <= 0 and centre is None else math.log(hi)) - t
    phi = math.log(sq / gamma) - t
    slope = slopes[0] / sq - gamma_slope / gamma - 1.0
    return -phi / slope if slope < 0 else phi


def _fixed_point_gap(engine: Any, t: np.ndarray, exact: bool, bounds: tuple[float, float]) -> np.ndarray:
    """φ_g = log(‖ŵ_g − m_g‖²/γ_g) − t_g per group; where γ_g or ‖ŵ_g − m_g‖² vanish, the way to the bound that the
    update heads for (γ_g ≤ 0: the upper; no movement from the prior mean: the lower)."""
    sq, gamma = engine.group_sq_norms(), engine.group_effective_parameters(exact)
    phi = np.empty_like(t)
    for g in range(len(t)):
        if gamma[g] <= 0 or sq[g] <= 0:
            phi[g] = (bounds[0] if sq[g] <= 0 else bounds[1]) - t[g]
        else:
            phi[g] = math.log(sq[g] / gamma[g]) - t[g]
    return phi


class _GroupSteps:
    """Steps in t = log s (one per group) towards φ(t) = 0 (see optimize_prior_scale): gain_g × φ_g, the plain
    MacKay update (gain 1 at first) scaled by a secant estimate: a step of gain a that took φ_g to r·φ_g says
    φ_g' ≈ (r − 1)/a, so Newton's gain is a/(1 − r), kept within [_MIN_GAIN, _MAX_GAIN] (r ≥ 1, no fixed point
    ahead: the largest; φ_g also moves with the other groups, so the estimate is rough: hence the limits). Caps
    double per group while successive steps hit them in one direction; a group held at a bound that its step
    points beyond stays there."""

    def __init__(self, G: int) -> None:
        self.cap = np.full(G, _LOG_STEP_CAP)
        self.capped = np.zeros(G)  # direction of the last step if the cap cut it, else 0
        self.forget()

    def forget(self) -> None:
        """Back to the plain update (after γ switches from estimated to exact: φ's history would mislead)."""
        self.gain = np.ones(len(self.cap))
        self.previous: np.ndarray | None = None  # φ where the last step was taken
        self.moved = np.zeros(len(self.cap), dtype=bool)  # whether that step moved the group (uncapped: a secant)

    def learn(self, phi: np.ndarray) -> None:
        """Update the gains from φ at the new point and remember it."""
        if self.previous is not None:
            for g, (new, old) in enumerate(zip(phi, self.previous)):
                if old != 0 and self.moved[g]:
                    ratio = new / old
                    self.gain[g] = _MAX_GAIN if ratio >= 1 else min(_MAX_GAIN, max(_MIN_GAIN,
                                                                                   self.gain[g] / (1 - ratio)))
        self.previous = phi.copy()

    def propose(self, t: np.ndarray, phi: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
        """The uncapped steps gain × φ, 0 for a group held at a bound that its step points beyond."""
        held = ((t <= bounds[0]) & (phi < 0)) | ((t >= bounds[1]) & (phi > 0))
        return np.where(held, 0.0, self.gain * phi)

    def take(self, t: np.ndarray, phi: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
        """The capped steps, updating the caps."""
        step = self.propose(t, phi, bounds)
        direction = np.sign(step)
        self.cap = np.where((direction != 0) & (self.capped == direction), 2 * self.cap, _LOG_STEP_CAP)
        self.capped = np.where(np.abs(step) > self.cap, direction, 0.0)
        step = direction * np.minimum(np.abs(step), self.cap)
        self.moved = (step != 0) & (self.capped == 0) & (np.clip(t + step, *bounds) == t + step)
        return step


def _monte_carlo(mean: Any, cov: Any, likelihood: Likelihood, n_samples: int, seed: int) -> Any:
    """Average of softmax/sigmoid over logits μ_i + S_i z, S_i S_iᵀ = Σ_i (eigen square root, PSD-safe)."""
    be = v.backend_of(mean)
    xp = be.xp
    n, c = mean.shape
    values, vectors = xp.linalg.eigh(cov)
    root = vectors * xp.sqrt(xp.maximum(values, 0.0))[:, None, :]  # (n, c, c)
    rng = np.random.default_rng(seed)
    total = xp.zeros((n, c), dtype=np.float64)
    for rows in chunks(n_samples, WORK_ELEMENTS // max(1, n * c)):
        # drawn chunk by chunk from one generator: the same stream as one big draw, in bounded memory
        z = be.asarray(rng.standard_normal((rows.stop - rows.start, n, c)))
        logits = mean[None] + xp.einsum("ikl,sil->sik", root, z)
        total += likelihood.mean(logits.reshape(-1, c)).reshape(rows.stop - rows.start, n, c).sum(axis=0)
    return total / n_samples
