"""The energy form of posterior (co)variances, and the test for where prior − reduction may have cancelled.

Function-space engines compute var = s·k** − s²·k*ᵀ C⁻¹ k* (C = s·K0 + D): two nearly equal numbers subtracted
where the posterior variance is far below the prior's, so rounding of about m·ε·prior can exceed the result. The
energy form writes the same quantity as a sum of squares of p-vectors formed explicitly in float64,
s·‖j* − Jᵀw‖² + wᵀ D w with w = C⁻¹ s·K0(X, x*), which subtracts no such pair and stays ≥ 0 for any w. Exact engines
(in memory or on a Dask cluster) recompute only the entries :func:`cancelled` flags; the iterative engine uses it
always (an inexact CG solution only adds a term squared in its error).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from lingp_core import _validate as v
from lingp_core.jacobian import JacobianBlocks
from lingp_core.sharded import is_sharded

if TYPE_CHECKING:
    from lingp_core._posterior import StarRows

_ENERGY_CHUNK = 32  # test rows per parameter-space residual block (p × 32 float64)

#: The relative error of a variance the exact function-space paths accept from prior − reduction, which errs by about
#: m·ε·prior (m training rows, measured): below var/prior = m·ε / this they recompute it in the energy form; above,
#: the rescue (p-vector products, far costlier than the factored kernel) would buy digits no one needs
CANCELLED_TOLERANCE = 1e-4

UNRESOLVED_RATIO = 1e3 * float(np.finfo(np.float64).eps) ** 2  # var/prior below this: rounding even there


def _as_float64(J: JacobianBlocks) -> JacobianBlocks:
    """J with its blocks in float64 (J itself when it is float64 already)."""
    if J.dtype == np.float64:
        return J
    if is_sharded(J):
        return J.as_float64()
    from lingp_core.kernels import _view

    return JacobianBlocks(J.f0.astype(np.float64), _view(J, slice(0, J.n), None, np.dtype(np.float64)),
                          backend=J.backend, outputs=J.outputs, weights_fingerprint=J.weights_fingerprint,
                          block_weights=J.block_weights)


def _energy_row_bytes(p: int) -> int:
    """Bytes one test row of :func:`energy_variance` holds: j*_i, Jᵀw_i and their difference, alive together."""
    return 3 * v.nbytes_of((p,), np.float64)


def energy_variance(J: JacobianBlocks, star: StarRows, s: float, noise: Any, w: Any, rows: np.ndarray,
                    memory_budget: Any) -> Any:
    """Variances as sums of squares, var_i = s·‖j*_i − Jᵀ w_i‖² + w_iᵀ D w_i, for w_i ≈ C⁻¹ s·K0(X, x*_i),
    C = s·K0 + D (D = diag(noise), noise broadcastable to J's m rows), at the test rows ``rows`` of ``star`` (w's
    columns): (len(rows),), float64. J: the task's training Jacobian in float64. In output mode "trace" the kernel is
    (1/c)·Σ_k J_k J_kᵀ, the kernel of the stacked Jacobian [J_1 … J_c]/√c, so the parameter-space residual is
    stacked too: var_i = (s/c)·Σ_k ‖j*_ik − J_kᵀ w_i‖² + w_iᵀ D w_i.

    At the exact w this is s·k** − s² k*ᵀ C⁻¹ k* (expand the square: the cross terms cancel algebraically, not in
    floating point); it is the minimum over w of that quadratic, so an inexact ŵ (CG, the Lanczos cache) only adds
    (ŵ − w)ᵀ C (ŵ − w) — squared in the solve's accuracy — and never goes below zero. The p-vectors j*_i − Jᵀ w_i are
    formed explicitly in float64 (chunks of test rows), so no two nearly equal scalars are subtracted where the
    posterior variance is far below the prior's."""
    return energy_variance_and_residual(J, star, s, noise, w, rows, memory_budget)[0]


