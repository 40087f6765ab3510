"""Cholesky that adds jitter only when it must, relative to the matrix's scale, and always says so."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from backends import _triangles
from backends._triangles import fill_lower
from lingp_core import _validate as v
from lingp_core._precision import eps, float_dtype

JITTER_GROWTH = 10.0


class CholeskyResult(NamedTuple):
    """Lower factor L (n, n) with L Lᵀ = A + jitter·I, in the compute dtype on A's backend; ``jitter`` is the
    absolute amount added (0.0 when none was needed); ``tries`` counts factorization attempts."""

    factor: Any
    jitter: float
    tries: int


def _scale_and_asymmetry(a: Any, xp: Any) -> tuple[float, float]:
    """(max |A|, max |A − Aᵀ|) in one pass over the upper tiles, without an n × n temporary or a strided pass (A[I, J]
    against A[J, I]ᵀ stays in cache: 8× faster at n = 10⁴)."""
    n, scale, worst, tile = a.shape[0], 0.0, 0.0, _triangles.TILE
    for i in range(0, n, tile):
        for j in range(i, n, tile):
            upper = a[i: i + tile, j: j + tile]
            lower = a[j: j + tile, i: i + tile].T
            scale = max(scale, float(xp.abs(upper).max()), float(xp.abs(lower).max()))
            worst = max(worst, float(xp.abs(upper - lower).max()))
    return scale, worst


def check_symmetric(a: Any, xp: Any, what: str, symbol: str = "A") -> None:
    """ValueRangeError unless max |A − Aᵀ| ≤ 1e3·eps·max |A| (symmetric to rounding); ``what`` names A, ``symbol``
    is its letter in the message."""
    scale, asymmetry = _scale_and_asymmetry(a, xp)
    if asymmetry > 1e3 * eps(a.dtype) * scale:
        raise v.ValueRangeError(f"{what} is not symmetric: max |{symbol} − {symbol}ᵀ| = {asymmetry:.3g} against "
                                f"max |{symbol}| = {scale:.3g}")


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
    warn : bool
        Announce added jitter with a NumericalWarning (default True).
    overwrite_a : bool
        Let the first attempt factor A in place when it is already of ``compute_dtype`` (the factor then shares A's
        memory; NumPy only): saves the n × n copy. A failed attempt restores A from its upper triangle and diagonal
        (A itself when exactly symmetric), and the jittered retries start from that. Default False.

    Raises
    ------
    NotPositiveDefiniteError
        When A is not positive definite even with the largest jitter, or its diagonal is not positive.
    ValueRangeError
        When A is not symmetric to rounding.
    DTypeError
        When ``compute_dtype`` is not float32 or float64.
    """
    backend = v.backend_of(A)
    a = v.as_float_array(A, "A", backend, ndim=2)
    n = a.shape[0]
    if a.shape != (n, n):
        raise v.ShapeError(f"A must be square, got shape {tuple(a.shape)}")
    max_tries = v.check_int(max_tries, "max_tries", minimum=0)
    compute_dtype = float_dtype(compute_dtype, "compute_dtype")
    warn = v.check_bool(warn, "warn")
    overwrite_a = v.check_bool(overwrite_a, "overwrite_a")
    xp = backend.xp
    check_symmetric(a, xp, f"A ({n} × {n}, {a.dtype})")
    mean_diag = float(xp.diagonal(a).astype(np.float64).mean()) if n else 1.0
    in_place = overwrite_a and a.dtype == compute_dtype and backend.name == "numpy"

    def attempt(jitter: float, first: bool) -> Any:
        # in place only at first: a failed attempt restores a (backends._numpy._cholesky_in_place), retries copy it
        work = a if (first and in_place) else a.astype(compute_dtype, copy=True)
        if jitter:
            work[xp.arange(n), xp.arange(n)] += jitter
        return backend.cholesky(work, overwrite=True)

    return with_jitter(attempt, "safe_cholesky", f"A ({n} × {n}, {a.dtype})", mean_diag, eps(a.dtype), max_tries, warn)


def with_jitter(attempt: Callable[[float, bool], Any], caller: str, what: str, mean_diag: float, dtype_eps: float,
                 max_tries: int, warn: bool, finite_check: Callable[[], bool] | None = None) -> CholeskyResult:
    """Run ``attempt(jitter, first)`` (a factorization of the matrix plus jitter·I that raises LinAlgError when it
    fails) with jitter 0, then with escalating jitter relative to the mean diagonal; the retry policy of
    :func:`safe_cholesky`. ``finite_check`` (optional) tells a non-finite matrix from an indefinite one at the end."""
    if not mean_diag > 0:
        raise v.NotPositiveDefiniteError(f"{what} has mean diagonal {mean_diag:.3g} ≤ 0: it cannot be positive "
                                         "definite")
    jitter = 0.0
    relative = 1e-3 * np.sqrt(dtype_eps)
    for tries in range(max_tries + 1):
        try:
            factor = attempt(jitter, tries == 0)
        except np.linalg.LinAlgError:
            if tries == 0 and finite_check is not None and not finite_check():  # no jitter helps a NaN
                raise v.NonFiniteError(f"{what} holds NaN or Inf, so it has no Cholesky factor") from None
            if tries == max_tries:
                break
            jitter = relative * JITTER_GROWTH**tries * mean_diag
            continue
        if jitter and warn:
            v.warn(f"{caller}: {what} was not numerically positive definite; added jitter {jitter:.3g} "
                   f"to its diagonal ({jitter / mean_diag:.3g} of the mean diagonal {mean_diag:.3g})",
                   v.NumericalWarning)
        return CholeskyResult(factor, float(jitter), tries + 1)
    raise v.NotPositiveDefiniteError(
        f"{what} is not positive definite even with jitter {jitter:.3g} ({jitter / mean_diag:.3g} of the mean "
        f"diagonal {mean_diag:.3g}) after {max_tries + 1} attempts; add noise to the diagonal or raise max_tries")


