#!/usr/bin/env python3
"""Solver benchmark: lingp CG against linear_operator (GPyTorch) CG and scipy's Cholesky solve.

On dense kernels K = s·J Jᵀ + σ²I from random Jacobians with decaying column scales (a decaying spectrum plus
noise, like a GP regression system), and on the same kernel as a matrix-free operator J (Jᵀ v):
  - time to solve 32 right-hand sides to the same relative tolerance: lingp CG, linear_operator's linear_cg,
    scipy cho_factor + cho_solve (the size where CG starts to win is reported);
  - CG iterations with and without a rank-100 pivoted-Cholesky preconditioner;
  - 32 right-hand sides batched against 32 single solves.
Times are ratios against the baselines measured in the same run. Prints a table and writes JSON and a PNG plot.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import backends  # noqa: E402
import lingp_core as lg  # noqa: E402
from benchmarks._common import machine_info, pyplot, save_figure  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"], help="array backend for lingp")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds: a smoke run")
    parser.add_argument("--sizes", type=int, nargs="+", help="kernel sizes n (default 2000 4000 8000 16000)")
    parser.add_argument("--features", type=int, default=1024, help="Jacobian columns p (default 1024)")
    parser.add_argument("--rhs", type=int, default=32, help="right-hand sides (default 32)")
    parser.add_argument("--rtol", type=float, default=1e-6, help="relative residual tolerance (default 1e-6)")
    parser.add_argument("--noise", type=float, default=1e-2, help="σ² relative to the mean kernel diagonal")
    parser.add_argument("--rank", type=int, default=100, help="pivoted-Cholesky preconditioner rank (default 100)")
    parser.add_argument("--single-max-n", type=int, default=4000, help="largest n for 32 single solves")
    parser.add_argument("--gpytorch-max-n", type=int, default=8000,
                        help="largest n for linear_operator CG (1000 iterations: slow beyond)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_solvers",
                        help="output folder (JSON + PNG)")
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [300, 600] if args.quick else [2000, 4000, 8000, 16000]
    if args.quick:
        args.features, args.rank, args.single_max_n = min(args.features, 128), min(args.rank, 20), 600
    return args


def make_jacobian(n: int, p: int, seed: int = 0) -> np.ndarray:
    """Random (n, p) Jacobian whose column scales decay like 1/j, scaled so that mean diag(J Jᵀ) = 1."""
    rng = np.random.default_rng(seed)
    j = rng.standard_normal((n, p)) / np.arange(1, p + 1)
    return j / np.sqrt((j**2).sum(axis=1).mean())


class DenseJacobianKernel(lg.LinearOperator):
    """K = J Jᵀ + σ²I as a matrix-free operator: two GEMMs per product, O(n p) memory."""

    def __init__(self, jac, noise: float, backend):
        self.jac, self.noise = jac, noise
        self.shape, self.dtype, self.backend = (jac.shape[0], jac.shape[0]), np.dtype(jac.dtype), backend

    def _matmat(self, x):
        return self.jac @ (self.jac.T @ x) + self.noise * x

    def diagonal(self):
        return (self.jac**2).sum(axis=1) + self.noise


def timed(fn, backend):
    backend.synchronize()
    start = time.perf_counter()
    out = fn()
    backend.synchronize()
    return out, time.perf_counter() - start


def gpytorch_cg(matmul, rhs, rtol: float):
    """linear_operator's linear_cg at the same tolerance, with its own iteration cap (settings.max_cg_iterations,
    1000); returns (solution, products used). Its mean-over-columns stopping rule is looser than ours (every column)."""
    from linear_operator.utils.linear_cg import linear_cg

    calls = [0]

    def counted(v):
        calls[0] += 1
        return matmul(v)

    x = linear_cg(counted, rhs, tolerance=rtol)
    return x, calls[0]


def run(args: argparse.Namespace, json_path: Path) -> dict:
    """Measure every size; the JSON is rewritten after each row, so a crash or a kill keeps what was measured."""
    backend = backends.get_backend(args.backend)
    result = {"rows": [], "machine": machine_info(backend.name), "args": {k: str(v) for k, v in vars(args).items()}}
    for n in args.sizes:
        result["rows"].append(bench_size(n, args, backend))
        print_row(result["rows"][-1])
        json_path.write_text(json.dumps(result, indent=2))
    return result


def bench_size(n: int, args: argparse.Namespace, backend) -> dict:
    """Every measurement at one kernel size n; returns one table row."""
    import scipy.linalg
    import torch

    torch_device = "cuda" if backend.name == "cupy" else "cpu"
    jac_host = make_jacobian(n, args.features)
    kernel_host = jac_host @ jac_host.T
    kernel_host[np.diag_indices(n)] += args.noise
    b_host = np.random.default_rng(1).standard_normal((n, args.rhs))
    maxiter = 10 * n
    row = {"n": n, "p": args.features, "rhs": args.rhs, "rtol": args.rtol}

    (_, ), t_chol = timed(lambda: (scipy.linalg.cho_solve(scipy.linalg.cho_factor(kernel_host), b_host),),
                          backends.get_backend("numpy"))
    row["scipy_cho_solve_s"] = t_chol

    kernel = backend.asarray(kernel_host)
    b = backend.asarray(b_host)
    res, t_cg = timed(lambda: lg.cg(kernel, b, rtol=args.rtol, maxiter=maxiter, warn=False), backend)
    row.update(lingp_cg_s=t_cg, lingp_cg_iters=int(res.iterations.max()),
               lingp_cg_converged=bool(res.converged.all()),
               lingp_cg_relres=float(np.max(res.residual_norms / np.linalg.norm(b_host, axis=0))))

    def preconditioned():
        m = lg.pivoted_cholesky_preconditioner(kernel, rank=args.rank)
        return lg.cg(kernel, b, M=m, rtol=args.rtol, maxiter=maxiter, warn=False)

    res_pc, t_pc = timed(preconditioned, backend)
    row.update(lingp_pcg_s=t_pc, lingp_pcg_iters=int(res_pc.iterations.max()),
               lingp_pcg_converged=bool(res_pc.converged.all()))

    torch_sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)
    run_gpytorch = n <= args.gpytorch_max_n and importlib.util.find_spec("linear_operator") is not None
    if run_gpytorch:
        k_torch = torch.as_tensor(kernel_host, device=torch_device)
        b_torch = torch.as_tensor(b_host, device=torch_device)
        torch_sync()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x_gp, calls = gpytorch_cg(lambda v: k_torch @ v, b_torch, args.rtol)
        torch_sync()
        row["gpytorch_cg_s"] = time.perf_counter() - start
        x_gp_host = x_gp.cpu().numpy()
        gp_relres = np.linalg.norm(b_host - kernel_host @ x_gp_host, axis=0) / np.linalg.norm(b_host, axis=0)
        row.update(gpytorch_cg_products=calls, gpytorch_cg_relres_max=float(gp_relres.max()),
                   gpytorch_cg_relres_mean=float(gp_relres.mean()),
                   gpytorch_cg_reached_rtol=bool(gp_relres.max() <= args.rtol))

    # matrix-free: the same kernel as J (Jᵀ v) + σ² v
    jac = backend.asarray(jac_host)
    op = DenseJacobianKernel(jac, args.noise, backend)
    res_mf, t_mf = timed(lambda: lg.cg(op, b, rtol=args.rtol, maxiter=maxiter, warn=False), backend)
    row.update(lingp_cg_matfree_s=t_mf, lingp_cg_matfree_iters=int(res_mf.iterations.max()))
    if run_gpytorch:
        j_torch = torch.as_tensor(jac_host, device=torch_device)
        torch_sync()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gpytorch_cg(lambda v: j_torch @ (j_torch.T @ v) + args.noise * v, b_torch, args.rtol)
        torch_sync()
        row["gpytorch_cg_matfree_s"] = time.perf_counter() - start

    if n <= args.single_max_n:
        def singles():
            return [lg.cg(kernel, b[:, j], rtol=args.rtol, maxiter=maxiter, warn=False) for j in range(args.rhs)]

        _, t_single = timed(singles, backend)
        row["lingp_cg_32_single_s"] = t_single
    return row


COLUMNS = [  # (header, width, value from a row or None when not measured)
    ("n", 6, lambda r: f"{r['n']}"),
    ("cho_solve s", 11, lambda r: f"{r['scipy_cho_solve_s']:.3f}"),
    ("CG s", 8, lambda r: f"{r['lingp_cg_s']:.3f}"),
    ("CG it", 6, lambda r: f"{r['lingp_cg_iters']}"),
    ("CG res", 8, lambda r: f"{r['lingp_cg_relres']:.1e}"),
    ("PCG s", 8, lambda r: f"{r['lingp_pcg_s']:.3f}"),
    ("PCG it", 6, lambda r: f"{r['lingp_pcg_iters']}"),
    ("GPyT s", 8, lambda r: f"{r['gpytorch_cg_s']:.3f}"),
    ("GPyT it", 7, lambda r: f"{r['gpytorch_cg_products'] - 1}"),
    ("GPyT res", 8, lambda r: f"{r['gpytorch_cg_relres_max']:.1e}"),
    ("GPyT/CG", 7, lambda r: f"{r['gpytorch_cg_s'] / r['lingp_cg_s']:.2f}"),
    ("chol/CG", 7, lambda r: f"{r['scipy_cho_solve_s'] / r['lingp_cg_s']:.2f}"),
    ("chol/PCG", 8, lambda r: f"{r['scipy_cho_solve_s'] / r['lingp_pcg_s']:.2f}"),
    ("it/PCGit", 8, lambda r: f"{r['lingp_cg_iters'] / max(r['lingp_pcg_iters'], 1):.2f}"),
    ("MF CG s", 8, lambda r: f"{r['lingp_cg_matfree_s']:.3f}"),
    ("MF GPyT/CG", 10, lambda r: f"{r['gpytorch_cg_matfree_s'] / r['lingp_cg_matfree_s']:.2f}"),
    ("32x1/batch", 10, lambda r: f"{r['lingp_cg_32_single_s'] / r['lingp_cg_s']:.2f}"),
]
HEADER = " ".join(f"{name:>{width}}" for name, width, _ in COLUMNS)


def print_row(r: dict) -> None:
    cells = []
    for _, width, value in COLUMNS:
        try:
            cells.append(f"{value(r):>{width}}")
        except KeyError:  # not measured at this size
            cells.append(f"{'-':>{width}}")
    print(" ".join(cells), flush=True)


def plot(result: dict, path: Path) -> bool:
    """Write the time-versus-n plot; False (and nothing written) when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in [("scipy_cho_solve_s", "scipy cho_factor + cho_solve"), ("lingp_cg_s", "lingp CG"),
                       ("lingp_pcg_s", "lingp CG + pivoted Cholesky"), ("gpytorch_cg_s", "linear_operator CG"),
                       ("lingp_cg_matfree_s", "lingp CG, matrix-free")]:
        measured = [(r["n"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*measured), marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="n (kernel size)", ylabel="seconds for 32 right-hand sides",
           title=f"Solving (K + σ²I) X = B to rtol {rows[0]['rtol']:g}")
    save_figure(fig, path)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("linear_operator") is None:
        print("linear_operator is not installed: its CG columns stay empty (pip install 'lingp[bench]')")
    print(HEADER)
    result = run(args, args.out / "bench_solvers.json")
    print(f"wrote {args.out / 'bench_solvers.json'}")
    if plot(result, args.out / "bench_solvers.png"):
        print(f"wrote {args.out / 'bench_solvers.png'}")
    else:
        print("matplotlib is not installed: no plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
