"""Importing lingp_core or backends must not import cupy, torch or dask (slow, and absent on many machines)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["lingp_core", "backends"])
def test_import_loads_no_cupy_torch_or_dask(module):
    code = (f"import sys, {module}; "
            "heavy = ('cupy', 'cupyx', 'torch', 'dask', 'distributed'); "
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"import {module} loaded: {result.stdout.strip()}"
