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


def float_dtype(dtype: Any, name: str) -> np.dtype:
    """``dtype`` as a NumPy float32 or float64 dtype, given as a NumPy dtype, its name or a torch dtype (None reads as
    NumPy's default, float64); DTypeError naming the argument ``name`` otherwise."""
    from lingp_core._validate import DTypeError

    text = str(dtype).removeprefix("torch.") if type(dtype).__module__ == "torch" else dtype
    try:
        resolved = np.dtype(text)
    except (TypeError, ValueError):
        raise DTypeError(f"{name} must be float32 or float64, got {dtype!r}, which is not a dtype (a NumPy dtype, its "
                         "name or torch.float32/float64)") from None
    if resolved not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise DTypeError(f"{name} {resolved} is not supported: {name} must be float32 or float64, got {resolved}")
    return resolved


def largest_eigenvalue(product: Any, m: int, xp: Any, steps: int = 20) -> float:
    """λmax of a symmetric PSD m × m matrix given by ``product(x)`` = K x (x (m,) float64 → (m,) float64), by power
    iteration from a ones vector (close after a few steps for kernels, whose top eigenvector is rarely orthogonal
    to it): what the float32-kernel error estimates need, not an exact eigenvalue. 0 for m = 0."""
    x = xp.ones(m, dtype=np.float64)
    lam = 0.0
    for _ in range(steps):
        y = product(x)
        norm = float(xp.linalg.norm(y))
        if norm == 0.0 or not np.isfinite(norm):
            return norm
        lam = norm / float(xp.linalg.norm(x))
        x = y / norm
    return lam
