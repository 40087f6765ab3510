"""The demo's experiment: train on the source domain, adapt from a few labelled target images, score every method.

For each label budget (labels per class) and repeat, a seeded draw of labelled target examples is given to every
method; each is scored on the same target test set. Every random choice flows from one seed (NumPy Generators
seeded by (seed, budget, repeat); torch.manual_seed for the network), so two runs print the same numbers.

Wall time per row is the time a user would wait for that method's test-set predictions once the source network is
trained: baselines include their training and test prediction; lingp rows include exporting the labelled examples'
Jacobian and the test-set Jacobian (both exported once and shared by the two lingp rows, but counted in each).
"""
from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import lingp_core as lg
from lingp_core._progress import progress_bar
from lingp_core.demo import baselines, data, metrics, network, transfer

__all__ = ["METHODS", "SetupError", "Settings", "run"]

METHODS = {
    "source": "source network",
    "last_layer": "last-layer retrain",
    "fine_tune": "full fine-tuning",
    "lingp_dirichlet": "lingp Dirichlet GP",
    "lingp_gp": "lingp LinearizedGP",
    "lingp_laplace": "lingp Laplace",
}
"""Method keys and the names the table prints, in table order."""

_BASELINES: dict[str, Callable] = {
    "source": baselines.source_as_is,
    "last_layer": baselines.last_layer_retraining,
    "fine_tune": baselines.full_fine_tuning,
}
ECE_BINS = 15


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one run does; the defaults are the README's main job."""

    labels_per_class: tuple[int, ...] = (1, 2, 5, 10)
    repeats: int = 3
    seed: int = 0
    backend: str = "numpy"
    source_epochs: int = 40
    max_test: int | None = None
    gp_output_mode: str = "trace"
    methods: tuple[str, ...] = tuple(METHODS)
    progress: bool = True


class SetupError(lg.LingpError, RuntimeError):
    """The requested run cannot start on this machine (e.g. --backend cupy without a CUDA device)."""


def _device(backend: str) -> torch.device:
    if backend == "numpy":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SetupError("--backend cupy runs the network on CUDA, but torch sees no CUDA device "
                         f"(torch {torch.__version__}); use --backend numpy")
    return torch.device("cuda")


