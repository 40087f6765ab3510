"""A small linear-operator protocol shared by kernels, Fisher products, preconditioners and solvers.

An operator has ``shape`` (m, n), ``dtype``, ``backend`` and ``matmat(X)`` for X of shape (n, k). Optional:
``diagonal()`` and ``columns(indices)``. Anything with shape, dtype and matmat can be passed to the solvers;
dense arrays are wrapped by :func:`as_operator`.

``matmat`` is the checked public product; ``_matmat`` is the unchecked one that subclasses implement and that the
solvers call in their loops, after checking their own inputs once.
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np

import backends
from backends import Backend
from lingp_core import _validate as v
from lingp_core._precision import float_dtype


def check_operand(x: Any, name: str, rows: int, dtype: Any, backend: Any, operator: str) -> Any:
    """x as an (rows,) or (rows, k) array of ``dtype`` on ``backend``, finite, for the product of ``operator`` (its
    description in the errors); a LingpError otherwise."""
    arr = v.as_float_array(x, name, backend, ndim=(1, 2), dtypes=(dtype,), finite=False)
    if arr.shape[0] != rows:
        raise v.ShapeError(f"{name} has shape {tuple(arr.shape)} but {operator} needs {rows} rows")
    v.check_finite(arr, name, backend)
    return arr


def check_diagonal(d: Any, op: LinearOperator, name: str | None = None) -> Any:
    """What an operator's ``diagonal()`` returned, as an (n,) finite array of the operator's dtype and backend
    (n = min(m, n)); a LingpError naming ``name``.diagonal() otherwise (default: the operator's own name, or "A").

    Operators from outside lingp may return anything: a wrong shape would surface as a broadcasting error, Inf as
    a zero Jacobi weight, NaN as "not positive definite", another dtype as a cast of every preconditioned product.
    """
    what = f"{name or getattr(op, 'name', 'A')}.diagonal()"
    return v.as_float_array(d, what, op.backend, shape=(min(op.shape),), dtypes=(op.dtype,))


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
        """A X for X of shape (n, k) (or (n,), giving (m,)), of the operator's dtype and backend.

        Raises
        ------
        ShapeError, DTypeError, BackendMismatchError, NonFiniteError
            When X does not have n rows and 1 or 2 dimensions, another dtype or backend, or NaN/Inf entries.
        """
        x = self._check_operand(x, "x")
        if x.ndim == 1:
            return self._matmat(x[:, None])[:, 0]
        return self._matmat(x)

    def __matmul__(self, x: Any) -> Any:
        return self.matmat(x)

    def _check_operand(self, x: Any, name: str) -> Any:
        """x as an (n,) or (n, k) array of this operator's dtype and backend, finite; a LingpError otherwise."""
        return check_operand(x, name, self.shape[1], self.dtype, self.backend, repr(self))

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
    """A dense (m, n) array as an operator.

    Parameters
    ----------
    matrix : array (m, n)
        float32 or float64, finite, on ``backend`` (lists are read as float64).
    backend : Backend or str
        The backend, or its name ("numpy", "cupy").
    """

    def __init__(self, matrix: Any, backend: Backend | str):
        backend = _as_backend(backend, "backend")
        self._set(v.as_float_array(matrix, "matrix", backend, ndim=2), backend)

    @classmethod
    def _checked(cls, matrix: Any, backend: Backend) -> DenseOperator:
        """An operator around an array the caller has already checked (no second pass over its entries)."""
        op = cls.__new__(cls)
        op._set(matrix, backend)
        return op

    def _set(self, matrix: Any, backend: Backend) -> None:
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
    """base + diag(d) for a square operator ``base`` and d a positive scalar or an (n,) array (e.g. K + σ²I).

    Parameters
    ----------
    base : LinearOperator (n, n)
        Wrap arrays and duck-typed operators with :func:`as_operator` first.
    diag : float, or array of shape () or (n,)
        Finite and > 0; an array must have base's dtype and backend (a Python number is used in base's dtype).
    """

    def __init__(self, base: LinearOperator, diag: Any):
        if not isinstance(base, LinearOperator):
            raise v.ArgumentTypeError(f"base must be a LinearOperator, got {v.describe(base)}; wrap arrays and "
                                      "duck-typed operators with as_operator(base) first")
        if base.shape[0] != base.shape[1]:
            raise v.ShapeError(f"base must be square to add a diagonal, got {base!r}")
        self.base = base
        self.shape, self.dtype, self.backend = base.shape, base.dtype, base.backend
        self.diag = _positive_diagonal(diag, "diag", base.shape[0], base.dtype, base.backend)
        self._column = self.diag[:, None] if getattr(self.diag, "ndim", 0) == 1 else self.diag

    def _matmat(self, x: Any) -> Any:
        return self.base._matmat(x) + self._column * x

    def diagonal(self) -> Any:
        return self.base.diagonal() + self.diag

    def columns(self, indices: Any) -> Any:
        cols = self.base.columns(indices)
        idx = np.asarray(indices, dtype=np.int64)
        xp = self.backend.xp
        d = self.diag[xp.asarray(idx)] if getattr(self.diag, "ndim", 0) == 1 else self.diag
        cols[xp.asarray(idx), xp.arange(idx.size)] += d
        return cols


class LowRankPlusDiagonal(LinearOperator):
    """U diag(s) Uᵀ + diag(d): U (n, r), s (r,) ≥ 0, d (n,) > 0; solves by Woodbury, log-det by the lemma.

    The small r × r core is factored once, in float64.

    Parameters
    ----------
    factor : array (n, r)
        U, float32 or float64, finite.
    values : array (r,)
        s, finite and ≥ 0, U's dtype.
    diag : float, or array of shape () or (n,)
        d, finite and > 0, U's dtype (a Python number is used in U's dtype).
    backend : Backend or str
        Where the arrays live.
    """

    def __init__(self, factor: Any, values: Any, diag: Any, backend: Backend | str):
        backend = _as_backend(backend, "backend")
        xp = backend.xp
        factor = v.as_float_array(factor, "factor", backend, ndim=2)
        n, r = factor.shape
        dtype = np.dtype(factor.dtype)
        values = v.as_float_array(values, "values", backend, shape=(r,), dtypes=(dtype,))
        _check_lower_bound(values, "values", backend, allow_zero=True)
        diag = _positive_diagonal(diag, "diag", n, dtype, backend)
        if getattr(diag, "ndim", 0) == 0:
            diag = xp.full(n, diag, dtype=dtype)
        self.factor, self.values, self.diag = factor, values, diag
        self.shape = (n, n)
        self.dtype = dtype
        self.backend = backend
        # Woodbury: (D + U S Uᵀ)⁻¹ = D⁻¹ − D⁻¹ U C⁻¹ Uᵀ D⁻¹ with C = S⁻¹ + Uᵀ D⁻¹ U; written with W = U S^½ so that
        # zero values need no inverse: C' = I + Wᵀ D⁻¹ W.
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported by _factor_core
            w = factor.astype(np.float64) * xp.sqrt(values.astype(np.float64))[None, :]  # ≥ 0: checked at construction
            d64 = diag.astype(np.float64)
            core = xp.eye(w.shape[1]) + w.T @ (w / d64[:, None])
        self._w, self._d64 = w, d64
        self._core_factor = _factor_core(core, backend)

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
        return self._solve(x)

    def _solve(self, x: Any) -> Any:
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
        (float32 or float64; default: this operator's) so it can precondition a system of another precision."""
        if dtype is None:
            return _SolveOperator(self, self.dtype)
        return _SolveOperator(self, float_dtype(dtype, "dtype"))


class _SolveOperator(LinearOperator):
    def __init__(self, target: LowRankPlusDiagonal, dtype: np.dtype):
        self.target = target
        self.shape, self.dtype, self.backend = target.shape, dtype, target.backend

    def _matmat(self, x: Any) -> Any:
        return self.target._solve(x)


def _factor_core(core: Any, backend: Backend) -> Any:
    """Cholesky factor of the r × r Woodbury core I + Wᵀ D⁻¹ W (SPD for valid inputs, unless it overflowed)."""
    if not bool(backend.xp.isfinite(core).all()):
        raise v.ValueRangeError(f"the Woodbury core I + Wᵀ D⁻¹ W ({core.shape[0]} × {core.shape[0]}) overflows "
                                "float64: factor² · values / diag is too large; rescale the operator")
    try:
        return backend.cholesky(core)
    except np.linalg.LinAlgError:
        raise v.NotPositiveDefiniteError(f"the Woodbury core I + Wᵀ D⁻¹ W ({core.shape[0]} × {core.shape[0]}) is "
                                         "not numerically positive definite") from None


def _as_backend(backend: Any, name: str) -> Backend:
    """A Backend from a Backend or a backend name; ArgumentTypeError for anything else."""
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str):
        return backends.get_backend(backend)  # InvalidOptionError for an unknown name
    raise v.ArgumentTypeError(f"{name} must be a Backend or a backend name ('numpy', 'cupy'), got "
                              f"{type(backend).__name__} {backend!r}"[:300])


def _check_lower_bound(arr: Any, name: str, backend: Backend, *, allow_zero: bool) -> None:
    """ValueRangeError naming the worst entry unless every entry is > 0 (≥ 0 with ``allow_zero``)."""
    ok = arr >= 0 if allow_zero else arr > 0
    if not bool(ok.all()):
        flat = arr.reshape(-1)
        worst = int(backend.xp.argmin(flat))
        where = f" at index {worst}" if arr.ndim else ""
        raise v.ValueRangeError(f"{name} (shape {tuple(arr.shape)}, {arr.dtype}) must be {'≥' if allow_zero else '>'}"
                                f" 0, but holds {float(flat[worst]):.3g}{where}")


def _positive_diagonal(diag: Any, name: str, n: int, dtype: np.dtype, backend: Backend) -> Any:
    """A checked diagonal: a Python number stays a float (so products keep the operator's dtype), an array must be
    of shape () or (n,), the operator's dtype and backend; every entry finite and > 0 in that dtype."""
    if isinstance(diag, numbers.Real) and not isinstance(diag, (np.generic, bool)):
        value = v.check_positive(diag, name)
        with np.errstate(over="ignore", under="ignore"):
            in_dtype = dtype.type(value)
        if not (np.isfinite(in_dtype) and in_dtype > 0):
            raise v.ValueRangeError(f"{name} = {value!r} is not a finite positive {dtype} (it becomes {in_dtype})")
        return value
    arr = v.as_float_array(diag, name, backend, ndim=(0, 1), dtypes=(dtype,))
    if arr.ndim == 1 and arr.shape[0] != n:
        raise v.ShapeError(f"{name} has shape {tuple(arr.shape)}; expected () or ({n},) for an operator of size {n}")
    _check_lower_bound(arr, name, backend, allow_zero=False)
    return arr


def as_operator(a: Any, name: str = "A", *, backend: Backend | str | None = None,
                square: bool = True) -> LinearOperator:
    """Check ``a`` (a dense array or an object with shape, dtype and matmat) and return it as a LinearOperator.

    Dense arrays are checked for dimension, dtype and NaN/Inf; operators for their shape, dtype and backend.
    Duck-typed operators (not LinearOperator subclasses) are wrapped; the wrapper checks the shape and dtype of each
    product they return. ``backend`` (a Backend or its name) is where the other inputs live.
    """
    if backend is not None:
        backend = _as_backend(backend, "backend")
    if hasattr(a, "matmat") and hasattr(a, "shape") and hasattr(a, "dtype") and not hasattr(a, "ndim"):
        op = _checked_operator(a, name, backend)
    else:
        be = v.backend_of(a, backend=backend.name if backend is not None else None)
        op = DenseOperator._checked(v.as_float_array(a, name, be, ndim=2), be)
    if square and op.shape[0] != op.shape[1]:
        raise v.ShapeError(f"{name} must be square, got shape {op.shape}")
    return op


def _checked_operator(a: Any, name: str, backend: Backend | None) -> LinearOperator:
    """An operator object checked for a 2-D integer shape, a float dtype and its backend; duck types wrapped."""
    shape = tuple(a.shape)
    if len(shape) != 2 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and int(s) >= 0
                                  for s in shape):
        raise v.ShapeError(f"{name} must have a 2-D shape of non-negative integers, got {shape}")
    try:
        dtype = np.dtype(a.dtype)
    except TypeError:
        raise v.DTypeError(f"{name} has dtype {a.dtype!r}; expected float32 or float64") from None
    if dtype not in (np.float32, np.float64):
        raise v.DTypeError(f"{name} has dtype {a.dtype}; expected float32 or float64")
    op_backend = getattr(a, "backend", None)
    if op_backend is not None:
        op_backend = _as_backend(op_backend, f"{name}.backend")
    if backend is not None and op_backend is not None and op_backend != backend:
        raise v.BackendMismatchError(f"{name} computes on backend {op_backend.name!r} but the other inputs are on "
                                     f"{backend.name!r}")
    if isinstance(a, LinearOperator):
        return a
    # a user's duck-typed operator: give it the backend of the other inputs when it names none
    return _Wrapped(a, op_backend or backend or v.backend_of(), name)


