"""The paper's speed test: GP posterior mean and variances with the Jacobian kernel of a big MLP, export included.

Network: ELU MLP 5-200-2000-200-1 (p = 803,601, float32, seeded), n training inputs, 50 test inputs, targets
y = sin(x₁) + x₂² / 4 + 0.1·ε. Paths, each timed from the trained network to posterior mean and variances:

  lingp      export_jacobian (factored blocks, train + test) → LinearizedGP(method="auto").fit → predict(return_var)
             (the plan, e.g. function-cholesky, is printed; float64 kernel and factorization); with
             --float32-kernel also kernel_dtype="float32" (float64 factorization), with its largest difference
             from the float64 answer (relative to the largest |value|)
  autograd   the paper's approach: CG (lingp's, unpreconditioned) on s·K + σ²I with kernel-vector products by
             autograd (one vjp + one jvp pass per product, AutogradJacobian) for the mean and for the 50 variance
             right-hand sides K(X, x*), run until converged or its --baseline-cap seconds are spent (then it
             reports "not converged", as the paper's CG did at n = 1e4); skipped where even its set-up would not fit

The paper (a GPU) reports 33 s at n = 1e4 in function space with CG not converged, 6 s in parameter space. The target
on a 2-core CPU: exact mean and variances at n = 1e4 in ≤ 10 s. "max |Δmean|" compares autograd CG with lingp's exact
answer where the baseline ran.

Usage: python benchmarks/bench_posterior.py [--backend numpy|cupy] [--quick] [--sizes N ...] [--profile] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import PAPER_WIDTHS, command_line, machine_info, paper_mlp, pyplot, save_figure  # noqa: E402

QUICK_WIDTHS = (5, 32, 64, 32, 1)
N_TEST = 50
PRIOR_SCALE, NOISE = 1.0, 0.1
TARGET_SECONDS, TARGET_N = 10.0, 10000


def targets(x, seed: int):
    """y = sin(x₁) + x₂²/4 + 0.1 ε as a float64 NumPy array (n,)."""
    import numpy as np

    xh = x.detach().cpu().double().numpy()
    noise = np.random.default_rng(seed).standard_normal(xh.shape[0])
    return np.sin(xh[:, 0]) + xh[:, 1] ** 2 / 4 + 0.1 * noise


def run_lingp(model, x, xs, y, backend, kernel_dtype: str = "float64", method: str = "auto") -> dict:
    """Export + fit + predict with lingp; seconds per stage. method="iterative" uses the Lanczos variance cache."""
    import lingp_core as lg

    be = lg.get_backend(backend)
    t0 = time.perf_counter()
    J = lg.export_jacobian(model, x, backend=backend)
    Js = lg.export_jacobian(model, xs, backend=backend)
    be.synchronize()
    t1 = time.perf_counter()
    gp = lg.LinearizedGP(PRIOR_SCALE, NOISE, kernel_dtype=kernel_dtype, method=method,
                         variance_cg_max=0 if method == "iterative" else 256).fit(J, be.asarray(y.astype(J.dtype)))
    be.synchronize()
    t2 = time.perf_counter()
    mean, var = gp.predict(Js, return_var=True)
    be.synchronize()
    t3 = time.perf_counter()
    return {"export_s": t1 - t0, "fit_s": t2 - t1, "predict_s": t3 - t2, "total_s": t3 - t0,
            "plan": gp.plan_.method, "reason": gp.plan_.reason, "mean": be.to_numpy(mean)[:, 0].tolist(),
            "var": be.to_numpy(var)[:, 0].tolist(), "diagnostics": gp.diagnostics_}


def profile_lingp(model, x, xs, y, backend, top: int = 12) -> list[dict]:
    """An extra, untimed lingp run (float64) under cProfile: the functions with the most own time, printed."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    run_lingp(model, x, xs, y, backend)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive calls, own s, cumulative s, ...)}
    rows = sorted(({"function": f"{Path(k[0]).name}:{k[1]}({k[2]})", "calls": v[1], "own_s": v[2], "cum_s": v[3]}
                   for k, v in stats.items()), key=lambda r: -r["own_s"])[:top]
    print(f"    cProfile of an extra lingp run at n = {x.shape[0]} (own seconds, calls, function):")
    for r in rows:
        print(f"    {r['own_s']:8.3f} {r['calls']:>6}  {r['function']}")
    return rows


