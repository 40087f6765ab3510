"""The one input-checking boundary of lingp, and its error types.

Every public function checks its inputs here, once, and then trusts them. The rules: messages name the argument, the
shapes, dtypes and values at fault; nothing is cast silently (a wrong dtype raises); NaN or Inf in an input raises;
host and device arrays are never mixed.
"""
from __future__ import annotations

import numbers
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

import backends
from backends import Backend

#: lingp's own source folders: a warning is attributed to the first frame outside them
_PACKAGE_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, backends.__file__))


class LingpError(Exception):
    """Base class of every error lingp raises on purpose."""

    def __reduce__(self) -> tuple:
        # rebuilt as its own class with its message: an error raised on a Dask worker reaches the user as itself
        # (distributed's traceback pickling cannot rebuild a MemoryError subclass such as MemoryBudgetError)
        return (type(self), self.args, self.__dict__ or None)


class ShapeError(LingpError, ValueError):
    """An array has the wrong number of dimensions or a shape that does not fit the others."""


class DTypeError(LingpError, TypeError):
    """An array has a dtype lingp does not compute in, or dtypes that should agree do not."""


class BackendMismatchError(LingpError, TypeError):
    """Arrays from different backends (NumPy and CuPy) were mixed, or an array is not on the requested backend."""


class NonFiniteError(LingpError, ValueError):
    """An input holds NaN or Inf."""


class ValueRangeError(LingpError, ValueError):
    """A scalar or array value is outside its allowed range (e.g. a non-positive noise variance)."""


class MemoryBudgetError(LingpError, MemoryError):
    """An allocation would exceed the memory budget; the message gives the numbers and the alternative."""


class ConvergenceError(LingpError, RuntimeError):
    """An iterative method failed in a way that leaves no usable result."""


class NotPositiveDefiniteError(LingpError, ValueError):
    """A matrix that must be symmetric positive definite is not, even after the allowed jitter."""


class NotFittedError(LingpError, RuntimeError):
    """A model was used for prediction (or evidence) before ``fit`` or ``load``."""


class ArgumentTypeError(LingpError, TypeError):
    """An argument is of the wrong Python type (e.g. an array where a JacobianBlocks is expected)."""


class MissingCapabilityError(ArgumentTypeError, NotImplementedError):
    """An object lacks a capability (an operator's product or cheap diagonal) that the call needs."""


class InvalidOptionError(LingpError, ValueError):
    """An option is not one of its allowed values, or options that cannot be combined were combined."""


class SignatureError(LingpError, ValueError):
    """A Jacobian does not belong with the model or kernel it is used with: other parameters, outputs, dtype or
    weights (a fingerprint of the parameter values at export) than the training Jacobian's."""


class SignatureShapeError(SignatureError, ShapeError):
    """Two Jacobians that must belong together hold other parameters (names, shapes) or other model outputs."""


class SignatureDTypeError(SignatureError, DTypeError):
    """Two Jacobians that must belong together have different dtypes."""


class ExportError(LingpError, RuntimeError):
    """The network could not be differentiated as asked; the message says why and what to use instead."""


class ClusterError(LingpError, RuntimeError):
    """The Dask cluster a sharded Jacobian, or a model fitted on one, lives on is gone: its client was closed or the
    cluster restarted, so the shards (and a cluster factorization) no longer exist."""


class MissingDependencyError(LingpError, ImportError):
    """An optional package a requested feature needs is not installed; the message says what to install."""


class ConvergenceWarning(UserWarning):
    """An iterative method stopped before meeting its tolerance; its result says by how much."""


class NumericalWarning(UserWarning):
    """A numerical safeguard changed the problem (e.g. jitter added to a diagonal); the message says by how much."""


# ----- backends ---------------------------------------------------------------------------------------------------

def backend_of(*arrays: Any, backend: Any = None) -> Backend:
    """The backend the arrays live on, or the named backend after checking the arrays are on it.

    Raises BackendMismatchError (a TypeError) when arrays are mixed or not on the named backend.
    """
    try:
        found = backends.infer(*arrays)
    except TypeError as exc:
        raise BackendMismatchError(str(exc)) from None
    if backend is None:
        return found
    wanted = backends.get_backend(backend)
    on_some_backend = [a for a in arrays if backends.backend_name_of(a) is not None]
    if on_some_backend and found != wanted:
        raise BackendMismatchError(f"inputs live on backend {found.name!r} but backend {wanted.name!r} was requested; "
                                   f"move them with get_backend({wanted.name!r}).asarray(x) first")
    return wanted


