"""Averaging LinearizedGP's predictions over its hyperparameters (s, σ²) on a log grid, on one eigendecomposition.

With a few dozen observations the marginal likelihood is flat over decades of (s, σ²), and its maximum alone can
sit at a corner (s → 0: everything is noise). The Bayesian answer integrates the hyperparameters out:

    p(f* | y) = ∫ p(f* | y, θ) p(θ | y) dθ  ≈  Σ_g w_g N(mean_g, var_g),   w_g ∝ p(y | θ_g) p(θ_g),

θ = (log s, log σ²) on a regular grid (the quadrature of the integral in log coordinates; the grid's cell volume is
one constant and cancels). Each grid point costs O(m·q) for its evidence on a spectral engine (one
eigendecomposition for all of them) and O(m*·m·q) for its predictions (the test rows are projected on the
eigenvectors once). The mixture's moments are mean = Σ w_g mean_g and var = Σ w_g (var_g + (mean_g − mean)²),
accumulated in one pass by West's weighted update (each point's spread is added against the running mean), never as
Σ w_g (var_g + mean_g²) − mean², which would subtract nearly equal numbers. A LinearizedGP's grid points are evaluated
in batches (two matrix products per batch) whose spreads are merged by the same update's parallel form.

Points whose weights together hold less than 1 − ``keep_mass`` of the total are dropped (and the rest renormalized),
so predictions cost as many evaluations as points that matter.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from lingp_core import _validate as v
from lingp_core._hyperparameters import data_scaled_guess

#: The grid spans this many decades either side of the data-scaled centre for s, and from this many decades below
#: to NOISE_DECADES_ABOVE above it for σ² (a noise far above the targets' own variance explains nothing).
SPAN_DECADES = 6.0
NOISE_DECADES_ABOVE = 1.0


@dataclasses.dataclass(frozen=True)
class HyperparameterMixture:
    """The kept grid points and their posterior weights (host float64 arrays of one length G, weights sum to 1)."""

    prior_scales: np.ndarray
    noises: np.ndarray
    weights: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {"averaging_prior_scales": self.prior_scales, "averaging_noises": self.noises,
                "averaging_weights": self.weights}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> HyperparameterMixture:
        mixture = cls(*(np.asarray(arrays[f"averaging_{name}"], dtype=np.float64)
                        for name in ("prior_scales", "noises", "weights")))
        if (mixture.prior_scales <= 0).any() or (mixture.noises <= 0).any() or (mixture.weights < 0).any() or \
                not np.isclose(mixture.weights.sum(), 1.0, rtol=1e-9):
            raise v.ValueRangeError("the averaging grid's prior scales and noises must be > 0 and its weights "
                                    "non-negative, summing to 1")
        return mixture

    @property
    def effective_points(self) -> float:
        """1 / Σ w²: how many grid points carry the mixture (1 when one point holds all the weight)."""
        return float(1.0 / np.sum(self.weights**2))


def log_grid(center_s: float, center_noise: float, size: int, span: float) -> tuple[np.ndarray, np.ndarray]:
    """(log s, log σ²) of a size × size grid, flattened: s within ±span decades of center_s, σ² from span decades
    below center_noise to NOISE_DECADES_ABOVE above it."""
    ten = np.log(10.0)
    log_s = np.log(center_s) + np.linspace(-span, span, size) * ten
    log_noise = np.log(center_noise) + np.linspace(-span, NOISE_DECADES_ABOVE, size) * ten
    grid_s, grid_noise = np.meshgrid(log_s, log_noise, indexing="ij")
    return grid_s.ravel(), grid_noise.ravel()


def posterior_weights(log_evidence: np.ndarray, log_prior: np.ndarray, keep_mass: float) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
    """(indices, weights) of the grid points that hold ``keep_mass`` of the posterior, weights renormalized."""
    from scipy.special import logsumexp  # scipy loads on use, not when lingp_core is imported

    log_w = log_evidence + log_prior
    w = np.exp(log_w - logsumexp(log_w))
    order = np.argsort(w)[::-1]
    count = int(np.searchsorted(np.cumsum(w[order]), keep_mass) + 1)
    kept = np.sort(order[: min(count, w.size)])
    kept = kept[w[kept] > 0]  # rounding can keep the cumulative sum below keep_mass ≈ 1: zero weights stay out
    return kept, w[kept] / w[kept].sum()


def check_keep_mass(keep_mass: Any) -> float:
    """The posterior mass an average keeps: a number in (0, 1]."""
    keep_mass = v.check_positive(keep_mass, "keep_mass")
    if keep_mass > 1:
        raise v.ValueRangeError(f"keep_mass must lie in (0, 1], got {keep_mass}")
    return keep_mass


def spectral_log_evidence(model: Any, log_s: np.ndarray, log_noise: np.ndarray) -> np.ndarray:
    """log p(y | s, σ²) at every grid point, summed over the model's spectral engines: O(G·m·q)."""
    total = np.zeros(log_s.size)
    for engine in model._engines:
        lam, weights, rest, m = engine.spectrum()
        k, q = weights.shape
        target_weights, target_rest = weights.sum(axis=1), float(rest.sum())  # one σ² for every column
        step = max(1, _GRID_CHUNK // max(k, 1))
        for start in range(0, log_s.size, step):  # the formulas of post.spectral_lml, for many points at once
            s, noise = np.exp(log_s[start:start + step]), np.exp(log_noise[start:start + step])
            d = s[:, None] * lam[None, :] + noise[:, None]  # (points, k)
            data = target_rest / noise + (target_weights[None, :] / d).sum(axis=1)
            logdet = q * (np.log(d).sum(axis=1) + (m - k) * np.log(noise))
            total[start:start + step] += -0.5 * (data + logdet) - 0.5 * m * q * np.log(2 * np.pi)
    return total


#: Grid points × eigenvalues evaluated at once by spectral_log_evidence (bounds its temporary arrays)
_GRID_CHUNK = 1 << 20


def mixture_moments(component: Callable[[int], tuple[Any, Any]], weights: np.ndarray) -> tuple[Any, Any]:
    """Mean and variance of the mixture of ``component(g) = (mean_g, var_g)`` with these weights (summing to 1), each
    component evaluated once (West 1979: running mean and weighted sum of within- and between-component spread)."""
    state = (0.0, 0.0, 0.0)
    for g, w in enumerate(weights):
        if w == 0:  # underflowed weights add nothing (and would divide 0 by 0 while total is 0)
            continue
        m_g, v_g = component(g)
        state = _merge(state, float(w), m_g, w * v_g)
    total, mean, spread = state
    return mean, spread / total


def _merge(state: tuple[Any, Any, Any], w_b: float, mean_b: Any, spread_b: Any) -> tuple[Any, Any, Any]:
    """West's update in its parallel form (Chan, Golub & LeVeque 1979): the running (total weight, mean, weighted
    spread) merged with a part of weight w_b, mean mean_b and weighted spread spread_b about its own mean; the
    between-part term delta²·W·w_b/(W + w_b) subtracts nothing nearly equal."""
    total, mean, spread = state
    delta = mean_b - mean
    merged = total + w_b
    return merged, mean + delta * (w_b / merged), spread + spread_b + delta * delta * (total * w_b / merged)


#: Grid points evaluated together by :func:`batched_mixture_moments`: a batch's largest arrays — the (m*, q, k) means
#: and variances and the engine's (m or p, q, k) coefficients — stay within this many float64 values (32 MiB) each.
BATCH_VALUES = 2**22


def batch_points(values_per_point: int) -> int:
    """Grid points per batch when one point's largest arrays hold ``values_per_point`` values (at least 1)."""
    return max(1, BATCH_VALUES // max(1, int(values_per_point)))


def batched_mixture_moments(moments_at: Callable[[np.ndarray], tuple[Any, Any]], weights: np.ndarray,
                            values_per_point: int, xp: Any) -> tuple[Any, Any]:
    """:func:`mixture_moments` with the points evaluated in batches: ``moments_at(indices)`` returns the means and
    variances of those points stacked along a last axis, (…, k) each (variances None when not wanted), as ``xp``
    arrays; each batch's spread about its own mean is merged by :func:`_merge`. ``values_per_point``: the values
    one point adds to the batch's largest arrays, which sizes the batches (:func:`batch_points`)."""
    points = np.flatnonzero(weights > 0)  # underflowed weights add nothing
    batch = batch_points(values_per_point)
    state = (0.0, 0.0, 0.0)
    for start in range(0, points.size, batch):
        index = points[start: start + batch]
        w = np.asarray(weights[index], dtype=np.float64)
        w_b, w_xp = float(w.sum()), xp.asarray(w)
        means, variances = moments_at(index)
        mean_b = (means @ w_xp) / w_b
        deviation = means - mean_b[..., None]
        spread_b = (deviation * deviation) @ w_xp
        if variances is not None:
            spread_b = spread_b + variances @ w_xp
        state = _merge(state, w_b, mean_b, spread_b)
    total, mean, spread = state
    return mean, spread / total


def average(model: Any, grid_size: int, span: float, log_prior: Callable[[np.ndarray, np.ndarray], np.ndarray],
            keep_mass: float) -> None:
    """Weight a log grid of (s, σ²) by evidence × hyperprior on the draft ``model``'s spectral engines, keep the
    points that matter, and refit the engines at the heaviest point (what log_marginal_likelihood reports)."""
    chosen = model.plan_.method
    model._switch(f"{model.plan_.space}-spectral")
    if model.method != "auto" and model.plan_.method != chosen:
        raise v.InvalidOptionError(f"averaging runs on one eigendecomposition, but method={model.method!r} was "
                                   f"forced; use method='auto', 'spectral' or '{model.plan_.method}'")
    center_s, center_noise = data_scaled_guess(model, "averaging centres its grid")
    log_s, log_noise = log_grid(center_s, center_noise, grid_size, span)
    _check_grid_range(log_s, log_noise, span, center_s, center_noise)
    log_evidence = spectral_log_evidence(model, log_s, log_noise)
    log_prior_values = log_prior(log_s, log_noise)
    kept, weights = posterior_weights(log_evidence, log_prior_values, keep_mass)
    model._mixture = HyperparameterMixture(np.exp(log_s[kept]), np.exp(log_noise[kept]), weights)
    top = kept[int(np.argmax(weights))]
    model.prior_scale, model.noise = float(np.exp(log_s[top])), float(np.exp(log_noise[top]))
    if model.method == "auto" and chosen != model.plan_.method:
        model.plan_ = model.plan_.with_method(model.plan_.method, f"{model._first_reason}; hyperparameters averaged "
                                              "on one eigendecomposition, which is kept for predictions")
    model._fit_engines()
    edge = _on_edge(log_s[kept], log_noise[kept], log_s, log_noise, weights)
    model.averaging_ = {"grid_size": grid_size, "span_decades": span, "center": {"prior_scale": center_s,
                        "noise": center_noise}, "points_kept": int(kept.size),
                        "effective_points": model._mixture.effective_points, "heaviest": model._hyperparameters(),
                        "weight_on_grid_edge": edge,
                        "log_mass": log_mass(log_evidence + log_prior_values, grid_size, span)}
    if edge > 0.01:
        v.warn(f"{edge:.1%} of the hyperparameter posterior lies on the edge of the averaging grid "
               f"(±{span} decades around s₀ = {center_s:.3g}, σ²₀ = {center_noise:.3g}): the grid truncates it; "
               "widen span or add a hyperprior", v.NumericalWarning)


def uniform_log_prior(span: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The log density of a prior uniform in (log s, log σ²) over the grid's area (natural logs), for averaging
    without a hyperprior: a constant, so it leaves the weights as they are and makes :func:`log_mass` log p(y)."""
    log_area = float(np.log(_grid_area(span)))
    return lambda log_s, log_noise: np.full(np.shape(log_s), -log_area)


def _grid_area(span: float) -> float:
    """The averaging grid's area in (log s, log σ²), natural-log units: 2·span decades of s by
    span + NOISE_DECADES_ABOVE of σ²."""
    ten = np.log(10.0)
    return 2 * span * ten * (span + NOISE_DECADES_ABOVE) * ten


def log_mass(log_joint: np.ndarray, grid_size: int, span: float) -> float:
    """log ∫ p(y | θ) p(θ) dθ by the grid's quadrature (cell area in natural-log units): the evidence of the whole
    averaged model (log p(y) for a normalized hyperprior), comparable between models averaged on grids of the same
    size and span (the Jacobian kernels of :class:`lingp_core.BlockWeightAverage`)."""
    from scipy.special import logsumexp

    cell = _grid_area(span) / (grid_size - 1) ** 2
    return float(logsumexp(log_joint) + np.log(cell))


#: Grid values must stay this far inside float64 (s, σ², σ²/s and their products with the spectrum stay finite).
_LOG_LIMIT = 250 * float(np.log(10.0))


def _check_grid_range(log_s: np.ndarray, log_noise: np.ndarray, span: float, center_s: float,
                      center_noise: float) -> None:
    """ValueRangeError when the grid reaches values whose spectral formulas leave float64 (1e±250)."""
    extremes = (log_s.min(), log_s.max(), log_noise.min(), log_noise.max(), log_noise.max() - log_s.min())
    if max(abs(x) for x in extremes) > _LOG_LIMIT:
        raise v.ValueRangeError(f"span = {span} decades around s₀ = {center_s:.3g}, σ²₀ = {center_noise:.3g} reaches "
                                f"s from {np.exp(log_s.min()):.3g} to {np.exp(log_s.max()):.3g} and σ²/s up to "
                                f"{np.exp(min(extremes[4], 709.0)):.3g}: beyond 1e±250, where the spectral formulas "
                                "leave float64; use a smaller span")


def _on_edge(kept_s: np.ndarray, kept_noise: np.ndarray, log_s: np.ndarray, log_noise: np.ndarray,
             weights: np.ndarray) -> float:
    """The weight of kept points on the grid's boundary."""
    edge = (np.isclose(kept_s, log_s.min()) | np.isclose(kept_s, log_s.max()) |
            np.isclose(kept_noise, log_noise.min()) | np.isclose(kept_noise, log_noise.max()))
    return float(weights[edge].sum())
