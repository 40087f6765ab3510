"""LinearizedGP: Gaussian-process regression with a network's Jacobian kernel k(x, x') = s · J(x) J(x')ᵀ.

The prior mean is the network itself (``mean="network"``, f₀), zero or a constant per output; s (``prior_scale``) is
the prior variance of θ − θ̂ and σ² (``noise``) the Gaussian noise variance, one for all outputs or one per output.
Output modes: ``"full"`` (one GP over all n·c outputs with the cross-output kernel blocks), ``"independent"`` (one
GP per output with K_k = s · J_k J_kᵀ), ``"trace"`` (every output with the shared kernel, the mean over outputs).

Methods (``method=``), all in float64 and all exact except "iterative":

- ``"function-cholesky"``: factor s·K + σ²I (n·c × n·c); ``"function-spectral"``: one eigendecomposition of K, then
  any (s, σ²) in O(n·c) — what :meth:`LinearizedGP.optimize_hyperparameters` runs on;
- ``"parameter-cholesky"`` / ``"parameter-spectral"``: the same in weight space with the p × p matrix Jᵀ J, for p < n·c;
- ``"iterative"``: matrix-free, CG with a pivoted-Cholesky preconditioner, Lanczos (LOVE) or CG variances, SLQ
  log-determinant, in the Jacobian's dtype;
- ``"cholesky"`` / ``"spectral"`` pick the smaller space; ``"auto"`` picks space and solver by size and memory and
  says why in :attr:`LinearizedGP.plan_`.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

import backends
from lingp_core import _averaging as averaging
from lingp_core import _hyperparameters as hyper
from lingp_core import _plan, io
from lingp_core import _posterior as post
from lingp_core import _validate as v
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
from lingp_core._layout import OUTPUT_MODES, OutputLayout, Task, per_observation
from lingp_core._plan import Plan
from lingp_core.jacobian import J_times_float64, JacobianBlocks
from lingp_core.kernels import kernel_diag
from lingp_core.likelihoods import check_noise
from lingp_core.sharded import is_sharded, training_pair

__all__ = ["GP_METHODS", "MEANS", "LinearizedGP", "Plan"]

GP_METHODS = ("auto", "cholesky", "spectral", "function-cholesky", "function-spectral", "parameter-cholesky",
              "parameter-spectral", "iterative")
MEANS = ("network", "zero", "constant")
#: kernel_dtype="float32": warn when the estimated relative error of the posterior exceeds this
FLOAT32_KERNEL_WARN = 1e-2
#: The float32 kernel's error estimate is 2·u₃₂·s·λmax/σ² times this. In 150 measured problems (n = 200–800, p = 3n;
#: rows i.i.d., with a large common component of either sign, with decaying columns or of low rank; σ² = 1e-3–1e-1)
#: the posterior's relative error exceeded 2·u₃₂·s·λmax/σ² in 28: the variances' by up to 1.4×, the means' by up to
#: 2.6× with decaying columns and 6× where rows share a large common component and the predicted means cancel. Twice
#: it covers all but 5, whose errors were all below 6e-3 (under FLOAT32_KERNEL_WARN)
FLOAT32_KERNEL_SAFETY = 2.0


class LinearizedGP(Estimator):
    """GP regression with the Jacobian kernel of a trained network (the linearized network's posterior).

    Parameters
    ----------
    prior_scale : float
        s > 0, the prior variance of θ − θ̂; the kernel is s · J Jᵀ.
    noise : float, or array_like of shape (c,) or (n, c)
        σ² > 0, the noise variance: one for all outputs, one per output, or one per observation (fixed
        heteroscedastic noise, e.g. from :class:`~lingp_core.DirichletClassifier`; fitted by a Cholesky method, and
        :meth:`optimize_hyperparameters` then fits s alone).
    mean : {"network", "zero", "constant"}
        Prior mean: the network outputs f₀ (default), zero, or per-output means of the training targets.
    output_mode : {"full", "independent", "trace"}
        How outputs share the kernel (module docstring).
    method : str
        One of :data:`GP_METHODS` (module docstring); default "auto".
    rtol, maxiter : optional
        CG tolerance (default sqrt(eps) of the Jacobian's dtype) and iteration cap, for "iterative".
    preconditioner_rank, variance_rank, variance_cg_max, num_probes : int
        "iterative": pivoted-Cholesky rank, Lanczos steps of the variance cache, test sets of at most this many rows
        get exact CG variances instead, SLQ probes for the log marginal likelihood.
    exact_max_rows : int, optional
        A cap on the rows "auto" factors exactly (default None: whatever fits the memory budget); larger problems go
        iterative.
    kernel_dtype : {"float64", "float32"}
        Accumulation dtype of the function-space kernels (default float64: the exact kernel of the exported
        Jacobian). "float32" halves the kernel's time and memory and adds ~1e-6 relative error to its entries;
        factorizations stay float64.
    memory_budget : float, optional
        Bytes allowed for kernels and factors (default: half the host's free memory on NumPy, 95% of the device's on
        CuPy; ``plan_`` states the budget it planned with). For a Jacobian sharded on a Dask cluster it bounds both
        the exact path's tiles on the cluster (default: half of the workers' reported memory) and the client's
        vectors.
    seed : int
        Seed of Lanczos start vectors and SLQ probes.
    progress : bool
        Show tqdm progress bars over the kernel's tiles (function-space methods) and the CG iterations of "iterative"
        (needs tqdm). Not saved with the model.

    Attributes (after fit)
    ----------------------
    plan_ : Plan
        The method chosen and why.
    n_, c_, p_ : int
        Training examples, outputs, parameters.
    """

    _POSTERIOR_PARAMS = ("prior_scale", "noise", "mean", "output_mode", "method", "kernel_dtype")

    def __init__(self, prior_scale: float = 1.0, noise: Any = 1e-2, *, mean: str = "network",
                 output_mode: str = "full", method: str = "auto", rtol: float | None = None,
                 maxiter: int | None = None, preconditioner_rank: int = 100, variance_rank: int = 200,
                 variance_cg_max: int = 256, num_probes: int = 30, exact_max_rows: int | None = None,
                 kernel_dtype: Any = "float64", memory_budget: float | None = None, seed: int = 0,
                 progress: bool = False) -> None:
        self.prior_scale = v.check_positive(prior_scale, "prior_scale")
        if not _NORMAL_SCALE <= self.prior_scale <= 1 / _NORMAL_SCALE:  # s, 1/s and s·K must stay normal numbers
            raise v.ValueRangeError(f"prior_scale = {self.prior_scale:.3g} is outside [{_NORMAL_SCALE:.0e}, "
                                    f"{1 / _NORMAL_SCALE:.0e}], where s, 1/s and s·K stay ordinary float64 numbers: "
                                    "rescale the targets or the network's outputs instead")
        self.noise = check_noise(noise, per_observation=True)
        self.mean = v.check_choice(mean, "mean", MEANS)
        self.output_mode = v.check_choice(output_mode, "output_mode", OUTPUT_MODES)
        self.method = v.check_choice(method, "method", GP_METHODS)
        self.rtol = None if rtol is None else v.check_positive(rtol, "rtol")
        self.maxiter = None if maxiter is None else v.check_int(maxiter, "maxiter", minimum=1)
        self.preconditioner_rank = v.check_int(preconditioner_rank, "preconditioner_rank", minimum=1)
        self.variance_rank = v.check_int(variance_rank, "variance_rank", minimum=1)
        self.variance_cg_max = v.check_int(variance_cg_max, "variance_cg_max", minimum=0)
        self.num_probes = v.check_int(num_probes, "num_probes", minimum=2)
        self.exact_max_rows = None if exact_max_rows is None else v.check_int(exact_max_rows, "exact_max_rows",
                                                                              minimum=1)
        self.kernel_dtype = _kernel_dtype_name(kernel_dtype)
        self.memory_budget = None if memory_budget is None else v.check_positive(memory_budget, "memory_budget")
        self.seed = v.check_int(seed, "seed", minimum=0)
        self.progress = v.check_bool(progress, "progress")
        self._engines: list[Any] | None = None
        self._signature: dict[str, Any] | None = None  # set by a complete fit or load: the model is fitted

    _KIND = "LinearizedGP"

    def __repr__(self) -> str:
        noise = _noise_summary(self.noise)
        fitted = f", plan={self.plan_.method!r}" if self.is_fitted else ""
        return (f"LinearizedGP(prior_scale={self.prior_scale:.4g}, noise={noise}, mean={self.mean!r}, "
                f"output_mode={self.output_mode!r}, method={self.method!r}{fitted})")

    # ----- fitting -------------------------------------------------------------------------------------------------
    def fit(self, J: JacobianBlocks, y: Any, *, prior_mean: Any = None) -> LinearizedGP:
        """Condition on targets y at the training inputs.

        The new posterior is built aside and replaces the old one only when complete: a fit that fails or is
        interrupted leaves the model as it was.

        Parameters
        ----------
        J : JacobianBlocks
            The network's Jacobian at the n training inputs (:func:`lingp_core.export_jacobian`); J.f0 (n, c) is the
            prior mean when mean="network".
        y : array of shape (n, c), or (n,) when c = 1
            Float targets on J's backend (computed in float64).
        prior_mean : array of shape (p,), optional
            The prior mean m of w = θ − θ̂ (J's column order, J's backend, float32/float64), which adds J(x)·m to the
            prior mean function. Default 0: the prior is centred at the trained network, natural for adapting it to
            new data. J·m is computed in J's dtype. With ``mean="constant"`` the constant is the targets' mean (not
            that of y − J·m). Pass −θ̂ (the network's parameters, negated) for a prior N(0, s·I) on θ itself, as in
            laplace-torch and Immer et al. (2021): the one to use on the network's own training data, where the
            residuals are noise and with m = 0 the evidence sends s towards 0 (bands that vanish), while with m = −θ̂
            s must also explain the weights.

        Returns
        -------
        self
        """
        J = self._check_jacobian(J)
        be = J.backend
        n, c = J.n, J.n_outputs
        y = v.as_float_array(training_pair(J, y), "y", be, ndim=(1, 2))
        if y.ndim == 1:
            if c != 1:
                raise v.ShapeError(f"y has shape {tuple(y.shape)} but J has c = {c} outputs per example; y must be "
                                   f"(n, c) = {(n, c)}")
            y = y[:, None]
        v.check_shape(y, "y", (n, c))
        if per_observation(self.noise) and self.noise.shape != (n, c):
            raise v.ShapeError(f"noise has shape {self.noise.shape} (one variance per observation) but J and y have "
                               f"(n, c) = {(n, c)}")
        if not isinstance(self.noise, float) and self.noise.ndim == 1 and self.noise.size != c:
            raise v.ShapeError(f"noise has {self.noise.size} per-output variances but J has c = {c} outputs")
        weight_mean = None if prior_mean is None else checked_weight_mean(prior_mean, J)
        draft = self._draft()
        with float_errors_checked():
            draft._condition(J, y.astype(np.float64), weight_mean)
        self._warn_and_commit(draft)
        return self

    def _condition(self, J: JacobianBlocks, y: Any, weight_mean: Any = None) -> None:
        """Fit this (draft) model to validated float64 targets y (n, c), with the prior mean m of θ − θ̂ (p,) or None
        (zero)."""
        for stale in ("optimization_", "clamped_variances_", "lml_std_error_", "_saved_lml", *_AVERAGING_STATE):
            self.__dict__.pop(stale, None)
        be, n, c = J.backend, J.n, J.n_outputs
        if n == 0:
            raise v.ShapeError(f"J has no examples (n = 0, c = {c}): a GP needs at least one training observation")
        self._backend, self.n_, self.c_, self.p_ = be, n, c, J.p
        self._signature = J.signature()
        self._constant = be.to_numpy(y.mean(axis=0)) if self.mean == "constant" else np.zeros(c)
        self._weight_mean = weight_mean
        residual = y - self._prior_mean(J)
        _check_finite_result(residual, "y − prior mean (the targets minus the prior mean function)",
                             "the targets and the network's outputs are finite but their difference overflows "
                             "float64: rescale the targets" + ("" if weight_mean is None else
                                                              ", or the prior mean J·prior_mean is too large"))
        self._J = J
        self._tasks = self._layout.tasks(J, c)
        self._R = [self._layout.task_values(task, residual) for task in self._tasks]
        self.data_hash_ = io.fingerprint(y, J.f0) if weight_mean is None else io.fingerprint(y, J.f0, weight_mean)
        self.plan_ = self._choose_plan(J)
        self._first_reason = self.plan_.reason
        self._engines = [post.build(self.plan_.method, task.J, task.mode, self) for task in self._tasks]
        self._kernel_float32_errors = [self._float32_kernel_error(engine) for engine in self._engines]
        self._fit_engines()

    @property
    def _layout(self) -> OutputLayout:
        return OutputLayout(self.output_mode)

    def _prior_mean(self, J: JacobianBlocks) -> Any:
        """The prior mean function at J's inputs (n, c), float64: f₀, zero or the constant, plus J·m."""
        xp = J.backend.xp
        if self.mean == "network":
            base = J.f0.astype(np.float64)
        else:
            base = xp.broadcast_to(xp.asarray(self._constant)[None, :], (J.n, J.n_outputs)).copy()
        if self._weight_mean is not None:
            base += J_times_float64(J, self._weight_mean).reshape(J.n, J.n_outputs)
        return base

    def _problem(self, J: JacobianBlocks) -> _plan.Problem:
        return _plan.problem_of(J, self._layout, self.noise, self)

    def _choose_plan(self, J: JacobianBlocks) -> Plan:
        if is_sharded(J):
            return _plan.choose_on_cluster(self.method, J, self._layout, self.noise, self)
        budget = v.resolve_memory_budget(self.memory_budget, J.backend)
        per_row_noise = per_observation(self.noise) or (self.output_mode == "full"
                                                         and not isinstance(self.noise, float))
        return _plan.choose(self.method, self._problem(J), budget, parameter_ok=self.output_mode != "trace",
                            per_row_noise=per_row_noise, exact_max_rows=self.exact_max_rows)

    def _fit_engines(self) -> None:
        """(Re)fit every engine at the current hyperparameters, then check what the fit produced is finite."""
        self._lml_cache: tuple[float, float] | None = None
        for task, engine, R in zip(self._tasks, self._engines, self._R):
            engine.fit(self.prior_scale, self._layout.task_noise(self.noise, task, self.n_), R)
            weights = engine.alpha if engine.space == "function" else engine.mu  # (state() would copy factors)
            _check_finite_result(weights, "the posterior weights", "the targets are too large for the noise: "
                                 f"rescale them (noise σ² = {self._hyperparameters()['noise']})")

    def _warn_and_commit(self, draft: LinearizedGP) -> None:
        """Make the fitted ``draft`` this model's state, after its ill-conditioning warning: a warning raised as an
        error then leaves the model as it was."""
        draft._warn_if_ill_conditioned()
        self._commit(draft)

    def _warn_if_ill_conditioned(self) -> None:
        """One NumericalWarning per public fit, search or average (never from their internal refits) when an exact
        system, s·K + σ²I or JᵀJ/σ² + I/s, is ill-conditioned. In parameter space, directions that no data reach
        (p > n·c, dead units) hold the eigenvalue 1/s: the Cholesky's rounding, about ε·λmax/σ², lands on them
        amplified by s, and a test Jacobian reaches them (measured: 3.6e-6 relative at s/σ² = 1e10, p = 45 > n·c =
        21). The parameter-spectral method treats them as exact zeros and has no number to report."""
        engines = [engine for engine in self._engines
                   if hasattr(engine, "condition") and (engine.space == "function" or engine.solver == "cholesky")]
        condition = max((engine.condition for engine in engines), default=1.0)
        noise, where = self._hyperparameters()["noise"], ""
        mixture = getattr(self, "_mixture", None)
        if mixture is not None and engines:  # every grid point that carries weight is solved too
            heavy = mixture.weights >= MIXTURE_WARN_WEIGHT
            s, noises = mixture.prior_scales[heavy], mixture.noises[heavy]
            for engine in engines:  # averaging runs on function-spectral engines here
                point = engine.conditions_at(s, noises)
                g = int(np.argmax(point))
                if point[g] > condition:
                    condition, noise = float(point[g]), f"{float(noises[g]):.3g}"
                    where = f" at a point of the averaging grid holding {mixture.weights[heavy][g]:.1%} of the weight"
        if condition > ILL_CONDITIONED:
            system = "s·K + σ²I" if self.plan_.space == "function" else "JᵀJ/σ² + I/s"
            v.warn(f"the exact {self.plan_.method} system {system} is ill-conditioned{where} (condition "
                   f"number ≥ {condition:.2g}): the solve may lose up to about "
                   f"{min(16.0, np.log10(condition)):.0f} of float64's 16 digits. Duplicated or nearly "
                   f"collinear training inputs with a noise σ² = {noise} this small do this; raise the noise or "
                   "remove the duplicates", v.NumericalWarning)

    def _float32_kernel_error(self, engine: Any) -> float:
        """Estimated relative error of the posterior from a float32 kernel: its rounding ≈ 2·u₃₂·s·λmax(K0), amplified
        by ‖(s·K0 + σ²I)⁻¹‖ ≤ 1/σ²_min, times FLOAT32_KERNEL_SAFETY; warns above FLOAT32_KERNEL_WARN. 0 for float64
        kernels."""
        # the engines that hold a kernel (in memory, or as tiles on a cluster) estimate its λmax; the iterative one
        # keeps none
        if self.kernel_dtype != "float32" or not hasattr(engine, "kernel_largest_eigenvalue"):
            return 0.0
        lam_max = engine.kernel_largest_eigenvalue()
        if lam_max is None:
            return 0.0
        rounding = 2 * float(np.finfo(np.float32).eps) * self.prior_scale * lam_max
        estimate = FLOAT32_KERNEL_SAFETY * rounding / float(np.min(self.noise))
        if estimate > FLOAT32_KERNEL_WARN:
            v.warn(f"kernel_dtype='float32': the kernel's float32 rounding (≈ {2 * np.finfo(np.float32).eps:.1e}"
                   f" × s·λmax = {self.prior_scale * lam_max:.3g}) against the noise σ² = "
                   f"{float(np.min(self.noise)):.3g} can change the posterior by about {estimate:.2g} "
                   "(relative, an estimate); use kernel_dtype='float64' for this problem", v.NumericalWarning)
        return estimate

    @property
    def diagnostics_(self) -> list[dict[str, Any]]:
        """Per task: jitter added by a Cholesky path; CG iterations and relative residuals (one list per noise
        group), preconditioner rank and Lanczos cache rank of the iterative path, and how its last predict computed
        the variances: ``variance_method`` ("cg, energy form", "lanczos, energy form", or which (test row, noise
        group) pairs were recomputed by CG and why) and, when the Lanczos cache was used (test sets over
        ``variance_cg_max`` rows), ``variance_error``: the largest, over every test row and noise group, of a bound
        on the cache's relative variance error (‖C ŵ − s·k*‖² / min σ², relative to the variance; inf where the
        bound reaches the variance itself). Every (row, group) whose bound exceeds 1% is recomputed by CG, so the
        returned variances are within 1% (or CG's accuracy) even where ``variance_error`` is larger. With a float32
        kernel the estimated relative error it causes (``kernel_float32_error``); for the exact methods a lower
        bound on the condition number of the system solved (``condition_bound``; a function-space fit warns above
        1e-3/ε ≈ 4.5e12)."""
        self._check_fitted()
        errors = getattr(self, "_kernel_float32_errors", [0.0] * len(self._engines))
        return [dict(getattr(e, "info", {}), jitter=getattr(e, "jitter", 0.0), kernel_float32_error=err,
                     **({"condition_bound": e.condition} if hasattr(e, "condition") else {}))
                for e, err in zip(self._engines, errors)]

    # ----- predictions ---------------------------------------------------------------------------------------------
    def _stars(self, J_star: JacobianBlocks) -> list[post.StarRows]:
        return [post.StarRows(star.J, task.J, task.mode, self.memory_budget, self.kernel_dtype)
                for star, task in zip(self._layout.tasks(J_star, J_star.n_outputs), self._tasks)]

    def predict(self, J_star: JacobianBlocks, return_var: bool = False, return_cov: bool = False) -> Any:
        """Posterior mean (and latent variances / covariance) at the test inputs of ``J_star``.

        Means and variances are computed over as many test inputs at a time as ``memory_budget`` holds (the cross
        kernel K(X*, X) and the variances' arrays of the same size), so a large test set never exceeds it; the
        covariance needs the whole set at once and raises MemoryBudgetError, with the numbers, when it does not fit.

        Parameters
        ----------
        J_star : JacobianBlocks
            The network's Jacobian at n* test inputs, exported like the training one (same params, outputs, dtype,
            backend and weights).
        return_var : bool
            Also return the variances of the latent function (add the noise for observations).
        return_cov : bool
            Also return the full posterior covariance (memory-guarded; for small test sets).

        Returns
        -------
        mean : array (n*, c), float64
        var : array (n*, c), float64, ≥ 0 (only with return_var)
        cov : array (only with return_cov)
            (n*·c, n*·c) in output_mode "full" (rows example-major); (c, n*, n*) otherwise (outputs independent).
        """
        return_var = v.check_bool(return_var, "return_var")
        return_cov = v.check_bool(return_cov, "return_cov")
        J_star = self._check_star(J_star)
        with float_errors_checked():
            return self._predict(J_star, return_var, return_cov)

    def _predict(self, J_star: JacobianBlocks, return_var: bool, return_cov: bool) -> Any:
        xp = self._backend.xp
        n_star, c = J_star.n, J_star.n_outputs
        mixture = getattr(self, "_mixture", None)
        if mixture is not None and return_cov:
            raise v.MissingCapabilityError("a model averaged over its hyperparameters predicts a mixture of Gaussians: "
                                           "return_cov and sample() are not available for it (use return_var, or "
                                           "refit at one (s, σ²))")
        size = self._examples_per_pass(J_star, return_var, return_cov)
        mean = self._prior_mean(J_star)
        var: Any = xp.zeros((n_star, c)) if return_var else None
        prior_diag: Any = xp.zeros((n_star, c)) if return_var else None
        whole: list[post.StarRows] = []  # with return_cov: the stars of the one pass over all test inputs
        for start in range(0, n_star, size):  # no test inputs: no pass, and nothing to add to the prior mean
            rows = slice(start, min(start + size, n_star))
            part = J_star if size >= n_star else J_star.examples(rows)
            for engine, task, star_task in zip(self._engines, self._tasks, self._layout.tasks(part, c)):
                # one task's test-side arrays at a time: each star is dropped once its task is done
                star = post.StarRows(star_task.J, task.J, task.mode, self.memory_budget, self.kernel_dtype)
                task_mean, task_var = self._task_moments(engine, star, mixture, return_var)
                self._layout.place(mean[rows], task, task_mean)
                if return_var:
                    self._layout.place(var[rows], task, task_var)
                    self._place_prior_diag(prior_diag[rows], task, star)
                if return_cov:
                    whole.append(star)
        self._check_prediction(mean, "posterior mean", J_star)
        results = [mean]
        if return_var:
            self._check_prediction(var, "posterior variances", J_star)
            var, negative, significant = post.clamp_variances(var, self.prior_scale * xp.maximum(prior_diag, 0.0), xp)
            post.warn_clamped(negative, significant, var.size)  # first: a warning raised as an error changes nothing
            self.clamped_variances_ = negative
            results.append(var)
        if return_cov:
            cov = self._covariance(whole or self._stars(J_star), n_star, c)
            self._check_prediction(cov, "posterior covariance", J_star)
            results.append(cov)
        return results[0] if len(results) == 1 else tuple(results)

    def _examples_per_pass(self, J_star: JacobianBlocks, return_var: bool, return_cov: bool) -> int:
        """Test inputs per pass of a prediction within ``memory_budget``: all of them when they fit, else as many as
        fit; MemoryBudgetError with the numbers when not one does, or when the covariance (the whole test set at
        once) does not fit. The arrays are checked against the budget on their own, as each call of a fitted
        model's is: the engines already held are not subtracted."""
        budget = v.resolve_memory_budget(self.memory_budget, self._backend)
        n_star, c = J_star.n, J_star.n_outputs
        # the covariance's engines form the variances' arrays (whitened rows, projections, solves) for all test rows
        per_example = self._prediction_bytes(J_star, return_var or return_cov)
        results = 8 * 8 * n_star * c  # means, variances, prior variances and the clamp's temporaries
        if return_cov:
            shape = (n_star * c, n_star * c) if self.output_mode == "full" else (c, n_star, n_star)
            needed = 3 * v.nbytes_of(shape, np.float64) + n_star * per_example + results + self._cross_work(J_star)
            v.check_memory(needed, budget, what=f"the posterior covariance of shape {shape} (with the cross kernel "
                                                f"and the arrays of its size for all {n_star} test inputs)",
                           alternative="use return_var=True (sample(): draw at fewer test inputs per call)")
            return max(n_star, 1)
        if n_star == 0 or n_star * per_example + results + self._cross_work(J_star) <= budget:
            return max(n_star, 1)
        # chunks of at most one kernel tile of rows, whose cross kernels need no converted copy of the training J;
        # the cross kernel's work space shrinks with the chunk, so halve until chunk and work space fit
        size = max(1, _plan.TILE_ROWS // self._layout.rows(1, c))
        while True:
            fixed = results + self._cross_work(J_star.examples(slice(0, min(size, n_star))))
            if size * per_example + fixed <= budget:
                return min(size, n_star)
            if size == 1:
                rows = (f"its rows of the cross kernel K(X*, X) against {self._layout.rows(self.n_, c)} training "
                        "rows per task" if self.plan_.space == "function" else f"its dense rows of J* (p = {self.p_})")
                raise v.MemoryBudgetError(
                    f"predict needs {v.format_bytes(per_example)} per test input ({rows}"
                    f"{', and the variances’ arrays of that size' if return_var else ''}) beside "
                    f"{v.format_bytes(fixed)} for the outputs and the kernel's work space, but the memory budget is "
                    f"{v.format_bytes(budget)}; raise memory_budget")
            size = max(1, min(size // 2, (budget - fixed) // per_example))

    def _prediction_bytes(self, J_star: JacobianBlocks, return_var: bool) -> int:
        """Bytes one test input adds to a prediction at its peak: its rows of every task's test-side arrays (one
        task's at a time) by :func:`lingp_core._plan.prediction_row_bytes`."""
        pb = self._prediction_problem()
        copy = _plan.float64_copy_row_bytes(J_star)
        return self._layout.rows(1, J_star.n_outputs) * _plan.prediction_row_bytes(self.plan_.method, pb,
                                                                                  return_var, copy)

    def _prediction_problem(self) -> _plan.Problem:
        """The sizes a prediction's arrays depend on (a parameter-space model loaded from an archive has no training
        Jacobian to plan from: its sizes without one)."""
        if getattr(self, "_J", None) is not None:
            return self._problem(self._J)
        groups = max((len(getattr(engine, "groups", ())) for engine in self._engines), default=1)
        return _plan.Problem(len(self._tasks), self._layout.rows(self.n_, self.c_), self._layout.columns(self.c_),
                             self.p_, 4 if self.kernel_dtype == "float32" else 8, max(groups, 1),
                             self.preconditioner_rank, self.variance_rank, mode=self.output_mode, outputs=self.c_)

    def _cross_work(self, J_star: JacobianBlocks) -> int:
        """Bytes the cross kernel K(X*, X) of these test inputs needs beside itself (function space)."""
        if self.plan_.space != "function" or self._tasks[0].J is None or J_star.n == 0:
            return 0
        star = self._layout.tasks(J_star, J_star.n_outputs)[0].J
        return _plan.cross_work(star, self._tasks[0].J, self.kernel_dtype)

    def _place_prior_diag(self, out: Any, task: Task, star: post.StarRows) -> None:
        """Add a task's prior variances diag K0(X*, X*) into ``out`` (n*, c)."""
        d = star.prior_diag()
        self._layout.place(out, task, d[:, None] if d.ndim == 1 and self.output_mode != "full" else d)

    @staticmethod
    def _task_moments(engine: Any, star: post.StarRows, mixture: Any, return_var: bool) -> tuple[Any, Any]:
        """A task's posterior mean and (with return_var) variances: the engine's, or the hyperparameter mixture's."""
        if mixture is None:
            return engine.mean(star), engine.var(star) if return_var else None

        def moments_at(index: np.ndarray) -> tuple[Any, Any]:
            return engine.moments_at(star, mixture.prior_scales[index], mixture.noises[index], return_var)
        values_per_point = (star.rows + int(engine.lam.shape[0])) * engine.q  # means (m*, q) + coefficients (m|p, q)
        mean, var = averaging.batched_mixture_moments(moments_at, mixture.weights, values_per_point,
                                                      engine.backend.xp)
        return mean, var if return_var else None

    def _check_prediction(self, values: Any, what: str, J_star: JacobianBlocks) -> None:
        """NonFiniteError in the user's terms when a prediction overflowed (the inputs were checked finite)."""
        xp = self._backend.xp
        if bool(xp.isfinite(values).all()):
            return
        diag = kernel_diag(J_star)
        largest = float(xp.nanmax(xp.where(xp.isnan(diag), xp.inf, diag))) if diag.size else 0.0
        raise v.NonFiniteError(f"the {what} at J_star overflow float64 (NaN/Inf): the test Jacobian's squared row "
                               f"norms reach {largest:.3g} (prior_scale = {self.prior_scale:.3g}), beyond what float64 "
                               "holds once multiplied out; the test inputs are far outside the training range or the "
                               "exported Jacobian is far too large — rescale the inputs")

    def _covariance(self, stars: list[post.StarRows], n_star: int, c: int) -> Any:
        xp = self._backend.xp
        shape = (n_star * c, n_star * c) if self.output_mode == "full" else (c, n_star, n_star)  # checked: predict
        if self.output_mode == "full":
            return self._engines[0].cov(stars[0])[0]
        out = xp.empty(shape)
        for task, engine, star in zip(self._tasks, self._engines, stars):
            cov = engine.cov(star)
            if task.output is not None:
                out[task.output] = cov[0]
            else:
                out[:] = cov
        return out

    def sample(self, J_star: JacobianBlocks, n_samples: int = 1, *, seed: int = 0) -> Any:
        """Joint posterior samples of the latent function at the test inputs.

        Drawn as mean + V Λ^½ z from the eigendecomposition of the posterior covariance (negative eigenvalues at
        rounding level set to 0), z standard normal from ``numpy.random.default_rng(seed)``, each eigenvector's sign
        fixed (its largest-magnitude entry positive): the same samples on every backend and execution path (in
        memory or on a cluster), to rounding, wherever the covariance's eigenvalues are distinct.

        Returns
        -------
        array (n_samples, n*, c), float64
        """
        n_samples = v.check_int(n_samples, "n_samples", minimum=1)
        seed = v.check_int(seed, "seed", minimum=0)
        J_star = self._check_star(J_star)
        v.check_memory(3 * v.nbytes_of((n_samples, J_star.n, J_star.n_outputs), np.float64),
                       v.resolve_memory_budget(self.memory_budget, self._backend),
                       what=f"{n_samples} joint samples at {J_star.n} test inputs (draws, product and result)",
                       alternative="draw fewer samples per call (calls with other seeds are independent)")
        mean, cov = self.predict(J_star, return_cov=True)
        be, xp = self._backend, self._backend.xp
        rng = np.random.default_rng(seed)
        n_star, c = mean.shape
        covs = [cov] if self.output_mode == "full" else [cov[k] for k in range(c)]
        draws = []
        for block in covs:
            lam, vec = be.eigh((block + block.T) / 2)
            # an eigenvector's sign is arbitrary, and eigh's choice flips with rounding-level changes of the matrix
            if vec.size:  # (no test inputs: nothing to fix)
                largest = vec[xp.argmax(xp.abs(vec), axis=0), xp.arange(vec.shape[1])]
                vec = vec * xp.where(largest < 0, -1.0, 1.0)
            z = xp.asarray(rng.standard_normal((block.shape[0], n_samples)))
            draws.append(vec @ (xp.sqrt(xp.maximum(lam, 0.0))[:, None] * z))
        if self.output_mode == "full":
            noise = draws[0].T.reshape(n_samples, n_star, c)
        else:
            noise = xp.stack([d.T for d in draws], axis=2)
        return mean[None] + noise

    # ----- marginal likelihood and hyperparameters -----------------------------------------------------------------
    def log_marginal_likelihood(self) -> float:
        """log p(y | s, σ²) of the training targets (an SLQ estimate for method "iterative"; its standard error is
        then in ``lml_std_error_``)."""
        self._check_posterior()
        if not hasattr(self, "_R"):  # a loaded model: the value computed when it was saved
            if self._saved_lml is None:
                raise v.NonFiniteError("the log marginal likelihood of this model overflowed float64 when it was "
                                       "saved (the targets' squares overflow against the noise); refit it with "
                                       "rescaled targets for an evidence")
            return float(self._saved_lml)
        if self._lml_cache is None:  # once per fit: SLQ runs num_probes Lanczos passes
            with float_errors_checked():
                if self.plan_.method == "iterative":
                    parts = [engine.lml(task) for task, engine in enumerate(self._engines)]
                    cache = (float(sum(value for value, _ in parts)), float(np.sqrt(sum(se**2 for _, se in parts))))
                else:
                    cache = (float(sum(engine.lml() for engine in self._engines)), 0.0)
            if not np.isfinite(cache[0]):
                largest = max(float(self._backend.xp.abs(R).max()) for R in self._R)
                raise v.NonFiniteError(f"the log marginal likelihood is {cache[0]} in float64: the targets differ from "
                                       f"the prior mean by up to {largest:.3g}, whose square overflows against the "
                                       f"noise σ² = {self._hyperparameters()['noise']}; rescale the targets")
            self._lml_cache = cache
        self.lml_std_error_ = self._lml_cache[1]
        return self._lml_cache[0]

    def optimize_hyperparameters(self, *, criterion: str = "evidence", hyperprior: Any = None,
                                 per_output_noise: bool | None = None, max_iter: int | None = None,
                                 maxiter: int | None = None) -> LinearizedGP:
        """Fit the prior scale s and the noise σ² by a criterion (L-BFGS on their logs, exact gradients).

        Runs on one eigendecomposition (spectral methods: every evaluation O(n·c) for the evidence, O(m²·q) for
        LOO); with per-output noise in output_mode "full" or per-observation noise (n, c) it refactors the kernel
        per evaluation. Per-observation noise is held fixed: s alone is fitted. The model is refitted at the
        optimum; with method="auto" the spectral decomposition is kept (plan_ says so). Details of the run are in
        ``optimization_``. A criterion still rising towards a bound of log s or log σ² (±30) when L-BFGS stops is
        followed onto it, and a fitted value within 1e-6 of its bound raises a NumericalWarning that says what it
        means (s at e^-30: the data are explained as noise). Like fit, the search runs aside: if it fails or is
        interrupted the model is unchanged. It ends hyperparameter averaging.

        Parameters
        ----------
        criterion : {"evidence", "loo"}
            "evidence": the log marginal likelihood log p(y | s, σ²). "loo": the closed-form leave-one-out log
            predictive density Σ_i log p(y_i | y_-i, s, σ²) (Rasmussen & Williams eqs. 5.10–5.12). With a few
            observations the evidence's maximum often sits at s → 0 (all noise); LOO measured better at 2–10 labels
            per class on the demo. The rows left out are examples (each target column on its own) in output modes
            "trace" and "independent", (example, output) pairs in "full".
        hyperprior : None, "data" or Hyperprior
            None: maximize the criterion. "data" or a :class:`Hyperprior`: maximize criterion + log prior (MAP)
            with log-normal priors on s and on each σ²; "data" centres them at the data-scaled guess
            (σ²₀ = half the targets' mean square about the prior mean, s₀ = σ²₀ / mean diag K0) with standard
            deviations 1 (log s) and 10 (log σ², nearly flat) in natural-log units.
        per_output_noise : bool, optional
            One σ² per output instead of one shared (default: as the model's noise is now). Must be None with
            per-observation noise (n, c), which stays fixed.
        max_iter : int, optional
            L-BFGS iterations at most per search (default 200; ``maxiter`` is accepted as its older name). The
            search may run twice (a restart from the best point), so ``optimization_["iterations"]`` can reach
            twice this.

        Returns
        -------
        self
            With ``optimization_``: success, message, iterations, evaluations, lml_before, lml_after, criterion,
            criterion_value (the criterion at the optimum, without the prior), hyperprior (its centres and widths,
            or None), log_hyperprior, at_bound (names of the parameters at a bound: "prior_scale", "noise" or
            "noise[k]"; empty when none), prior_scale, noise.
        """
        self._check_fitted()
        if not hasattr(self, "_R"):
            raise v.MissingCapabilityError("a loaded model holds no training targets: refit it with fit(J, y) to "
                                           "optimize")
        self._check_in_memory("optimize_hyperparameters")
        if self.plan_.method == "iterative":
            raise v.InvalidOptionError(
                "optimize_hyperparameters needs an exact method: the iterative marginal likelihood is a stochastic "
                "estimate. Optimize on a subset with an exact method and refit with those values, or force "
                "method='function-spectral' / 'parameter-spectral' if it fits")
        criterion = v.check_choice(criterion, "criterion", hyper.CRITERIA)
        hyperprior = hyper.check_hyperprior(hyperprior)
        if maxiter is not None and max_iter is not None and maxiter != max_iter:
            raise v.InvalidOptionError(f"max_iter={max_iter} and its older name maxiter={maxiter} disagree; pass one")
        chosen_iter = max_iter if max_iter is not None else maxiter if maxiter is not None else 200
        max_iter = v.check_int(chosen_iter, "max_iter", minimum=1)
        if per_observation(self.noise):
            if per_output_noise is not None:
                raise v.InvalidOptionError(f"per_output_noise={per_output_noise!r}: this model's noise is given per "
                                           f"observation {np.shape(self.noise)} and stays fixed (only the prior "
                                           "scale is optimized); leave per_output_noise=None")
        else:
            if per_output_noise is None:
                per_output_noise = not isinstance(self.noise, float)
            per_output_noise = v.check_bool(per_output_noise, "per_output_noise")
            if per_output_noise and self.output_mode == "full" and (
                    self.plan_.space == "parameter" or (self.c_ > 1 and self.method.endswith("spectral"))):
                raise v.InvalidOptionError(f"per-output noise in output_mode='full' varies along the rows of the "
                                           f"system, which method={self.plan_.method!r} cannot hold (it is optimized "
                                           "in function space by Cholesky): fit with method='function-cholesky', or "
                                           "use output_mode='independent' (spectral, much faster)")
        draft = self._draft()
        for stale in _AVERAGING_STATE:  # the search ends any averaging
            draft.__dict__.pop(stale, None)
        hyper.optimize(draft, per_output_noise, max_iter, criterion, hyperprior)
        self._warn_and_commit(draft)
        return self

    def average_hyperparameters(self, *, grid_size: int = 41, span: float = averaging.SPAN_DECADES,
                                hyperprior: Any = None, keep_mass: float = 1 - 1e-9) -> LinearizedGP:
        """Average the predictions over (s, σ²) weighted by their posterior on a log grid (Bayesian model averaging).

        The grid is ``grid_size`` × ``grid_size`` points uniform in (log s, log σ²), centred at the data-scaled
        (s₀, σ²₀) (s₀·mean diag K0 = σ²₀ = half the targets' mean square about the prior mean): s within ±``span``
        decades, σ² from ``span`` decades below σ²₀ to 10·σ²₀. Weights ∝ marginal likelihood × hyperprior; points
        holding less than 1 − ``keep_mass`` of the weight together are dropped. Runs on one eigendecomposition
        (a spectral method; each grid point costs O(n·c)); predictions then return the mixture's mean and variance
        (:mod:`lingp_core._averaging`), and ``averaging_`` describes the grid. The engines are refitted at the
        heaviest point, which ``prior_scale``, ``noise`` and :meth:`log_marginal_likelihood` report. A refit, or
        :meth:`optimize_hyperparameters`, ends the averaging. Needs one shared noise variance. Like fit, it runs
        aside: if it fails the model is unchanged.

        Parameters
        ----------
        grid_size : int
            Points per axis (≥ 3).
        span : float
            Decades of the grid either side of s₀ (and below σ²₀), > 0.
        hyperprior : None, "data" or Hyperprior
            None: a prior uniform in (log s, log σ²) over the grid; "data" or a Hyperprior: log-normal priors (see
            :meth:`optimize_hyperparameters`).
        keep_mass : float
            Posterior mass kept, in (0, 1].
        """
        self._check_fitted()
        if not hasattr(self, "_R"):
            raise v.MissingCapabilityError("a loaded model holds no training targets: refit it with fit(J, y) to "
                                           "average")
        grid_size = v.check_int(grid_size, "grid_size", minimum=3)
        v.check_memory(v.nbytes_of((8, grid_size, grid_size), np.float64),  # ~8 host arrays over the grid
                       v.resolve_memory_budget(self.memory_budget, backends.get_backend("numpy")),
                       what=f"the averaging grid of {grid_size} × {grid_size} points (a few host arrays of that size)",
                       alternative="use a smaller grid_size (41 resolves the posterior of (s, σ²) well)")
        span = v.check_positive(span, "span")
        keep_mass = averaging.check_keep_mass(keep_mass)
        if not isinstance(self.noise, float):
            raise v.InvalidOptionError("averaging needs one shared noise variance (the grid is over s and one σ²); "
                                       f"this model has noise of shape {self.noise.shape}")
        self._check_in_memory("average_hyperparameters")
        if self.plan_.method == "iterative":
            raise v.InvalidOptionError("averaging needs a spectral method (one eigendecomposition for every grid "
                                       "point); the iterative path has none: average on a subset, or force "
                                       "method='function-spectral' / 'parameter-spectral' if it fits")
        # without a hyperprior: uniform over the grid's (log s, log σ²) area, so averaging_["log_mass"] is log p(y)
        log_prior = averaging.uniform_log_prior(span) if hyperprior is None else hyper.log_hyperprior(self, hyperprior)
        draft = self._draft()
        for stale in ("optimization_", *_AVERAGING_STATE):
            draft.__dict__.pop(stale, None)
        with float_errors_checked():
            averaging.average(draft, grid_size, span, log_prior, keep_mass)
        self._warn_and_commit(draft)
        return self

    def _check_in_memory(self, what: str) -> None:
        if is_sharded(getattr(self, "_J", None)):
            raise v.MissingCapabilityError(f"{what} runs on one eigendecomposition in memory; this model was fitted on "
                                           "a Jacobian sharded on a Dask cluster. Choose the hyperparameters on an "
                                           "in-memory subset (export_jacobian of a NumPy/torch array) and refit the "
                                           "cluster model with them")

    @property
    def mixture_(self) -> averaging.HyperparameterMixture | None:
        """After :meth:`average_hyperparameters`: the kept grid points (prior_scales, noises) and their weights, each
        a float64 host array (G,); None for a model at one (s, σ²)."""
        self._check_fitted()
        return getattr(self, "_mixture", None)

    def _draft(self) -> LinearizedGP:
        """A shallow copy whose engines are copies: refits rebind their attributes, never the committed ones'."""
        draft = super()._draft()
        if self._engines is not None:
            draft._engines = [copy.copy(engine) for engine in self._engines]
        return draft

    def _switch(self, method: str, *, fresh: bool = False) -> None:
        """Change to another exact method (or, with ``fresh``, new engines of this one), reusing each task's kernel
        K0 or dense Jacobian when it is at hand. Checks the new engines fit the budget beside the current ones.
        Called by the hyperparameter searches (optimize_hyperparameters, average_hyperparameters): with
        method="auto", plan_.reason then states the new method's bytes."""
        if method == self.plan_.method and not fresh:
            return
        reason = None
        if self._tasks[0].J is not None:
            budget = v.resolve_memory_budget(self.memory_budget, self._backend)
            problem = self._problem(self._J)
            current = _plan.engine_bytes(self.plan_.method, problem)
            _plan.check_fits(method, problem, budget, extra=current,
                             what=f"the hyperparameter search's method={method!r} beside the fitted "
                                  f"{self.plan_.method!r} engines",
                             alternative="choose the hyperparameters on a subset of the data (the search needs its "
                                         "exact decomposition beside the fitted engines) and refit this model with "
                                         "them")
            if self.method == "auto" and method != self.plan_.method:
                reason = _plan.exact_reason(method, problem, budget, parameter_ok=self.output_mode != "trace",
                                            exact_max_rows=self.exact_max_rows)
                self._first_reason = reason  # what the searches' notes extend
        self.plan_ = self.plan_.with_method(method, reason)
        same_space = _plan.split_method(method)[0] == self._engines[0].space  # a source of the other space is no K0
        self._engines = [post.build(method, task.J, task.mode, self,
                                    source=post.source_of(engine) if same_space else None)
                         for task, engine in zip(self._tasks, self._engines)]
        self._fit_engines()

    # ----- persistence ---------------------------------------------------------------------------------------------
    def _hyperparameters(self) -> dict[str, Any]:
        """s and σ² as JSON (σ² a number, a list per output, or a summary of per-observation noise, which archives
        keep as an array)."""
        return {"prior_scale": self.prior_scale, "noise": _noise_summary(self.noise)}

    def _archive(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Hyperparameters, the fitted solver state, and — for function-space methods — the training Jacobian blocks
        (kernels with test points need them); no training targets."""
        arrays: dict[str, Any] = {"constant": self._constant}
        if self._weight_mean is not None:
            arrays["prior_mean"] = self._weight_mean
        if per_observation(self.noise):
            arrays["noise"] = self.noise
        mixture = getattr(self, "_mixture", None)
        if mixture is not None:
            arrays.update(mixture.arrays())
        for t, engine in enumerate(self._engines):
            arrays.update({f"task{t}_{name}": a for name, a in engine.state().items()})
        jac_config = None
        if self.plan_.space == "function":  # a sharded Jacobian is gathered: one archive, checked to fit first
            J = self._J.gather(self.memory_budget) if is_sharded(self._J) else self._J
            jac_arrays, jac_config = io.jacobian_to_arrays(J)
            arrays.update(jac_arrays)
        try:
            lml = self.log_marginal_likelihood()
        except v.NonFiniteError:  # targets whose squares overflow: the predictions are fine, the evidence is not
            lml = None
        hyper_json = self._hyperparameters()
        config = {**hyper_json, "settings": {name: getattr(self, name) for name in _SETTINGS},
                  "plan": {**self.plan_.__dict__}, "n": self.n_, "c": self.c_, "p": self.p_,
                  "signature": self._signature, "jacobian": jac_config, "lml": lml,
                  "data_hash": self.data_hash_, "hyper_hash": io.fingerprint_json(hyper_json),
                  "prior_mean": self._weight_mean is not None}
        if mixture is not None:
            config["averaging"] = {"points": int(mixture.weights.size), "summary": self.averaging_}
        if per_observation(self.noise):  # the factors per task, which the archive's shapes are checked against
            config["noise_groups"] = [len(post.noise_groups(self._layout.task_noise(self.noise, task, self.n_),
                                                            self._layout.columns(self.c_))) for task in self._tasks]
        return arrays, config

    @classmethod
    def _check_archive_config(cls, config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
        p_sig, c_sig = archived_signature(config["signature"])
        n, c, p = (archived_count(config[key], key, minimum=0 if key == "p" else 1) for key in ("n", "c", "p"))
        if (c, p) != (c_sig, p_sig):
            raise io.ArchiveError(f"the saved 'c' = {c} outputs and 'p' = {p} parameters differ from the signature's "
                                  f"{c_sig} and {p_sig}; the file was modified")
        layout = OutputLayout(v.check_choice(config["settings"]["output_mode"], "output_mode", OUTPUT_MODES))
        tasks = len(layout.tasks(None, c))
        space = _check_archived_plan(config["plan"], tasks=tasks, rows=layout.rows(n, c), p=p)
        if (config["jacobian"] is not None) != (space == "function"):
            raise io.ArchiveError(f"the saved plan is {space}-space ({config['plan']['method']}) but the saved "
                                  f"'jacobian' is {'null' if config['jacobian'] is None else 'present'}: a "
                                  "function-space model predicts through its training Jacobian, a parameter-space one "
                                  "keeps none; the file was modified")
        noise = config["noise"]
        if isinstance(noise, str):  # per observation: an (n, c) array, and the factors per task it gave
            groups = config["noise_groups"]
            if not isinstance(groups, list) or len(groups) != tasks:
                raise io.ArchiveError(f"the saved 'noise_groups' is {groups!r:.60}, not a list of one count per task "
                                      f"({tasks}); the file was modified")
            for t, count in enumerate(groups):
                archived_count(count, f"noise_groups[{t}]", maximum=layout.columns(c))
        elif not (isinstance(noise, float) or (isinstance(noise, list) and len(noise) == c and all(
                isinstance(x, float | int) and not isinstance(x, bool) for x in noise))):
            raise io.ArchiveError(f"the saved 'noise' is {noise!r:.60}, not a number, a list of one per output ({c}) "
                                  "or a description of per-observation noise; the file was modified")
        if "averaging" in config:
            archived_length(archived_count(config["averaging"]["points"], "averaging.points"), "averaging.points",
                            shapes, "averaging_weights")

    @classmethod
    def _expected_arrays(cls, config: dict[str, Any]) -> dict[str, Any]:
        n, c, p = config["n"], config["c"], config["p"]
        layout = OutputLayout(config["settings"]["output_mode"])
        per_observation = isinstance(config["noise"], str)
        noise = None if per_observation else config["noise"] if isinstance(config["noise"], float) else \
            np.asarray(config["noise"], dtype=float)
        m, q = layout.rows(n, c), layout.columns(c)
        engine = post.engine_class(config["plan"]["method"])
        expected: dict[str, Any] = {"constant": ((c,), FLOAT64), **({"noise": ((n, c), FLOAT64)} if per_observation
                                                                     else {}),
                                    **({"prior_mean": ((p,), FLOAT64)} if config.get("prior_mean") else {})}
        if "averaging" in config:
            points = config["averaging"]["points"]
            expected.update({name: ((points,), FLOAT64) for name in ("averaging_prior_scales", "averaging_noises",
                                                                      "averaging_weights")})
        for t, task in enumerate(layout.tasks(None, c)):
            # a shared or per-output σ² gives as many groups for one example as for n: no (n·c,) noise is built
            groups = (config["noise_groups"][t] if per_observation
                      else len(post.noise_groups(layout.task_noise(noise, task, 1), q)))
            expected.update({f"task{t}_{name}": (shape, FLOAT64)
                             for name, shape in engine.state_shapes(m, p, q, groups).items()})
        if config["jacobian"] is not None:  # the blocks' arrays are checked by the JacobianBlocks they rebuild
            expected["J_f0"] = ((n, c), (np.dtype(config["signature"]["dtype"]),))
        return expected

    @classmethod
    def _from_archive(cls, arrays: dict[str, np.ndarray], config: dict[str, Any], be: Any) -> LinearizedGP:
        noise = (arrays["noise"] if isinstance(config["noise"], str) else config["noise"]
                 if isinstance(config["noise"], float) else np.asarray(config["noise"]))
        model = cls._from_settings(config["prior_scale"], noise, config["settings"])
        model._backend, model.n_, model.c_, model.p_ = be, config["n"], config["c"], config["p"]
        model._signature = config["signature"]
        model._constant, model.data_hash_ = arrays["constant"], config["data_hash"]
        model._saved_lml = archived_number(config["lml"], "lml", null=True)  # null: it overflowed when saved
        model._weight_mean = _archived_weight_mean(arrays, config, be)
        model.plan_ = Plan(**config["plan"])
        model._first_reason = model.plan_.reason
        if "averaging" in config:
            try:
                model._mixture = averaging.HyperparameterMixture.from_arrays(arrays)
            except v.ValueRangeError as exc:
                raise io.ArchiveError(f"the saved averaging grid is not valid ({exc}); the file was modified") from None
            model.averaging_ = config["averaging"]["summary"]
        J = None
        if config["jacobian"] is not None:
            J = jacobian_from_archive(arrays, config["jacobian"], be)
            check_same_parameters(J, model._signature)
            model._J = J
        model._tasks = model._layout.tasks(J, model.c_)
        if J is None and model.output_mode == "full":
            model._tasks = [Task(None, "full", None)]
        for name in arrays:
            if name.startswith("task") and "_factor" in name:  # the Cholesky engines' factors L
                check_triangular_factor(arrays, name)
        # a parameter-space engine predicts without its training rows: a shared or per-output σ² laid out for one
        # example gives it the same noise groups, and no (n·c,) vector for an n that no saved array holds
        rows = 1 if J is None and not per_observation(model.noise) else model.n_
        model._engines = [post.restore(model.plan_.method, task.J, task.mode, be,
                                       {name[len(f"task{t}_"):]: be.asarray(a) for name, a in arrays.items()
                                        if name.startswith(f"task{t}_")},
                                       model.prior_scale, model._layout.task_noise(model.noise, task, rows), model)
                          for t, task in enumerate(model._tasks)]
        return model

    @classmethod
    def _from_settings(cls, prior_scale: float, noise: Any, settings: dict[str, Any]) -> LinearizedGP:
        """A new, unfitted model from archived hyperparameters and settings."""
        return cls(prior_scale, noise, **settings)


#: The prior scale's range: far inside float64's (1e±308), so 1/s and s·K·(targets²) do not overflow or underflow
_NORMAL_SCALE = 1e-150

#: Condition number of an exact system above which fit warns: float64 then keeps fewer than ~3 digits (1e-3 / eps)
ILL_CONDITIONED = 1e-3 / float(np.finfo(np.float64).eps)

#: An averaged model's grid points holding at least this share of the weight are checked for ill-conditioning too
MIXTURE_WARN_WEIGHT = 0.01

#: What average_hyperparameters adds to a model; a refit or an optimization removes it
_AVERAGING_STATE = ("_mixture", "averaging_")

_SETTINGS = ("mean", "output_mode", "method", "rtol", "maxiter", "preconditioner_rank", "variance_rank",
             "variance_cg_max", "num_probes", "exact_max_rows", "kernel_dtype", "memory_budget", "seed")


def _kernel_dtype_name(kernel_dtype: Any) -> str:
    """"float64" or "float32" from a name or a dtype-like (np.float32, np.dtype("float32")); InvalidOptionError
    otherwise."""
    try:
        name = np.dtype(kernel_dtype).name if not isinstance(kernel_dtype, str) else kernel_dtype
    except TypeError:
        name = repr(kernel_dtype)
    return v.check_choice(name, "kernel_dtype", ("float64", "float32"))


def _archived_weight_mean(arrays: dict[str, Any], config: dict[str, Any], be: Any) -> Any:
    """The saved prior mean of θ − θ̂, or None; ArchiveError when the flag and the arrays disagree."""
    flag = config.get("prior_mean", False)
    if not isinstance(flag, bool) or flag != ("prior_mean" in arrays):
        raise io.ArchiveError(f"the archive's prior_mean flag ({flag!r}) does not match its arrays (a prior_mean array "
                              f"is {'present' if 'prior_mean' in arrays else 'absent'}): the file was modified")
    if not flag:
        return None
    m = arrays["prior_mean"]
    if m.dtype != np.float64 or not np.isfinite(m).all():
        raise io.ArchiveError(f"the archive's prior_mean must be finite float64, got dtype {m.dtype}: the file was "
                              "modified")
    return be.asarray(m)


def _check_archived_plan(plan: Any, *, tasks: int, rows: int, p: int) -> str:
    """The space of a saved plan, checked to fit the configuration: a known method, its space and solver, and the
    tasks, rows per task and parameters the counts give; ArchiveError naming the entries that differ."""
    method = plan["method"]
    post.engine_class(method)  # a known method: InvalidOptionError otherwise
    space, solver = _plan.split_method(method)
    wanted = {"space": space, "solver": solver, "tasks": tasks, "rows": rows, "p": p}
    wrong = [f"plan.{key} is {plan.get(key)!r:.40}, not {value!r}" for key, value in wanted.items()
             if type(plan.get(key)) is not type(value) or plan.get(key) != value]
    if wrong:
        raise io.ArchiveError(f"the saved plan does not fit the configuration ({'; '.join(wrong)}: method {method!r}, "
                              "from the counts n, c, p and the output mode); the file was modified")
    return space


def _noise_summary(noise: Any) -> Any:
    """JSON for σ²: the number, the per-output list, or a short description of per-observation noise."""
    if isinstance(noise, float):
        return noise
    if noise.ndim == 1:
        return noise.tolist()
    return f"per observation {noise.shape[0]}×{noise.shape[1]}, {noise.min():.4g} to {noise.max():.4g}"


def _check_finite_result(values: Any, what: str, hint: str) -> None:
    """NonFiniteError naming a computed quantity in the user's terms (its inputs were already checked finite)."""
    xp = backends.infer(values).xp
    if not bool(xp.isfinite(values).all()):
        raise v.NonFiniteError(f"{what} overflow float64 (NaN/Inf) although every input is finite: {hint}")
