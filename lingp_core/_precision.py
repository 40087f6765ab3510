"""Tolerances and working dtypes derived from the input dtype (never a fixed number that suits only float64)."""
from __future__ import annotations

from typing import Any

import numpy as np


def eps(dtype: Any) -> float:
    """Machine epsilon of a float dtype."""
    return float(np.finfo(np.dtype(dtype)).eps)


def default_rtol(dtype: Any) -> float:
    """Default relative residual tolerance for iterative solves: sqrt(eps), ~1.5e-8 (float64), ~3.5e-4 (float32).

    Half the digits of the dtype: tight enough for posterior means, reachable in float32 on conditioning up to
    ~1e3 before stagnation detection stops the iteration.
    """
    return float(np.sqrt(eps(dtype)))

