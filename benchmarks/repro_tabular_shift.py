#!/usr/bin/env python3
"""Regression under covariate shift on bundled tabular data: a stand-in for the malaria 2012 → 2016 transfer of
Maddox et al. (2021), where a network trained on one year's data is adapted to another year's with few points.

Data: scikit-learn's diabetes set (442 patients, 10 covariates, disease progression after a year; bundled, nothing
downloads), split by body-mass index at its median: the source is the patients with the lower BMI, the target those
with the higher BMI (a shift in the covariates and in the targets: progression grows with BMI, so the target asks
the network to extrapolate). Covariates and target are standardized with the source's statistics.
- source network: a 10-50-50-1 tanh MLP (float64) trained by full-batch Adam (1500 steps, lr 1e-3, L2 weight decay
  0.1, cosine-annealed) on 80% of the source; the other 20% give its in-domain RMSE;
- target: each repeat shuffles the target patients into a test set of 100 and a pool; the adaptation sets are the
  pool's first 10, 20, 50, 100 patients (nested). 20 repeats (quick: 2 repeats, sizes 10 and 20).

Methods on each adaptation set: the source network unadapted; lingp (Jacobian kernel GP of all parameters; its prior
centred by --lingp-prior, default the network and the network with its output layer at 0, averaged by marginal
likelihood; prior scale and noise by --lingp-hyperparameters, default averaged over per-layer prior weights and a log
grid of (s, σ²) weighted by marginal likelihood × a data-scaled hyperprior); last-layer retraining (Adam, 500 steps,
lr 1e-2); fine-tuning of all weights (Adam, 200 steps, lr 1e-3); ABLR-style Bayesian last layer (Bayesian
linear regression on the 50 last hidden features, evidence-optimized); and, to show what the network adds at
all, Bayesian linear regression on the 10 covariates of the adaptation set alone ("target-only linear").
Reported: test RMSE in the target's own units, mean ± standard error over the repeats. (--quick: 300 source steps,
100 last-layer and 50 fine-tuning steps: a smoke run, not a result.)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _baselines as bl  # noqa: E402
from benchmarks._common import (  # noqa: E402
    machine_info,
    markdown_table,
    progress,
    pyplot,
    repro_parser,
    run_repro,
    save_figure,
    set_torch_threads,
)

NAME = "repro_tabular_shift"
SPLIT_FEATURE = 2  # body-mass index in load_diabetes
LABELS = {"source": "source net", "lingp": "lingp", "last_layer": "last layer", "fine_tune": "fine-tune",
          "ablr": "ABLR", "target_linear": "target-only linear"}
NETWORK_METHODS = ("source", "lingp", "last_layer", "fine_tune", "ablr")


def parse_args(argv: list[str] | None = None):
    parser = repro_parser(NAME, __doc__)
    parser.add_argument("--sizes", type=int, nargs="+", help="adaptation set sizes (default 10 20 50 100)")
    parser.add_argument("--repeats", type=int, help="random target splits (default 20, quick 2)")
    parser.add_argument("--source-steps", type=int, help="Adam steps on the source (default 1500, quick 300)")
    bl.add_hyperparameters_option(parser)
    bl.add_prior_option(parser)
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([10, 20] if args.quick else [10, 20, 50, 100])
    args.repeats = args.repeats or (2 if args.quick else 20)
    args.source_steps = args.source_steps or (300 if args.quick else 1500)
    set_torch_threads(args.torch_threads)
    return args


def shifted_diabetes(rng: np.random.Generator) -> dict:
    """Standardized (with source statistics) source train/validation and target arrays, and the target scale."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True, scaled=False)
    in_source = x[:, SPLIT_FEATURE] <= np.median(x[:, SPLIT_FEATURE])
    x_src, y_src = x[in_source], y[in_source]
    mu, sd = x_src.mean(0), x_src.std(0)
    y_mu, y_sd = y_src.mean(), y_src.std()
    scale = lambda a, b: ((a - mu) / sd, (b - y_mu) / y_sd)  # noqa: E731
    order = rng.permutation(len(y_src))
    n_train = int(round(0.8 * len(y_src)))
    return {"train": scale(x_src[order[:n_train]], y_src[order[:n_train]]),
            "validation": scale(x_src[order[n_train:]], y_src[order[n_train:]]),
            "target": scale(x[~in_source], y[~in_source]), "y_scale": float(y_sd),
            "bmi_median": float(np.median(x[:, SPLIT_FEATURE])),
            "target_mean_shift": float((y[~in_source].mean() - y_mu) / y_sd)}


def tensor(values: np.ndarray, device: str):
    import torch

    return torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)


def source_network(args, data: dict, device: str):
    import torch

    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 50), torch.nn.Tanh(), torch.nn.Linear(50, 50), torch.nn.Tanh(),
                                torch.nn.Linear(50, 1)).double().to(device)
    x, y = data["train"]
    bl.train_mse(model, tensor(x, device), tensor(y[:, None], device), steps=args.source_steps, lr=1e-3,
                 weight_decay=1e-1, seed=args.seed)
    return model


