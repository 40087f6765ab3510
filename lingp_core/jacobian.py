"""Jacobian blocks: the Jacobian J (n·c × p) of a network, held per parameter block, and its products.

Rows are example-major: row ``i*c + k`` is example i, output k. Columns follow the object's parameter order (the
model's ``named_parameters`` order), each parameter flattened row-major as torch does (weight index ``o*in + j``).

Two kinds of block:

- :class:`DenseBlock` holds its columns of J as an (n·c, p_b) array (on the backend, or an ``np.memmap`` on disk).
- :class:`FactoredLinearBlock` holds a torch ``nn.Linear`` layer's weight and/or bias without forming its columns:
  layer inputs A (n, T, m) and output sensitivities Δ (n, c, T, out), where T counts the positions the layer was
  applied to per example (1 for a plain MLP; sequence length × number of calls for sequences or weight sharing).
  The weight columns of example i, output k are Σ_t δ_ikt ⊗ a_it, so every product is a GEMM on A and Δ.

This module is backend-agnostic (it works through ``backend.xp``) and never imports torch.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from backends import Backend
from lingp_core._validate import (
    BackendMismatchError,
    DTypeError,
    ShapeError,
    as_float_array,
    check_memory,
    nbytes_of,
    resolve_memory_budget,
)

__all__ = ["DenseBlock", "FactoredLinearBlock", "JacobianBlocks", "JacobianShape"]

# Largest intermediate (in elements) a product builds at once; bigger problems run in chunks of examples/columns.
_WORK_ELEMENTS = 1 << 24


def _chunks(total: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` (≥ 1) covering range(total)."""
    size = max(1, int(size))
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def _numel(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


class _Block:
    """What both block kinds share: parameter names and shapes, row count, products interface."""

    kind = ""

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], n: int, c: int, xp: Any) -> None:
        self.names = tuple(names)
        self.shapes = tuple(tuple(int(s) for s in shape) for shape in shapes)
        self.n = int(n)
        self.c = int(c)
        self.xp = xp

    @property
    def p(self) -> int:
        """Number of parameters (columns of J) in this block."""
        return sum(_numel(s) for s in self.shapes)

    def add_gram(self, other: _Block, out: Any) -> None:
        """Add J_b J'_bᵀ to ``out`` of shape (n·c, n'·c') in place."""
        raise NotImplementedError

    def gram(self, other: _Block) -> Any:
        """J_b J'_bᵀ: (n·c, n'·c')."""
        out = self.xp.zeros((self.n * self.c, other.n * other.c), dtype=self.dtype)
        self.add_gram(other, out)
        return out

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the block's arrays."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.names)}; p={self.p})"


