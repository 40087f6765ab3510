"""Adaptation methods the reproduction scripts compare: lingp and its baselines, with the small training loops.

Every method takes a trained source network and a small adaptation set (x, y) from a new task and predicts at test
inputs; the source network is never modified (the trained baselines work on a deep copy).

- ``linearized_gp``: lingp — the network's Jacobian kernel GP, mean f(x; θ̂), prior scale and noise chosen by one of
  :data:`HYPERPARAMETER_CHOICES` (marginal likelihood, leave-one-out, MAP under a data-scaled hyperprior, or
  averaging over a grid).
- ``retrain_last_layer``: Adam on the last ``nn.Linear`` only, from the source weights, MSE loss.
- ``fine_tune``: Adam on every parameter, from the source weights, MSE loss.
- ``linearized_fine_tune``: the same recipe on the network's first-order Taylor expansion f(x; θ̂) + J(x)(θ − θ̂)
  (:class:`Linearized`): what a model linear in θ reaches with fine-tuning's own training.
- ``BayesianLinearRegression``: an ABLR-style Bayesian last layer (Perrone et al., 2018): Bayesian linear regression
  on the source network's last hidden features (plus a constant), w ~ N(0, α⁻¹I), noise precision β, with α and β
  maximizing the evidence.

Arrays: the training loops and the features are torch tensors on the model's device; ``BayesianLinearRegression``
works on float64 NumPy arrays (a few hundred points and features: host float64 is the honest baseline).
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import numpy as np

from lingp_core._validate import (
    DTypeError,
    InvalidOptionError,
    NonFiniteError,
    ShapeError,
    ValueRangeError,
    check_choice,
)

# ----- the networks' last layer -----------------------------------------------------------------------------------

def last_linear(model: Any) -> Any:
    """The network's output layer (:func:`output_layer_names`: the last element with parameters of an
    ``nn.Sequential``), which must be a ``torch.nn.Linear``.

    Raises
    ------
    ValueRangeError
        When the model holds no Linear layer, or its output layer is another kind of module.
    InvalidOptionError
        When the output layer cannot be told (a container other than ``nn.Sequential``).
    """
    import torch

    if not any(isinstance(m, torch.nn.Linear) for m in model.modules()):
        raise ValueRangeError(f"{type(model).__name__} has no torch.nn.Linear layer to treat as its last layer")
    path = output_layer_names(model)[0].rpartition(".")[0]
    layer = model.get_submodule(path)
    if not isinstance(layer, torch.nn.Linear):
        raise ValueRangeError(f"the output layer of {type(model).__name__} ({path or 'the model'}) is a "
                              f"{type(layer).__name__}, not a torch.nn.Linear: last-layer methods need a linear "
                              "read-out")
    return layer


def hidden_features(model: Any, x: Any) -> Any:
    """The inputs of the model's last Linear layer at ``x``: the features the last layer combines.

    Parameters
    ----------
    model : torch.nn.Module
    x : torch.Tensor of shape (n, ...)

    Returns
    -------
    torch.Tensor of shape (n, d)
        Detached, computed in eval mode (training flags restored); d is the last layer's ``in_features``.
    """
    import torch

    captured: list[Any] = []
    handle = last_linear(model).register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    flags = [(m, m.training) for m in model.modules()]
    model.eval()                                            # features as the network predicts (no dropout noise)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        for module, flag in flags:
            module.training = flag
    if len(captured) != 1:
        raise ValueRangeError(f"the last Linear layer ran {len(captured)} times in one forward pass; hidden features "
                              "are defined for a layer called once")
    return captured[0].detach().reshape(x.shape[0], -1)


# ----- training loops ---------------------------------------------------------------------------------------------

def _check_xy(x: Any, y: Any) -> None:
    import torch

    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise TypeError(f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 1:
        raise ShapeError(f"x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}: y must be (n, c) with the "
                         "same n ≥ 1 as x")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise NonFiniteError("x or y holds NaN or Inf")


def train_mse(model: Any, x: Any, y: Any, *, steps: int, lr: float, params: Any = None, batch_size: int | None = None,
              weight_decay: float = 0.0, cosine: bool = True, seed: int = 0) -> list[float]:
    """Train ``model`` in place with Adam on the mean squared error; the training loop every baseline shares.

    Parameters
    ----------
    model : torch.nn.Module
        Maps x (n, ...) to (n, c); switched to train mode during the loop and back to eval mode after it.
    x : torch.Tensor of shape (n, ...)
    y : torch.Tensor of shape (n, c)
        On the model's device, in its dtype.
    steps : int
        Optimizer steps (each on one mini-batch, or on all n examples when ``batch_size`` is None).
    lr : float
        Adam's learning rate.
    params : iterable of torch parameters, optional
        What to train (default: every parameter of the model).
    batch_size : int, optional
        Mini-batch size, sampled without replacement each step by a generator seeded with ``seed``.
    weight_decay : float
        Adam's L2 penalty on the trained parameters.
    cosine : bool
        Anneal the learning rate from ``lr`` to 0 along a half cosine over the steps (default), so the last steps
        settle instead of hovering at Adam's lr-sized noise floor; False keeps it constant.
    seed : int

    Returns
    -------
    list of float
        The loss of every step (on its mini-batch), so a caller can check it went down.
    """
    import torch

    _check_xy(x, y)
    if steps < 1 or lr <= 0:
        raise ValueRangeError(f"need steps ≥ 1 and lr > 0, got steps={steps}, lr={lr}")
    params = list(model.parameters() if params is None else params)
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps) if cosine else None
    generator = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    losses = []
    model.train()
    try:
        for _ in range(steps):
            if batch_size is None or batch_size >= n:
                xb, yb = x, y
            else:
                index = torch.randperm(n, generator=generator)[:batch_size].to(x.device)
                xb, yb = x[index], y[index]
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            losses.append(float(loss.detach()))
    finally:
        model.eval()
    if not math.isfinite(losses[-1]):
        raise NonFiniteError(f"training diverged: loss {losses[-1]} after {steps} steps at lr={lr}")
    return losses


def retrain_last_layer(model: Any, x: Any, y: Any, *, steps: int = 500, lr: float = 1e-2, seed: int = 0) -> Any:
    """A copy of ``model`` whose last Linear layer (weight and bias) is retrained on (x, y) from its source values;
    every other parameter stays fixed. Returns the copy in eval mode."""
    adapted = copy.deepcopy(model)
    # the hidden features do not change while only the last layer trains: compute them once, train the layer alone
    train_mse(last_linear(adapted), hidden_features(adapted, x), y, steps=steps, lr=lr, seed=seed)
    return adapted.eval()


def fine_tune(model: Any, x: Any, y: Any, *, steps: int = 200, lr: float = 1e-3, seed: int = 0,
              linearize: bool = False) -> Any:
    """A copy of ``model`` with every parameter trained on (x, y) from its source values (with ``linearize``, of its
    first-order Taylor expansion, :func:`linearized`). Returns it in eval mode."""
    adapted = linearized(model) if linearize else copy.deepcopy(model)
    train_mse(adapted, x, y, steps=steps, lr=lr, seed=seed)
    return adapted.eval()


def linearized(model: Any) -> Any:
    """:class:`Linearized` (defined on first use: this module imports torch only when a method runs)."""
    import torch
    from torch.func import functional_call, jvp

    class Linearized(torch.nn.Module):
        """f(x; θ̂) + J(x) δ as a module whose only parameters are δ (zero at the start), by torch.func.jvp: the
        first-order Taylor expansion of ``model`` around its weights θ̂ (a frozen copy), independent of lingp."""

        def __init__(self) -> None:
            super().__init__()
            # a plain attribute, not a submodule: its weights θ̂ are constants here, never parameters to train
            object.__setattr__(self, "source", copy.deepcopy(model).eval())
            self.names = [name for name, _ in self.source.named_parameters()]
            self.theta = {name: p.detach() for name, p in self.source.named_parameters()}
            self.delta = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros_like(t)) for t in self.theta.values()])

        def forward(self, x: Any) -> Any:
            def network(params: dict) -> Any:
                return functional_call(self.source, params, (x,))
            out, change = jvp(network, (self.theta,), (dict(zip(self.names, self.delta)),))
            return out + change

    return Linearized()


def linearized_fine_tune(model: Any, x: Any, y: Any, *, steps: int = 200, lr: float = 1e-3, seed: int = 0) -> Any:
    """:func:`fine_tune`'s recipe (Adam on every parameter, MSE) on the linearized network; returns it (eval mode)."""
    return fine_tune(model, x, y, steps=steps, lr=lr, seed=seed, linearize=True)


