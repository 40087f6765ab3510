"""The paper reproductions (benchmarks/repro_*.py) keep working: each --quick run prints its table, writes a JSON
report whose numbers are finite and consistent, and a PNG; --help documents the shared options; benchmarks/run_all
runs a named script and fails when a script does."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

import backends  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["repro_relu_toy", "repro_sinusoid", "repro_rotated_digits", "repro_tabular_shift"]
try:
    import matplotlib  # noqa: F401

    HAS_PLOTS = True
except ImportError:
    HAS_PLOTS = False


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300, check=False)


def check_report(name: str, out: Path, stdout: str) -> dict:
    """The quick JSON report of ``name`` under ``out``, after the checks every script shares."""
    report = json.loads((out / f"{name}_quick.json").read_text())
    assert report["quick"] is True and report["backend"] == "numpy" and report["name"] == name
    assert report["command"].startswith(f"python benchmarks/{name}.py --quick")
    assert report["machine"]["backend"] == "numpy"
    if HAS_PLOTS:
        assert (out / f"{name}_quick.png").stat().st_size > 0
    assert "|---|" in stdout  # the markdown table
    return report


def quick_report(name: str, out: Path, *args: str) -> tuple[dict, str]:
    result = run_script(name, "--quick", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return check_report(name, out, result.stdout), result.stdout


def finite(*values: float) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) for v in values)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_documents_the_shared_options(name):
    result = run_script(name, "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--backend", "--quick", "--seed", "--out", "--torch-threads"):
        assert option in result.stdout


def test_relu_toy_quick_through_run_all(tmp_path):
    # run_all's success path and the script's report in one run: a quick run costs seconds
    ran = subprocess.run([str(ROOT / "benchmarks" / "run_all"), "--out", str(tmp_path), "repro_relu_toy"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "ok    repro_relu_toy" in ran.stdout
    stdout = (tmp_path / "repro_relu_toy.log").read_text()
    report = check_report("repro_relu_toy", tmp_path / "repro_relu_toy", stdout)
    rows = report["rows"]
    assert [(r["width"], r["state"], r["setting"]) for r in rows] == [
        (w, state, setting) for w in (5, 50) for state in ("untrained", "trained") for setting in ("matched", "ML-II")]
    for r in rows:
        assert r["p"] == 3 * r["width"] + 1
        assert finite(r["prior_scale"], r["noise"], r["gp_test_rmse"], r["net_test_rmse"], r["gp_test_nlpd"])
        assert r["prior_scale"] > 0 and r["noise"] > 0
    for r in (r for r in rows if r["setting"] == "matched"):
        assert r["noise"] == pytest.approx(0.81, rel=1e-12)   # the true noise variance, held fixed
        # the inductive bias the plot shows: the posterior is tighter on the data than between the clusters
        assert r["gp_std"]["data"] < r["gp_std"]["gap"]
    for r in (r for r in rows if r["setting"] == "ML-II"):
        matched = next(m for m in rows if (m["width"], m["state"], m["setting"]) == (r["width"], r["state"],
                                                                                      "matched"))
        assert r["log_marginal_likelihood"] >= matched["log_marginal_likelihood"] - 1e-6  # ML-II maximizes it
    trained = [r for r in rows if r["state"] == "trained"]
    untrained = [r for r in rows if r["state"] == "untrained"]
    assert all(t["net_test_rmse"] < u["net_test_rmse"] for t, u in zip(trained, untrained))  # training trained
    assert len(report["curves"]) == 8 and len(report["curves"][0]["gp_mean"]) == len(report["data"]["grid"])
    assert stdout.count("\n| 5 |") == 4 and stdout.count("\n| 50 |") == 4


def test_sinusoid_quick(tmp_path):
    report, stdout = quick_report("repro_sinusoid", tmp_path)
    assert report["p"] == 1 * 40 + 40 + 40 * 40 + 40 + 40 + 1 and report["source"] == "multitask"
    assert len(report["tasks"]) == 2
    for task in report["tasks"]:
        assert set(task["mse"]) == {"source", "lingp", "last_layer", "fine_tune", "ablr"}
        assert finite(*task["mse"].values()) and min(task["mse"].values()) > 0
        assert set(task["coverage_2sd"]) == {"lingp", "ablr"}
        assert all(0.0 <= c <= 1.0 for c in task["coverage_2sd"].values())
        assert task["lingp"]["noise"] > 0 and task["ablr"]["alpha"] > 0 and task["ablr"]["beta"] > 0
    mses = [t["mse"]["lingp"] for t in report["tasks"]]
    assert report["summary"]["lingp"]["mse_mean"] == pytest.approx(sum(mses) / len(mses))
    ex = report["example"]
    assert len(ex["x_context"]) == 10 and len(ex["lingp_std"]) == len(ex["x_test"])
    assert "| lingp |" in stdout and "| ABLR |" in stdout


def test_sinusoid_single_source_network_fits_the_reference_task():
    import numpy as np
    import torch

    from benchmarks import repro_sinusoid as rs

    threads = torch.get_num_threads()
    try:
        args = rs.parse_args(["--quick", "--source", "single", "--source-steps", "200"])  # sets torch's threads
        model, loss = rs.source_network(args, "cpu", np.random.default_rng(0))
    finally:
        torch.set_num_threads(threads)
    x = np.linspace(-5, 5, 50)
    prediction = model(rs.column(x, "cpu")).detach().numpy()[:, 0]
    truth = rs.sinusoid(x, rs.SOURCE_TASK)
    # 200 steps already explain most of the reference sinusoid's variance
    assert np.mean((prediction - truth) ** 2) < 0.5 * np.var(truth) and loss < 0.5 * np.var(truth)


def test_rotated_digits_quick(tmp_path):
    report, stdout = quick_report("repro_rotated_digits", tmp_path)
    assert report["p"] == (8 * 9 + 8) + (16 * 8 * 9 + 16) + (256 * 64 + 64) + (64 + 1)
    assert [row["size"] for row in report["summary"]] == [10, 20]
    for run in report["runs"]:
        assert finite(*run["rmse_degrees"].values()) and min(run["rmse_degrees"].values()) > 0
    # the unadapted network does not see the adaptation set: the same error at every size
    source = {run["rmse_degrees"]["source"] for run in report["runs"]}
    assert len(source) == 1
    assert "| 10 |" in stdout and "| 20 |" in stdout


def test_tabular_shift_quick(tmp_path):
    report, stdout = quick_report("repro_tabular_shift", tmp_path)
    split = report["split"]
    assert split["source_train"] + split["source_validation"] + split["target"] == 442
    assert split["target_mean_shift_in_source_sds"] > 0  # higher BMI, more progression: a real shift
    assert len(report["runs"]) == 2 * 2
    for run in report["runs"]:
        assert set(run["rmse"]) == {"source", "lingp", "last_layer", "fine_tune", "ablr", "target_linear"}
        assert finite(*run["rmse"].values()) and min(run["rmse"].values()) > 0
    assert finite(report["source_validation_rmse"])
    assert "| 10 |" in stdout and "| 20 |" in stdout


def test_run_all_rejects_missing_scripts_and_bad_options(tmp_path):
    run_all = ROOT / "benchmarks" / "run_all"
    missing = subprocess.run([str(run_all), "--out", str(tmp_path), "no_such_benchmark"], capture_output=True,
                             text=True, timeout=60, check=False)
    assert missing.returncode != 0 and "FAIL  no_such_benchmark" in missing.stdout
    bad = subprocess.run([str(run_all), "--backend", "tpu"], capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "numpy or cupy" in bad.stderr


@pytest.mark.skipif({s.name: s for s in backends.available_backends()}["cupy"].usable,
                    reason="CuPy works here, so --backend cupy succeeds")
def test_run_all_fails_when_a_script_fails(tmp_path):
    result = subprocess.run([str(ROOT / "benchmarks" / "run_all"), "--backend", "cupy", "--out", str(tmp_path),
                             "repro_tabular_shift"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert "FAIL  repro_tabular_shift" in result.stdout and "not usable here" in result.stdout
