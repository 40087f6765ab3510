"""Input checking shared by the solvers: one place that turns (A, B, M, x0) into checked operators and arrays."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from backends import Backend
from lingp_core import _validate as v
from lingp_core.operators import LinearOperator, as_operator


class System(NamedTuple):
    op: LinearOperator
    rhs: Any  # (n, k)
    single: bool  # the caller passed a vector: results go back as vectors
    backend: Backend


def linear_system(a: Any, b: Any, *, b_name: str = "B") -> System:
    """Check A (n × n operator or array) and B ((n,) or (n, k)) together: one backend, one dtype, matching n."""
    if hasattr(a, "matmat") and not hasattr(a, "ndim"):  # an operator brings its backend (or takes B's)
        backend = getattr(a, "backend", None) or v.backend_of(b)
    else:
        backend = v.backend_of(a, b)
    op = as_operator(a, "A", backend=backend)
    rhs = v.as_float_array(b, b_name, backend, ndim=(1, 2))
    if rhs.shape[0] != op.shape[0]:
        raise v.ShapeError(f"A has shape {op.shape} but {b_name} has shape {tuple(rhs.shape)}: "
                           f"{b_name} needs {op.shape[0]} rows")
    if np.dtype(rhs.dtype) != op.dtype:
        raise v.DTypeError(f"A has dtype {op.dtype} but {b_name} has dtype {rhs.dtype}; lingp does not cast silently, "
                           "convert one of them explicitly")
    single = rhs.ndim == 1
    return System(op, rhs[:, None] if single else rhs, single, backend)


def column_norms(x: Any, backend: Backend) -> Any:
    """Euclidean norm of each column of an (n, k) array, accumulated in float64 (still on the backend)."""
    x64 = x.astype(np.float64, copy=False)
    return backend.xp.sqrt((x64 * x64).sum(axis=0))


def seeded_normal(shape: tuple[int, ...], seed: int | Sequence[int], dtype: Any, backend: Backend) -> Any:
    """Standard normal draws made on the host from ``seed`` (an int, or ints for a family of streams): the same
    numbers on every backend."""
    return backend.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def seeded_rademacher(shape: tuple[int, ...], seed: int, dtype: Any, backend: Backend) -> Any:
    """±1 draws made on the host from ``seed``: the same probes on every backend."""
    signs = np.random.default_rng(seed).integers(0, 2, size=shape, dtype=np.int8) * 2 - 1
    return backend.asarray(signs.astype(dtype))
