"""The solver benchmark's quick mode keeps working: it runs, prints its table and writes sane JSON and a plot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_solvers_quick(tmp_path):
    pytest.importorskip("linear_operator")
    pytest.importorskip("matplotlib")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_solvers.py"), "--quick", "--sizes", "200",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "GPyT/CG" in result.stdout
    data = json.loads((tmp_path / "bench_solvers.json").read_text())
    (row,) = data["rows"]
    assert row["n"] == 200 and row["lingp_cg_converged"] and row["lingp_pcg_converged"]
    assert row["lingp_cg_relres"] <= row["rtol"]
    assert (tmp_path / "bench_solvers.png").stat().st_size > 0
