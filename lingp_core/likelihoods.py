"""Likelihoods and their curvature Λ: the per-example Hessian of the negative log-likelihood in the outputs.

The generalized Gauss–Newton / Fisher matrix is F = Jᵀ Λ J with Λ block diagonal, one c × c block Λ_i per example.
Λ is never formed as an n·c × n·c matrix: each likelihood gives per-example factors L_i with L_i L_iᵀ = Λ_i, as an
(n, c) array when Λ_i is diagonal (Gaussian, Bernoulli) or an (n, c, c) array (categorical), so that
F = Gᵀ G with G's rows per example L_iᵀ J_i (see :meth:`lingp_core.jacobian.JacobianBlocks.transform_rows`).

- Gaussian, noise σ² (scalar or one per output): Λ_i = diag(1/σ²), L_i = diag(1/σ).
- Bernoulli, one logit f: Λ_i = p(1 − p) with p = sigmoid(f), L_i = √(p(1 − p)).
- Categorical, c logits: p_i = softmax(f_i), Λ_i = diag(p_i) − p_i p_iᵀ, L_i = diag(√p_i) − p_i √p_iᵀ
  (L_i L_iᵀ = diag(p) − 2 p pᵀ + p (Σ_k p_k) pᵀ = Λ_i because Σ_k p_k = 1).

Everything works through ``backend.xp`` on the backend of f, in f's dtype.
"""
from __future__ import annotations

from typing import Any

import numpy as np

import backends
from lingp_core import _validate as v

__all__ = ["BernoulliLikelihood", "CategoricalLikelihood", "GaussianLikelihood", "Likelihood", "LIKELIHOODS",
           "check_noise"]


class Likelihood:
    """Base class: a likelihood p(y | f) of the c network outputs f of each example.

    Subclasses implement :meth:`_sqrt_curvature` and :meth:`_check_labels`, and may narrow :meth:`_check_outputs`.
    """

    name = ""
    #: Whether the per-example factors are diagonal, returned as (n, c) instead of (n, c, c).
    diagonal = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ----- public ----------------------------------------------------------------------------------------------
    def sqrt_curvature(self, f: Any) -> Any:
        """Per-example factors L_i with L_i L_iᵀ = Λ_i, in f's dtype and backend.

        Parameters
        ----------
        f : array of shape (n, c)
            Network outputs (logits for Bernoulli and categorical).

        Returns
        -------
        array of shape (n, c) (diagonal factors: Gaussian, Bernoulli) or (n, c, c) (categorical)
        """
        return self._sqrt_curvature(self.check_outputs(f))

    def curvature(self, f: Any) -> Any:
        """Dense per-example curvature Λ_i = ∂²(−log p(y_i | f_i)) / ∂f_i²: (n, c, c), for tests and small uses."""
        factor = self.sqrt_curvature(f)
        if factor.ndim == 2:
            xp = v.backend_of(factor).xp
            n, c = factor.shape
            out = xp.zeros((n, c, c), dtype=factor.dtype)
            out[:, np.arange(c), np.arange(c)] = factor * factor
            return out
        return factor @ factor.transpose(0, 2, 1)

    def check_outputs(self, f: Any) -> Any:
        """f checked: a finite float (n, c) array on its backend, with c allowed by this likelihood."""
        arr = v.as_float_array(f, "f", v.backend_of(f), ndim=2)
        self._check_outputs(arr)
        return arr

    def check_labels(self, y: Any, f: Any) -> Any:
        """Labels y checked against outputs f (n, c): shape, dtype and range for this likelihood; y on f's backend.

        Raises
        ------
        ShapeError, DTypeError, ValueRangeError, NonFiniteError, BackendMismatchError
        """
        f = self.check_outputs(f)
        backend = v.backend_of(f)
        return self._check_labels(v.as_array(y, "y", backend), f, backend)

    # ----- classification (Bernoulli, categorical): the pieces LaplaceClassifier uses ------------------------------
    def targets(self, y: Any, n: int, c: int) -> Any:
        """Checked labels y as the float64 target matrix T (n, c) with ∇_f NLL = mean(f) − T."""
        raise NotImplementedError(f"{type(self).__name__} is not a classification likelihood")

    def nll(self, f: Any, T: Any) -> float:
        """The negative log-likelihood Σ_i −log p(y_i | f_i) of targets T at outputs f (n, c), float64."""
        raise NotImplementedError(f"{type(self).__name__} is not a classification likelihood")

    def mean(self, f: Any) -> Any:
        """The mean of y given f: (n, c) probabilities."""
        raise NotImplementedError(f"{type(self).__name__} is not a classification likelihood")

    def curvature_change(self, f: Any, df: Any) -> Any:
        """The derivative of Λ_i(f_i) in the direction df_i: (n, c, c)."""
        raise NotImplementedError(f"{type(self).__name__} is not a classification likelihood")

    def class_probabilities(self, mean: Any) -> Any:
        """Class probabilities (rows summing to 1) from :meth:`mean`."""
        raise NotImplementedError(f"{type(self).__name__} is not a classification likelihood")

    # ----- for subclasses --------------------------------------------------------------------------------------
    def _check_outputs(self, f: Any) -> None:
        if f.shape[1] < 1:
            raise v.ShapeError(f"f has shape {tuple(f.shape)}; a likelihood needs at least one output per example")

    def _sqrt_curvature(self, f: Any) -> Any:
        raise NotImplementedError

    def _check_labels(self, y: Any, f: Any, backend: Any) -> Any:
        raise NotImplementedError


