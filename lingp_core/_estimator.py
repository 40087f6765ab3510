"""What LinearizedGP and LaplaceClassifier share: the estimator contract.

- Inputs are validated once, at the public method.
- ``fit`` (and every method that refits) builds the new state on a *draft* — a shallow copy of the model whose
  engines are new or copied objects — and swaps it in with one ``__dict__`` update only when it is complete. A fit
  that fails or is interrupted (KeyboardInterrupt included) leaves the model exactly as it was: nothing it computed
  reached the model.
- ``predict``-type methods check the test Jacobian: a JacobianBlocks, on the model's backend (one policy: never moved
  silently), with the training Jacobian's signature (parameter names and shapes, outputs, dtype, weight fingerprint).
- ``save``/``load`` go through one archive skeleton: the model writes its arrays and JSON config, :mod:`lingp_core.io`
  checksums them, and ``load`` rebuilds the model from them after checking every array's shape against the config.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

import backends
from lingp_core import _validate as v
from lingp_core import io
from lingp_core.jacobian import JacobianBlocks
from lingp_core.sharded import ShardedJacobian


def float_errors_checked() -> Any:
    """NumPy's floating-point warnings silenced where lingp checks the results itself and raises NonFiniteError
    naming the input at fault."""
    return np.errstate(over="ignore", invalid="ignore", divide="ignore")


class Estimator:
    """Base of the fitted models; subclasses set ``_KIND`` and implement ``_archive`` and ``_from_archive``."""

    _KIND = ""
    _backend: Any = None
    _signature: dict[str, Any] | None = None
    #: The constructor parameters that define the fitted posterior. Setting one after a fit (before a refit, or
    #: when the refit failed) would leave the attribute describing a model that is not the one fitted: predictions,
    #: the evidence and save refuse then (:meth:`_check_posterior`) instead of mixing the two.
    _POSTERIOR_PARAMS: tuple[str, ...] = ()
    _fitted_params: dict[str, Any] | None = None

    # ----- the transaction ------------------------------------------------------------------------------------------
    def _draft(self) -> Any:
        """A shallow copy to build a new fit on; subclasses replace its mutable parts (engines) by copies. A draft
        sets its parameters as it refits (searches, averages) and records them at the commit: until then it is
        not held to the old ones."""
        draft = copy.copy(self)
        draft._fitted_params = None
        return draft

    def _commit(self, draft: Any) -> None:
        """Swap a complete draft's state in: one attribute store, so no interrupt can land half-way. The draft's
        posterior-defining parameters are recorded first (a copy: an array set later in place is seen too)."""
        draft._fitted_params = {name: copy.copy(getattr(draft, name)) for name in self._POSTERIOR_PARAMS}
        self.__dict__ = draft.__dict__

    def _check_posterior(self) -> None:
        """Fitted, with every parameter of :data:`_POSTERIOR_PARAMS` as it was at the fit; InvalidOptionError
        naming the changed ones otherwise."""
        self._check_fitted()
        fitted = self._fitted_params or {}
        changed = [name for name, value in fitted.items() if not _same(getattr(self, name), value)]
        if changed:
            said = "; ".join(f"{name} is {_show(getattr(self, name))}, fitted with {_show(fitted[name])}"
                             for name in changed)
            raise v.InvalidOptionError(f"this {type(self).__name__} was changed after its fit ({said}): the fitted "
                                       "posterior is for the old values; refit (fit(J, y)) to use the new ones, or set "
                                       "them back")

    # ----- checks -------------------------------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        """Whether the model holds a fitted (or loaded) posterior."""
        return self._signature is not None

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise v.NotFittedError(f"this {type(self).__name__} is not fitted: call fit(J, y) (or "
                                   f"{type(self).__name__}.load) first")

    @staticmethod
    def _check_jacobian(J: Any, name: str = "J") -> JacobianBlocks:
        if not isinstance(J, (JacobianBlocks, ShardedJacobian)):
            raise v.ArgumentTypeError(f"{name} must be a JacobianBlocks from lingp_core.export_jacobian, got "
                                      f"{v.describe(J)}")
        if isinstance(J, ShardedJacobian):
            J.check_alive()
        return J

    def _check_star(self, J_star: Any) -> JacobianBlocks:
        """A test Jacobian that belongs with this model (fitted and unchanged, type, backend, signature); a sharded
        one is gathered (test sets are small: predictions come back in memory)."""
        self._check_posterior()
        J_star = self._check_jacobian(J_star, "J_star")
        if isinstance(J_star, ShardedJacobian):
            J_star.check_signature(self._signature)
            J_star = J_star.gather(getattr(self, "memory_budget", None))
        if J_star.backend != self._backend:
            raise v.BackendMismatchError(f"J_star lives on backend {J_star.backend.name!r} but the model on "
                                         f"{self._backend.name!r}; export the test inputs onto the same backend, or "
                                         f"load the model with backend={J_star.backend.name!r}")
        J_star.check_signature(self._signature)
        return J_star

    # ----- persistence --------------------------------------------------------------------------------------------
    def _archive(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(arrays, JSON config) for :meth:`save`."""
        raise NotImplementedError

    @classmethod
    def _from_archive(cls, arrays: dict[str, np.ndarray], config: dict[str, Any], backend: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def _expected_arrays(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Shapes (None: any size) the arrays of an archive with this config must have."""
        raise NotImplementedError

    @classmethod
    def _archive_spec(cls, path: Any, config: dict[str, Any]) -> dict[str, Any]:
        """:func:`io.load_archive`'s ``expected``: every state array with its shape, float or integer."""
        try:
            shapes = cls._expected_arrays(config)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, v.LingpError) as exc:
            raise io.ArchiveError(f"{path!r}: the saved configuration lacks or mistypes an entry ({exc!r}); the file "
                                  "was modified") from None
        return {name: (shape, "fiu") for name, shape in shapes.items()}

    def save(self, path: Any) -> str:
        """Write what prediction needs to an .npz archive (no pickle, no training targets); returns the path
        written. Read it back with ``load``."""
        self._check_posterior()
        arrays, config = self._archive()
        return io.save_archive(path, self._KIND, arrays, config)

    @classmethod
    def load(cls, path: Any, *, backend: Any = "numpy") -> Any:
        """A fitted model from ``save``, its arrays on ``backend`` ("numpy", "cupy" or a Backend); predictions equal
        those of the saved model. Raises :class:`lingp_core.ArchiveError` for a wrong, truncated or modified file,
        or arrays whose shapes do not fit the saved configuration."""
        be = backends.get_backend(backend)
        arrays, config = io.load_archive(path, cls._KIND, expected=lambda config: cls._archive_spec(path, config))
        try:
            model = cls._from_archive(arrays, config, be)
            model._fitted_params = {name: copy.copy(getattr(model, name)) for name in cls._POSTERIOR_PARAMS}
            return model
        except (io.ArchiveError, v.MemoryBudgetError, v.MissingDependencyError):
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, v.LingpError) as exc:
            # the checksums matched, so whoever changed the file recomputed them: name what does not fit
            raise io.ArchiveError(f"{path!r}: the saved model does not rebuild ({type(exc).__name__}: {exc}); the file "
                                  "was modified") from None


