"""The Laplace benchmark's quick mode keeps working: it runs, prints its table and writes sane JSON and a plot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_laplace_quick(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_laplace.py"), "--quick", "--peers",
                             "none", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "lingp full (probit)" in result.stdout and "laplace-torch full" in result.stdout
    data = json.loads((tmp_path / "bench_laplace_numpy_quick.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert data["quick"] and data["sizes"]["n_train"] == 200
    for name in ("MAP", "lingp full (probit)", "lingp full (MC)", "lingp last layer (probit)"):
        row = rows[name]
        assert row["time_s"] > 0 and 0 < row["accuracy"] <= 1 and row["nll"] > 0 and 0 <= row["ece"] <= 1
    ours = rows["lingp full (probit)"]
    assert ours["prior_scale"] > 0 and ours["evidence_steps"] >= 1 and ours["plan"].startswith("parameter")
    assert all("skipped" in rows[f"laplace-torch {v}"] for v in ("full", "kron", "last layer"))
    assert "accuracy_vs_map" in data["targets"]
    assert (tmp_path / "bench_laplace_numpy_quick.png").stat().st_size > 0