class _AutogradKernel:
    """s·J Jᵀ + σ²I with J Jᵀ U by autograd (AutogradJacobian.gram_matmat), as an operator for lingp.cg."""

    def __init__(self, J, backend):
        self.J, self.backend = J, backend
        self.shape, self.dtype = (J.n, J.n), J.dtype

    def matmat(self, u):
        return PRIOR_SCALE * self.J.gram_matmat(u) + NOISE * u


def run_autograd(model, x, xs, y, backend, cap_s: float) -> dict:
    """The paper-style baseline: CG with autograd kernel-vector products for the mean and the 50 variances."""
    import numpy as np

    import lingp_core as lg

    be = lg.get_backend(backend)
    t0 = time.perf_counter()
    J = lg.AutogradJacobian(model, x, backend=backend)
    Js = lg.AutogradJacobian(model, xs, backend=backend)
    cross = J.matmat(Js.rmatmat(be.xp.eye(N_TEST, dtype=J.dtype)))  # J J*ᵀ: (n, 50)
    prior = (Js.matmat(Js.rmatmat(be.xp.eye(N_TEST, dtype=J.dtype))) * PRIOR_SCALE).diagonal()
    op = _AutogradKernel(J, be)
    rhs = be.xp.concatenate([be.asarray(y.astype(J.dtype))[:, None] - J.f0, PRIOR_SCALE * cross], axis=1)
    be.synchronize()
    t_setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    op.matmat(rhs)  # one product with every column: the cost of an iteration
    be.synchronize()
    per_iteration = time.perf_counter() - t1
    maxiter = max(1, int((cap_s - t_setup) / per_iteration))
    result = lg.cg(op, rhs, maxiter=maxiter, warn=False)  # the dtype's default tolerance, sqrt(eps)
    sol = result.x
    mean = Js.f0[:, 0] + PRIOR_SCALE * (cross.T @ sol[:, 0])
    var = prior - PRIOR_SCALE * (cross * sol[:, 1:]).sum(axis=0)
    be.synchronize()
    total = time.perf_counter() - t0
    return {"total_s": total, "setup_s": t_setup, "seconds_per_iteration": per_iteration,
            "iterations": int(result.iterations.max()), "converged": bool(result.converged.all()),
            "maxiter": maxiter, "mean": be.to_numpy(mean).astype(np.float64).tolist(),
            "var": be.to_numpy(var).astype(np.float64).tolist()}


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    torch.set_grad_enabled(True)
    device = "cuda" if args.backend == "cupy" else "cpu"
    widths = QUICK_WIDTHS if args.quick else PAPER_WIDTHS
    rows = []
    _, xs = paper_mlp(N_TEST, device, widths, seed=args.seed + 100)  # the same 50 test inputs for every n
    if not args.cold:  # one-time set-up (torch, CuPy's kernel compilation) out of the timings
        warm_model, warm_x = paper_mlp(8, device, widths, seed=args.seed)
        run_lingp(warm_model, warm_x, xs, targets(warm_x, 0), args.backend)
        run_autograd(warm_model, warm_x, xs, targets(warm_x, 0), args.backend, 1.0)
    for index, n in enumerate(args.sizes):
        model, x = paper_mlp(n, device, widths, seed=args.seed)
        y = targets(x, args.seed)
        cold = run_lingp(model, x, xs, y, args.backend) if (args.cold and index == 0) else None
        ours = run_lingp(model, x, xs, y, args.backend)
        row = {"n": n, "p": sum(p.numel() for p in model.parameters()), "lingp": ours}
        if cold is not None:
            row["lingp_cold"] = cold
            print(f"  n = {n}: first call in this process (cold) {cold['total_s']:.2f} s, then warm "
                  f"{ours['total_s']:.2f} s ({cold['total_s'] - ours['total_s']:.2f} s of one-time set-up)")
        if args.float32_kernel:
            fast = run_lingp(model, x, xs, y, args.backend, kernel_dtype="float32")
            for key in ("mean", "var"):
                diff = np.abs(np.array(fast[key]) - np.array(ours[key]))
                fast[f"max_rel_{key}_diff"] = float(diff.max() / np.abs(np.array(ours[key])).max())
            row["lingp_float32_kernel"] = fast
        if n <= args.baseline_max_n:
            base = run_autograd(model, x, xs, y, args.backend, args.baseline_cap)
            base["max_abs_mean_diff"] = float(np.max(np.abs(np.array(base["mean"]) - np.array(ours["mean"]))))
            base["max_abs_var_diff"] = float(np.max(np.abs(np.array(base["var"]) - np.array(ours["var"]))))
            row["autograd"] = base
        rows.append(row)
        print_row(row)
        if args.profile:
            row["profile"] = profile_lingp(model, x, xs, y, args.backend)
    exact = {r["n"]: r["lingp"] for r in rows}
    iterative_rows = []
    for n in args.iterative_sizes:
        model, x = paper_mlp(n, device, widths, seed=args.seed)
        it = run_lingp(model, x, xs, targets(x, args.seed), args.backend, method="iterative")
        if n in exact:
            for key in ("mean", "var"):
                diff = np.abs(np.array(it[key]) - np.array(exact[n][key]))
                it[f"max_rel_{key}_diff"] = float(diff.max() / np.abs(np.array(exact[n][key])).max())
        iterative_rows.append({"n": n, "lingp_iterative": it})
        info = it["diagnostics"][0]
        versus = (f"; max rel. diff from exact: mean {it['max_rel_mean_diff']:.1e}, var {it['max_rel_var_diff']:.1e}"
                  if n in exact else "")
        print(f"{n:>6} {'iterative':>27} {it['export_s']:>9.2f} {it['fit_s']:>7.2f} {it['predict_s']:>7.2f} "
              f"{it['total_s']:>8.2f}   CG iterations {info['cg_iterations'][0][0]}, Lanczos rank "
              f"{info.get('lanczos_rank')}, estimated variance error {info.get('variance_error', float('nan')):.1e}"
              f"{versus}", flush=True)
    floor = None
    if args.floor is not None:
        floor = blas_floor(args.floor, widths, args.backend)
        measured = exact.get(args.floor)
        ratio = "" if measured is None else (f"; lingp fit + predict {measured['fit_s'] + measured['predict_s']:.2f} s"
                                             f" = {(measured['fit_s'] + measured['predict_s']) / floor['floor_s']:.2f}"
                                             "× the floor")
        print(f"BLAS floor at n = {args.floor}: kernel {floor['kernel_flops']:.2e} flops at "
              f"{floor['gemm_gflops']:.0f} GFLOP/s float64 GEMM = {floor['kernel_s']:.2f} s, plus a measured "
              f"Cholesky {floor['cholesky_s']:.2f} s = {floor['floor_s']:.2f} s{ratio}", flush=True)
    return {"rows": rows, "iterative_rows": iterative_rows, "widths": list(widths), "n_test": N_TEST, "floor": floor,
            "prior_scale": PRIOR_SCALE, "noise": NOISE,
            "machine": machine_info(args.backend), "quick": args.quick}


