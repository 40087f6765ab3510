"""Full-network Laplace for classification: lingp's LaplaceClassifier against laplace-torch on scikit-learn's digits.

Setup: digits (8×8 images, 10 classes), standardized, a seeded split into 1,200 training and 597 test images; an MLP
64-64-10 with tanh (p = 4,810) trained by Adam (full batch for a fixed number of epochs, weight decay 1/(N·s₀) so
θ̂ is the MAP of a N(0, s₀·I) prior). Rows (each timed end to end from the trained network):

  MAP                      the network's softmax (time: one forward pass)
  lingp full (probit|mc)   LaplaceClassifier on all parameters: export J (train + test), Newton for the linearized
                           model's MAP, dense GGN + Cholesky, prior scale s by the Laplace evidence (MacKay fixed
                           point, MAP and curvature re-solved per step), predictive by probit or 1,000 MC draws.
                           The prior is N(0, s·I) on θ itself (prior_mean = −θ̂), as in laplace-torch.
  lingp full, averaged     the same, then the predictions averaged over s (average_prior_scale(): 9 values within
    over s                 ±1 decade of the evidence's s, each refitted, weighted by its evidence)
  lingp full layerwise     the same with one prior variance per layer, all chosen by the evidence
                           (optimize_prior_scale(layerwise=True): MacKay's fixed point per layer), each layer
                           starting from its weights' mean square; prior N(0, S) on θ
  lingp full layerwise,    the same with the hidden layer's prior centred at the trained weights (prior_mean 0
    hidden at θ̂            there) and the last layer's at the origin, as in last-layer Laplace
  lingp last layer         the same on the last layer's parameters (params="last_layer")
  laplace-torch full       Laplace(subset_of_weights="all", hessian_structure="full"), fit on the training set,
                           optimize_prior_precision(method="marglik") (scalar prior precision, 100 Adam steps on
                           the marginal likelihood), GLM predictive with the probit link
  laplace-torch kron       the same with hessian_structure="kron"
  laplace-torch last layer subset_of_weights="last_layer", hessian_structure="kron" (laplace-torch's default)

Columns: time [s], speed-up against laplace-torch full (measured in the same run), test NLL (mean), accuracy, ECE
(15 bins), and the chosen prior variance s (laplace-torch's prior precision δ as s = 1/δ). laplace-torch is a peer,
installed only by the bench extra; without it the table says so and lingp and MAP still run.

Usage: python benchmarks/bench_laplace.py [--backend numpy|cupy] [--quick] [--out DIR] [--peers all|fast|none]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import command_line, machine_info, pyplot, save_figure  # noqa: E402

FULL = {"n_train": 1200, "hidden": 64, "epochs": 1000}
QUICK = {"n_train": 200, "hidden": 8, "epochs": 100}
PRIOR_SCALE_TRAIN = 1.0  # s₀: the weight decay of training makes θ̂ the MAP of N(0, s₀ I)
TARGET_SPEEDUP = 50.0
ORACLE_FACTORS = (1 / 27, 1 / 9, 1 / 3, 1 / 1.7, 1.0, 1.7, 3.0)  # prior scales tried, relative to the evidence's
MC_SAMPLES = 1000
PEER_VARIANTS = {"full": ("all", "full"), "kron": ("all", "kron"), "last layer": ("last_layer", "kron")}
FAST_PEERS = ("kron", "last layer")
LAYERWISE_HIDDEN = "lingp full layerwise, hidden at θ̂ (probit)"
AVERAGED = "lingp full, averaged over s (probit)"
FULL_ROWS = ("lingp full (probit)", AVERAGED, "lingp full layerwise (probit)", LAYERWISE_HIDDEN)  # against the targets


# ----- data, network, metrics ---------------------------------------------------------------------------------------

def digits(n_train: int, seed: int = 0) -> tuple:
    """Standardized digits: (X_train, y_train, X_test, y_test); the test set is every image not used for training
    (597 for n_train = 1200)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(X))
    tr, te = perm[:n_train], perm[n_train:]
    mu, sd = X[tr].mean(axis=0), X[tr].std(axis=0) + 1e-8
    return ((X[tr] - mu) / sd).astype(np.float32), y[tr], ((X[te] - mu) / sd).astype(np.float32), y[te]


