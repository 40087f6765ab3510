"""benchmarks/bench_export.py --quick runs, prints its table and writes a JSON report with every path measured."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def test_bench_export_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_export.py"), "--quick", "--out",
                             str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "factored" in result.stdout and "torchfunc" in result.stdout and "autograd_kvp" in result.stdout
    report = json.loads((tmp_path / "bench_export_numpy_quick.json").read_text())
    assert report["model"]["p"] == 803_601 and report["backend"] == "numpy" and report["quick"] is True
    assert "ru_maxrss" in report["memory_method"]
    rows = {(r["path"], r["n"]): r for r in report["rows"]}
    for path in ("factored", "torchfunc", "autograd_kvp"):
        row = rows[(path, 100)]
        assert row["status"] == "ok", row
        assert row["time_s"] > 0 and row["peak_rss_bytes"] >= row["peak_above_baseline_bytes"] >= 0
    ratio = report["ratios"][0]
    assert ratio["n"] == 100 and ratio["speedup_factored_vs_torchfunc"] > 0
    assert 0 < ratio["memory_ratio_factored_over_torchfunc"]
    assert report["kernel_agreement"]["max_abs_diff_over_max_abs"] < 1e-5  # float32 kernels of (a) and (b) agree
    assert not list(tmp_path.glob(".kernel_*"))  # scratch kernels are removed
