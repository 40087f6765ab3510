"""Classification as GP regression on Dirichlet-transformed labels (Milios et al., NeurIPS 2018), with the network's
Jacobian kernel.

Each one-hot label vector is read as one draw of a Dirichlet with concentrations α_i = onehot(y_i) + α_ε, whose class
probabilities are Gamma variables; a Gamma variable matched to a log-normal gives, per example i and class k,

    σ̃²_ik = log(1/α_ik + 1),      ỹ_ik = log α_ik − σ̃²_ik / 2,

a regression of ỹ on the latent log-probabilities f with fixed, per-observation Gaussian noise σ̃² (small for the
labelled class, large for the others). The GP is :class:`~lingp_core.LinearizedGP` with that noise, a constant prior
mean per class (the mean of its transformed targets) and the kernel s·J Jᵀ of the network's logits. Only s is fitted
(:meth:`DirichletClassifier.optimize_prior_scale`, the exact marginal likelihood): the noise is fixed by α_ε, so the
marginal likelihood cannot explain a handful of labels as noise — the failure of one-hot regression with a free σ²,
whose optimum with 1–2 labels per class is s → 0 and uniform predictions.

Class probabilities: P(class k) = P(f_k is the largest latent score) under the GP's posterior N(mean, var) per class
(:func:`~lingp_core.class_probabilities.probability_of_largest`, a 1-D quadrature; no sampling, no temperature).

α_ε = 0.01 is Milios et al.'s default; on the demo's few-shot digits (3 seeds × 3 draws × 1–10 labels per class)
0.01 gave lower test NLL than 0.1 at every budget (``benchmarks/README.md``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

import backends
from lingp_core import _validate as v
from lingp_core._estimator import float_errors_checked
from lingp_core.class_probabilities import probability_of_largest
from lingp_core.gp import LinearizedGP
from lingp_core.jacobian import JacobianBlocks
from lingp_core.likelihoods import CategoricalLikelihood, check_noise
from lingp_core.sharded import training_pair

__all__ = ["DirichletClassifier", "dirichlet_targets"]


def dirichlet_targets(labels: Any, c: int, alpha_epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Transformed targets ỹ and their noise σ̃², both float64 (n, c), from integer labels (n,) in [0, c).

    σ̃² = log(1/α + 1), ỹ = log α − σ̃²/2 with α = onehot(labels) + α_ε (log-normal moment matching of Gamma(α, 1)).

    Parameters
    ----------
    labels : array_like of int, shape (n,)
        Class labels in [0, c) (NumPy, CuPy, torch or a list).
    c : int
        The number of classes, ≥ 2.
    alpha_epsilon : float
        α_ε > 0, finite.

    Returns
    -------
    targets, noise : ndarray of shape (n, c), float64, on the host

    Raises
    ------
    ArgumentTypeError, ShapeError, DTypeError, ValueRangeError
        Labels that are not 1-D integers in [0, c); c not an integer ≥ 2; α_ε not finite and > 0, or so extreme that
        the targets or their noise overflow float64.
    MemoryBudgetError
        When the (n, c) arrays would not fit in half the host's free memory.
    """
    c = v.check_int(c, "c", minimum=2)
    alpha_epsilon = v.check_positive(alpha_epsilon, "alpha_epsilon")
    return _targets(_check_labels(labels, c), c, alpha_epsilon)


def _check_labels(labels: Any, c: int) -> np.ndarray:
    """Labels checked as 1-D integers in [0, c) (bool refused, as DirichletClassifier.fit does): int64 (n,), host."""
    backend = v.backend_of(labels)
    try:
        y = v.as_array(labels, "labels", backend)
    except ValueError:  # a ragged nesting of lists
        raise v.ShapeError(f"labels must have shape (n,), got a ragged sequence ({v.describe(labels)})") from None
    if y.ndim != 1:
        raise v.ShapeError(f"labels must have shape (n,), got {v.describe(y)}")
    # α, the targets and the noise: three float64 (n, c) arrays on the host
    need = 3 * v.nbytes_of((y.shape[0], c), np.float64)
    budget = v.resolve_memory_budget(None, backends.get_backend("numpy"))
    if need > budget:
        raise v.MemoryBudgetError(f"the Dirichlet targets of {y.shape[0]} labels over c = {c} classes need "
                                  f"{v.format_bytes(need)} but the host's memory budget (half its free memory) is "
                                  f"{v.format_bytes(budget)}; check c, or transform fewer labels at a time")
    host = backend.to_numpy(y)
    if host.dtype.kind not in "iu":
        raise v.DTypeError(f"labels must be integers in [0, {c}), got dtype {host.dtype} (shape {host.shape}); "
                           "convert explicitly, e.g. labels.astype('int64')")
    outside = (host < 0) | (host >= c)
    if outside.any():
        raise v.ValueRangeError(f"labels must lie in [0, {c}) for c = {c} classes; {int(outside.sum())} of them do "
                                f"not, e.g. {host[outside][0]}")
    return host.astype(np.int64)