# ----- arrays -----------------------------------------------------------------------------------------------------

def describe(x: Any) -> str:
    """'float32 array of shape (3, 4)' for error messages."""
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    kind = f"{type(x).__module__.split('.')[0]}.{type(x).__name__}"
    if shape is None:
        return f"{kind} {x!r}"[:200]
    return f"{kind} of dtype {dtype} and shape {tuple(shape)}"


def as_float_array(x: Any, name: str, backend: Backend, *, ndim: int | Sequence[int] | None = None,
                   shape: Sequence[int | None] | None = None, dtypes: Iterable[Any] | None = None,
                   finite: bool = True) -> Any:
    """Check one floating array argument and return it as an array of ``backend`` (same dtype, no copy if possible).

    Parameters
    ----------
    x : array_like or torch.Tensor
        The argument. Lists and tuples are read with NumPy's default dtype (float64 for floats).
    name : str
        The argument's name, for messages.
    backend : Backend
        Where the array must live; arrays from another backend raise BackendMismatchError.
    ndim : int or sequence of int, optional
        Allowed numbers of dimensions.
    shape : sequence of int or None, optional
        Expected shape; None entries match any size (implies ``ndim=len(shape)``).
    dtypes : iterable of dtype, optional
        Allowed dtypes (default: the backend's float dtypes, float32 and float64). Other dtypes raise DTypeError.
    finite : bool
        Whether NaN/Inf raise NonFiniteError (default True).
    """
    arr = as_array(x, name, backend)
    allowed = tuple(np.dtype(d) for d in (dtypes if dtypes is not None else backend.float_dtypes))
    if arr.dtype not in allowed:
        raise DTypeError(f"{name} has dtype {arr.dtype} (shape {tuple(arr.shape)}); expected one of "
                         f"{', '.join(str(d) for d in allowed)}. lingp does not cast silently: convert it explicitly, "
                         f"e.g. {name}.astype('{allowed[-1]}')")
    if shape is not None:
        check_shape(arr, name, shape)
    elif ndim is not None:
        allowed_ndim = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in allowed_ndim:
            raise ShapeError(f"{name} must have {' or '.join(map(str, allowed_ndim))} dimension(s), "
                             f"got shape {tuple(arr.shape)}")
    if finite:
        check_finite(arr, name, backend)
    return arr


def as_array(x: Any, name: str, backend: Backend) -> Any:
    """An array argument of any dtype on ``backend`` (no copy if possible): ArgumentTypeError for None or a masked
    array, BackendMismatchError for an array of another backend."""
    if x is None:
        raise ArgumentTypeError(f"{name} is required, got None")
    if backends.backend_name_of(x) not in (None, backend.name):
        raise BackendMismatchError(f"{name} is a {describe(x)} but the computation runs on backend {backend.name!r}; "
                                   f"move it with get_backend({backend.name!r}).asarray({name}) first")
    refuse_masked(x, name)
    return backend.asarray(x)


def refuse_masked(x: Any, name: str) -> None:
    """ArgumentTypeError for a numpy.ma.MaskedArray: np.asarray drops the mask, so its hidden values would be used."""
    if isinstance(x, np.ma.MaskedArray):
        hidden = int(np.ma.count_masked(x))
        raise ArgumentTypeError(f"{name} is a numpy.ma.MaskedArray of shape {x.shape} with {hidden} masked "
                                f"entr{'y' if hidden == 1 else 'ies'}: lingp would ignore the mask and use the values "
                                f"under it; pass {name}.filled(value) with the value you mean, or drop the masked "
                                "rows (and the matching examples of J) explicitly")


