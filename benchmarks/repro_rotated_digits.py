#!/usr/bin/env python3
"""Rotated-digits angle regression: a stand-in for the Olivetti-faces experiment of Maddox et al. (2021), where a
network trained on some people's rotated faces is adapted to other people's.

Data (bundled with scikit-learn, nothing downloads): the 8×8 digits, scaled to [0, 1], upsampled to 16×16 (bilinear)
and rotated by an angle θ (scipy.ndimage.rotate, bilinear, same size, zero fill); the target is θ/45.
- source: digits 0–4, each image under 3 independent rotations θ ~ U[−45°, 45°] (quick: 200 images, 1 rotation);
- target, shifted twice: digits 5–9 (shapes the network never saw, as new people in the faces experiment) under one
  rotation each with θ ~ U[−60°, 60°] (a third of them beyond the source's angles; --target-angle 45 keeps only
  the digit shift); 400 of them are the test set (quick: 100), the rest the pool the adaptation sets come from.
  For each repeat the pool is shuffled and the adaptation sets are its first 10, 20, 50, 100, 200 images (nested;
  quick: 10, 20).

Network: a small CNN in float64, conv 3×3 (8) → ReLU → max-pool → conv 3×3 (16) → ReLU → max-pool → linear 256→64
→ ReLU → linear 64→1 (p = 17,761), trained on the source by Adam (mini-batches of 128, lr 1e-3, cosine-annealed).

Methods on each adaptation set: the source network unadapted; lingp (Jacobian kernel GP of all parameters; its prior
centred by --lingp-prior, default the network and the network with its output layer at 0, averaged by marginal
likelihood; prior scale and noise by --lingp-hyperparameters, default averaged over per-layer prior weights and a log
grid of (s, σ²) weighted by marginal likelihood × a data-scaled hyperprior); last-layer retraining (Adam, 500 steps,
lr 1e-2); fine-tuning of all weights (Adam, 200 full-batch steps, lr 1e-3); ABLR-style Bayesian linear
regression on the 64 last hidden features.
Reported: test RMSE in degrees, mean ± standard error over the repeats. (--quick: 100 source steps, 100 last-layer
and 50 fine-tuning steps: a smoke run, not a result.)
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

NAME = "repro_rotated_digits"
MAX_ANGLE = 45.0
LABELS = {"source": "source net", "lingp": "lingp", "last_layer": "last layer", "fine_tune": "fine-tune",
          "ablr": "ABLR"}


def parse_args(argv: list[str] | None = None):
    parser = repro_parser(NAME, __doc__)
    parser.add_argument("--sizes", type=int, nargs="+", help="adaptation set sizes (default 10 20 50 100 200)")
    parser.add_argument("--repeats", type=int, help="adaptation draws per size (default 3, quick 1)")
    parser.add_argument("--source-steps", type=int, help="Adam steps on the source (default 3000, quick 100)")
    parser.add_argument("--source-angle", type=float, default=45.0, help="source angles in ±this, degrees")
    parser.add_argument("--target-angle", type=float, default=60.0, help="target angles in ±this, degrees")
    bl.add_hyperparameters_option(parser)
    bl.add_prior_option(parser)
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([10, 20] if args.quick else [10, 20, 50, 100, 200])
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.source_steps = args.source_steps or (100 if args.quick else 3000)
    set_torch_threads(args.torch_threads)
    return args


def rotated_digits(images: np.ndarray, rng: np.random.Generator, rotations: int,
                   max_angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Each (8, 8) image upsampled to 16×16 and rotated ``rotations`` times by angles θ ~ U[−max_angle, max_angle]
    degrees: images (m, 1, 16, 16) and targets θ/45 (m,)."""
    from scipy import ndimage

    out, targets = [], []
    for image in images:
        large = ndimage.zoom(image / 16.0, 2, order=1)
        for angle in rng.uniform(-max_angle, max_angle, size=rotations):
            out.append(ndimage.rotate(large, angle, reshape=False, order=1, mode="constant", cval=0.0))
            targets.append(angle / MAX_ANGLE)
    return np.asarray(out)[:, None], np.asarray(targets)


def cnn(device: str, seed: int):
    import torch

    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 1)).double().to(device)


def tensor(values: np.ndarray, device: str):
    import torch

    return torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)


def datasets(args, rng: np.random.Generator) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    source = digits.images[digits.target <= 4]
    target = digits.images[digits.target >= 5]
    if args.quick:
        source = source[rng.permutation(len(source))[:200]]
    x_src, y_src = rotated_digits(source, rng, 1 if args.quick else 3, args.source_angle)
    x_tgt, y_tgt = rotated_digits(target[rng.permutation(len(target))], rng, 1, args.target_angle)
    n_test = 100 if args.quick else 400
    return {"source": (x_src, y_src), "test": (x_tgt[:n_test], y_tgt[:n_test]),
            "pool": (x_tgt[n_test:], y_tgt[n_test:])}