class _Clock:
    """Seconds since start, with CUDA work finished before reading (queued kernels would otherwise not count)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = time.perf_counter()

    def seconds(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.start


def _score(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"accuracy": metrics.accuracy(probs, labels),
            "nll": metrics.negative_log_likelihood(probs, labels),
            "ece": metrics.expected_calibration_error(probs, labels, ECE_BINS)}


def _summarise(rows: list[dict], methods: tuple[str, ...], budgets: tuple[int, ...]) -> list[dict]:
    """Mean and standard deviation over repeats per (budget, method)."""
    summary = []
    for k in budgets:
        for m in methods:
            picked = [r for r in rows if r["method"] == m and r["labels_per_class"] == k]
            entry: dict[str, Any] = {"method": m, "labels_per_class": k, "repeats": len(picked)}
            for key in ("accuracy", "nll", "ece", "seconds"):
                values = np.array([r[key] for r in picked], dtype=np.float64)
                entry[key] = float(values.mean())
                entry[key + "_std"] = float(values.std())
            summary.append(entry)
    return summary


def _warm_up(model64: torch.nn.Module, pool_x: torch.Tensor, pool_y: np.ndarray, test_x: torch.Tensor,
             settings: Settings, device: torch.device) -> float:
    """Run the lingp pipeline once on a tiny problem, untimed, so that CUDA and CuPy compile their kernels (first
    use costs seconds) before the clocks start; return how long that took."""
    clock = _Clock(device)
    chosen = data.few_shot_indices(pool_y, 1, np.random.default_rng(settings.seed))
    J = lg.export_jacobian(model64, pool_x[chosen].double(), backend=settings.backend)
    J_test = lg.export_jacobian(model64, test_x[:8].double(), backend=settings.backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the results are thrown away, and so is what they warn about
        if "lingp_dirichlet" in settings.methods:
            transfer.dirichlet_gp(J, pool_y[chosen], J_test)
        if "lingp_gp" in settings.methods:
            transfer.linearized_gp(J, pool_y[chosen], J_test, output_mode=settings.gp_output_mode)
        if "lingp_laplace" in settings.methods:
            transfer.laplace_classifier(J, pool_y[chosen], J_test)
    return clock.seconds()


def _adapt(model: torch.nn.Module, model64: torch.nn.Module | None, ax: torch.Tensor, ay: torch.Tensor,
           labels: np.ndarray, test_x: torch.Tensor, J_test: Any, test_export_seconds: float | None,
           settings: Settings, rep: int, device: torch.device) -> dict[str, tuple[np.ndarray, float, dict]]:
    """Every method on one labelled set: method → (test probabilities, seconds, what it chose)."""
    outputs = {}
    for m in settings.methods:
        if m in _BASELINES:
            clock = _Clock(device)
            probs, info = _BASELINES[m](model, ax, ay, test_x, seed=settings.seed + rep)
            outputs[m] = (probs, clock.seconds(), info)
    if model64 is not None:
        clock = _Clock(device)
        J = lg.export_jacobian(model64, ax.double(), backend=settings.backend)
        shared = clock.seconds() + test_export_seconds  # both exports, counted in each lingp row
        for m in settings.methods:
            clock = _Clock(device)
            if m == "lingp_dirichlet":
                probs, info = transfer.dirichlet_gp(J, labels, J_test)
            elif m == "lingp_gp":
                probs, info = transfer.linearized_gp(J, labels, J_test, output_mode=settings.gp_output_mode)
            elif m == "lingp_laplace":
                probs, info = transfer.laplace_classifier(J, labels, J_test)
            else:
                continue
            outputs[m] = (probs, clock.seconds() + shared, info)
    return outputs


def run(settings: Settings) -> dict[str, Any]:
    """Run the experiment; return everything the table, plots and JSON need (plain Python and NumPy values)."""
    started = time.perf_counter()
    device = _device(settings.backend)
    budgets = tuple(sorted(set(settings.labels_per_class)))
    domains = data.load_domains(settings.seed, pool_per_class=max(20, max(budgets)), max_test=settings.max_test)

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(device)

    clock = _Clock(device)
    model = network.train_source(tensor(domains.source_train_x), tensor(domains.source_train_y),
                                 seed=settings.seed, epochs=settings.source_epochs, progress=settings.progress)
    source_seconds = clock.seconds()
    source = {"train_seconds": source_seconds,
              "upright_accuracy": metrics.accuracy(network.predict_proba(model, tensor(domains.source_test_x)),
                                                   domains.source_test_y),
              "parameters": sum(p.numel() for p in model.parameters())}
    test_x = tensor(domains.test_x)
    pool_x = tensor(domains.pool_x)
    pool_y = torch.from_numpy(domains.pool_y).to(device)

    use_lingp = any(m.startswith("lingp") for m in settings.methods)
    model64 = J_test = test_export_seconds = warmup_seconds = None
    if use_lingp:
        model64 = copy.deepcopy(model).double()
        if device.type == "cuda":
            warmup_seconds = _warm_up(model64, pool_x, domains.pool_y, test_x, settings, device)
        clock = _Clock(device)
        J_test = lg.export_jacobian(model64, test_x.double(), backend=settings.backend)
        test_export_seconds = clock.seconds()

    rows: list[dict] = []
    reliability_probs: dict[str, list[np.ndarray]] = {m: [] for m in settings.methods}
    reliability_labels: list[np.ndarray] = []
    total = len(budgets) * settings.repeats
    with progress_bar(total, enabled=settings.progress, desc="adaptation sets", unit="set") as bar:
        for k in budgets:
            for rep in range(settings.repeats):
                chosen = data.few_shot_indices(domains.pool_y, k, np.random.default_rng([settings.seed, k, rep]))
                ax, ay = pool_x[chosen], pool_y[chosen]
                outputs = _adapt(model, model64, ax, ay, domains.pool_y[chosen], test_x, J_test, test_export_seconds,
                                 settings, rep, device)
                for m in settings.methods:
                    probs, seconds, info = outputs[m]
                    rows.append({"method": m, "labels_per_class": k, "repeat": rep, "seconds": seconds, "info": info,
                                 **_score(probs, domains.test_y)})
                    if k == budgets[-1]:
                        reliability_probs[m].append(probs)
                if k == budgets[-1]:
                    reliability_labels.append(domains.test_y)
                bar.update()

    labels_all = np.concatenate(reliability_labels)
    reliability = {m: metrics.reliability_bins(np.concatenate(p), labels_all, ECE_BINS)._asdict()
                   for m, p in reliability_probs.items()}
    return {
        "settings": dataclasses.asdict(settings),
        "data": domains.description,
        "n_test": int(domains.test_y.shape[0]),
        "source": source,
        "test_jacobian_seconds": test_export_seconds,
        "warmup_seconds": warmup_seconds,
        "rows": rows,
        "summary": _summarise(rows, settings.methods, budgets),
        "reliability": {"labels_per_class": budgets[-1], "bins": reliability},
        "wall_seconds": time.perf_counter() - started,
    }