def check_shape(arr: Any, name: str, shape: Sequence[int | None]) -> None:
    """Raise ShapeError unless arr.shape matches ``shape`` (None entries match any size)."""
    got = tuple(arr.shape)
    if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
        wanted = "(" + ", ".join("any" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ShapeError(f"{name} has shape {got}; expected {wanted}")


def check_finite(arr: Any, name: str, backend: Backend) -> None:
    """Raise NonFiniteError naming how many NaN/Inf entries ``arr`` holds and where the first one is."""
    xp = backend.xp
    finite = xp.isfinite(arr)
    if bool(finite.all()):
        return
    n_nan = int(xp.isnan(arr).sum())
    n_inf = int(finite.size - int(finite.sum()) - n_nan)
    first = tuple(int(i) for i in np.unravel_index(int(xp.argmin(finite.ravel())), arr.shape))
    raise NonFiniteError(f"{name} (shape {tuple(arr.shape)}, dtype {arr.dtype}) holds {n_nan} NaN and {n_inf} Inf "
                         f"entries, the first at index {first}; lingp never replaces them, clean the input first")


def check_same_dtype(**arrays: Any) -> np.dtype:
    """The one dtype shared by the named arrays; DTypeError listing every name and dtype otherwise."""
    dtypes = {name: np.dtype(a.dtype) for name, a in arrays.items() if a is not None}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name}: {d}" for name, d in dtypes.items())
        raise DTypeError(f"dtypes must agree ({listed}); convert explicitly, lingp does not cast silently")
    return next(iter(dtypes.values()))


# ----- scalars ----------------------------------------------------------------------------------------------------

def check_positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """A finite real scalar > 0 (or >= 0 with ``allow_zero``) as float; ValueRangeError or TypeError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    ok = np.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        raise ValueRangeError(f"{name} must be finite and {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


def check_normal(values: Any, dtype: Any, what: Any, *, hint: str, allow_zero: bool = False) -> None:
    """ValueRangeError unless every value (read in float64) is a normal number of ``dtype`` (or 0 with
    ``allow_zero``): the cast to ``dtype`` would otherwise give Inf, or lose digits (or all) to underflow.

    ``what`` names the value in the message: a str, or a callable of the flat index of the first bad value.
    """
    info = np.finfo(dtype)
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    size = np.abs(flat)
    bad = ~((size >= info.tiny) & (size <= info.max)) & ~(allow_zero & (flat == 0))
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        described = what(j) if callable(what) else f"{what} = {flat[j]:.3g}"
        raise ValueRangeError(f"{described} is outside the normal range [{info.tiny:.3g}, {info.max:.3g}] of "
                              f"{np.dtype(dtype)}, the dtype it is computed in; {hint}")


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer within [minimum, maximum]; TypeError for non-integers, ValueRangeError outside the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        raise ValueRangeError(f"{name} must lie in [{lo}, {hi}], got {v}")
    return v


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """One of ``choices``; InvalidOptionError listing them otherwise."""
    if not isinstance(value, str) or value not in choices:
        raise InvalidOptionError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """A real bool (numpy.bool_ too): "no", 0 or None are not read as truth values."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


# ----- memory -----------------------------------------------------------------------------------------------------



def nbytes_of(shape: Sequence[int], dtype: Any) -> int:
    """Bytes of an array of this shape and dtype."""
    return int(np.prod([int(s) for s in shape], dtype=np.int64)) * np.dtype(dtype).itemsize


def format_bytes(n: float) -> str:
    """'1.5 GiB' style sizes for messages."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def resolve_memory_budget(budget: Any, backend: Backend) -> int:
    """Bytes allowed: the given budget, or the backend's ``budget_fraction`` of the free memory where it allocates
    (host: half; a CUDA device: 95%, CuPy's pool included)."""
    if budget is None:
        return int(backend.budget_fraction * backend.free_memory().arrays)
    return int(check_positive(budget, "memory_budget"))


def check_memory(nbytes: int, budget: int, *, what: str, alternative: str) -> None:
    """Raise MemoryBudgetError, with the numbers and the alternative, when ``nbytes`` exceeds ``budget``."""
    if nbytes > budget:
        raise MemoryBudgetError(f"{what} needs {format_bytes(nbytes)} but the memory budget is {format_bytes(budget)}; "
                                f"{alternative} (or raise memory_budget)")


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the user's call: the first frame outside lingp's source folders, however deep
    inside lingp (and whatever the Python version's frames for comprehensions) the warning arises."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
