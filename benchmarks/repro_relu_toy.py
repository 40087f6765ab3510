#!/usr/bin/env python3
"""The inductive-bias toy of Maddox et al. (2021): GP posteriors with the Jacobian kernel of one-hidden-layer ReLU
networks of growing width, untrained (at initialization) and trained, against the networks themselves.

Data: 300 points, half from x ~ N(−5, 0.8²) and half from x ~ N(+5, 0.8²), y = 0.1·x² + |x| + 0.9·ε, ε ~ N(0, 1);
a second draw of 300 points is the test set. Networks: 1-w-1 ReLU MLPs (float64, PyTorch's default initialization,
the same seed for every width), trained by full-batch Adam (2000 steps, lr 1e-2, cosine-annealed) on the MSE.

For each width and state, lingp fits the GP with kernel s·J(x)J(x')ᵀ and mean f(x; θ) (θ the initial or trained
weights) and predicts on a grid over [−12, 12], with two choices of the prior scale s and noise σ²:
- "matched": s = var(y) / mean diag(J Jᵀ) over the training inputs — the same prior variance of f on the data for
  every network, so only the kernels' shapes differ — and σ² = 0.81, the true noise;
- chosen from the data by --lingp-hyperparameters (the setting is named after it): "evidence" (ML-II) takes s and
  σ² maximizing the marginal likelihood — for trained networks whose residuals are already pure noise it drives s
  towards 0: the evidence then says the network needs no correction, and the bands vanish; "loo" maximizes the
  leave-one-out predictive density, "map" the evidence times a data-scaled log-normal hyperprior, "average" /
  "average-map" average the GP over a log grid of (s, σ²) weighted by evidence (× that hyperprior); the averaged rows
  keep the grid points and weights ("mixture"); "layerwise-average[-map]" (default "layerwise-average-map") average
  over per-layer prior weights too (lingp_core.BlockWeightAverage; the rows keep every component: "layerwise").
The table reports test RMSE of the network and of the GP mean, the GP's test negative log predictive density (latent
variance plus σ² — for averaging the mixture's variance plus its mean σ², a Gaussian with the mixture's moments —
per point), and the GP's mean latent standard deviation in three regions: on the data
(4 ≤ |x| ≤ 6), between the clusters (|x| ≤ 1) and far outside (|x| ≥ 10): how each kernel's uncertainty grows away
from the data.
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

NAME = "repro_relu_toy"
REGIONS = {"data": (4.0, 6.0), "gap": (0.0, 1.0), "outside": (10.0, np.inf)}  # ranges of |x|
NOISE_STD = 0.9


def parse_args(argv: list[str] | None = None):
    parser = repro_parser(NAME, __doc__)
    parser.add_argument("--widths", type=int, nargs="+", help="hidden widths (default 5 50 500 5000, quick 5 50)")
    parser.add_argument("--n", type=int, help="training points (default 300, quick 100)")
    parser.add_argument("--steps", type=int, help="Adam steps (default 2000, quick 200)")
    bl.add_hyperparameters_option(parser)
    bl.add_prior_option(parser, default="weights")
    args = parser.parse_args(argv)
    args.widths = args.widths or ([5, 50] if args.quick else [5, 50, 500, 5000])
    args.n = args.n or (100 if args.quick else 300)
    args.steps = args.steps or (200 if args.quick else 2000)
    set_torch_threads(args.torch_threads)
    return args


def settings(choice: str) -> tuple[str, str]:
    """The two settings of (s, σ²) the toy compares: "matched" and the --lingp-hyperparameters choice."""
    return ("matched", choice)


def toy_data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n points, half around −5 and half around +5, with y = 0.1x² + |x| + 0.9ε."""
    centers = np.where(np.arange(n) < n // 2, -5.0, 5.0)
    x = centers + 0.8 * rng.standard_normal(n)
    return x, 0.1 * x**2 + np.abs(x) + NOISE_STD * rng.standard_normal(n)


def relu_net(width: int, seed: int, device: str):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, 1)).double().to(device).eval()


def column(values: np.ndarray, device: str):
    import torch

    return torch.as_tensor(np.asarray(values, dtype=np.float64)[:, None], device=device)


def region_std(x: np.ndarray, std: np.ndarray) -> dict:
    return {name: float(std[(np.abs(x) >= lo) & (np.abs(x) <= hi)].mean()) for name, (lo, hi) in REGIONS.items()}


