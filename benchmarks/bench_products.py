"""Kernel- and Fisher-vector products: exported Jacobian blocks vs autograd vs the paper's finite-difference Fisher.

The paper's speed-test network (ELU MLP 5-200-2000-200-1, p = 803,601, float32) at n = 1000 inputs, a Gaussian
likelihood with noise σ² (one output: regression). Paths:

  K v   blocks        J.gram_matmat(v) on blocks from lingp.export_jacobian                     (setup: the export)
        gram          K = J.gram() formed once from the blocks, then K @ v             (setup: export + J Jᵀ)
        autograd      AutogradJacobian.gram_matmat(v): one vjp + one jvp pass per product      (baseline)
  F v   blocks        lingp.fisher(J, GaussianLikelihood(σ²)).matmat(v) on exported blocks       (setup: export + Λ)
        autograd      the same operator on AutogradJacobian: Jᵀ Λ J v by jvp + vjp
        fd_kl         the paper's product F v ≈ ∇θ' KL(p_θ ‖ p_θ')|θ'=θ+εv / ε, ε = 1e-4, with
                      KL = Σ_i (f_θ'(x_i) − f_θ(x_i))² / (2σ²): one forward + backward per product    (baseline)

"per product" is the median of --repeats single products after a warm-up; "sequence" is setup plus --sequence
products one after another (the use in CG or Lanczos, where each product depends on the last). Speed-ups are ratios
against the baseline measured in the same run; "rel. diff." is ‖y − y_blocks‖ / ‖y_blocks‖ for the same v.

Usage: python benchmarks/bench_products.py [--backend numpy|cupy] [--quick] [--out DIR] [--n N] [--repeats R]
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

from benchmarks._common import PAPER_WIDTHS, command_line, machine_info, paper_mlp, pyplot  # noqa: E402

WIDTHS = PAPER_WIDTHS
QUICK_WIDTHS = (5, 32, 64, 32, 1)
FULL_N, QUICK_N = 1000, 64
NOISE = 0.1  # σ² of the Gaussian likelihood
EPS = 1e-4  # the paper's finite-difference step
TARGET_SPEEDUP = 10.0
BASELINES = {"Kv": "autograd", "Fv": "fd_kl"}


class FiniteDifferenceKLFisher:
    """The paper's Fisher-vector product: ∇θ' KL(p_θ ‖ p_θ')|θ'=θ+εv / ε for a Gaussian likelihood (noise σ²).

    f_θ is computed once (it does not change between products); each product is one forward pass at θ + εv and one
    backward pass. Products take and return flat torch tensors of length p in ``named_parameters`` order.
    """

    def __init__(self, model, x, noise: float, eps: float) -> None:
        import torch
        from torch.func import functional_call

        self.model, self.x, self.noise, self.eps = model, x, noise, eps
        self.params = {k: p.detach() for k, p in model.named_parameters()}
        self.call = functional_call
        with torch.no_grad():
            self.f0 = functional_call(model, self.params, (x,))

    def matvec(self, v):
        import torch

        shifted, start = {}, 0
        for name, p in self.params.items():
            shifted[name] = (p + self.eps * v[start: start + p.numel()].view_as(p)).requires_grad_(True)
            start += p.numel()
        f = self.call(self.model, shifted, (self.x,))
        kl = ((f - self.f0) ** 2).sum() / (2 * self.noise)
        grads = torch.autograd.grad(kl, list(shifted.values()))
        return torch.cat([g.reshape(-1) for g in grads]) / self.eps


def _sync(backend) -> None:
    import torch

    backend.synchronize()
    if torch.cuda.is_available() and backend.name == "cupy":
        torch.cuda.synchronize()


def _timed(fn, backend):
    _sync(backend)
    start = time.perf_counter()
    out = fn()
    _sync(backend)
    return out, time.perf_counter() - start


def _measure(setup, product, v, backend, repeats: int, sequence: int) -> dict:
    """Setup time, median single-product time (after a warm-up) and setup + ``sequence`` chained products."""
    import numpy as np

    state, _ = _timed(setup, backend)  # the first setup pays one-time costs (torch warm-up): not reported
    y, _ = _timed(lambda: product(state, v), backend)  # warm-up (first-call allocations, torch decompositions)
    singles = [_timed(lambda: product(state, v), backend)[1] for _ in range(repeats)]

    def chain():
        w = v
        for _ in range(sequence):  # normalized so that a long chain neither overflows nor underflows
            w = product(state, w)
            w = w / float(np.sqrt((w.astype(np.float64) ** 2).sum())) if hasattr(w, "astype") else w / w.norm()
        return w

    # the whole sequence pays its own setup: a second, fresh setup is timed with it
    state, setup_s = _timed(setup, backend)
    _, chain_s = _timed(chain, backend)
    return {"setup_s": setup_s, "per_product_s": float(np.median(singles)), "sequence_s": setup_s + chain_s,
            "result": y}


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    import backends
    from lingp_core.autograd_operator import AutogradJacobian
    from lingp_core.export import export_jacobian
    from lingp_core.fisher import fisher
    from lingp_core.likelihoods import GaussianLikelihood

    backend = backends.get_backend(args.backend)
    device = "cuda" if args.backend == "cupy" else "cpu"
    widths = QUICK_WIDTHS if args.quick else WIDTHS
    n = args.n or (QUICK_N if args.quick else FULL_N)
    model, x = paper_mlp(n, device, widths)
    p = sum(int(q.numel()) for q in model.parameters())
    lik = GaussianLikelihood(NOISE)
    rng = np.random.default_rng(0)
    u = backend.asarray(rng.standard_normal(n).astype(np.float32))
    v = backend.asarray(rng.standard_normal(p).astype(np.float32))

    def to_torch(a):
        return torch.from_dlpack(a)

    paths = {
        ("Kv", "blocks"): (lambda: export_jacobian(model, x, backend=backend.name), lambda J, w: J.gram_matmat(w), u),
        # the kernel formed once from the blocks (n·c × n·c; 4 MB at n = 1000), then a dense product
        ("Kv", "gram"): (lambda: export_jacobian(model, x, backend=backend.name).gram(), lambda K, w: K @ w, u),
        ("Kv", "autograd"): (lambda: AutogradJacobian(model, x, backend=backend.name),
                             lambda A, w: A.gram_matmat(w), u),
        ("Fv", "blocks"): (lambda: fisher(export_jacobian(model, x, backend=backend.name), lik),
                           lambda F, w: F.matmat(w), v),
        ("Fv", "autograd"): (lambda: fisher(AutogradJacobian(model, x, backend=backend.name), lik),
                             lambda F, w: F.matmat(w), v),
        ("Fv", "fd_kl"): (lambda: FiniteDifferenceKLFisher(model, x, NOISE, EPS), lambda F, w: F.matvec(w),
                          to_torch(v)),
    }
    rows, results = [], {}
    for (product, path), (setup, fn, vec) in paths.items():
        m = _measure(setup, fn, vec, backend, args.repeats, args.sequence)
        y = m.pop("result")
        results[(product, path)] = backend.to_numpy(backend.asarray(y.detach()) if hasattr(y, "detach") else y)
        rows.append({"product": product, "path": path, **m})
        print(f"{product} {path:<9} setup {m['setup_s']:.4f} s  per product {m['per_product_s']:.4f} s  "
              f"sequence of {args.sequence} {m['sequence_s']:.3f} s", flush=True)
    for row in rows:
        base = next(r for r in rows if r["product"] == row["product"] and r["path"] == BASELINES[row["product"]])
        row["speedup_per_product"] = base["per_product_s"] / row["per_product_s"]
        row["speedup_sequence"] = base["sequence_s"] / row["sequence_s"]
        ref = results[(row["product"], "blocks")].astype(np.float64)
        mine = results[(row["product"], row["path"])].astype(np.float64)
        row["rel_diff_vs_blocks"] = float(np.linalg.norm(mine - ref) / np.linalg.norm(ref))
    blocks = {r["product"]: r for r in rows if r["path"] == "blocks"}
    targets = {"speedup_min": TARGET_SPEEDUP,
               "Fv_per_product": blocks["Fv"]["speedup_per_product"], "Fv_sequence": blocks["Fv"]["speedup_sequence"],
               "Kv_per_product": blocks["Kv"]["speedup_per_product"], "Kv_sequence": blocks["Kv"]["speedup_sequence"]}
    targets["met"] = bool(min(v for k, v in targets.items() if k != "speedup_min") >= TARGET_SPEEDUP)
    return {"benchmark": "bench_products", "backend": args.backend, "quick": args.quick, "dtype": "float32",
            "model": {"widths": list(widths), "activation": "ELU", "p": p}, "n": n, "noise": NOISE, "eps": EPS,
            "repeats": args.repeats, "sequence": args.sequence, "baselines": BASELINES,
            "machine": machine_info(args.backend), "rows": rows, "targets": targets}


def _table(report: dict) -> str:
    seq = report["sequence"]
    lines = [f"| product | path | setup [s] | per product [s] | speed-up vs baseline | setup + {seq} products [s] | "
             "speed-up vs baseline | rel. diff. vs blocks |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        base = " (baseline)" if r["path"] == BASELINES[r["product"]] else ""
        lines.append(f"| {r['product']} | {r['path']}{base} | {r['setup_s']:.4f} | {r['per_product_s']:.4f} | "
                     f"{r['speedup_per_product']:.1f}× | {r['sequence_s']:.3f} | {r['speedup_sequence']:.1f}× | "
                     f"{r['rel_diff_vs_blocks']:.1e} |")
    return "\n".join(lines)


def _plot(report: dict, out: Path, stem: str) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    rows = report["rows"]
    labels = [f"{r['product']} {r['path']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("per_product_s", "sequence_s"),
                              ("one product", f"setup + {report['sequence']} products")):
        ax.barh(labels, [r[key] for r in rows])
        ax.set_xscale("log")
        ax.set_xlabel("wall time [s]")
        ax.set_title(title)
        ax.invert_yaxis()
    fig.suptitle(f"ELU {'-'.join(map(str, report['model']['widths']))} (p = {report['model']['p']:,}), "
                 f"n = {report['n']}, backend {report['backend']}")
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("numpy", "cupy"), default="numpy", help="array backend (default numpy)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny MLP {'-'.join(map(str, QUICK_WIDTHS))}, n = {QUICK_N}: seconds (smoke tests)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_products",
                        help="where JSON and PNG go")
    parser.add_argument("--n", type=int, help=f"examples (default {FULL_N}, quick {QUICK_N})")
    parser.add_argument("--repeats", type=int, default=5, help="timed single products per path; the median counts")
    parser.add_argument("--sequence", type=int, default=100, help="chained products in the sequence timing")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args)
    report["command"] = command_line(__file__, argv)
    stem = f"bench_products_{args.backend}{'_quick' if args.quick else ''}"
    report["plot"] = _plot(report, args.out, stem)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    print()
    print(f"ELU {'-'.join(map(str, report['model']['widths']))} MLP, p = {report['model']['p']:,}, n = {report['n']}, "
          f"float32, Gaussian σ² = {NOISE}, backend {args.backend}")
    print(_table(report))
    t = report["targets"]
    print(f"\ntarget ≥ {TARGET_SPEEDUP:.0f}× for blocks vs baseline: F v {t['Fv_per_product']:.1f}× per product, "
          f"{t['Fv_sequence']:.1f}× per sequence; K v {t['Kv_per_product']:.1f}× / {t['Kv_sequence']:.1f}× "
          f"({'met' if t['met'] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
