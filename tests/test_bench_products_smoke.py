"""benchmarks/bench_products.py --quick runs, prints its table and writes a JSON report with every path measured."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def test_bench_products_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_products.py"), "--quick", "--repeats",
                             "2", "--sequence", "10", "--out", str(tmp_path)], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fd_kl (baseline)" in result.stdout and "| Kv | blocks |" in result.stdout
    report = json.loads((tmp_path / "bench_products_numpy_quick.json").read_text())
    assert report["benchmark"] == "bench_products" and report["backend"] == "numpy" and report["quick"] is True
    assert report["sequence"] == 10 and report["eps"] == 1e-4
    rows = {(r["product"], r["path"]): r for r in report["rows"]}
    assert set(rows) == {("Kv", "blocks"), ("Kv", "gram"), ("Kv", "autograd"), ("Fv", "blocks"), ("Fv", "autograd"),
                         ("Fv", "fd_kl")}
    for row in rows.values():
        assert row["per_product_s"] > 0 and row["sequence_s"] > 0 and row["setup_s"] >= 0
        assert row["speedup_per_product"] > 0 and row["speedup_sequence"] > 0
    assert rows[("Kv", "autograd")]["speedup_per_product"] == 1.0 and rows[("Fv", "fd_kl")]["speedup_sequence"] == 1.0
    # exact products agree to float32 rounding (~1e-7 measured); the finite difference to about its step (~2e-3)
    assert rows[("Kv", "autograd")]["rel_diff_vs_blocks"] < 1e-5
    assert rows[("Kv", "gram")]["rel_diff_vs_blocks"] < 1e-5
    assert rows[("Fv", "autograd")]["rel_diff_vs_blocks"] < 1e-5
    assert rows[("Fv", "fd_kl")]["rel_diff_vs_blocks"] < 2e-2
    assert set(report["targets"]) >= {"Fv_per_product", "Fv_sequence", "Kv_per_product", "Kv_sequence", "met"}
