#!/usr/bin/env python3
"""Few-shot sinusoid transfer (Maddox et al., 2021, after Finn et al., 2017): lingp against last-layer retraining,
fine-tuning and an ABLR-style Bayesian last layer.

Tasks: y = A·sin(w·x + b) + ε, A ~ U[0.1, 5], b ~ U[0, 2π], w ~ U[0.5, 2], ε ~ N(0, (0.01·A)²), x ~ U[−5, 5].

Protocol (ours; the paper's source-training details are not reproduced):
- source network: a 1-40-40-1 tanh MLP (float64), trained by full-batch Adam (4000 steps, lr 1e-2, cosine). Two
  choices (--source):
  multitask (default, ABLR's setting): the 1-40-40 trunk is trained jointly on 50 source tasks drawn from the family
    (50 noisy points each), with one linear head per task; the source network is the trunk followed by the average
    head;
  single: the whole network trained on 1000 noisy points of ONE reference task in the middle of the family
    (A = 2.55, w = 1.25, b = π);
- each new task: 10 context points (noisy), 200 test points on a grid over [−5, 5] scored against the noiseless
  function; MSE per task, then mean ± standard error over the tasks (100 full, 2 quick); for the two Bayesian
  methods also the fraction of the test grid where the true function lies within the latent mean ± 2σ;
- methods, each on exactly the same context points: the source network unadapted; lingp (Jacobian kernel GP of all
  1761 parameters; its prior centred by --lingp-prior, default the network and the network with its output layer at 0,
  averaged by marginal likelihood; prior scale and noise by --lingp-hyperparameters, default averaged over per-layer
  prior weights and a log grid of (s, σ²) weighted by marginal likelihood × a data-scaled hyperprior);
  last-layer retraining (Adam, 500 steps, lr 1e-2, cosine); fine-tuning of all weights (Adam, 300 steps, lr 1e-2,
  cosine); the same fine-tuning recipe on the network's first-order Taylor expansion f(x; θ̂) + J(x)(θ − θ̂)
  ("linearized fine-tune": what fine-tuning's training reaches on lingp's linear model); ABLR-style Bayesian linear
  regression on the 40 last hidden features plus a constant, α and β by the
  evidence.
--quick (a smoke run, not a result): 10 source tasks, 300 source steps, 2 new tasks, 100 last-layer and 50
fine-tuning steps.
"""
from __future__ import annotations

import math
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

NAME = "repro_sinusoid"
SOURCE_TASK = {"amplitude": 2.55, "frequency": 1.25, "phase": math.pi}
LABELS = {"source": "source net", "lingp": "lingp", "last_layer": "last layer", "fine_tune": "fine-tune",
          "linearized_fine_tune": "linearized fine-tune", "ablr": "ABLR"}


def parse_args(argv: list[str] | None = None):
    parser = repro_parser(NAME, __doc__)
    parser.add_argument("--tasks", type=int, help="new tasks to adapt to (default 100, quick 3)")
    parser.add_argument("--context", type=int, default=10, help="context points per new task (default 10)")
    parser.add_argument("--source", choices=("multitask", "single"), default="multitask",
                        help="how the source network is trained (see above; default multitask)")
    parser.add_argument("--source-tasks", type=int, help="source tasks for --source multitask (default 50, quick 10)")
    parser.add_argument("--source-points", type=int, default=50, help="points per source task (default 50)")
    parser.add_argument("--source-steps", type=int, help="Adam steps on the source data (default 4000, quick 300)")
    parser.add_argument("--last-layer-steps", type=int, help="default 500, quick 100")
    parser.add_argument("--last-layer-lr", type=float, default=1e-2)
    parser.add_argument("--fine-tune-steps", type=int, help="default 300, quick 50")
    parser.add_argument("--fine-tune-lr", type=float, default=1e-2)
    bl.add_hyperparameters_option(parser)
    bl.add_prior_option(parser)
    args = parser.parse_args(argv)
    args.tasks = args.tasks or (2 if args.quick else 100)
    args.last_layer_steps = args.last_layer_steps or (100 if args.quick else 500)
    args.fine_tune_steps = args.fine_tune_steps or (50 if args.quick else 300)
    args.source_steps = args.source_steps or (300 if args.quick else 4000)
    args.source_tasks = args.source_tasks or (10 if args.quick else 50)
    set_torch_threads(args.torch_threads)
    return args


