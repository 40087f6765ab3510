"""benchmarks/study_few_labels.py --quick runs every variant on one labelled set and writes its table as JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_study_few_labels_quick(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from study_few_labels import ORACLES, VARIANTS
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "study_few_labels.py"), "--quick", "--out",
                             str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "study_few_labels_quick.json").read_text())
    assert report["seeds"] == [0] and report["budgets"] == [1] and report["repeats"] == 1
    variants = {e["variant"]: e for e in report["summary"]}
    assert set(variants) == {"fine-tune", "linearized-fine-tune", "linearized-fine-tune-lr0.001", *VARIANTS,
                             *ORACLES, "oracle-any-lingp"}
    lingp = [variants[name]["accuracy"] for name in (*VARIANTS, *ORACLES)]
    assert variants["oracle-any-lingp"]["accuracy"] == max(lingp)  # the best lingp row of the draw, by test accuracy
    for name, entry in variants.items():
        assert entry["runs"] == 1 and entry["labels_per_class"] == 1
        assert 0.0 <= entry["accuracy"] <= 1.0 and 0.0 <= entry["ece"] <= 1.0 and entry["nll"] > 0.0, entry
        assert f"| {name} |" in result.stdout