def checked_weight_mean(prior_mean: Any, J: JacobianBlocks) -> Any:
    """``fit``'s prior_mean as a float64 (p,) array on J's backend; ValueRangeError when J's dtype cannot hold it
    (J·m is computed in J's dtype)."""
    m = v.as_float_array(prior_mean, "prior_mean", J.backend, shape=(J.p,)).astype(np.float64)
    largest = float(J.xp.abs(m).max()) if m.size else 0.0
    if largest > float(np.finfo(J.dtype).max):
        raise v.ValueRangeError(f"prior_mean reaches {largest:.3g}, beyond the largest {np.dtype(J.dtype).name} number "
                                f"({np.finfo(J.dtype).max:.3g}) J·prior_mean is computed in; rescale it or export J "
                                "in float64")
    return m


def _same(a: Any, b: Any) -> bool:
    """Whether two parameter values are equal: numbers, strings, tuples, None, or arrays (NumPy or CuPy) of equal
    shape and values."""
    if any(x is None or isinstance(x, (str, tuple)) for x in (a, b)):
        return bool(a == b) if type(a) is type(b) else False
    x, y = _on_host(a), _on_host(b)
    return x.shape == y.shape and bool(np.array_equal(x, y))


def _on_host(x: Any) -> np.ndarray:
    return x.get() if hasattr(x, "get") and hasattr(x, "shape") else np.asarray(x)


def _show(value: Any) -> str:
    return f"an array of shape {value.shape}" if hasattr(value, "shape") else repr(value)


def jacobian_from_archive(arrays: dict[str, np.ndarray], config: dict[str, Any], backend: Any) -> JacobianBlocks:
    """The training Jacobian saved in an archive; ArchiveError when its arrays do not make a valid one."""
    try:
        return io.jacobian_from_arrays(arrays, config, backend)
    except (v.LingpError, KeyError, TypeError, IndexError) as exc:
        raise io.ArchiveError(f"the saved training Jacobian is not valid ({type(exc).__name__}: {exc}); the file was "
                              "modified") from None
