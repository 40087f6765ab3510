"""LinearizedGP's hyperparameter search: a criterion over (log s, log σ²) by L-BFGS, optionally with a hyperprior.

Criteria (all exact, with exact gradients):

- ``"evidence"``: the log marginal likelihood log N(r | 0, C), C = s·K0 + D;
- ``"loo"``: the closed-form leave-one-out log predictive density (Rasmussen & Williams 2006, eqs. 5.10–5.13)
  Σ_i log N(r_i | r_i − α_i/c_i, 1/c_i), α = C⁻¹ r, c = diag(C⁻¹), summed over the target columns of every task; its
  gradient along a direction with ∂C/∂θ = E is Σ_i [α_i (Z α)_i − ½ (1 + α_i²/c_i) (Z C⁻¹)_ii] / c_i, Z = C⁻¹ E.
  The rows are the task's rows: examples per target column in output modes "trace" and "independent", (example,
  output) pairs in "full" (each output of each example left out on its own).

With a :class:`Hyperprior` the objective is criterion + log prior (a MAP estimate in the log-hyperparameters).

The objective is evaluated on the engines' spectra (spectral methods: one eigendecomposition, then O(m·q) per
evaluation for the evidence and O(m²·q) — O(m·p·q) in parameter space — for LOO), or by refactoring per evaluation
(Cholesky methods: per-output noise in output mode "full", and fixed per-observation noise (n, c), where s alone is
fitted). Runs on a draft of the model (see :mod:`lingp_core._estimator`): it switches the draft's engines and refits
them, and the caller commits the draft only when the search is complete.
"""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from backends._triangles import TILE
from lingp_core import _plan
from lingp_core import _posterior as post
from lingp_core import _validate as v
from lingp_core._layout import per_observation
from lingp_core.kernels import kernel_diag

LOG_BOUNDS = (-30.0, 30.0)  # log s and log σ² stay within e^±30 during optimization
BOUND_TOLERANCE = 1e-6      # a fitted log-hyperparameter this close to LOG_BOUNDS is reported as at its bound
CRITERIA = ("evidence", "loo")
#: Standard deviations, in natural-log units, of the "data" hyperprior. The prior scale's is narrow (a factor e at
#: one sd): s₀ ties the prior variance of f at the data to the targets' own variance, which the data do tell us, and
#: it keeps s off the s → 0 corner where a few observations are "all noise". The noise's is wide (10 nats, ~4
#: decades): how the targets' variance splits into signal and noise is what the data must decide. Measured on the
#: repo's cases (their own test sets, issue 15): noise width 1 held σ² ~1000× above the evidence's choice on the
#: sinusoid's 10 context points (MSE 1.95 vs 1.17 with evidence); 10 gave 1.25, and kept the tabular shift at 10
#: patients level with the best baseline and the ReLU toy's bands from collapsing (benchmarks/README.md, "Choosing the
#: default", with the commands).
DATA_PRIOR_WIDTH = 1.0
DATA_NOISE_WIDTH = 10.0
_CENTRE_LIMIT = 100.0       # |log centre| at most this: far outside the searched e^±30, yet finite in every formula
_WIDTH_RANGE = (1e-6, 1e6)  # widths whose log densities stay finite over the searched range
_LOG_2PI = float(np.log(2 * np.pi))
_SETTLE_RTOL = 1e-12  # a bound must improve the objective by more than this (relative) to be moved onto