class DenseBlock(_Block):
    """Columns of J for some parameters, stored densely.

    Parameters
    ----------
    names, shapes : sequence
        Parameter names and shapes, in column order.
    values : array of shape (n·c, p_b)
        The block, rows example-major. A NumPy/CuPy array or an ``np.memmap`` (disk-backed, CPU only).
    c : int
        Number of outputs per example.
    xp : module
        The array module of ``values``.
    """

    kind = "dense"

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], values: Any, c: int, xp: Any) -> None:
        super().__init__(names, shapes, values.shape[0] // c, c, xp)
        self.values = values

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (0 for a disk-backed block)."""
        return 0 if isinstance(self.values, np.memmap) else int(self.values.nbytes)

    def matmat(self, v: Any) -> Any:
        """J_b V for V (p_b, k): (n·c, k)."""
        return self.values @ v

    def rmatmat(self, u: Any) -> Any:
        """J_bᵀ U for U (n·c, k): (p_b, k)."""
        return self.values.T @ u

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the block's arrays."""
        return np.dtype(self.values.dtype)

    def add_gram(self, other: _Block, out: Any) -> None:
        """Add J_b J'_bᵀ to ``out`` (n·c, n'·c') in place, in chunks of rows."""
        if not isinstance(other, DenseBlock):
            out += other.matmat(self.values.T).T
            return
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
        return DenseBlock(self.names, self.shapes, new.reshape(n * c, -1), c, xp)


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

    Notes
    -----
    Row (i, k) of the block is [vec(Σ_t δ_ikt a_itᵀ), Σ_t δ_ikt], so with A holding a ones column
    J_b J'_bᵀ[(i,k),(j,l)] = Σ_{t,t'} (a_it·a'_jt') (δ_ikt·δ'_jlt') — for T = 1 the Hadamard product
    (A A'ᵀ ⊗ 1_c 1_c'ᵀ) ∘ (Δ Δ'ᵀ) — and J_b v, J_bᵀ u are GEMMs on A and Δ; the block is never formed.
    """

    kind = "factored"

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], A: Any, delta: Any, *,
                 has_weight: bool, has_bias: bool, xp: Any) -> None:
        super().__init__(names, shapes, A.shape[0], delta.shape[1], xp)
        self.A = A
        self.delta = delta
        self.has_weight = bool(has_weight)
        self.has_bias = bool(has_bias)
        self.T = int(A.shape[1])
        self.out_features = int(delta.shape[3])
        self.in_features = int(A.shape[2]) - int(has_bias) if has_weight else 0

    @property
    def inputs(self) -> Any:
        """The layer inputs without the ones column: (n, T, in)."""
        return self.A[:, :, : self.in_features]

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by A and Δ."""
        return int(self.A.nbytes + self.delta.nbytes)

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

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the block's arrays."""
        return np.dtype(self.delta.dtype)

    def add_gram(self, other: _Block, out: Any) -> None:
        """Add J_b J'_bᵀ to ``out`` (n·c, n'·c') in place, as Σ_{t,t'} (A A'ᵀ) ∘ (Δ Δ'ᵀ) in chunks of examples."""
        if not isinstance(other, FactoredLinearBlock):
            out += self.matmat(other.to_dense().T)
            return
        xp = self.xp
        n, c, T, n_out = self.n, self.c, self.T, self.out_features
        n2, c2, T2 = other.n, other.c, other.T
        m = self.A.shape[2]
        a2 = other.A.reshape(n2 * T2, m)
        d2 = other.delta.reshape(n2 * c2 * T2, n_out)
        out4 = out.reshape(n, c, n2, c2)  # a view, also of a strided tile of K: it only splits axes
        if not xp.may_share_memory(out4, out):  # never accumulate into a copy
            raise RuntimeError("internal: the kernel tile could not be reshaped in place")
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
        return FactoredLinearBlock(self.names, self.shapes, self.A, delta, has_weight=self.has_weight,
                                   has_bias=self.has_bias, xp=self.xp)

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

    Made by :func:`lingp_core.export_jacobian`. Rows are example-major (row ``i*c + k`` is example i, output k);
    columns follow :attr:`param_names`, each parameter flattened row-major as in torch.

    Attributes
    ----------
    f0 : array of shape (n, c)
        The network outputs at the inputs (the selected outputs only).
    blocks : tuple of DenseBlock and FactoredLinearBlock
        The blocks, in parameter order.
    backend : Backend
        Where every array lives.
    outputs : tuple of int
        The indices of the selected outputs in the model's (flattened) output.
    storage_path : str or None
        The directory holding disk-backed dense blocks, if any.
    """

    def __init__(self, f0: Any, blocks: Sequence[_Block], *, backend: Backend, outputs: Sequence[int],
                 storage_path: str | None = None) -> None:
        self.f0 = f0
        self.blocks = tuple(blocks)
        self.backend = backend
        self.outputs = tuple(int(o) for o in outputs)
        self.storage_path = storage_path

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
        """Raise unless ``other`` has this object's backend, dtype and parameter blocks (names and shapes)."""
        if not isinstance(other, JacobianBlocks):
            raise TypeError(f"other must be a JacobianBlocks, got {type(other).__name__}")
        if other.backend != self.backend:
            raise BackendMismatchError(f"other lives on backend {other.backend.name!r} but this object on "
                                       f"{self.backend.name!r}; export both onto one backend")
        if other.dtype != self.dtype:
            raise DTypeError(f"other has dtype {other.dtype} but this object {self.dtype}; export both in one dtype")
        mine = [(b.names, b.shapes) for b in self.blocks]
        theirs = [(b.names, b.shapes) for b in other.blocks]
        if mine != theirs:
            raise ShapeError(f"other's parameter blocks {[b.names for b in other.blocks]} (p={other.p}) differ from "
                             f"this object's {[b.names for b in self.blocks]} (p={self.p}); export both with the "
                             "same params")

    def examples(self, rows: slice) -> JacobianBlocks:
        """The Jacobian of the examples in ``rows`` (a slice), sharing J's arrays (views, no copies)."""
        c = self.n_outputs
        blocks: list[_Block] = []
        for b in self.blocks:
            if isinstance(b, DenseBlock):
                blocks.append(DenseBlock(b.names, b.shapes, b.values[rows.start * c: rows.stop * c], c, b.xp))
            else:
                blocks.append(FactoredLinearBlock(b.names, b.shapes, b.A[rows], b.delta[rows],
                                                  has_weight=b.has_weight, has_bias=b.has_bias, xp=b.xp))
        return JacobianBlocks(self.f0[rows], blocks, backend=self.backend, outputs=self.outputs)

    def signature(self) -> dict[str, Any]:
        """What a second export must share with this one for kernels and predictions between them, JSON-ready:
        parameter blocks (names and shapes, in column order), the selected outputs and the dtype."""
        return {"blocks": [[list(b.names), [list(s) for s in b.shapes]] for b in self.blocks],
                "outputs": list(self.outputs), "dtype": str(self.dtype)}

    def check_signature(self, signature: dict[str, Any], *, what: str = "the training Jacobian") -> None:
        """Raise unless this export matches a :meth:`signature` recorded from ``what`` (e.g. at fit time)."""
        mine = self.signature()
        if mine["blocks"] != signature["blocks"] or mine["outputs"] != signature["outputs"]:
            names = [n for names, _ in signature["blocks"] for n in names]
            raise ShapeError(f"J_star was exported with parameters {list(self.param_names)} and outputs "
                             f"{list(self.outputs)}: other parameters or outputs than {what}'s {names} and outputs "
                             f"{signature['outputs']}; export both with the same params= and outputs=")
        if mine["dtype"] != signature["dtype"]:
            raise DTypeError(f"J_star has dtype {mine['dtype']} but {what} {signature['dtype']}; export both in one "
                             "dtype")

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
        needed = nbytes_of(shape, self.dtype) + 3 * _WORK_ELEMENTS * self.dtype.itemsize
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
        n, c = self.n, self.n_outputs
        arr = as_float_array(factors, "factors", self.backend, ndim=(2, 3), dtypes=(self.dtype,))
        wanted = (n, c) if arr.ndim == 2 else (n, c, c)
        if tuple(arr.shape) != wanted:
            raise ShapeError(f"factors has shape {tuple(arr.shape)}; expected (n, c) = {(n, c)} or (n, c, c) = "
                             f"{(n, c, c)} for a Jacobian with n = {n} examples and c = {c} outputs")
        return JacobianBlocks(self.f0, [block.transform_rows(arr) for block in self.blocks], backend=self.backend,
                              outputs=self.outputs)

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
