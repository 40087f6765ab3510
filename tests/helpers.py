"""Assertion and tolerance helpers shared by the tests: every result is checked against a float64 NumPy oracle."""
from __future__ import annotations

from typing import Any

import numpy as np


def tolerance(dtype: Any, factor: float = 1000.0) -> float:
    """A relative tolerance derived from the dtype: ``factor`` units of its machine epsilon.

    The default gives ~2e-13 for float64 and ~1e-4 for float32; ill-conditioned checks pass a factor scaled by the
    condition number instead of a hand-picked number.
    """
    return float(factor * np.finfo(np.dtype(dtype)).eps)


def assert_matches(actual: Any, expected: np.ndarray, backend: Any, *, dtype: Any, rtol: float | None = None,
                   atol: float | None = None) -> None:
    """Check array type, dtype, shape and values of ``actual`` against a float64 NumPy oracle ``expected``.

    Tolerances default to :func:`tolerance` of ``dtype``; ``atol`` defaults to ``rtol`` times the oracle's largest
    magnitude, so entries that cancel to ~0 are judged on the scale of the whole result.
    """
    assert isinstance(expected, np.ndarray) and expected.dtype == np.float64, "the oracle must be a float64 NumPy array"
    assert isinstance(actual, backend.xp.ndarray), f"expected a {backend.name} array, got {type(actual)}"
    assert actual.dtype == np.dtype(dtype), f"dtype {actual.dtype}, expected {np.dtype(dtype)}"
    assert tuple(actual.shape) == expected.shape, f"shape {tuple(actual.shape)}, expected {expected.shape}"
    rtol = tolerance(dtype) if rtol is None else rtol
    if atol is None:
        atol = rtol * (float(np.abs(expected).max()) if expected.size else 0.0)
    np.testing.assert_allclose(backend.to_numpy(actual).astype(np.float64), expected, rtol=rtol, atol=atol)


def spd_matrix(rng: np.random.Generator, n: int, condition: float = 100.0) -> np.ndarray:
    """A float64 symmetric positive-definite (n, n) matrix with eigenvalues log-spaced from 1 to ``condition``."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = np.logspace(0.0, np.log10(condition), n)
    return (q * eigenvalues) @ q.T


def data_pointer(x: Any) -> int:
    """Address of the first element of a NumPy or CuPy array (to prove that no copy was made)."""
    return int(x.data.ptr) if hasattr(x.data, "ptr") else int(x.__array_interface__["data"][0])


def spd_with_outliers(rng: np.random.Generator, n: int, condition: float, outliers: int = 10) -> np.ndarray:
    """A float64 SPD (n, n) matrix shaped like a kernel plus noise: ``outliers`` eigenvalues spread log-evenly up to
    ``condition``, the rest clustered near 1 (the noise floor)."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = 1.0 + 0.1 * rng.random(n)
    eigenvalues[:outliers] = np.logspace(np.log10(condition), 1.0, outliers)
    return (q * eigenvalues) @ q.T
