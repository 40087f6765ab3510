"""BlockWeightAverage: a Jacobian-kernel GP averaged over per-layer prior weights as well as over (s, σ²).

One prior scale for every weight says each layer may move as much as every other. A network fitted to one source task
is often better adapted through some layers than others (its last-layer features, or its early ones), and with a few
dozen targets the data can tell which. The prior on block b (a layer's parameters) gets variance s·ω_b, so

    K_ω = s · Σ_b ω_b J_b J_bᵀ,

and the predictions are averaged over ω on a grid as well as over (s, σ²):

    p(f* | y) = Σ_ω W_ω p(f* | y, ω),   W_ω ∝ ∫ p(y | ω, s, σ²) p(s, σ²) d(s, σ²),

each p(f* | y, ω) being :meth:`LinearizedGP.average_hyperparameters` on J scaled by √ω_b per block, and W_ω its evidence
integrated over the (s, σ²) grid (:func:`lingp_core._averaging.log_mass`) under a uniform prior over the ω grid.

The ω grid is over relative contributions: ω_b = r_b / mean diag(J_b J_bᵀ), r_b ∈ {10^(−decades), …, 1} (``levels``
values), with max_b r_b = 1 (an overall factor is s's job, and every child's (s, σ²) grid is centred at its own
data-scaled guess). So r_b = 1 for every block is the ordinary Jacobian kernel up to a per-layer normalization, and
r = (1, 10⁻³, …) all but switches the other layers off. There are levels^B − (levels−1)^B points for B blocks with a
non-zero kernel: ``max_components`` bounds them (export fewer parameter blocks with ``params=`` when there are many).
"""
from __future__ import annotations

import itertools
import warnings
from typing import Any

import numpy as np

from lingp_core import _averaging as averaging
from lingp_core import _validate as v
from lingp_core import io
from lingp_core._estimator import (
    FLOAT64,
    Estimator,
    archived_number,
    archived_signature,
    checked_weight_mean,
    float_errors_checked,
)
from lingp_core._hyperparameters import Hyperprior
from lingp_core._progress import progress_bar
from lingp_core.gp import LinearizedGP
from lingp_core.jacobian import JacobianBlocks
from lingp_core.sharded import is_sharded

__all__ = ["BlockWeightAverage"]

#: LinearizedGP settings that are the averaging's own (it fixes them or grids over them)
_NOT_SETTINGS = ("prior_scale", "noise")