# ----- hyperpriors -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Hyperprior:
    """Independent log-normal hyperpriors on the prior scale s and on each noise variance σ², natural logs:
    log s ~ N(log_prior_scale, prior_scale_width²), log σ² ~ N(log_noise, noise_width²).

    Parameters
    ----------
    log_prior_scale, log_noise : float, optional
        The centres (natural logs of s and σ²). None (default): the data-scaled guess σ²₀ = half the mean square of
        the targets about the prior mean, s₀ = σ²₀ / mean diag K0 (signal and noise each explain half the targets'
        variance). ``hyperprior="data"`` is ``Hyperprior()``.
    prior_scale_width, noise_width : float
        Standard deviations of log s and log σ² (> 0; defaults :data:`DATA_PRIOR_WIDTH` = 1 and
        :data:`DATA_NOISE_WIDTH` = 10).

    Raises
    ------
    ArgumentTypeError, NonFiniteError, ValueRangeError
        A centre or width that is not a real number; a NaN/Inf centre; a width that is not finite and > 0.
    """

    log_prior_scale: float | None = None
    log_noise: float | None = None
    prior_scale_width: float = DATA_PRIOR_WIDTH
    noise_width: float = DATA_NOISE_WIDTH

    def __post_init__(self) -> None:
        for name in ("log_prior_scale", "log_noise"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _finite_real(getattr(self, name), name))
                if abs(getattr(self, name)) > _CENTRE_LIMIT:  # the search itself stays within e^±30
                    raise v.ValueRangeError(f"{name} = {getattr(self, name):.3g} is a natural log: the centre "
                                            f"e^{getattr(self, name):.3g} lies beyond e^±{_CENTRE_LIMIT:g}")
        for name in ("prior_scale_width", "noise_width"):
            width = v.check_positive(getattr(self, name), name)
            if not _WIDTH_RANGE[0] <= width <= _WIDTH_RANGE[1]:
                raise v.ValueRangeError(f"{name} = {width:.3g} (natural-log units) must lie in "
                                        f"[{_WIDTH_RANGE[0]:g}, {_WIDTH_RANGE[1]:g}]")
            object.__setattr__(self, name, width)

    def log_density(self, log_s: Any, log_noise: Any) -> Any:
        """log p(log s) + log p(log σ²) for one noise variance, elementwise over arrays (centres must be set)."""
        return (log_normal(np.asarray(log_s, dtype=float), self.log_prior_scale, self.prior_scale_width)[0]
                + log_normal(np.asarray(log_noise, dtype=float), self.log_noise, self.noise_width)[0])

    def log_density_and_gradient(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """log prior of θ = (log s, log σ²_1, ..., log σ²_K) (K may be 0: fixed noise) and its gradient in θ."""
        value, grad = log_normal(theta, self.log_noise, self.noise_width)
        value_s, grad_s = log_normal(theta[:1], self.log_prior_scale, self.prior_scale_width)
        value[:1], grad[:1] = value_s, grad_s
        return float(value.sum()), grad

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _finite_real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise v.ArgumentTypeError(f"{name} must be a real number (a natural log), got {v.describe(value)}")
    if not np.isfinite(float(value)):
        raise v.NonFiniteError(f"{name} must be finite, got {value!r}")
    return float(value)


def log_normal(x: np.ndarray, centre: float | None, width: float) -> tuple[np.ndarray, np.ndarray]:
    """log N(x | centre, width²) elementwise and its derivative in x."""
    if centre is None:
        raise v.InvalidOptionError("this Hyperprior's centre is the data-scaled guess, which needs a fitted model: "
                                   "pass it to optimize_hyperparameters / average_hyperparameters, or give the centre")
    z = (x - centre) / width
    return -0.5 * z**2 - np.log(width) - 0.5 * _LOG_2PI, -z / width


def check_hyperprior(hyperprior: Any) -> Hyperprior | None:
    """None, "data" (→ Hyperprior()) or a Hyperprior; InvalidOptionError / ArgumentTypeError otherwise."""
    if hyperprior is None or isinstance(hyperprior, Hyperprior):
        return hyperprior
    if isinstance(hyperprior, str):
        if hyperprior != "data":
            raise v.InvalidOptionError(f"hyperprior must be None, 'data' or a Hyperprior; got {hyperprior!r}")
        return Hyperprior()
    raise v.ArgumentTypeError(f"hyperprior must be None, 'data' or a lingp_core.Hyperprior, got "
                              f"{v.describe(hyperprior)}")


def data_scaled_guess(model: Any, user: str | None = None) -> tuple[float, float] | None:
    """(s₀, σ²₀) of the fitted ``model``: σ²₀ = half the mean square of the targets about the prior mean, s₀ with
    s₀·mean diag K0 = σ²₀ (signal and noise each explain half the targets' variance) — the start of the search, the
    centre of the "data" hyperprior and of the averaging grid. Where the data give no scale (targets equal to the
    prior mean, or a zero Jacobian): None, or, when a ``user`` of the guess is named, a ValueRangeError naming it."""
    square = float(sum(float((R**2).sum()) for R in model._R) / sum(R.size for R in model._R))
    diag = float(np.mean([float(kernel_diag(t.J, output_mode=t.mode).mean()) for t in model._tasks]))
    if square > 0 and diag > 0:
        return 0.5 * square / diag, 0.5 * square
    if user is None:
        return None
    raise v.ValueRangeError(f"{user} on the data's scale, but the targets' mean square about the prior mean is "
                            f"{square:.3g} and the kernel's mean diagonal {diag:.3g}: nothing to scale by (targets "
                            "equal to the prior mean, or a zero Jacobian)")


def resolve_hyperprior(model: Any, hyperprior: Any) -> Hyperprior | None:
    """The validated hyperprior with its missing centres set to the data-scaled guess of the fitted ``model``:
    (:func:`data_scaled_guess`); ValueRangeError when the data give no scale."""
    prior = check_hyperprior(hyperprior)
    if prior is None or (prior.log_prior_scale is not None and prior.log_noise is not None):
        return prior
    try:
        guess = data_scaled_guess(model, "hyperprior='data' centres its priors")
    except v.ValueRangeError as exc:
        raise v.ValueRangeError(f"{exc}; give the centres: Hyperprior(log_prior_scale=..., log_noise=...)") from None
    return dataclasses.replace(prior, log_prior_scale=np.log(guess[0]) if prior.log_prior_scale is None
                               else prior.log_prior_scale,
                               log_noise=np.log(guess[1]) if prior.log_noise is None else prior.log_noise)


def log_hyperprior(model: Any, hyperprior: Any) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The log density of the resolved hyperprior over arrays (log s, log σ²) (one noise variance): for averaging."""
    prior = resolve_hyperprior(model, hyperprior)
    if prior is None:
        return lambda log_s, log_noise: np.zeros_like(np.asarray(log_s, dtype=float))
    return prior.log_density


# ----- parameters --------------------------------------------------------------------------------------------------

def parameter_names(model: Any) -> list[str]:
    """The names of θ's entries: prior_scale, then noise or noise[k] (none for fixed noise)."""
    if per_observation(model.noise):
        return ["prior_scale"]
    if isinstance(model.noise, float):
        return ["prior_scale", "noise"]
    return ["prior_scale"] + [f"noise[{k}]" for k in range(model.noise.size)]


def set_hyperparameters(model: Any, theta: np.ndarray) -> None:
    model.prior_scale = float(np.exp(theta[0]))
    if per_observation(model.noise):
        return
    model.noise = float(np.exp(theta[1])) if isinstance(model.noise, float) else np.exp(theta[1:])


# ----- the leave-one-out density -----------------------------------------------------------------------------------

def loo_terms(alpha: Any, cinv: Any, directions: list[tuple[Any, Any]], xp: Any,
              to_host: Callable[[Any], np.ndarray]) -> tuple[float, list[np.ndarray]]:
    """The LOO log predictive density and its derivatives, per target column.

    ``alpha`` (m, q) = C⁻¹ r, ``cinv`` (m, q) or (m, 1) = diag(C⁻¹); ``directions`` a list of (Z α (m, q), diag(Z C⁻¹)
    (m, q) or (m, 1)) with Z = C⁻¹ ∂C/∂θ. Returns (Σ over rows and columns, [dLOO/dθ per column (q,)]).
    """
    ratio = alpha / cinv
    value = float(xp.sum(0.5 * xp.log(cinv) - 0.5 * alpha * ratio)) - 0.5 * alpha.size * _LOG_2PI
    weight = 0.5 * (1.0 + alpha * ratio) / cinv
    return value, [to_host(xp.sum(ratio * z_alpha - weight * z_diag, axis=0)) for z_alpha, z_diag in directions]


def spectral_basis(engine: Any, R: Any) -> dict[str, Any]:
    """What the spectral LOO needs of a fitted spectral engine, computed once: C = Σ_k d_k u_k u_kᵀ (+ σ² on the
    complement of the kept directions), u_k = b_k/√ν_k for the columns b_k of B.

    Function space: B = U (all m eigenvectors, ν = 1). Parameter space: B = J V over the kept directions (ν = λ, the
    Woodbury form), with the targets' part outside their span (r_out) and each row's weight outside it (1 − leverage).
    """
    xp = engine.backend.xp
    if isinstance(engine, post.FunctionSpectral):
        return {"B": engine.U, "B2": engine.U**2, "lam": engine.lam[:, None], "nu": xp.ones((engine.m, 1)),
                "Q": engine.Z, "r_out": None, "out": None}
    keep = engine.keep
    B, lam = engine.Jd @ engine.V[:, keep], engine.lam[keep][:, None]
    Q = engine.Qc[keep]
    B2 = B * B
    return {"B": B, "B2": B2, "lam": lam, "nu": lam, "Q": Q, "r_out": R - B @ (Q / lam),
            "out": xp.maximum(1.0 - B2 @ (1.0 / lam), 0.0)}


def spectral_loo(basis: dict[str, Any], s: float, noise: np.ndarray, backend: Any) -> tuple[float, float, np.ndarray]:
    """LOO of one spectral task at (s, σ² per column (q,)): (value, d/d log s, d/d log σ²_j (q,)), O(m·k·q).

    With d = sλ + σ²: C⁻¹ = Σ u uᵀ/d (+ out-of-span/σ²), C⁻¹ sK0 C⁻¹ = Σ sλ u uᵀ/d², σ² C⁻² = Σ σ² u uᵀ/d² (+
    out-of-span/σ²): every term is a sum of non-negative parts (no cancellation)."""
    xp = backend.xp
    sigma = xp.asarray(noise)[None, :]
    B, B2, lam, nu, Q = (basis[k] for k in ("B", "B2", "lam", "nu", "Q"))
    inv = 1.0 / (s * lam + sigma)
    w_alpha, w_s, w_noise = inv / nu, s * lam * inv * inv / nu, sigma * inv * inv / nu
    top = B @ xp.concatenate([Q * w_alpha, Q * w_s, Q * w_noise], axis=1)
    bottom = B2 @ xp.concatenate([w_alpha, w_s, w_noise], axis=1)
    q = Q.shape[1]
    alpha, za_s, za_noise = top[:, :q], top[:, q: 2 * q], top[:, 2 * q:]
    cinv, dz_s, dz_noise = bottom[:, :q], bottom[:, q: 2 * q], bottom[:, 2 * q:]
    if basis["r_out"] is not None:  # the complement of J's row space: eigenvalue 0, d = σ²
        alpha, za_noise = alpha + basis["r_out"] / sigma, za_noise + basis["r_out"] / sigma
        cinv, dz_noise = cinv + basis["out"] / sigma, dz_noise + basis["out"] / sigma
    value, (g_s, g_noise) = loo_terms(alpha, cinv, [(za_s, dz_s), (za_noise, dz_noise)], xp, backend.to_numpy)
    return value, float(g_s.sum()), g_noise


def _inverse_diagonals(backend: Any, L: Any, weights: Any) -> tuple[Any, Any]:
    """diag(C⁻¹) (m,) and (C⁻¹ ∘ C⁻¹) weights (m, w), C = L Lᵀ: C⁻¹ a block of columns at a time (no m × m
    inverse is held)."""
    xp = backend.xp
    m = int(L.shape[0])
    cinv, squares = xp.empty(m), xp.empty((m, int(weights.shape[1])))
    for start in range(0, m, TILE):
        stop = min(start + TILE, m)
        unit = xp.zeros((m, stop - start))
        unit[xp.arange(start, stop), xp.arange(stop - start)] = 1.0
        columns = backend.cho_solve(L, unit)  # C⁻¹[:, start:stop]
        cinv[start:stop] = columns[xp.arange(start, stop), xp.arange(stop - start)]
        squares[start:stop] = (columns * columns).T @ weights
    return cinv, squares


def function_cholesky_loo(engine: Any, index: np.ndarray, n_noise: int) -> tuple[float, np.ndarray]:
    """LOO of a fitted FunctionCholesky engine and its gradient (1 + n_noise,) in (log s, log σ²_k); ``index``
    (m, q) maps each entry to its noise parameter k (ignored when n_noise = 0: fixed noise). O(m³) per call.

    C = s·K0 + D: along log σ²_k, Z α = C⁻¹ D_k α and diag(Z C⁻¹) = (C⁻¹∘C⁻¹) diag(D_k); along log s (s·K0 =
    C − D), Z α = α − C⁻¹ D α and diag(Z C⁻¹) = diag(C⁻¹) − (C⁻¹∘C⁻¹) diag(D)."""
    be, xp, m = engine.backend, engine.backend.xp, engine.m
    value, grad = 0.0, np.zeros(1 + n_noise)
    for (cols, d), L in zip(engine.groups, engine.factors):
        noise = np.broadcast_to(d, (m,))
        inverse = None
        for j in cols:
            masks = [noise * (index[:, j] == k) for k in range(n_noise)]
            if masks or inverse is None:  # the group's columns share C: without noise parameters, one pass serves all
                inverse = _inverse_diagonals(be, L, xp.asarray(np.stack([noise] + masks, axis=1)))
            cinv, squares = inverse
            alpha = engine.alpha[:, j: j + 1]
            directions = [(alpha - be.cho_solve(L, xp.asarray(noise)[:, None] * alpha), cinv - squares[:, 0])]
            if n_noise:
                z_alpha = be.cho_solve(L, xp.asarray(np.stack(masks, axis=1)) * alpha)  # (m, n_noise)
                directions += [(z_alpha[:, k: k + 1], squares[:, 1 + k]) for k in range(n_noise)]
            part, grads = loo_terms(alpha, cinv[:, None], [(za, dz[:, None]) for za, dz in directions], xp,
                                    be.to_numpy)
            value += part
            grad += np.array([float(g.sum()) for g in grads])
    return value, grad


def parameter_cholesky_terms(engine: Any, R: Any, criterion: str) -> tuple[float, float]:
    """The criterion of a fitted ParameterCholesky engine and its derivative in log s (the noise is fixed), O(m·p²).

    With A = Jᵀ D⁻¹ J + I/s = L Lᵀ, G = L⁻¹ Jᵀ D⁻¹ (p, m) and μ the weights' posterior mean:
    evidence: d/d log s = ½ (‖μ‖²/s − tr(Jᵀ D⁻¹ J A⁻¹)), tr(...) = Σ_i D_i ‖G e_i‖²;
    LOO: α = D⁻¹ (r − J μ), diag(C⁻¹) = D⁻¹ − ‖G e_i‖², and along log s Z α = D⁻¹ J A⁻¹ μ / s,
    diag(Z C⁻¹) = ‖A⁻¹ Jᵀ D⁻¹ e_i‖² / s (C⁻¹ J = D⁻¹ J A⁻¹ / s)."""
    be, xp = engine.backend, engine.backend.xp
    s, Jd = engine.s, engine.Jd
    value, grad = 0.0, 0.0
    for (cols, d), L in zip(engine.groups, engine.factors):
        dinv = xp.asarray(1.0 / np.broadcast_to(d, (engine.m,)))
        G = be.solve_triangular(L, Jd.T * dinv[None, :], lower=True)
        leverage = (G * G).sum(axis=0)
        mu = engine.mu[:, cols]
        if criterion == "evidence":
            trace = float((xp.asarray(np.broadcast_to(d, (engine.m,))) * leverage).sum())
            grad += 0.5 * (float((mu * mu).sum()) / s - len(cols) * trace)
            continue
        alpha = dinv[:, None] * (R[:, cols] - Jd @ mu)
        cinv = (dinv - leverage)[:, None]
        H = be.solve_triangular(L, G, lower=True, trans=True)  # A⁻¹ Jᵀ D⁻¹
        z_alpha = dinv[:, None] * (Jd @ be.cho_solve(L, mu)) / s
        part, (g,) = loo_terms(alpha, cinv, [(z_alpha, ((H * H).sum(axis=0) / s)[:, None])], xp, be.to_numpy)
        value, grad = value + part, grad + float(g.sum())
    return (engine.lml() if criterion == "evidence" else value), grad


# ----- objectives --------------------------------------------------------------------------------------------------

def spectral_objective(model: Any, criterion: str = "evidence") -> Any:
    """−criterion and its gradient in (log s, log σ²...) from the engines' spectra: O(m·q) per evaluation for the
    evidence, O(m²·q) (function space) or O(m·p·q) (parameter space) for LOO."""
    bases = [spectral_basis(engine, R) for engine, R in zip(model._engines, model._R)] if criterion == "loo" else None

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        s, noise = float(np.exp(theta[0])), np.exp(theta[1:])
        value, grad = 0.0, np.zeros_like(theta)
        for t, (task, engine) in enumerate(zip(model._tasks, model._engines)):
            index = np.broadcast_to(model._layout.noise_index(model.noise, task, model.n_), (1, engine.q))[0]
            if bases is None:
                lam, weights, rest, m = engine.spectrum()
                part, g_s, g_noise = post.spectral_lml(lam, weights, rest, m, s, noise[index])
            else:
                part, g_s, g_noise = spectral_loo(bases[t], s, noise[index], engine.backend)
            value += part
            grad[0] += g_s
            np.add.at(grad, 1 + index, g_noise)
        return -value, -grad
    return objective


def cholesky_objective(model: Any, criterion: str = "evidence") -> Any:
    """−criterion and its exact gradient, refitting the engines per evaluation (per-row or fixed noise)."""
    fixed = per_observation(model.noise)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        set_hyperparameters(model, theta)
        model._fit_engines()
        value, grad = 0.0, np.zeros_like(theta)
        for task, engine, R in zip(model._tasks, model._engines, model._R):
            if isinstance(engine, post.ParameterCholesky):  # only for fixed noise (optimize checks)
                part, g_s = parameter_cholesky_terms(engine, R, criterion)
                value, grad[0] = value + part, grad[0] + g_s
                continue
            index = (np.zeros((engine.m, engine.q), dtype=np.int64) if fixed else
                     np.broadcast_to(model._layout.noise_index(model.noise, task, model.n_), (engine.m, engine.q)))
            if criterion == "evidence":
                value += engine.lml()
                grad += engine.gradient(index)[: theta.size]
            else:
                part, g = function_cholesky_loo(engine, index, theta.size - 1)
                value, grad = value + part, grad + g
        return -value, -grad
    return objective


def with_hyperprior(objective: Any, prior: Hyperprior | None) -> Any:
    """−(criterion + log prior) and its gradient: the MAP objective (``objective`` itself without a prior)."""
    if prior is None:
        return objective

    def wrapped(theta: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = objective(theta)
        log_prior, g_prior = prior.log_density_and_gradient(theta)
        return value - log_prior, grad - g_prior
    return wrapped


def starting_point(model: Any, objective: Any, grid: bool) -> np.ndarray:
    """The best of: the current values, a data-scaled guess (s·mean diag K0 = σ² = half the mean square of the
    targets around the prior mean) and, on spectral paths where evaluations are cheap, a log grid around that
    guess. L-BFGS from a poor start can slide into the s → 0 (all noise) or σ² → 0 corners."""
    size = len(parameter_names(model))
    current = np.log(np.concatenate([[model.prior_scale], np.ravel(model.noise)]))[:size]
    guess = data_scaled_guess(model)
    if guess is None:
        return current
    log_s, log_noise = np.log(guess[0]), np.log(guess[1])
    candidates = [current, np.array([log_s] + [log_noise] * (size - 1))]
    if grid:
        candidates += [np.array([log_s + a] + [log_noise + b] * (size - 1))
                       for a in np.linspace(-4, 4, 17) * np.log(10) for b in np.linspace(-4, 1, 11) * np.log(10)]
    low, high = LOG_BOUNDS
    values = [objective(np.clip(theta, low, high))[0] for theta in candidates]
    return np.clip(candidates[int(np.argmin(values))], low, high)


def _check_loo_memory(model: Any, spectral: bool) -> None:
    """The spectral LOO holds U∘U (m × m) or J V and its square (m × p) per task beside the engines."""
    if not spectral:
        return  # the Cholesky LOO works a tile of C⁻¹'s columns at a time
    plan = model.plan_
    per_task = 8 * plan.rows * plan.rows if plan.space == "function" else 3 * 8 * plan.rows * min(plan.p, plan.rows)
    problem = model._problem(model._J)
    v.check_memory(plan.tasks * per_task + _plan.engine_bytes(plan.method, problem),
                   v.resolve_memory_budget(model.memory_budget, model._backend),
                   what=f"criterion='loo' on method={plan.method!r} (its engines and {plan.tasks} × "
                        f"{v.format_bytes(per_task)} of leave-one-out work arrays)",
                   alternative="use criterion='evidence' (no extra memory), or a subset of the data")


# ----- the search --------------------------------------------------------------------------------------------------

def _at_bounds(names: list[str], theta: np.ndarray, criterion: str, prior: Hyperprior | None) -> list[tuple[str,
                                                                                                          str]]:
    """(name, sentence) per parameter within BOUND_TOLERANCE of LOG_BOUNDS: its value, what it means, what to try
    (the remedies not already in use)."""
    meaning = {("prior_scale", 0): "the data are explained as noise (the posterior is the prior)",
               ("prior_scale", 1): "the prior on the weights is unbounded (the kernel's scale runs away)",
               ("noise", 0): "the targets are interpolated as if noiseless",
               ("noise", 1): "the targets are explained as noise alone"}
    remedies = (["criterion='loo'"] if criterion == "evidence" else []) + \
        (["a hyperprior"] if prior is None else ["a narrower hyperprior"])
    out = []
    for name, x in zip(names, theta):
        for side, bound in enumerate(LOG_BOUNDS):
            if abs(x - bound) < BOUND_TOLERANCE:
                symbol = "s" if name == "prior_scale" else "σ²"
                where = "lower" if side == 0 else "upper"
                out.append((name, f"{name} = {np.exp(x):.3g} ({symbol} at its {where} bound e^{bound:g}): "
                                  f"{meaning[(name.split('[')[0], side)]}; try {' or '.join(remedies)}"))
    return out


def settle_at_bounds(objective: Any, theta: np.ndarray) -> np.ndarray:
    """θ with each parameter whose objective still improves towards a bound moved onto it, when that is better.

    L-BFGS stops once the projected gradient is below its tolerance, and in log coordinates a criterion that rises
    all the way to s → 0 has a gradient that vanishes with s (∂C/∂log s = s·K0): it stops decades short of the
    bound (measured: e^-15 instead of e^-30 on targets orthogonal to the kernel), where the GP has collapsed all the
    same. Trying the bound in the ascent direction (one evaluation per parameter) reports such a supremum as what it
    is; a point is moved only where the bound is better. The caller re-optimizes the other parameters after a move
    (they were tuned for the old value)."""
    value, grad = objective(theta)
    for k in range(theta.size):
        bound = LOG_BOUNDS[0] if grad[k] > 0 else LOG_BOUNDS[1]  # −criterion is minimized: ascent is −grad
        if grad[k] == 0 or abs(theta[k] - bound) < BOUND_TOLERANCE:
            continue
        trial = theta.copy()
        trial[k] = bound
        trial_value, trial_grad = objective(trial)
        if trial_value < value - _SETTLE_RTOL * abs(value):  # better beyond rounding of the sum
            theta, value, grad = trial, trial_value, trial_grad
    return theta


def optimize(model: Any, per_output_noise: bool | None, maxiter: int, criterion: str = "evidence",
             hyperprior: Any = None) -> None:
    """Maximize the draft ``model``'s criterion (+ log hyperprior) over s and σ² and refit it at the optimum;
    ``per_output_noise`` is ignored (None) for fixed per-observation noise, where s alone is fitted."""
    from scipy.optimize import minimize

    fixed = per_observation(model.noise)
    if not fixed and per_output_noise and isinstance(model.noise, float):
        model.noise = np.full(model.c_, model.noise)
    elif not fixed and not per_output_noise and not isinstance(model.noise, float):
        model.noise = float(np.exp(np.log(model.noise).mean()))
    prior = resolve_hyperprior(model, hyperprior)
    lml_before = model.log_marginal_likelihood()
    per_row = fixed or (model.output_mode == "full" and not isinstance(model.noise, float))
    chosen = model.plan_.method
    if not per_row:
        model._switch(f"{model.plan_.space}-spectral")
    elif model.plan_.space == "function":
        # the Cholesky objective refits the engines in place: always on new ones, so the committed model keeps its own
        model._switch("function-cholesky", fresh=True)
    if criterion == "loo":
        _check_loo_memory(model, not per_row)
    criterion_objective = cholesky_objective(model, criterion) if per_row else spectral_objective(model, criterion)
    objective = with_hyperprior(criterion_objective, prior)
    theta0 = starting_point(model, objective, not per_row)
    theta, iterations, evaluations = theta0, 0, 0
    for _ in range(2):  # after a parameter settles on its bound, one more run re-optimizes the others there
        result = minimize(objective, theta, jac=True, method="L-BFGS-B", bounds=[LOG_BOUNDS] * theta.size,
                          options={"maxiter": maxiter})
        theta = settle_at_bounds(objective, result.x)
        iterations, evaluations = iterations + int(result.nit), evaluations + int(result.nfev)
        if np.array_equal(theta, result.x):
            break
    criterion_value = -float(criterion_objective(theta)[0])
    set_hyperparameters(model, theta)
    if model.method == "auto" and chosen != model.plan_.method:
        note = ("hyperparameters optimized on one eigendecomposition, which is kept for predictions" if not per_row
                else "per-output noise optimized with exact factorizations")
        model.plan_ = model.plan_.with_method(model.plan_.method, f"{model._first_reason}; {note}")
    if chosen != model.plan_.method and model.method != "auto":
        model._switch(chosen)  # the method the user forced, at the optimized hyperparameters
    else:
        model._fit_engines()
    at_bounds = _at_bounds(parameter_names(model), theta, criterion, prior)
    model.optimization_ = {"success": bool(result.success), "message": str(result.message),
                           "iterations": iterations, "evaluations": evaluations,
                           "lml_before": lml_before, "lml_after": model.log_marginal_likelihood(),
                           "criterion": criterion, "criterion_value": criterion_value,
                           "hyperprior": None if prior is None else prior.as_dict(),
                           "log_hyperprior": None if prior is None else prior.log_density_and_gradient(theta)[0],
                           "at_bound": [name for name, _ in at_bounds], **model._hyperparameters()}
    if at_bounds:  # before the caller commits: with warnings as errors the model stays as it was
        v.warn("optimize_hyperparameters: " + "; ".join(text for _, text in at_bounds), v.NumericalWarning)
