"""The kernel-assembly benchmark's quick mode keeps working and its kernel equals the raw product."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_kernels_quick(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--quick", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "raw/kernel" in result.stdout
    rows = json.loads((tmp_path / "bench_kernels.json").read_text())["rows"]
    assert [(r["nc"], r["dtype"]) for r in rows] == [(512, "float32"), (512, "float64")]
    for r in rows:
        assert r["max_rel_diff"] <= 1e-5 and r["kernel_s"] > 0
        assert r["kernel_peak_bytes"] >= r["K_bytes"]  # tracemalloc saw the kernel being allocated