class _Wrapped(LinearOperator):
    """A duck-typed operator (shape, dtype, matmat) behind the protocol; its products are checked, since a wrong
    shape or dtype from foreign code would otherwise surface as a broadcasting error or a silent cast."""

    def __init__(self, inner: Any, backend: Backend, name: str = "A"):
        self.inner, self.name = inner, name
        self.shape = (int(inner.shape[0]), int(inner.shape[1]))
        self.dtype, self.backend = np.dtype(inner.dtype), backend

    def _matmat(self, x: Any) -> Any:
        out = self.inner.matmat(x)
        expected = (self.shape[0],) + tuple(x.shape[1:])
        if tuple(getattr(out, "shape", ())) != expected:
            raise v.ShapeError(f"{self.name}.matmat returned {v.describe(out)} for an operand of shape "
                               f"{tuple(x.shape)}; an operator of shape {self.shape} must return shape {expected}")
        if np.dtype(out.dtype) != self.dtype:
            raise v.DTypeError(f"{self.name}.matmat returned dtype {out.dtype} but the operator declares dtype "
                               f"{self.dtype}; its products must keep that dtype (lingp does not cast silently)")
        return out

    def diagonal(self) -> Any:
        if hasattr(self.inner, "diagonal"):
            return check_diagonal(self.inner.diagonal(), self)
        return super().diagonal()

    def columns(self, indices: Any) -> Any:
        if hasattr(self.inner, "columns"):  # the user's own column access (a pivoted Cholesky's, say) stays in use
            return self.inner.columns(indices)
        return super().columns(indices)
