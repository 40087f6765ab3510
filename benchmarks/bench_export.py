"""Factored Jacobian export + kernel vs the torch.func full Jacobian vs one autograd kernel-vector product.

The paper's speed-test network (ELU MLP 5-200-2000-200-1, p = 803,601) at growing n. Paths, each measured in a fresh
subprocess so that peak memory is its own:

  factored     lingp.export_jacobian (factored Linear blocks) + J Jᵀ           (a)
  torchfunc    torch.func vmap(jacrev) full Jacobian (n × p) + J Jᵀ in torch    (b)  (only where it fits in memory)
  autograd_kvp one kernel-vector product J (Jᵀ v) by torch.func vjp + jvp       (c)

Peak memory on the host is the process's peak resident set size (``ru_maxrss``: it sees torch's and NumPy's
allocations alike, unlike tracemalloc), reported in full and above the resident size just before the measured call
(after imports, model, inputs and a small warm-up run). On CUDA it is torch's peak allocated bytes plus the bytes held
by CuPy's memory pool. Times are wall-clock (best of --repeats), with device synchronization.

Usage: python benchmarks/bench_export.py [--backend numpy|cupy] [--quick] [--out DIR] [--sizes N [N ...]]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import PAPER_WIDTHS, command_line, machine_info, paper_mlp, pyplot  # noqa: E402

PATHS = ("factored", "torchfunc", "autograd_kvp")
FULL_SIZES = (1000, 2000, 5000, 10000)
QUICK_SIZES = (100,)
WIDTHS = PAPER_WIDTHS
TARGET_SPEEDUP, TARGET_MEMORY_RATIO, TARGET_N = 30.0, 0.1, 1000
# torch.func's full Jacobian holds J (n·p) plus about as much again in vmap/jacrev temporaries, plus the kernel
TORCHFUNC_OVERHEAD = 2.2


# ----- worker: one path at one size, in its own process --------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _run_factored(model, x, backend):
    from lingp_core.export import export_jacobian

    J = export_jacobian(model, x, backend=backend.name)
    backend.synchronize()
    export_done = time.perf_counter()
    K = J.gram()
    backend.synchronize()
    return K, {"export_done": export_done}


def _run_torchfunc(model, x, backend):
    import torch
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

    with torch.no_grad():
        jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)  # {name: (n, c, *shape)}
        J = torch.cat([j.reshape(x.shape[0], -1) for j in jac.values()], dim=1)
        del jac
        K = J @ J.T
    if x.is_cuda:
        torch.cuda.synchronize()
    return backend.asarray(K), {}


def _run_autograd_kvp(model, x, backend, op=None):
    import numpy as np

    from lingp_core.autograd_operator import AutogradJacobian

    op = op or AutogradJacobian(model, x, backend=backend.name)
    v = backend.asarray(np.random.default_rng(0).standard_normal(op.shape[0]).astype(op.dtype))
    backend.synchronize()
    start = time.perf_counter()
    kv = op.gram_matmat(v)
    backend.synchronize()
    return kv, {"start": start}


def worker(path: str, n: int, backend_name: str, repeats: int, kernel_file: str | None) -> dict:
    """Measure one path at one size; return times and peak memory as a dict (printed as JSON by the caller)."""
    import numpy as np
    import torch

    import backends

    backend = backends.get_backend(backend_name)
    device = "cpu" if backend.name == "numpy" else "cuda"
    model, x = paper_mlp(n, device, WIDTHS)
    run = {"factored": _run_factored, "torchfunc": _run_torchfunc, "autograd_kvp": _run_autograd_kvp}[path]
    op = None
    if path == "autograd_kvp":  # the operator itself (inputs + f0) is set-up, not the product
        from lingp_core.autograd_operator import AutogradJacobian

        op = AutogradJacobian(model, x, backend=backend.name)
        run = lambda model, x, backend: _run_autograd_kvp(model, x, backend, op)  # noqa: E731
    warm_model, warm_x = paper_mlp(min(n, 16), device, WIDTHS)
    (_run_autograd_kvp(warm_model, warm_x, backend) if path == "autograd_kvp" else run(warm_model, warm_x, backend))
    if device == "cuda":
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = _rss_bytes()
    times, extra = [], {}
    result = None
    for _ in range(repeats):
        result = None
        start = time.perf_counter()
        result, marks = run(model, x, backend)
        stop = time.perf_counter()
        times.append(stop - marks.get("start", start))
        if "export_done" in marks:
            extra.setdefault("export_s", []).append(marks["export_done"] - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"path": path, "n": n, "time_s": min(times), "times_s": times, "peak_rss_bytes": peak,
           "baseline_rss_bytes": baseline, "peak_above_baseline_bytes": max(0, peak - baseline),
           "torch_threads": torch.get_num_threads()}
    if "export_s" in extra:
        out["export_s"] = min(extra["export_s"])
        out["gram_s"] = out["time_s"] - out["export_s"]
    if device == "cuda":
        import cupy

        pool = cupy.get_default_memory_pool()
        out["peak_device_bytes"] = int(torch.cuda.max_memory_allocated()) + int(pool.total_bytes())
    if kernel_file and path != "autograd_kvp":
        np.save(kernel_file, backend.to_numpy(result))
    return out


# ----- driver --------------------------------------------------------------------------------------------------------

def _free_bytes(backend_name: str) -> int:
    import backends

    return backends.get_backend(backend_name).free_memory().arrays


def _fits_torchfunc(n: int, backend_name: str) -> tuple[bool, str]:
    p = sum(a * b + b for a, b in zip(WIDTHS[:-1], WIDTHS[1:]))
    need = int(TORCHFUNC_OVERHEAD * n * p * 4 + n * n * 4)
    free = _free_bytes(backend_name)
    if need > 0.8 * free:
        return False, f"skipped: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return True, ""


def _spawn(path: str, n: int, args: argparse.Namespace, kernel_file: str | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", path, "--n", str(n), "--backend", args.backend,
           "--repeats", str(1 if path == "torchfunc" else args.repeats)]
    if kernel_file:
        cmd += ["--kernel-file", kernel_file]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=args.timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"path": path, "n": n, "status": f"failed (exit {proc.returncode}): {' | '.join(tail)}"}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["status"] = "ok"
    return row


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def _table(rows: list[dict], device: bool) -> str:
    head = (f"{'n':>6} {'path':<13} {'time [s]':>9} {'vs (b)':>8} {'peak RSS [MiB]':>15} {'above base [MiB]':>17}"
            + (f" {'device peak [MiB]':>18}" if device else "") + "  status")
    lines = [head, "-" * len(head)]
    base = {r["n"]: r for r in rows if r["path"] == "torchfunc" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['n']:>6} {r['path']:<13} {'-':>9} {'-':>8} {'-':>15} {'-':>17}"
                         + (f" {'-':>18}" if device else "") + f"  {r['status']}")
            continue
        b = base.get(r["n"])
        speed = f"{b['time_s'] / r['time_s']:.1f}x" if b else "-"
        lines.append(f"{r['n']:>6} {r['path']:<13} {r['time_s']:>9.3f} {speed:>8} {_mib(r['peak_rss_bytes']):>15} "
                     f"{_mib(r['peak_above_baseline_bytes']):>17}"
                     + (f" {_mib(r.get('peak_device_bytes')):>18}" if device else "") + "  ok")
    return "\n".join(lines)


def _ratios(rows: list[dict], device: bool) -> list[dict]:
    mem_key = "peak_device_bytes" if device else "peak_above_baseline_bytes"
    ok = {(r["path"], r["n"]): r for r in rows if r["status"] == "ok"}
    ratios = []
    for n in sorted({r["n"] for r in rows}):
        a, b, c = ok.get(("factored", n)), ok.get(("torchfunc", n)), ok.get(("autograd_kvp", n))
        entry: dict = {"n": n}
        if a and b:
            entry["speedup_factored_vs_torchfunc"] = b["time_s"] / a["time_s"]
            entry["memory_ratio_factored_over_torchfunc"] = a[mem_key] / max(1, b[mem_key])
        if a and c:
            entry["factored_kernel_time_in_kvps"] = a["time_s"] / c["time_s"]
        ratios.append(entry)
    return ratios


def _plot(rows: list[dict], out: Path, backend: str) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"factored": "(a) factored export + J Jᵀ", "torchfunc": "(b) torch.func full J + J Jᵀ",
              "autograd_kvp": "(c) one autograd K v"}
    for path in PATHS:
        pts = sorted((r["n"], r["time_s"]) for r in rows if r["path"] == path and r["status"] == "ok")
        if pts:
            ax.plot(*zip(*pts), marker="o", label=labels[path])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n (examples)")
    ax.set_ylabel("wall time [s]")
    ax.set_title(f"ELU 5-200-2000-200-1 (p = 803,601), backend {backend}")
    ax.legend()
    fig.tight_layout()
    path = out / f"bench_export_{backend}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("numpy", "cupy"), default="numpy", help="array backend (default numpy)")
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes {QUICK_SIZES}, seconds (smoke tests)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where JSON and PNG go")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"n values (default {FULL_SIZES})")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per fast path; the best counts")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per measured subprocess")
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kernel-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.backend, args.repeats, args.kernel_file)))
        return 0

    import numpy as np

    sizes = tuple(args.sizes) if args.sizes else (QUICK_SIZES if args.quick else FULL_SIZES)
    if args.quick:
        args.repeats = 1
    args.out.mkdir(parents=True, exist_ok=True)
    device = args.backend == "cupy"
    rows, agreement = [], None
    for n in sorted(sizes):
        compare = agreement is None
        kernels = {}
        for path in PATHS:
            kernel_file = str(args.out / f".kernel_{path}_{n}.npy") if compare and path != "autograd_kvp" else None
            if path == "torchfunc":
                fits, why = _fits_torchfunc(n, args.backend)
                if not fits:
                    rows.append({"path": path, "n": n, "status": why})
                    print(f"n={n:>6} {path:<13} {why}", flush=True)
                    continue
            row = _spawn(path, n, args, kernel_file)
            rows.append(row)
            print(f"n={n:>6} {path:<13} " + (f"{row['time_s']:.3f} s" if row["status"] == "ok" else row["status"]),
                  flush=True)
            if kernel_file and row["status"] == "ok":
                kernels[path] = kernel_file
        if len(kernels) == 2:
            ka, kb = (np.load(kernels[p]).astype(np.float64) for p in ("factored", "torchfunc"))
            agreement = {"n": n, "max_abs_diff_over_max_abs": float(np.abs(ka - kb).max() / np.abs(kb).max())}
        for f in kernels.values():
            os.remove(f)
    ratios = _ratios(rows, device)
    at_target = next((r for r in ratios if r["n"] == TARGET_N and "speedup_factored_vs_torchfunc" in r), None)
    targets = {"n": TARGET_N, "speedup_min": TARGET_SPEEDUP, "memory_ratio_max": TARGET_MEMORY_RATIO}
    if at_target:
        targets["speedup"] = at_target["speedup_factored_vs_torchfunc"]
        targets["memory_ratio"] = at_target["memory_ratio_factored_over_torchfunc"]
        targets["met"] = bool(targets["speedup"] >= TARGET_SPEEDUP and targets["memory_ratio"] <= TARGET_MEMORY_RATIO)
    memory_method = ("device: torch.cuda.max_memory_allocated + CuPy pool bytes; host: peak RSS (ru_maxrss)" if device
                     else "peak RSS of a fresh subprocess per path (ru_maxrss); 'above base' subtracts the RSS just "
                          "before the measured call")
    p = sum(a * b + b for a, b in zip(WIDTHS[:-1], WIDTHS[1:]))
    report = {"benchmark": "bench_export", "backend": args.backend, "quick": args.quick, "dtype": "float32",
              "model": {"widths": list(WIDTHS), "activation": "ELU", "p": p}, "memory_method": memory_method,
              "machine": machine_info(args.backend), "rows": rows, "ratios": ratios, "targets": targets,
              "kernel_agreement": agreement, "command": command_line(__file__, argv)}
    json_path = args.out / f"bench_export_{args.backend}{'_quick' if args.quick else ''}.json"
    report["plot"] = _plot(rows, args.out, args.backend + ("_quick" if args.quick else ""))
    json_path.write_text(json.dumps(report, indent=2))
    print()
    print(f"ELU {'-'.join(map(str, WIDTHS))} MLP, p = {p:,}, float32, backend {args.backend}; memory: {memory_method}")
    print(_table(rows, device))
    for r in ratios:
        parts = [f"n={r['n']}"]
        if "speedup_factored_vs_torchfunc" in r:
            parts.append(f"(a) is {r['speedup_factored_vs_torchfunc']:.1f}x faster than (b), peak memory (a)/(b) = "
                         f"{r['memory_ratio_factored_over_torchfunc']:.3f}")
        if "factored_kernel_time_in_kvps" in r:
            parts.append(f"(a) costs {r['factored_kernel_time_in_kvps']:.1f} autograd K v products")
        print("  " + "; ".join(parts))
    if agreement:
        print(f"  kernels (a) vs (b) at n={agreement['n']}: "
              f"max|ΔK|/max|K| = {agreement['max_abs_diff_over_max_abs']:.2e}")
    if "met" in targets:
        print(f"  targets at n={TARGET_N}: speedup ≥ {TARGET_SPEEDUP:.0f}x and memory ratio ≤ {TARGET_MEMORY_RATIO}: "
              f"{'met' if targets['met'] else 'NOT met'}")
    print(f"wrote {json_path}" + (f" and {report['plot']}" if report["plot"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
