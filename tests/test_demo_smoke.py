"""The transfer demo runs end to end in its quick mode, prints its table and writes its results; its data and
training are fixed by the seed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from lingp_core.demo import data, network  # noqa: E402
from lingp_core.demo.experiment import METHODS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_demo_quick_runs_and_reports(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "lingp_core.demo", "--quick", "--no-progress", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=300, check=False, env=env,
                            cwd=tmp_path)
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
    bins = report["reliability"]["bins"]
    assert set(bins) == set(METHODS)
    assert all(sum(b["counts"]) == report["n_test"] for b in bins.values())
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
    import torch

    from lingp_core.demo.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: --backend cupy can run here")
    assert main(["--backend", "cupy", "--quick", "--no-progress"]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err
