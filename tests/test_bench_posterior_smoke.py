"""benchmarks/bench_posterior.py --quick runs, prints its table and writes a JSON report for lingp and the baseline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def test_bench_posterior_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_posterior.py"), "--quick", "--sizes", "40",
               "--baseline-cap", "3", "--iterative-sizes", "40", "--profile", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "function-cholesky" in result.stdout
    report = json.loads((tmp_path / "bench_posterior_numpy_quick.json").read_text())
    (row,) = report["rows"]
    assert row["n"] == 40 and row["lingp"]["plan"] == "function-cholesky"
    assert len(row["lingp"]["mean"]) == len(row["lingp"]["var"]) == report["n_test"] == 50
    assert np.all(np.array(row["lingp"]["var"]) >= 0) and row["autograd"]["iterations"] >= 1
    assert "cProfile of an extra lingp run at n = 40" in result.stdout
    own = [r["own_s"] for r in row["profile"]]
    assert 0 < len(own) <= 12 and own == sorted(own, reverse=True) and all(r["calls"] >= 1 for r in row["profile"])
    (it,) = report["iterative_rows"]
    assert it["lingp_iterative"]["plan"] == "iterative" and it["lingp_iterative"]["max_rel_mean_diff"] < 1e-3
    assert (tmp_path / "bench_posterior_numpy_quick.png").exists()
