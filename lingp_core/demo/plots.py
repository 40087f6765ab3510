"""The demo's two figures: accuracy and NLL against the number of target labels, and reliability diagrams."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_accuracy_vs_labels", "plot_reliability"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_labels(result: dict, names: dict[str, str], path: Path) -> None:
    """Two panels (test accuracy, test NLL) against labels per class, one line per method, ±1 std over repeats."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    for method, name in names.items():
        entries = [e for e in result["summary"] if e["method"] == method]
        if not entries:
            continue
        k = [e["labels_per_class"] for e in entries]
        for ax, key in zip(axes, ("accuracy", "nll")):
            ax.errorbar(k, [e[key] for e in entries], yerr=[e[key + "_std"] for e in entries], marker="o",
                        capsize=3, label=name)
    for ax, label in zip(axes, ("test accuracy", "test NLL (nats)")):
        ax.set_xscale("log")
        ax.set_xticks(sorted({e["labels_per_class"] for e in result["summary"]}))
        ax.get_xaxis().set_major_formatter(_plain_formatter())
        ax.set_xlabel("labelled target examples per class")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Few-shot adaptation to rotated, noisy digits ({result['n_test']} test images)", fontsize=10)
    _save(plt, fig, path)


def plot_reliability(result: dict, names: dict[str, str], path: Path) -> None:
    """One reliability diagram per method: accuracy per confidence bin against the diagonal, bar width ∝ bin."""
    plt = _pyplot()
    bins = result["reliability"]["bins"]
    shown = [m for m in names if m in bins]
    fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown), 2.9), sharey=True, squeeze=False)
    ece = {e["method"]: e["ece"] for e in result["summary"]
           if e["labels_per_class"] == result["reliability"]["labels_per_class"]}
    for ax, method in zip(axes[0], shown):
        b = bins[method]
        edges = np.asarray(b["edges"])
        accuracy = np.nan_to_num(np.asarray(b["accuracy"], dtype=float))
        ax.bar(edges[:-1], accuracy, width=np.diff(edges), align="edge", edgecolor="black", linewidth=0.5)
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{names[method]}\nECE {ece.get(method, float('nan')):.3f}", fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy")
    fig.suptitle(f"Reliability at {result['reliability']['labels_per_class']} labels per class "
                 "(test sets of all repeats pooled)", fontsize=10)
    _save(plt, fig, path)


def _plain_formatter() -> Any:
    from matplotlib.ticker import ScalarFormatter

    formatter = ScalarFormatter()
    formatter.set_scientific(False)
    return formatter


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # pyplot keeps every open figure alive otherwise
