"""Batched preconditioned conjugate gradients with per-column convergence, on NumPy or CuPy."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from lingp_core import _validate as v
from lingp_core._precision import default_rtol, eps
from lingp_core.operators import as_operator
from lingp_core.solvers._common import check_dense_symmetric, column_norms, linear_system

# Recursive residuals drift from the true ones (badly so in float32); a column whose recursive residual meets the
# tolerance is only accepted once its true residual b − A x does too.
# Stagnation: the recursive residual met the tolerance more than MAX_RESTARTS times while the true one did not, so
# the dtype's accuracy floor (~eps·‖A‖·‖x‖) lies above the tolerance. (CG residual norms are not monotone and can
# plateau or grow for many iterations on ill-conditioned systems, so a lack of progress alone proves nothing.)
MAX_RESTARTS = 3
DIVERGENCE_FACTOR = 1e4  # a residual this many times the right-hand side's norm means the iteration blew up


class CGResult(NamedTuple):
    """What :func:`cg` returns. Per-column diagnostics are NumPy arrays of length k (k = 1 for a vector B).

    Attributes
    ----------
    x : array, (n,) or (n, k)
        The solution, on B's backend, in B's dtype.
    converged : ndarray of bool, (k,)
        True where the true residual ‖b − A x‖ met max(rtol·‖b‖, atol).
    iterations : ndarray of int, (k,)
        Iterations each column ran.
    residual_norms : ndarray of float64, (k,)
        True residual norms ‖b − A x‖ of the returned x.
    thresholds : ndarray of float64, (k,)
        The target max(rtol·‖b‖, atol) of each column.
    status : tuple of str, (k,)
        "converged", "maxiter", "stagnated" (the true residual stayed above the target after restarts: the dtype's
        accuracy floor lies above it, as it always does for a target of 0, rtol = atol = 0), "diverged" (the
        residual blew up, or A's or M's products held NaN or Inf: the warning says which) or "indefinite"
        (non-positive curvature pᵀAp ≤ 0: A is not positive definite, or rounding made it look so; or rᵀMr = 0 for
        a residual r ≠ 0: M's products vanish).
    restarts : ndarray of int, (k,)
        How often a column's residual was replaced by the true residual and its search direction restarted.
    history : list of (int, ndarray) or None
        With ``return_history``: (iteration, recursive residual norms (k,)) at every convergence check.
    tridiagonal : tuple of (ndarray, ndarray) or None
        With ``return_tridiagonal``: the Lanczos tridiagonal matrices of the (preconditioned) iteration, diagonals
        (maxit, k) and off-diagonals (maxit − 1, k) in float64; column j is valid for its first iterations[j] steps
        (and exact only where restarts[j] == 0).
    """

    x: Any
    converged: np.ndarray
    iterations: np.ndarray
    residual_norms: np.ndarray
    thresholds: np.ndarray
    status: tuple[str, ...]
    restarts: np.ndarray
    history: list[tuple[int, np.ndarray]] | None = None
    tridiagonal: tuple[np.ndarray, np.ndarray] | None = None


def cg(A: Any, B: Any, *, M: Any = None, x0: Any = None, rtol: float | None = None, atol: float = 0.0,
       maxiter: int | None = None, check_every: int | None = None,
       callback: Callable[[int, np.ndarray], Any] | None = None, return_history: bool = False,
       return_tridiagonal: bool = False, warn: bool = True) -> CGResult:
    """Solve A X = B for symmetric positive-definite A, all columns of B together.

    Parameters
    ----------
    A : array (n, n) or operator
        SPD matrix, or an operator with shape, dtype and ``matmat``.
    B : array (n,) or (n, k)
        Right-hand sides, same dtype and backend as A.
    M : array (n, n) or operator, optional
        Preconditioner applying an approximation of A⁻¹ (SciPy's convention), e.g. from
        :func:`pivoted_cholesky_preconditioner`.
    x0 : array like B, optional
        Starting guess (default zeros).
    rtol, atol : float
        Column j stops once ‖b_j − A x_j‖ ≤ max(rtol·‖b_j‖, atol). Default rtol is sqrt(eps) of the dtype
        (1.5e-8 for float64, 3.5e-4 for float32); atol defaults to 0.
    maxiter : int, optional
        Iterations at most (default 10·n).
    check_every : int, optional
        Convergence is checked (a host synchronization on GPU) every this many iterations: default 1 on NumPy,
        10 on CuPy.
    callback : callable, optional
        ``callback(iteration, residual_norms)`` at every check; residual_norms is a (k,) NumPy array.
    return_history, return_tridiagonal : bool
        Keep residual histories / the Lanczos tridiagonals (for log-determinants) in the result.
    warn : bool
        Emit a ConvergenceWarning naming the numbers when a column does not converge (default True).

    Returns
    -------
    CGResult

    Raises
    ------
    ShapeError, DTypeError, BackendMismatchError, NonFiniteError
        For A, B, M or x0 that do not fit together (also an empty system, n = 0), and for products of a duck-typed
        operator of the wrong shape or dtype.
    ArgumentTypeError
        For a callback that is not callable, or flags that are not bools.
    ValueRangeError
        For tolerances out of range, a dense A or M that is not symmetric, or a B whose scale CG's inner products
        cannot hold.
    """
    system = linear_system(A, B)
    op, rhs, backend = system.op, system.rhs, system.backend
    xp, n, k = backend.xp, rhs.shape[0], rhs.shape[1]
    if n == 0:
        raise v.ShapeError(f"A has shape {op.shape}: CG needs a system of at least one unknown")
    dtype = np.dtype(rhs.dtype)
    precond = None if M is None else as_operator(M, "M", backend=backend)
    if precond is not None and precond.shape != op.shape:
        raise v.ShapeError(f"M has shape {precond.shape}; expected {op.shape} (A's)")
    if precond is not None and precond.dtype != dtype:
        raise v.DTypeError(f"M has dtype {precond.dtype} but A and B have dtype {dtype}; lingp does not cast "
                           "silently")
    check_dense_symmetric(op)  # CG's recurrences assume symmetry: on a non-symmetric A they run on to maxiter
    if precond is not None:
        check_dense_symmetric(precond, "M")
    if callback is not None and not callable(callback):
        raise v.ArgumentTypeError(f"callback must be callable or None, got {type(callback).__name__} {callback!r}")
    return_history = v.check_bool(return_history, "return_history")
    return_tridiagonal = v.check_bool(return_tridiagonal, "return_tridiagonal")
    warn = v.check_bool(warn, "warn")
    rtol = default_rtol(dtype) if rtol is None else v.check_positive(rtol, "rtol", allow_zero=True)
    atol = v.check_positive(atol, "atol", allow_zero=True)
    maxiter = 10 * n if maxiter is None else v.check_int(maxiter, "maxiter", minimum=1)
    check_every = (1 if backend.name == "numpy" else 10) if check_every is None else \
        v.check_int(check_every, "check_every", minimum=1)

    if x0 is None:
        x = xp.zeros_like(rhs)
        residual = rhs.copy()
    else:
        x = v.as_float_array(x0, "x0", backend, shape=tuple(rhs.shape) if not system.single else (n,), dtypes=[dtype])
        x = (x[:, None] if system.single else x).copy()
        residual = rhs - op._matmat(x)
    _check_scale(rhs, dtype, backend)
    b_norms = column_norms(rhs, backend)
    thresholds = np.maximum(rtol * b_norms, atol)

    state = _CGState(op, precond, rhs, x, residual, backend)
    iterations = np.zeros(k, dtype=np.int64)
    restarts = np.zeros(k, dtype=np.int64)
    status = ["maxiter"] * k
    causes: list[str | None] = [None] * k  # why a column failed, where the status alone does not say (the warning)
    history: list[tuple[int, np.ndarray]] = []
    tridiag_log: list[tuple[np.ndarray, Any, Any]] = []

    # columns already solved by x0 (or with b = 0) never iterate
    start_norms = column_norms(residual, backend)
    done = start_norms <= thresholds
    # a recursive residual below eps·‖b‖ is at rounding level: it is checked (and restarted) even when the target is
    # smaller still, so that an unreachable target (rtol = atol = 0) ends as "stagnated", not at maxiter
    floors = np.maximum(thresholds, eps(dtype) * np.where(b_norms > 0, b_norms, start_norms))
    for j in np.flatnonzero(done):
        status[j] = "converged"
    state.keep(~done)

    it = 0
    while state.active.size and it < maxiter:
        alpha, beta = state.step()
        it += 1
        if return_tridiagonal:
            tridiag_log.append((state.active.copy(), alpha, beta))
        if it % check_every and it != maxiter:
            continue
        act = state.active
        norms = column_norms(state.residual, backend)
        iterations[act] = it
        finished = np.zeros(act.size, dtype=bool)
        for pos, (failed, cause) in enumerate(state.failures(norms)):
            j = act[pos]
            if failed is None and (not np.isfinite(norms[pos]) or
                                   norms[pos] > DIVERGENCE_FACTOR * max(b_norms[j], start_norms[j])):
                failed = "diverged"
            if failed is not None:
                status[j], causes[j], finished[pos] = failed, cause, True
        candidates = np.flatnonzero(~finished & (norms <= floors[act]))
        if candidates.size:
            true_norms = state.true_residual_norms(candidates)
            accepted = true_norms <= thresholds[act[candidates]]
            for pos in candidates[accepted]:
                status[act[pos]], finished[pos] = "converged", True
            drifted = candidates[~accepted]
            if drifted.size:  # the recursive residual lied: continue from the true one
                state.restart(drifted)
                restarts[act[drifted]] += 1
                norms[drifted] = true_norms[~accepted]
        stalled = ~finished & (restarts[act] > MAX_RESTARTS)
        for stuck in np.flatnonzero(stalled):
            status[act[stuck]], finished[stuck] = "stagnated", True
        if return_history or callback is not None:
            full = np.zeros(k)
            full[act] = norms
            if return_history:
                history.append((it, full))
            if callback is not None:
                callback(it, full)
        if finished.any():
            state.keep(~finished)

    x = state.solution()
    final_norms = column_norms(rhs - op._matmat(x), backend)
    bad = np.flatnonzero(~np.isfinite(final_norms))  # A's product of x is not finite: never "converged"
    x_finite = backend.to_numpy(backend.xp.isfinite(x[:, backend.xp.asarray(bad)]).all(axis=0))  # only those columns
    for i, j in enumerate(bad):
        status[j] = "diverged"
        causes[j] = causes[j] or ("A nonfinite" if x_finite[i] else None)
    converged = np.array([s == "converged" for s in status], dtype=bool)
    if warn and not converged.all():
        _warn_not_converged(status, causes, converged, final_norms, b_norms, rtol, atol, maxiter, dtype)
    tridiagonal = _assemble_tridiagonal(tridiag_log, k, backend) if return_tridiagonal else None
    return CGResult(x[:, 0] if system.single else x, converged, iterations, final_norms, thresholds, tuple(status),
                    restarts, history if return_history else None, tridiagonal)


def _check_scale(rhs: Any, dtype: np.dtype, backend: Any) -> None:
    """ValueRangeError when a column of B is so large or so small that CG's inner products (squares of its entries
    summed over n rows) overflow or underflow: CG would then report nonsense as converged. Rescaling is exact for
    the user: A X = B is the same system as (A/α) X = B/α, and X scales with B."""
    scale = backend.to_numpy(backend.xp.max(backend.xp.abs(rhs), axis=0)).astype(np.float64)
    info = np.finfo(dtype)
    low, high = float(np.sqrt(info.tiny)), float(np.sqrt(info.max / rhs.shape[0]))
    bad = (scale > high) | ((scale > 0) & (scale < low))
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise v.ValueRangeError(f"B's column {j} has entries up to {scale[j]:.3g}, outside [{low:.3g}, {high:.3g}] "
                                f"where CG's inner products stay finite and normal in {dtype} (n = {rhs.shape[0]}); "
                                "rescale A and B by a common factor (the solution X is unchanged) or B alone (X "
                                "scales with it)")


class _CGState:
    """The iteration state of the still-active columns; solved columns are written back to ``x`` and dropped."""

    def __init__(self, op: Any, precond: Any, rhs: Any, x: Any, residual: Any, backend: Any):
        self.op, self.precond, self.rhs, self.x, self.backend = op, precond, rhs, x, backend
        self.active = np.arange(rhs.shape[1])
        self.x_active, self.residual = x, residual
        self._reset_direction()

    def _apply_precond(self, r: Any) -> Any:
        return r if self.precond is None else self.precond._matmat(r)

    def _reset_direction(self) -> None:
        xp = self.backend.xp
        self.z = self._apply_precond(self.residual)
        self.direction = self.z.copy()
        self.rz = (self.residual * self.z).sum(axis=0)
        self.indefinite = xp.zeros(self.active.size, dtype=bool)
        # per column: A's (M's) product of a finite vector was not finite; the residual r₀ is finite (checked inputs)
        self.a_nonfinite = xp.zeros(self.active.size, dtype=bool)
        self.m_nonfinite = ~xp.isfinite(self.rz)
        self.prev_alpha = None

    def step(self) -> tuple[Any, Any]:
        """One CG iteration on all active columns, without a host synchronization."""
        xp = self.backend.xp
        ap = self.op._matmat(self.direction)  # unchecked: the inputs were checked once, at the boundary
        curvature = (self.direction * ap).sum(axis=0)
        finite = xp.isfinite(curvature)
        self.a_nonfinite |= ~finite & xp.isfinite(self.rz)  # a finite direction (rz finite) and a NaN/Inf product
        positive = curvature > 0
        self.indefinite |= finite & ~positive & (self.rz != 0)  # rz = 0: the residual is exactly zero (or M r = 0)
        alpha = xp.where(positive, self.rz / xp.where(positive, curvature, 1), 0).astype(self.rz.dtype)
        self.x_active += alpha * self.direction
        self.residual -= alpha * ap
        self.z = self._apply_precond(self.residual)
        rz_new = (self.residual * self.z).sum(axis=0)
        if self.precond is not None:  # a finite residual (finite product and step) and a NaN/Inf M r
            self.m_nonfinite |= ~xp.isfinite(rz_new) & finite & xp.isfinite(alpha)
        beta = xp.where(self.rz != 0, rz_new / xp.where(self.rz != 0, self.rz, 1), 0).astype(self.rz.dtype)
        self.direction = self.z + beta * self.direction
        self.rz = rz_new
        return alpha, beta

    def failures(self, norms: np.ndarray) -> list[tuple[str | None, str | None]]:
        """(status, cause) of each active column that must stop, else (None, None), from the flags of the steps
        since the last check and the residual norms (k_active,) just computed (one host synchronization)."""
        xp = self.backend.xp
        a_flags, m_flags, indefinite_flags, rz_zero = self.backend.to_numpy(
            xp.stack([self.a_nonfinite, self.m_nonfinite, self.indefinite, self.rz == 0]))
        # rᵀMr = 0 for r ≠ 0: M (meant to be SPD) annihilated the residual, and CG cannot move
        m_null = rz_zero & (norms > 0) & (self.precond is not None)
        out: list[tuple[str | None, str | None]] = []
        for a_bad, m_bad, indefinite, null in zip(a_flags, m_flags, indefinite_flags, m_null):
            out.append(("diverged", "A nonfinite") if a_bad else ("diverged", "M nonfinite") if m_bad else
                       ("indefinite", None) if indefinite else ("indefinite", "M null") if null else (None, None))
        return out

    def true_residual_norms(self, positions: np.ndarray) -> np.ndarray:
        """‖b − A x‖ for the active columns at these positions (one product with those columns)."""
        cols = self.backend.xp.asarray(positions)
        true = self.rhs[:, self.backend.xp.asarray(self.active[positions])] - self.op._matmat(self.x_active[:, cols])
        self._true = (positions, true)
        return column_norms(true, self.backend)

    def restart(self, positions: np.ndarray) -> None:
        """Replace the residual of these columns by the true one just computed and restart their directions."""
        xp = self.backend.xp
        stored_positions, true = self._true
        cols = xp.asarray(positions)
        self.residual[:, cols] = true[:, xp.asarray(np.searchsorted(stored_positions, positions))]
        z = self._apply_precond(self.residual[:, cols])
        self.z[:, cols] = z
        self.direction[:, cols] = z
        self.rz[cols] = (self.residual[:, cols] * z).sum(axis=0)
        self.m_nonfinite[cols] |= ~xp.isfinite(self.rz[cols])  # the true residual is finite here (else no restart)

    def keep(self, mask: np.ndarray) -> None:
        """Write the columns not in ``mask`` back to x and drop them from the iteration."""
        xp = self.backend.xp
        self.x[:, xp.asarray(self.active)] = self.x_active
        keep = xp.asarray(np.flatnonzero(mask))
        self.active = self.active[mask]
        self.x_active = self.x_active[:, keep]
        self.residual = self.residual[:, keep]
        self.z = self.z[:, keep]
        self.direction = self.direction[:, keep]
        self.rz = self.rz[keep]
        self.indefinite = self.indefinite[keep]
        self.a_nonfinite = self.a_nonfinite[keep]
        self.m_nonfinite = self.m_nonfinite[keep]

    def solution(self) -> Any:
        if self.active.size:
            self.x[:, self.backend.xp.asarray(self.active)] = self.x_active
        return self.x


def _assemble_tridiagonal(log: list, k: int, backend: Any) -> tuple[np.ndarray, np.ndarray]:
    """Lanczos tridiagonals from CG coefficients: T_jj = 1/α_j + β_{j-1}/α_{j-1}, T_{j,j+1} = √β_j / α_j."""
    steps = len(log)
    alphas = np.zeros((steps, k))
    betas = np.zeros((steps, k))
    for t, (active, alpha, beta) in enumerate(log):
        alphas[t, active] = backend.to_numpy(alpha)
        betas[t, active] = backend.to_numpy(beta)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(alphas != 0, 1.0 / alphas, 0.0)
        diag = inv.copy()
        diag[1:] += betas[:-1] * inv[:-1]
        off = np.sqrt(np.maximum(betas[:-1], 0)) * inv[:-1]
    return diag, off


def _warn_not_converged(status: list[str], causes: list[str | None], converged: np.ndarray, final_norms: np.ndarray,
                        b_norms: np.ndarray, rtol: float, atol: float, maxiter: int, dtype: np.dtype) -> None:
    bad = np.flatnonzero(~converged)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(b_norms[bad] > 0, final_norms[bad] / b_norms[bad], final_norms[bad])
    reasons = sorted({causes[j] or status[j] for j in bad})
    advice = {
        "maxiter": f"raise maxiter (now {maxiter}) or pass a preconditioner M",
        "stagnated": "the residual stopped falling: use a preconditioner, float64 instead of "
                     f"{dtype}" if dtype == np.float32 else "the residual stopped falling: use a preconditioner",
        "diverged": "the iteration blew up: check that A is symmetric positive definite",
        "indefinite": "pᵀAp ≤ 0 was met: A is not positive definite (add jitter or noise to its diagonal)",
        "A nonfinite": "A's products are not finite (NaN or Inf for a finite vector): check the operator A",
        "M nonfinite": "M's products are not finite (NaN or Inf for a finite residual): check the preconditioner M",
        "M null": "M's products are zero on the residual (rᵀMr = 0): the preconditioner M must be positive definite",
    }
    statuses = sorted({status[j] for j in bad})
    v.warn(
        f"CG: {bad.size} of {converged.size} right-hand sides did not reach max(rtol={rtol:.3g}·‖b‖, atol={atol:.3g}) "
        f"(status: {', '.join(statuses)}; worst relative residual {np.max(relative):.3g}); "
        + "; ".join(advice[r] for r in reasons), v.ConvergenceWarning)