def _targets(labels: np.ndarray, c: int, alpha_epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """dirichlet_targets on checked arguments; ValueRangeError when α_ε makes a target or its noise overflow."""
    alpha = np.full((labels.shape[0], c), alpha_epsilon)
    alpha[np.arange(labels.shape[0]), labels] += 1.0
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # checked just below
        noise = np.log1p(1.0 / alpha)
        targets = np.log(alpha) - noise / 2
    if not (np.isfinite(targets).all() and np.isfinite(noise).all()):
        raise v.ValueRangeError(f"alpha_epsilon = {alpha_epsilon:.3g} makes the transformed targets or their noise "
                                "overflow float64 (log(1/α_ε + 1) and log α_ε must be finite); use a value between "
                                "1e-300 and 1e300 (0.01 is the usual choice)")
    return targets, noise


class DirichletClassifier(LinearizedGP):
    """GP classification on Dirichlet-transformed labels with the Jacobian kernel s·J Jᵀ of a network's logits.

    Parameters
    ----------
    prior_scale : float
        s > 0, the prior variance of θ − θ̂ (fit it with :meth:`optimize_prior_scale`).
    alpha_epsilon : float
        α_ε > 0, the concentration given to the classes a label does not name (default 0.01). Smaller makes the
        targets of those classes more negative and their noise larger.
    output_mode : {"trace", "independent", "full"}
        How the classes share the kernel (default "trace": one kernel, the mean of the classes' kernels).
    method : str
        A LinearizedGP method: "auto" (default), "cholesky", "function-cholesky", "parameter-cholesky" or
        "iterative" (the noise differs per observation, so spectral methods do not apply).
    **settings
        Further LinearizedGP settings (memory_budget, kernel_dtype, rtol, ...); ``mean`` and ``noise`` are fixed by
        the model.

    Attributes (after fit)
    ----------------------
    classes_ : int
        c, the number of classes (the network's outputs).
    noise : ndarray (n, c)
        The transformed targets' fixed noise σ̃².
    """

    _POSTERIOR_PARAMS = LinearizedGP._POSTERIOR_PARAMS + ("alpha_epsilon",)

    _KIND = "DirichletClassifier"

    def __init__(self, prior_scale: float = 1.0, *, alpha_epsilon: float = 0.01, output_mode: str = "trace",
                 method: str = "auto", **settings: Any) -> None:
        for fixed in ("mean", "noise"):
            if fixed in settings:
                raise v.InvalidOptionError(f"DirichletClassifier sets {fixed!r} itself (constant prior mean; noise "
                                           "from alpha_epsilon); do not pass it")
        super().__init__(prior_scale, 1.0, mean="constant", output_mode=output_mode, method=method, **settings)
        self.alpha_epsilon = v.check_positive(alpha_epsilon, "alpha_epsilon")

    def __repr__(self) -> str:
        fitted = f", plan={self.plan_.method!r}" if self.is_fitted else ""
        return (f"DirichletClassifier(prior_scale={self.prior_scale:.4g}, alpha_epsilon={self.alpha_epsilon:.4g}, "
                f"output_mode={self.output_mode!r}, method={self.method!r}{fitted})")

    def fit(self, J: JacobianBlocks, y: Any) -> DirichletClassifier:  # type: ignore[override]
        """Condition on integer class labels y (n,) in [0, c), c = the network's outputs ≥ 2.

        Like every fit, it builds the new posterior aside: a fit that fails leaves the model as it was.
        """
        J = self._check_jacobian(J)
        labels = CategoricalLikelihood().check_labels(training_pair(J, y), J.f0)
        targets, noise = _targets(J.backend.to_numpy(labels).astype(np.int64), J.n_outputs, self.alpha_epsilon)
        draft = self._draft()
        draft.noise = noise
        draft.classes_ = J.n_outputs
        with float_errors_checked():
            draft._condition(J, J.backend.asarray(targets))
        self._warn_and_commit(draft)
        return self

    def optimize_prior_scale(self, *, criterion: str = "evidence", hyperprior: Any = None,
                             max_iter: int = 200) -> DirichletClassifier:
        """Fit s (the noise is fixed by α_ε): by the exact marginal likelihood (default), or ``criterion="loo"``,
        optionally with a log-normal ``hyperprior`` on s (see :meth:`LinearizedGP.optimize_hyperparameters`). The
        model is refitted at the optimum, and ``optimization_`` reports the run. A search that fails leaves the
        model as it was."""
        self.optimize_hyperparameters(criterion=criterion, hyperprior=hyperprior, max_iter=max_iter)
        return self

    def predict_proba(self, J_star: JacobianBlocks) -> Any:
        """Class probabilities (n*, c) on J_star's backend: P(f_k is the largest) under the posterior per class."""
        mean, var = self.predict(J_star, return_var=True)
        be = self._backend
        return be.asarray(probability_of_largest(be.to_numpy(mean), be.to_numpy(var)))

    def predict_latent(self, J_star: JacobianBlocks) -> tuple[Any, Any]:
        """Posterior mean and variances (n*, c) of the latent log-probabilities f."""
        return self.predict(J_star, return_var=True)

    @classmethod
    def _from_settings(cls, prior_scale: float, noise: Any, settings: dict[str, Any]) -> DirichletClassifier:
        settings = dict(settings)
        settings.pop("mean")
        alpha_epsilon = settings.pop("alpha_epsilon")
        model = cls(prior_scale, alpha_epsilon=alpha_epsilon, **settings)
        model.noise = check_noise(noise, per_observation=True)
        model.classes_ = int(noise.shape[1])
        return model

    def _archive(self) -> tuple[dict[str, Any], dict[str, Any]]:
        arrays, config = super()._archive()
        config["settings"]["alpha_epsilon"] = self.alpha_epsilon
        return arrays, config