def sinusoid(x: np.ndarray, task: dict) -> np.ndarray:
    return task["amplitude"] * np.sin(task["frequency"] * x + task["phase"])


def draw_task(rng: np.random.Generator) -> dict:
    return {"amplitude": float(rng.uniform(0.1, 5.0)), "frequency": float(rng.uniform(0.5, 2.0)),
            "phase": float(rng.uniform(0.0, 2 * np.pi))}


def noisy_sample(rng: np.random.Generator, task: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(-5.0, 5.0, size=n)
    return x, sinusoid(x, task) + 0.01 * task["amplitude"] * rng.standard_normal(n)


def column(values: np.ndarray, device: str):
    import torch

    return torch.as_tensor(np.asarray(values, dtype=np.float64)[:, None], device=device)


def mlp(device: str, outputs: int = 1):
    import torch

    return torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.Tanh(), torch.nn.Linear(40, 40), torch.nn.Tanh(),
                               torch.nn.Linear(40, outputs)).double().to(device)


def own_heads(model, task_index):
    """A module whose output row i is head ``task_index[i]`` of ``model``'s multi-head output: each source point is
    fitted by its own task's head."""
    import torch

    class OwnHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x).gather(1, task_index)

    return OwnHead()


def source_network(args, device: str, rng: np.random.Generator):
    """The trained 1-40-40-1 tanh source MLP (see --source) and its final training MSE."""
    import torch

    torch.manual_seed(args.seed)
    if args.source == "single":
        model = mlp(device)
        x, y = noisy_sample(rng, SOURCE_TASK, 1000)
        losses = bl.train_mse(model, column(x, device), column(y, device), steps=args.source_steps, lr=1e-2,
                              seed=args.seed)
        return model, losses[-1]
    multi = mlp(device, outputs=args.source_tasks)
    samples = [noisy_sample(rng, draw_task(rng), args.source_points) for _ in range(args.source_tasks)]
    x = np.concatenate([s[0] for s in samples])
    y = np.concatenate([s[1] for s in samples])
    task_index = torch.arange(args.source_tasks, device=device).repeat_interleave(args.source_points)[:, None]
    losses = bl.train_mse(own_heads(multi, task_index), column(x, device), column(y, device),
                          steps=args.source_steps, lr=1e-2, seed=args.seed)
    model = mlp(device)
    with torch.no_grad():
        for target, trained in zip(model[:4].parameters(), multi[:4].parameters()):
            target.copy_(trained)
        model[4].weight.copy_(multi[4].weight.mean(0, keepdim=True))
        model[4].bias.copy_(multi[4].bias.mean(0, keepdim=True))
    return model.eval(), losses[-1]


def run(args) -> dict:
    device = bl.torch_device(args.backend)
    rng = np.random.default_rng(args.seed)
    model, source_loss = source_network(args, device, rng)
    x_test = np.linspace(-5.0, 5.0, 200)
    methods = list(LABELS)
    tasks = []
    for t in progress(range(args.tasks), enabled=not args.no_progress, desc="tasks"):
        task = draw_task(rng)
        x_ctx, y_ctx = noisy_sample(rng, task, args.context)
        preds = bl.adapt_and_predict(model, column(x_ctx, device), column(y_ctx, device), column(x_test, device),
                                     methods=methods, backend=args.backend, seed=args.seed + t,
                                     last_layer={"steps": args.last_layer_steps, "lr": args.last_layer_lr},
                                     fine_tuning={"steps": args.fine_tune_steps, "lr": args.fine_tune_lr},
                                     lingp_hyperparameters=args.lingp_hyperparameters,
                                     lingp_prior=args.lingp_prior)
        truth = sinusoid(x_test, task)
        covered = {m: float(np.mean(np.abs(preds[m]["mean"][:, 0] - truth) <= 2 * np.sqrt(preds[m]["var"][:, 0])))
                   for m in methods if preds[m]["var"] is not None}
        row = {"task": task, "mse": {m: float(np.mean((preds[m]["mean"][:, 0] - truth) ** 2)) for m in methods},
               "coverage_2sd": covered,
               "seconds": {m: preds[m]["seconds"] for m in methods},
               "lingp": bl.lingp_record(preds["lingp"]),
               "ablr": {k: preds["ablr"][k] for k in ("alpha", "beta", "log_evidence")}}
        if t == 0:
            example = {"task": task, "x_context": x_ctx.tolist(), "y_context": y_ctx.tolist(),
                       "x_test": x_test.tolist(), "truth": truth.tolist(),
                       "mean": {m: preds[m]["mean"][:, 0].tolist() for m in methods},
                       "lingp_std": np.sqrt(preds["lingp"]["var"][:, 0]).tolist()}
        tasks.append(row)
    summary = {}
    for m in methods:
        mean, stderr = bl.mean_and_stderr([r["mse"][m] for r in tasks])
        summary[m] = {"mse_mean": mean, "mse_stderr": stderr,
                      "mse_median": float(np.median([r["mse"][m] for r in tasks])),
                      "seconds_mean": float(np.mean([r["seconds"][m] for r in tasks]))}
        if m in tasks[0]["coverage_2sd"]:
            summary[m]["coverage_2sd"] = float(np.mean([r["coverage_2sd"][m] for r in tasks]))
    wins = {m: int(sum(r["mse"]["lingp"] < r["mse"][m] for r in tasks)) for m in methods if m != "lingp"}
    return {"name": NAME, "quick": args.quick, "seed": args.seed, "backend": args.backend,
            "command": args.command, "lingp_hyperparameters": args.lingp_hyperparameters,
                                     "lingp_prior": args.lingp_prior,
            "machine": machine_info(args.backend), "protocol": __doc__.split("Protocol", 1)[1].strip(),
            "source": args.source, "source_task": SOURCE_TASK if args.source == "single" else None,
            "source_final_train_mse": source_loss, "p": bl.count_parameters(model),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "summary": summary, "lingp_better_than": wins, "tasks": tasks, "example": example}


