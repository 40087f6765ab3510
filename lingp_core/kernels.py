"""The finite NTK K = s · J J'ᵀ assembled from Jacobian blocks, its diagonal, and a matrix-free kernel operator.

Output modes (c = outputs per example; rows example-major, row i·c + k is example i, output k):

- ``"full"``: the (n·c, n'·c) kernel with its cross-output blocks;
- ``"independent"``: (c, n, n'), one kernel per output, K_k = s · J_k J'_kᵀ (J_k: the rows of output k), as the
  paper's code builds it;
- ``"trace"``: (n, n'), the mean over outputs of the independent kernels;
- an int k: (n, n'), the kernel of output k alone.

Assembly streams over parameter blocks (factored Linear blocks through (A Aᵀ)∘(Δ Δᵀ), dense blocks through GEMMs) and,
for a symmetric K(X, X), over example tiles of the upper triangle only, mirrored at the end. Each tile is computed in
the accumulation dtype (float64 by default: a float32 Jacobian still gives a float64 kernel) and accumulated straight
into K, so the work space beyond K is J2's blocks in that dtype and one chunk of products.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from backends._triangles import fill_lower
from lingp_core import _validate as v
from lingp_core._precision import float_dtype
from lingp_core._progress import progress_bar
from lingp_core._validate import SignatureShapeError
from lingp_core.jacobian import JacobianBlocks, product_work
from lingp_core.operators import LinearOperator
from lingp_core.sharded import ShardedJacobian, is_sharded

OUTPUT_MODES = ("full", "independent", "trace")
# rows of K per tile: GEMMs of 1024 × 1024 × d still run near peak, and for a symmetric K the upper tiles are less of
# the full product (55% at n = 10⁴, 68% with 4096-row tiles); the work space stays one tile (8 MiB at float64)
_TILE_ROWS = 1024


def _check_mode(output_mode: Any, c: int) -> Any:
    """A valid output mode: one of OUTPUT_MODES, or an int output index in [0, c)."""
    if isinstance(output_mode, str):
        return v.check_choice(output_mode, "output_mode", OUTPUT_MODES)
    return v.check_int(output_mode, "output_mode (an output index)", minimum=0, maximum=c - 1)


def _check_jacobians(J1: Any, J2: Any) -> JacobianBlocks:
    if is_sharded(J1) or is_sharded(J2):
        raise v.MissingCapabilityError("this kernel operation needs the Jacobian in memory; for a ShardedJacobian use "
                                       "kernel(J), kernel_diag(J), LinearizedGP(method='iterative') or J.gather()")
    if not isinstance(J1, JacobianBlocks):
        raise v.ArgumentTypeError(f"J1 must be a JacobianBlocks from export_jacobian, got {type(J1).__name__}")
    if J2 is None:
        return J1
    if not isinstance(J2, JacobianBlocks):
        raise v.ArgumentTypeError(f"J2 must be a JacobianBlocks from export_jacobian, got {type(J2).__name__}")
    J1.check_compatible(J2)
    if J1.outputs != J2.outputs:
        raise SignatureShapeError(f"J1 holds model outputs {J1.outputs} but J2 holds {J2.outputs}; export both with "
                                  "the same outputs=...")
    return J2


def check_scale(value: float, name: str, dtype: Any, *, allow_zero: bool = False, divisor: int = 1) -> None:
    """ValueRangeError unless ``value / divisor`` (a checked prior scale, noise or damping) is a normal number of
    ``dtype``: cast to float32, 1e-50 silently became 0 and 1e50 Inf. ``divisor``: the c outputs of the "trace" mode,
    whose mean divides s."""
    note = f" (÷ {divisor} outputs in output_mode 'trace')" if divisor != 1 else ""
    v.check_normal(value / divisor, dtype, lambda _: f"{name} = {value:.3g}{note}", allow_zero=allow_zero,
                   hint="compute in float64 (dtype='float64', or a Jacobian exported with dtype='float64'), or use a "
                        "value in that range")


def _view(J: JacobianBlocks, examples: slice, output: int | None, dtype: np.dtype) -> list:
    """The blocks of J restricted to some examples (and to one output), as arrays of ``dtype`` (views if possible)."""
    return [b.select(examples, output, dtype) for b in J.blocks]


def _tiles(n: int, rows_per_example: int) -> list[slice]:
    """Example ranges whose kernel rows number about _TILE_ROWS."""
    size = max(1, _TILE_ROWS // rows_per_example)
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _tile_pairs(n1: int, n2: int, rows: int, symmetric: bool) -> int:
    """How many tile pairs _assemble computes (a progress bar's total)."""
    t1, t2 = len(_tiles(n1, rows)), len(_tiles(n2, rows))
    return t1 * (t1 + 1) // 2 if symmetric else t1 * t2


def _assemble(J1: JacobianBlocks, J2: JacobianBlocks, output: int | None, out: Any, dtype: np.dtype,
              bar: Any) -> None:
    """Add J1 J2ᵀ (one output's rows, or all) into ``out`` tile by tile; for J2 is J1, the upper tiles only (the
    caller mirrors them once all outputs are in)."""
    rows = 1 if output is not None else J1.n_outputs
    symmetric = J2 is J1
    tiles1, tiles2 = _tiles(J1.n, rows), _tiles(J2.n, rows)
    # J2's tiles in the accumulation dtype, converted once and kept when several left tiles use them (a float32 →
    # float64 copy of every right-hand tile per pair cost as much as a third of the GEMMs at n = 10⁴); with one left
    # tile (a cross-kernel with a few test rows) each is converted when used and then dropped
    reused = symmetric or len(tiles1) > 1
    right_tiles = [_view(J2, tb, output, dtype) for tb in tiles2] if reused else []
    for a, ta in enumerate(tiles1):
        left = right_tiles[a] if symmetric else _view(J1, ta, output, dtype)
        for b, tb in enumerate(tiles2):
            if symmetric and b < a:
                continue
            right = right_tiles[b] if reused else _view(J2, tb, output, dtype)
            # add_gram accumulates straight into this (strided) view of out: no tile buffer, no copy-back pass
            block = out[ta.start * rows: ta.stop * rows, tb.start * rows: tb.stop * rows]
            for lb, rb in zip(left, right):
                lb.add_gram(rb, block)
            bar.update(1)


def kernel(J1: JacobianBlocks, J2: JacobianBlocks | None = None, *, prior_scale: float = 1.0,
           output_mode: str | int = "full", dtype: Any = np.float64, memory_budget: float | None = None,
           progress: bool = False) -> Any:
    """The Jacobian kernel K(X1, X2) = s · J1 J2ᵀ, assembled from Jacobian blocks.

    Parameters
    ----------
    J1 : JacobianBlocks
        Jacobian at X1 (n1 examples, c outputs), from :func:`export_jacobian`.
    J2 : JacobianBlocks, optional
        Jacobian at X2 (n2 examples) with the same parameters, outputs, dtype and backend; default J1 (then K is
        symmetric and only its upper tiles are computed).
    prior_scale : float
        s > 0, the prior variance of θ − θ̂.
    output_mode : {"full", "independent", "trace"} or int
        See the module docstring. Shapes: (n1·c, n2·c), (c, n1, n2), (n1, n2), (n1, n2).
    dtype : float32 or float64
        Accumulation and result dtype (default float64, whatever the blocks' dtype): a NumPy dtype, its name, or
        torch.float32 / torch.float64. Other dtypes raise DTypeError.
    memory_budget : float, optional
        Bytes allowed for K plus its work space (default: half the free memory where the backend allocates).
    progress : bool
        Show a tqdm progress bar over the tiles of K (1,024 rows a side).

    Returns
    -------
    array on J1's backend, of ``dtype``.
    """
    sharded = is_sharded(J1) or is_sharded(J2)
    if sharded:
        for J in (J1, J2):
            if J is not None and not isinstance(J, (JacobianBlocks, ShardedJacobian)):
                raise v.ArgumentTypeError(f"J1 and J2 must be Jacobians from export_jacobian, got {type(J).__name__}")
    else:
        other = _check_jacobians(J1, J2)
    s = v.check_positive(prior_scale, "prior_scale")
    mode = _check_mode(output_mode, J1.n_outputs)
    dtype = float_dtype(dtype, "dtype")
    # in memory, "trace" sums the outputs' kernels and scales once by s / c; the shards average, then scale by s
    check_scale(s, "prior_scale", dtype, divisor=J1.n_outputs if mode == "trace" and not sharded else 1)
    if sharded:
        return _sharded_kernel(J1, J2, s, mode, dtype, memory_budget)
    c, n1, n2 = J1.n_outputs, J1.n, other.n
    shape = {"full": (n1 * c, n2 * c), "independent": (c, n1, n2)}.get(mode, (n1, n2)) if isinstance(mode, str) \
        else (n1, n2)
    work = work_bytes(J1, n2, dtype, symmetric=other is J1)
    v.check_memory(v.nbytes_of(shape, dtype) + work, v.resolve_memory_budget(memory_budget, J1.backend),
                   what=f"the kernel of shape {shape} ({dtype})",
                   alternative="use KernelOperator for matrix-free products, or output_mode='trace' / a single output")
    xp = J1.backend.xp
    rows = c if mode == "full" else 1
    passes = c if mode in ("independent", "trace") else 1
    total = passes * _tile_pairs(n1, n2, rows, other is J1)
    # overflow is checked once on the result (_scale_kernel), with a message in the user's terms
    with progress_bar(total, enabled=bool(progress), desc="kernel", unit="tile") as bar, \
            np.errstate(over="ignore", invalid="ignore"):
        result = xp.zeros(shape, dtype=dtype)
        if mode == "full":
            _assemble(J1, other, None, result, dtype, bar)
        elif mode == "independent":
            for k in range(c):
                _assemble(J1, other, k, result[k], dtype, bar)
        elif mode == "trace":
            for k in range(c):
                _assemble(J1, other, k, result, dtype, bar)
        else:
            _assemble(J1, other, mode, result, dtype, bar)
    if other is J1:  # the strict lower triangle ← the upper one's transpose: K exactly symmetric
        for square in (result if mode == "independent" else [result]):
            fill_lower(square, square, 1.0, xp)
    _scale_kernel(result, s, c if mode == "trace" else 1, J1, other)
    return result


def _sharded_kernel(J1: Any, J2: Any, s: float, mode: Any, dtype: np.dtype, memory_budget: Any) -> Any:
    """kernel() with a ShardedJacobian (arguments checked by kernel): K(X, X) as a dask array of tiles (the upper
    ones computed, where the shards live; "independent": one per output, stacked), or K between a sharded and an
    in-memory Jacobian as an in-memory array (the shards' columns computed where they live)."""
    if J2 is None or J2 is J1:
        if mode == "independent":
            import dask.array as da
            return da.stack([J1.select(output=k).kernel_array("full", dtype, s) for k in range(J1.n_outputs)])
        return J1.kernel_array(mode, dtype, s)
    if is_sharded(J1) and is_sharded(J2):
        raise v.MissingCapabilityError("kernel() between two sharded Jacobians is not supported: export the smaller "
                                       "set of inputs in memory (a NumPy/torch array)")
    sharded, local = (J1, J2) if is_sharded(J1) else (J2, J1)
    local.check_signature(sharded.signature(), what="the sharded Jacobian")
    if local.backend != sharded.backend:
        raise v.BackendMismatchError(f"the in-memory Jacobian lives on {local.backend.name!r} but the sharded one on "
                                     f"{sharded.backend.name!r}")
    K = sharded.cross_kernel(local, mode, dtype, memory_budget)
    # the shards' parts were products of finite blocks too: an overflow is reported with the local blocks' sizes
    _scale_kernel(K, s, 1, local, local)  # "trace": cross_kernel returns the outputs' mean already
    if local is J2:  # the sharded rows first
        K = K.transpose(0, 2, 1).copy() if mode == "independent" else K.T.copy()
    return K


def work_bytes(J1: JacobianBlocks, n2: int, dtype: Any, *, symmetric: bool) -> int:
    """Bytes :func:`kernel` needs beside K (n1·c × n2·c, any mode): a tile of J's blocks in the accumulation dtype
    (two when converted), one chunk of tile products, and, when J's dtype differs and right tiles are reused, J2's
    blocks converted once."""
    dtype = float_dtype(dtype, "dtype")
    c, n1 = J1.n_outputs, J1.n
    tile_rows = min(_TILE_ROWS, max(n1, n2) * c)
    chunk = product_work(min(_TILE_ROWS, n1 * c), min(_TILE_ROWS, n2 * c), J1.blocks)
    work = 2 * tile_rows * max(b.stored_per_row for b in J1.blocks) + 2 * chunk
    if J1.dtype != dtype and (symmetric or n1 * c > _TILE_ROWS):  # J2's blocks kept converted (_assemble)
        work += n2 * c * sum(b.stored_per_row for b in J1.blocks)
    return work * dtype.itemsize


def _largest_magnitude(values: Any) -> float:
    """max |values| by two reductions (no temporary n × n array); NaN when any entry is NaN, Inf when any is ±Inf."""
    if values.size == 0:
        return 0.0
    high, low = float(values.max()), float(values.min())  # both NaN when any entry is
    return high if high >= -low else -low


def _scale_kernel(values: Any, s: float, divisor: int, J1: JacobianBlocks, J2: JacobianBlocks) -> None:
    """values (the unscaled J J'ᵀ, summed over ``divisor`` outputs) *= s / divisor in place, after checking the
    result fits its dtype: an error in the user's terms (the Jacobians' size, or prior_scale) instead of Inf or 0."""
    largest = _largest_magnitude(values)
    dtype = np.dtype(values.dtype)
    if not np.isfinite(largest):  # the unscaled products already overflowed: prior_scale is not the cause
        entries = max(float(J1.xp.max(J1.xp.abs(a))) for J in (J1, J2) for b in J.blocks
                      for a in b.to_arrays()[0].values() if a.size)
        raise v.NonFiniteError(f"the kernel s·J J'ᵀ overflows {dtype} (NaN/Inf) although the Jacobians are finite: "
                               f"their stored entries reach {entries:.3g}, whose products J J'ᵀ do not fit whatever "
                               "prior_scale; the exported Jacobian is far too large — rescale the network's inputs or "
                               "outputs"
                               + (", or use dtype=float64" if dtype == np.float32 else ""))
    factor, info = s / divisor, np.finfo(dtype)
    reach = f"prior_scale = {s:.3g} times the unscaled kernel J J'ᵀ, whose entries reach {largest / divisor:.3g},"
    wider = ", or dtype=float64" if dtype == np.float32 else ""
    if largest * factor > float(info.max) * (1 - 4 * float(info.eps)):  # margin: the rounding of s in dtype
        raise v.NonFiniteError(f"{reach} overflows {dtype} (largest {info.max:.3g}); use a prior_scale below "
                               f"{float(info.max) / largest * divisor / 2:.3g}{wider}")
    if 0 < largest * factor < info.tiny:  # every entry subnormal or 0: the kernel's digits are gone
        raise v.ValueRangeError(f"{reach} underflows {dtype} (smallest normal {info.tiny:.3g}): every entry would "
                                f"be subnormal or 0; use a prior_scale above "
                                f"{float(info.tiny) / largest * divisor * 2:.3g}{wider}")
    if factor != 1.0:
        values *= dtype.type(factor)


def kernel_diag(J: JacobianBlocks, *, prior_scale: float = 1.0, output_mode: str | int = "full",
                dtype: Any = np.float64) -> Any:
    """The diagonal of K(X, X) = s · J Jᵀ without forming K.

    Shapes by output mode: "full" (n·c,), "independent" (c, n), "trace" (n,), int (n,); ``dtype`` as in
    :func:`kernel`.
    """
    if not is_sharded(J):
        _check_jacobians(J, None)
    s = v.check_positive(prior_scale, "prior_scale")
    mode = _check_mode(output_mode, J.n_outputs)
    dtype = float_dtype(dtype, "dtype")
    check_scale(s, "prior_scale", dtype)
    if is_sharded(J):  # each shard checks its own part for overflow
        with np.errstate(over="ignore", invalid="ignore"):
            return J.kernel_diag(mode, dtype) * dtype.type(s)
    diag = J.xp.zeros(J.n * J.n_outputs, dtype=dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        for b in _view(J, slice(0, J.n), None, dtype):
            diag += b.gram_diagonal()
    _scale_kernel(diag, s, 1, J, J)
    per_output = diag.reshape(J.n, J.n_outputs)
    if mode == "full":
        return per_output.reshape(-1)
    if mode == "independent":
        return per_output.T.copy()
    if mode == "trace":
        return per_output.mean(axis=1)
    return per_output[:, mode].copy()


class KernelOperator(LinearOperator):
    """K = s · J Jᵀ (+ noise·I) as a matrix-free operator: K V = s · J (Jᵀ V) through the blocks, multi-column.

    Parameters
    ----------
    J : JacobianBlocks
    prior_scale : float
        s > 0.
    output_mode : {"full", "trace"} or int
        "full": (n·c, n·c); "trace": (n, n), the mean over outputs; an int k: (n, n) for output k.
    noise : float, optional
        σ² ≥ 0 added to the diagonal (default 0).
    """

    def __init__(self, J: JacobianBlocks, *, prior_scale: float = 1.0, output_mode: str | int = "full",
                 noise: float = 0.0):
        _check_jacobians(J, None)
        self.J = J
        self.prior_scale = v.check_positive(prior_scale, "prior_scale")
        self.noise = v.check_positive(noise, "noise", allow_zero=True)
        if output_mode == "independent":
            raise v.InvalidOptionError("KernelOperator has no 'independent' mode: make one operator per output "
                             "(output_mode=k for k in range(c))")
        self.output_mode = _check_mode(output_mode, J.n_outputs)
        # both are cast to J's dtype in every product
        check_scale(self.prior_scale, "prior_scale", J.dtype, divisor=J.n_outputs if self.output_mode == "trace" else 1)
        check_scale(self.noise, "noise", J.dtype, allow_zero=True)
        rows = J.n * J.n_outputs if self.output_mode == "full" else J.n
        self.shape, self.dtype, self.backend = (rows, rows), J.dtype, J.backend
        c = J.n_outputs
        if self.output_mode == "full":
            self._views, self._weight = [list(J.blocks)], 1.0
        else:
            outputs = range(c) if self.output_mode == "trace" else [self.output_mode]
            self._views = [_view(J, slice(0, J.n), k, J.dtype) for k in outputs]
            self._weight = 1.0 / len(self._views)

    def _matmat(self, x: Any) -> Any:
        out = self.backend.xp.zeros_like(x)
        for blocks in self._views:
            for b in blocks:
                out += b.matmat(b.rmatmat(x))
        scale = self.dtype.type(self.prior_scale * self._weight)
        return out * scale + self.dtype.type(self.noise) * x

    def diagonal(self) -> Any:
        mode = self.output_mode
        d = kernel_diag(self.J, prior_scale=self.prior_scale, output_mode=mode, dtype=self.dtype)
        return d + self.dtype.type(self.noise)
