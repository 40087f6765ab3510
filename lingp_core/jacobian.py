"""Jacobian blocks: the Jacobian J (n·c × p) of a network, held per parameter block, and its products.

Rows are example-major: row ``i*c + k`` is example i, output k. Columns follow the object's parameter order (the
model's ``named_parameters`` order), each parameter flattened row-major as torch does (weight index ``o*in + j``).

Two kinds of block, each owning its storage, row selection, archive arrays and products (a new kind is one class):

- :class:`DenseBlock` holds its columns of J as an (n·c, p_b) array (on the backend, or an ``np.memmap`` on disk).
- :class:`FactoredLinearBlock` holds a torch ``nn.Linear`` layer's weight and/or bias without forming its columns:
  layer inputs A (n, T, m) and output sensitivities Δ (n, c, T, out), where T counts the positions the layer was
  applied to per example (1 for a plain MLP; sequence length × number of calls for sequences or weight sharing).
  The weight columns of example i, output k are Σ_t δ_ikt ⊗ a_it, so every product is a GEMM on A and Δ.

Blocks and :class:`JacobianBlocks` built by hand are validated at construction (shapes, dtypes, backends, NaN/Inf);
blocks derived from validated ones (row views, casts, transformed rows) and those written by the export, which checks
every batch as it arrives, skip the rescan of their values.

This module is backend-agnostic (it works through ``backend.xp``) and never imports torch.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

import backends
from backends import Backend
from lingp_core._validate import (
    ArgumentTypeError,
    BackendMismatchError,
    DTypeError,
    InvalidOptionError,
    NonFiniteError,
    ShapeError,
    SignatureDTypeError,
    SignatureError,
    SignatureShapeError,
    ValueRangeError,
    as_float_array,
    check_memory,
    describe,
    nbytes_of,
    refuse_masked,
    resolve_memory_budget,
)

__all__ = ["DenseBlock", "FactoredLinearBlock", "JacobianBlocks", "JacobianShape"]

# Largest intermediate (in elements) a product builds at once; bigger problems run in chunks of examples/columns.
_WORK_ELEMENTS = 1 << 24
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def product_work(rows: int, cols: int, blocks: Sequence[Any]) -> int:
    """Elements of one chunk of the intermediates of a (rows × cols) block of J J'ᵀ: the products are chunked to
    at most _WORK_ELEMENTS, and never exceed the block times T² (weight-sharing positions) when it is smaller."""
    positions = max((getattr(b, "T", 1) for b in blocks), default=1)
    return min(_WORK_ELEMENTS, rows * cols * positions * positions)


def J_times_float64(J: Any, w: Any) -> Any:
    """J w computed in J's dtype (in-memory or sharded J), returned as float64 (n·c,) or (n·c, k)."""
    return J.matmat(w.astype(J.dtype, copy=False)).astype(np.float64, copy=False)


