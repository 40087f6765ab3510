"""Dask scale-out: LinearizedGP(method="iterative") on a Jacobian sharded over Dask workers against the same model on
an in-memory export in one process.

Network: the paper's ELU MLP 5-200-2000-200-1 (p = 803,601, seeded; --quick: 5-32-64-32-1), in float64 (the iterative
engine computes in float64 anyway: a float32 export would be copied to float64 inside the fit, on the cluster inside
its first round), n training inputs, targets y = sin(x₁) + x₂²/4 + 0.1·ε, 50 test inputs whose Jacobian is exported
once in this process and shared by every configuration; prior scale and noise as bench_posterior.py. Configurations:

  single process   export_jacobian(model, x) in this process, then fit and predict(return_var=True)
  dask, W workers  a LocalCluster of W worker processes with one thread each (--backend cupy: dask_cuda's
                   LocalCUDACluster, one GPU per worker), x and y as dask arrays of W row chunks, so one shard per
                   worker; export_jacobian(model, x_dask) keeps each shard on its worker, then the same fit and predict

Reported per configuration: export, fit and predict times; CG iterations; the rounds of shard tasks of the fit (and of
the predict) from J.timings, each round's wall time split into products (the slowest shard's own work), reduction (the
sums of p-vectors) and scheduling + transfer (the rest); the largest difference of the posterior mean and variance
from the single-process answer (relative to the largest single-process value). Also: the plain Dask round trip (one
trivial task per worker, submitted and gathered; the median of --latency-reps), the bytes of one reduction (p·k
float64), and a probe at --probe-n (default 2·10⁴, the issue's size): --probe-rounds kernel products s·K v + σ²v
alone, in-process and on the shards, with the same split. Every process runs --threads BLAS/OpenMP/torch threads
(default 1; the workers inherit the environment).

A full fit and predict at n = 2·10⁴ does not fit in minutes on a 2-core CPU: one kernel product costs ~2 s there, a fit
~170 of them (100 for the pivoted-Cholesky preconditioner, the rest CG), and the variances at 50 test points CG with 50
right-hand sides, i.e. thousands more. So the full fit runs at --n (default 800) and the probe measures the rounds at
2·10⁴; the JSON has the per-example compute and the reduction bytes to extrapolate from.

The shards' placement is reported after the export and after fit and predict (one per worker is the intent). Two
options change the cluster from Dask's defaults, to measure what they cost: --register-sizeof (Dask otherwise counts a
shard as ~56 bytes, so its scheduler may move shards or run a shard's task elsewhere) and --unset-malloc-trim (Dask
starts workers with MALLOC_TRIM_THRESHOLD_=65536, which makes every large temporary a fresh mmap).

Usage: python benchmarks/bench_dask.py [--backend numpy|cupy] [--quick] [--n N] [--workers W ...] [--probe-n N]
       [--out DIR]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import (  # noqa: E402
    PAPER_WIDTHS,
    command_line,
    machine_info,
    markdown_table,
    paper_mlp,
    pyplot,
    save_figure,
    save_results,
    set_torch_threads,
)
from benchmarks.bench_posterior import N_TEST, NOISE, PRIOR_SCALE, QUICK_WIDTHS, targets  # noqa: E402

FULL_N, QUICK_N = 800, 40
FULL_PROBE_N, QUICK_PROBE_N = 20000, 64
#: --backend cupy: the issue's bound on the one-GPU cluster's time over the plain CuPy path's (fit + predict)
GPU_OVERHEAD_TARGET = 0.20
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: Dask starts its workers with MALLOC_TRIM_THRESHOLD_=65536 (distributed.nanny.pre-spawn-environ); setting it turns off
#: glibc's adaptive mmap threshold, so every temporary over 128 KiB is a fresh mmap whose pages fault in again
MALLOC_VARIABLE = "MALLOC_TRIM_THRESHOLD_"


# ----- set-up -----------------------------------------------------------------------------------------------------

def network(n: int, widths: tuple[int, ...], seed: int, device: str):
    """The seeded MLP in float64 and its n seeded float64 inputs (as bench_posterior's, cast), on ``device``."""
    model, x = paper_mlp(n, device, widths, seed=seed)
    return model.double(), x.double()


def missing_dependencies(backend: str) -> str | None:
    """Why this backend's cluster cannot run here, or None."""
    import importlib.util

    needed = ["dask", "distributed"] + (["cupy"] if backend == "cupy" else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    hint = "pip install 'lingp[dask]'" + (" (and CuPy for your CUDA; dask-cuda for several GPUs)" if backend == "cupy"
                                         else "")
    return f"bench_dask.py --backend {backend} needs {', '.join(missing)}, not installed here: {hint}"


def make_cluster(backend: str, workers: int, malloc_trim: bool):
    """A local cluster of ``workers`` processes with one thread each; one GPU per worker on CuPy. ``malloc_trim``
    False: the workers start without Dask's MALLOC_TRIM_THRESHOLD_ (None unsets a pre-spawn variable)."""
    import dask

    if not malloc_trim:
        dask.config.set({f"distributed.nanny.pre-spawn-environ.{MALLOC_VARIABLE}": None})
    if backend == "cupy":
        import importlib.util

        if importlib.util.find_spec("dask_cuda") is not None:
            from dask_cuda import LocalCUDACluster

            return LocalCUDACluster(n_workers=workers, threads_per_worker=1, dashboard_address=None)
        if workers != 1:
            raise SystemExit("bench_dask.py --backend cupy with several workers needs dask-cuda (one GPU per worker)")
        # one GPU, no dask-cuda (the GPU image lacks it): a single worker process sees device 0, as
        # LocalCUDACluster's one worker would
        print("dask_cuda is not installed: a LocalCluster of 1 worker process on GPU 0 stands in for LocalCUDACluster")
    from distributed import LocalCluster

    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)


def dask_rows(a, parts: int, backend: str):
    """A host array as a dask array of ``parts`` row chunks (CuPy: each chunk moved to its worker's GPU there)."""
    import dask.array as da

    d = da.from_array(a, chunks=(math.ceil(a.shape[0] / parts),) + a.shape[1:])
    if backend == "cupy":
        import cupy

        d = d.map_blocks(cupy.asarray, dtype=a.dtype, meta=cupy.empty((0,) * a.ndim, dtype=a.dtype))
    return d


def _noop(i: int) -> int:
    return i


def _worker_threads() -> dict:
    import torch

    return {"torch": torch.get_num_threads(), **{k: os.environ.get(k) for k in THREAD_VARIABLES + (MALLOC_VARIABLE,)}}


def warm_up(model, x, backend: str) -> None:
    """One untimed export and fit on 8 examples in this process: torch's and lingp's one-time set-up out of the
    timings."""
    import lingp_core as lg

    J = lg.export_jacobian(model, x[:8], backend=backend)
    y = lg.get_backend(backend).asarray(targets(x[:8], 0))
    lg.LinearizedGP(PRIOR_SCALE, NOISE, method="iterative").fit(J, y)


def _warm_worker() -> float:
    """On a worker: import torch and lingp and export a tiny network once; returns the seconds it took."""
    begin = time.perf_counter()
    import torch

    import lingp_core as lg

    lg.export_jacobian(torch.nn.Linear(2, 1).double(), torch.zeros(2, 2, dtype=torch.float64))
    return time.perf_counter() - begin


def register_shard_sizeof() -> None:
    """Tell Dask a shard's real size (JacobianBlocks.nbytes + f0); run in every process that stores shards."""
    from dask.sizeof import sizeof

    from lingp_core.jacobian import JacobianBlocks

    @sizeof.register(JacobianBlocks)
    def _shard_bytes(J) -> int:
        return int(J.nbytes + J.f0.nbytes)


def round_trip(client, reps: int) -> dict:
    """The scheduling floor: one trivial task per worker, submitted and gathered; median and min over ``reps`` after
    5 warm-up rounds."""
    workers = list(client.scheduler_info()["workers"])
    times = []
    for _ in range(reps + 5):
        begin = time.perf_counter()
        client.gather([client.submit(_noop, i, workers=[w], pure=False) for i, w in enumerate(workers)])
        times.append(time.perf_counter() - begin)
    return {"median_s": statistics.median(times[5:]), "min_s": min(times[5:]), "reps": reps}


# ----- measurements -----------------------------------------------------------------------------------------------

def split(t) -> dict:
    """A ShardTimings as totals and per-round seconds: products (compute), reduction, scheduling + transfer."""
    sched = t.wall - t.compute - t.reduction
    out = {"rounds": t.rounds, "wall_s": t.wall, "compute_s": t.compute, "reduction_s": t.reduction,
           "scheduling_s": sched}
    if t.rounds:
        out["per_round"] = {"wall_s": t.wall / t.rounds, "compute_s": t.compute / t.rounds,
                            "reduction_s": t.reduction / t.rounds, "scheduling_s": sched / t.rounds}
    return out


def gp_model(args):
    import lingp_core as lg

    return lg.LinearizedGP(PRIOR_SCALE, NOISE, method="iterative", preconditioner_rank=args.preconditioner_rank,
                           variance_rank=args.variance_rank)


def fit_predict(args, J, y, J_star, be) -> dict:
    """Fit and predict (mean and variances at the test inputs), timed; on a ShardedJacobian also its rounds."""
    sharded = hasattr(J, "timings")
    if sharded:
        J.timings.reset()
    t0 = time.perf_counter()
    gp = gp_model(args).fit(J, y)
    be.synchronize()
    t1 = time.perf_counter()
    fit_rounds = split(J.timings) if sharded else None
    if sharded:
        J.timings.reset()
    if args.fit_only:  # the posterior mean alone: one cross-kernel round, no variance solves
        mean, var = gp.predict(J_star), None
    else:
        mean, var = gp.predict(J_star, return_var=True)
    be.synchronize()
    t2 = time.perf_counter()
    info = gp.diagnostics_[0]
    out = {"fit_s": t1 - t0, "predict_s": t2 - t1, "plan": gp.plan_.method,
           "cg_iterations": int(max(info["cg_iterations"][0])), "preconditioner_rank": info["preconditioner_rank"],
           "variance_method": info.get("variance_method"),
           "mean": be.to_numpy(mean)[:, 0].tolist(), "var": None if var is None else be.to_numpy(var)[:, 0].tolist()}
    if sharded:
        out["fit_rounds"], out["predict_rounds"] = fit_rounds, split(J.timings)
        out["client_fit_s"] = out["fit_s"] - fit_rounds["wall_s"]  # CG's own vector work, outside the rounds
    return out


def product_times(op, n: int, rounds: int, seed: int, be) -> tuple[list[float], object]:
    """Seconds of ``rounds`` products op·v with one seeded column v (n, 1), and the last result (host)."""
    import numpy as np

    v = be.asarray(np.random.default_rng(seed).standard_normal((n, 1)))
    times = []
    for _ in range(rounds):
        begin = time.perf_counter()
        out = op.matmat(v)
        be.synchronize()
        times.append(time.perf_counter() - begin)
    return times, be.to_numpy(out)[:, 0]


def relative_difference(got, ref) -> float:
    """max |got − ref| / max |ref| (test-point means or variances, or a product's entries)."""
    import numpy as np

    got, ref = np.asarray(got), np.asarray(ref)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def run_single(args, model, x, y, J_star, be, probe) -> dict:
    """The in-memory path: export, fit, predict; one kernel product's time; the probe's products."""
    import lingp_core as lg

    t0 = time.perf_counter()
    J = lg.export_jacobian(model, x, backend=args.backend)
    be.synchronize()
    row = {"config": "single process", "workers": 0, "n": J.n, "export_s": time.perf_counter() - t0}
    row.update(fit_predict(args, J, be.asarray(y), J_star, be))
    op = lg.KernelOperator(J, prior_scale=PRIOR_SCALE, noise=NOISE)
    row["product_s"] = statistics.median(product_times(op, J.n, 3, args.seed, be)[0])
    del J, op
    if probe is not None:
        row["probe"] = probe_single(args, probe, be)
    return row


def probe_single(args, probe, be) -> dict:
    import lingp_core as lg

    model, x = probe
    t0 = time.perf_counter()
    J = lg.export_jacobian(model, x, backend=args.backend)
    be.synchronize()
    export_s = time.perf_counter() - t0
    op = lg.KernelOperator(J, prior_scale=PRIOR_SCALE, noise=NOISE)
    times, result = product_times(op, J.n, args.probe_rounds, args.seed, be)
    return {"n": J.n, "export_s": export_s, "product_s": statistics.median(times), "times_s": times,
            "result": result}


def run_sharded(args, client, workers: int, model, x, y, J_star, be, probe) -> dict:
    """The cluster path on ``client``: round trip, export of W shards, fit, predict; the probe's products."""
    import lingp_core as lg

    row = {"config": f"dask, {workers} worker{'s' if workers > 1 else ''}", "workers": workers, "n": args.n,
           "worker_warm_up_s": max(client.run(_warm_worker).values()), "round_trip": round_trip(client,
                                                                                                  args.latency_reps)}
    if args.register_sizeof:
        register_shard_sizeof()
        client.run(register_shard_sizeof)
    t0 = time.perf_counter()
    J = lg.export_jacobian(model, dask_rows(x.detach().cpu().numpy(), workers, args.backend),
                           backend=args.backend).persist()
    row["export_s"] = time.perf_counter() - t0
    row["shard_rows"], row["shards_per_worker"] = list(J.counts), placement(client, J)
    row.update(fit_predict(args, J, dask_rows(y, workers, args.backend), J_star, be))
    row["shards_per_worker_after"] = placement(client, J)
    distinct = {tuple(threads.items()) for threads in client.run(_worker_threads).values()}
    row["worker_threads"] = [dict(items) for items in sorted(distinct, key=str)]  # one entry when all agree
    del J
    if probe is not None:
        row["probe"] = probe_sharded(args, client, workers, probe, be)
    return row


def placement(client, J) -> dict:
    """Shards held per worker address (one each is the intended layout; a shard with copies counts on each)."""
    counts: dict[str, int] = {}
    for holders in client.who_has(J.shards).values():
        for address in holders:
            counts[address] = counts.get(address, 0) + 1
    return counts


def probe_sharded(args, client, workers: int, probe, be) -> dict:
    import lingp_core as lg
    from lingp_core.sharded import ShardedKernelOperator

    model, x = probe
    t0 = time.perf_counter()
    J = lg.export_jacobian(model, dask_rows(x.detach().cpu().numpy(), workers, args.backend),
                           backend=args.backend).persist()
    export_s = time.perf_counter() - t0
    before = placement(client, J)
    op = ShardedKernelOperator(J, prior_scale=PRIOR_SCALE, output_mode="full", noise=NOISE)
    J.timings.reset()
    times, result = product_times(op, J.n, args.probe_rounds, args.seed, be)
    return {"n": J.n, "export_s": export_s, "product_s": statistics.median(times), "times_s": times,
            "rounds": split(J.timings), "shards_per_worker": before, "shards_per_worker_after": placement(client, J),
            "result": result}


# ----- the run ----------------------------------------------------------------------------------------------------

def run(args) -> dict:
    import torch
    from distributed import Client

    import lingp_core as lg

    torch.set_grad_enabled(True)
    load_before = os.getloadavg()
    be = lg.get_backend(args.backend)
    device = "cuda" if args.backend == "cupy" else "cpu"
    widths = QUICK_WIDTHS if args.quick else PAPER_WIDTHS
    model, x = network(args.n, widths, args.seed, device)
    _, xs = network(N_TEST, widths, args.seed + 100, device)
    y = targets(x, args.seed)
    J_star = lg.export_jacobian(model, xs, backend=args.backend)
    p = sum(prm.numel() for prm in model.parameters())
    probe = network(args.probe_n, widths, args.seed, device) if args.probe_n else None
    warm_up(model, x, args.backend)
    single = run_single(args, model, x, y, J_star, be, probe)
    print_row(single)
    rows = [single]
    for workers in args.workers:
        begin = time.perf_counter()
        with make_cluster(args.backend, workers, not args.unset_malloc_trim) as cluster, Client(cluster) as client:
            cluster_s = time.perf_counter() - begin
            row = run_sharded(args, client, workers, model, x, y, J_star, be, probe)
        row["cluster_start_s"] = cluster_s
        row["max_rel_mean_diff"] = relative_difference(row["mean"], single["mean"])
        row["max_rel_var_diff"] = None if row["var"] is None else relative_difference(row["var"], single["var"])
        row["time_ratio"] = (row["fit_s"] + row["predict_s"]) / (single["fit_s"] + single["predict_s"])
        if probe is not None:
            row["probe"]["max_rel_product_diff"] = relative_difference(row["probe"]["result"],
                                                                       single["probe"]["result"])
        print_row(row)
        rows.append(row)
    for row in rows:  # the product vectors were only for the agreement check
        row.get("probe", {}).pop("result", None)
    import dask
    import distributed

    return {"benchmark": "bench_dask", "backend": args.backend, "quick": args.quick, "n": args.n, "p": p,
            "widths": list(widths), "n_test": N_TEST, "prior_scale": PRIOR_SCALE, "noise": NOISE,
            "network_dtype": "float64", "preconditioner_rank": args.preconditioner_rank,
            "variance_rank": args.variance_rank, "probe_n": args.probe_n, "probe_rounds": args.probe_rounds,
            "workers_malloc_trim": not args.unset_malloc_trim, "register_sizeof": args.register_sizeof,
            "load_average": {"start": list(load_before), "end": list(os.getloadavg())},
            "threads": {"per_process": args.threads, **{k: os.environ.get(k) for k in THREAD_VARIABLES},
                        "torch_threads": torch.get_num_threads()},
            "reduction_bytes_per_column": 8 * p, "rows": rows, "model": extrapolation(rows, p),
            "machine": dict(machine_info(args.backend), dask=dask.__version__, distributed=distributed.__version__),
            "gpu_overhead_target": GPU_OVERHEAD_TARGET if args.backend == "cupy" else None,
            "seed": args.seed}


def extrapolation(rows: list[dict], p: int) -> dict:
    """The inputs of a per-round cost model, round ≈ c·(n/W)·k + r: c the products' seconds per example and column
    (from the fit's rounds, the slowest shard's seconds over its rows; single process: one product over n; at n and,
    with the probe, at probe_n), r the scheduling + transfer per round, and the reduction's p·k·8 bytes."""
    model: dict = {"reduction_bytes_per_column": 8 * p}
    for row in rows:
        entry, probe = {}, row.get("probe")
        if row["workers"] == 0:
            entry["compute_s_per_example_column"] = row["product_s"] / row["n"]
            if probe:
                entry["probe_compute_s_per_example_column"] = probe["product_s"] / probe["n"]
        else:
            per = row["fit_rounds"]["per_round"]
            entry.update(compute_s_per_example_column=per["compute_s"] / max(row["shard_rows"]),
                         scheduling_s_per_round=per["scheduling_s"], reduction_s_per_round=per["reduction_s"])
            if probe:
                per, rows_per_shard = probe["rounds"]["per_round"], math.ceil(probe["n"] / row["workers"])
                entry.update(probe_compute_s_per_example_column=per["compute_s"] / rows_per_shard,
                             probe_scheduling_s_per_round=per["scheduling_s"])
        model[row["config"]] = entry
    return model


# ----- output -----------------------------------------------------------------------------------------------------

HEADERS = ["configuration", "export s", "fit s", "CG it.", "rounds", "round ms", "products ms", "reduction ms",
           "sched. ms", "predict s", "rel. Δ mean", "rel. Δ var"]


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}"


