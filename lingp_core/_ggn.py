"""The dense generalized Gauss–Newton matrix Jᵀ Λ J from Jacobian blocks without forming J, and per-example
Gram blocks J_i J_iᵀ (used by the weight-space Laplace engine and its predictions)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from lingp_core import _validate as v
from lingp_core.jacobian import _WORK_ELEMENTS as WORK_ELEMENTS
from lingp_core.jacobian import JacobianBlocks
from lingp_core.jacobian import _chunks as chunks
from lingp_core.sharded import is_sharded

_FEW_ELEMENTS = 1 << 20  # per-example outer products are formed a few MB at a time, then packed

# ----- dense GGN and per-example Gram blocks ------------------------------------------------------------------------

def _kronecker_pair(b1: Any, b2: Any, curvature: Any, out: Any) -> None:
    """Write F_{12} = Σ_i (Δ_i1ᵀ Λ_i Δ_i2) ⊗ (a_i1 a_i2ᵀ) for two different blocks with ``kronecker_ready``
    (A (n, 1, m), Δ (n, c, 1, out)) into ``out`` (p1, p2), a view of F, in parameter order.

    One GEMM over examples of the flattened (out1·out2) and (m1·m2) outer products: n·p1·p2 flops instead of the
    n·c·p1·p2 of Gᵀ G. Each weight/bias part is then one strided copy into ``out`` (no gathers over p1·p2 indices).
    """
    xp = b1.xp
    o1, o2, m1, m2 = b1.out_features, b2.out_features, b1.A.shape[2], b2.A.shape[2]
    acc: Any = None if b1.n else xp.zeros((o1 * o2, m1 * m2), dtype=np.float64)  # the sum over examples
    for rows in chunks(b1.n, WORK_ELEMENTS // (o1 * o2 + m1 * m2 + 1)):
        d1 = b1.delta[rows, :, 0, :].astype(np.float64)
        d2 = b2.delta[rows, :, 0, :].astype(np.float64)
        a1 = b1.A[rows, 0, :].astype(np.float64)
        a2 = b2.A[rows, 0, :].astype(np.float64)
        dd = d1.transpose(0, 2, 1) @ (curvature[rows] @ d2)  # (s, o1, o2)
        aa = a1[:, :, None] * a2[:, None, :]  # (s, m1, m2)
        s = rows.stop - rows.start
        product = dd.reshape(s, o1 * o2).T @ aa.reshape(s, m1 * m2)
        if acc is None:
            acc = product
        else:
            acc += product
    layer = acc.reshape(o1, o2, m1, m2)  # [o1, o2, j1, j2]
    for row0, js1 in b1.parameter_segments():
        w1 = js1.stop - js1.start
        for col0, js2 in b2.parameter_segments():
            w2 = js2.stop - js2.start
            _window(xp, out, row0, col0, (o1, w1), (o2, w2))[...] = layer[:, :, js1, js2].transpose(0, 2, 1, 3)


def _kronecker_self(block: Any, curvature: Any, out: Any) -> None:
    """Write F_bb = Σ_i (Δ_iᵀ Λ_i Δ_i) ⊗ (a_i a_iᵀ) of one block with ``kronecker_ready`` into ``out`` (p_b, p_b),
    a view of F, in parameter order (both triangles).

    Both outer products are symmetric, so only their upper triangles (o(o+1)/2 output pairs, m(m+1)/2 input pairs)
    enter the GEMM over examples: a quarter of the n·p_b² flops. Row (o1, o2) of its result is the upper triangle of
    the symmetric m × m block of F at output pair (o1, o2), which is also the block at (o2, o1). For each output o1
    the rows (o1, o2 ≥ o1) are unpacked along the input pairs and copied into F's rows of o1 and, unchanged, into
    F's columns of o1: strided copies, no gather over p_b² indices, and no temporary larger than the GEMM's operands.
    """
    xp = block.xp
    o, m = block.out_features, block.A.shape[2]
    upper_o, upper_m = np.triu_indices(o), np.triu_indices(m)
    acc: Any = None if block.n else xp.zeros((upper_o[0].size, upper_m[0].size), dtype=np.float64)
    for rows in chunks(block.n, WORK_ELEMENTS // (o * o + m * m + 1)):
        dd = xp.empty((rows.stop - rows.start, upper_o[0].size), dtype=np.float64)  # upper(Δ_iᵀ Λ_i Δ_i) per row
        for few in chunks(rows.stop - rows.start, _FEW_ELEMENTS // (o * o)):  # (o, o) products a few MB at a time
            at = slice(rows.start + few.start, rows.start + few.stop)
            d = block.delta[at, :, 0, :].astype(np.float64)
            dd[few] = (d.transpose(0, 2, 1) @ (curvature[at] @ d))[:, upper_o[0], upper_o[1]]
        a = block.A[rows, 0, :].astype(np.float64)
        product = dd.T @ (a[:, upper_m[0]] * a[:, upper_m[1]])  # with upper(a_i a_iᵀ) per row
        if acc is None:
            acc = product
        else:
            acc += product
    unpack = xp.asarray(_packed_index(m).ravel())
    first = np.concatenate([[0], np.cumsum(np.arange(o, 0, -1))])  # the row of output pair (o1, o1)
    segments = [(start, js, js.stop - js.start) for start, js in block.parameter_segments()]
    for o1 in range(o):
        rest = o - o1
        # (rest, m, m): the blocks of output pairs (o1, o2), o2 = o1 … o − 1
        blocks = xp.take(acc[first[o1]: first[o1 + 1]], unpack, axis=1).reshape(rest, m, m)
        for row0, js1, w1 in segments:
            for col0, js2, w2 in segments:
                part = blocks[:, js1, js2]
                # F[(o1, j1), (o2, j2)] and F[(o2, j1), (o1, j2)], o2 ≥ o1: the same block
                _window(xp, out, row0 + o1 * w1, col0 + o1 * w2, (w1,), (rest, w2))[...] = part.transpose(1, 0, 2)
                _window(xp, out, row0 + o1 * w1, col0 + o1 * w2, (rest, w1), (w2,))[...] = part


def _window(xp: Any, out: Any, row0: int, col0: int, row_shape: tuple[int, ...], col_shape: tuple[int, ...]) -> Any:
    """The rows row0 … and columns col0 … of ``out`` (a 2-D view of F) with its rows split into ``row_shape`` and
    its columns into ``col_shape``: a view (splitting axes of a view is one); never a copy to write into."""
    rows, cols = math.prod(row_shape), math.prod(col_shape)
    target = out[row0: row0 + rows, col0: col0 + cols].reshape(*row_shape, *col_shape)
    if not xp.may_share_memory(target, out):
        raise v.ShapeError(f"the Hessian block of shape {tuple(out.shape)} (strides {out.strides}) cannot be viewed "
                           f"as {(*row_shape, *col_shape)} without a copy; pass a view of a C-contiguous F")
    return target


def _packed_index(k: int) -> np.ndarray:
    """(k, k) symmetric map from (i, j) to the position of (min, max) in numpy's row-major upper-triangle order."""
    index = np.zeros((k, k), dtype=np.int64)
    rows, cols = np.triu_indices(k)
    index[rows, cols] = np.arange(rows.size)
    index[cols, rows] = np.arange(rows.size)
    return index