def run(args) -> dict:
    import copy

    device = bl.torch_device(args.backend)
    rng = np.random.default_rng(args.seed)
    x, y = toy_data(rng, args.n)
    x_test, y_test = toy_data(rng, args.n)
    grid = np.linspace(-12.0, 12.0, 241)
    inputs = np.concatenate([x_test, grid])                  # one GP prediction for the test set and the grid
    rows, curves = [], []
    for width in progress(args.widths, enabled=not args.no_progress, desc="widths"):
        untrained = relu_net(width, args.seed, device)
        trained = copy.deepcopy(untrained)
        losses = bl.train_mse(trained, column(x, device), column(y, device), steps=args.steps, lr=1e-2,
                              seed=args.seed)
        for state, model in (("untrained", untrained), ("trained", trained)):
            net = bl.to_numpy(bl.predict(model, column(inputs, device)))[:, 0]
            n_test = x_test.shape[0]
            jacobians = bl.export_pair(model, column(x, device), column(inputs, device), args.backend)  # both settings
            for setting in settings(args.lingp_hyperparameters):
                matched = setting == "matched"
                gp = bl.linearized_gp(model, column(x, device), column(y, device), column(inputs, device),
                                      backend=args.backend, jacobians=jacobians,
                                      fixed=(float(np.var(y)), NOISE_STD**2) if matched else None,
                                      hyperparameters=None if matched else setting,
                                      prior="network" if matched else args.lingp_prior)
                mean, var = gp["mean"][:, 0], gp["var"][:, 0]
                predictive = var[:n_test] + gp["predictive_noise"]
                nlpd = 0.5 * np.mean(np.log(2 * np.pi * predictive) + (y_test - mean[:n_test]) ** 2 / predictive)
                rows.append({"width": width, "state": state, "setting": setting, "p": gp["p"],
                             "train_mse_end": losses[-1], "prior_scale": gp["prior_scale"], "noise": gp["noise"],
                             "predictive_noise": gp["predictive_noise"],
                             "mixture": gp["averaging"]["mixture"] if gp["averaging"] else None,
                             "layerwise": gp.get("layerwise"),
                             "log_marginal_likelihood": gp["log_marginal_likelihood"], "plan": gp["plan"],
                             "net_test_rmse": float(np.sqrt(np.mean((net[:n_test] - y_test) ** 2))),
                             "gp_test_rmse": float(np.sqrt(np.mean((mean[:n_test] - y_test) ** 2))),
                             "gp_test_nlpd": float(nlpd),
                             "gp_std": region_std(grid, np.sqrt(var[n_test:]))})
                curves.append({"width": width, "state": state, "setting": setting,
                               "gp_mean": mean[n_test:].tolist(), "gp_std": np.sqrt(var[n_test:]).tolist(),
                               "network": net[n_test:].tolist()})
    return {"name": NAME, "quick": args.quick, "seed": args.seed, "backend": args.backend, "command": args.command,
            "lingp_hyperparameters": args.lingp_hyperparameters,
            "lingp_prior": args.lingp_prior, "machine": machine_info(args.backend),
            "description": __doc__,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": rows, "data": {"x": x.tolist(), "y": y.tolist(), "grid": grid.tolist()}, "curves": curves}


def table(result: dict) -> str:
    rows = [[r["width"], r["state"], r["setting"], r["p"], f"{r['prior_scale']:.3g}", f"{r['noise']:.3g}",
             f"{r['log_marginal_likelihood']:.1f}", f"{r['net_test_rmse']:.3f}", f"{r['gp_test_rmse']:.3f}",
             f"{r['gp_test_nlpd']:.3f}", f"{r['gp_std']['data']:.3f}", f"{r['gp_std']['gap']:.3f}",
             f"{r['gp_std']['outside']:.3f}"] for r in result["rows"]]
    return markdown_table(["width", "network", "s, σ²", "p", "s", "σ²", "log ML", "net test RMSE", "GP test RMSE",
                           "GP test NLPD", "GP σ on data", "GP σ in gap", "GP σ far out"], rows)


def plot(result: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    widths = result["config"]["widths"]
    panels = [(state, setting) for state in ("untrained", "trained")
              for setting in settings(result["lingp_hyperparameters"])]
    fig, axes = plt.subplots(len(panels), len(widths), figsize=(3.2 * len(widths), 2.6 * len(panels)),
                             sharex=True, sharey=True, squeeze=False)
    data, grid = result["data"], np.asarray(result["data"]["grid"])
    for curve in result["curves"]:
        ax = axes[panels.index((curve["state"], curve["setting"])), widths.index(curve["width"])]
        mean, std = np.asarray(curve["gp_mean"]), np.asarray(curve["gp_std"])
        ax.plot(data["x"], data["y"], ".", color="0.6", ms=3, label="data")
        ax.fill_between(grid, mean - 2 * std, mean + 2 * std, color="C0", alpha=0.3, label="GP ± 2σ (latent)")
        ax.plot(grid, mean, "C0", label="GP mean")
        ax.plot(grid, curve["network"], "C3--", label="network")
        ax.set_title(f"width {curve['width']}, {curve['state']}\n{curve['setting']} s, σ²", fontsize=9)
        ax.set_ylim(-10, 30)
    for ax in axes[-1]:
        ax.set_xlabel("x")
    save_figure(fig, path)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def headline(result: dict) -> str:
        return (f"ReLU toy: {args.n} points, widths {args.widths}, s and σ² matched or by "
                f"{args.lingp_hyperparameters}, backend {args.backend}")

    return run_repro(__file__, argv, args, run, headline, table, plot, NAME)


if __name__ == "__main__":
    raise SystemExit(main())