def check_noise(noise: Any, *, per_observation: bool = False) -> float | np.ndarray:
    """A noise variance σ² > 0 as a float, or one per output as a float64 host array (c,) — with
    ``per_observation`` also one per observation (n, c) — from a number or an array (NumPy or CuPy); ShapeError,
    DTypeError, NonFiniteError or ValueRangeError otherwise."""
    v.refuse_masked(noise, "noise")
    # noise arrays are read on the host in float64 (per output: a few numbers; per observation: one per target)
    arr = v.backend_of(noise).to_numpy(noise) if backends.backend_name_of(noise) else noise
    try:
        ndim = np.ndim(arr)
    except ValueError:  # a ragged nesting of lists
        raise v.ShapeError(f"noise is a ragged nested sequence ({v.describe(noise)})") from None
    if ndim == 0:  # a Python or NumPy scalar, or a 0-d array
        return v.check_positive(arr.item() if hasattr(arr, "item") else arr, "noise")
    arr = np.asarray(arr)
    if arr.ndim not in ((1, 2) if per_observation else (1,)) or arr.size == 0:
        shapes = "(c,) or (n, c)" if per_observation else "(c,)"
        raise v.ShapeError(f"noise must be a number or a non-empty array of shape {shapes} (one variance per "
                           f"output{' or per observation' if per_observation else ''}), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise v.DTypeError(f"noise has dtype {arr.dtype}; expected real numbers")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise v.NonFiniteError(f"noise (shape {arr.shape}) holds NaN or Inf, first at {tuple(bad.tolist())}")
    if (arr <= 0).any():
        bad = np.argwhere(arr <= 0)[0]
        raise v.ValueRangeError(f"noise variances must be > 0; noise{list(bad.tolist())} = {arr[tuple(bad)]}")
    return arr


class GaussianLikelihood(Likelihood):
    """y_ik ~ N(f_ik, σ²_k): Λ_i = diag(1/σ²).

    Parameters
    ----------
    noise : float or array_like of shape (c,)
        The noise variance σ² > 0, one for all outputs or one per output.
    """

    name = "gaussian"

    def __init__(self, noise: Any = 1.0) -> None:
        self.noise: Any = check_noise(noise)

    def __repr__(self) -> str:
        noise = self.noise if isinstance(self.noise, float) else self.noise.tolist()
        return f"GaussianLikelihood(noise={noise})"

    def _check_outputs(self, f: Any) -> None:
        super()._check_outputs(f)
        if not isinstance(self.noise, float) and self.noise.size != f.shape[1]:
            raise v.ShapeError(f"noise has {self.noise.size} per-output variances (shape {self.noise.shape}) but f "
                               f"has shape {tuple(f.shape)}, i.e. c = {f.shape[1]} outputs")

    def curvature(self, f: Any) -> Any:
        """Λ_i = diag(1/σ²) per example: (n, c, c) in f's dtype.

        Raises
        ------
        ValueRangeError
            When 1/σ² (or 1/σ) is not a normal number of f's dtype (e.g. σ² < 3e-39 for float32 f).
        """
        f = self.check_outputs(f)
        self._check_fits(1.0 / np.asarray(self.noise, dtype=np.float64), "1/σ²", f.dtype)
        return super().curvature(f)

    def _sqrt_curvature(self, f: Any) -> Any:
        xp = v.backend_of(f).xp
        inv_sd = np.broadcast_to(1.0 / np.sqrt(self.noise), (f.shape[1],))
        self._check_fits(inv_sd, "1/σ", f.dtype)
        inv_sd = inv_sd.astype(f.dtype)
        return xp.broadcast_to(xp.asarray(inv_sd)[None, :], f.shape).copy()

    def _check_fits(self, values: Any, what: str, dtype: Any) -> None:
        """ValueRangeError unless every value (float64, from the noise) is a normal number of f's ``dtype``."""
        values = np.asarray(values, dtype=np.float64)
        noise = np.broadcast_to(np.asarray(self.noise, dtype=np.float64), values.shape).reshape(-1)
        v.check_normal(values, dtype, lambda j: f"noise σ² = {noise[j]:.3g} gives {what} = {values.reshape(-1)[j]:.3g}",
                       hint="use float64 outputs (and Jacobian) or a noise in range")

    def _check_labels(self, y: Any, f: Any, backend: Any) -> Any:
        y = v.as_float_array(y, "y", backend, ndim=(1, 2), dtypes=(f.dtype,))
        if y.ndim == 1 and f.shape[1] == 1:
            y = y[:, None]
        v.check_shape(y, "y", f.shape)
        return y


class BernoulliLikelihood(Likelihood):
    """y_i ∈ {0, 1} (or a probability) ~ Bernoulli(sigmoid(f_i)) for one logit per example: Λ_i = p(1 − p)."""

    name = "bernoulli"

    def _check_outputs(self, f: Any) -> None:
        if f.shape[1] != 1:
            raise v.ShapeError(f"a Bernoulli likelihood takes one logit per example, but f has shape "
                               f"{tuple(f.shape)} (c = {f.shape[1]}); use CategoricalLikelihood for c classes")

    def _sqrt_curvature(self, f: Any) -> Any:
        xp = v.backend_of(f).xp
        # p (1 − p) = e^{−|f|} / (1 + e^{−|f|})², which never overflows; its square root is e^{−|f|/2} / (1 + e^{−|f|})
        e = xp.exp(-xp.abs(f))
        return xp.exp(-0.5 * xp.abs(f)) / (1 + e)

    def targets(self, y: Any, n: int, c: int) -> Any:
        """Checked labels as the float64 target matrix T (n, 1): ∇_f NLL = mean(f) − T."""
        return y.astype(np.float64).reshape(n, 1)

    def nll(self, f: Any, T: Any) -> float:
        """Σ_i softplus(f_i) − T_i f_i, without overflow."""
        xp = v.backend_of(f).xp
        return float((xp.maximum(f, 0.0) + xp.log1p(xp.exp(-xp.abs(f))) - T * f).sum())

    def mean(self, f: Any) -> Any:
        """sigmoid(f) (n, 1), without overflow."""
        return 0.5 * (1.0 + v.backend_of(f).xp.tanh(0.5 * f))

    def curvature_change(self, f: Any, df: Any) -> Any:
        """dΛ_i in the direction df_i: (1 − 2π) π (1 − π) df, as (n, 1, 1)."""
        pi = self.mean(f)
        return ((1.0 - 2.0 * pi) * pi * (1.0 - pi) * df)[:, :, None]

    def class_probabilities(self, mean: Any) -> Any:
        """[P(y = 0), P(y = 1)] (n, 2) from P(y = 1) (n, 1), as scikit-learn's predict_proba."""
        return v.backend_of(mean).xp.concatenate([1.0 - mean, mean], axis=1)

    def _check_labels(self, y: Any, f: Any, backend: Any) -> Any:
        xp = backend.xp
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        v.check_shape(y, "y", (f.shape[0],))
        if y.dtype == np.bool_ or np.issubdtype(y.dtype, np.integer):
            bad = (y != 0) & (y != 1)
            if bool(bad.any()):
                raise v.ValueRangeError(f"Bernoulli labels must be 0 or 1; y holds {int(bad.sum())} other values, "
                                        f"e.g. {backend.to_numpy(y[xp.argmax(bad)]).item()}")
            return y
        y = v.as_float_array(y, "y", backend, ndim=1)
        bad = (y < 0) | (y > 1)
        if bool(bad.any()):
            raise v.ValueRangeError(f"Bernoulli labels must be probabilities in [0, 1]; y holds {int(bad.sum())} "
                                    f"values outside, e.g. {backend.to_numpy(y[xp.argmax(bad)]).item()}")
        return y


class CategoricalLikelihood(Likelihood):
    """y_i ∈ {0, …, c−1} ~ Categorical(softmax(f_i)): Λ_i = diag(p_i) − p_i p_iᵀ, c × c per example."""

    name = "categorical"
    diagonal = False

    def _check_outputs(self, f: Any) -> None:
        if f.shape[1] < 2:
            raise v.ShapeError(f"a categorical likelihood needs c ≥ 2 logits per example, but f has shape "
                               f"{tuple(f.shape)}; use BernoulliLikelihood for one logit")

    @staticmethod
    def probabilities(f: Any) -> Any:
        """softmax(f) over the last axis by log-sum-exp (no overflow for large logits): (n, c)."""
        xp = v.backend_of(f).xp
        shifted = f - f.max(axis=1, keepdims=True)
        e = xp.exp(shifted)
        return e / e.sum(axis=1, keepdims=True)

    def targets(self, y: Any, n: int, c: int) -> Any:
        """Checked labels as the float64 one-hot target matrix T (n, c): ∇_f NLL = mean(f) − T."""
        T = v.backend_of(y).xp.zeros((n, c), dtype=np.float64)
        T[v.backend_of(y).xp.arange(n), y] = 1.0
        return T

    def nll(self, f: Any, T: Any) -> float:
        """Σ_i lse(f_i) − T_i·f_i, without overflow."""
        xp = v.backend_of(f).xp
        top = f.max(axis=1, keepdims=True)
        lse = top[:, 0] + xp.log(xp.exp(f - top).sum(axis=1))
        return float((lse - (T * f).sum(axis=1)).sum())

    def mean(self, f: Any) -> Any:
        """softmax(f) (n, c)."""
        return self.probabilities(f)

    def curvature_change(self, f: Any, df: Any) -> Any:
        """dΛ_i in the direction df_i (n, c, c): with π' = Λ df, diag(π') − π' πᵀ − π π'ᵀ."""
        pi = self.probabilities(f)
        dpi = pi * df - pi * (pi * df).sum(axis=1, keepdims=True)
        c = f.shape[1]
        out = -dpi[:, :, None] * pi[:, None, :] - pi[:, :, None] * dpi[:, None, :]
        out[:, np.arange(c), np.arange(c)] += dpi
        return out

    def class_probabilities(self, mean: Any) -> Any:
        """The class probabilities (n, c): the mean itself."""
        return mean

    def _sqrt_curvature(self, f: Any) -> Any:
        xp = v.backend_of(f).xp
        p = self.probabilities(f)
        sqrt_p = xp.sqrt(p)
        n, c = p.shape
        factor = -p[:, :, None] * sqrt_p[:, None, :]  # − p √pᵀ
        factor[:, np.arange(c), np.arange(c)] += sqrt_p
        return factor

    def _check_labels(self, y: Any, f: Any, backend: Any) -> Any:
        n, c = f.shape
        if not np.issubdtype(y.dtype, np.integer):
            raise v.DTypeError(f"categorical labels must be integers in [0, {c}), got dtype {y.dtype} (shape "
                               f"{tuple(y.shape)}); convert explicitly, e.g. y.astype('int64')")
        v.check_shape(y, "y", (n,))
        bad = (y < 0) | (y >= c)
        if bool(bad.any()):
            first = backend.to_numpy(y[backend.xp.argmax(bad)]).item()
            raise v.ValueRangeError(f"categorical labels must lie in [0, {c}) for c = {c} logits; y holds "
                                    f"{int(bad.sum())} values outside, e.g. {first}")
        return y


#: Names accepted where a likelihood can be given by name.
LIKELIHOODS = {"gaussian": GaussianLikelihood, "bernoulli": BernoulliLikelihood, "categorical": CategoricalLikelihood}


def as_likelihood(likelihood: Any) -> Likelihood:
    """A Likelihood instance, or one of the names in :data:`LIKELIHOODS` (Gaussian with noise 1)."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str):
        v.check_choice(likelihood, "likelihood", tuple(LIKELIHOODS))
        return LIKELIHOODS[likelihood]()
    raise v.ArgumentTypeError(f"likelihood must be a Likelihood or one of {', '.join(map(repr, LIKELIHOODS))}, "
                              f"got {type(likelihood).__name__}")