def table_row(row: dict) -> list:
    if row["workers"] == 0:
        rounds = ["-", _ms(row["product_s"]), _ms(row["product_s"]), "-", "-"]
        diffs = ["-", "-"]
    else:
        fit = row["fit_rounds"]
        per = fit.get("per_round", {})
        rounds = [fit["rounds"]] + [_ms(per[k]) if per else "-" for k in ("wall_s", "compute_s", "reduction_s",
                                                                            "scheduling_s")]
        diffs = [f"{row['max_rel_mean_diff']:.1e}",
                 "-" if row["max_rel_var_diff"] is None else f"{row['max_rel_var_diff']:.1e}"]
    return ([row["config"], f"{row['export_s']:.2f}", f"{row['fit_s']:.2f}", row["cg_iterations"]] + rounds
            + [f"{row['predict_s']:.2f}"] + diffs)


def print_row(row: dict) -> None:
    cells = table_row(row)
    print("  " + " | ".join(f"{h} {c}" for h, c in zip(HEADERS, cells)), flush=True)


def layout(counts: dict, workers: int) -> str:
    """Shards held by each of the cluster's workers, e.g. [1, 1], or [0, 2] where one worker holds both."""
    held = sorted(counts.values()) + [0] * (workers - len(counts))
    return str(sorted(held))


