"""A small linear-operator protocol shared by kernels, Fisher products, preconditioners and solvers.

An operator has ``shape`` (m, n), ``dtype``, ``backend`` and ``matmat(X)`` for X of shape (n, k). Optional:
``diagonal()`` and ``columns(indices)``. Anything with shape, dtype and matmat can be passed to the solvers;
dense arrays are wrapped by :func:`as_operator`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from backends import Backend
from lingp_core import _validate as v


class LinearOperator:
    """Base class: subclasses set ``shape``, ``dtype``, ``backend`` and implement ``_matmat``.

    Attributes
    ----------
    shape : tuple of int
        (m, n).
    dtype : numpy.dtype
        float32 or float64; products come back in this dtype.
    backend : Backend
        Where the operator's arrays live; products take and return arrays of this backend.
    """

    shape: tuple[int, int]
    dtype: np.dtype
    backend: Backend

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, backend={self.backend.name!r})"

    def matmat(self, x: Any) -> Any:
        """A X for X of shape (n, k) (or (n,), giving (m,))."""
        if x.ndim == 1:
            return self._matmat(x[:, None])[:, 0]
        return self._matmat(x)

    def __matmul__(self, x: Any) -> Any:
        return self.matmat(x)

    def _matmat(self, x: Any) -> Any:
        raise v.MissingCapabilityError(f"{type(self).__name__} does not implement _matmat: a LinearOperator "
                                       "subclass must define its product")

    def diagonal(self) -> Any:
        """The diagonal (min(m, n),); operators that cannot give it cheaply raise ArgumentTypeError (which is also a
        NotImplementedError)."""
        raise v.MissingCapabilityError(f"{type(self).__name__} {self.shape} has no cheap diagonal, which this use "
                                       "needs (e.g. a Jacobi or pivoted-Cholesky preconditioner): pass a dense array "
                                       "or an operator that implements diagonal()")

    def columns(self, indices: Any) -> Any:
        """Columns A[:, indices] as an (m, len(indices)) array; by default one product with unit vectors."""
        xp = self.backend.xp
        idx = np.asarray(indices, dtype=np.int64)
        unit = np.zeros((self.shape[1], idx.size), dtype=self.dtype)
        unit[idx, np.arange(idx.size)] = 1.0
        return self._matmat(xp.asarray(unit))

    def to_dense(self, memory_budget: Any = None) -> Any:
        """The (m, n) matrix, after checking it fits the memory budget (default: half the free memory)."""
        budget = v.resolve_memory_budget(memory_budget, self.backend)
        v.check_memory(v.nbytes_of(self.shape, self.dtype), budget, what=f"to_dense of {self!r}",
                       alternative="keep using matrix-free products")
        return self.columns(np.arange(self.shape[1]))


class DenseOperator(LinearOperator):
    """A dense (m, n) array as an operator."""

    def __init__(self, matrix: Any, backend: Backend):
        self.matrix = matrix
        self.shape = tuple(matrix.shape)
        self.dtype = np.dtype(matrix.dtype)
        self.backend = backend

    def _matmat(self, x: Any) -> Any:
        return self.matrix @ x

    def diagonal(self) -> Any:
        return self.backend.xp.diagonal(self.matrix).copy()

    def columns(self, indices: Any) -> Any:
        return self.matrix[:, self.backend.xp.asarray(np.asarray(indices, dtype=np.int64))]

    def to_dense(self, memory_budget: Any = None) -> Any:
        return self.matrix


class AddedDiagonalOperator(LinearOperator):
    """base + diag(d) for a square operator ``base`` and d a positive scalar or an (n,) array (e.g. K + σ²I)."""

    def __init__(self, base: LinearOperator, diag: Any):
        self.base, self.diag = base, diag
        self.shape, self.dtype, self.backend = base.shape, base.dtype, base.backend

    def _diag_column(self) -> Any:
        return self.diag[:, None] if hasattr(self.diag, "ndim") and self.diag.ndim == 1 else self.diag

    def _matmat(self, x: Any) -> Any:
        return self.base.matmat(x) + self._diag_column() * x

    def diagonal(self) -> Any:
        return self.base.diagonal() + self.diag

    def columns(self, indices: Any) -> Any:
        cols = self.base.columns(indices)
        idx = np.asarray(indices, dtype=np.int64)
        xp = self.backend.xp
        d = self.diag[xp.asarray(idx)] if hasattr(self.diag, "ndim") and self.diag.ndim == 1 else self.diag
        cols[xp.asarray(idx), xp.arange(idx.size)] += d
        return cols


class LowRankPlusDiagonal(LinearOperator):
    """U diag(s) Uᵀ + diag(d): U (n, r), s (r,) ≥ 0, d (n,) > 0; solves by Woodbury, log-det by the lemma.

    The small r × r core is factored once, in float64.
    """

    def __init__(self, factor: Any, values: Any, diag: Any, backend: Backend):
        xp = backend.xp
        self.factor, self.values, self.diag = factor, values, diag
        self.shape = (factor.shape[0], factor.shape[0])
        self.dtype = np.dtype(factor.dtype)
        self.backend = backend
        # Woodbury: (D + U S Uᵀ)⁻¹ = D⁻¹ − D⁻¹ U C⁻¹ Uᵀ D⁻¹ with C = S⁻¹ + Uᵀ D⁻¹ U; written with W = U S^½ so that
        # zero values need no inverse: C' = I + Wᵀ D⁻¹ W.
        w = factor.astype(np.float64) * xp.sqrt(xp.maximum(values.astype(np.float64), 0))[None, :]
        d64 = diag.astype(np.float64)
        core = xp.eye(w.shape[1]) + w.T @ (w / d64[:, None])
        self._w, self._d64 = w, d64
        self._core_factor = backend.cholesky(core)

    def _matmat(self, x: Any) -> Any:
        return self.factor @ (self.values[:, None] * (self.factor.T @ x)) + self.diag[:, None] * x

    def diagonal(self) -> Any:
        return (self.factor**2) @ self.values + self.diag

    def solve(self, x: Any) -> Any:
        """(U S Uᵀ + D)⁻¹ X for X of shape (n, k) or (n,), computed in float64, returned in X's dtype."""
        x = v.as_float_array(x, "x", self.backend, ndim=(1, 2))
        if x.shape[0] != self.shape[0]:
            raise v.ShapeError(f"x has shape {tuple(x.shape)} but the operator is {self.shape}: x needs "
                               f"{self.shape[0]} rows")
        column = x.ndim == 1
        x64 = (x[:, None] if column else x).astype(np.float64)
        dx = x64 / self._d64[:, None]
        correction = self._w @ self.backend.cho_solve(self._core_factor, self._w.T @ dx)
        out = (dx - correction / self._d64[:, None]).astype(x.dtype)
        return out[:, 0] if column else out

    def logdet(self) -> float:
        """log det(U S Uᵀ + D) = log det D + log det(I + Wᵀ D⁻¹ W), in float64."""
        xp = self.backend.xp
        return float(xp.log(self._d64).sum() + 2.0 * xp.log(xp.diagonal(self._core_factor)).sum())

    def inverse(self, dtype: Any = None) -> LinearOperator:
        """An operator whose product is :meth:`solve` (the form preconditioners take), declared with ``dtype``
        (default: this operator's) so it can precondition a system of another precision."""
        return _SolveOperator(self, np.dtype(dtype or self.dtype))