def run(args) -> dict:
    device = bl.torch_device(args.backend)
    rng = np.random.default_rng(args.seed)
    data = datasets(args, rng)
    x_src, y_src = data["source"]
    model = cnn(device, args.seed)
    losses = bl.train_mse(model, tensor(x_src, device), tensor(y_src[:, None], device), steps=args.source_steps,
                          lr=1e-3, batch_size=128, seed=args.seed)
    x_test, y_test = tensor(data["test"][0], device), data["test"][1]
    x_pool, y_pool = data["pool"]
    if max(args.sizes) > len(y_pool):
        raise SystemExit(f"the largest adaptation set ({max(args.sizes)}) exceeds the pool ({len(y_pool)} images)")
    methods = list(LABELS)
    runs = []
    for repeat in progress(range(args.repeats), enabled=not args.no_progress, desc="repeats"):
        order = rng.permutation(len(y_pool))
        for size in args.sizes:
            chosen = order[:size]
            preds = bl.adapt_and_predict(model, tensor(x_pool[chosen], device),
                                         tensor(y_pool[chosen][:, None], device), x_test, methods=methods,
                                         backend=args.backend, seed=args.seed + repeat,
                                         last_layer={"steps": 100 if args.quick else 500, "lr": 1e-2},
                                         fine_tuning={"steps": 50 if args.quick else 200, "lr": 1e-3},
                                         lingp_hyperparameters=args.lingp_hyperparameters,
                                         lingp_prior=args.lingp_prior)
            rmse = {m: float(MAX_ANGLE * np.sqrt(np.mean((preds[m]["mean"][:, 0] - y_test) ** 2))) for m in methods}
            runs.append({"repeat": repeat, "size": size, "rmse_degrees": rmse,
                         "seconds": {m: preds[m]["seconds"] for m in methods},
                         "lingp": bl.lingp_record(preds["lingp"])})
    summary = []
    for size in args.sizes:
        at = [r for r in runs if r["size"] == size]
        row = {"size": size}
        for m in methods:
            row[m] = dict(zip(("mean", "stderr"), bl.mean_and_stderr([r["rmse_degrees"][m] for r in at])))
            row[m]["seconds"] = float(np.mean([r["seconds"][m] for r in at]))
        summary.append(row)
    return {"name": NAME, "quick": args.quick, "seed": args.seed, "backend": args.backend, "command": args.command,
            "lingp_hyperparameters": args.lingp_hyperparameters,
            "lingp_prior": args.lingp_prior, "machine": machine_info(args.backend),
            "description": __doc__, "p": bl.count_parameters(model),
            "source_images": int(len(y_src)), "test_images": int(len(y_test)), "pool_images": int(len(y_pool)),
            "source_final_batch_mse": losses[-1],
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "summary": summary, "runs": runs}


def table(result: dict) -> str:
    methods = list(LABELS)
    rows = [[row["size"]] + [f"{row[m]['mean']:.2f} ± {row[m]['stderr']:.2f}" for m in methods]
            + [f"{row['lingp']['seconds'] / row['fine_tune']['seconds']:.2f}"] for row in result["summary"]]
    return markdown_table(["adaptation images"] + [f"{LABELS[m]} RMSE [°]" for m in methods]
                          + ["lingp time / fine-tune time"], rows)


def plot(result: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sizes = [row["size"] for row in result["summary"]]
    for i, (m, label) in enumerate(LABELS.items()):
        ax.errorbar(sizes, [row[m]["mean"] for row in result["summary"]],
                    yerr=[row[m]["stderr"] for row in result["summary"]], color=f"C{i}", marker="o", capsize=3,
                    ls="--" if m == "source" else "-", label=label)
    config = result["config"]
    ax.set(xscale="log", xlabel="adaptation images (digits 5–9)", ylabel="test RMSE of the angle [degrees]",
           title=f"Rotated digits: digits 0–4 at ±{config['source_angle']:g}° → digits 5–9 at "
                 f"±{config['target_angle']:g}°")
    save_figure(fig, path)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def headline(result: dict) -> str:
        return (f"Rotated digits: {result['source_images']} source images (digits 0–4, ±{args.source_angle:g}°), "
                f"{result['test_images']} test images (digits 5–9, ±{args.target_angle:g}°), p = {result['p']}, "
                f"{args.repeats} repeat(s), lingp's s and σ² by {args.lingp_hyperparameters}, backend {args.backend}")

    return run_repro(__file__, argv, args, run, headline, table, plot, NAME)


if __name__ == "__main__":
    raise SystemExit(main())
