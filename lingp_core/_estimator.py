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
import math
import os
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
        draft._record_fitted_params()
        self.__dict__ = draft.__dict__

    def _record_fitted_params(self) -> None:
        self._fitted_params = {name: copy.copy(getattr(self, name)) for name in self._POSTERIOR_PARAMS}

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
    def _check_archive_config(cls, config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
        """ArchiveError unless the counts and choices :meth:`_expected_arrays` is built from are what a save writes:
        plain ints in range that agree with each other, with the signature and with the arrays' ``shapes`` where
        one holds them. Runs first: a huge count would make the spec loop or allocate for ever."""

    @classmethod
    def _expected_arrays(cls, config: dict[str, Any]) -> dict[str, Any]:
        """{name: (shape, dtype)} of :func:`io.load_archive`'s ``expected`` for an archive with this (checked)
        config."""
        raise NotImplementedError

    @classmethod
    def _archive_spec(cls, path: Any, config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        """The config checked (:meth:`_check_archive_config`), then what every state array must be."""
        try:
            cls._check_archive_config(config, shapes)
            return cls._expected_arrays(config)
        except io.ArchiveError as exc:
            raise io.ArchiveError(f"{_file(path)}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, v.LingpError) as exc:
            raise io.ArchiveError(f"{_file(path)}: the saved configuration lacks or mistypes an entry ({exc!r}); the "
                                  "file was modified") from None

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
        arrays, config = io.load_archive(path, cls._KIND)
        io.check_expected(path, arrays, cls._archive_spec(path, config, {k: a.shape for k, a in arrays.items()}))
        try:
            model = cls._from_archive(arrays, config, be)
            model._record_fitted_params()
            return model
        except io.ArchiveError as exc:
            raise io.ArchiveError(f"{_file(path)}: {exc}") from None
        except (v.MemoryBudgetError, v.MissingDependencyError):
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, v.LingpError) as exc:
            # the checksums matched, so whoever changed the file recomputed them: name what does not fit
            raise io.ArchiveError(f"{_file(path)}: the saved model does not rebuild ({type(exc).__name__}: {exc}); "
                                  "the file was modified") from None


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
    return f"an array of shape {value.shape}" if hasattr(value, "shape") else _shown(value)


# ----- archive checks shared by the models ---------------------------------------------------------------------------

#: Every state array is saved in float64 (the training Jacobian's f0 in the Jacobian's dtype).
FLOAT64 = (np.float64,)

#: The largest count a saved configuration may hold: more float64 than an address space could ever hold.
MAX_COUNT = int(np.iinfo(np.intp).max) // 8


def _file(path: Any) -> str:
    return repr(os.fspath(path))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def archived_count(value: Any, entry: str, *, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    """A count of a saved configuration: a plain int (not a bool, float or text) in [minimum, maximum];
    ArchiveError naming the entry otherwise."""
    if type(value) is not int or not minimum <= value <= maximum:
        raise io.ArchiveError(f"the saved configuration's {entry!r} is {_shown(value)}, not a count (an int from "
                              f"{minimum} to {maximum:.3g}); the file was modified")
    return value


def archived_number(value: Any, entry: str, *, null: bool = False) -> float | None:
    """A finite number of a saved configuration (None where ``null`` allows it); ArchiveError naming the entry."""
    if value is None and null:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value) if abs(value) <= float(np.finfo(np.float64).max) else math.inf
        if math.isfinite(number):
            return number
    raise io.ArchiveError(f"the saved configuration's {entry!r} is {_shown(value)}, not a finite number"
                          f"{' or null' if null else ''}; the file was modified")


def archived_length(count: int, entry: str, shapes: dict[str, tuple[int, ...]], array: str) -> None:
    """ArchiveError unless the 1-d array ``array`` holds ``count`` entries, as the config's ``entry`` says."""
    if array not in shapes:
        raise io.ArchiveError(f"the archive lacks the array {array!r} the saved {entry!r} refers to; the file was "
                              "modified")
    if shapes[array] != (count,):
        raise io.ArchiveError(f"the saved {entry!r} is {count} but array {array!r} has shape {shapes[array]}; the "
                              "file was modified")


def archived_signature(signature: Any) -> tuple[int, int]:
    """(p, c) of a saved :meth:`JacobianBlocks.signature`, checked to have its structure (every predict compares
    J_star's with it); ArchiveError saying what is wrong."""
    problem = _signature_problem(signature)
    if problem:
        raise io.ArchiveError(f"the saved signature {problem}; the file was modified")
    p = sum(math.prod(shape) for _, shapes in signature["blocks"] for shape in shapes)
    return p, len(signature["outputs"])


def _is_count(value: Any, minimum: int = 0) -> bool:
    return type(value) is int and minimum <= value <= MAX_COUNT


def _is_positive(value: Any) -> bool:
    return isinstance(value, float | int) and not isinstance(value, bool) and 0 < value < math.inf


def _signature_problem(signature: Any) -> str | None:
    """What keeps ``signature`` from being one JacobianBlocks.signature() wrote, or None. ``weights`` and
    ``block_weights`` may be absent (archives saved before they were recorded)."""
    if not isinstance(signature, dict):
        return f"is {_shown(signature)}, not a dict"
    missing = sorted({"blocks", "outputs", "dtype"} - set(signature))
    if missing:
        return f"lacks {missing}"
    blocks, outputs = signature["blocks"], signature["outputs"]
    if not isinstance(blocks, list) or not blocks:
        return f"has blocks {_shown(blocks)}, not a non-empty list of [names, shapes]"
    for i, block in enumerate(blocks):
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(part, list) for part in block)
                and block[0] and len(block[0]) == len(block[1]) and all(isinstance(name, str) for name in block[0])
                and all(isinstance(shape, list) and all(_is_count(d) for d in shape) for shape in block[1])):
            return f"has block {i} = {_shown(block)}, not [names, shapes] with one shape (a list of ints >= 0) per name"
    if not isinstance(outputs, list) or not outputs or not all(_is_count(o) for o in outputs):
        return f"has outputs {_shown(outputs)}, not a non-empty list of ints >= 0"
    if signature["dtype"] not in ("float32", "float64"):
        return f"has dtype {_shown(signature['dtype'])}, not 'float32' or 'float64'"
    if not isinstance(signature.get("weights"), str | None):
        return f"has weights {_shown(signature['weights'])}, not a fingerprint (a text) or null"
    scales = signature.get("block_weights")
    if scales is not None and not (isinstance(scales, list) and len(scales) == len(blocks)
                                   and all(_is_positive(w) for w in scales)):
        return f"has block_weights {_shown(scales)}, not null or one finite number > 0 per block ({len(blocks)})"
    return None