class BlockWeightAverage(Estimator):
    """A :class:`LinearizedGP` averaged over per-block (per-layer) prior weights and over (s, σ²) (module docstring).

    Parameters
    ----------
    levels : int
        Values of each block's relative weight r_b, log-spaced from 10^(−decades) to 1 (≥ 1; 1: every r_b = 1, which
        is one LinearizedGP averaged over (s, σ²) with per-layer-normalized blocks).
    decades : float
        How far below the largest block weight the smallest grid value lies (> 0).
    grid_size, span, hyperprior, keep_mass
        Each component's :meth:`LinearizedGP.average_hyperparameters` (hyperprior default "data": log-normal priors
        at the data's scale; None for uniform). ``keep_mass`` also drops the ω points that together hold less than
        1 − keep_mass of the weight.
    max_components : int
        The most ω points allowed (each costs one LinearizedGP fit and one eigendecomposition).
    progress : bool
        A progress bar over the ω points (needs tqdm).
    **settings
        Further :class:`LinearizedGP` settings for every component (mean, output_mode, method, memory_budget,
        kernel_dtype, ...); not prior_scale or noise, which are averaged over.

    Attributes (after fit)
    ----------------------
    block_names_ : tuple of tuple of str
        The parameters of each block.
    relative_weights_ : ndarray (G, B)
        r of each kept ω point. A block whose training kernel is zero keeps r = ω = 1: the training data say nothing
        about it, so it keeps LinearizedGP's plain prior (variance s, in its parameters' own units) and adds that
        prior variance wherever its test Jacobian is not zero.
    block_scales_ : ndarray (B,)
        mean diag(J_b J_bᵀ) of the training Jacobian per block (1 for a block whose kernel is zero).
    block_weights_ : ndarray (G, B)
        The ω each kept component's Jacobian was scaled by (ω_b = r_b / mean diag J_b J_bᵀ).
    weights_ : ndarray (G,)
        W_ω of the kept points, summing to 1.
    log_masses_ : ndarray (G,)
        Their log evidence integrated over (s, σ²).
    models_ : list of LinearizedGP
        The kept components, each fitted on its scaled Jacobian and averaged over (s, σ²).
    """

    _KIND = "BlockWeightAverage"
    _POSTERIOR_PARAMS = ("levels", "decades", "grid_size", "span", "hyperprior", "keep_mass", "max_components",
                         "settings")

    def __init__(self, levels: int = 4, decades: float = 3.0, *, grid_size: int = 41,
                 span: float = averaging.SPAN_DECADES, hyperprior: Any = "data", keep_mass: float = 1 - 1e-9,
                 max_components: int = 256, progress: bool = False, **settings: Any) -> None:
        self.levels = v.check_int(levels, "levels", minimum=1)
        self.decades = v.check_positive(decades, "decades")
        if not 10.0 ** -self.decades >= np.finfo(np.float64).tiny:  # the smallest weight must be a normal float64
            largest = np.floor(-np.log10(np.finfo(np.float64).tiny) * 100) / 100  # rounded down: itself allowed
            raise v.ValueRangeError(f"decades must be at most {largest:.2f} (10^-decades, "
                                    f"the smallest relative block weight, a normal float64), got {decades!r}")
        self.grid_size = v.check_int(grid_size, "grid_size", minimum=3)
        self.span = v.check_positive(span, "span")
        self.keep_mass = averaging.check_keep_mass(keep_mass)
        if not (hyperprior is None or isinstance(hyperprior, Hyperprior)
                or (isinstance(hyperprior, str) and hyperprior == "data")):
            raise v.InvalidOptionError(f"hyperprior must be None, 'data' or a Hyperprior, got {v.describe(hyperprior)}")
        self.hyperprior = hyperprior
        self.max_components = v.check_int(max_components, "max_components", minimum=1)
        self.progress = v.check_bool(progress, "progress")
        for name in _NOT_SETTINGS:
            if name in settings:
                raise v.InvalidOptionError(f"BlockWeightAverage averages over {name}; do not pass it")
        try:
            probe = LinearizedGP(**settings)  # the settings' own checks, now rather than at fit
        except v.LingpError:
            raise
        except TypeError as exc:
            raise v.ArgumentTypeError(f"unknown LinearizedGP setting: {exc}") from None
        self.settings = {name: getattr(probe, name) for name in settings}  # as LinearizedGP keeps them: JSON-ready

    def __repr__(self) -> str:
        fitted = f", components={len(self.models_)}" if self.is_fitted else ""
        return f"BlockWeightAverage(levels={self.levels}, decades={self.decades:g}{fitted})"

    # ----- fit ------------------------------------------------------------------------------------------------------
    def fit(self, J: JacobianBlocks, y: Any, *, prior_mean: Any = None) -> BlockWeightAverage:
        """Fit one averaged LinearizedGP per ω point on J scaled per block, and weight the points by their evidence.

        Parameters
        ----------
        J : JacobianBlocks
            The training Jacobian (in memory), as for :meth:`LinearizedGP.fit`.
        y : array of shape (n, c), or (n,) when c = 1
            The targets, as for :meth:`LinearizedGP.fit`.
        prior_mean : array of shape (p,), optional
            The prior mean of θ − θ̂, as for :meth:`LinearizedGP.fit` (−θ̂: the prior N(0, s·ω_b·I) on each block's
            weights themselves). Each component sees it in its scaled coordinates, m_b / √ω_b.

        Like every fit, it builds the new state aside: if it fails the model is unchanged.
        """
        if is_sharded(J):
            raise v.MissingCapabilityError("BlockWeightAverage fits one eigendecomposition per ω point in memory; "
                                           "this Jacobian is sharded on a Dask cluster: average on an in-memory subset")
        J = self._check_jacobian(J)
        if prior_mean is not None:
            prior_mean = checked_weight_mean(prior_mean, J)
        scale = _block_kernel_sizes(J)
        relative = self._relative_grid(J, scale)
        # a point whose mass lies this far below the heaviest so far can never hold keep_mass's share: drop it now
        negligible = np.inf if self.keep_mass == 1 else np.log(len(relative) / (1 - self.keep_mass)) + 1.0
        scales = np.where(scale > 0, scale, 1.0)
        fitted, log_masses = {}, np.full(len(relative), -np.inf)  # point → (model, its grid-edge warnings)
        with progress_bar(len(relative), enabled=self.progress, desc="block weights", unit="fit") as bar:
            for i, r in enumerate(relative):
                fitted[i] = self._component(J, y, r / scales, prior_mean)
                if i == 0:
                    self._check_memory(fitted[i][0], len(relative))
                log_masses[i] = fitted[i][0].averaging_["log_mass"]
                top = float(log_masses.max())
                for j in [j for j in fitted if log_masses[j] < top - negligible]:
                    del fitted[j]
                bar.update()
        available = np.full_like(log_masses, -np.inf)
        available[list(fitted)] = log_masses[list(fitted)]
        kept, weights = averaging.posterior_weights(available, np.zeros_like(log_masses), self.keep_mass)
        draft = self._draft()
        draft.models_ = [fitted[i][0] for i in kept]
        draft.relative_weights_ = relative[kept]
        draft.block_scales_ = scales
        draft.block_weights_ = relative[kept] / scales
        draft.weights_, draft.log_masses_ = weights, log_masses[kept]
        from scipy.special import logsumexp  # scipy loads on use, not when lingp_core is imported

        draft._log_evidence = float(logsumexp(log_masses) - np.log(log_masses.size))
        draft.block_names_ = J.block_names
        # the unscaled J's signature: the components' carry their own block weights, and predict scales J_star
        draft._backend, draft._signature = J.backend, J.signature()
        # warned before the commit: a warning raised as an error leaves the model unchanged
        self._warn_grid_edges([fitted[i][1] for i in kept], weights)
        self._commit(draft)
        return self

    def _check_memory(self, model: LinearizedGP, count: int) -> None:
        """MemoryBudgetError when ``count`` components of this one's size (its state, scaled Jacobian and prior mean)
        could exceed the budget: each holds its own eigendecomposition, in function space its J, and with a prior
        mean its own copy m / √ω (p floats)."""
        be = model._backend
        state = sum(int(a.nbytes) for engine in model._engines for a in engine.state().values())
        one = state + (int(model._J.nbytes) if model.plan_.space == "function" else 0)
        if model._weight_mean is not None:
            one += int(model._weight_mean.nbytes)
        v.check_memory(one * count, v.resolve_memory_budget(self.settings.get("memory_budget"), be),
                       what=f"{count} block-weight components of {v.format_bytes(one)} each",
                       alternative="use fewer levels, export fewer parameter blocks (params=), or average over "
                                   "(s, σ²) alone (LinearizedGP.average_hyperparameters)")

    def _relative_grid(self, J: JacobianBlocks, scale: np.ndarray) -> np.ndarray:
        """The r points (G, B): every combination of the levels over blocks with a non-zero kernel, max r_b = 1."""
        active = np.flatnonzero(scale > 0)
        if active.size == 0:
            raise v.ValueRangeError("every block of J is zero (its kernel J Jᵀ vanishes): there is nothing to weight")
        values = np.unique(np.logspace(-self.decades, 0.0, self.levels)) if self.levels > 1 else np.ones(1)
        if values.size < self.levels:
            raise v.ValueRangeError(f"decades = {self.decades:g} is too small: its {self.levels} levels are not "
                                    "distinct float64 numbers; use fewer levels or more decades")
        self._check_smallest_weight(J, values[0] / scale[active])
        count = self.levels ** active.size - (self.levels - 1) ** active.size
        if count > self.max_components:
            raise v.InvalidOptionError(f"{self.levels} levels over {active.size} blocks make {count} ω points, more "
                                       f"than max_components = {self.max_components}: use fewer levels, raise "
                                       "max_components, or export fewer parameter blocks (export_jacobian(params=...))")
        points = [c for c in itertools.product(values, repeat=active.size) if max(c) == 1.0]
        relative = np.ones((len(points), len(J.blocks)))
        relative[:, active] = np.asarray(points)
        return relative

    def _check_smallest_weight(self, J: JacobianBlocks, smallest: np.ndarray) -> None:
        """ValueRangeError naming decades when the smallest weight of a block, 10^-decades / mean diag(J_b J_bᵀ), or
        its square root in J's dtype (J.scale_blocks multiplies the block by it) is not a normal number."""
        info = np.finfo(J.dtype)
        with np.errstate(under="ignore"):
            roots = np.sqrt(smallest).astype(J.dtype)
        if not ((smallest >= np.finfo(np.float64).tiny).all() and (roots >= info.tiny).all()):
            raise v.ValueRangeError(f"decades = {self.decades:g} makes the smallest block weight 10^-decades / mean "
                                    f"diag(J_b J_bᵀ) = {smallest.min():.3g}, whose square root scales J "
                                    f"({J.dtype}) and must be a normal {J.dtype} number (≥ {info.tiny:.3g}); use "
                                    "fewer decades")

    def _component(self, J: JacobianBlocks, y: Any, block_weights: np.ndarray,
                   prior_mean: Any) -> tuple[LinearizedGP, list]:
        """One LinearizedGP on J scaled by √ω (the prior mean of θ − θ̂, if any, divided by √ω: the same prior in
        the scaled coordinates), averaged over (s, σ²); the average's warnings (grid edge, ill-conditioning at its
        heaviest point) are collected, not emitted (only the points that keep weight are worth a warning)."""
        if prior_mean is not None:
            roots = J.backend.xp.asarray(np.repeat(np.sqrt(block_weights), J.block_sizes))
            prior_mean = prior_mean / roots
        with warnings.catch_warnings():  # about the settings' (s, σ²), which the average below replaces
            warnings.simplefilter("ignore", v.NumericalWarning)
            model = LinearizedGP(**self.settings).fit(J.scale_blocks(block_weights), y, prior_mean=prior_mean)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", v.NumericalWarning)
            model.average_hyperparameters(grid_size=self.grid_size, span=self.span, hyperprior=self.hyperprior,
                                          keep_mass=self.keep_mass)
        others = [w for w in caught if not issubclass(w.category, v.NumericalWarning)]
        for w in others:  # not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return model, [str(w.message) for w in caught if issubclass(w.category, v.NumericalWarning)]

    def _warn_grid_edges(self, messages: list[list[str]], weights: np.ndarray) -> None:
        heavy = [(float(w), m[0]) for w, m in zip(weights, messages) if m and w > 0.01]
        if heavy:
            share = sum(w for w, _ in heavy)
            v.warn(f"components holding {share:.1%} of the block-weight posterior warned: {heavy[0][1]}",
                   v.NumericalWarning)

    # ----- predictions ------------------------------------------------------------------------------------------------
    def predict(self, J_star: JacobianBlocks, return_var: bool = False) -> Any:
        """The mixture's mean (n*, c) and, with ``return_var``, its latent variances (n*, c): mean = Σ W_ω mean_ω,
        var = Σ W_ω (var_ω + (mean_ω − mean)²), each component itself a mixture over (s, σ²)."""
        return_var = v.check_bool(return_var, "return_var")
        J_star = self._check_star(J_star)

        def component(g: int) -> tuple[Any, Any]:
            star = J_star.scale_blocks(self.block_weights_[g])
            if return_var:
                return self.models_[g].predict(star, return_var=True)
            return self.models_[g].predict(star), 0.0
        with float_errors_checked():
            mean, var = averaging.mixture_moments(component, self.weights_)
        return (mean, var) if return_var else mean

    @property
    def predictive_noise_(self) -> float:
        """The posterior mean of σ² over both grids: add it to ``var`` for an observation's variance."""
        self._check_fitted()
        return float(sum(w * float(np.dot(m.mixture_.weights, m.mixture_.noises))
                         for w, m in zip(self.weights_, self.models_)))

    def log_marginal_likelihood(self) -> float:
        """log p(y) of the whole average: the components' integrated evidence, averaged over the ω grid (uniform)."""
        self._check_posterior()
        return self._log_evidence

    # ----- persistence ------------------------------------------------------------------------------------------------
    def _archive(self) -> tuple[dict[str, Any], dict[str, Any]]:
        arrays: dict[str, Any] = {"weights": self.weights_, "log_masses": self.log_masses_,
                                  "relative_weights": self.relative_weights_, "block_scales": self.block_scales_}
        children = []
        for g, model in enumerate(self.models_):
            child_arrays, child_config = model._archive()
            arrays.update({f"m{g}_{name}": a for name, a in child_arrays.items()})
            children.append(child_config)
        config = {"options": {"levels": self.levels, "decades": self.decades, "grid_size": self.grid_size,
                              "span": self.span, "keep_mass": self.keep_mass, "max_components": self.max_components,
                              "hyperprior": _hyperprior_json(self.hyperprior)},
                  "settings": self.settings, "block_names": [list(b) for b in self.block_names_],
                  "log_evidence": self._log_evidence, "components": children, "signature": self._signature}
        return arrays, config

    @classmethod
    def _check_archive_config(cls, config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
        components = config["components"]
        if not isinstance(components, list) or not components or not all(isinstance(c, dict) for c in components):
            raise io.ArchiveError(f"the saved 'components' is {components!r:.60}, not a non-empty list of the "
                                  "block-weight points' configurations; the file was modified")
        own = config.get("signature")  # absent in archives saved before the average kept its own
        if "signature" in config:
            archived_signature(own)
        for g, child in enumerate(components):
            prefix = f"m{g}_"
            try:
                LinearizedGP._check_archive_config(child, {name[len(prefix):]: shape for name, shape in shapes.items()
                                                           if name.startswith(prefix)})
            except io.ArchiveError as exc:
                raise io.ArchiveError(f"block-weight point {g}: {exc}") from None
            if own is None:  # an archive saved before the average kept its own signature
                continue
            differ = [key for key in ("blocks", "outputs", "dtype") if child["signature"][key] != own[key]]
            if differ:
                raise io.ArchiveError(f"block-weight point {g}: its signature's {', '.join(differ)} differ from the "
                                      "average's saved signature; the file was modified")

    @classmethod
    def _expected_arrays(cls, config: dict[str, Any]) -> dict[str, Any]:
        G, B = len(config["components"]), len(config["block_names"])
        expected: dict[str, Any] = {"weights": ((G,), FLOAT64), "log_masses": ((G,), FLOAT64),
                                    "relative_weights": ((G, B), FLOAT64), "block_scales": ((B,), FLOAT64)}
        for g, child in enumerate(config["components"]):
            expected.update({f"m{g}_{name}": spec for name, spec in LinearizedGP._expected_arrays(child).items()})
        return expected

    @classmethod
    def _from_archive(cls, arrays: dict[str, np.ndarray], config: dict[str, Any], be: Any) -> BlockWeightAverage:
        options = dict(config["options"])
        options["hyperprior"] = _hyperprior_from_json(options["hyperprior"])
        model = cls(**options, **config["settings"])
        from scipy.special import logsumexp

        weights = np.asarray(arrays["weights"], dtype=np.float64)
        scales = np.asarray(arrays["block_scales"], dtype=np.float64)
        relative = np.asarray(arrays["relative_weights"], dtype=np.float64)
        log_masses = np.asarray(arrays["log_masses"], dtype=np.float64)
        if not (np.isfinite(scales).all() and (scales > 0).all() and np.isfinite(relative).all()
                and (relative > 0).all() and (relative.max(axis=1) == 1.0).all() and np.isfinite(log_masses).all()
                and (weights >= 0).all() and np.isclose(weights.sum(), 1.0, rtol=1e-9)
                and np.allclose(weights, np.exp(log_masses - logsumexp(log_masses)), rtol=1e-9, atol=0)):
            raise io.ArchiveError("the saved block-weight mixture is not valid (block scales and relative weights "
                                  "finite and > 0, the largest relative weight 1, weights ∝ exp(log_masses) summing "
                                  "to 1); the file was modified")
        model.models_ = []
        for g, child in enumerate(config["components"]):
            prefix = f"m{g}_"
            member = LinearizedGP._from_archive(
                {name[len(prefix):]: a for name, a in arrays.items() if name.startswith(prefix)}, child, be)
            if getattr(member, "_J", None) is not None:  # a function-space member keeps J scaled by ω: its sizes are r
                sizes = _block_kernel_sizes(member._J)
                if not np.allclose(sizes[sizes > 0], relative[g][sizes > 0], rtol=1e-4, atol=0):
                    raise io.ArchiveError(f"the saved relative weights of block-weight point {g} do not match its "
                                          "saved Jacobian; the file was modified")
            model.models_.append(member)
        model.block_scales_, model.weights_, model.block_weights_ = scales, weights, relative / scales
        model.log_masses_, model.relative_weights_ = log_masses, relative
        model.block_names_ = tuple(tuple(b) for b in config["block_names"])
        model._log_evidence = archived_number(config["log_evidence"], "log_evidence")
        # archives written before the average kept its own signature: a component's, without block weights
        model._backend, model._signature = be, config.get("signature", model.models_[0]._signature)
        return model


def _block_kernel_sizes(J: JacobianBlocks) -> np.ndarray:
    """mean diag(J_b J_bᵀ) per block, float64 on the host (0 for a block whose Jacobian is zero)."""
    be = J.backend
    return np.array([float(be.to_numpy(b.gram_diagonal()).astype(np.float64).mean()) for b in J.blocks])


def _hyperprior_json(hyperprior: Any) -> Any:
    if hyperprior is None or isinstance(hyperprior, str):
        return hyperprior
    return {"Hyperprior": hyperprior.as_dict()}


def _hyperprior_from_json(value: Any) -> Any:
    if isinstance(value, dict):
        return Hyperprior(**value["Hyperprior"])
    return value