def dense_ggn(J: JacobianBlocks, factors: Any, memory_budget: Any, out: Any = None) -> Any:
    """F = Jᵀ Λ J (p, p) float64, Λ_i = L_i L_iᵀ, assembled block pair by block pair.

    Pairs of factored Linear blocks with T = 1 (and c > 1) take the Kronecker route (:func:`_kronecker_self` for a
    block with itself, :func:`_kronecker_pair` for two blocks); other pairs use the dense transformed rows
    G_b = L_iᵀ J_b,i, F_{bb'} = G_bᵀ G_b'. Both triangles are written: each pair of different blocks is mirrored,
    and the Kronecker route writes one value to both entries of each symmetric pair.

    ``out``: a C-contiguous float64 (p, p) array on J's backend to write F into (what it holds is lost) instead of
    a new one; a sharded J returns the sum gathered from its workers instead.
    """
    if is_sharded(J):
        return J.dense_ggn(factors, memory_budget)
    xp, p, c = J.xp, J.p, J.n_outputs
    if out is not None and not (out.shape == (p, p) and out.dtype == np.float64 and out.flags.c_contiguous):
        raise v.ShapeError(f"out must be a C-contiguous float64 ({p}, {p}) array, got {v.describe(out)}")
    widest = max(b.p for b in J.blocks)
    v.check_memory((0 if out is not None else v.nbytes_of((p, p), np.float64))
                   + 2 * v.nbytes_of((J.n * c, widest), np.float64),
                   v.resolve_memory_budget(memory_budget, J.backend),
                   what=f"the dense p × p Hessian (p = {p}) of the weight-space Laplace approximation",
                   alternative="use method='function' when n·c is small, or export fewer parameters "
                               "(e.g. params='last_layer')")
    curvature = factors @ factors.transpose(0, 2, 1)
    F = xp.empty((p, p), dtype=np.float64) if out is None else out
    starts = np.cumsum([0] + [b.p for b in J.blocks])
    kron = [b.kronecker_ready and c > 1 for b in J.blocks]
    dense_cache: dict[int, Any] = {}

    def transformed(k: int) -> Any:
        if k not in dense_cache:
            dense_cache[k] = J.blocks[k].transformed_dense(factors)
        return dense_cache[k]

    for a, ba in enumerate(J.blocks):
        for b in range(a, len(J.blocks)):
            rows, cols = slice(starts[a], starts[a + 1]), slice(starts[b], starts[b + 1])
            if kron[a] and a == b:
                _kronecker_self(ba, curvature, F[rows, cols])
            elif kron[a] and kron[b]:
                _kronecker_pair(ba, J.blocks[b], curvature, F[rows, cols])
            else:
                F[rows, cols] = transformed(a).T @ transformed(b)
            if b > a:
                F[cols, rows] = F[rows, cols].T
    return F


def example_grams(J: JacobianBlocks, rows: slice) -> Any:
    """Per-example blocks J_i J_iᵀ (s, c, c) float64 for the examples in ``rows``."""
    xp, c = J.xp, J.n_outputs
    s = rows.stop - rows.start
    out = xp.zeros((s, c, c), dtype=np.float64)
    for b in J.blocks:
        b.add_example_grams(rows, out)
    return out
