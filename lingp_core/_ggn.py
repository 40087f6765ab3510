"""The dense generalized Gauss–Newton matrix Jᵀ Λ J from Jacobian blocks without forming J, and per-example
Gram blocks J_i J_iᵀ (used by the weight-space Laplace engine and its predictions)."""
from __future__ import annotations

from typing import Any

import numpy as np

from lingp_core import _validate as v
from lingp_core.jacobian import _WORK_ELEMENTS as WORK_ELEMENTS
from lingp_core.jacobian import JacobianBlocks
from lingp_core.jacobian import _chunks as chunks
from lingp_core.sharded import is_sharded

# ----- dense GGN and per-example Gram blocks ------------------------------------------------------------------------

def _kronecker_pair(b1: Any, b2: Any, curvature: Any, out: Any) -> None:
    """Write F_{12} = Σ_i (Δ_i1ᵀ Λ_i Δ_i2) ⊗ (a_i1 a_i2ᵀ) for two blocks with ``kronecker_ready`` (A (n, 1, m),
    Δ (n, c, 1, out)) into ``out`` (p1, p2), a view of F, in parameter order.

    One GEMM over examples of the flattened (out1·out2) and (m1·m2) outer products: n·p1·p2 flops instead of the
    n·c·p1·p2 of Gᵀ G. For a block with itself both outer products are symmetric, so only their upper triangles
    enter the GEMM (a quarter of the flops) and the result is unpacked. Each weight/bias part is then one strided copy
    into ``out`` (no gathers over p1·p2 indices).
    """
    xp = b1.xp
    same = b2 is b1
    o1, o2, m1, m2 = b1.out_features, b2.out_features, b1.A.shape[2], b2.A.shape[2]
    if same:
        upper_o, upper_m = np.triu_indices(o1), np.triu_indices(m1)
        width_o, width_m = upper_o[0].size, upper_m[0].size
    else:
        width_o, width_m = o1 * o2, m1 * m2
    acc = xp.zeros((width_o, width_m), dtype=np.float64)
    for rows in chunks(b1.n, WORK_ELEMENTS // (o1 * o2 + m1 * m2 + 1)):
        d1 = b1.delta[rows, :, 0, :].astype(np.float64)
        d2 = d1 if same else b2.delta[rows, :, 0, :].astype(np.float64)
        a1 = b1.A[rows, 0, :].astype(np.float64)
        a2 = a1 if same else b2.A[rows, 0, :].astype(np.float64)
        dd = d1.transpose(0, 2, 1) @ (curvature[rows] @ d2)  # (s, o1, o2)
        aa = a1[:, :, None] * a2[:, None, :]  # (s, m1, m2)
        s = rows.stop - rows.start
        if same:
            acc += dd[:, upper_o[0], upper_o[1]].T @ aa[:, upper_m[0], upper_m[1]]
        else:
            acc += dd.reshape(s, o1 * o2).T @ aa.reshape(s, m1 * m2)
    if same:  # the packed index of (k, l) and (l, k) is the same entry of the upper triangle
        acc = acc[xp.asarray(_packed_index(o1).ravel())][:, xp.asarray(_packed_index(m1).ravel())]
    layer = acc.reshape(o1, o2, m1, m2)  # [o1, o2, j1, j2]
    for row0, js1 in b1.parameter_segments():
        w1 = js1.stop - js1.start
        for col0, js2 in b2.parameter_segments():
            w2 = js2.stop - js2.start
            target = out[row0: row0 + o1 * w1, col0: col0 + o2 * w2].reshape(o1, w1, o2, w2)
            if not xp.may_share_memory(target, out):  # splitting axes of a view is a view; never write into a copy
                raise v.ShapeError(f"the Hessian block of shape {tuple(out.shape)} (strides {out.strides}) cannot be "
                                   f"viewed as {(o1, w1, o2, w2)} without a copy; pass a view of a C-contiguous F")
            target[...] = layer[:, :, js1, js2].transpose(0, 2, 1, 3)


def _packed_index(k: int) -> np.ndarray:
    """(k, k) symmetric map from (i, j) to the position of (min, max) in numpy's row-major upper-triangle order."""
    index = np.zeros((k, k), dtype=np.int64)
    rows, cols = np.triu_indices(k)
    index[rows, cols] = np.arange(rows.size)
    index[cols, rows] = np.arange(rows.size)
    return index


def dense_ggn(J: JacobianBlocks, factors: Any, memory_budget: Any) -> Any:
    """F = Jᵀ Λ J (p, p) float64, Λ_i = L_i L_iᵀ, assembled block pair by block pair.

    Pairs of factored Linear blocks with T = 1 (and c > 1) take the Kronecker route of :func:`_kronecker_pair`;
    other pairs use the dense transformed rows G_b = L_iᵀ J_b,i, F_{bb'} = G_bᵀ G_b'.
    """
    if is_sharded(J):
        return J.dense_ggn(factors, memory_budget)
    xp, p, c = J.xp, J.p, J.n_outputs
    widest = max(b.p for b in J.blocks)
    v.check_memory(v.nbytes_of((p, p), np.float64) + 2 * v.nbytes_of((J.n * c, widest), np.float64),
                   v.resolve_memory_budget(memory_budget, J.backend),
                   what=f"the dense p × p Hessian (p = {p}) of the weight-space Laplace approximation",
                   alternative="use method='function' when n·c is small, or export fewer parameters "
                               "(e.g. params='last_layer')")
    curvature = factors @ factors.transpose(0, 2, 1)
    F = xp.empty((p, p), dtype=np.float64)
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
            if kron[a] and kron[b]:
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
