"""benchmarks/bench_posterior.py --quick runs, prints its table and writes a JSON report whose posterior means and
variances equal the float64 dense GP posterior of the same seeded network and data (J from torch.func)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from benchmarks import bench_posterior as bench
from benchmarks._common import paper_mlp
from tests.helpers import dense_gp_posterior, run_alongside, tolerance, torch_jacobian

ROOT = Path(__file__).resolve().parents[1]
N, SEED = 40, 0


def dense_posterior() -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance (50,) of the benchmark's quick GP in float64: K = s·J Jᵀ, C = K + σ²I, written out here."""
    model, x = paper_mlp(N, "cpu", bench.QUICK_WIDTHS, seed=SEED)
    _, x_star = paper_mlp(bench.N_TEST, "cpu", bench.QUICK_WIDTHS, seed=SEED + 100)
    y = bench.targets(x, SEED)
    J, f0 = torch_jacobian(model, x)
    Js, f0s = torch_jacobian(model, x_star)
    mean, var, _ = dense_gp_posterior(J, f0, Js, f0s, y, bench.PRIOR_SCALE, bench.NOISE)
    return mean, var


def relative(got: list, ref: np.ndarray) -> float:
    return float(np.abs(np.array(got) - ref).max() / np.abs(ref).max())


def test_bench_posterior_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_posterior.py"), "--quick", "--sizes", str(N),
               "--baseline-cap", "30", "--iterative-sizes", str(N), "--profile", "--seed", str(SEED), "--out",
               str(tmp_path)]
    result, (mean, var) = run_alongside(command, dense_posterior, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "function-cholesky" in result.stdout
    report = json.loads((tmp_path / "bench_posterior_numpy_quick.json").read_text())
    (row,) = report["rows"]
    assert row["n"] == N and row["p"] == 4417 and row["lingp"]["plan"] == "function-cholesky"
    assert len(row["lingp"]["mean"]) == len(row["lingp"]["var"]) == report["n_test"] == bench.N_TEST
    # the exact path from a float32 network: float32 rounding of J (measured 1.2e-7), float64 kernel and Cholesky
    assert relative(row["lingp"]["mean"], mean) <= tolerance(np.float32, 100)
    assert relative(row["lingp"]["var"], var) <= tolerance(np.float32, 100)
    # the autograd baseline: float32 CG to its default tolerance √eps (measured 9e-5); its reported gap is recomputed
    base = row["autograd"]
    assert base["converged"] and base["iterations"] >= 1
    assert relative(base["mean"], mean) <= 10 * np.sqrt(np.finfo(np.float32).eps)
    gap = np.abs(np.array(base["mean"]) - np.array(row["lingp"]["mean"])).max()
    assert base["max_abs_mean_diff"] == gap
    assert "cProfile of an extra lingp run at n = 40" in result.stdout
    own = [r["own_s"] for r in row["profile"]]
    assert 0 < len(own) <= 12 and own == sorted(own, reverse=True) and all(r["calls"] >= 1 for r in row["profile"])
    # the iterative path: mean to CG's float32 accuracy (measured 1.5e-6), variances within the error it reports
    (it,) = report["iterative_rows"]
    iterative = it["lingp_iterative"]
    assert iterative["plan"] == "iterative"
    assert relative(iterative["mean"], mean) <= tolerance(np.float32, 1000)
    # its variances: within the cache's error it reports, beyond the float32 export's own (the exact row's bound)
    reported = iterative["diagnostics"][0]["variance_error"]
    assert relative(iterative["var"], var) <= reported + tolerance(np.float32, 100)
    assert iterative["max_rel_mean_diff"] == relative(iterative["mean"], np.array(row["lingp"]["mean"]))
    assert (tmp_path / "bench_posterior_numpy_quick.png").exists()