def _chunks(total: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` (≥ 1) covering range(total)."""
    size = max(1, int(size))
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def _numel(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


# ----- validation of hand-built blocks ------------------------------------------------------------------------------

def _xp_name(xp: Any) -> str:
    return str(getattr(xp, "__name__", type(xp).__name__)).split(".")[0]


def _check_xp(xp: Any) -> None:
    if not isinstance(getattr(xp, "ndarray", None), type):
        raise ArgumentTypeError(f"xp must be an array module (numpy or cupy), got {describe(xp)}")


def _check_array(x: Any, what: str, xp: Any, ndim: int) -> None:
    """``x`` must be an ``ndim``-dimensional float32/float64 array of ``xp`` (an ``np.memmap`` is a NumPy array)."""
    refuse_masked(x, what)
    if not isinstance(x, xp.ndarray):
        try:
            found = backends.backend_name_of(x)
        except TypeError:  # a torch tensor on a device without a backend
            found = None
        if found is not None and found != _xp_name(xp):
            raise BackendMismatchError(f"{what} is a {describe(x)} (backend {found!r}) but the block's array module "
                                       f"is {_xp_name(xp)}; every array of a Jacobian lives on one backend: move it "
                                       f"with get_backend({_xp_name(xp)!r}).asarray(...)")
        raise ArgumentTypeError(f"{what} must be a {_xp_name(xp)} array, got {describe(x)}")
    if x.ndim != ndim:
        raise ShapeError(f"{what} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if np.dtype(x.dtype) not in _FLOAT_DTYPES:
        raise DTypeError(f"{what} has dtype {x.dtype} (shape {tuple(x.shape)}); Jacobian blocks are float32 or "
                         "float64 and lingp does not cast silently: convert explicitly, e.g. .astype('float64')")


def _check_finite(x: Any, what: str, xp: Any, locate: Callable[[tuple[int, ...]], str]) -> None:
    """NonFiniteError naming ``what`` and the first bad entry (described by ``locate``) unless ``x`` is all finite.

    One sum decides (NaN and Inf propagate into it) at the cost of one read of ``x``; only a non-finite sum (NaN/Inf,
    or finite entries overflowing it) takes an elementwise pass, to tell the two apart and find the first bad entry.
    """
    if x.size == 0:
        return
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow or Inf − Inf in the sum is decided below
        total = x.sum()
    if bool(xp.isfinite(total)):
        return
    finite = xp.isfinite(x)
    if bool(finite.all()):
        return
    n_bad = int(finite.size - int(finite.sum()))
    n_nan = int(xp.isnan(x).sum())
    first = tuple(int(i) for i in np.unravel_index(int(xp.argmin(finite.ravel())), x.shape))
    raise NonFiniteError(f"{what} (shape {tuple(x.shape)}, dtype {x.dtype}) holds {n_nan} NaN and {n_bad - n_nan} Inf "
                         f"entries, the first at {locate(first)}; lingp never replaces them: fix the Jacobian (or the "
                         "network at that input) first")


def _count(value: Any, what: str, minimum: int) -> int:
    """An integer ≥ ``minimum``: ArgumentTypeError for other types, ValueRangeError below the minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    if int(value) < minimum:
        raise ValueRangeError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def _shape_list(shapes: Sequence[tuple[int, ...]]) -> str:
    return ", ".join(str(s) for s in shapes)


class _Block:
    """What every block kind shares: parameter names and shapes, rows (n examples × c outputs), the products'
    interface, row selection and the archive round trip. Subclasses set :attr:`kind` (the archive's name of the kind)
    and :attr:`array_names` (the arrays an archive stores), and implement the abstract methods."""

    kind = ""
    array_names: tuple[str, ...] = ()
    stores_dense = False  # to_dense() returns stored values (free) rather than building them
    _kinds: dict[str, type[_Block]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _Block._kinds[cls.kind] = cls

    @staticmethod
    def kind_class(kind: Any) -> type[_Block]:
        """The block class whose :attr:`kind` is ``kind`` (for archives)."""
        cls = _Block._kinds.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise InvalidOptionError(f"unknown Jacobian block kind {kind!r}; known kinds: "
                                     f"{', '.join(map(repr, sorted(_Block._kinds)))}")
        return cls

    @classmethod
    def _trusted(cls, *args: Any, **kwargs: Any) -> Any:
        """A block of arrays already checked for NaN/Inf (views, casts and transforms of a checked block, or the
        export's arrays, checked batch by batch): the structure is validated, the values are not read again."""
        block = cls.__new__(cls)
        block._setup(*args, **kwargs)
        return block

    def _setup(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def _set_params(self, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> None:
        """Check and set the parameter names and shapes (one shape per name, at least one parameter)."""
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise ArgumentTypeError(f"names must be a sequence of parameter names, got {describe(names)}")
        if isinstance(shapes, str) or not isinstance(shapes, Sequence):
            raise ArgumentTypeError(f"shapes must be a sequence of parameter shapes, got {describe(shapes)}")
        for name, shape in zip(names, shapes):
            if not isinstance(name, str):
                raise ArgumentTypeError(f"parameter names must be strings, got {describe(name)} in {list(names)!r}")
            if isinstance(shape, str) or not isinstance(shape, Sequence):
                raise ArgumentTypeError(f"the shape of parameter {name!r} must be a sequence of ints, got "
                                        f"{describe(shape)}")
        if len(names) != len(shapes) or not names:
            raise ShapeError(f"a block needs one shape per parameter name and at least one parameter; got names "
                             f"{list(names)} and {len(shapes)} shapes")
        self.names = tuple(names)
        self.shapes = tuple(tuple(_count(s, f"a dimension of the shape of {name}", 0) for s in shape)
                            for name, shape in zip(names, shapes))

    def _set_rows(self, n: int, c: int, xp: Any) -> None:
        """Set n examples × c outputs (c ≥ 1) and the array module."""
        if c < 1:
            raise ShapeError(f"{self._label()} has c = {c} outputs per example; a block needs at least one")
        self.n, self.c, self.xp = int(n), int(c), xp

    @property
    def p(self) -> int:
        """Number of parameters (columns of J) in this block."""
        return sum(_numel(s) for s in self.shapes)

    def _label(self) -> str:
        return f"the {self.kind} block of {', '.join(self.names)}"

    def _column_owner(self, column: int) -> str:
        """The parameter name of one column of the block."""
        start = 0
        for name, shape in zip(self.names, self.shapes):
            start += _numel(shape)
            if column < start:
                return name
        return self.names[-1]

    # ----- behaviour every kind defines ------------------------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        """The dtype of the block's arrays."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes held in memory."""
        raise NotImplementedError

    @property
    def stored_per_row(self) -> int:
        """Elements the block stores per row of J (what a copy of a tile of rows costs)."""
        raise NotImplementedError

    def select(self, examples: slice, output: int | None = None, dtype: Any = None) -> _Block:
        """The block's rows of the examples in ``examples`` (a slice with explicit bounds, step 1), of one output if
        given (then c = 1), in ``dtype`` if given; views of this block's arrays where possible."""
        raise NotImplementedError

    def to_arrays(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The block's arrays (named by :attr:`array_names`) and its JSON-ready description, for an archive."""
        raise NotImplementedError

    @classmethod
    def from_arrays(cls, entry: dict[str, Any], arrays: dict[str, Any], xp: Any) -> _Block:
        """The block described by ``entry`` with ``arrays`` from :meth:`to_arrays` (validated as if built by hand)."""
        raise NotImplementedError

    def matmat(self, v: Any) -> Any:
        """J_b V for V (p_b, k): (n·c, k)."""
        raise NotImplementedError

    def rmatmat(self, u: Any) -> Any:
        """J_bᵀ U for U (n·c, k): (p_b, k)."""
        raise NotImplementedError

    def to_dense(self) -> Any:
        """The block as an (n·c, p_b) array."""
        raise NotImplementedError

    def gram_diagonal(self) -> Any:
        """diag(J_b J_bᵀ): (n·c,)."""
        raise NotImplementedError

    def column_sq_norms(self) -> Any:
        """diag(J_bᵀ J_b): (p_b,)."""
        raise NotImplementedError

    def transform_rows(self, factors: Any) -> _Block:
        """The block with rows of example i replaced by L_iᵀ J_b,i; ``factors`` (n, c) (diagonal L_i) or (n, c, c)."""
        raise NotImplementedError

    def transformed_dense(self, factors: Any) -> Any:
        """Rows L_iᵀ J_b,i as a dense float64 (n·c, p_b) array, ``factors`` (n, c, c) (the dense GGN's operands)."""
        raise NotImplementedError

    def add_example_grams(self, rows: slice, out: Any) -> None:
        """Add the per-example blocks J_b,i J_b,iᵀ of the examples in ``rows`` to ``out`` (s, c, c), in float64."""
        raise NotImplementedError

    @property
    def kronecker_ready(self) -> bool:
        """Whether the dense GGN may take the Kronecker route for this block (see ``lingp_core._ggn``): the block
        then has A (n, 1, m), Δ (n, c, 1, out) and :meth:`parameter_segments`."""
        return False

    def _add_gram_same_kind(self, other: Any, out: Any) -> None:
        """Add J_b J'_bᵀ to ``out`` for ``other`` of this block's kind."""
        raise NotImplementedError

    # ----- shared -------------------------------------------------------------------------------------------------
    def add_gram(self, other: _Block, out: Any) -> None:
        """Add J_b J'_bᵀ to ``out`` of shape (n·c, n'·c') in place.

        Two blocks of one kind use their kind's own product; across kinds the block whose dense form is stored is
        multiplied through the other's (structured) ``matmat``.
        """
        if type(other) is type(self):
            self._add_gram_same_kind(other, out)
        elif self.stores_dense:
            out += other.matmat(self.to_dense().T).T
        else:
            out += self.matmat(other.to_dense().T)

    def gram(self, other: _Block) -> Any:
        """J_b J'_bᵀ: (n·c, n'·c')."""
        out = self.xp.zeros((self.n * self.c, other.n * other.c), dtype=self.dtype)
        self.add_gram(other, out)
        return out

    def _entry(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": list(self.names), "shapes": [list(s) for s in self.shapes], "c": self.c}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.names)}; p={self.p})"


class DenseBlock(_Block):
    """Columns of J for some parameters, stored densely.

    Parameters
    ----------
    names, shapes : sequence
        Parameter names and shapes, in column order.
    values : array of shape (n·c, p_b)
        The block, rows example-major. A NumPy/CuPy array or an ``np.memmap`` (disk-backed, CPU only); float32 or
        float64, finite (checked by one sum over the values: a disk-backed block is read once).
    c : int
        Number of outputs per example.
    xp : module
        The array module of ``values``.

    Raises
    ------
    ShapeError, DTypeError, BackendMismatchError, NonFiniteError
        Rows not a multiple of c, columns other than the parameters' sizes; not a float array; an array of
        another backend; NaN/Inf (naming the row, example, output and parameter).
    """

    kind = "dense"
    array_names = ("values",)
    stores_dense = True

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], values: Any, c: int, xp: Any) -> None:
        self._setup(names, shapes, values, c, xp)
        _check_finite(values, f"values of {self._label()}", xp, self._locate)

    def _setup(self, names: Sequence[str], shapes: Sequence[Sequence[int]], values: Any, c: int, xp: Any) -> None:
        self._set_params(names, shapes)
        _check_xp(xp)
        _check_array(values, f"values of {self._label()}", xp, 2)
        c = _count(c, "c (outputs per example)", 1)
        rows, cols = values.shape
        if rows % c:
            raise ShapeError(f"values of {self._label()} has {rows} rows, not a multiple of c = {c} outputs (rows are "
                             "n·c, example-major)")
        if cols != self.p:
            raise ShapeError(f"values of {self._label()} has shape {tuple(values.shape)} but its parameters' shapes "
                             f"{_shape_list(self.shapes)} make {self.p} columns")
        self._set_rows(rows // c, c, xp)
        self.values = values

    def _locate(self, index: tuple[int, ...]) -> str:
        row, col = index
        return (f"row {row} (example {row // self.c}, output {row % self.c}), column {col} (parameter "
                f"{self._column_owner(col)})")

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (0 for a disk-backed block)."""
        return 0 if isinstance(self.values, np.memmap) else int(self.values.nbytes)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the block's arrays."""
        return np.dtype(self.values.dtype)

    @property
    def stored_per_row(self) -> int:
        """Elements stored per row of J: p_b."""
        return self.p

    def select(self, examples: slice, output: int | None = None, dtype: Any = None) -> DenseBlock:
        """Rows of some examples (and one output) as a block of views; a ``dtype`` converts (a copy if it differs)."""
        c = self.c
        values = self.values[examples.start * c: examples.stop * c]
        if output is not None:
            values = values.reshape(-1, c, self.p)[:, output, :]
        if dtype is not None:
            values = self.xp.asarray(values, dtype=dtype)
        return DenseBlock._trusted(self.names, self.shapes, values, 1 if output is not None else c, self.xp)

    def to_arrays(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``{"values": values}`` and the block's description."""
        return {"values": self.values}, self._entry()

    @classmethod
    def from_arrays(cls, entry: dict[str, Any], arrays: dict[str, Any], xp: Any) -> DenseBlock:
        """The block from :meth:`to_arrays`' description and arrays."""
        return cls(entry["names"], entry["shapes"], arrays["values"], entry["c"], xp)

    def matmat(self, v: Any) -> Any:
        """J_b V for V (p_b, k): (n·c, k)."""
        return self.values @ v

    def rmatmat(self, u: Any) -> Any:
        """J_bᵀ U for U (n·c, k): (p_b, k)."""
        return self.values.T @ u

    def _add_gram_same_kind(self, other: Any, out: Any) -> None:
        """Add J_b J'_bᵀ to ``out`` (n·c, n'·c') in place, in chunks of rows."""
        rows_total, cols = out.shape
        for rows in _chunks(rows_total, _WORK_ELEMENTS // max(1, cols)):
            out[rows] += self.values[rows] @ other.values.T

    def gram_diagonal(self) -> Any:
        """Row sums of squares, diag(J_b J_bᵀ): (n·c,)."""
        return self.xp.einsum("ij,ij->i", self.values, self.values)

    def to_dense(self) -> Any:
        """The block as an (n·c, p_b) array (the stored one, not a copy)."""
        return self.values

    def column_sq_norms(self) -> Any:
        """Column sums of squares, diag(J_bᵀ J_b): (p_b,), in chunks of rows (a disk-backed block is read once)."""
        xp = self.xp
        rows_total, p_b = self.values.shape
        result = xp.zeros(p_b, dtype=self.dtype)
        for rows in _chunks(rows_total, _WORK_ELEMENTS // max(1, p_b)):
            part = xp.asarray(self.values[rows])
            result += xp.einsum("ij,ij->j", part, part)
        return result

    def transform_rows(self, factors: Any) -> DenseBlock:
        """The block with rows of example i replaced by L_iᵀ J_b,i (a new in-memory block).

        ``factors`` is (n, c) (diagonal L_i, one scale per row) or (n, c, c).
        """
        n, c, xp = self.n, self.c, self.xp
        values = xp.asarray(self.values).reshape(n, c, -1)
        if factors.ndim == 2:
            new = values * factors[:, :, None]
        else:
            new = factors.transpose(0, 2, 1) @ values  # (n, c, c) @ (n, c, p_b): L_iᵀ J_i per example
        return DenseBlock._trusted(self.names, self.shapes, new.reshape(n * c, -1), c, xp)

    def transformed_dense(self, factors: Any) -> Any:
        """Rows L_iᵀ J_b,i as a dense float64 (n·c, p_b) array (the values cast first: float64 products)."""
        values = self.xp.asarray(self.values).astype(np.float64).reshape(self.n, self.c, -1)
        return (factors.transpose(0, 2, 1) @ values).reshape(self.n * self.c, -1)

    def add_example_grams(self, rows: slice, out: Any) -> None:
        """Add J_b,i J_b,iᵀ (float64) of the examples in ``rows`` to ``out`` (s, c, c)."""
        c, s = self.c, rows.stop - rows.start
        vals = self.xp.asarray(self.values[rows.start * c: rows.stop * c]).astype(np.float64).reshape(s, c, -1)
        out += vals @ vals.transpose(0, 2, 1)


class FactoredLinearBlock(_Block):
    """The weight and/or bias columns of J for one ``nn.Linear`` layer, as layer inputs and output sensitivities.

    Parameters
    ----------
    names, shapes : sequence
        ``[weight]``, ``[bias]`` or ``[weight, bias]`` names and shapes ((out, in) and (out,)), in column order.
    A : array of shape (n, T, m)
        Layer inputs a_it at the T positions the layer saw per example; when the bias is in the block the last
        column is ones (m = in + 1), and a bias-only block has A = ones (m = 1).
    delta : array of shape (n, c, T, out)
        Output sensitivities δ_ikt = ∂f_k(x_i) / ∂y_t (y = layer output at position t).
    has_weight, has_bias : bool
        Which of the layer's parameters the block holds.
    xp : module
        The array module.

    Raises
    ------
    ShapeError, DTypeError, BackendMismatchError, NonFiniteError, ValueRangeError
        A and Δ disagreeing on n or T, parameter shapes that do not match (out, m − has_bias); different dtypes of A
        and Δ; arrays of another backend; NaN/Inf (naming the example); a bias "input" column that is not ones.

    Notes
    -----
    Row (i, k) of the block is [vec(Σ_t δ_ikt a_itᵀ), Σ_t δ_ikt], so with A holding a ones column
    J_b J'_bᵀ[(i,k),(j,l)] = Σ_{t,t'} (a_it·a'_jt') (δ_ikt·δ'_jlt') — for T = 1 the Hadamard product
    (A A'ᵀ ⊗ 1_c 1_c'ᵀ) ∘ (Δ Δ'ᵀ) — and J_b v, J_bᵀ u are GEMMs on A and Δ; the block is never formed.
    """

    kind = "factored"
    array_names = ("A", "delta")

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], A: Any, delta: Any, *,
                 has_weight: bool, has_bias: bool, xp: Any) -> None:
        self._setup(names, shapes, A, delta, has_weight=has_weight, has_bias=has_bias, xp=xp)
        _check_finite(A, f"layer inputs A of {self._label()}", xp,
                      lambda i: f"example {i[0]}, position {i[1]}, input column {i[2]}")
        _check_finite(delta, f"output sensitivities Δ of {self._label()}", xp,
                      lambda i: f"example {i[0]}, output {i[1]}, position {i[2]}, layer output {i[3]}")
        if self.has_bias:
            ones = A[:, :, A.shape[2] - 1]
            if not bool((ones == 1).all()):
                raise ValueRangeError(f"layer inputs A of {self._label()} (shape {tuple(A.shape)}): the last column "
                                      "must be ones (the bias's input), but it is not")

    def _setup(self, names: Sequence[str], shapes: Sequence[Sequence[int]], A: Any, delta: Any, *,
               has_weight: bool, has_bias: bool, xp: Any) -> None:
        self._set_params(names, shapes)
        self.has_weight, self.has_bias = bool(has_weight), bool(has_bias)
        _check_xp(xp)
        _check_array(A, f"layer inputs A of {self._label()}", xp, 3)
        _check_array(delta, f"output sensitivities Δ of {self._label()}", xp, 4)
        if A.dtype != delta.dtype:
            raise DTypeError(f"{self._label()}: layer inputs A have dtype {A.dtype} but output sensitivities Δ "
                             f"{delta.dtype}; convert explicitly to one dtype")
        n, T, m = A.shape
        if delta.shape[0] != n or delta.shape[2] != T:
            raise ShapeError(f"{self._label()}: A has shape {tuple(A.shape)} = (n, T, m) but Δ {tuple(delta.shape)}; "
                             "Δ must be (n, c, T, out) with A's n examples and T positions")
        out = int(delta.shape[3])
        expected = ([(out, m - int(self.has_bias))] if self.has_weight else []) + ([(out,)] if self.has_bias else [])
        if not expected or (not self.has_weight and m != 1) or list(self.shapes) != expected:
            raise ShapeError(f"{self._label()} with has_weight={self.has_weight}, has_bias={self.has_bias}, A of shape "
                             f"{tuple(A.shape)} and Δ of shape {tuple(delta.shape)} needs parameter shapes "
                             f"{_shape_list(expected) or '(a weight or a bias)'}"
                             f"{'' if self.has_weight else ' and m = 1'}; got {_shape_list(self.shapes)}")
        self._set_rows(n, delta.shape[1], xp)
        self.A = A
        self.delta = delta
        self.T = int(T)
        self.out_features = out
        self.in_features = int(m) - int(self.has_bias) if self.has_weight else 0

    @property
    def inputs(self) -> Any:
        """The layer inputs without the ones column: (n, T, in)."""
        return self.A[:, :, : self.in_features]

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by A and Δ."""
        return int(self.A.nbytes + self.delta.nbytes)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the block's arrays."""
        return np.dtype(self.delta.dtype)

    @property
    def stored_per_row(self) -> int:
        """Elements stored per row of J: T·(m + c·out) per example, shared by its c rows (rounded up)."""
        return -(-self.T * (self.A.shape[2] + self.c * self.out_features) // self.c)

    @property
    def kronecker_ready(self) -> bool:
        """One position per example: the GGN block is Σ_i (Δ_iᵀ Λ_i Δ_i) ⊗ (a_i a_iᵀ)."""
        return self.T == 1

    def parameter_segments(self) -> list[tuple[int, slice]]:
        """The weight and bias parts as (first parameter column, input columns j of A): parameter column
        first + o·width + (j − j₀) holds output o and input j of the layer (weights row-major, then the bias)."""
        n_in = self.in_features
        parts = [(0, slice(0, n_in))] if self.has_weight else []
        if self.has_bias:
            parts.append((self.out_features * n_in, slice(n_in, n_in + 1)))
        return parts

    def _like(self, A: Any, delta: Any) -> FactoredLinearBlock:
        return FactoredLinearBlock._trusted(self.names, self.shapes, A, delta, has_weight=self.has_weight,
                                            has_bias=self.has_bias, xp=self.xp)

    def select(self, examples: slice, output: int | None = None, dtype: Any = None) -> FactoredLinearBlock:
        """Rows of some examples (and one output) as a block of views of A and Δ; a ``dtype`` converts both."""
        A, delta = self.A[examples], self.delta[examples]
        if output is not None:
            delta = delta[:, output: output + 1]
        if dtype is not None:
            A, delta = A.astype(dtype, copy=False), delta.astype(dtype, copy=False)
        return self._like(A, delta)

    def to_arrays(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``{"A": A, "delta": Δ}`` and the block's description (with has_weight and has_bias)."""
        return {"A": self.A, "delta": self.delta}, {**self._entry(), "has_weight": self.has_weight,
                                                    "has_bias": self.has_bias}

    @classmethod
    def from_arrays(cls, entry: dict[str, Any], arrays: dict[str, Any], xp: Any) -> FactoredLinearBlock:
        """The block from :meth:`to_arrays`' description and arrays."""
        return cls(entry["names"], entry["shapes"], arrays["A"], arrays["delta"], has_weight=entry["has_weight"],
                   has_bias=entry["has_bias"], xp=xp)

    # ----- products ----------------------------------------------------------------------------------------------
    def _as_layer_matrix(self, v: Any) -> Any:
        """V (p_b, k) in column order → (out, m, k): column j < in the weight W[o, j], column m-1 the bias b[o]."""
        out, n_in, k = self.out_features, self.in_features, v.shape[1]
        parts = []
        if self.has_weight:
            parts.append(v[: out * n_in].reshape(out, n_in, k))
        if self.has_bias:
            parts.append(v[v.shape[0] - out:].reshape(out, 1, k))
        return parts[0] if len(parts) == 1 else self.xp.concatenate(parts, axis=1)

    def _from_layer_matrix(self, g: Any) -> Any:
        """(out, m, k) → (p_b, k) in column order (inverse of :meth:`_as_layer_matrix`)."""
        out, n_in, k = self.out_features, self.in_features, g.shape[2]
        parts = []
        if self.has_weight:
            parts.append(g[:, :n_in, :].reshape(out * n_in, k))
        if self.has_bias:
            parts.append(g[:, g.shape[1] - 1, :])
        return parts[0] if len(parts) == 1 else self.xp.concatenate(parts, axis=0)

    def matmat(self, v: Any) -> Any:
        """J_b V for V (p_b, k): (n·c, k) as rowsum over (t, o) of Δ ∘ (A Vᵀ), by GEMMs in chunks."""
        xp = self.xp
        n, c, T, out = self.n, self.c, self.T, self.out_features
        m, k = self.A.shape[2], v.shape[1]
        vt = self._as_layer_matrix(v).transpose(1, 0, 2)  # (m, out, k)
        result = xp.empty((n, c, k), dtype=self.delta.dtype)
        col_chunk = max(1, _WORK_ELEMENTS // (T * out))
        for cols in _chunks(k, col_chunk):
            kc = cols.stop - cols.start
            vt_cols = xp.ascontiguousarray(vt[:, :, cols]).reshape(m, out * kc)
            for rows in _chunks(n, _WORK_ELEMENTS // (T * out * kc)):
                s = rows.stop - rows.start
                av = (self.A[rows].reshape(s * T, m) @ vt_cols).reshape(s, T * out, kc)  # a_it · V[:, o, :]
                result[rows, :, cols] = self.delta[rows].reshape(s, c, T * out) @ av
        return result.reshape(n * c, k)

    def rmatmat(self, u: Any) -> Any:
        """J_bᵀ U for U (n·c, k): (p_b, k) as Σ_{i,t} (Δ_itᵀ u_i) ⊗ a_it, by GEMMs in chunks."""
        xp = self.xp
        n, c, T, out = self.n, self.c, self.T, self.out_features
        m, k = self.A.shape[2], u.shape[1]
        u3 = u.reshape(n, c, k)
        g = xp.zeros((out * k, m), dtype=self.delta.dtype)
        for rows in _chunks(n, _WORK_ELEMENTS // (T * out * k)):
            s = rows.stop - rows.start
            du = self.delta[rows].reshape(s, c, T * out).transpose(0, 2, 1) @ u3[rows]  # (s, T·out, k)
            g += du.reshape(s * T, out * k).T @ self.A[rows].reshape(s * T, m)
        return self._from_layer_matrix(g.reshape(out, k, m).transpose(0, 2, 1))

    def _add_gram_same_kind(self, other: Any, out: Any) -> None:
        """Add J_b J'_bᵀ to ``out`` (n·c, n'·c') in place, as Σ_{t,t'} (A A'ᵀ) ∘ (Δ Δ'ᵀ) in chunks of examples."""
        xp = self.xp
        n, c, T, n_out = self.n, self.c, self.T, self.out_features
        n2, c2, T2 = other.n, other.c, other.T
        m = self.A.shape[2]
        a2 = other.A.reshape(n2 * T2, m)
        d2 = other.delta.reshape(n2 * c2 * T2, n_out)
        out4 = out.reshape(n, c, n2, c2)  # a view, also of a strided tile of K: it only splits axes
        if not xp.may_share_memory(out4, out):  # never accumulate into a copy
            raise ShapeError(f"out (shape {tuple(out.shape)}, strides {out.strides}) cannot be viewed as "
                             f"(n, c, n', c') = {(n, c, n2, c2)} without a copy; pass a C-contiguous array or a "
                             "row/column slice of one")
        for rows in _chunks(n, _WORK_ELEMENTS // max(1, c * T * n2 * c2 * T2)):
            s = rows.stop - rows.start
            aa = self.A[rows].reshape(s * T, m) @ a2.T
            dd = self.delta[rows].reshape(s * c * T, n_out) @ d2.T
            if T == 1 and T2 == 1:
                dd4 = dd.reshape(s, c, n2, c2)
                dd4 *= aa.reshape(s, 1, n2, 1)
                out4[rows] += dd4
            else:
                out4[rows] += xp.einsum("itju,ictjlu->icjl", aa.reshape(s, T, n2, T2),
                                        dd.reshape(s, c, T, n2, c2, T2))

    def gram_diagonal(self) -> Any:
        """diag(J_b J_bᵀ): (n·c,) as Σ_{t,t'} (a_it·a_it')(δ_ikt·δ_ikt') per example, without forming J_b."""
        xp = self.xp
        n, c, T = self.n, self.c, self.T
        if T == 1:
            a_sq = xp.einsum("im,im->i", self.A[:, 0, :], self.A[:, 0, :])
            d_sq = xp.einsum("ico,ico->ic", self.delta[:, :, 0, :], self.delta[:, :, 0, :])
            return (d_sq * a_sq[:, None]).reshape(n * c)
        result = xp.empty((n, c), dtype=self.delta.dtype)
        for rows in _chunks(n, _WORK_ELEMENTS // max(1, c * T * T)):
            a = self.A[rows]
            d = self.delta[rows]
            aa = a @ a.transpose(0, 2, 1)  # (s, T, T)
            dd = d @ d.transpose(0, 1, 3, 2)  # (s, c, T, T)
            result[rows] = xp.einsum("itu,ictu->ic", aa, dd)
        return result.reshape(n * c)

    def column_sq_norms(self) -> Any:
        """diag(J_bᵀ J_b): (p_b,), without forming J_b.

        Column (o, j) of row (i, k) is Σ_t δ_ikto a_itj, so its sum of squares over rows is
        Σ_i Σ_{t,t'} (Σ_k δ_ikto δ_ikt'o) (a_itj a_it'j): one GEMM of the (i, t, t') products of Δ with those of A
        (for T = 1 simply (Σ_k Δ²)ᵀ A²), in chunks of examples.
        """
        xp = self.xp
        n, c, T, n_out = self.n, self.c, self.T, self.out_features
        m = self.A.shape[2]
        g = xp.zeros((n_out, m), dtype=self.dtype)
        if T == 1:
            for rows in _chunks(n, _WORK_ELEMENTS // max(1, c * n_out + m)):
                d_sq = (self.delta[rows, :, 0, :] ** 2).sum(axis=1)  # (s, out)
                g += d_sq.T @ (self.A[rows, 0, :] ** 2)
        else:
            for rows in _chunks(n, _WORK_ELEMENTS // max(1, T * T * (c * n_out + m))):
                s = rows.stop - rows.start
                d = self.delta[rows]  # (s, c, T, out)
                dd = xp.einsum("icto,icuo->ituo", d, d).reshape(s * T * T, n_out)
                a = self.A[rows]  # (s, T, m)
                aa = (a[:, :, None, :] * a[:, None, :, :]).reshape(s * T * T, m)
                g += dd.T @ aa
        return self._from_layer_matrix(g[:, :, None])[:, 0]

    def transform_rows(self, factors: Any) -> FactoredLinearBlock:
        """The block with rows of example i replaced by L_iᵀ J_b,i: Δ̃_i = L_iᵀ Δ_i (A is shared, not copied).

        ``factors`` is (n, c) (diagonal L_i, one scale per row) or (n, c, c).
        """
        if factors.ndim == 2:
            delta = self.delta * factors[:, :, None, None]
        else:
            delta = self.xp.einsum("ijk,ijto->ikto", factors, self.delta)
        return self._like(self.A, delta)

    def transformed_dense(self, factors: Any) -> Any:
        """Rows L_iᵀ J_b,i as a dense float64 (n·c, p_b) array: Δ transformed, then the block formed."""
        return self.transform_rows(factors).to_dense().astype(np.float64, copy=False)

    def add_example_grams(self, rows: slice, out: Any) -> None:
        """Add J_b,i J_b,iᵀ = Σ_{t,t'} (a_it·a_it') Δ_it Δ_it'ᵀ (float64) of the examples in ``rows`` to ``out``
        (s, c, c)."""
        A = self.A[rows].astype(np.float64)  # (s, T, m)
        D = self.delta[rows].astype(np.float64)  # (s, c, T, out)
        if self.T == 1:
            out += (A[:, 0, :] ** 2).sum(axis=1)[:, None, None] * (D[:, :, 0, :] @ D[:, :, 0, :].transpose(0, 2, 1))
        else:
            out += self.xp.einsum("itu,ikto,iluo->ikl", A @ A.transpose(0, 2, 1), D, D)

    def to_dense(self) -> Any:
        """The block's columns of J as an (n·c, p_b) array (built on demand; meant for small problems and tests)."""
        xp = self.xp
        n, c = self.n, self.c
        parts = []
        if self.has_weight:
            w = xp.einsum("icto,itj->icoj", self.delta, self.inputs)
            parts.append(w.reshape(n * c, self.out_features * self.in_features))
        if self.has_bias:
            parts.append(self.delta.sum(axis=2).reshape(n * c, self.out_features))
        return parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=1)


class JacobianShape:
    """What every Jacobian object shares: f0 (n, c) on a backend, the (n·c, p) shape and checked operands.

    Subclasses set ``f0`` and ``backend`` and define ``p``.
    """

    f0: Any
    backend: Backend

    @property
    def n(self) -> int:
        """Number of examples."""
        return int(self.f0.shape[0])

    @property
    def n_outputs(self) -> int:
        """Number of outputs per example, c."""
        return int(self.f0.shape[1])

    @property
    def p(self) -> int:
        """Total number of parameters (columns of J)."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        """(n·c, p), the shape of J."""
        return (self.n * self.n_outputs, self.p)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of f0 and of every product."""
        return np.dtype(self.f0.dtype)

    def _operand(self, x: Any, name: str, rows: int) -> tuple[Any, bool]:
        """Check an operand (rows,) or (rows, k) of this object's dtype; return it as 2-D and whether it was 1-D."""
        arr = as_float_array(x, name, self.backend, ndim=(1, 2), dtypes=(self.dtype,))
        if arr.shape[0] != rows:
            raise ShapeError(f"{name} has shape {tuple(arr.shape)}; expected ({rows},) or ({rows}, k) for a Jacobian "
                             f"of shape {self.shape}")
        return (arr[:, None], True) if arr.ndim == 1 else (arr, False)


class JacobianBlocks(JacobianShape):
    """The Jacobian J (n·c × p) of a network at n inputs, held in parameter blocks, with f₀ = the network outputs.

    Made by :func:`lingp_core.export_jacobian`, or by hand from blocks (then validated here). Rows are example-major
    (row ``i*c + k`` is example i, output k); columns follow :attr:`param_names`, each parameter flattened row-major as
    in torch.

    Parameters
    ----------
    f0 : array of shape (n, c)
        The network outputs at the inputs (the selected outputs only); float32 or float64, finite.
    blocks : sequence of DenseBlock and FactoredLinearBlock
        The blocks, in parameter order; each with n examples × c outputs, f0's dtype and backend.
    backend : Backend
        Where every array lives.
    outputs : sequence of int
        The indices of the c selected outputs in the model's (flattened) output.
    storage_path : str, optional
        The directory holding disk-backed dense blocks, if any.
    weights_fingerprint : str, optional
        A fingerprint of the network's weights at export (:func:`lingp_core.export_jacobian` sets it); models refuse
        a test Jacobian whose fingerprint differs from the training Jacobian's. None: unknown (never refused).
    block_weights : sequence of float, optional
        The weights w_b the blocks' columns were scaled by (√w_b, :meth:`scale_blocks` sets them), one per block,
        finite and > 0; None: unscaled. Part of the signature: models refuse a test Jacobian scaled otherwise.

    Raises
    ------
    ShapeError, DTypeError, BackendMismatchError, NonFiniteError, ArgumentTypeError
        Blocks whose rows do not match f0's (n, c), outputs not of length c; dtypes that differ between f0 and the
        blocks; arrays or blocks of another backend; NaN/Inf in f0; arguments of the wrong type.

    Attributes
    ----------
    f0, blocks, backend, outputs, storage_path, weights_fingerprint, block_weights
        As given (``blocks``, ``outputs`` and ``block_weights`` as tuples).
    """

    def __init__(self, f0: Any, blocks: Sequence[_Block], *, backend: Backend, outputs: Sequence[int],
                 storage_path: str | None = None, weights_fingerprint: str | None = None,
                 block_weights: Sequence[float] | None = None) -> None:
        if not isinstance(backend, Backend):
            raise ArgumentTypeError(f"backend must be a Backend (lingp_core.get_backend(name)), got "
                                    f"{describe(backend)}")
        _check_array(f0, "f0", backend.xp, 2)
        if isinstance(blocks, _Block) or not isinstance(blocks, Sequence):
            raise ArgumentTypeError(f"blocks must be a sequence of Jacobian blocks, got {describe(blocks)}")
        if not blocks:
            raise ShapeError("blocks is empty: a Jacobian needs at least one parameter block (p ≥ 1 columns)")
        if isinstance(outputs, str) or not isinstance(outputs, Sequence):
            raise ArgumentTypeError(f"outputs must be a sequence of output indices, got {describe(outputs)}")
        if weights_fingerprint is not None and not isinstance(weights_fingerprint, str):
            raise ArgumentTypeError(f"weights_fingerprint must be a str or None, got {describe(weights_fingerprint)}")
        self.f0 = f0
        self.blocks = tuple(blocks)
        self.backend = backend
        self.outputs = tuple(_count(o, "an entry of outputs", 0) for o in outputs)
        self.storage_path = storage_path
        self.weights_fingerprint = weights_fingerprint
        self._check_blocks()
        self.block_weights = None if block_weights is None else _checked_block_weights(block_weights, self)
        _check_finite(f0, "f0 (the network outputs)", backend.xp, lambda i: f"example {i[0]}, output {i[1]}")

    def _check_blocks(self) -> None:
        n, c = self.f0.shape
        if len(self.outputs) != c:
            raise ShapeError(f"outputs {self.outputs} names {len(self.outputs)} model outputs but f0 has shape "
                             f"{tuple(self.f0.shape)} (c = {c})")
        for b in self.blocks:
            if not isinstance(b, _Block):
                raise ArgumentTypeError(f"blocks must hold DenseBlock or FactoredLinearBlock objects, got "
                                        f"{describe(b)}")
            if b.xp is not self.backend.xp:
                raise BackendMismatchError(f"{b._label()} holds {_xp_name(b.xp)} arrays but the Jacobian lives on "
                                           f"backend {self.backend.name!r}; build every block on one backend")
            if (b.n, b.c) != (n, c):
                raise ShapeError(f"{b._label()} has n = {b.n} examples × c = {b.c} outputs ({b.n * b.c} rows) but f0 "
                                 f"has shape {tuple(self.f0.shape)} ({n * c} rows)")
            if b.dtype != self.dtype:
                raise DTypeError(f"{b._label()} has dtype {b.dtype} but f0 {self.dtype}; f0 and every block share one "
                                 "dtype: convert explicitly")

    def _derived(self, f0: Any, blocks: Sequence[_Block], outputs: Sequence[int] | None = None,
                 block_weights: Sequence[float] | None = None) -> JacobianBlocks:
        """A JacobianBlocks made from this one's (already checked) arrays: same backend, weights fingerprint and
        (unless given) block weights."""
        return JacobianBlocks(f0, blocks, backend=self.backend, outputs=self.outputs if outputs is None else outputs,
                              weights_fingerprint=self.weights_fingerprint,
                              block_weights=self.block_weights if block_weights is None else block_weights)

    # ----- description -------------------------------------------------------------------------------------------
    @property
    def xp(self) -> Any:
        """The array module of the backend."""
        return self.backend.xp

    @property
    def p(self) -> int:
        """Total number of parameters (columns of J)."""
        return sum(b.p for b in self.blocks)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Parameter names in column order."""
        return tuple(name for b in self.blocks for name in b.names)

    @property
    def param_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Parameter shapes in column order."""
        return tuple(shape for b in self.blocks for shape in b.shapes)

    @property
    def block_names(self) -> tuple[tuple[str, ...], ...]:
        """The parameter names of each block, in column order."""
        return tuple(tuple(b.names) for b in self.blocks)

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """p of each block, in order."""
        return tuple(b.p for b in self.blocks)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by f0 and the blocks (disk-backed blocks count 0)."""
        return int(self.f0.nbytes) + sum(b.nbytes for b in self.blocks)

    def __repr__(self) -> str:
        kinds = ", ".join(f"{b.kind}[{', '.join(b.names)}]" for b in self.blocks)
        return (f"JacobianBlocks(n={self.n}, c={self.n_outputs}, p={self.p}, dtype={self.dtype}, "
                f"backend={self.backend.name!r}, blocks: {kinds})")

    def _offsets(self) -> list[slice]:
        offsets, start = [], 0
        for b in self.blocks:
            offsets.append(slice(start, start + b.p))
            start += b.p
        return offsets

    # ----- products ----------------------------------------------------------------------------------------------
    def matmat(self, V: Any) -> Any:
        """J V, block by block.

        Parameters
        ----------
        V : array of shape (p, k) or (p,)
            Columns in this object's parameter order; the object's dtype and backend.

        Returns
        -------
        array of shape (n·c, k) or (n·c,)
        """
        v, vector = self._operand(V, "V", self.p)
        result = self.xp.zeros((self.shape[0], v.shape[1]), dtype=self.dtype)
        for block, cols in zip(self.blocks, self._offsets()):
            result += block.matmat(v[cols])
        return result[:, 0] if vector else result

    def rmatmat(self, U: Any) -> Any:
        """Jᵀ U, block by block.

        Parameters
        ----------
        U : array of shape (n·c, k) or (n·c,)
            Rows example-major; the object's dtype and backend.

        Returns
        -------
        array of shape (p, k) or (p,)
            Rows in this object's parameter order.
        """
        u, vector = self._operand(U, "U", self.shape[0])
        parts = [block.rmatmat(u) for block in self.blocks]
        result = self.xp.concatenate(parts, axis=0)
        return result[:, 0] if vector else result

    def gram_matmat(self, U: Any) -> Any:
        """J (Jᵀ U) for U of shape (n·c, k) or (n·c,): the kernel product without forming J Jᵀ."""
        u, vector = self._operand(U, "U", self.shape[0])
        result = self.xp.zeros((self.shape[0], u.shape[1]), dtype=self.dtype)
        for block in self.blocks:
            result += block.matmat(block.rmatmat(u))
        return result[:, 0] if vector else result

    def check_compatible(self, other: JacobianBlocks) -> None:
        """Raise unless ``other`` has this object's backend, dtype and parameter blocks (names and shapes).

        The weights they were exported from may differ (a kernel between two networks is legitimate); models check
        those too, through :meth:`check_signature`.
        """
        if not isinstance(other, JacobianBlocks):
            raise ArgumentTypeError(f"other must be a JacobianBlocks, got {type(other).__name__}")
        if other.backend != self.backend:
            raise BackendMismatchError(f"other lives on backend {other.backend.name!r} but this object on "
                                       f"{self.backend.name!r}; export both onto one backend")
        if other.dtype != self.dtype:
            raise SignatureDTypeError(f"other has dtype {other.dtype} but this object {self.dtype}; export both in one "
                                      "dtype")
        mine = [(b.names, b.shapes) for b in self.blocks]
        theirs = [(b.names, b.shapes) for b in other.blocks]
        if mine != theirs:
            raise SignatureShapeError(f"other's parameter blocks {[b.names for b in other.blocks]} (p={other.p}) "
                                      f"differ from this object's {[b.names for b in self.blocks]} (p={self.p}); "
                                      "export both with the same params")

    def _example_range(self, examples: Any) -> slice:
        """``examples`` (a slice of step 1, or None for all) with explicit bounds within [0, n]."""
        if examples is None:
            return slice(0, self.n)
        if not isinstance(examples, slice):
            raise ArgumentTypeError(f"examples must be a slice, got {describe(examples)}")
        bounds = (examples.start, examples.stop, examples.step)
        if not all(b is None or (isinstance(b, numbers.Integral) and not isinstance(b, bool)) for b in bounds):
            raise ArgumentTypeError(f"examples must be a slice of integers (or None), got {examples}")
        start, stop, step = examples.indices(self.n)
        if step != 1:
            raise InvalidOptionError(f"examples must be a slice of consecutive examples (step 1), got {examples}")
        return slice(start, max(start, stop))

    def select(self, examples: slice | None = None, output: int | None = None) -> JacobianBlocks:
        """The Jacobian of some examples and/or of one output, sharing J's arrays where possible (views).

        Parameters
        ----------
        examples : slice, optional
            Consecutive examples (step 1); default all.
        output : int, optional
            Position k in [0, c) of one output in this object's outputs; the result then has c = 1.

        Returns
        -------
        JacobianBlocks
            (n_sel·c_sel, p), with f0, outputs and the weights fingerprint carried over.
        """
        rows = self._example_range(examples)
        f0 = self.f0[rows]
        outputs = self.outputs
        if output is not None:
            output = _count(output, "output", 0)
            if output >= self.n_outputs:
                raise ValueRangeError(f"output must lie in [0, {self.n_outputs - 1}] (the position of an output of "
                                      f"this Jacobian's {self.outputs}), got {output}")
            f0, outputs = f0[:, output: output + 1], (self.outputs[output],)
        return self._derived(f0, [b.select(rows, output) for b in self.blocks], outputs)

    def examples(self, rows: slice) -> JacobianBlocks:
        """The Jacobian of the examples in ``rows`` (a slice), sharing J's arrays (views, no copies)."""
        return self.select(rows)

    def signature(self) -> dict[str, Any]:
        """What a second export must share with this one for predictions between them, JSON-ready: parameter blocks
        (names and shapes, in column order), the selected outputs, the dtype, the weights fingerprint (None when
        unknown) and the block weights of :meth:`scale_blocks` (None when unscaled)."""
        return {"blocks": [[list(b.names), [list(s) for s in b.shapes]] for b in self.blocks],
                "outputs": list(self.outputs), "dtype": str(self.dtype), "weights": self.weights_fingerprint,
                "block_weights": None if self.block_weights is None else list(self.block_weights)}

    def check_signature(self, signature: dict[str, Any], *, what: str = "the training Jacobian") -> None:
        """Raise unless this export matches a :meth:`signature` recorded from ``what`` (e.g. at fit time).

        A fingerprint missing on either side (a hand-built Jacobian, or a signature saved before fingerprints
        existed) is unknown and accepted; so are block weights missing from a signature saved before they were
        recorded.

        Raises
        ------
        SignatureShapeError
            Other parameters or outputs (a SignatureError and a ShapeError).
        SignatureDTypeError
            Another dtype (a SignatureError and a DTypeError).
        SignatureError
            Exported from other weights than ``what``, or scaled by other block weights (:meth:`scale_blocks`).
        """
        if not isinstance(signature, dict) or not {"blocks", "outputs", "dtype"} <= set(signature):
            raise ArgumentTypeError(f"signature must be a dict from JacobianBlocks.signature(), got "
                                    f"{describe(signature)}")
        mine = self.signature()
        if mine["blocks"] != signature["blocks"] or mine["outputs"] != signature["outputs"]:
            def described(blocks: Any) -> list[str]:  # names with shapes: a reshaped layer keeps its name
                return [f"{n}{tuple(shape)}" for names, shapes in blocks for n, shape in zip(names, shapes)]
            raise SignatureShapeError(f"J_star was exported with parameters {described(mine['blocks'])} and outputs "
                                      f"{list(self.outputs)}: other parameters or outputs than {what}'s "
                                      f"{described(signature['blocks'])} and outputs {signature['outputs']}; export "
                                      "both from the same network with the same params= and outputs=")
        if mine["dtype"] != signature["dtype"]:
            raise SignatureDTypeError(f"J_star has dtype {mine['dtype']} but {what} {signature['dtype']}; export both "
                                      "in one dtype")
        theirs = signature.get("weights")
        if mine["weights"] is not None and theirs is not None and mine["weights"] != theirs:
            raise SignatureError(f"J_star was exported from other weights than {what} (weight fingerprints "
                                 f"{mine['weights'][:12]}… and {str(theirs)[:12]}…): the network was changed after fit "
                                 "(e.g. trained further) or is another network of the same architecture, and the "
                                 "posterior belongs to the weights it was fitted at. Export the test Jacobian from the "
                                 "weights of the fit (keep a copy of the network, e.g. copy.deepcopy(model), before "
                                 "training on), or refit on a Jacobian exported from the current weights")
        if "block_weights" in signature:  # absent: saved before block weights were recorded, unknown
            _check_same_block_weights(mine["block_weights"], signature["block_weights"], what)

    def gram(self, other: JacobianBlocks | None = None, *, memory_budget: float | None = None) -> Any:
        """J J'ᵀ summed over blocks (J Jᵀ when ``other`` is None): the unscaled kernel matrix.

        Parameters
        ----------
        other : JacobianBlocks, optional
            A second export with the same parameters (names, shapes, blocks), backend and dtype; its n' and c' may
            differ.
        memory_budget : float, optional
            Bytes allowed for the result and work space (default: a safe fraction of free memory on the backend).

        Returns
        -------
        array of shape (n·c, n'·c')
            Rows and columns example-major.

        Raises
        ------
        MemoryBudgetError
            When the result would not fit; use :meth:`gram_matmat` (matrix-free) or fewer examples.
        """
        other = self if other is None else other
        self.check_compatible(other)
        shape = (self.shape[0], other.shape[0])
        needed = nbytes_of(shape, self.dtype) + 3 * product_work(shape[0], shape[1], self.blocks) * self.dtype.itemsize
        check_memory(needed, resolve_memory_budget(memory_budget, self.backend),
                     what=f"the kernel matrix J J'ᵀ of shape {shape} (with work space)",
                     alternative="use matrix-free products (gram_matmat) or fewer examples per gram call")
        result = self.xp.zeros(shape, dtype=self.dtype)
        for mine, theirs in zip(self.blocks, other.blocks):
            mine.add_gram(theirs, result)
        return result

    def gram_diagonal(self) -> Any:
        """diag(J Jᵀ): (n·c,), without forming J Jᵀ."""
        result = self.xp.zeros(self.shape[0], dtype=self.dtype)
        for block in self.blocks:
            result += block.gram_diagonal()
        return result

    def column_sq_norms(self) -> Any:
        """diag(Jᵀ J): (p,), the column sums of squares, block by block without forming J."""
        return self.xp.concatenate([block.column_sq_norms() for block in self.blocks])

    def transform_rows(self, factors: Any) -> JacobianBlocks:
        """G with the rows of each example transformed, G_i = L_iᵀ J_i, so that Gᵀ G = Σ_i J_iᵀ L_i L_iᵀ J_i.

        With L_i L_iᵀ = Λ_i (:meth:`lingp_core.likelihoods.Likelihood.sqrt_curvature`) Gᵀ G is the Fisher
        Jᵀ Λ J. Factored blocks transform Δ only (A is shared with this object); dense blocks get new values.

        Parameters
        ----------
        factors : array of shape (n, c) or (n, c, c)
            Per-example L_i: (n, c) for diagonal ones (row i·c + k scaled by factors[i, k]), else full c × c.
            This object's dtype and backend.

        Returns
        -------
        JacobianBlocks
            Same n, c, p, parameter order, f0 (kept for shape; G is not the Jacobian of the network).
        """
        arr = check_row_factors(factors, self)
        return self._derived(self.f0, [block.transform_rows(arr) for block in self.blocks])

    def scale_blocks(self, weights: Any) -> JacobianBlocks:
        """J with block b's columns multiplied by √weights[b], so its kernel is Σ_b weights[b]·J_b J_bᵀ: a prior
        on θ − θ̂ whose variance differs per block (per layer), read by every model as an ordinary Jacobian.

        Parameters
        ----------
        weights : sequence of float, length = the number of blocks (``len(J.blocks)``)
            Finite and > 0. The scaled arrays keep J's dtype (in float32 the scaled kernel carries float32 rounding).

        Returns
        -------
        JacobianBlocks
            Same n, c, p, parameter order, f0 and weights fingerprint; its :attr:`block_weights` (in the signature)
            are ``weights``, times this object's own if it was scaled already. Factored blocks share their inputs A
            with this object.
        """
        refuse_masked(weights, "weights")
        try:
            w = None if isinstance(weights, (str, bytes)) else np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError):
            raise ArgumentTypeError(f"weights must be a sequence of numbers, got {describe(weights)}") from None
        if w is None or w.ndim != 1 or w.size != len(self.blocks):
            raise ShapeError(f"weights must hold one number per block ({len(self.blocks)} blocks: "
                             f"{[list(names) for names in self.block_names]}), got {weights!r}")
        with np.errstate(invalid="ignore", over="ignore"):
            roots = np.sqrt(w).astype(self.dtype)
        info = np.finfo(self.dtype)
        if not (np.isfinite(w).all() and (w >= np.finfo(np.float64).tiny).all() and (roots >= info.tiny).all()
                and (roots <= np.sqrt(info.max)).all()):
            raise ValueRangeError(f"block weights must be finite and > 0 (normal float64), with square roots normal "
                                  f"{self.dtype} numbers (between {info.tiny:.3g} and {np.sqrt(info.max):.3g}), got "
                                  f"{w.tolist()}")
        n, c, xp = self.n, self.n_outputs, self.xp
        total = w if self.block_weights is None else w * np.asarray(self.block_weights)
        return self._derived(self.f0, [block.transform_rows(xp.full((n, c), root, dtype=self.dtype))
                                       for block, root in zip(self.blocks, roots)], block_weights=total.tolist())

    def to_dense(self, *, memory_budget: float | None = None) -> Any:
        """The full Jacobian J as an (n·c, p) array (for small problems, tests and debugging).

        Raises
        ------
        MemoryBudgetError
            When J does not fit in the budget (default: a safe fraction of free memory on the backend).
        """
        check_memory(nbytes_of(self.shape, self.dtype), resolve_memory_budget(memory_budget, self.backend),
                     what=f"the dense Jacobian of shape {self.shape}",
                     alternative="use the block products (matmat, rmatmat, gram) instead")
        result = self.xp.empty(self.shape, dtype=self.dtype)
        for block, cols in zip(self.blocks, self._offsets()):
            result[:, cols] = block.to_dense()
        return result


#: Block weights equal to this relative tolerance are the same prior (recomputed weights differ in the last bits).
_BLOCK_WEIGHT_RTOL = 64 * float(np.finfo(np.float64).eps)


def _checked_block_weights(weights: Any, J: JacobianBlocks) -> tuple[float, ...]:
    """``block_weights`` of the constructor: one finite weight > 0 per block, as a tuple of floats."""
    refuse_masked(weights, "block_weights")
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise ArgumentTypeError(f"block_weights must be a sequence of numbers, got {describe(weights)}") from None
    if w.ndim != 1 or w.size != len(J.blocks):
        raise ShapeError(f"block_weights must hold one weight per block ({len(J.blocks)} blocks), got shape {w.shape}")
    if not (np.isfinite(w).all() and (w > 0).all()):
        raise ValueRangeError(f"block_weights must be finite and > 0, got {w.tolist()}")
    return tuple(w.tolist())


def _check_same_block_weights(mine: Any, theirs: Any, what: str) -> None:
    """SignatureError unless J_star's block weights (``mine``) and ``what``'s are both None or equal to rounding."""
    if mine is None and theirs is None:
        return
    if mine is not None and theirs is not None and len(mine) == len(theirs) and np.allclose(
            mine, theirs, rtol=_BLOCK_WEIGHT_RTOL, atol=0):
        return
    if theirs is None:
        problem, fix = (f"J_star is scaled by blocks (weights {list(mine)}) but {what} is not",
                        "pass J_star unscaled, or refit on a Jacobian scaled the same way")
    else:
        problem = (f"{what} was scaled by blocks (weights {list(theirs)}) but J_star is not" if mine is None else
                   f"J_star and {what} were scaled by other block weights ({list(mine)} and {list(theirs)})")
        fix = f"scale the unscaled J_star the same way, J_star.scale_blocks({list(theirs)})"
    raise SignatureError(f"{problem}: the block weights are part of the prior, so the test Jacobian must carry the "
                         f"same ones; {fix}")


def check_row_factors(factors: Any, J: Any) -> Any:
    """``factors`` for ``J.transform_rows``, checked: (n, c) or (n, c, c), J's dtype and backend, finite."""
    n, c = J.n, J.n_outputs
    arr = as_float_array(factors, "factors", J.backend, ndim=(2, 3), dtypes=(J.dtype,))
    wanted = (n, c) if arr.ndim == 2 else (n, c, c)
    if tuple(arr.shape) != wanted:
        raise ShapeError(f"factors has shape {tuple(arr.shape)}; expected (n, c) = {(n, c)} or (n, c, c) = "
                         f"{(n, c, c)} for a Jacobian with n = {n} examples and c = {c} outputs")
    return arr
