"""The paper reproductions (benchmarks/repro_*.py) keep working: each --quick run prints its table, writes a JSON
report whose numbers are finite and consistent, and a PNG; --help documents the shared options; benchmarks/run_all
runs a named script and fails when a script does. The ReLU toy's GP posteriors, marginal likelihoods and test scores
equal a float64 dense GP written out here from torch.func Jacobians of the same seeded networks (for averaged
hyperparameters, the dense mixture over the reported grid points and weights); --lingp-hyperparameters lands in the
reports."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib  # noqa: F401  (every script writes its plot)
import numpy as np
import pytest
import sklearn  # noqa: F401  (the digits and diabetes data)
import torch

import backends
from benchmarks import _baselines as bl
from tests.helpers import run_alongside, torch_jacobian

ROOT = Path(__file__).resolve().parents[1]
# run_all calls `python3` from PATH: the interpreter running these tests comes first, as in an activated venv
RUN_ALL_ENV = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
SCRIPTS = ["repro_relu_toy", "repro_sinusoid", "repro_rotated_digits", "repro_tabular_shift"]


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
    assert report["machine"]["blas_threads"] == report["machine"]["torch_threads"] == 1  # --torch-threads' default
    assert (out / f"{name}_quick.png").stat().st_size > 0
    assert "|---|" in stdout  # the markdown table
    return report


def quick_report(name: str, out: Path, *args: str) -> tuple[dict, str]:
    result = run_script(name, "--quick", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return check_report(name, out, result.stdout), result.stdout


def finite(*values: float) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) for v in values)


def check_mean_and_stderr(mean: float, stderr: float, values: list[float]) -> None:
    """A reported mean ± standard error against the per-run values it summarizes, recomputed here."""
    v = np.asarray(values, dtype=np.float64)
    assert mean == pytest.approx(v.mean(), rel=1e-12)
    assert stderr == pytest.approx(v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0, rel=1e-12, abs=1e-300)


def check_size_summaries(report: dict, key: str, methods: set[str]) -> None:
    """Each adaptation size's mean ± s.e. (and lingp's win counts where reported) against the runs of that size."""
    for row in report["summary"]:
        at = [r for r in report["runs"] if r["size"] == row["size"]]
        assert at and all(set(r[key]) == methods for r in at)
        for m in methods:
            check_mean_and_stderr(row[m]["mean"], row[m]["stderr"], [r[key][m] for r in at])
        for m, wins in row.get("lingp_better_than", {}).items():
            assert wins == sum(r[key]["lingp"] < r[key][m] for r in at)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_documents_the_shared_options(name):
    result = run_script(name, "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--backend", "--quick", "--seed", "--out", "--torch-threads", "--lingp-hyperparameters"):
        assert option in result.stdout


def relu_toy_networks() -> tuple[dict, np.ndarray, np.ndarray]:
    """The toy's quick networks (untrained and trained by the script's own seeded loop, per width), and its data."""
    import copy

    from benchmarks import _baselines as bl
    from benchmarks import repro_relu_toy as toy

    args = toy.parse_args(["--quick"])  # also sets torch's threads: restored below
    rng = np.random.default_rng(args.seed)
    (x, y), (x_test, y_test) = toy.toy_data(rng, args.n), toy.toy_data(rng, args.n)
    networks = {}
    for width in args.widths:
        untrained = toy.relu_net(width, args.seed, "cpu")
        trained = copy.deepcopy(untrained)
        bl.train_mse(trained, toy.column(x, "cpu"), toy.column(y, "cpu"), steps=args.steps, lr=1e-2, seed=args.seed)
        networks[(width, "untrained")], networks[(width, "trained")] = untrained, trained
    return networks, np.stack([x, y]), np.stack([x_test, y_test])


def dense_gp(jac: tuple, jac_star: tuple, y: np.ndarray, s: float, noise: float) -> tuple:
    """Mean f(x*) + s J* Jᵀ C⁻¹ (y − f(x)), latent variance and log N(y | f(x), C), C = s J Jᵀ + σ²I, in float64,
    from the torch.func Jacobians and outputs ``jac = (J, f)`` at x and ``jac_star`` at x*."""
    (J, f), (Js, fs) = jac, jac_star
    C = s * J @ J.T + noise * np.eye(len(y))
    L = np.linalg.cholesky(C)
    alpha = np.linalg.solve(L.T, np.linalg.solve(L, y - f[:, 0]))
    V = np.linalg.solve(L, s * J @ Js.T)
    lml = -0.5 * (y - f[:, 0]) @ alpha - np.log(np.diag(L)).sum() - 0.5 * len(y) * np.log(2 * np.pi)
    return fs[:, 0] + s * Js @ (J.T @ alpha), s * np.einsum("ij,ij->i", Js, Js) - np.einsum("ij,ij->j", V, V), lml


def dense_row(row: dict, jac: tuple, jac_star: tuple, y: np.ndarray) -> tuple:
    """A report row's GP by :func:`dense_gp`: mean, latent variance, log ML at the row's (s, σ²), and the noise of an
    observation; for an averaged row the mean and variance of the mixture over its grid points and weights (the
    variance as Σ w (var_g + (mean_g − mean)²)) and the weighted mean of σ²."""
    if row.get("layerwise"):  # a mixture over per-layer weights ω of mixtures over (s, σ²); its lml is not a point's
        layerwise = row["layerwise"]
        edges = np.cumsum([0] + layerwise["block_sizes"])
        parts, noise = [], 0.0
        for component in layerwise["mixture"]:
            root = np.repeat(np.sqrt(component["block_weights"]), np.diff(edges))
            scaled = [(a[0] * root, a[1]) for a in (jac, jac_star)]
            mean, var, _, n = dense_row({**row, "layerwise": None, "mixture": component["mixture"]}, *scaled, y)
            parts.append((mean, var))
            noise += component["weight"] * n
        weights = np.array([c["weight"] for c in layerwise["mixture"]])
        return (*mixture_moments(weights, parts), None, noise)
    mean, var, lml = dense_gp(jac, jac_star, y, row["prior_scale"], row["noise"])
    if row["mixture"] is None:
        return mean, var, lml, row["noise"]
    weights, noises = np.asarray(row["mixture"]["weights"]), np.asarray(row["mixture"]["noises"])
    parts = [dense_gp(jac, jac_star, y, s, n)[:2] for s, n in zip(row["mixture"]["prior_scales"], noises)]
    return (*mixture_moments(weights, parts), lml, float(weights @ noises))


def mixture_moments(weights: np.ndarray, parts: list) -> tuple:
    """Mean Σ w m_g and variance Σ w (v_g + (m_g − mean)²) of a mixture of (mean, variance) parts."""
    means = np.array([m for m, _ in parts])
    mean = weights @ means
    return mean, weights @ (np.array([v for _, v in parts]) + (means - mean) ** 2)


def check_relu_toy_against_dense(report: dict, networks: dict, train: np.ndarray, test: np.ndarray) -> None:
    """Every row and curve of the toy's report against :func:`dense_row`; the matched rows' s from its definition
    var(y) / mean diag(J Jᵀ)."""
    x, y = train
    np.testing.assert_array_equal(np.array(report["data"]["x"]), x)  # the same seeded data
    grid = np.array(report["data"]["grid"])
    rtol = 1e-9  # float64 throughout; Cholesky of C with condition ≲ 1e4
    for row, curve in zip(report["rows"], report["curves"]):
        model = networks[(row["width"], row["state"])]
        jac = torch_jacobian(model, x[:, None])
        jac_star = torch_jacobian(model, np.concatenate([test[0], grid])[:, None])
        if row["setting"] != "matched" and report["lingp_prior"] == "weights":  # θ ~ N(0, s·I): mean f − J θ̂
            theta = np.concatenate([p.detach().double().reshape(-1).numpy() for p in model.parameters()])
            jac, jac_star = ((J, f - (J @ theta)[:, None]) for J, f in (jac, jac_star))
        mean, var, lml, noise = dense_row(row, jac, jac_star, y)
        if row["setting"] == "matched":
            J = jac[0]
            assert row["prior_scale"] == pytest.approx(np.var(y) / np.mean(np.sum(J**2, axis=1)), rel=rtol)
        scale = np.abs(mean).max()
        n_test = test.shape[1]
        np.testing.assert_allclose(curve["gp_mean"], mean[n_test:], rtol=rtol, atol=rtol * scale)
        np.testing.assert_allclose(np.square(curve["gp_std"]), var[n_test:], rtol=1e-6, atol=rtol * var.max())
        if lml is not None:
            assert row["log_marginal_likelihood"] == pytest.approx(lml, rel=rtol)
        assert row["predictive_noise"] == pytest.approx(noise, rel=1e-12)
        assert row["gp_test_rmse"] == pytest.approx(np.sqrt(np.mean((mean[:n_test] - test[1]) ** 2)), rel=rtol)
        predictive = var[:n_test] + noise
        nlpd = 0.5 * np.mean(np.log(2 * np.pi * predictive) + (test[1] - mean[:n_test]) ** 2 / predictive)
        assert row["gp_test_nlpd"] == pytest.approx(nlpd, rel=1e-6)
        with torch.no_grad():
            net = model(torch.as_tensor(grid[:, None])).numpy()[:, 0]
        np.testing.assert_allclose(curve["network"], net, rtol=1e-12, atol=1e-12 * np.abs(net).max())


def test_relu_toy_quick_through_run_all(tmp_path):
    # run_all's success path and the script's report in one run: a quick run costs seconds
    threads = torch.get_num_threads()
    try:  # the oracle's networks while the script runs (no wall time on two cores)
        command = [str(ROOT / "benchmarks" / "run_all"), "--out", str(tmp_path), "repro_relu_toy"]
        ran, (networks, train, test) = run_alongside(command, relu_toy_networks, env=RUN_ALL_ENV)
    finally:
        torch.set_num_threads(threads)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "ok    repro_relu_toy" in ran.stdout
    stdout = (tmp_path / "repro_relu_toy.log").read_text()
    report = check_report("repro_relu_toy", tmp_path / "repro_relu_toy", stdout)
    rows = report["rows"]
    chosen = bl.DEFAULT_HYPERPARAMETERS
    assert report["lingp_hyperparameters"] == chosen and report["lingp_prior"] == "weights"  # the toy's default
    assert [(r["width"], r["state"], r["setting"]) for r in rows] == [
        (w, state, setting) for w in (5, 50) for state in ("untrained", "trained") for setting in ("matched", chosen)]
    for r in rows:
        assert r["p"] == 3 * r["width"] + 1
        assert finite(r["prior_scale"], r["noise"], r["gp_test_rmse"], r["net_test_rmse"], r["gp_test_nlpd"])
        assert r["prior_scale"] > 0 and r["noise"] > 0
        averaged = r["setting"] != "matched" and chosen.startswith("average")
        assert (r["mixture"] is not None) == averaged
        layerwise = r["setting"] != "matched" and chosen.startswith("layerwise")
        assert bool(r["layerwise"]) == layerwise
        if layerwise:
            # two layers, four levels: 4² − 3² = 7 points, minus those holding < 1e-9 of the weight
            assert 1 <= len(r["layerwise"]["mixture"]) == r["layerwise"]["components"] <= 7
    for r in (r for r in rows if r["setting"] == "matched"):
        assert r["noise"] == pytest.approx(0.81, rel=1e-12)   # the true noise variance, held fixed
        # the inductive bias the plot shows: the posterior is tighter on the data than between the clusters
        assert r["gp_std"]["data"] < r["gp_std"]["gap"]
    for r in (r for r in rows if r["setting"] == chosen == "evidence"):
        matched = next(m for m in rows if (m["width"], m["state"], m["setting"]) == (r["width"], r["state"],
                                                                                      "matched"))
        assert r["log_marginal_likelihood"] >= matched["log_marginal_likelihood"] - 1e-6  # ML-II maximizes it
    trained = [r for r in rows if r["state"] == "trained"]
    untrained = [r for r in rows if r["state"] == "untrained"]
    assert all(t["net_test_rmse"] < u["net_test_rmse"] for t, u in zip(trained, untrained))  # training trained
    assert len(report["curves"]) == 8 and len(report["curves"][0]["gp_mean"]) == len(report["data"]["grid"])
    assert stdout.count("\n| 5 |") == 4 and stdout.count("\n| 50 |") == 4
    check_relu_toy_against_dense(report, networks, train, test)


def test_sinusoid_quick(tmp_path):
    report, stdout = quick_report("repro_sinusoid", tmp_path)
    assert report["p"] == 1 * 40 + 40 + 40 * 40 + 40 + 40 + 1 and report["source"] == "multitask"
    assert report["lingp_hyperparameters"] == bl.DEFAULT_HYPERPARAMETERS
    assert len(report["tasks"]) == 2
    for task in report["tasks"]:
        assert set(task["mse"]) == {"source", "lingp", "last_layer", "fine_tune", "linearized_fine_tune", "ablr"}
        assert finite(*task["mse"].values()) and min(task["mse"].values()) > 0
        assert set(task["coverage_2sd"]) == {"lingp", "ablr"}
        assert all(0.0 <= c <= 1.0 for c in task["coverage_2sd"].values())
        assert task["lingp"]["noise"] > 0 and task["ablr"]["alpha"] > 0 and task["ablr"]["beta"] > 0
        assert task["lingp"]["hyperparameters"] == bl.DEFAULT_HYPERPARAMETERS and task["lingp"]["predictive_noise"] > 0
    for m, summary in report["summary"].items():
        mses = [t["mse"][m] for t in report["tasks"]]
        check_mean_and_stderr(summary["mse_mean"], summary["mse_stderr"], mses)
        assert summary["mse_median"] == pytest.approx(np.median(mses), rel=1e-12)
        if m in ("lingp", "ablr"):
            assert summary["coverage_2sd"] == pytest.approx(np.mean([t["coverage_2sd"][m] for t in report["tasks"]]))
        if m != "lingp":
            assert report["lingp_better_than"][m] == sum(t["mse"]["lingp"] < t["mse"][m] for t in report["tasks"])
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
    check_size_summaries(report, "rmse_degrees", {"source", "lingp", "last_layer", "fine_tune", "ablr"})
    assert "| 10 |" in stdout and "| 20 |" in stdout


def test_tabular_shift_quick_with_another_hyperparameter_choice(tmp_path):
    choice = "evidence" if bl.DEFAULT_HYPERPARAMETERS != "evidence" else "average"
    report, stdout = quick_report("repro_tabular_shift", tmp_path, "--lingp-hyperparameters", choice)
    assert report["lingp_hyperparameters"] == choice and f"--lingp-hyperparameters {choice}" in report["command"]
    assert f"s and σ² by {choice}" in stdout
    split = report["split"]
    # the split recomputed from scikit-learn's raw diabetes data: BMI (column 2) at most its median is the source
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True, scaled=False)
    source = x[:, 2] <= np.median(x[:, 2])
    assert split["median"] == np.median(x[:, 2]) and split["target"] == int((~source).sum())
    n_train = round(0.8 * source.sum())
    assert split["source_train"] == n_train and split["source_validation"] == source.sum() - n_train
    shift = (y[~source].mean() - y[source].mean()) / y[source].std()
    assert split["target_mean_shift_in_source_sds"] == pytest.approx(shift, rel=1e-12) and shift > 0
    check_size_summaries(report, "rmse", {"source", "lingp", "last_layer", "fine_tune", "ablr", "target_linear"})
    assert len(report["runs"]) == 2 * 2
    for run in report["runs"]:
        assert set(run["rmse"]) == {"source", "lingp", "last_layer", "fine_tune", "ablr", "target_linear"}
        assert finite(*run["rmse"].values()) and min(run["rmse"].values()) > 0
        lingp = run["lingp"]
        assert lingp["hyperparameters"] == choice and isinstance(lingp["at_bound"], list)
        if choice == "average":
            assert lingp["effective_points"] >= 1 and 0 <= lingp["weight_on_grid_edge"] <= 1
        else:  # one (s, σ²) per prior centre: an observation's noise is σ² averaged over the centres
            assert lingp["prior"] == "network+head" and "effective_points" not in lingp
            centres, weights = lingp["centres"], lingp["prior_weights"]
            assert all(c["predictive_noise"] == c["noise"] for c in centres.values())
            assert sum(weights.values()) == pytest.approx(1.0, rel=1e-12)
            assert lingp["predictive_noise"] == pytest.approx(sum(weights[k] * centres[k]["noise"] for k in centres),
                                                              rel=1e-12)
            top = max(weights, key=weights.get)
            assert (lingp["prior_scale"], lingp["noise"]) == (centres[top]["prior_scale"], centres[top]["noise"])
    assert finite(report["source_validation_rmse"])
    assert "| 10 |" in stdout and "| 20 |" in stdout


def test_run_all_rejects_missing_scripts_and_bad_options(tmp_path):
    run_all = ROOT / "benchmarks" / "run_all"
    missing = subprocess.run([str(run_all), "--out", str(tmp_path), "no_such_benchmark"], env=RUN_ALL_ENV,
                             capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode != 0 and "FAIL  no_such_benchmark" in missing.stdout
    bad = subprocess.run([str(run_all), "--backend", "tpu"], env=RUN_ALL_ENV, capture_output=True, text=True,
                         timeout=60, check=False)
    assert bad.returncode == 2 and "numpy or cupy" in bad.stderr


@pytest.mark.skipif({s.name: s for s in backends.available_backends()}["cupy"].usable,
                    reason="CuPy works here, so --backend cupy succeeds")
def test_run_all_fails_when_a_script_fails(tmp_path):
    result = subprocess.run([str(ROOT / "benchmarks" / "run_all"), "--backend", "cupy", "--out", str(tmp_path),
                             "repro_tabular_shift"], env=RUN_ALL_ENV, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 1
    assert "FAIL  repro_tabular_shift" in result.stdout and "not usable here" in result.stdout
