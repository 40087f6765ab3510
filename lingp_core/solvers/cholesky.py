"""Cholesky that adds jitter only when it must, relative to the matrix's scale, and always says so."""
from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np

from lingp_core import _validate as v
from lingp_core._precision import eps

JITTER_GROWTH = 10.0


class CholeskyResult(NamedTuple):
    """Lower factor L (n, n) with L Lᵀ = A + jitter·I, in the compute dtype on A's backend; ``jitter`` is the
    absolute amount added (0.0 when none was needed); ``tries`` counts factorization attempts."""

    factor: Any
    jitter: float
    tries: int


_SYMMETRY_TILE = 1024  # tile side of the symmetry check: A[I, J] against A[J, I]ᵀ stays in cache (8× faster at n = 10⁴)


def _scale_and_asymmetry(a: Any, xp: Any) -> tuple[float, float]:
    """(max |A|, max |A − Aᵀ|) in one pass over the upper tiles, without an n × n temporary or a strided pass."""
    n, scale, worst = a.shape[0], 0.0, 0.0
    for i in range(0, n, _SYMMETRY_TILE):
        for j in range(i, n, _SYMMETRY_TILE):
            upper = a[i: i + _SYMMETRY_TILE, j: j + _SYMMETRY_TILE]
            lower = a[j: j + _SYMMETRY_TILE, i: i + _SYMMETRY_TILE].T
            scale = max(scale, float(xp.abs(upper).max()), float(xp.abs(lower).max()))
            worst = max(worst, float(xp.abs(upper - lower).max()))
    return scale, worst


def safe_cholesky(A: Any, *, max_tries: int = 5, compute_dtype: Any = np.float64, warn: bool = True,
                  overwrite_a: bool = False) -> CholeskyResult:
    """Lower Cholesky factor of a symmetric positive (semi-)definite (n, n) array, with escalating jitter.

    The first attempt adds nothing. Each further attempt adds jitter = r·mean(diag A), r starting at
    1e-3·sqrt(eps) of A's dtype (1.5e-11 for float64, 3.5e-7 for float32) and growing 10× per attempt. The jitter
    used is in the result and, when non-zero, announced by a NumericalWarning.

    Parameters
    ----------
    A : array (n, n)
        Symmetric (to rounding) matrix, float32 or float64.
    max_tries : int
        Attempts with jitter after the plain one (default 5: up to 1.5e-7 relative for float64 input).
    compute_dtype : dtype
        Dtype of the factorization: float64 by default even for float32 input, since a float32 Cholesky of a kernel
        with condition number beyond ~1e4 loses every digit; pass float32 to trade that for speed and memory.

    overwrite_a : bool
        Let the first attempt factor A in place when it is already of ``compute_dtype`` (the factor then shares A's
        memory; NumPy only): saves the n × n copy. A failed attempt restores A from its upper triangle and diagonal
        (A itself when exactly symmetric), and the jittered retries start from that. Default False.

    Raises
    ------
    NotPositiveDefiniteError
        When A is not positive definite even with the largest jitter, or its diagonal is not positive.
    """
    backend = v.backend_of(A)
    a = v.as_float_array(A, "A", backend, ndim=2)
    n = a.shape[0]
    if a.shape != (n, n):
        raise v.ShapeError(f"A must be square, got shape {tuple(a.shape)}")
    max_tries = v.check_int(max_tries, "max_tries", minimum=0)
    compute_dtype = np.dtype(compute_dtype)
    if compute_dtype not in backend.float_dtypes:
        raise v.DTypeError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
    xp = backend.xp
    scale, asymmetry = _scale_and_asymmetry(a, xp)
    if asymmetry > 1e3 * eps(a.dtype) * scale:
        raise v.ValueRangeError(f"A ({n} × {n}, {a.dtype}) is not symmetric: max |A − Aᵀ| = {asymmetry:.3g} against "
                                f"max |A| = {scale:.3g}")
    mean_diag = float(xp.diagonal(a).astype(np.float64).mean()) if n else 1.0
    if not mean_diag > 0:
        raise v.NotPositiveDefiniteError(f"A has mean diagonal {mean_diag:.3g} ≤ 0: it cannot be positive definite")
    jitter = 0.0
    relative = 1e-3 * np.sqrt(eps(a.dtype))
    for attempt in range(max_tries + 1):
        if attempt == 0 and overwrite_a and a.dtype == compute_dtype and backend.name == "numpy":
            work = a  # factored in place; a failed attempt restores it (backends._numpy._cholesky_in_place)
        else:
            work = a.astype(compute_dtype, copy=True)  # one copy per attempt, factored in place
        if jitter:
            work[xp.arange(n), xp.arange(n)] += jitter
        try:
            factor = backend.cholesky(work, overwrite=True)
        except np.linalg.LinAlgError:
            if attempt == max_tries:
                break
            jitter = relative * JITTER_GROWTH**attempt * mean_diag
            continue
        if jitter and warn:
            warnings.warn(f"safe_cholesky: A ({n} × {n}, {a.dtype}) was not numerically positive definite; added "
                          f"jitter {jitter:.3g} to its diagonal ({jitter / mean_diag:.3g} of the mean diagonal "
                          f"{mean_diag:.3g})", v.NumericalWarning, stacklevel=2)
        return CholeskyResult(factor, float(jitter), attempt + 1)
    raise v.NotPositiveDefiniteError(
        f"A ({n} × {n}, {a.dtype}) is not positive definite even with jitter {jitter:.3g} "
        f"({jitter / mean_diag:.3g} of the mean diagonal {mean_diag:.3g}) after {max_tries + 1} attempts; "
        "add noise to the diagonal or raise max_tries")
