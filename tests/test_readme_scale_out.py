"""README's "Scale out" snippet runs as written: it is cut from README.md, run in a fresh interpreter (it starts its own
LocalCluster of two worker processes) and must print the sharded Jacobian, the plan and the result shapes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("distributed", reason="the Dask extra is not installed (pip install -e '.[dask]')")

ROOT = Path(__file__).resolve().parents[1]


def scale_out_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Scale out", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Scale out section must hold exactly one python block"
    return blocks[0]


def test_readme_scale_out_runs_as_written(tmp_path):
    script = tmp_path / "scale_out.py"
    script.write_text(scale_out_snippet(), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=240, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("ShardedJacobian(n=1000, c=3, p=579"), result.stdout
    assert lines[1].startswith("iterative"), result.stdout
    assert lines[2:] == ["(50, 3)", "(50, 3)", "(50, 3)"], result.stdout
