"""benchmarks/bench_export.py --quick runs, prints its table and writes a JSON report with every path measured."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (the exported network)

from tests.helpers import tolerance

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
    assert ratio["n"] == 100
    factored, full = rows[("factored", 100)], rows[("torchfunc", 100)]
    assert ratio["speedup_factored_vs_torchfunc"] == full["time_s"] / factored["time_s"]
    assert ratio["memory_ratio_factored_over_torchfunc"] == (factored["peak_above_baseline_bytes"]
                                                             / max(1, full["peak_above_baseline_bytes"]))
    # the float32 kernels of lingp's factored blocks and of torch.func's full Jacobian agree to float32 rounding
    assert report["kernel_agreement"]["n"] == 100
    assert report["kernel_agreement"]["max_abs_diff_over_max_abs"] <= tolerance(np.float32, 100)
    assert not list(tmp_path.glob(".kernel_*"))  # scratch kernels are removed
