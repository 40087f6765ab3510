"""benchmarks/bench_products.py --quick runs, prints its table and writes a JSON report with every path measured."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (the autograd and finite-difference paths)

from tests.helpers import tolerance

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
    for (product, _), row in rows.items():
        assert row["per_product_s"] > 0 and row["sequence_s"] > 0 and row["setup_s"] >= 0
        base = rows[(product, report["baselines"][product])]
        assert row["speedup_per_product"] == base["per_product_s"] / row["per_product_s"]
        assert row["speedup_sequence"] == base["sequence_s"] / row["sequence_s"]
    assert report["baselines"] == {"Kv": "autograd", "Fv": "fd_kl"} and report["model"]["p"] == 4417
    # exact products agree to float32 rounding (~1e-7 measured); the finite difference to about its step (~2e-3)
    for key in (("Kv", "autograd"), ("Kv", "gram"), ("Fv", "autograd")):
        assert rows[key]["rel_diff_vs_blocks"] <= tolerance(np.float32, 100)
    assert rows[("Kv", "blocks")]["rel_diff_vs_blocks"] == rows[("Fv", "blocks")]["rel_diff_vs_blocks"] == 0.0
    assert rows[("Fv", "fd_kl")]["rel_diff_vs_blocks"] < 2e-2
    targets = report["targets"]
    for product in ("Kv", "Fv"):
        assert targets[f"{product}_per_product"] == rows[(product, "blocks")]["speedup_per_product"]
        assert targets[f"{product}_sequence"] == rows[(product, "blocks")]["speedup_sequence"]
    assert targets["met"] == (min(targets[k] for k in targets if k not in ("met", "speedup_min")) >= 10.0)