def train_mlp(X, y, hidden: int, epochs: int, device: str, seed: int = 0):
    """MLP in-hidden-10 with tanh, Adam (lr 1e-2, full batch) on the mean cross-entropy plus the N(0, s₀ I) prior."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(X.shape[1], hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10))
    model = model.to(device)
    x, t = torch.as_tensor(X, device=device), torch.as_tensor(y, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    decay = 1.0 / (len(X) * PRIOR_SCALE_TRAIN)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), t)
        loss = loss + 0.5 * decay * sum((p ** 2).sum() for p in model.parameters())
        loss.backward()
        opt.step()
    return model.eval()


def metrics(proba: np.ndarray, y: np.ndarray) -> dict:
    """Mean test NLL, accuracy and expected calibration error (15 bins) of (n, 10) probabilities, by the demo's
    metrics (validated inputs; a label given probability 0 gives an infinite NLL, not a clipped one)."""
    from lingp_core.demo import metrics as m

    return {"nll": m.negative_log_likelihood(proba, y), "accuracy": m.accuracy(proba, y),
            "ece": m.expected_calibration_error(proba, y)}


# ----- variants -----------------------------------------------------------------------------------------------------

def run_map(model, X_te, device: str) -> tuple[np.ndarray, float, dict]:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        proba = torch.softmax(model(torch.as_tensor(X_te, device=device)), dim=1).cpu().numpy().astype(np.float64)
    return proba, time.perf_counter() - start, {}


def run_lingp(model, X_tr, y_tr, X_te, backend_name: str, params, predictive: str, layerwise: bool = False,
              hidden_at_network: bool = False, averaged: bool = False) -> tuple[np.ndarray, float, dict]:
    """LaplaceClassifier with the prior N(0, s·I) on θ, s by the evidence; everything after training is timed.

    ``layerwise``: one s per layer (per Jacobian block), each starting at its weights' mean square, all by the
    evidence. ``hidden_at_network``: the prior of every layer but the last centred at the trained weights.
    ``averaged``: after the evidence's s, the predictions averaged over s (``average_prior_scale()``: 9 points
    within ±1 decade, weighted by the evidence)."""
    import torch

    import lingp_core as lg
    from lingp_core.laplace import LaplaceClassifier

    be = lg.get_backend(backend_name)
    device = next(model.parameters()).device
    x_tr, x_te = torch.as_tensor(X_tr, device=device), torch.as_tensor(X_te, device=device)
    be.synchronize()
    start = time.perf_counter()
    J = lg.export_jacobian(model, x_tr, params=params, backend=be)
    J_star = lg.export_jacobian(model, x_te, params=params, backend=be)
    theta = lg.parameter_vector(model, J)
    squares = theta.astype(np.float64) ** 2
    s0 = float(squares.sum()) / J.p  # the weights' own scale: a neutral start
    prior_mean = -theta
    if hidden_at_network:
        prior_mean[: J.p - J.block_sizes[-1]] = 0
    if layerwise:  # each layer's own scale
        starts = np.cumsum([0, *J.block_sizes])
        s0 = tuple(float(squares[a:b].sum()) / (b - a) for a, b in zip(starts[:-1], starts[1:]))
    clf = LaplaceClassifier(s0).fit(J, be.asarray(y_tr), prior_mean=prior_mean)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf.optimize_prior_scale(tol=1e-2, layerwise=layerwise)
        if averaged:
            clf.average_prior_scale()
    if predictive == "mc":
        proba = clf.predict_proba(J_star, method="mc", n_samples=MC_SAMPLES, seed=0)
    else:
        proba = clf.predict_proba(J_star)
    proba = be.to_numpy(proba)
    be.synchronize()
    elapsed = time.perf_counter() - start
    info = {"prior_scale": clf.prior_scale, "log_evidence": clf.log_evidence(), "p": J.p, "plan": str(clf.plan_),
            "evidence_steps": len(clf.prior_scale_history_) - 1, "newton": clf.fit_info_["newton_iterations"],
            "warnings": [str(w.message) for w in caught]}
    if averaged:
        info["averaging"] = {**clf.averaging_, "prior_scales": clf.mixture_scales_.tolist(),
                             "weights": clf.mixture_weights_.tolist()}
    return proba, elapsed, info


def nll_over_prior_scales(model, X_tr, y_tr, X_te, y_te, backend_name: str, s_evidence: float) -> dict:
    """Test NLL of lingp's full-network Laplace (probit) over a grid of fixed prior scales around the evidence's
    choice: the best a single prior scale could do on this test set (an oracle that uses the test labels, untimed)."""
    import torch

    import lingp_core as lg
    from lingp_core.laplace import LaplaceClassifier

    be = lg.get_backend(backend_name)
    device = "cuda" if be.name == "cupy" else "cpu"
    model = model.to(device)  # the peers' run moved it to the CPU
    J = lg.export_jacobian(model, torch.as_tensor(X_tr, device=device), backend=be)
    J_star = lg.export_jacobian(model, torch.as_tensor(X_te, device=device), backend=be)
    theta = lg.parameter_vector(model, J)
    grid = [s_evidence * f for f in ORACLE_FACTORS]
    nll = [metrics(be.to_numpy(LaplaceClassifier(s).fit(J, be.asarray(y_tr), prior_mean=-theta)
                               .predict_proba(J_star)), y_te)["nll"] for s in grid]
    best = int(np.argmin(nll))
    return {"prior_scales": grid, "nll": nll, "best_prior_scale": grid[best], "best_nll": nll[best]}


def run_peer(model, X_tr, y_tr, X_te, subset: str, structure: str) -> tuple[np.ndarray, float, dict]:
    """laplace-torch on CPU: fit, marginal-likelihood prior precision, GLM predictive with probit."""
    import torch
    from laplace import Laplace

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.as_tensor(X_tr),
                                                                        torch.as_tensor(y_tr)), batch_size=100)
    start = time.perf_counter()
    la = Laplace(model, "classification", subset_of_weights=subset, hessian_structure=structure)
    la.fit(loader)
    la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")
    proba = la(torch.as_tensor(X_te), pred_type="glm", link_approx="probit").detach().numpy().astype(np.float64)
    elapsed = time.perf_counter() - start
    delta = float(la.prior_precision.reshape(-1)[0])
    return proba, elapsed, {"prior_scale": 1.0 / delta, "prior_precision": delta}


def peer_available() -> str | None:
    """None when laplace-torch imports, else why not."""
    try:
        import laplace  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means the peer cannot run
        return f"laplace-torch not installed ({type(exc).__name__}); pip install laplace-torch (bench extra)"
    return None


# ----- the run ------------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    import torch

    sizes = QUICK if args.quick else FULL
    device = "cuda" if args.backend == "cupy" else "cpu"
    X_tr, y_tr, X_te, y_te = digits(sizes["n_train"])
    t0 = time.perf_counter()
    model = train_mlp(X_tr, y_tr, sizes["hidden"], sizes["epochs"], device)
    train_time = time.perf_counter() - t0
    rows = []

    def add(name: str, result: tuple | None, note: str = "") -> None:
        if result is None:
            rows.append({"variant": name, "skipped": note})
            return
        proba, elapsed, info = result
        rows.append({"variant": name, "time_s": elapsed, **metrics(proba, y_te), **info, "note": note})
        print(f"  {name}: {elapsed:.3g} s", flush=True)

    add("MAP", run_map(model, X_te, device))
    # one untimed run first: CUDA kernel compilation on CuPy; on NumPy the allocator's and BLAS threads' start-up
    # (every later row, laplace-torch's included, runs after it); its time is kept as first_call_s
    first_call = run_lingp(model, X_tr, y_tr, X_te, args.backend, None, "probit")[1]
    add("lingp full (probit)", run_lingp(model, X_tr, y_tr, X_te, args.backend, None, "probit"))
    rows[-1]["first_call_s"] = first_call
    add("lingp full (MC)", run_lingp(model, X_tr, y_tr, X_te, args.backend, None, "mc"))
    add(AVERAGED, run_lingp(model, X_tr, y_tr, X_te, args.backend, None, "probit", averaged=True))
    add("lingp full layerwise (probit)", run_lingp(model, X_tr, y_tr, X_te, args.backend, None, "probit",
                                                   layerwise=True))
    add(LAYERWISE_HIDDEN, run_lingp(model, X_tr, y_tr, X_te, args.backend, None, "probit", layerwise=True,
                                    hidden_at_network=True))
    add("lingp last layer (probit)", run_lingp(model, X_tr, y_tr, X_te, args.backend, "last_layer", "probit"))
    missing = peer_available()
    wanted = {"all": tuple(PEER_VARIANTS), "fast": FAST_PEERS, "none": ()}[args.peers]
    if args.quick:
        wanted = tuple(v for v in wanted if v in FAST_PEERS)
    cpu_model = model.to("cpu")  # laplace-torch runs on the CPU build of torch in the reference setup
    torch.set_grad_enabled(True)
    for variant, (subset, structure) in PEER_VARIANTS.items():
        name = f"laplace-torch {variant}"
        if missing:
            add(name, None, missing)
        elif variant not in wanted:
            add(name, None, "skipped (--quick or --peers)")
        else:
            add(name, run_peer(cpu_model, X_tr, y_tr, X_te, subset, structure))
    baseline = next((r for r in rows if r["variant"] == "laplace-torch full" and "time_s" in r), None)
    for r in rows:
        if baseline is not None and "time_s" in r and r["variant"] != "MAP":
            r["speedup_vs_peer_full"] = baseline["time_s"] / r["time_s"]
    targets = {}
    ours = next(r for r in rows if r["variant"] == "lingp full (probit)")
    oracle = nll_over_prior_scales(model, X_tr, y_tr, X_te, y_te, args.backend, ours["prior_scale"])
    peers = [r for r in rows if r["variant"].startswith("laplace-torch") and "nll" in r]
    map_row = rows[0]
    for row in (r for r in rows if r["variant"] in FULL_ROWS):
        # the scalar row's targets keep their plain names; the layerwise rows' are suffixed with the variant
        suffix = "" if row is ours else ", " + row["variant"].removeprefix("lingp full ").removesuffix(" (probit)")
        if baseline is not None:
            targets[f"speedup{suffix}"] = {"target": TARGET_SPEEDUP, "measured": row["speedup_vs_peer_full"],
                                           "met": row["speedup_vs_peer_full"] >= TARGET_SPEEDUP}
        if peers:
            best = min(r["nll"] for r in peers)
            targets[f"nll_vs_best_peer{suffix}"] = {"best_peer_nll": best, "lingp_nll": row["nll"],
                                                    "met": row["nll"] <= best}
        targets[f"accuracy_vs_map{suffix}"] = {"map": map_row["accuracy"], "lingp": row["accuracy"],
                                               "met": row["accuracy"] >= map_row["accuracy"]}
    return {"benchmark": "bench_laplace", "quick": args.quick, "backend": args.backend, "sizes": sizes,
            "n_test": int(len(y_te)), "train_time_s": train_time, "load_average": os.getloadavg(),
            "machine": machine_info(args.backend), "rows": rows, "targets": targets, "peer_missing": missing,
            "oracle_prior_scale": oracle}


def print_table(data: dict) -> None:
    print(f"\ndigits: {data['sizes']['n_train']} train / {data['n_test']} test, MLP hidden {data['sizes']['hidden']}, "
          f"backend {data['backend']}, load average {data['load_average'][0]:.1f}")
    head = f"| {'variant':<44} | {'time [s]':>9} | {'vs LT full':>10} | {'test NLL':>8} | {'acc':>6} | {'ECE':>6} | " \
           f"{'prior s':>9} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in data["rows"]:
        if "skipped" in r:
            print(f"| {r['variant']:<44} | {'—':>9} | {'—':>10} | {'—':>8} | {'—':>6} | {'—':>6} | {'—':>9} | "
                  f"{r['skipped']}")
            continue
        speed = f"{r['speedup_vs_peer_full']:.1f}×" if "speedup_vs_peer_full" in r else "—"
        s = _scale_text(r["prior_scale"]) if "prior_scale" in r else "—"
        print(f"| {r['variant']:<44} | {r['time_s']:>9.3g} | {speed:>10} | {r['nll']:>8.4f} | {r['accuracy']:>6.4f} | "
              f"{r['ece']:>6.4f} | {s:>9} |")
    ours = next(r for r in data["rows"] if r["variant"] == "lingp full (probit)")
    print(f"lingp full (probit): first call in the process {ours['first_call_s']:.3g} s (untimed warm-up), "
          f"timed run {ours['time_s']:.3g} s")
    oracle = data["oracle_prior_scale"]
    print(f"lingp full (probit) over fixed prior scales (oracle on the test labels): best test NLL "
          f"{oracle['best_nll']:.4f} at s = {oracle['best_prior_scale']:.3g}; all: "
          + ", ".join(f"{s:.3g}→{v:.4f}" for s, v in zip(oracle["prior_scales"], oracle["nll"])))
    for name, t in data["targets"].items():
        print(f"target {name}: {'met' if t['met'] else 'NOT met'} ({ {k: v for k, v in t.items() if k != 'met'} })")


def _scale_text(s) -> str:
    """A prior variance, or one per layer as (s₁, s₂, …)."""
    return f"{s:.3g}" if isinstance(s, float) else "(" + ", ".join(f"{x:.3g}" for x in s) + ")"


def plot(data: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = [r for r in data["rows"] if "time_s" in r]
    names = [r["variant"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    kinds = [("MAP", "tab:gray"), ("lingp", "tab:blue"), ("laplace-torch", "tab:orange")]
    colors = [next(c for k, c in kinds if n.startswith(k)) for n in names]
    a1.barh(names, [r["time_s"] for r in rows], color=colors)
    for kind, color in kinds:
        a1.barh([names[0]], [0], color=color, label=kind)  # legend entries only
    a1.set_xscale("log")
    a1.set_xlabel(f"time [s] (log), backend {data['backend']}")
    a1.invert_yaxis()
    a2.barh(names, [r["nll"] for r in rows], color=colors)
    a2.set_xlabel(f"test NLL (lower is better), {data['n_test']} test images")
    a2.set_yticks([])
    a2.invert_yaxis()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds); skips slow laplace-torch variants")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_laplace"))
    parser.add_argument("--peers", choices=("all", "fast", "none"), default="all",
                        help="laplace-torch variants to run: all, fast (kron and last layer) or none")
    args = parser.parse_args(argv)
    data = run(args)
    data["command"] = command_line(__file__, argv)
    print_table(data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_laplace_{args.backend}{'_quick' if args.quick else ''}"  # a quick run keeps the full result
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2, default=float))
    plot(data, out / f"{stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
