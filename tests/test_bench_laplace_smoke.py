"""The Laplace benchmark's quick mode keeps working: it runs, prints its table and writes JSON and a plot whose
numbers are those of the same seeded data and network recomputed here: the MAP row from the retrained network, the
last-layer row from a float64 dense Laplace (J by torch.func, Newton in NumPy) at the prior scale it chose."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib  # noqa: F401  (the plot is part of the run)
import numpy as np
import sklearn  # noqa: F401  (the digits data)
import torch

from benchmarks import bench_laplace as bench
from tests.helpers import run_alongside, torch_jacobian
from tests.test_laplace import _probs, dense_laplace

ROOT = Path(__file__).resolve().parents[1]
LAST_LAYER = ["2.weight", "2.bias"]


def seeded_run() -> dict:
    """The benchmark's quick data and network retrained here (same seeds): the MAP network's test metrics and the
    float64 last-layer Jacobians, θ̂ and labels for the dense oracle."""
    X_tr, y_tr, X_te, y_te = bench.digits(bench.QUICK["n_train"])
    model = bench.train_mlp(X_tr, y_tr, bench.QUICK["hidden"], bench.QUICK["epochs"], "cpu")
    with torch.no_grad():
        map_proba = torch.softmax(model(torch.as_tensor(X_te)), dim=1).double().numpy()
    (J, f0), (Js, f0s) = torch_jacobian(model, X_tr, LAST_LAYER), torch_jacobian(model, X_te, LAST_LAYER)
    named = dict(model.named_parameters())
    theta = torch.cat([named[k].detach().reshape(-1) for k in LAST_LAYER]).double().numpy()
    return {"map": bench.metrics(map_proba, y_te), "dense": {"J": J, "f0": f0, "Js": Js, "f0s": f0s},
            "theta": theta, "y_train": y_tr, "y_test": y_te}


def last_layer_laplace(run: dict, s: float) -> dict:
    """Test metrics and log evidence of the dense Laplace with prior N(0, s·I) on the last layer's θ, probit."""
    ref = dense_laplace(run["dense"], run["y_train"], s, "categorical", -run["theta"])
    var = np.diagonal(ref["cov"], axis1=1, axis2=2)
    proba = _probs(ref["mean"] / np.sqrt(1 + np.pi / 8 * var), "categorical")
    return dict(bench.metrics(proba, run["y_test"]), log_evidence=ref["evidence"])


def test_bench_laplace_quick(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_laplace.py"), "--quick", "--peers", "none", "--out",
               str(tmp_path)]
    result, seeded = run_alongside(command, seeded_run)
    assert result.returncode == 0, result.stderr
    assert "lingp full (probit)" in result.stdout and "laplace-torch full" in result.stdout
    data = json.loads((tmp_path / "bench_laplace_numpy_quick.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert data["quick"] and data["sizes"]["n_train"] == 200 and data["n_test"] == 1797 - 200
    for name in ("MAP", "lingp full (probit)", "lingp full (MC)", "lingp last layer (probit)"):
        assert rows[name]["time_s"] > 0
    ours, last = rows["lingp full (probit)"], rows["lingp last layer (probit)"]
    assert ours["p"] == 64 * 8 + 8 + 8 * 10 + 10 and last["p"] == 8 * 10 + 10
    assert ours["plan"].startswith("parameter") and ours["evidence_steps"] >= 1
    for key in ("nll", "accuracy", "ece"):  # the same network and data: equal up to float32 summation order
        assert abs(rows["MAP"][key] - seeded["map"][key]) <= 1e-6 * abs(seeded["map"][key])
    last_metrics = last_layer_laplace(seeded, last["prior_scale"])
    # the benchmark's Newton stops at rtol √eps(float32) (measured 2e-5 from the exact MAP), the oracle's at 1e-15
    assert abs(last["nll"] - last_metrics["nll"]) <= 1e-3 * last_metrics["nll"]
    assert abs(last["log_evidence"] - last_metrics["log_evidence"]) <= 1e-3 * abs(last_metrics["log_evidence"])
    assert abs(last["accuracy"] - last_metrics["accuracy"]) <= 1 / data["n_test"]
    # the full network's probit row is the test-label grid's entry at factor 1: a second export and fit at that s
    grid = data["oracle_prior_scale"]
    at_s = grid["nll"][bench.ORACLE_FACTORS.index(1.0)]
    assert grid["prior_scales"][bench.ORACLE_FACTORS.index(1.0)] == ours["prior_scale"]
    assert abs(ours["nll"] - at_s) <= 1e-3 * at_s and grid["best_nll"] == min(grid["nll"])
    # MC with 1,000 draws estimates the same predictive as probit only roughly, but the fit is the same
    mc = rows["lingp full (MC)"]
    assert mc["prior_scale"] == ours["prior_scale"] and mc["log_evidence"] == ours["log_evidence"]
    assert all("skipped" in rows[f"laplace-torch {v}"] for v in ("full", "kron", "last layer"))
    assert data["targets"]["accuracy_vs_map"] == {"map": rows["MAP"]["accuracy"], "lingp": ours["accuracy"],
                                                  "met": ours["accuracy"] >= rows["MAP"]["accuracy"]}
    assert (tmp_path / "bench_laplace_numpy_quick.png").stat().st_size > 0