def check_same_parameters(J: JacobianBlocks, signature: dict[str, Any]) -> None:
    """ArchiveError unless the saved training Jacobian has the saved signature's blocks, outputs and dtype."""
    mine = J.signature()
    differ = [key for key in ("blocks", "outputs", "dtype", "block_weights")
              if key in signature and mine[key] != signature[key]]
    if differ:
        ours, saved = _shown([mine[k] for k in differ]), _shown([signature[k] for k in differ])
        raise io.ArchiveError(f"the saved training Jacobian's {', '.join(differ)} differ from the saved signature's "
                              f"({ours} against {saved}); the file was modified")


def check_triangular_factor(arrays: dict[str, np.ndarray], name: str) -> None:
    """ArchiveError unless the saved triangular factor ``arrays[name]`` (a Cholesky factor L, or R⁻¹) has the
    positive diagonal every fit's factor has: solves with a zero pivot fail at every prediction."""
    diagonal = np.diagonal(arrays[name])
    bad = np.flatnonzero(~(diagonal > 0))
    if bad.size:
        i = int(bad[0])
        raise io.ArchiveError(f"array {name!r} is a saved triangular factor, but its diagonal holds {diagonal[i]:.3g} "
                              f"at ({i}, {i}) ({bad.size} of {diagonal.size} entries not > 0); a fit's factors have a "
                              "positive diagonal, so the file was modified")


def jacobian_from_archive(arrays: dict[str, np.ndarray], config: dict[str, Any], backend: Any) -> JacobianBlocks:
    """The training Jacobian saved in an archive; ArchiveError when its arrays do not make a valid one."""
    try:
        return io.jacobian_from_arrays(arrays, config, backend)
    except (v.LingpError, KeyError, TypeError, IndexError) as exc:
        raise io.ArchiveError(f"the saved training Jacobian is not valid ({type(exc).__name__}: {exc}); the file was "
                              "modified") from None
