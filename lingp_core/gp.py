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

import dataclasses
from typing import Any

import numpy as np

import backends
from lingp_core import _posterior as post
from lingp_core import _validate as v
from lingp_core import io
from lingp_core.jacobian import JacobianBlocks
from lingp_core.kernels import _view
from lingp_core.likelihoods import check_noise

__all__ = ["GP_METHODS", "MEANS", "LinearizedGP", "Plan"]

GP_METHODS = ("auto", "cholesky", "spectral", "function-cholesky", "function-spectral", "parameter-cholesky",
              "parameter-spectral", "iterative")
MEANS = ("network", "zero", "constant")
_OUTPUT_MODES = ("full", "independent", "trace")
_LOG_BOUNDS = (-30.0, 30.0)  # log s and log σ² stay within e^±30 during optimization


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :class:`LinearizedGP` chose and why.

    Attributes
    ----------
    method : str
        One of the concrete methods ("function-cholesky", ..., "iterative").
    space, solver : str
        "function" or "parameter"; "cholesky", "spectral" or "iterative".
    tasks, rows, p : int
        Independent GP problems solved, rows per problem (n·c or n), parameters.
    reason : str
        Why, in words.
    """

    method: str
    space: str
    solver: str
    tasks: int
    rows: int
    p: int
    reason: str

    def __str__(self) -> str:
        return f"{self.method} ({self.tasks} task(s) of {self.rows} rows, p = {self.p}): {self.reason}"


@dataclasses.dataclass
class _Task:
    J: JacobianBlocks | None  # the task's training Jacobian (None after loading a parameter-space model)
    mode: str                 # kernel output mode applied to J: "full" or "trace"
    output: int | None        # the output an independent task serves


class LinearizedGP:
    """GP regression with the Jacobian kernel of a trained network (the linearized network's posterior).

    Parameters
    ----------
    prior_scale : float
        s > 0, the prior variance of θ − θ̂; the kernel is s · J Jᵀ.
    noise : float or array_like of shape (c,)
        σ² > 0, the noise variance, for all outputs or per output.
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
    exact_max_rows : int
        "auto" factors kernels of at most this many rows (default 20000); larger ones go iterative.
    kernel_dtype : {"float64", "float32"}
        Accumulation dtype of the function-space kernels (default float64: the exact kernel of the exported
        Jacobian). "float32" halves the kernel's time and memory and adds ~1e-6 relative error to its entries;
        factorizations stay float64.
    memory_budget : float, optional
        Bytes allowed for kernels and factors (default: half the free memory where the arrays live).
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

    def __init__(self, prior_scale: float = 1.0, noise: Any = 1e-2, *, mean: str = "network",
                 output_mode: str = "full", method: str = "auto", rtol: float | None = None,
                 maxiter: int | None = None, preconditioner_rank: int = 100, variance_rank: int = 200,
                 variance_cg_max: int = 256, num_probes: int = 30, exact_max_rows: int = 20000,
                 kernel_dtype: Any = "float64", memory_budget: float | None = None, seed: int = 0,
                 progress: bool = False) -> None:
        self.prior_scale = v.check_positive(prior_scale, "prior_scale")
        self.noise = check_noise(noise)
        self.mean = v.check_choice(mean, "mean", MEANS)
        self.output_mode = v.check_choice(output_mode, "output_mode", _OUTPUT_MODES)
        self.method = v.check_choice(method, "method", GP_METHODS)
        self.rtol = None if rtol is None else v.check_positive(rtol, "rtol")
        self.maxiter = None if maxiter is None else v.check_int(maxiter, "maxiter", minimum=1)
        self.preconditioner_rank = v.check_int(preconditioner_rank, "preconditioner_rank", minimum=1)
        self.variance_rank = v.check_int(variance_rank, "variance_rank", minimum=1)
        self.variance_cg_max = v.check_int(variance_cg_max, "variance_cg_max", minimum=0)
        self.num_probes = v.check_int(num_probes, "num_probes", minimum=2)
        self.exact_max_rows = v.check_int(exact_max_rows, "exact_max_rows", minimum=1)
        self.kernel_dtype = str(np.dtype(v.check_choice(str(kernel_dtype), "kernel_dtype", ("float64", "float32"))))
        self.memory_budget = None if memory_budget is None else v.check_positive(memory_budget, "memory_budget")
        self.seed = v.check_int(seed, "seed", minimum=0)
        self.progress = bool(progress)
        self._engines: list[Any] | None = None

    def __repr__(self) -> str:
        noise = self.noise if isinstance(self.noise, float) else self.noise.tolist()
        fitted = f", plan={self.plan_.method!r}" if self._engines is not None else ""
        return (f"LinearizedGP(prior_scale={self.prior_scale:.4g}, noise={noise}, mean={self.mean!r}, "
                f"output_mode={self.output_mode!r}, method={self.method!r}{fitted})")

    # ----- fitting -------------------------------------------------------------------------------------------------
    def fit(self, J: JacobianBlocks, y: Any) -> LinearizedGP:
        """Condition on targets y at the training inputs.

        Parameters
        ----------
        J : JacobianBlocks
            The network's Jacobian at the n training inputs (:func:`lingp_core.export_jacobian`); J.f0 (n, c) is the
            prior mean when mean="network".
        y : array of shape (n, c), or (n,) when c = 1
            Float targets on J's backend (computed in float64).

        Returns
        -------
        self
        """
        if not isinstance(J, JacobianBlocks):
            raise TypeError(f"J must be a JacobianBlocks from export_jacobian, got {type(J).__name__}")
        be = J.backend
        n, c = J.n, J.n_outputs
        y = v.as_float_array(y, "y", be, ndim=(1, 2))
        if y.ndim == 1:
            if c != 1:
                raise v.ShapeError(f"y has shape {tuple(y.shape)} but J has c = {c} outputs per example; y must be "
                                   f"(n, c) = {(n, c)}")
            y = y[:, None]
        v.check_shape(y, "y", (n, c))
        if not isinstance(self.noise, float) and self.noise.size != c:
            raise v.ShapeError(f"noise has {self.noise.size} per-output variances but J has c = {c} outputs")
        y = y.astype(np.float64)
        self._backend, self.n_, self.c_, self.p_ = be, n, c, J.p
        self._signature = J.signature()
        self._constant = be.to_numpy(y.mean(axis=0)) if self.mean == "constant" else np.zeros(c)
        residual = y - self._prior_mean(J)
        self._J = J
        self._tasks = self._make_tasks(J)
        self._R = [self._task_rows(task, residual) for task in self._tasks]
        self.data_hash_ = io.fingerprint(y, J.f0)
        self.plan_ = self._choose_plan(J)
        self._first_reason = self.plan_.reason
        self._build_and_fit()
        return self

    def _prior_mean(self, J: JacobianBlocks) -> Any:
        xp = J.backend.xp
        if self.mean == "network":
            return J.f0.astype(np.float64)
        return xp.broadcast_to(xp.asarray(self._constant)[None, :], (J.n, J.n_outputs)).copy()

    def _make_tasks(self, J: JacobianBlocks) -> list[_Task]:
        if self.output_mode == "independent":
            return [_Task(_output_view(J, k), "full", k) for k in range(J.n_outputs)]
        return [_Task(J, self.output_mode, None)]

    def _task_rows(self, task: _Task, values: Any) -> Any:
        """(n, c) per-example values → the task's (m, q) layout."""
        if self.output_mode == "full":
            return values.reshape(-1, 1)
        return values[:, task.output: task.output + 1] if task.output is not None else values

    def _place(self, out: Any, task: _Task, values: Any) -> None:
        """Add a task's (m*, q) result into the (n*, c) array ``out``."""
        if self.output_mode == "full":
            out += values.reshape(out.shape)
        elif task.output is not None:
            out[:, task.output] += values[:, 0]
        else:
            out += values

    def _task_noise(self, task: _Task, n: int) -> np.ndarray:
        """Noise of a task as a host array broadcastable to its (m, q) targets."""
        noise = self.noise
        if isinstance(noise, float):
            return np.array([[noise]])
        if self.output_mode == "full":
            return np.tile(noise, n)[:, None]
        return np.array([[noise[task.output]]]) if task.output is not None else noise[None, :]

    def _noise_index(self, task: _Task, n: int) -> np.ndarray:
        """Which optimized noise parameter each (row, column) of a task uses (all 0 for one shared σ²)."""
        if isinstance(self.noise, float):
            return np.zeros((1, 1), dtype=np.int64)
        c = self.noise.size
        if self.output_mode == "full":
            return np.tile(np.arange(c), n)[:, None]
        return np.array([[task.output]]) if task.output is not None else np.arange(c)[None, :]

    def _choose_plan(self, J: JacobianBlocks) -> Plan:
        n, c, p = J.n, J.n_outputs, J.p
        m = n * c if self.output_mode == "full" else n
        tasks = len(self._tasks)
        budget = v.resolve_memory_budget(self.memory_budget, J.backend)
        per_row_noise = self.output_mode == "full" and not isinstance(self.noise, float)
        method, why = self.method, "forced by method="
        parameter_ok = self.output_mode != "trace"
        # per task (every task's engine is kept): parameter space J and Jᵀ J-sized arrays; function space the kernel,
        # whose lower triangle becomes the factor, room for one more m × m (a float32 kernel's float64 factor, a second
        # noise group's factor) and, off NumPy, the two copies a Cholesky that is not in place makes
        factored = 2 if J.backend.name == "numpy" else 4
        param_bytes, kernel_bytes = tasks * 8 * (2 * m * p + 2 * p * p), tasks * 8 * factored * m * m
        if method in ("cholesky", "spectral"):
            space = "parameter" if (parameter_ok and p < m) else "function"
            method, why = f"{space}-{method}", f"the smaller space (rows per task {m}, p = {p})"
        elif method == "auto":
            if parameter_ok and p < m and param_bytes <= budget:
                method, why = "parameter-cholesky", (f"p = {p} < {m} rows per task: the p × p precision is the smaller "
                                                     f"exact system ({v.format_bytes(param_bytes)})")
            elif m <= self.exact_max_rows and kernel_bytes <= budget:
                method, why = "function-cholesky", (f"{m} rows per task ≤ p = {p} and ≤ exact_max_rows = "
                                                    f"{self.exact_max_rows}: the exact kernel factorization fits "
                                                    f"({v.format_bytes(kernel_bytes)})")
            else:
                method, why = "iterative", (f"{m} rows per task: an exact factorization needs "
                                            f"{v.format_bytes(min(kernel_bytes, param_bytes))} (budget "
                                            f"{v.format_bytes(budget)}) or more rows than exact_max_rows = "
                                            f"{self.exact_max_rows}; CG on matrix-free kernel products")
        if method.startswith("parameter") and not parameter_ok:
            raise ValueError("output_mode='trace' has no parameter-space form (its kernel averages the outputs' "
                             "Jacobians); use a function-space method or output_mode='independent'")
        if method.endswith("spectral") and per_row_noise:
            raise ValueError("spectral methods need one noise variance per GP; with per-output noise in "
                             "output_mode='full' the noise differs along the rows: use method='function-cholesky' or "
                             "'parameter-cholesky', or output_mode='independent'")
        space, solver = ("function", "iterative") if method == "iterative" else tuple(method.split("-"))
        return Plan(method, space, solver, tasks, m, p, why)

    def _build_and_fit(self) -> None:
        """Build the engines for plan_ from the training tasks and fit them at the current hyperparameters."""
        self._engines = [self._engine(task) for task in self._tasks]
        self._fit_engines()

    def _engine(self, task: _Task) -> Any:
        be, method = self._backend, self.plan_.method
        if method == "iterative":
            return post.Iterative(task.J, task.mode, rtol=self.rtol, maxiter=self.maxiter,
                                  precond_rank=self.preconditioner_rank, variance_rank=self.variance_rank,
                                  variance_cg_max=self.variance_cg_max, num_probes=self.num_probes, seed=self.seed,
                                  progress=self.progress)
        if method.startswith("function"):
            from lingp_core.kernels import kernel

            K0 = kernel(task.J, output_mode=task.mode, dtype=self.kernel_dtype, memory_budget=self.memory_budget,
                        progress=self.progress)
            return (post.FunctionCholesky if method.endswith("cholesky") else post.FunctionSpectral)(K0, be)
        Jd = task.J.to_dense(memory_budget=self.memory_budget).astype(np.float64)
        return (post.ParameterCholesky if method.endswith("cholesky") else post.ParameterSpectral)(Jd, be)

    def _fit_engines(self) -> None:
        self._lml_cache: tuple[float, float] | None = None
        for task, engine, R in zip(self._tasks, self._engines, self._R):
            engine.fit(self.prior_scale, self._task_noise(task, self.n_), R)

    @property
    def diagnostics_(self) -> list[dict[str, Any]]:
        """Per task: jitter added by a Cholesky path; CG iterations and relative residuals, preconditioner rank,
        Lanczos cache rank and the estimated variance truncation error of the iterative path."""
        self._check_fitted()
        return [dict(getattr(e, "info", {}), jitter=getattr(e, "jitter", 0.0)) for e in self._engines]

    # ----- predictions ---------------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if self._engines is None:
            raise v.NotFittedError("this LinearizedGP is not fitted: call fit(J, y) (or LinearizedGP.load) first")

    def _check_star(self, J_star: Any) -> JacobianBlocks:
        if not isinstance(J_star, JacobianBlocks):
            raise TypeError(f"J_star must be a JacobianBlocks from export_jacobian, got {type(J_star).__name__}")
        if J_star.backend != self._backend:
            raise v.BackendMismatchError(f"J_star lives on backend {J_star.backend.name!r} but the model on "
                                         f"{self._backend.name!r}; export the test inputs onto the same backend")
        J_star.check_signature(self._signature)
        return J_star

    def _stars(self, J_star: JacobianBlocks) -> list[post.StarRows]:
        return [post.StarRows(star.J, task.J, task.mode, self.memory_budget, self.kernel_dtype)
                for star, task in zip(self._make_tasks(J_star), self._tasks)]

    def predict(self, J_star: JacobianBlocks, return_var: bool = False, return_cov: bool = False) -> Any:
        """Posterior mean (and latent variances / covariance) at the test inputs of ``J_star``.

        Parameters
        ----------
        J_star : JacobianBlocks
            The network's Jacobian at n* test inputs, exported like the training one (same params, outputs, dtype,
            backend).
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
        self._check_fitted()
        J_star = self._check_star(J_star)
        xp = self._backend.xp
        n_star, c = J_star.n, J_star.n_outputs
        stars = self._stars(J_star)
        mean = self._prior_mean(J_star)
        for task, engine, star in zip(self._tasks, self._engines, stars):
            self._place(mean, task, engine.mean(star))
        results = [mean]
        if return_var:
            var = xp.zeros((n_star, c))
            for task, engine, star in zip(self._tasks, self._engines, stars):
                self._place(var, task, engine.var(star))
            prior_scale = self.prior_scale * xp.maximum(self._prior_diag(stars, n_star, c), 0.0)
            var, negative, significant = post.clamp_variances(var, prior_scale, xp)
            self.clamped_variances_ = negative
            post.warn_clamped(negative, significant, var.size)
            results.append(var)
        if return_cov:
            results.append(self._covariance(stars, n_star, c))
        return results[0] if len(results) == 1 else tuple(results)

    def _prior_diag(self, stars: list[post.StarRows], n_star: int, c: int) -> Any:
        out = self._backend.xp.zeros((n_star, c))
        for task, star in zip(self._tasks, stars):
            d = star.prior_diag()
            self._place(out, task, d[:, None] if d.ndim == 1 and self.output_mode != "full" else d)
        return out

    def _covariance(self, stars: list[post.StarRows], n_star: int, c: int) -> Any:
        xp = self._backend.xp
        shape = (n_star * c, n_star * c) if self.output_mode == "full" else (c, n_star, n_star)
        v.check_memory(v.nbytes_of(shape, np.float64) * 3,
                       v.resolve_memory_budget(self.memory_budget, self._backend),
                       what=f"the posterior covariance of shape {shape}", alternative="use return_var=True")
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
        rounding level set to 0), z standard normal from ``numpy.random.default_rng(seed)`` — the same samples on
        every backend.

        Returns
        -------
        array (n_samples, n*, c), float64
        """
        n_samples = v.check_int(n_samples, "n_samples", minimum=1)
        seed = v.check_int(seed, "seed", minimum=0)
        mean, cov = self.predict(J_star, return_cov=True)
        be, xp = self._backend, self._backend.xp
        rng = np.random.default_rng(seed)
        n_star, c = mean.shape
        covs = [cov] if self.output_mode == "full" else [cov[k] for k in range(c)]
        draws = []
        for block in covs:
            lam, vec = be.eigh((block + block.T) / 2)
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
        self._check_fitted()
        if not hasattr(self, "_R"):
            return float(self._saved_lml)  # a loaded model: the value computed when it was saved
        if self._lml_cache is None:  # once per fit: SLQ runs num_probes Lanczos passes
            if self.plan_.method == "iterative":
                parts = [engine.lml() for engine in self._engines]
                self._lml_cache = (float(sum(value for value, _ in parts)),
                                   float(np.sqrt(sum(se**2 for _, se in parts))))
            else:
                self._lml_cache = (float(sum(engine.lml() for engine in self._engines)), 0.0)
        self.lml_std_error_ = self._lml_cache[1]
        return self._lml_cache[0]

    def optimize_hyperparameters(self, *, per_output_noise: bool | None = None, maxiter: int = 200) -> LinearizedGP:
        """Maximize the log marginal likelihood over the prior scale s and the noise σ² (L-BFGS on their logs).

        Runs on one eigendecomposition (spectral methods: every evaluation O(n·c)); with per-output noise in
        output_mode "full" it refactors the kernel per evaluation (exact gradients). The model is refitted at the
        optimum; with method="auto" the spectral decomposition is kept (plan_ says so). Details of the run are in
        ``optimization_``.

        Parameters
        ----------
        per_output_noise : bool, optional
            One σ² per output instead of one shared (default: as the model's noise is now).
        maxiter : int
            L-BFGS iterations at most.
        """
        from scipy.optimize import minimize

        self._check_fitted()
        if not hasattr(self, "_R"):
            raise v.NotFittedError("a loaded model holds no training targets: refit it with fit(J, y) to optimize")
        if self.plan_.method == "iterative":
            raise ValueError("optimize_hyperparameters needs an exact method: the iterative marginal likelihood is a "
                             "stochastic estimate. Optimize on a subset with an exact method and refit with those "
                             "values, or force method='function-spectral' / 'parameter-spectral' if it fits")
        maxiter = v.check_int(maxiter, "maxiter", minimum=1)
        c = self.c_
        if per_output_noise is None:
            per_output_noise = not isinstance(self.noise, float)
        if per_output_noise and isinstance(self.noise, float):
            self.noise = np.full(c, self.noise)
        elif not per_output_noise and not isinstance(self.noise, float):
            self.noise = float(np.exp(np.log(self.noise).mean()))
        lml_before = self.log_marginal_likelihood()
        spectral = not (self.output_mode == "full" and not isinstance(self.noise, float))
        if not spectral and self.plan_.space == "parameter":
            raise ValueError("per-output noise in output_mode='full' is optimized in function space: fit with "
                             "method='function-cholesky', or use output_mode='independent' (spectral, much faster)")
        chosen = self.plan_.method
        if spectral and self.plan_.solver != "spectral":
            self._switch(f"{self.plan_.space}-spectral")
        elif not spectral and self.plan_.solver != "cholesky":
            self._switch("function-cholesky")  # per-row noise: exact gradients from the factorization
        objective = self._spectral_objective if spectral else self._cholesky_objective
        theta0 = self._starting_point(objective, spectral)
        result = minimize(objective, theta0, jac=True, method="L-BFGS-B", bounds=[_LOG_BOUNDS] * theta0.size,
                          options={"maxiter": maxiter})
        self._set_hyperparameters(result.x)
        if self.method == "auto" and chosen != self.plan_.method:
            note = ("hyperparameters optimized on one eigendecomposition, which is kept for predictions" if spectral
                    else "per-output noise optimized with exact factorizations")
            self.plan_ = dataclasses.replace(self.plan_, reason=f"{self._first_reason}; {note}")
        if chosen != self.plan_.method and self.method != "auto":
            self._switch(chosen)  # the method the user forced, at the optimized hyperparameters
        else:
            self._fit_engines()
        self.optimization_ = {"success": bool(result.success), "message": str(result.message),
                              "iterations": int(result.nit), "evaluations": int(result.nfev),
                              "lml_before": lml_before, "lml_after": self.log_marginal_likelihood(),
                              **self._hyperparameters()}
        return self

    def _switch(self, method: str) -> None:
        """Change to another exact method, reusing each task's kernel K0 or dense Jacobian when it is at hand."""
        space, solver = method.split("-")
        self.plan_ = dataclasses.replace(self.plan_, method=method, space=space, solver=solver)
        classes = {"function-cholesky": post.FunctionCholesky, "function-spectral": post.FunctionSpectral,
                   "parameter-cholesky": post.ParameterCholesky, "parameter-spectral": post.ParameterSpectral}
        engines = []
        for task, engine in zip(self._tasks, self._engines):
            source = getattr(engine, "K0" if space == "function" else "Jd", None)
            engines.append(self._engine(task) if source is None else classes[method](source, self._backend))
        self._engines = engines
        self._fit_engines()

    def _starting_point(self, objective: Any, grid: bool) -> np.ndarray:
        """The best of: the current values, a data-scaled guess (s·mean diag K0 = σ² = half the mean square of the
        targets around the prior mean) and, on spectral paths where evaluations cost O(n·c), a log grid around that
        guess. L-BFGS from a poor start can slide into the s → 0 (all noise) or σ² → 0 corners."""
        from lingp_core.kernels import kernel_diag

        size = 1 + np.atleast_1d(self.noise).size
        current = np.concatenate([[np.log(self.prior_scale)], np.log(np.atleast_1d(self.noise))])
        square = float(sum(float((R**2).sum()) for R in self._R) / sum(R.size for R in self._R))
        diag = float(np.mean([float(kernel_diag(t.J, output_mode=t.mode).mean()) for t in self._tasks]))
        if not (square > 0 and diag > 0):
            return current
        log_s, log_noise = np.log(0.5 * square / diag), np.log(0.5 * square)
        candidates = [current, np.array([log_s] + [log_noise] * (size - 1))]
        if grid:
            candidates += [np.array([log_s + a] + [log_noise + b] * (size - 1))
                           for a in np.linspace(-4, 4, 17) * np.log(10) for b in np.linspace(-4, 1, 11) * np.log(10)]
        low, high = _LOG_BOUNDS
        values = [objective(np.clip(theta, low, high))[0] for theta in candidates]
        return np.clip(candidates[int(np.argmin(values))], low, high)

    def _set_hyperparameters(self, theta: np.ndarray) -> None:
        self.prior_scale = float(np.exp(theta[0]))
        self.noise = float(np.exp(theta[1])) if isinstance(self.noise, float) else np.exp(theta[1:])

    def _spectral_objective(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        s, noise = float(np.exp(theta[0])), np.exp(theta[1:])
        value, grad = 0.0, np.zeros_like(theta)
        for task, engine in zip(self._tasks, self._engines):
            index = np.broadcast_to(self._noise_index(task, self.n_), (1, engine.q))[0]
            lml, g_s, g_noise = post.spectral_lml(*engine.spectrum(), s, noise[index])
            value += lml
            grad[0] += g_s
            np.add.at(grad, 1 + index, g_noise)
        return -value, -grad

    def _cholesky_objective(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        self._set_hyperparameters(theta)
        self._fit_engines()
        value, grad = 0.0, np.zeros_like(theta)
        for task, engine in zip(self._tasks, self._engines):
            value += engine.lml()
            index = np.broadcast_to(self._noise_index(task, self.n_), (engine.m, engine.q))
            grad += engine.gradient(index)[: theta.size]
        return -value, -grad

    # ----- persistence ---------------------------------------------------------------------------------------------
    def _hyperparameters(self) -> dict[str, Any]:
        """s and σ² as JSON (σ² a number or a list per output)."""
        return {"prior_scale": self.prior_scale,
                "noise": self.noise if isinstance(self.noise, float) else self.noise.tolist()}

    def save(self, path: Any) -> str:
        """Write what prediction needs to an .npz archive (no pickle, no training targets): hyperparameters, the
        fitted solver state, and — for function-space methods — the training Jacobian blocks (kernels with test
        points need them). Returns the path written."""
        self._check_fitted()
        arrays: dict[str, Any] = {"constant": self._constant}
        for t, engine in enumerate(self._engines):
            arrays.update({f"task{t}_{name}": a for name, a in engine.state().items()})
        jac_config = None
        if self.plan_.space == "function":
            jac_arrays, jac_config = io.jacobian_to_arrays(self._J)
            arrays.update(jac_arrays)
        hyper = self._hyperparameters()
        config = {**hyper, "settings": {name: getattr(self, name) for name in _SETTINGS},
                  "plan": dataclasses.asdict(self.plan_), "n": self.n_, "c": self.c_, "p": self.p_,
                  "signature": self._signature, "jacobian": jac_config, "lml": self.log_marginal_likelihood(),
                  "data_hash": self.data_hash_, "hyper_hash": io.fingerprint_json(hyper)}
        return io.save_archive(path, "LinearizedGP", arrays, config)

    @classmethod
    def load(cls, path: Any, *, backend: Any = "numpy") -> LinearizedGP:
        """A fitted model from :meth:`save`, its arrays on ``backend`` ("numpy", "cupy" or a Backend); predictions
        equal those of the saved model. Raises :class:`lingp_core.io.ArchiveError` for a wrong, truncated or
        modified file."""
        arrays, config = io.load_archive(path, "LinearizedGP")
        be = backends.get_backend(backend)
        model = cls(config["prior_scale"], config["noise"] if isinstance(config["noise"], float)
                    else np.asarray(config["noise"]), **config["settings"])
        model._backend, model.n_, model.c_, model.p_ = be, config["n"], config["c"], config["p"]
        model._signature = config["signature"]
        model._constant, model.data_hash_, model._saved_lml = arrays["constant"], config["data_hash"], config["lml"]
        model.plan_ = Plan(**config["plan"])
        model._first_reason = model.plan_.reason
        J = None
        if config["jacobian"] is not None:
            J = io.jacobian_from_arrays(arrays, config["jacobian"], be)
            model._J = J
        model._tasks = model._make_tasks(J) if J is not None else [
            _Task(None, model.output_mode if model.output_mode != "independent" else "full", k)
            for k in (range(model.c_) if model.output_mode == "independent" else [None])]
        model._engines = [post.restore(model.plan_.method, task.J, task.mode, be,
                                       {name[len(f"task{t}_"):]: be.asarray(a) for name, a in arrays.items()
                                        if name.startswith(f"task{t}_")},
                                       model.prior_scale, model._task_noise(task, model.n_), model)
                          for t, task in enumerate(model._tasks)]
        return model


_SETTINGS = ("mean", "output_mode", "method", "rtol", "maxiter", "preconditioner_rank", "variance_rank",
             "variance_cg_max", "num_probes", "exact_max_rows", "kernel_dtype", "memory_budget", "seed")


def _output_view(J: JacobianBlocks, k: int) -> JacobianBlocks:
    """The rows of output k of J as a one-output JacobianBlocks (views of J's arrays where possible)."""
    return JacobianBlocks(J.f0[:, k: k + 1], _view(J, slice(0, J.n), k, J.dtype), backend=J.backend,
                          outputs=(J.outputs[k],))