def run(args) -> dict:
    device = bl.torch_device(args.backend)
    rng = np.random.default_rng(args.seed)
    data = shifted_diabetes(rng)
    model = source_network(args, data, device)
    rmse = lambda pred, y: float(data["y_scale"] * np.sqrt(np.mean((pred - y) ** 2)))  # noqa: E731
    x_val, y_val = data["validation"]
    x_tgt, y_tgt = data["target"]
    n_test = 100
    if max(args.sizes) > len(y_tgt) - n_test:
        raise SystemExit(f"the largest adaptation set ({max(args.sizes)}) exceeds the pool ({len(y_tgt) - n_test})")
    runs = []
    for repeat in progress(range(args.repeats), enabled=not args.no_progress, desc="repeats"):
        order = rng.permutation(len(y_tgt))
        test, pool = order[:n_test], order[n_test:]
        for size in args.sizes:
            chosen = pool[:size]
            preds = bl.adapt_and_predict(model, tensor(x_tgt[chosen], device), tensor(y_tgt[chosen][:, None], device),
                                         tensor(x_tgt[test], device), methods=NETWORK_METHODS, backend=args.backend,
                                         seed=args.seed + repeat,
                                         last_layer={"steps": 100 if args.quick else 500, "lr": 1e-2},
                                         fine_tuning={"steps": 50 if args.quick else 200, "lr": 1e-3},
                                         lingp_hyperparameters=args.lingp_hyperparameters,
                                         lingp_prior=args.lingp_prior)
            errors = {m: rmse(preds[m]["mean"][:, 0], y_tgt[test]) for m in NETWORK_METHODS}
            linear = bl.BayesianLinearRegression().fit(x_tgt[chosen], y_tgt[chosen])
            errors["target_linear"] = rmse(linear.predict(x_tgt[test])[0], y_tgt[test])
            runs.append({"repeat": repeat, "size": size, "rmse": errors,
                         "seconds": {m: preds[m]["seconds"] for m in NETWORK_METHODS},
                         "lingp": bl.lingp_record(preds["lingp"])})
    summary = []
    for size in args.sizes:
        at = [r for r in runs if r["size"] == size]
        row: dict = {"size": size}
        for m in LABELS:
            row[m] = dict(zip(("mean", "stderr"), bl.mean_and_stderr([r["rmse"][m] for r in at])))
        row["lingp_better_than"] = {m: int(sum(r["rmse"]["lingp"] < r["rmse"][m] for r in at))
                                    for m in LABELS if m != "lingp"}
        row["lingp_over_fine_tune_seconds"] = float(np.mean([r["seconds"]["lingp"] / r["seconds"]["fine_tune"]
                                                             for r in at]))
        summary.append(row)
    return {"name": NAME, "quick": args.quick, "seed": args.seed, "backend": args.backend, "command": args.command,
            "lingp_hyperparameters": args.lingp_hyperparameters,
            "lingp_prior": args.lingp_prior, "machine": machine_info(args.backend),
            "description": __doc__, "p": bl.count_parameters(model),
            "split": {"feature": "bmi", "median": data["bmi_median"], "source_train": int(len(data["train"][1])),
                      "source_validation": int(len(y_val)), "target": int(len(y_tgt)),
                      "target_mean_shift_in_source_sds": data["target_mean_shift"]},
            "source_validation_rmse": rmse(bl.to_numpy(bl.predict(model, tensor(x_val, device)))[:, 0], y_val),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "summary": summary, "runs": runs}


def table(result: dict) -> str:
    rows = [[row["size"]] + [f"{row[m]['mean']:.1f} ± {row[m]['stderr']:.1f}" for m in LABELS]
            + [f"{row['lingp_better_than']['fine_tune']}/{result['config']['repeats']}",
               f"{row['lingp_over_fine_tune_seconds']:.2f}"] for row in result["summary"]]
    return markdown_table(["adaptation patients"] + [f"{LABELS[m]} RMSE" for m in LABELS]
                          + ["lingp beats fine-tune", "lingp time / fine-tune time"], rows)


def plot(result: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sizes = [row["size"] for row in result["summary"]]
    for i, (m, label) in enumerate(LABELS.items()):
        ax.errorbar(sizes, [row[m]["mean"] for row in result["summary"]],
                    yerr=[row[m]["stderr"] for row in result["summary"]], color=f"C{i}", marker="o", capsize=3,
                    ls="--" if m in ("source", "target_linear") else "-", label=label)
    ax.axhline(result["source_validation_rmse"], color="0.5", lw=0.8, ls=":", label="source net, in-domain")
    ax.set(xscale="log", xlabel="adaptation patients (BMI above the median)",
           ylabel="test RMSE (disease progression)", title="Diabetes: low-BMI source → high-BMI target")
    save_figure(fig, path)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def headline(result: dict) -> str:
        split = result["split"]
        return (f"Diabetes split at BMI {split['median']:.1f}: {split['source_train']} source training patients "
                f"(in-domain RMSE {result['source_validation_rmse']:.1f} on {split['source_validation']} held out), "
                f"{split['target']} target patients, p = {result['p']}, {args.repeats} repeat(s), lingp's s and σ² "
                f"by {args.lingp_hyperparameters}, backend {args.backend}")

    return run_repro(__file__, argv, args, run, headline, table, plot, NAME)


if __name__ == "__main__":
    raise SystemExit(main())