def blas_floor(n: int, widths: tuple[int, ...], backend: str) -> dict:
    """The machine's own floor for the exact path at n, measured in this run: the symmetric kernel's flops
    (Σ over Linear layers of n²·(inputs + 1 + outputs), i.e. the upper halves of A Aᵀ and Δ Δᵀ at one output) at a
    measured float64 GEMM rate, plus a measured in-place float64 Cholesky of the same n × n size."""
    import numpy as np

    import lingp_core as lg

    be = lg.get_backend(backend)
    xp = be.xp
    rng = np.random.default_rng(0)
    a = be.asarray(rng.standard_normal((2048, 2048)))
    a @ a  # noqa: B018  (warm-up)
    be.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        a @ a  # noqa: B018
    be.synchronize()
    gemm_rate = 3 * 2 * 2048**3 / (time.perf_counter() - start)
    flops = sum(n * n * (fan_in + 1 + fan_out) for fan_in, fan_out in zip(widths[:-1], widths[1:]))
    m = be.asarray(rng.standard_normal((n, 64)))
    spd = m @ m.T
    spd[xp.arange(n), xp.arange(n)] += n
    be.synchronize()
    start = time.perf_counter()
    be.cholesky_lower_in_place(spd)
    be.synchronize()
    cholesky_s = time.perf_counter() - start
    kernel_s = flops / gemm_rate
    return {"n": n, "gemm_gflops": gemm_rate / 1e9, "kernel_flops": flops, "kernel_s": kernel_s,
            "cholesky_s": cholesky_s, "floor_s": kernel_s + cholesky_s}


HEADER = (f"{'n':>6} {'p':>8} {'plan':>18} {'export s':>9} {'fit s':>7} {'pred s':>7} {'lingp s':>8} "
          f"{'autograd s':>11} {'CG it':>6} {'conv':>5} {'speed-up':>9} {'max|Δmean|':>11}")


