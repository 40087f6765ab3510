"""Input checking shared by the solvers: one place that turns (A, B, M, x0) into checked operators and arrays."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from backends import Backend
from lingp_core import _validate as v
from lingp_core.operators import DenseOperator, LinearOperator, as_operator
from lingp_core.solvers.cholesky import check_symmetric

_TINY = float(np.finfo(np.float64).tiny)


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
    rhs = v.as_float_array(b, b_name, op.backend, ndim=(1, 2))
    if rhs.shape[0] != op.shape[0]:
        raise v.ShapeError(f"A has shape {op.shape} but {b_name} has shape {tuple(rhs.shape)}: "
                           f"{b_name} needs {op.shape[0]} rows")
    if np.dtype(rhs.dtype) != op.dtype:
        raise v.DTypeError(f"A has dtype {op.dtype} but {b_name} has dtype {rhs.dtype}; lingp does not cast silently, "
                           "convert one of them explicitly")
    single = rhs.ndim == 1
    return System(op, rhs[:, None] if single else rhs, single, op.backend)


def check_dense_symmetric(op: LinearOperator, name: str = "A") -> None:
    """ValueRangeError when a dense operator is not symmetric to rounding (the test :func:`safe_cholesky` makes);
    matrix-free operators cannot be checked without n products and are trusted."""
    if isinstance(op, DenseOperator):
        n = op.shape[0]
        check_symmetric(op.matrix, op.backend.xp, f"{name} ({n} × {n}, {op.dtype})", symbol=name)


def check_seed(seed: Any) -> int:
    """A seed for NumPy's generator: an integer ≥ 0."""
    return v.check_int(seed, "seed", minimum=0)


def column_norms(x: Any, backend: Backend) -> np.ndarray:
    """Euclidean norm of each column of an (n, k) array, accumulated in float64, as a host float64 array (k,)."""
    x64 = x.astype(np.float64, copy=False)
    with np.errstate(over="ignore"):  # overflowed columns are recomputed scaled
        plain = backend.to_numpy(backend.xp.sqrt((x64 * x64).sum(axis=0)))
    return rescued_norms(plain, x, backend)


def rescued_norms(norms: np.ndarray, x: Any, backend: Backend) -> np.ndarray:
    """``norms`` (host, (k,)), the plain sqrt(Σ x²) of the columns of x (n, k), with the columns whose squares
    overflowed or underflowed in float64 recomputed scaled by their largest entry.

    The plain sum is exact to rounding when it is finite and at least n·tiny (each underflowing square loses at most
    2⁻¹⁰⁷⁵); only columns outside that (entries beyond ~1e154, or all below ~1e-154) pay for a second pass, so
    ordinary columns keep their value bit for bit.
    """
    bad = ~(np.isfinite(norms) & (norms >= np.sqrt(x.shape[0] * _TINY)))
    if not bad.any():
        return norms
    xp = backend.xp
    idx = np.flatnonzero(bad)
    cols = x[:, xp.asarray(idx)].astype(np.float64)
    top = backend.to_numpy(xp.abs(cols).max(axis=0))
    out = norms.copy()
    out[idx[top == 0]] = 0.0
    good = np.isfinite(top) & (top > 0)  # NaN or Inf entries keep their NaN or Inf norm
    if good.any():
        scaled = cols[:, xp.asarray(np.flatnonzero(good))] / backend.asarray(top[good])
        with np.errstate(over="ignore"):  # a norm beyond float64's range is Inf, honestly
            out[idx[good]] = top[good] * np.sqrt(backend.to_numpy((scaled * scaled).sum(axis=0)))
    return out


def seeded_normal(shape: tuple[int, ...], seed: int | Sequence[int], dtype: Any, backend: Backend) -> Any:
    """Standard normal draws made on the host from ``seed`` (an int, or ints for a family of streams): the same
    numbers on every backend."""
    return backend.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def seeded_rademacher(shape: tuple[int, ...], seed: int, dtype: Any, backend: Backend) -> Any:
    """±1 draws made on the host from ``seed``: the same probes on every backend."""
    signs = np.random.default_rng(seed).integers(0, 2, size=shape, dtype=np.int8) * 2 - 1
    return backend.asarray(signs.astype(dtype))