class _SolveOperator(LinearOperator):
    def __init__(self, target: LowRankPlusDiagonal, dtype: np.dtype):
        self.target = target
        self.shape, self.dtype, self.backend = target.shape, dtype, target.backend

    def _matmat(self, x: Any) -> Any:
        return self.target.solve(x)


def as_operator(a: Any, name: str = "A", *, backend: Backend | None = None, square: bool = True) -> LinearOperator:
    """Check ``a`` (a dense array or an object with shape, dtype and matmat) and return it as an operator.

    Dense arrays are checked for dimension, dtype and NaN/Inf; operators for their shape and dtype.
    """
    if hasattr(a, "matmat") and hasattr(a, "shape") and hasattr(a, "dtype") and not hasattr(a, "ndim"):
        shape = tuple(a.shape)
        if len(shape) != 2:
            raise v.ShapeError(f"{name} must have a 2-D shape, got {shape}")
        if np.dtype(a.dtype) not in (np.float32, np.float64):
            raise v.DTypeError(f"{name} has dtype {a.dtype}; expected float32 or float64")
        op_backend = getattr(a, "backend", None)
        if backend is not None and op_backend is not None and op_backend != backend:
            raise v.BackendMismatchError(f"{name} computes on backend {op_backend.name!r} but the other inputs are on "
                                         f"{backend.name!r}")
        if op_backend is None:  # a user's duck-typed operator: give it the backend of the other inputs
            a = _Wrapped(a, backend or v.backend_of())
        op = a
    else:
        be = v.backend_of(a, backend=backend.name if backend is not None else None)
        op = DenseOperator(v.as_float_array(a, name, be, ndim=2), be)
    if square and op.shape[0] != op.shape[1]:
        raise v.ShapeError(f"{name} must be square, got shape {op.shape}")
    return op


class _Wrapped(LinearOperator):
    def __init__(self, inner: Any, backend: Backend):
        self.inner = inner
        self.shape, self.dtype, self.backend = tuple(inner.shape), np.dtype(inner.dtype), backend

    def _matmat(self, x: Any) -> Any:
        return self.inner.matmat(x)

    def diagonal(self) -> Any:
        if hasattr(self.inner, "diagonal"):
            return self.inner.diagonal()
        return super().diagonal()
