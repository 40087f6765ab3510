"""Array backends for lingp: a registry of NumPy (host) and CuPy (CUDA device) backends.

Pick one by name with :func:`get_backend` (``"numpy"``, ``"cupy"`` or ``"auto"``), or let :func:`infer` find the
one backend that a set of arrays lives on. Importing this package imports neither cupy nor torch.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Any, NamedTuple

from backends._base import Backend, MemoryInfo, is_cupy_array, is_torch_tensor

__all__ = ["BACKEND_NAMES", "Backend", "BackendStatus", "MemoryInfo", "available_backends", "backend_name_of",
           "get_backend", "infer"]

BACKEND_NAMES = ("numpy", "cupy")


class BackendStatus(NamedTuple):
    """Whether a backend can be used here, and why not when it cannot."""

    name: str
    usable: bool
    reason: str


@functools.cache
def _numpy_backend() -> Backend:
    from backends._numpy import NumpyBackend

    return NumpyBackend()


@functools.cache
def _cupy_status() -> tuple[Backend | None, str]:
    """Make the CuPy backend once, or say in one line why it cannot be made."""
    if importlib.util.find_spec("cupy") is None:
        return None, "cupy is not installed (pip install 'lingp[cuda12]' or 'lingp[cuda13]' on a CUDA machine)"
    try:
        import cupy
    except Exception as exc:  # a broken install raises all kinds of errors
        return None, f"cupy is installed but fails to import: {type(exc).__name__}: {_first_line(exc)}"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, "cupy is installed but no CUDA device is visible"
        from backends._cupy import CupyBackend

        backend = CupyBackend()
        float(cupy.arange(4.0).sum())  # a real allocation, kernel launch and copy back
    except Exception as exc:
        return None, f"cupy is installed but no CUDA device is usable: {type(exc).__name__}: {_first_line(exc)}"
    return backend, "usable"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def available_backends() -> list[BackendStatus]:
    """Each known backend with whether it is usable here and, when it is not, the reason.

    Returns
    -------
    list of BackendStatus
        One (name, usable, reason) entry per backend, NumPy first.
    """
    statuses = [BackendStatus("numpy", True, "usable")]
    cupy_backend, reason = _cupy_status()
    statuses.append(BackendStatus("cupy", cupy_backend is not None, reason))
    return statuses


def get_backend(spec: Any = "auto") -> Backend:
    """The backend named by ``spec``, or the backend of an array or torch tensor.

    Parameters
    ----------
    spec : {"numpy", "cupy", "auto"}, Backend, array or torch.Tensor
        ``"auto"`` is CuPy when a CUDA device is usable, else NumPy. An array or tensor gives the backend it lives on.

    Raises
    ------
    lingp_core.InvalidOptionError
        For an unknown name (the message lists the valid ones); a ValueError.
    lingp_core.MissingDependencyError
        When the named backend cannot be used here (the message says why); an ImportError.
    """
    if isinstance(spec, Backend):
        return spec
    if not isinstance(spec, str):
        return infer(spec)
    name = spec.lower()
    if name == "numpy":
        return _numpy_backend()
    if name == "cupy":
        backend, reason = _cupy_status()
        if backend is None:
            from lingp_core._validate import MissingDependencyError  # here: lingp_core imports backends

            raise MissingDependencyError(f"backend 'cupy' is not usable: {reason}")
        return backend
    if name == "auto":
        backend, _reason = _cupy_status()
        return backend if backend is not None else _numpy_backend()
    from lingp_core._validate import InvalidOptionError

    raise InvalidOptionError(f"unknown backend {spec!r}; valid names are "
                             f"{', '.join(map(repr, BACKEND_NAMES + ('auto',)))}")


def backend_name_of(x: Any) -> str | None:
    """'numpy', 'cupy' or None (not an array: Python scalars, None, lists)."""
    if is_cupy_array(x):
        return "cupy"
    if is_torch_tensor(x):
        device = x.device.type
        if device == "cpu":
            return "numpy"
        if device == "cuda":
            return "cupy"
        from lingp_core._validate import BackendMismatchError

        raise BackendMismatchError(f"torch tensor on device {x.device} has no lingp backend; move it to 'cpu' or "
                                   "'cuda'")
    module = type(x).__module__
    if module == "numpy" or module.startswith("numpy."):
        return "numpy"
    return None


def infer(*arrays: Any) -> Backend:
    """The one backend that all array arguments live on.

    NumPy arrays (and CPU torch tensors) give NumPy, CuPy arrays (and CUDA torch tensors) give CuPy; arguments that
    are not arrays (None, Python numbers, lists) are ignored; with no arrays at all the answer is NumPy.

    Raises
    ------
    lingp_core.BackendMismatchError
        When host and device arrays are mixed (a TypeError); the message names the type of each argument.
    """
    names = [backend_name_of(a) for a in arrays]
    found = {n for n in names if n is not None}
    if len(found) > 1:
        described = ", ".join(f"argument {i}: {type(a).__module__}.{type(a).__qualname__} ({n})"
                              for i, (a, n) in enumerate(zip(arrays, names)) if n is not None)
        from lingp_core._validate import BackendMismatchError

        raise BackendMismatchError(f"arrays from different backends cannot be mixed ({described}); move them to one "
                                   "backend, e.g. with get_backend('numpy').asarray(x) or "
                                   "get_backend('cupy').asarray(x)")
    return get_backend(found.pop()) if found else _numpy_backend()
