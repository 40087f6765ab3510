#!/usr/bin/env python3
"""Kernel assembly benchmark: lingp.kernel on one dense Jacobian block against one raw J @ J.T on the same J.

For each (n·c, p) and dtype: wall time of the raw product and of lg.kernel (symmetric tiles: upper tiles only,
mirrored; accumulation in the block's dtype so both compute the same thing), their agreement, and the peak memory
each allocates beyond J (tracemalloc, which sees NumPy's allocations; not measured on CuPy). The memory target is
K plus one block tile. NumPy's matmul already recognises A @ A.T and calls BLAS syrk (half the flops), so the raw
product is also timed against a general GEMM (J @ copy(J.T)) to show what symmetry is worth.

Kernel- and Fisher-vector products on the paper's MLP are in benchmarks/bench_products.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import backends  # noqa: E402
import lingp_core as lg  # noqa: E402
from benchmarks._common import machine_info, pyplot, save_figure  # noqa: E402
from lingp_core.jacobian import DenseBlock, JacobianBlocks  # noqa: E402

DEFAULT_SIZES = [(4096, 32768), (8192, 32768), (4096, 131072)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"], help="array backend")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds: a smoke run")
    parser.add_argument("--sizes", nargs="+", help="NC,P pairs, e.g. 4096,32768 (default: %(default)s)",
                        default=[f"{nc},{p}" for nc, p in DEFAULT_SIZES])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_kernels",
                        help="output folder (JSON + PNG)")
    args = parser.parse_args(argv)
    args.sizes = [(512, 4096)] if args.quick else [tuple(int(x) for x in s.split(",")) for s in args.sizes]
    return args


def timed(fn, backend) -> tuple[object, float, int | None]:
    """Result, seconds, and peak bytes allocated during the call (NumPy only, via tracemalloc)."""
    track = backend.name == "numpy"
    backend.synchronize()
    if track:
        tracemalloc.start()
    start = time.perf_counter()
    out = fn()
    backend.synchronize()
    seconds = time.perf_counter() - start
    peak = None
    if track:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out, seconds, peak


def general_gemm(jac, backend) -> tuple[object, float, int | None]:
    """J @ (a contiguous copy of Jᵀ): the same product without the A @ A.T shortcut, so no syrk."""
    jac_t = backend.xp.ascontiguousarray(jac.T)
    return timed(lambda: jac @ jac_t, backend)


def bench_one(nc: int, p: int, dtype: str, backend) -> dict:
    xp = backend.xp
    jac = backend.asarray(np.random.default_rng(0).standard_normal((nc, p)).astype(dtype))
    blocks = JacobianBlocks(xp.zeros((nc, 1), dtype=dtype), [DenseBlock(["w"], [(p,)], jac, 1, xp)],
                            backend=backend, outputs=(0,))
    raw, t_raw, m_raw = timed(lambda: jac @ jac.T, backend)
    del raw
    gemm, t_gemm, _ = general_gemm(jac, backend)
    k, t_kernel, m_kernel = timed(lambda: lg.kernel(blocks, dtype=dtype), backend)
    rel = float(xp.abs(k - gemm).max() / xp.abs(gemm).max())
    k_bytes = nc * nc * np.dtype(dtype).itemsize
    tile_rows = min(lg.kernels._TILE_ROWS, nc)
    return {"nc": nc, "p": p, "dtype": dtype, "raw_JJt_s": t_raw, "general_gemm_s": t_gemm, "kernel_s": t_kernel,
            "speedup_vs_raw": t_raw / t_kernel, "speedup_vs_gemm": t_gemm / t_kernel, "max_rel_diff": rel,
            "K_bytes": k_bytes, "tile_bytes": tile_rows * tile_rows * np.dtype(dtype).itemsize,
            "block_tile_bytes": tile_rows * p * np.dtype(dtype).itemsize,
            "raw_peak_bytes": m_raw, "kernel_peak_bytes": m_kernel}


COLUMNS = [("nc", 6, "{nc}"), ("p", 7, "{p}"), ("dtype", 7, "{dtype}"), ("raw s", 8, "{raw_JJt_s:.3f}"),
           ("gemm s", 8, "{general_gemm_s:.3f}"), ("kernel s", 9, "{kernel_s:.3f}"),
           ("raw/kernel", 10, "{speedup_vs_raw:.2f}"), ("gemm/kernel", 11, "{speedup_vs_gemm:.2f}"),
           ("rel diff", 9, "{max_rel_diff:.1e}"), ("K MiB", 7, "{K_mib:.0f}"), ("peak MiB", 9, "{peak_mib}"),
           ("peak/K", 7, "{peak_over_k}")]


def print_row(row: dict) -> None:
    peak = row["kernel_peak_bytes"]
    fields = dict(row, K_mib=row["K_bytes"] / 2**20, peak_mib="-" if peak is None else f"{peak / 2**20:.0f}",
                  peak_over_k="-" if peak is None else f"{peak / row['K_bytes']:.2f}")
    print(" ".join(f"{fmt.format(**fields):>{w}}" for _, w, fmt in COLUMNS), flush=True)


def plot(rows: list[dict], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['nc']}×{r['p']}\n{r['dtype']}" for r in rows]
    x = np.arange(len(rows))
    for offset, key, label in [(-0.27, "raw_JJt_s", "J @ J.T (numpy: syrk)"), (0.0, "general_gemm_s", "general GEMM"),
                               (0.27, "kernel_s", "lg.kernel (symmetric tiles)")]:
        ax.bar(x + offset, [r[key] for r in rows], width=0.27, label=label)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set(ylabel="seconds", title="Assembling K = J Jᵀ from one dense block")
    save_figure(fig, path)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backend = backends.get_backend(args.backend)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"rows": [], "machine": machine_info(backend.name),
              "memory_method": "tracemalloc peak during the call (NumPy allocations), beyond the existing J"}
    print(" ".join(f"{name:>{w}}" for name, w, _ in COLUMNS))
    json_path = args.out / "bench_kernels.json"
    for nc, p in args.sizes:
        for dtype in args.dtypes:
            result["rows"].append(bench_one(nc, p, dtype, backend))
            print_row(result["rows"][-1])
            json_path.write_text(json.dumps(result, indent=2))
    print(f"wrote {json_path}")
    if plot(result["rows"], args.out / "bench_kernels.png"):
        print(f"wrote {args.out / 'bench_kernels.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