def report(result: dict) -> str:
    """The printed summary: tables, round trips, the cost model's inputs and the GPU target where it applies."""
    rows = result["rows"]
    lines = [f"\nELU {'-'.join(map(str, result['widths']))} MLP (p = {result['p']:,}, float64), n = {result['n']}, "
             f"{result['n_test']} test points, s = {result['prior_scale']}, σ² = {result['noise']}, "
             f"LinearizedGP(method='iterative', preconditioner_rank={result['preconditioner_rank']}, "
             f"variance_rank={result['variance_rank']}); {result['threads']['per_process']} thread(s) per process, "
             f"backend {result['backend']}, {result['machine'].get('cpu_count')} CPUs",
             "Fit rounds: per-round wall = products (slowest shard) + reduction + scheduling/transfer; single process: "
             "one kernel product.", markdown_table(HEADERS, [table_row(r) for r in rows])]
    for row in rows[1:]:
        pred = row["predict_rounds"]
        trip = row["round_trip"]
        lines.append(f"- {row['config']}: cluster start {row['cluster_start_s']:.1f} s, workers' imports and first "
                     f"export {row['worker_warm_up_s']:.1f} s (untimed); Dask round trip (a trivial task per worker) "
                     f"median {_ms(trip['median_s'])} ms, min {_ms(trip['min_s'])} ms; shards per worker after the "
                     f"export {layout(row['shards_per_worker'], row['workers'])}, after fit and predict "
                     f"{layout(row['shards_per_worker_after'], row['workers'])}; fit outside the rounds (CG's vectors "
                     f"on the client) {row['client_fit_s']:.2f} s; predict: {pred['rounds']} rounds, "
                     f"{pred['compute_s']:.2f} s products, {pred['reduction_s']:.2f} s reduction, "
                     f"{pred['scheduling_s']:.2f} s scheduling/transfer; fit + predict {row['time_ratio']:.2f}× the "
                     f"single process's; worker threads and environment: "
                     f"{'; '.join(', '.join(f'{k} {t}' for k, t in d.items()) for d in row['worker_threads'])}")
    probes = [r for r in rows if "probe" in r]
    if probes:
        lines.append(f"\nProbe at n = {result['probe_n']}: {result['probe_rounds']} kernel products s·K v + σ²v (one "
                     "column) each, median per product.")
        head = ["configuration", "export s", "product ms", "products ms", "reduction ms", "sched. ms", "rel. Δ product",
                "shards per worker"]
        body = []
        for r in probes:
            pr = r["probe"]
            if r["workers"] == 0:
                body.append([r["config"], f"{pr['export_s']:.2f}", _ms(pr["product_s"]), _ms(pr["product_s"]), "-",
                             "-", "-", "-"])
            else:
                per = pr["rounds"]["per_round"]
                body.append([r["config"], f"{pr['export_s']:.2f}", _ms(pr["product_s"]), _ms(per["compute_s"]),
                             _ms(per["reduction_s"]), _ms(per["scheduling_s"]), f"{pr['max_rel_product_diff']:.1e}",
                             f"{layout(pr['shards_per_worker'], r['workers'])} → "
                             f"{layout(pr['shards_per_worker_after'], r['workers'])}"])
        lines.append(markdown_table(head, body))
    lines.append(f"\nModel for extrapolation: a round ≈ c·(n/W)·k + r (W workers, k columns), reduction p·k·8 bytes = "
                 f"{result['reduction_bytes_per_column'] / 1e6:.2f} MB per column (k = 1 in the fit's rounds, "
                 f"{result['n_test']} in predict's variance CG); measured here:")
    for key, m in result["model"].items():
        if not isinstance(m, dict):
            continue
        c = m["compute_s_per_example_column"]
        line = f"  {key}: at n = {result['n']}, c = {c * 1e6:.1f} µs per example and column"
        line += f", r = {_ms(m['scheduling_s_per_round'])} ms" if "scheduling_s_per_round" in m else ""
        if "probe_compute_s_per_example_column" in m:
            line += (f"; at n = {result['probe_n']}, c = {m['probe_compute_s_per_example_column'] * 1e6:.1f} µs"
                     + (f", r = {_ms(m['probe_scheduling_s_per_round'])} ms" if "probe_scheduling_s_per_round" in m
                        else ""))
        lines.append(line)
    if result["backend"] == "cupy":
        for row in rows[1:]:
            ratio = row["time_ratio"] - 1
            lines.append(f"target: {row['config']} within {GPU_OVERHEAD_TARGET:.0%} of the plain CuPy path: "
                         f"{ratio:+.0%} ({'met' if ratio <= GPU_OVERHEAD_TARGET else 'NOT met'})")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    """Per-round seconds split into products / reduction / scheduling, per configuration: the fit's rounds at n and
    the probe's at probe_n."""
    plt = pyplot()
    if plt is None:
        return False
    panels = [("fit", f"fit rounds, n = {result['n']}")]
    if result["probe_n"]:
        panels.append(("probe", f"kernel products, n = {result['probe_n']}"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (kind, title) in zip(axes[0], panels):
        names, parts = [], []
        for r in result["rows"]:
            names.append(r["config"].replace("dask, ", ""))
            if r["workers"] == 0:
                seconds = r["product_s"] if kind == "fit" else r["probe"]["product_s"]
                parts.append((seconds, 0.0, 0.0))
            else:
                per = (r["fit_rounds"] if kind == "fit" else r["probe"]["rounds"])["per_round"]
                parts.append((per["compute_s"], per["reduction_s"], per["scheduling_s"]))
        bottom = [0.0] * len(names)
        for i, label in enumerate(("products", "reduction", "scheduling + transfer")):
            heights = [1e3 * part[i] for part in parts]
            ax.bar(names, heights, bottom=bottom, label=label)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_ylabel("ms per round")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"lingp on Dask, ELU {'-'.join(map(str, result['widths']))} (p = {result['p']:,}), "
                 f"{result['machine'].get('cpu', '')}", fontsize=9)
    save_figure(fig, path)
    return True


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                        help="numpy: LocalCluster of CPU worker processes; cupy: dask_cuda.LocalCUDACluster, one GPU "
                             "per worker, against the plain CuPy path (default numpy)")
    parser.add_argument("--quick", action="store_true",
                        help=f"MLP {'-'.join(map(str, QUICK_WIDTHS))}, n = {QUICK_N}, probe n = {QUICK_PROBE_N} "
                             "(seconds; the smoke test)")
    parser.add_argument("--n", type=int, default=None, help=f"training inputs (default {FULL_N}; quick {QUICK_N})")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="cluster sizes to run (default 1 2 on numpy, 1 on cupy)")
    parser.add_argument("--probe-n", type=int, default=None,
                        help=f"n of the kernel-product probe, 0 for none (default {FULL_PROBE_N}; quick "
                             f"{QUICK_PROBE_N})")
    parser.add_argument("--probe-rounds", type=int, default=3, help="products per probe configuration (default 3)")
    parser.add_argument("--latency-reps", type=int, default=50, help="round trips whose median is reported")
    parser.add_argument("--preconditioner-rank", type=int, default=100, help="LinearizedGP's (default 100)")
    parser.add_argument("--variance-rank", type=int, default=200, help="LinearizedGP's (default 200)")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS/OpenMP/torch threads of every process, workers included (default 1)")
    parser.add_argument("--unset-malloc-trim", action="store_true",
                        help=f"start the workers without Dask's {MALLOC_VARIABLE}=65536, which turns off glibc's "
                             "adaptive mmap threshold (measured here: one kernel product at n = 500 took 2.2× as long "
                             "in one process with it set); default: Dask's defaults, what users get")
    parser.add_argument("--register-sizeof", action="store_true",
                        help="register dask.sizeof for lingp's JacobianBlocks on the client and the workers before "
                             "the export, so the scheduler knows a shard's real size (without it Dask counts a shard "
                             "as ~56 bytes and may move it next to a reduced p-vector: both shards on one worker)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit-only", action="store_true",
                        help="predict the posterior mean only (no variances): for a fit at large n, where the 50 "
                             "test variances alone would take hours on a CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_dask",
                        help="folder for the JSON and PNG (default %(default)s)")
    args = parser.parse_args(argv)
    args.n = (QUICK_N if args.quick else FULL_N) if args.n is None else args.n
    args.probe_n = (QUICK_PROBE_N if args.quick else FULL_PROBE_N) if args.probe_n is None else args.probe_n
    args.workers = args.workers or ([1] if args.backend == "cupy" else [1, 2])
    for name in ("n", "probe_rounds", "latency_reps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.probe_n < 0 or min(args.workers) < 1 or args.n < max(args.workers):
        parser.error(f"need --probe-n ≥ 0, --workers ≥ 1 and --n ≥ the largest --workers; got --probe-n "
                     f"{args.probe_n}, --workers {args.workers}, --n {args.n}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    why = missing_dependencies(args.backend)
    if why:
        print(why, file=sys.stderr)
        return 2
    for name in THREAD_VARIABLES:  # before NumPy and torch start their pools; the workers inherit the environment
        os.environ[name] = str(args.threads)
    set_torch_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    result = run(args)
    result["command"], result["total_s"] = command_line(__file__, argv), time.perf_counter() - begin
    print(report(result))
    print(f"total {result['total_s']:.0f} s")
    save_results(args.out, f"bench_dask_{args.backend}{'_quick' if args.quick else ''}", result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