def energy_error_bound(variances: Any, residual_squares: Any, noise: Any) -> Any:
    """A bound on the relative error of energy-form variances from an inexact solve ŵ ≈ w = C⁻¹ b, at every row:
    (k,), float64, from ``variances`` v̂ and ``residual_squares`` ‖r‖², r = C ŵ − b (both (k,)), and ``noise`` (the
    diagonal D of C = s·K0 + D, any shape).

    The energy form exceeds the exact variance v by e = (ŵ − w)ᵀ C (ŵ − w) = rᵀ C⁻¹ r (:func:`energy_variance`),
    and rᵀ C⁻¹ r ≤ ‖r‖² / λmin(C) ≤ ‖r‖² / min D =: B, since s·K0 is positive semi-definite. With v̂ = v + e,
    v ≥ v̂ − B, so e / v ≤ B / (v̂ − B) where B < v̂; elsewhere the bound says nothing (inf)."""
    xp = v.backend_of(variances).xp
    bound = residual_squares / float(np.min(noise))
    slack = variances - bound
    positive = slack > 0
    return xp.where(positive, bound / xp.where(positive, slack, 1.0), np.inf)


def energy_variance_and_residual(J: JacobianBlocks, star: StarRows, s: float, noise: Any, w: Any, rows: np.ndarray,
                                 memory_budget: Any, cross: Any = None) -> tuple[Any, Any]:
    """:func:`energy_variance` and, with ``cross`` (m, len(rows)) = K0(X, x*_i) in w's column order (a view such as
    K0(X*, X)ᵀ: scaled per chunk, never copied whole), the squared residual norms ‖C w_i − s·K0(X, x*_i)‖² of the
    solves w approximates (else None): both (len(rows),), float64, for :func:`energy_error_bound`. C w =
    weight·Σ_k J_k (J_kᵀ w) + D w is assembled per chunk from the products J_kᵀ w the energy form forms anyway
    (weight and J_k as in :func:`_residual_pairs`: the operator's own kernel): one more product with J."""
    xp = J.backend.xp
    J_star = star.J_star_float64
    m = J.n * J.n_outputs if star.mode == "full" else J.n
    d = xp.asarray(np.broadcast_to(noise, (m,)))
    out = (d[:, None] * w * w).sum(axis=0)
    squares: Any = None if cross is None else xp.empty(len(rows))
    budget = v.resolve_memory_budget(memory_budget, J.backend)
    per_row = _energy_row_bytes(J.p) + (0 if cross is None else 2 * v.nbytes_of((m,), np.float64))
    chunk = max(1, min(len(rows), _ENERGY_CHUNK, int(budget // per_row)))
    v.check_memory(chunk * per_row, budget, what=f"the variances' parameter-space residuals ({J.p} × {chunk})",
                   alternative="raise memory_budget")
    pairs, weight = _residual_pairs(J, J_star, star.mode, s)
    for start in range(0, len(rows), chunk):
        part = slice(start, start + chunk)
        product = None if cross is None else d[:, None] * w[:, part]
        for J_k, J_star_k in pairs:
            pulled = J_k.rmatmat(w[:, part])
            residual = _star_columns(J_star_k, rows[part]) - pulled
            out[part] += weight * (residual * residual).sum(axis=0)
            if product is not None:
                product += weight * J_k.matmat(pulled)
        if product is not None:
            product -= s * cross[:, part]
            squares[part] = (product * product).sum(axis=0)
    return out, squares


def _residual_pairs(J: JacobianBlocks, J_star: JacobianBlocks, mode: Any, s: float) -> tuple[list[tuple], float]:
    """The (training, test) Jacobian pairs whose parameter-space residuals j* − Jᵀw make up the energy form, and
    their weight: [(J, J*)] and s in output mode "full"; one pair per output and s/c in "trace" (the kernel of the
    stacked Jacobian [J_1 … J_c]/√c)."""
    if mode == "full":
        return [(J, J_star)], s
    c = J.n_outputs
    return [(J.select(output=k), J_star.select(output=k)) for k in range(c)], s / c


def covariance_row_bytes(p: int) -> int:
    """Bytes one test row of :func:`energy_covariance` holds: four p-vectors alive at once (one chunk's residuals
    kept, another's formed from J*ᵀ and Jᵀ W)."""
    return 4 * v.nbytes_of((p,), np.float64)


def _covariance_chunk(p: int, m_star: int, budget: float) -> int:
    """Test rows per chunk of :func:`energy_covariance` within ``budget`` bytes (all m* when they fit; 0 if one row
    does not fit)."""
    return min(m_star, int(budget // covariance_row_bytes(p)))


def energy_covariance(J: JacobianBlocks, star: StarRows, s: float, noise: Any, W: Any, memory_budget: Any) -> Any:
    """Covariances in the energy form, cov = s·Rᵀ R + Wᵀ D W with R = J*ᵀ − Jᵀ W (p × m*), for W ≈ C⁻¹ s·K0(X, X*)
    (m × m*): (m*, m*), float64, or None when not even one test row's residual fits the memory budget. As
    :func:`energy_variance`, whose values are its diagonal: at the exact W it is s·K0** − s² K0*ᵀ C⁻¹ K0*, an inexact
    Ŵ adds (Ŵ − W)ᵀ C (Ŵ − W), so it stays positive semi-definite, and no two nearly equal numbers are subtracted
    where the posterior covariance is far below the prior's. Output mode "trace": the weighted sum over the outputs'
    residuals. R is formed in chunks of test rows sized to the budget (one chunk when p × m* fits): block (a, b) is
    R_aᵀ R_b, each later chunk's residual formed again for every earlier chunk."""
    xp = J.backend.xp
    m, m_star = (int(x) for x in W.shape)
    chunk = _covariance_chunk(J.p, m_star, v.resolve_memory_budget(memory_budget, J.backend))
    if chunk == 0:
        return None
    d = xp.asarray(np.broadcast_to(noise, (m,)))
    out = W.T @ (d[:, None] * W)
    pairs, weight = _residual_pairs(J, star.J_star_float64, star.mode, s)
    spans = [slice(a, min(a + chunk, m_star)) for a in range(0, m_star, chunk)]
    rows = np.arange(m_star)
    for J_k, J_star_k in pairs:
        for i, a in enumerate(spans):
            kept = _residuals(J_k, J_star_k, rows[a], W[:, a])
            out[a, a] += weight * (kept.T @ kept)
            for b in spans[i + 1:]:
                block = weight * (kept.T @ _residuals(J_k, J_star_k, rows[b], W[:, b]))
                out[a, b] += block
                out[b, a] += block.T
    return out


def _star_columns(J_star: JacobianBlocks, rows: np.ndarray) -> Any:
    """j*_i, the test rows ``rows`` of J_star as columns: (p, len(rows)), float64."""
    xp = J_star.backend.xp
    unit = xp.zeros((J_star.n * J_star.n_outputs, len(rows)))
    unit[xp.asarray(rows), xp.arange(len(rows))] = 1.0
    return J_star.rmatmat(unit)


def _residuals(J: JacobianBlocks, J_star: JacobianBlocks, rows: np.ndarray, W: Any) -> Any:
    """j*_i − Jᵀ w_i for the test rows ``rows`` of J_star, W's columns in the same order: (p, len(rows)), float64."""
    return _star_columns(J_star, rows) - J.rmatmat(W)


def warn_unresolved(values: Any, prior: Any, s: float) -> None:
    """Warn where energy-form variances ``values`` lie below float64's resolution of their ``prior`` (s·k**,
    broadcastable): the test rows' own rounding, s·(ε‖j*‖)² per entry, is the energy form's floor, and below it
    nothing helps."""
    unresolved = int(v.backend_of(values).to_numpy(values < UNRESOLVED_RATIO * prior).sum())
    if unresolved:
        v.warn(f"{unresolved} posterior variances lie below float64's resolution of their prior in function space "
               f"(var / prior < {UNRESOLVED_RATIO:.0e}, with s = {s:.3g}): they are rounding, not results; use a "
               "parameter-space method (method='parameter-cholesky') or a smaller prior scale", v.NumericalWarning)


def _training_float64(star: StarRows) -> JacobianBlocks:
    """The task's training Jacobian in float64, converted once per predict call."""
    return star.memo(("J64", id(star.J)), lambda: _as_float64(star.J))


def cancelled(var: Any, prior: Any, star: StarRows) -> Any:
    """Where prior − reduction variances ``var`` may have lost more than CANCELLED_TOLERANCE of their value to
    cancellation: the estimated error m·ε·prior/var above it (m training rows of the task; ``prior`` = s·k**,
    broadcastable to ``var``). A boolean array of var's shape."""
    m = star.J.n * (star.J.n_outputs if star.mode == "full" else 1)
    return var < (m * float(np.finfo(np.float64).eps) / CANCELLED_TOLERANCE) * prior


def rescue_cancelled(var: Any, star: StarRows, s: float, groups: list, solve: Any) -> Any:
    """``var`` (m*, q), a function-space engine's prior − reduction variances, with the entries whose estimated
    error m·ε·prior/var exceeds :data:`CANCELLED_TOLERANCE` recomputed by :func:`energy_variance`: there the
    subtraction's rounding, amplified by the solve's, can exceed the variance itself (1% off at s/σ² = 1e9, 170% at
    1e12 before). ``groups``: (columns, noise) pairs; ``solve(g, rhs)`` = C_g⁻¹ rhs. Only those rows pay for
    the p-vectors, so a well-determined prediction costs nothing more."""
    xp = star.J_star.backend.xp
    prior = s * xp.maximum(star.prior_diag(), 0.0).reshape(-1)
    flagged = star.J_star.backend.to_numpy(cancelled(var, prior[:, None], star))
    if not flagged.any():
        return var
    if _energy_row_bytes(star.J.p) > v.resolve_memory_budget(star.budget, star.J_star.backend):
        v.warn(f"{int(flagged.sum())} posterior variances lost more than {-np.log10(CANCELLED_TOLERANCE):.0f} "
               f"digits to cancellation, and recomputing them needs three p-vectors (p = {star.J.p}) beyond the memory "
               "budget: they keep the prior − reduction form's rounding; raise memory_budget or use a parameter-space "
               "method", v.NumericalWarning)
        return var
    for g, (cols, noise) in enumerate(groups):
        rows = np.flatnonzero(flagged[:, cols].any(axis=1))
        if rows.size:
            w = solve(g, s * star.cross[xp.asarray(rows)].T.astype(np.float64))
            fixed = energy_variance(_training_float64(star), star, s, noise, w, rows, star.budget)
            var[xp.asarray(rows)[:, None], xp.asarray(np.atleast_1d(cols))[None, :]] = fixed[:, None]
            warn_unresolved(fixed, prior[xp.asarray(rows)], s)
    return var


def rescue_cancelled_cov(cov: Any, star: StarRows, s: float, groups: list, solve: Any) -> Any:
    """``cov`` (q, m*, m*), a function-space engine's prior − reduction covariances, with each noise group whose
    diagonal may have cancelled (:func:`cancelled`, as for the variances) recomputed by :func:`energy_covariance`:
    where a variance is far below its prior, the covariances it enters are as far below theirs, and the reduction
    form's rounding error, about m·ε·prior, can exceed them. ``solve(g, rhs)`` = C_g⁻¹ rhs."""
    xp = star.J_star.backend.xp
    prior = s * xp.maximum(star.prior_diag(), 0.0).reshape(-1)
    m_star = int(cov.shape[1])
    for g, (cols, noise) in enumerate(groups):
        columns = np.atleast_1d(cols)
        if not bool(cancelled(xp.diagonal(cov[int(columns[0])]), prior, star).any()):
            continue
        if _covariance_chunk(star.J.p, m_star, v.resolve_memory_budget(star.budget, star.J_star.backend)) == 0:
            v.warn(f"posterior covariances lost more than {-np.log10(CANCELLED_TOLERANCE):.0f} digits to cancellation, "
                   f"and recomputing them needs four p-vectors (p = {star.J.p}) beyond the memory budget: they keep "
                   "the prior − reduction form's rounding; raise memory_budget or use a parameter-space method",
                   v.NumericalWarning)
            return cov
        W = solve(g, s * star.cross.T.astype(np.float64))
        fixed = energy_covariance(_training_float64(star), star, s, noise, W, star.budget)
        cov[xp.asarray(columns)] = fixed
        warn_unresolved(xp.diagonal(fixed), prior, s)
    return cov