def table(result: dict) -> str:
    time_base = result["summary"]["fine_tune"]["seconds_mean"]
    rows = []
    for m, s in result["summary"].items():
        better = "—" if m == "lingp" else f"{result['lingp_better_than'][m]}/{len(result['tasks'])}"
        coverage = f"{s['coverage_2sd']:.2f}" if "coverage_2sd" in s else "—"
        rows.append([LABELS[m], f"{s['mse_mean']:.4f} ± {s['mse_stderr']:.4f}", f"{s['mse_median']:.4f}", better,
                     coverage, f"{s['seconds_mean'] / time_base:.2f}"])
    return markdown_table(["method", "test MSE (mean ± s.e.)", "median MSE", "lingp better on",
                           "truth within ±2σ", "time / fine-tune time"], rows)


def plot(result: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    ex = result["example"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.asarray(ex["x_test"])
    mean, std = np.asarray(ex["mean"]["lingp"]), np.asarray(ex["lingp_std"])
    left.fill_between(x, mean - 2 * std, mean + 2 * std, alpha=0.25, color="C1", label="lingp ± 2σ")
    left.plot(x, ex["truth"], "k", lw=2, label="true function")
    for i, (m, label) in enumerate(LABELS.items()):
        left.plot(x, ex["mean"][m], color=f"C{i}", lw=1.2, ls="-" if m == "lingp" else "--", label=label)
    left.plot(ex["x_context"], ex["y_context"], "ko", ms=5, label=f"{len(ex['x_context'])} context points")
    task = ex["task"]
    left.set(xlabel="x", ylabel="y", title=f"first task: A={task['amplitude']:.2f}, w={task['frequency']:.2f}, "
                                           f"b={task['phase']:.2f}")
    names = list(result["summary"])
    right.bar(range(len(names)), [result["summary"][m]["mse_mean"] for m in names],
              yerr=[result["summary"][m]["mse_stderr"] for m in names], color=[f"C{i}" for i in range(len(names))],
              capsize=4)
    right.set_xticks(range(len(names)), [LABELS[m] for m in names])
    right.set(yscale="log", ylabel="test MSE (mean ± s.e.)",
              title=f"{len(result['tasks'])} new tasks, {len(ex['x_context'])} context points each")
    save_figure(fig, path)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def headline(result: dict) -> str:
        return (f"Sinusoid few-shot transfer: {args.source} source, {len(result['tasks'])} new tasks, {args.context} "
                f"context points each, p = {result['p']}, lingp's s and σ² by {args.lingp_hyperparameters}, backend "
                f"{args.backend}")

    stem = NAME + ("_single" if args.source == "single" else "")
    return run_repro(__file__, argv, args, run, headline, table, plot, stem)


if __name__ == "__main__":
    raise SystemExit(main())