def predict(model: Any, x: Any) -> Any:
    """``model(x)`` without gradients, detached: (n, c)."""
    import torch

    with torch.no_grad():
        return model(x).detach()


# ----- ABLR-style Bayesian last layer -----------------------------------------------------------------------------

class BayesianLinearRegression:
    """Bayesian linear regression y = Φ w + ε with w ~ N(0, α⁻¹ I), ε ~ N(0, β⁻¹ I), α and β maximizing the evidence.

    With Φ the source network's last hidden features plus a constant column this is the ABLR-style Bayesian last
    layer. The evidence is computed from the thin SVD Φ = U S Vᵀ: along uᵢ the marginal covariance of y has
    eigenvalue sᵢ²/α + 1/β, on the rest of ℝⁿ it is 1/β, so each evaluation costs O(n) after one SVD.

    Parameters
    ----------
    add_bias : bool
        Append a constant column of ones to Φ (default True).
    log_bounds : float
        log α and log β are searched in [−log_bounds, log_bounds].
    min_noise_fraction : float
        Floor of the noise variance 1/β as a fraction of var(y). With n ≤ d the data can be interpolated and the
        evidence keeps rising as 1/β → 0 (its supremum is the noise-free limit), so the search needs a floor to
        stop somewhere reproducible.

    Attributes (after ``fit``)
    --------------------------
    alpha_, beta_ : float
        Prior precision of w and noise precision.
    log_evidence_ : float
        log p(y | α, β) at the optimum.
    mean_ : ndarray of shape (d,)
        Posterior mean of w (d includes the bias column).
    """

    def __init__(self, *, add_bias: bool = True, log_bounds: float = 25.0, min_noise_fraction: float = 1e-6) -> None:
        self.add_bias = add_bias
        self.log_bounds = log_bounds
        self.min_noise_fraction = min_noise_fraction

    def _design(self, features: Any) -> np.ndarray:
        phi = np.asarray(features)
        if phi.ndim != 2:
            raise ShapeError(f"features must be an (n, d) array, got shape {phi.shape}")
        if phi.dtype != np.float64:
            raise DTypeError(f"features must be float64 (the baseline computes in float64), got {phi.dtype}")
        if not np.isfinite(phi).all():
            raise NonFiniteError("features hold NaN or Inf")
        if self.add_bias:
            phi = np.concatenate([phi, np.ones((phi.shape[0], 1))], axis=1)
        return phi

    def _spectrum(self, phi: np.ndarray, y: np.ndarray) -> None:
        """Cache what every evidence evaluation needs: sᵢ², z = Uᵀy, the energy of y outside span(U), n."""
        u, s, _ = np.linalg.svd(phi, full_matrices=False)
        self._s2 = s**2
        self._z = u.T @ y
        self._residual = max(float(y @ y - self._z @ self._z), 0.0)
        self._n = y.shape[0]

    def _neg_log_evidence(self, log_params: np.ndarray) -> tuple[float, np.ndarray]:
        """−log p(y | α, β) and its gradient in (log α, log β)."""
        alpha, beta = np.exp(log_params)
        v = self._s2 / alpha + 1.0 / beta                       # eigenvalues of Cov(y) along the uᵢ
        outside = self._n - v.shape[0]                          # dimensions of ℝⁿ where Cov(y) = 1/β
        value = 0.5 * (np.log(v).sum() + outside * np.log(1.0 / beta) + (self._z**2 / v).sum()
                       + beta * self._residual + self._n * np.log(2 * np.pi))
        d_v = 0.5 * (1.0 / v - self._z**2 / v**2)               # ∂(−log p)/∂vᵢ
        grad_log_alpha = float(d_v @ (-self._s2 / alpha))
        grad_log_beta = float(d_v.sum() * (-1.0 / beta)) + 0.5 * (-outside + beta * self._residual)
        return float(value), np.array([grad_log_alpha, grad_log_beta])

    def log_evidence(self, features: Any, y: Any, alpha: float, beta: float) -> float:
        """log p(y | α, β) for features (n, d) and targets (n,), without fitting."""
        phi, y = self._design(features), self._targets(y, features)
        self._spectrum(phi, y)
        return -self._neg_log_evidence(np.log([alpha, beta]))[0]

    @staticmethod
    def _targets(y: Any, features: Any) -> np.ndarray:
        y = np.asarray(y)
        if y.ndim != 1 or y.shape[0] != np.shape(features)[0]:
            raise ShapeError(f"y must be an (n,) array matching features of shape {np.shape(features)}, got shape "
                             f"{y.shape}")
        if y.dtype != np.float64:
            raise DTypeError(f"y must be float64, got {y.dtype}")
        if not np.isfinite(y).all():
            raise NonFiniteError("y holds NaN or Inf")
        return y

    def fit(self, features: Any, y: Any, *, alpha: float | None = None,
            beta: float | None = None) -> BayesianLinearRegression:
        """Maximize the evidence over (α, β) by L-BFGS-B in log space from a few starts, then form the posterior.

        Parameters
        ----------
        features : float64 ndarray of shape (n, d)
        y : float64 ndarray of shape (n,)
        alpha, beta : float, optional
            Hold α or β at this value instead of optimizing it (both given: no search at all).
        """
        from scipy.optimize import minimize

        phi, y = self._design(features), self._targets(y, features)
        self._spectrum(phi, y)
        scale = max(float(np.var(y)), 1e-12)
        top_log_beta = min(self.log_bounds, -np.log(self.min_noise_fraction * scale))
        bounds = [(-self.log_bounds, self.log_bounds), (-self.log_bounds, top_log_beta)]
        for i, fixed in enumerate((alpha, beta)):
            if fixed is not None:
                if not fixed > 0:
                    raise ValueRangeError(f"alpha and beta must be positive, got alpha={alpha}, beta={beta}")
                bounds[i] = (float(np.log(fixed)),) * 2
        best = None
        for noise_fraction in (1.0, 1e-1, 1e-3):                # starts: noise = a fraction of var(y)
            start = np.clip(np.log([1.0, 1.0 / (noise_fraction * scale)]), *np.array(bounds).T)
            result = minimize(self._neg_log_evidence, start, jac=True, method="L-BFGS-B", bounds=bounds,
                              options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 1000})
            if best is None or result.fun < best.fun:
                best = result
        self.alpha_, self.beta_ = (float(fixed if fixed is not None else np.exp(v))
                                   for fixed, v in zip((alpha, beta), best.x))
        self.log_evidence_ = -float(best.fun)
        precision = self.alpha_ * np.eye(phi.shape[1]) + self.beta_ * phi.T @ phi
        self._chol = np.linalg.cholesky(precision)
        self.mean_ = self.beta_ * self._solve(phi.T @ y)
        return self

    def _solve(self, b: np.ndarray) -> np.ndarray:
        """(αI + βΦᵀΦ)⁻¹ b by the cached Cholesky factor."""
        from scipy.linalg import cho_solve

        return cho_solve((self._chol, True), b)

    def predict(self, features: Any) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean (n*,) and variance (n*,) of the latent f* = Φ* w (add 1/β for a noisy observation)."""
        phi = self._design(features)
        if phi.shape[1] != self.mean_.shape[0]:
            raise ShapeError(f"features have {phi.shape[1] - self.add_bias} columns, the fit had "
                             f"{self.mean_.shape[0] - self.add_bias}")
        variance = np.einsum("ij,ji->i", phi, self._solve(phi.T))
        return phi @ self.mean_, np.maximum(variance, 0.0)


def ablr(model: Any, x: Any, y: Any, x_test: Any) -> tuple[np.ndarray, np.ndarray, BayesianLinearRegression]:
    """ABLR-style Bayesian last layer of ``model`` fitted on (x, y) with one output; mean and latent variance at
    ``x_test`` as float64 NumPy (n*,) arrays, and the fitted regression."""
    if y.ndim != 2 or y.shape[1] != 1:
        raise ShapeError(f"the Bayesian last layer here handles one output: y must be (n, 1), got {tuple(y.shape)}")
    blr = BayesianLinearRegression().fit(to_numpy(hidden_features(model, x)), to_numpy(y)[:, 0])
    mean, var = blr.predict(to_numpy(hidden_features(model, x_test)))
    return mean, var, blr


# ----- lingp ------------------------------------------------------------------------------------------------------

#: How lingp's rows choose (s, σ²): the option of LinearizedGP each name runs (see :func:`choose_hyperparameters`).
HYPERPARAMETER_CHOICES = ("evidence", "loo", "map", "average", "average-map", "layerwise-average",
                          "layerwise-average-map")
#: The choice the reproduction scripts use unless --lingp-hyperparameters says otherwise. Measured on the regression
#: reproductions (issue 15, on their own test sets): the evidence's maximum collapses s → 0 for networks that already
#: fit (ReLU toy) and loses to last-layer retraining at 10 tabular patients; averaging weighted by evidence × the
#: data-scaled hyperprior does neither, and averaging over per-layer prior weights as well (BlockWeightAverage) was
#: better on the single-source sinusoid (2.01 against 2.68) and at 10 tabular patients (64.4 against 65.2) and level
#: on the other cases (benchmarks/README.md, "Choosing the default").
DEFAULT_HYPERPARAMETERS = "layerwise-average-map"

PRIOR_CHOICES = ("network", "head", "network+head", "weights")
"""Where lingp's prior on the weights is centred: "network" — w = θ − θ̂ ~ N(0, s·I), the GP's mean is the trained
network (the paper's prior); "head" — the output layer's weights centred at 0, the others at θ̂ (prior_mean = −θ̂ on
the output layer's columns, 0 elsewhere: the source's features are kept as the prior's centre, its read-out of them
is not; for a linear output layer with a bias the GP's mean is then exactly 0); "network+head" — both, the
predictions averaged with weights ∝ each one's marginal likelihood (Bayesian model averaging over the prior's centre:
the data say whether the source's read-out still applies); "weights" — θ ~ N(0, s·I),
prior_mean = −θ̂ (laplace-torch's and Immer et al.'s, for the data the network was trained on: there the residuals are
noise, and with the prior at the network the evidence shrinks s and the bands with it)."""

#: The transfer reproductions' prior centre (``--lingp-prior``): "network+head" was the one choice no worse than the
#: best baseline within a standard error on every transfer case (benchmarks/README.md, "Where the prior is centred"):
#: "network" loses on the single-source sinusoid, whose new tasks share the source's features but not its read-out
#: (2.01 against fine-tuning's 1.71), "head" on the tabular shift, whose target is the source's own quantity.
DEFAULT_PRIOR = "network+head"


def check_hyperparameters(choice: Any) -> str:
    """``choice`` if it is one of :data:`HYPERPARAMETER_CHOICES`; InvalidOptionError naming them otherwise."""
    return check_choice(choice, "hyperparameters", HYPERPARAMETER_CHOICES)


def choose_hyperparameters(gp: Any, choice: str) -> None:
    """Set a fitted LinearizedGP's prior scale s and noise σ² (in place) by one of :data:`HYPERPARAMETER_CHOICES`.

    "evidence" maximizes the marginal likelihood (``optimize_hyperparameters()``), "loo" the closed-form
    leave-one-out predictive density (``criterion="loo"``), "map" the marginal likelihood times the data-scaled
    log-normal hyperprior (``hyperprior="data"``); "average" / "average-map" average the predictions over a log grid
    of (s, σ²) weighted by the marginal likelihood (times that hyperprior) (``average_hyperparameters``).

    The NumericalWarnings of a fitted value at its bound (s → e⁻³⁰: all noise) or of weight on the averaging grid's
    edge are not repeated for every task of a reproduction: :func:`linearized_gp` reports both in its result.
    """
    import lingp_core as lg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lg.NumericalWarning)
        if choice.startswith("average"):
            gp.average_hyperparameters(hyperprior="data" if choice == "average-map" else None)
        elif choice == "evidence":
            gp.optimize_hyperparameters()
        elif choice == "loo":
            gp.optimize_hyperparameters(criterion="loo")
        else:
            gp.optimize_hyperparameters(hyperprior="data")


def linearized_gp(model: Any, x: Any, y: Any, x_test: Any, *, backend: str = "numpy",
                  fixed: tuple[float, float] | None = None, jacobians: tuple | None = None,
                  hyperparameters: str | None = None, prior: str = "network") -> dict:
    """lingp's adaptation: the Jacobian-kernel GP of ``model`` with mean f(x; θ̂), fitted on (x, y).

    The Jacobians are exported on ``backend`` (the model must live on its device). The prior scale s and noise σ²
    by ``hyperparameters``, one of :data:`HYPERPARAMETER_CHOICES` (see :func:`choose_hyperparameters`; None:
    :data:`DEFAULT_HYPERPARAMETERS`). With ``fixed=(signal_variance, noise)`` nothing is chosen (``hyperparameters``
    must then be None):
    s = signal_variance / mean diag(JJᵀ), so the prior variance of f at the training inputs is signal_variance on
    average, and σ² = noise. ``jacobians=(J, J_test)`` reuses Jacobians already exported at x and x_test (several
    fits of one network). ``prior``: one of :data:`PRIOR_CHOICES`.

    Returns
    -------
    dict
        ``mean`` and ``var`` (latent, no noise) as float64 NumPy (n*, c) arrays; the ``hyperparameters`` choice; the
        fitted ``prior_scale`` and ``noise`` (averaging: the heaviest grid point) and ``log_marginal_likelihood``
        there; ``log_evidence``, the evidence to compare models by (integrated over the grid when averaged, at the
        chosen point otherwise); ``predictive_noise``, the noise to add to ``var`` for an observation's variance
        (averaging: the posterior mean of σ² over the grid, so var + predictive_noise is the mixture's predictive
        variance);
        ``at_bound``, the names of the optimized values at their bounds (empty when none, or when not optimized);
        ``averaging`` (None, or ``mixture``: the kept grid points' ``prior_scales``, ``noises``, ``weights`` as
        lists, plus ``effective_points`` and ``weight_on_grid_edge``); the GP's ``plan`` and the parameter count
        ``p``.
    """
    import backends
    import lingp_core as lg

    if fixed is not None and hyperparameters is not None:
        raise InvalidOptionError(f"fixed={fixed} sets s and σ² directly; hyperparameters={hyperparameters!r} would "
                                 "choose them: pass one of the two")
    if fixed is None:
        hyperparameters = check_hyperparameters(DEFAULT_HYPERPARAMETERS if hyperparameters is None else hyperparameters)
    prior = check_choice(prior, "prior", PRIOR_CHOICES)
    be = backends.get_backend(backend)
    jac, jac_test = jacobians if jacobians is not None else export_pair(model, x, x_test, be.name)
    if prior == "network+head":
        parts = {centre: linearized_gp(model, x, y, x_test, backend=backend, fixed=fixed, jacobians=(jac, jac_test),
                                       hyperparameters=hyperparameters, prior=centre) for centre in ("network", "head")}
        return _centre_average(parts)
    targets = be.asarray(y.detach())
    prior_mean = prior_mean_for(model, jac, prior)
    if hyperparameters is not None and hyperparameters.startswith("layerwise"):
        return {**_layerwise_gp(jac, targets, jac_test, be, hyperparameters, prior_mean), "prior": prior}
    if fixed is None:
        gp = lg.LinearizedGP(mean="network").fit(jac, targets, prior_mean=prior_mean)
        choose_hyperparameters(gp, hyperparameters)
    else:
        kernel_size = float(be.to_numpy(lg.kernel_diag(jac)).mean())
        gp = lg.LinearizedGP(prior_scale=fixed[0] / kernel_size, noise=fixed[1], mean="network").fit(
            jac, targets, prior_mean=prior_mean)
    mean, var = gp.predict(jac_test, return_var=True)
    averaging = _averaging_summary(gp)
    predictive_noise = float(gp.noise) if averaging is None else \
        float(np.dot(averaging["mixture"]["weights"], averaging["mixture"]["noises"]))
    return {"mean": be.to_numpy(mean).astype(np.float64), "var": be.to_numpy(var).astype(np.float64),
            "hyperparameters": "fixed" if fixed is not None else hyperparameters,
            "prior_scale": float(gp.prior_scale), "noise": float(gp.noise), "predictive_noise": predictive_noise,
            "log_marginal_likelihood": gp.log_marginal_likelihood(),
            # the evidence of the whole model: integrated over the grid when averaged (× the hyperprior's density),
            # else at the chosen (s, σ²) (type-II maximum likelihood; for "map" and "loo" a plug-in value)
            "log_evidence": gp.log_marginal_likelihood() if averaging is None else float(gp.averaging_["log_mass"]),
            "at_bound": list(getattr(gp, "optimization_", {}).get("at_bound", [])), "averaging": averaging,
            "plan": str(gp.plan_), "p": int(jac.p), "prior": prior}


def _centre_average(parts: dict) -> dict:
    """The mixture of :func:`linearized_gp` results for several prior centres, weighted ∝ exp(``log_evidence``) (the
    evidence integrated over the averaged hyperparameters, or at the chosen point): its mean, variance (within- plus
    between-centre spread) and predictive noise, and as ``log_evidence`` and ``log_marginal_likelihood`` the log of
    the centres' mean evidence (a uniform prior over the centres: at most log 2 below the best one's); the other
    entries are the heaviest centre's, with ``prior_weights`` and each centre's s, σ², predictive noise and log
    evidence (``centres``)."""
    from scipy.special import logsumexp

    from lingp_core._averaging import mixture_moments

    names = list(parts)
    log_ml = np.array([parts[name]["log_evidence"] for name in names])
    weights = np.exp(log_ml - logsumexp(log_ml))
    mean, var = mixture_moments(lambda g: (parts[names[g]]["mean"], parts[names[g]]["var"]), weights)
    top = parts[names[int(np.argmax(weights))]]
    return {**top, "mean": mean, "var": var,
            "predictive_noise": float(sum(w * parts[name]["predictive_noise"] for w, name in zip(weights, names))),
            "prior": "+".join(names), "prior_weights": dict(zip(names, weights.tolist())),
            "centres": {name: {k: parts[name][k] for k in ("prior_scale", "noise", "predictive_noise",
                                                          "log_evidence")} for name in names},
            **dict.fromkeys(("log_evidence", "log_marginal_likelihood"), float(logsumexp(log_ml) - np.log(len(names))))}


def output_layer_names(model: Any) -> list[str]:
    """The parameter names (as in ``model.named_parameters()``) of the network's output layer: the last element with
    parameters of an ``nn.Sequential`` (recursively, through nested Sequentials), or the model itself when it holds
    parameters of its own and no submodule does. In a Sequential the order of registration is the order of use; any
    other container would leave the output layer a guess, so it is refused."""
    import torch

    prefix, module = "", model
    while isinstance(module, torch.nn.Sequential):
        owners = [(name, child) for name, child in module.named_children() if any(True for _ in child.parameters())]
        if not owners:
            raise InvalidOptionError(f"{type(model).__name__} has no parameters, so it has no output layer")
        name, module = owners[-1]
        prefix = f"{prefix}.{name}" if prefix else name
    if any(True for child in module.children() for _ in child.parameters()):
        where = prefix or "the model"
        raise InvalidOptionError(f"the output layer cannot be told from {type(module).__name__} ({where}): its "
                                 "submodules hold parameters and only an nn.Sequential says in which order they run; "
                                 "write the network as an nn.Sequential ending in its output layer")
    names = [f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters(recurse=False)]
    if not names:
        raise InvalidOptionError(f"{type(model).__name__} has no parameters, so it has no output layer")
    return names


def prior_mean_for(model: Any, jac: Any, prior: str) -> Any:
    """``prior_mean`` for :meth:`lingp_core.LinearizedGP.fit` that centres the prior as :data:`PRIOR_CHOICES` says:
    None for "network", −θ̂ for "weights", −θ̂ on the output layer's columns and 0 elsewhere for "head"."""
    import lingp_core as lg

    prior = check_choice(prior, "prior", PRIOR_CHOICES)
    if prior == "network":
        return None
    theta = lg.parameter_vector(model, jac)
    if prior == "weights":
        return -theta
    head = set(output_layer_names(model))
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in jac.param_shapes]
    in_head = np.repeat([name in head for name in jac.param_names], sizes)
    if not in_head.any():
        raise InvalidOptionError(f"none of the output layer's parameters {sorted(head)} is a column of J "
                                 f"(J's parameters: {list(jac.param_names)})")
    mask = jac.xp.asarray(in_head)
    return jac.xp.where(mask, -theta, jac.xp.zeros_like(theta))