def cholesky_from_upper(source: Any, diagonal: Any, *, scale: float = 1.0, out: Any = None, max_tries: int = 5,
                        warn: bool = True, lower_filled: bool = False) -> CholeskyResult:
    """Lower Cholesky factor of A = scale·S with diagonal ``diagonal``, where S is the symmetric matrix whose strict
    upper triangle ``source`` holds, written over ``out``'s lower triangle: the factorization of a kernel that keeps
    the kernel.

    With ``out=source`` no copy is made: source's strict upper triangle (S) is neither read by LAPACK nor changed, so
    S stays available (for a refactorization at another scale or diagonal, say) while its lower triangle holds L.
    Jitter escalates as in :func:`safe_cholesky`; each retry rewrites the lower triangle from S.

    Parameters
    ----------
    source : array (n, n)
        Holds S in its strict upper triangle (its lower triangle and diagonal are not read), float32 or float64.
    diagonal : array (n,)
        A's diagonal, float64, finite.
    scale : float
        The factor on S's off-diagonal entries.
    out : array (n, n), optional
        C-ordered float64 array on source's backend for the factor; may be ``source`` itself (then source must be a
        C-ordered float64 array). Default: a new array.
    lower_filled : bool
        ``out`` is ``source`` and already holds A whole (S in both triangles, ``diagonal`` on its diagonal, scale 1):
        the first attempt factors it as it is, without rewriting the lower triangle (retries still rebuild it from S).

    Returns
    -------
    CholeskyResult whose factor is ``out``: only its lower triangle and diagonal are L (read it with triangular
    solves, or take its lower triangle); the strict upper triangle is out's own (S when out is source).

    Raises
    ------
    NonFiniteError
        When S or the diagonal holds NaN or Inf.
    NotPositiveDefiniteError
        When A is not positive definite even with the largest jitter.
    """
    backend = v.backend_of(source)
    s_arr = v.as_float_array(source, "source", backend, ndim=2, finite=False)  # finiteness checked only on failure
    n = s_arr.shape[0]
    if s_arr.shape != (n, n):
        raise v.ShapeError(f"source must be square, got shape {tuple(s_arr.shape)}")
    d = v.as_float_array(diagonal, "diagonal", backend, shape=(n,), dtypes=(np.float64,))
    scale = v.check_positive(scale, "scale")
    max_tries = v.check_int(max_tries, "max_tries", minimum=0)
    warn = v.check_bool(warn, "warn")
    lower_filled = v.check_bool(lower_filled, "lower_filled")
    xp = backend.xp
    if out is None:
        out = xp.empty((n, n), dtype=np.float64)
    else:
        out = v.as_float_array(out, "out", backend, shape=(n, n), dtypes=(np.float64,), finite=False)
        if not out.flags.c_contiguous:
            raise v.ValueRangeError("out must be C-ordered (it is factored in place)")
    if lower_filled and (out is not s_arr or scale != 1.0):
        raise v.InvalidOptionError("lower_filled=True means A already lies in source, factored there: pass "
                                   "out=source and scale=1")
    index = xp.arange(n)

    def attempt(jitter: float, first: bool) -> Any:
        if not (first and lower_filled):
            fill_lower(out, s_arr, scale, xp)
            out[index, index] = d + jitter if jitter else d
        backend.cholesky_lower_in_place(out)
        # a NaN or Inf anywhere in row i of A's lower triangle reaches L_ii, and not every LAPACK stops on it
        if not bool(xp.isfinite(xp.diagonal(out)).all()):
            raise v.NonFiniteError(f"A ({n} × {n}) holds NaN or Inf, so it has no Cholesky factor")
        return out

    def finite() -> bool:
        return all(bool(xp.isfinite(xp.triu(s_arr[rows], rows.start + 1)).all())
                   for rows in (slice(i, i + _triangles.TILE) for i in range(0, n, _triangles.TILE)))

    mean_diag = float(d.mean()) if n else 1.0
    return with_jitter(attempt, "cholesky_from_upper", f"A ({n} × {n})", mean_diag, eps(np.float64), max_tries, warn,
                        finite)
