"""The transfer demo runs end to end in its quick mode, prints its table and writes its results; its data and
training are fixed by the seed: the source network retrained here scores as the report says, and every method's
accuracy and calibration error equal those recomputed from its reliability bins."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import matplotlib  # noqa: F401  (the demo's plots)
import numpy as np
import pytest
import sklearn  # noqa: F401  (the digits data)
import torch

from lingp_core.demo import data, metrics, network
from lingp_core.demo.__main__ import QUICK
from lingp_core.demo.experiment import METHODS
from tests.helpers import run_alongside

ROOT = Path(__file__).resolve().parents[1]


def quick_source_scores(seed: int = 0) -> dict:
    """The quick run's source network retrained here (same seed, one torch thread as the demo): its upright test
    accuracy and its scores on the shifted test set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = data.load_domains(seed, pool_per_class=max(20, *QUICK["labels_per_class"]), max_test=QUICK["max_test"])
        model = network.train_source(torch.from_numpy(d.source_train_x), torch.from_numpy(d.source_train_y),
                                     seed=seed, epochs=QUICK["source_epochs"])
        upright = network.predict_proba(model, torch.from_numpy(d.source_test_x))
        shifted = network.predict_proba(model, torch.from_numpy(d.test_x))
    finally:
        torch.set_num_threads(threads)
    return {"upright_accuracy": metrics.accuracy(upright, d.source_test_y), "accuracy": metrics.accuracy(
        shifted, d.test_y), "nll": metrics.negative_log_likelihood(shifted, d.test_y), "n_test": len(d.test_y)}


def test_demo_quick_runs_and_reports(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "lingp_core.demo", "--quick", "--no-progress", "--out", str(tmp_path)]
    result, expected = run_alongside(command, quick_source_scores, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in METHODS.values():
        assert name in result.stdout
    report = json.loads((tmp_path / "demo.json").read_text())
    rows = report["rows"]
    assert [r["method"] for r in rows] == list(METHODS)
    assert all(r["labels_per_class"] == 2 for r in rows)
    by_method = {r["method"]: r for r in rows}
    # the source network works on its own domain and the shift hurts it: adaptation has something to do
    source = by_method["source"]
    assert report["source"]["upright_accuracy"] > 0.85
    assert source["accuracy"] < report["source"]["upright_accuracy"] - 0.3
    # ... and the Laplace classifier adapts: more accurate and a lower NLL than the source network on the target
    laplace = next(r for m, r in by_method.items() if "laplace" in m)
    assert laplace["accuracy"] > source["accuracy"] + 0.1 and laplace["nll"] < source["nll"] - 1.0
    # the seeded source network, retrained here, scores exactly as reported (float32 CNN, the same operations)
    assert report["n_test"] == expected["n_test"]
    assert report["source"]["upright_accuracy"] == pytest.approx(expected["upright_accuracy"], rel=1e-12)
    assert source["accuracy"] == pytest.approx(expected["accuracy"], rel=1e-12)
    assert source["nll"] == pytest.approx(expected["nll"], rel=1e-9)
    bins = report["reliability"]["bins"]
    assert set(bins) == set(METHODS)
    for method, b in bins.items():  # one repeat at one budget: the bins hold exactly the row's test predictions
        counts = np.array(b["counts"])
        assert counts.sum() == report["n_test"]
        filled = counts > 0
        acc, conf = np.array(b["accuracy"])[filled], np.array(b["confidence"])[filled]
        weights = counts[filled] / report["n_test"]
        assert by_method[method]["accuracy"] == pytest.approx(weights @ acc, rel=1e-12)
        assert by_method[method]["ece"] == pytest.approx(weights @ np.abs(acc - conf), rel=1e-9, abs=1e-15)
    for entry in report["summary"]:  # one repeat: the summary is the row, with no spread
        row = by_method[entry["method"]]
        assert entry["repeats"] == 1 and all(entry[k] == row[k] and entry[k + "_std"] == 0.0
                                             for k in ("accuracy", "nll", "ece"))
    for png in ("accuracy_vs_labels.png", "reliability.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_domains_and_draws_are_fixed_by_the_seed():
    a, b = data.load_domains(3), data.load_domains(3)
    for field in ("source_train_x", "source_train_y", "pool_x", "pool_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.test_x, data.load_domains(4).test_x)
    # every digit image is used once: the four parts add up to all 1797
    assert a.source_train_x.shape[0] + a.source_test_x.shape[0] + a.pool_x.shape[0] + a.test_x.shape[0] == 1797
    draw = data.few_shot_indices(a.pool_y, 3, np.random.default_rng(0))
    np.testing.assert_array_equal(draw, data.few_shot_indices(a.pool_y, 3, np.random.default_rng(0)))
    np.testing.assert_array_equal(np.bincount(a.pool_y[draw]), np.full(10, 3))
    with pytest.raises(ValueError, match="fewer than"):
        data.few_shot_indices(a.pool_y, 1000, np.random.default_rng(0))


@pytest.fixture
def one_torch_thread():
    """One intra-op thread, as the demo runs (two threads on a busy 2-core machine are many times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_source_training_is_fixed_by_the_seed(one_torch_thread):
    d = data.load_domains(0)
    x, y = torch.from_numpy(d.source_train_x[:128]), torch.from_numpy(d.source_train_y[:128])
    first = network.train_source(x, y, seed=5, epochs=2)
    second = network.train_source(x, y, seed=5, epochs=2)
    assert sum(p.numel() for p in first.parameters()) == 3658
    for p, q in zip(first.parameters(), second.parameters()):
        assert torch.equal(p, q)


def test_cupy_without_a_gpu_is_a_clear_error(capsys):
    from lingp_core.demo.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: --backend cupy can run here")
    assert main(["--backend", "cupy", "--quick", "--no-progress"]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err