def _layerwise_gp(jac: Any, targets: Any, jac_test: Any, be: Any, choice: str, prior_mean: Any) -> dict:
    """:func:`linearized_gp`'s result for "layerwise-average[-map]": a :class:`lingp_core.BlockWeightAverage`
    (per-block prior weights and (s, σ²) averaged; "-map": with the "data" hyperprior, else uniform); s and σ²
    reported at the heaviest component's heaviest grid point, ``averaging`` None (the block-weight mixture is
    summarized under ``layerwise``)."""
    import lingp_core as lg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lg.NumericalWarning)  # grid-edge warnings are recorded, not repeated per task
        avg = lg.BlockWeightAverage(mean="network", hyperprior="data" if choice.endswith("-map") else None)
        avg.fit(jac, targets, prior_mean=prior_mean)
    mean, var = avg.predict(jac_test, return_var=True)
    top = avg.models_[int(np.argmax(avg.weights_))]
    return {"mean": be.to_numpy(mean).astype(np.float64), "var": be.to_numpy(var).astype(np.float64),
            "hyperparameters": choice, "prior_scale": float(top.prior_scale),
            "noise": float(top.noise), "predictive_noise": avg.predictive_noise_,
            "log_marginal_likelihood": avg.log_marginal_likelihood(), "log_evidence": avg.log_marginal_likelihood(),
            "at_bound": [], "averaging": None,
            "layerwise": {"relative_weights": avg.relative_weights_[int(np.argmax(avg.weights_))].tolist(),
                          "components": len(avg.models_),
                          "effective_components": float(1.0 / np.sum(avg.weights_**2)),
                          "block_sizes": list(jac.block_sizes),
                          "mixture": [{"block_weights": omega.tolist(), "weight": float(w),
                                       "mixture": _averaging_summary(m)["mixture"]}
                                      for omega, w, m in zip(avg.block_weights_, avg.weights_, avg.models_)]},
            "plan": str(top.plan_), "p": int(jac.p)}


