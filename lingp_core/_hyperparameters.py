"""LinearizedGP's hyperparameter search: the log marginal likelihood over (log s, log σ²) by L-BFGS.

Runs on a draft of the model (see :mod:`lingp_core._estimator`): it switches the draft's engines and refits them,
and the caller commits the draft only when the search is complete.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from lingp_core import _posterior as post
from lingp_core.kernels import kernel_diag

LOG_BOUNDS = (-30.0, 30.0)  # log s and log σ² stay within e^±30 during optimization


def set_hyperparameters(model: Any, theta: np.ndarray) -> None:
    model.prior_scale = float(np.exp(theta[0]))
    model.noise = float(np.exp(theta[1])) if isinstance(model.noise, float) else np.exp(theta[1:])


def spectral_objective(model: Any) -> Any:
    """−lml and its gradient in (log s, log σ²...) from the engines' spectra: O(n·c) per evaluation."""
    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        s, noise = float(np.exp(theta[0])), np.exp(theta[1:])
        value, grad = 0.0, np.zeros_like(theta)
        for task, engine in zip(model._tasks, model._engines):
            index = np.broadcast_to(model._layout.noise_index(model.noise, task, model.n_), (1, engine.q))[0]
            lml, g_s, g_noise = post.spectral_lml(*engine.spectrum(), s, noise[index])
            value += lml
            grad[0] += g_s
            np.add.at(grad, 1 + index, g_noise)
        return -value, -grad
    return objective


def cholesky_objective(model: Any) -> Any:
    """−lml and its exact gradient, refactoring the kernel per evaluation (per-row noise)."""
    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        set_hyperparameters(model, theta)
        model._fit_engines()
        value, grad = 0.0, np.zeros_like(theta)
        for task, engine in zip(model._tasks, model._engines):
            value += engine.lml()
            index = np.broadcast_to(model._layout.noise_index(model.noise, task, model.n_), (engine.m, engine.q))
            grad += engine.gradient(index)[: theta.size]
        return -value, -grad
    return objective


def starting_point(model: Any, objective: Any, grid: bool) -> np.ndarray:
    """The best of: the current values, a data-scaled guess (s·mean diag K0 = σ² = half the mean square of the
    targets around the prior mean) and, on spectral paths where evaluations cost O(n·c), a log grid around that
    guess. L-BFGS from a poor start can slide into the s → 0 (all noise) or σ² → 0 corners."""
    size = 1 + np.atleast_1d(model.noise).size
    current = np.concatenate([[np.log(model.prior_scale)], np.log(np.atleast_1d(model.noise))])
    square = float(sum(float((R**2).sum()) for R in model._R) / sum(R.size for R in model._R))
    diag = float(np.mean([float(kernel_diag(t.J, output_mode=t.mode).mean()) for t in model._tasks]))
    if not (square > 0 and diag > 0):
        return current
    log_s, log_noise = np.log(0.5 * square / diag), np.log(0.5 * square)
    candidates = [current, np.array([log_s] + [log_noise] * (size - 1))]
    if grid:
        candidates += [np.array([log_s + a] + [log_noise + b] * (size - 1))
                       for a in np.linspace(-4, 4, 17) * np.log(10) for b in np.linspace(-4, 1, 11) * np.log(10)]
    low, high = LOG_BOUNDS
    values = [objective(np.clip(theta, low, high))[0] for theta in candidates]
    return np.clip(candidates[int(np.argmin(values))], low, high)


def optimize(model: Any, per_output_noise: bool, maxiter: int) -> None:
    """Maximize the draft ``model``'s log marginal likelihood over s and σ² and refit it at the optimum."""
    from scipy.optimize import minimize

    c = model.c_
    if per_output_noise and isinstance(model.noise, float):
        model.noise = np.full(c, model.noise)
    elif not per_output_noise and not isinstance(model.noise, float):
        model.noise = float(np.exp(np.log(model.noise).mean()))
    lml_before = model.log_marginal_likelihood()
    spectral = not (model.output_mode == "full" and not isinstance(model.noise, float))
    chosen = model.plan_.method
    # the Cholesky objective refits the engines in place: always on new ones, so the committed model keeps its own
    model._switch(f"{model.plan_.space}-spectral" if spectral else "function-cholesky", fresh=not spectral)
    objective = spectral_objective(model) if spectral else cholesky_objective(model)
    theta0 = starting_point(model, objective, spectral)
    result = minimize(objective, theta0, jac=True, method="L-BFGS-B", bounds=[LOG_BOUNDS] * theta0.size,
                      options={"maxiter": maxiter})
    set_hyperparameters(model, result.x)
    if model.method == "auto" and chosen != model.plan_.method:
        note = ("hyperparameters optimized on one eigendecomposition, which is kept for predictions" if spectral
                else "per-output noise optimized with exact factorizations")
        model.plan_ = model.plan_.with_method(model.plan_.method, f"{model._first_reason}; {note}")
    if chosen != model.plan_.method and model.method != "auto":
        model._switch(chosen)  # the method the user forced, at the optimized hyperparameters
    else:
        model._fit_engines()
    at_bound = bool(np.any(np.minimum(np.abs(result.x - LOG_BOUNDS[0]), np.abs(result.x - LOG_BOUNDS[1])) < 1e-6))
    model.optimization_ = {"success": bool(result.success), "message": str(result.message),
                           "iterations": int(result.nit), "evaluations": int(result.nfev),
                           "lml_before": lml_before, "lml_after": model.log_marginal_likelihood(),
                           "at_bound": at_bound, **model._hyperparameters()}
