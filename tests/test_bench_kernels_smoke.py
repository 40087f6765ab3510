"""The kernel-assembly benchmark's quick mode keeps working and its kernel equals the raw product to the rounding of
its dtype (the same J, two summation orders)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers import tolerance

ROOT = Path(__file__).resolve().parents[1]


def test_bench_kernels_quick(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--quick", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "raw/kernel" in result.stdout
    rows = json.loads((tmp_path / "bench_kernels.json").read_text())["rows"]
    assert [(r["nc"], r["dtype"]) for r in rows] == [(512, "float32"), (512, "float64")]
    for r in rows:
        itemsize = np.dtype(r["dtype"]).itemsize
        # entries are sums of p = 4096 products of standard normals, ~√p·max: tile sums vs GEMM differ by rounding
        assert r["max_rel_diff"] <= tolerance(r["dtype"], 100) and r["kernel_s"] > 0
        assert r["K_bytes"] == r["nc"] ** 2 * itemsize and r["p"] == 4096
        assert r["kernel_peak_bytes"] >= r["K_bytes"]  # tracemalloc saw the kernel being allocated
        assert r["speedup_vs_raw"] == r["raw_JJt_s"] / r["kernel_s"]
        assert r["speedup_vs_gemm"] == r["general_gemm_s"] / r["kernel_s"]
