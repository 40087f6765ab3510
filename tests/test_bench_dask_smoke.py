"""benchmarks/bench_dask.py --quick runs on a 2-worker LocalCluster, prints its tables and writes a JSON report whose
posterior means and variances, in one process and on the cluster, equal the float64 dense GP posterior of the same
seeded network and data (J from torch.func) and agree with each other; its round accounting is consistent."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed", reason="the Dask benchmark needs dask.distributed (pip install 'lingp[dask]')")

from benchmarks import bench_dask as bench  # noqa: E402
from tests.helpers import dense_gp_posterior, run_alongside, tolerance, torch_jacobian  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N, SEED, RANK, REPS = 40, 0, 8, 5
EPS = float(np.finfo(np.float64).eps)


def dense_posterior() -> tuple[np.ndarray, np.ndarray, float, int]:
    """Mean and variance (50,) of the benchmark's quick GP in float64 (K = s·J Jᵀ, C = K + σ²I, written out here),
    the condition number of C, and p."""
    model, x = bench.network(N, bench.QUICK_WIDTHS, SEED, "cpu")
    _, x_star = bench.network(bench.N_TEST, bench.QUICK_WIDTHS, SEED + 100, "cpu")
    y = bench.targets(x, SEED)
    J, f0 = torch_jacobian(model, x)
    Js, f0s = torch_jacobian(model, x_star)
    mean, var, C = dense_gp_posterior(J, f0, Js, f0s, y, bench.PRIOR_SCALE, bench.NOISE)
    return mean, var, float(np.linalg.cond(C)), J.shape[1]


def relative(got: list, ref: np.ndarray) -> float:
    return float(np.abs(np.array(got) - np.array(ref)).max() / np.abs(np.array(ref)).max())


def test_bench_dask_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_dask.py"), "--quick", "--n", str(N), "--workers", "2",
               "--preconditioner-rank", str(RANK), "--latency-reps", str(REPS), "--probe-rounds", "1", "--seed",
               str(SEED), "--out", str(tmp_path)]
    result, (mean, var, cond, p) = run_alongside(command, dense_posterior, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| dask, 2 workers |" in result.stdout and "Model for extrapolation" in result.stdout
    report = json.loads((tmp_path / "bench_dask_numpy_quick.json").read_text())
    single, dist = report["rows"]
    assert (single["workers"], dist["workers"]) == (0, 2) and report["p"] == p
    assert report["reduction_bytes_per_column"] == 8 * p
    # CG stops at a relative residual of √eps, so α is within cond(C)·√eps (measured 6.5e-9 here, cond ≈ 880); the
    # energy-form variances err by the square of that, the oracle's own prior − reduction by eps·cond·prior/var
    # (prior/var ≤ cond): both under 2·cond²·eps (measured 1e-13)
    mean_tol, var_tol = cond * np.sqrt(EPS), 2 * cond**2 * EPS
    for row in (single, dist):
        assert row["plan"] == "iterative" and row["cg_iterations"] >= 1
        assert len(row["mean"]) == len(row["var"]) == report["n_test"] == bench.N_TEST
        assert relative(row["mean"], mean) <= mean_tol
        assert relative(row["var"], var) <= var_tol
    # the cluster and the single process: the same CG to rounding (measured 4e-11 and 3e-15); reported gaps recomputed
    assert relative(dist["mean"], single["mean"]) <= mean_tol and relative(dist["var"], single["var"]) <= var_tol
    assert dist["max_rel_mean_diff"] == relative(dist["mean"], single["mean"])
    assert dist["max_rel_var_diff"] == relative(dist["var"], single["var"])
    # rounds: one per preconditioner column and per CG iteration at least; wall = products + reduction + the rest
    fit = dist["fit_rounds"]
    assert fit["rounds"] >= RANK + dist["cg_iterations"] and dist["predict_rounds"]["rounds"] >= 1
    for rounds in (fit, dist["predict_rounds"], dist["probe"]["rounds"]):
        assert rounds["compute_s"] > 0 and rounds["reduction_s"] >= 0 and rounds["scheduling_s"] >= 0
        assert rounds["wall_s"] == pytest.approx(rounds["compute_s"] + rounds["reduction_s"] + rounds["scheduling_s"])
    assert dist["shard_rows"] == [N // 2, N // 2] and dist["round_trip"]["reps"] == REPS
    assert 0 < dist["round_trip"]["min_s"] <= dist["round_trip"]["median_s"]
    (threads,) = dist["worker_threads"]  # both workers alike: one torch thread, one BLAS/OpenMP thread (the default)
    assert threads["torch"] == 1 and all(threads[k] == "1" for k in bench.THREAD_VARIABLES)
    # the probe: the same kernel product on the shards and in one process, to rounding
    assert dist["probe"]["n"] == single["probe"]["n"] == bench.QUICK_PROBE_N
    assert dist["probe"]["max_rel_product_diff"] <= tolerance(np.float64)
    assert (tmp_path / "bench_dask_numpy_quick.png").exists()
