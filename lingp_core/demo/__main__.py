"""``python -m lingp_core.demo`` (or ``lingp-demo``): few-shot domain adaptation on scikit-learn's digits.

Trains a small CNN on upright digits, adapts it to rotated, noisy digits from 1–10 labels per class, and compares
the source network as is, last-layer retraining, full fine-tuning, lingp's LinearizedGP and lingp's Laplace
classifier: a table (accuracy, NLL, ECE, wall time) on stdout; JSON and two PNGs in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

_STARTED = time.perf_counter()

QUICK = {"labels_per_class": (2,), "repeats": 1, "source_epochs": 10, "max_test": 200}


def _parser() -> argparse.ArgumentParser:
    from lingp_core.demo.experiment import METHODS
    from lingp_core.demo.transfer import GP_OUTPUT_MODES

    p = argparse.ArgumentParser(prog="python -m lingp_core.demo", description=(
        "Few-shot domain adaptation on scikit-learn's digits: a small CNN trained on upright digits adapts to "
        "rotated, noisy digits from a few labels per class. Compares the source network as is, last-layer "
        "retraining, full fine-tuning, lingp's LinearizedGP and lingp's Laplace classifier; prints a table "
        "(accuracy, NLL, ECE, wall time) and writes demo.json and two PNGs to --out."))
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                   help="lingp's arrays: numpy (CPU, default) or cupy (the network then runs on CUDA too)")
    p.add_argument("--labels-per-class", type=int, nargs="+", default=[1, 2, 5, 10], metavar="K",
                   help="label budgets: labelled target images per class (default: 1 2 5 10)")
    p.add_argument("--repeats", type=int, default=3, help="random draws of the labelled images per budget (3)")
    p.add_argument("--seed", type=int, default=0, help="fixes data split, shift, network and draws (0)")
    p.add_argument("--out", type=Path, default=Path("lingp_demo_results"),
                   help="folder for demo.json, accuracy_vs_labels.png, reliability.png (./lingp_demo_results)")
    p.add_argument("--quick", action="store_true",
                   help="seconds-long smoke run: 2 labels per class, 1 repeat, 10 source epochs, 200 test images")
    p.add_argument("--gp-output-mode", choices=GP_OUTPUT_MODES, default="trace",
                   help="LinearizedGP's output mode (trace: one kernel shared by the classes; default)")
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS), metavar="M",
                   help=f"subset of methods to run ({', '.join(METHODS)})")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for torch and for NumPy's BLAS (1, default: the arrays are small, and on a busy "
                        "2-core machine extra threads spin waiting for each other, several times slower)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _settings(args: argparse.Namespace) -> Any:
    from lingp_core.demo.experiment import METHODS, Settings

    if min(args.labels_per_class) < 1 or args.repeats < 1:
        raise SystemExit("--labels-per-class values and --repeats must be ≥ 1")
    methods = tuple(m for m in METHODS if m in args.methods)
    common = {"seed": args.seed, "backend": args.backend, "gp_output_mode": args.gp_output_mode,
              "methods": methods, "progress": not args.no_progress}
    if args.quick:
        return Settings(**QUICK, **common)
    return Settings(labels_per_class=tuple(args.labels_per_class), repeats=args.repeats, **common)


def _format_table(result: dict, names: dict[str, str]) -> str:
    repeats = result["settings"]["repeats"]

    def cell(entry: dict, key: str, digits: int) -> str:
        text = f"{entry[key]:.{digits}f}"
        return text + (f" ± {entry[key + '_std']:.{digits}f}" if repeats > 1 else "")

    header = ["labels/class", "method", "accuracy", "NLL", "ECE", "time [s]"]
    lines = []
    previous = None
    for e in result["summary"]:
        k = e["labels_per_class"]
        lines.append([str(k) if k != previous else "", names[e["method"]], cell(e, "accuracy", 3),
                      cell(e, "nll", 3), cell(e, "ece", 3), cell(e, "seconds", 2)])
        previous = k
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *[fmt(r) for r in lines]])


def _format_hyperparameters(result: dict, names: dict[str, str]) -> list[str]:
    """One line per lingp method: the median over repeats of the fitted prior scale (and noise) per label budget."""
    import numpy as np

    lines = []
    for method in ("lingp_dirichlet", "lingp_gp", "lingp_laplace"):
        rows = [r for r in result["rows"] if r["method"] == method]
        if not rows:
            continue
        parts = []
        for k in sorted({r["labels_per_class"] for r in rows}):
            infos = [r["info"] for r in rows if r["labels_per_class"] == k]
            text = f"{k}: s={np.median([i['prior_scale'] for i in infos]):.2g}"
            if "noise" in infos[0]:
                text += f" σ²={np.median([i['noise'] for i in infos]):.2g}"
            bounded = sum(bool(i.get("at_bound")) for i in infos)
            if bounded:
                text += f" ({bounded}/{len(infos)} at a bound)"
            parts.append(text)
        lines.append(f"{names[method]} fitted (median; labels/class: values): " + ", ".join(parts))
    return lines


def _machine() -> dict[str, Any]:
    import numpy as np
    import torch

    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "numpy": np.__version__, "torch": torch.__version__, "threads": torch.get_num_threads()}


def _jsonable(x: Any) -> Any:
    """Plain JSON values: arrays become lists, NaN becomes null (JSON has no NaN)."""
    import numpy as np

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the experiment, print the table, write JSON and plots; return the exit status."""
    args = _parser().parse_args(argv)
    settings = _settings(args)
    import torch
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    torch.set_num_threads(max(1, args.threads))
    from lingp_core import LingpError
    from lingp_core.demo import plots
    from lingp_core.demo.experiment import METHODS, SetupError, run

    try:
        with threadpool_limits(limits=max(1, args.threads)):
            result = run(settings)
    except (SetupError, LingpError) as exc:  # a setting this machine cannot run: say why, no traceback
        print(f"lingp-demo: error: {exc}", file=sys.stderr)
        return 2
    names = {m: METHODS[m] for m in settings.methods}
    src = result["source"]
    print(f"lingp few-shot domain adaptation on scikit-learn digits (backend {settings.backend}, seed {settings.seed})")
    print(result["data"])
    print(f"source CNN: {src['parameters']} parameters, trained in {src['train_seconds']:.1f} s, "
          f"{src['upright_accuracy']:.3f} accuracy on held-out upright digits")
    if result["warmup_seconds"] is not None:
        print(f"CUDA/CuPy warm-up (kernels compiled on first use, not counted below): {result['warmup_seconds']:.1f} s")
    if result["test_jacobian_seconds"] is not None:
        print(f"test-set Jacobian export: {result['test_jacobian_seconds']:.2f} s (counted in both lingp rows' time)")
    print(f"mean{' ± std' if settings.repeats > 1 else ''} over {settings.repeats} draw(s) of the labelled images; "
          f"ECE with 15 bins; time = adapt + predict the test set")
    print()
    print(_format_table(result, names))
    for line in _format_hyperparameters(result, names):
        print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    result["machine"] = _machine()
    result["process_seconds"] = time.perf_counter() - _STARTED
    (args.out / "demo.json").write_text(json.dumps(_jsonable(result), indent=1) + "\n", encoding="utf-8")
    plots.plot_accuracy_vs_labels(result, names, args.out / "accuracy_vs_labels.png")
    plots.plot_reliability(result, names, args.out / "reliability.png")
    print()
    print(f"wrote {args.out / 'demo.json'}, accuracy_vs_labels.png, reliability.png; "
          f"{time.perf_counter() - _STARTED:.1f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