def _averaging_summary(gp: Any) -> dict | None:
    """The grid mixture of an averaged LinearizedGP (``mixture_``) as JSON-ready lists (None when it was not
    averaged); the predictive noise (posterior mean of σ²) needs its points and weights."""
    mixture = gp.mixture_
    if mixture is None:
        return None
    return {"mixture": {"prior_scales": mixture.prior_scales.tolist(), "noises": mixture.noises.tolist(),
                        "weights": mixture.weights.tolist()},
            "effective_points": float(gp.averaging_["effective_points"]),
            "weight_on_grid_edge": float(gp.averaging_["weight_on_grid_edge"])}


def export_pair(model: Any, x: Any, x_test: Any, backend: str) -> tuple:
    """lingp's Jacobians of ``model`` at x and x_test on ``backend``."""
    import lingp_core as lg

    return lg.export_jacobian(model, x, backend=backend), lg.export_jacobian(model, x_test, backend=backend)


# ----- every method on one adaptation set -------------------------------------------------------------------------

METHODS = ("source", "lingp", "last_layer", "fine_tune", "linearized_fine_tune", "ablr")
"""The methods :func:`adapt_and_predict` knows: the unadapted source network, lingp, last-layer retraining,
fine-tuning, fine-tuning's recipe on the linearized network and the ABLR-style Bayesian last layer."""