def print_row(row: dict) -> None:
    ours, base = row["lingp"], row.get("autograd")
    tail = (f"{base['total_s']:>11.2f} {base['iterations']:>6} {str(base['converged']):>5} "
            f"{base['total_s'] / ours['total_s']:>8.1f}x {base['max_abs_mean_diff']:>11.1e}") if base else \
        f"{'-':>11} {'-':>6} {'-':>5} {'-':>9} {'-':>11}"
    print(f"{row['n']:>6} {row['p']:>8} {ours['plan']:>18} {ours['export_s']:>9.2f} {ours['fit_s']:>7.2f} "
          f"{ours['predict_s']:>7.2f} {ours['total_s']:>8.2f} {tail}", flush=True)
    fast = row.get("lingp_float32_kernel")
    if fast:
        print(f"{row['n']:>6} {row['p']:>8} {'(float32 kernel)':>18} {fast['export_s']:>9.2f} {fast['fit_s']:>7.2f} "
              f"{fast['predict_s']:>7.2f} {fast['total_s']:>8.2f}   max rel. diff from float64: mean "
              f"{fast['max_rel_mean_diff']:.1e}, var {fast['max_rel_var_diff']:.1e}", flush=True)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["n"] for r in result["rows"]]
    ax.loglog(ns, [r["lingp"]["total_s"] for r in result["rows"]], "o-", label="lingp (export + exact posterior)")
    base = [(r["n"], r["autograd"]["total_s"]) for r in result["rows"] if "autograd" in r]
    if base:
        ax.loglog(*zip(*base), "s--", label="autograd K v products in CG (paper-style)")
    ax.axhline(TARGET_SECONDS, color="gray", lw=0.8, ls=":", label=f"target {TARGET_SECONDS:.0f} s at n = 1e4")
    ax.set_xlabel("training inputs n")
    ax.set_ylabel("seconds to mean + variances at 50 points")
    ax.set_title(f"posterior on the paper's MLP ({result['machine'].get('gpu') or result['machine'].get('cpu', '')})",
                 fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    parser.add_argument("--quick", action="store_true", help="a small MLP and n = 64, 128 (seconds)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="training sizes (default 1000 5000 10000)")
    parser.add_argument("--baseline-max-n", type=int, default=None,
                        help="largest n for the autograd baseline (default 5000; quick: all)")
    parser.add_argument("--baseline-cap", type=float, default=None,
                        help="seconds the autograd baseline may spend per size (default 300; quick: 10)")
    parser.add_argument("--float32-kernel", action="store_true",
                        help="also time kernel_dtype='float32' (float64 factorization) against the exact run")
    parser.add_argument("--iterative-sizes", type=int, nargs="*", default=[],
                        help="sizes also run with method='iterative' (matrix-free CG, Lanczos variances)")
    parser.add_argument("--profile", action="store_true",
                        help="after each size's timed runs, profile one more lingp run and print where its time goes")
    parser.add_argument("--cold", action="store_true",
                        help="no untimed warm-up: the first size runs twice, first in a fresh process (cold: torch "
                             "and CuPy set-up, kernel compilation) then warm, and both are reported")
    parser.add_argument("--floor", type=int, default=None,
                        help="also measure this machine's BLAS floor for the exact path at this n (the kernel's "
                             "multiply-adds at a measured GEMM rate plus a measured Cholesky) and the ratio to it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_posterior")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([64, 128] if args.quick else [1000, 5000, 10000])
    if args.baseline_max_n is None:
        args.baseline_max_n = 10**9 if args.quick else 5000
    if args.baseline_cap is None:
        args.baseline_cap = 10.0 if args.quick else 300.0
    print(HEADER)
    result = run(args)
    result["command"] = command_line(__file__, argv)
    met = [r for r in result["rows"] if r["n"] == TARGET_N and not args.quick]
    if met:
        t = met[0]["lingp"]["total_s"]
        print(f"target: exact mean and variances at n = {TARGET_N} in ≤ {TARGET_SECONDS:.0f} s: {t:.2f} s "
              f"({'met' if t <= TARGET_SECONDS else 'NOT met'})")
        if "lingp_float32_kernel" in met[0]:
            t = met[0]["lingp_float32_kernel"]["total_s"]
            print(f"  with a float32 kernel (float64 Cholesky): {t:.2f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"bench_posterior_{args.backend}{'_quick' if args.quick else ''}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