def adapt_and_predict(model: Any, x: Any, y: Any, x_test: Any, *, methods: Any = METHODS, backend: str = "numpy",
                      last_layer: dict | None = None, fine_tuning: dict | None = None, seed: int = 0,
                      lingp_hyperparameters: str = DEFAULT_HYPERPARAMETERS, lingp_prior: str = DEFAULT_PRIOR) -> dict:
    """Adapt ``model`` to (x, y) with each method and predict at ``x_test``.

    Parameters
    ----------
    model : torch.nn.Module
        The trained source network (not modified), on the device of ``backend``.
    x, x_test : torch.Tensor of shape (n, ...) and (n*, ...)
    y : torch.Tensor of shape (n, c)
    methods : sequence of str
        A subset of :data:`METHODS`.
    backend : {"numpy", "cupy"}
        lingp's backend.
    last_layer, fine_tuning : dict, optional
        Keyword arguments (steps, lr) of :func:`retrain_last_layer` and :func:`fine_tune`.
    seed : int
    lingp_hyperparameters : str
        How lingp chooses its prior scale and noise: one of :data:`HYPERPARAMETER_CHOICES`.
    lingp_prior : str
        Where lingp's prior is centred: one of :data:`PRIOR_CHOICES`.

    Returns
    -------
    dict
        For each method: ``mean`` (n*, c) float64 NumPy, ``var`` (n*, c) latent variance or None, ``seconds`` of wall
        time (adaptation plus prediction, CUDA synchronized), and lingp's / ABLR's fitted hyperparameters.
    """
    import time

    import torch

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueRangeError(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    lingp_hyperparameters = check_hyperparameters(lingp_hyperparameters)  # before any method runs
    lingp_prior = check_choice(lingp_prior, "lingp_prior", PRIOR_CHOICES)

    def sync() -> None:
        if torch.cuda.is_available() and x.is_cuda:
            torch.cuda.synchronize()

    results = {}
    for name in methods:
        sync()
        start = time.perf_counter()
        extra: dict = {}
        var = None
        if name == "source":
            mean = to_numpy(predict(model, x_test))
        elif name == "lingp":
            extra = linearized_gp(model, x, y, x_test, backend=backend, hyperparameters=lingp_hyperparameters,
                                  prior=lingp_prior)
            mean, var = extra.pop("mean"), extra.pop("var")
        elif name == "last_layer":
            mean = to_numpy(predict(retrain_last_layer(model, x, y, seed=seed, **(last_layer or {})), x_test))
        elif name == "fine_tune":
            mean = to_numpy(predict(fine_tune(model, x, y, seed=seed, **(fine_tuning or {})), x_test))
        elif name == "linearized_fine_tune":
            mean = to_numpy(predict(linearized_fine_tune(model, x, y, seed=seed, **(fine_tuning or {})), x_test))
        else:
            mean, var, blr = ablr(model, x, y, x_test)
            mean, var = mean[:, None], var[:, None]
            extra = {"alpha": blr.alpha_, "beta": blr.beta_, "log_evidence": blr.log_evidence_}
        sync()
        results[name] = dict(mean=mean, var=var, seconds=time.perf_counter() - start, **extra)
    return results


# ----- small helpers the scripts share ----------------------------------------------------------------------------

def lingp_record(result: dict) -> dict:
    """What a reproduction's JSON keeps of one :func:`linearized_gp` result: the choice, s and σ², the predictive
    noise, the log marginal likelihood and log evidence, the values at a bound and the plan, and for averaging the
    mixture's size and weight on the grid's edge (the grid points themselves are left out)."""
    record = {k: result[k] for k in ("hyperparameters", "prior", "prior_scale", "noise", "predictive_noise",
                                     "log_marginal_likelihood", "log_evidence", "at_bound", "plan")}
    if result["averaging"] is not None:
        record.update({k: result["averaging"][k] for k in ("effective_points", "weight_on_grid_edge")})
    if "layerwise" in result:  # the summary; the components' grids would swell a many-task JSON
        record["layerwise"] = {k: result["layerwise"][k] for k in ("relative_weights", "components",
                                                                  "effective_components")}
    if "prior_weights" in result:
        record.update({k: result[k] for k in ("prior_weights", "centres")})
    return record


def add_hyperparameters_option(parser: Any) -> None:
    """Add the reproduction scripts' ``--lingp-hyperparameters`` (one of :data:`HYPERPARAMETER_CHOICES`)."""
    parser.add_argument("--lingp-hyperparameters", choices=HYPERPARAMETER_CHOICES, default=DEFAULT_HYPERPARAMETERS,
                        help="how lingp chooses its prior scale s and noise σ²: evidence = marginal likelihood, loo = "
                             "leave-one-out predictive density, map = evidence × a log-normal hyperprior at the "
                             "data's scale, average / average-map = predictions averaged over a log grid of (s, σ²) "
                             "weighted by evidence (× that hyperprior); layerwise-average[-map] = the same averaged "
                             "over per-layer prior weights too (lingp_core.BlockWeightAverage) (default %(default)s)")


def add_prior_option(parser: Any, default: str = DEFAULT_PRIOR) -> None:
    """Add the reproduction scripts' ``--lingp-prior`` (one of :data:`PRIOR_CHOICES`)."""
    parser.add_argument("--lingp-prior", choices=PRIOR_CHOICES, default=default,
                        help="where lingp's prior on the weights is centred: network = θ − θ̂ ~ N(0, s·I), the GP's "
                             "mean is the trained network; head = the output layer's weights centred at 0, the rest "
                             "at θ̂; network+head = both, averaged by their marginal likelihoods; weights = "
                             "θ ~ N(0, s·I) (prior_mean = −θ̂, laplace-torch's model) (default %(default)s)")


def torch_device(backend: str) -> str:
    """The torch device that matches a lingp backend: CUDA for CuPy, CPU for NumPy. Exits with the reason when the
    backend is not usable here (e.g. --backend cupy without a GPU)."""
    import backends

    status = {s.name: s for s in backends.available_backends()}[backend]
    if not status.usable:
        raise SystemExit(f"--backend {backend} is not usable here: {status.reason}")
    return "cuda" if backend == "cupy" else "cpu"


def to_numpy(t: Any) -> np.ndarray:
    """A torch tensor (any device) as a float64 NumPy array."""
    return t.detach().cpu().numpy().astype(np.float64)


def mean_and_stderr(values: Any) -> tuple[float, float]:
    """Mean and standard error (sample std / √k; 0 for one value) of k values."""
    values = np.asarray(values, dtype=np.float64)
    stderr = float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0
    return float(values.mean()), stderr


def count_parameters(model: Any) -> int:
    """Number of trainable scalars in ``model``: the p of its Jacobian."""
    return sum(int(p.numel()) for p in model.parameters() if p.requires_grad)
