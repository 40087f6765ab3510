"""The exact function-space engine on a Dask cluster: a right-looking blocked Cholesky over the kernel's tiles.

The tiles follow the shards of a :class:`~lingp_core.sharded.ShardedJacobian` (tile (i, j): shard i's rows × shard
j's, unequal sizes allowed). Only the upper tiles K0[i, j], i ≤ j, are computed, once per fit of the engine; each
(s, D) factors C = s·K0 + D as C = Uᵀ U with U upper, tile by tile on the workers:

    for k:  U_kk = chol(C_kk)ᵀ;  U_kj = U_kk⁻ᵀ C_kj (j > k);  C_ij −= U_kiᵀ U_kj (k < i ≤ j)

so the factor stays on the cluster as futures and every tile is written in the upper orientation the kernel tiles
already have (no transposed copies). Solves run as tasks over the tiles too; the client holds only α (m, q) and
the small per-test-point sums. This is the same arithmetic as the single-machine FunctionCholesky, to rounding.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

import backends
from lingp_core import _validate as v
from lingp_core._energy import rescue_cancelled, rescue_cancelled_cov
from lingp_core._layout import noise_groups
from lingp_core._precision import largest_eigenvalue
from lingp_core.sharded import check_running, gather
from lingp_core.solvers.cholesky import with_jitter

_LOG_2PI = math.log(2 * math.pi)


class ClusterCholesky:
    """Exact: Uᵀ U = s·K0 + D per noise group on the cluster's tiles; α = (s·K0 + D)⁻¹ R on the client."""

    space, solver = "function", "cholesky"

    def __init__(self, J: Any, mode: Any, kernel_dtype: Any, memory_budget: Any = None) -> None:
        self.J, self.mode, self.backend, self.memory_budget = J, mode, J.backend, memory_budget
        self.kernel_dtype = np.dtype(kernel_dtype)
        self.client = J.client
        self.sizes = J.tile_rows(mode)
        self.starts = np.cumsum([0] + self.sizes)
        self.m = int(self.starts[-1])
        self.tiles: dict | None = None  # K0's upper tiles while a fit runs (released after: U keeps its lineage)
        self.info: dict[str, Any] = {"tiles": len(self.sizes)}

    # ----- the factorization ---------------------------------------------------------------------------------------
    def _submit(self, fn: Any, *args: Any) -> Any:
        check_running(self.client)
        return self.client.submit(fn, *args, pure=False)

    def _factor(self, s: float, d: np.ndarray, jitter: float) -> dict[tuple[int, int], Any]:
        T = len(self.sizes)
        C = {(i, j): self._submit(_scaled_tile, tile, s, self._diagonal_part(d, i) if i == j else None, jitter)
             for (i, j), tile in self.tiles.items()}
        U: dict[tuple[int, int], Any] = {}
        for k in range(T):
            U[(k, k)] = self._submit(_tile_factor, C[(k, k)])
            for j in range(k + 1, T):
                U[(k, j)] = self._submit(_tile_panel, U[(k, k)], C[(k, j)])
            for i in range(k + 1, T):
                for j in range(i, T):
                    C[(i, j)] = self._submit(_tile_update, C[(i, j)], U[(k, i)], U[(k, j)])
        return U

    def _diagonal_part(self, d: np.ndarray, i: int) -> np.ndarray:
        return np.broadcast_to(d, (self.m,))[self.starts[i]: self.starts[i + 1]].copy()

    def _factor_with_jitter(self, s: float, d: np.ndarray) -> tuple[dict[tuple[int, int], Any], float, float]:
        """The factor, its jitter and Σ log diag U: safe_cholesky's retry policy (jitter only after a plain attempt
        fails, relative to the mean diagonal, with its warning)."""
        diags = gather(self.client, [self._submit(_diagonal_sum, self.tiles[(k, k)]) for k in range(len(self.sizes))])
        mean_diag = (s * sum(diags) + float(np.broadcast_to(d, (self.m,)).sum())) / self.m

        def attempt(jitter: float, first: bool) -> tuple[dict, float]:
            U = self._factor(s, d, jitter)
            logs = gather(self.client, [self._submit(_log_diagonal_sum, U[(k, k)]) for k in range(len(self.sizes))])
            return U, float(sum(logs))

        result = with_jitter(attempt, "LinearizedGP (blocked Cholesky on the cluster)",
                             f"s·K0 + D ({self.m} × {self.m}, tiles {self.sizes})", mean_diag,
                             float(np.finfo(np.float64).eps), 5, True)
        U, half_logdet = result.factor
        return U, result.jitter, half_logdet

    def _condition_bound(self, U: dict, s: float, d: np.ndarray) -> float:
        """The in-memory engine's lower bound on the condition number of the diagonally scaled s·K0 + D
        (:func:`~lingp_core._posterior.cholesky_condition_bound`): 1 / min U_ii² / C_ii over the diagonal tiles."""
        ratios = gather(self.client, [self._submit(_pivot_ratio, U[(k, k)], self.tiles[(k, k)], s,
                                                  self._diagonal_part(d, k)) for k in range(len(self.sizes))])
        return 1.0 / max(min(ratios), float(np.finfo(np.float64).tiny))

    def kernel_largest_eigenvalue(self) -> float:
        """λmax of K0 by power iteration through the shards' kernel products (one round per step): what the
        float32-kernel error estimate needs."""
        def product(x: Any) -> Any:  # in J's dtype, as the products of a float32 export must be
            return self.J.kernel_matmat(x[:, None].astype(self.J.dtype), self.mode)[:, 0].astype(np.float64)
        return largest_eigenvalue(product, self.m, self.backend.xp)

    def fit(self, s: float, noise: np.ndarray, R: Any) -> None:
        xp = self.backend.xp
        self.s, self.q = s, int(R.shape[1])
        self.alpha = xp.zeros(R.shape, dtype=np.float64)
        self.groups, self.factors, self.jitter = noise_groups(noise, self.q), [], 0.0
        self._lml, self.condition = 0.0, 1.0
        self.tiles = self.J.kernel_tiles(self.mode, self.kernel_dtype)
        for cols, d in self.groups:
            U, jitter, half_logdet = self._factor_with_jitter(s, d)
            self.jitter = max(self.jitter, jitter)
            self.condition = max(self.condition, self._condition_bound(U, s, d))
            self.factors.append(U)
            rhs = R[:, cols]
            alpha = self._gather_rows(self._backward(U, self._forward(U, self._split(rhs))))
            self.alpha[:, cols] = alpha
            fit = float((rhs * alpha).sum())
            self._lml += -0.5 * fit - len(cols) * (half_logdet + 0.5 * self.m * _LOG_2PI)
        self.info["jitter"] = self.jitter
        self.tiles = None

    # ----- solves over the tiles -----------------------------------------------------------------------------------
    def _split(self, B: Any) -> list[Any]:
        # plain arrays, embedded in the first tasks that read them (not scattered): a task's inputs stay
        # recomputable, so a worker lost during a solve costs a recomputation, not the fit
        return [B[a:b] for a, b in zip(self.starts[:-1], self.starts[1:])]

    def _forward(self, U: dict, B: list[Any]) -> list[Any]:
        """Y = U⁻ᵀ B by tiles: Y_i = U_ii⁻ᵀ (B_i − Σ_{k<i} U_kiᵀ Y_k)."""
        Y: list[Any] = []
        for i in range(len(B)):
            pairs = [x for k in range(i) for x in (U[(k, i)], Y[k])]
            Y.append(self._submit(_forward_step, U[(i, i)], B[i], *pairs))
        return Y

    def _backward(self, U: dict, Y: list[Any]) -> list[Any]:
        """X = U⁻¹ Y by tiles: X_i = U_ii⁻¹ (Y_i − Σ_{j>i} U_ij X_j)."""
        T = len(Y)
        X: list[Any] = [None] * T
        for i in reversed(range(T)):
            pairs = [x for j in range(i + 1, T) for x in (U[(i, j)], X[j])]
            X[i] = self._submit(_backward_step, U[(i, i)], Y[i], *pairs)
        return X

    def _gather_rows(self, parts: list[Any]) -> Any:
        return self.backend.xp.concatenate(gather(self.client, parts), axis=0)

    # ----- the engine's interface ----------------------------------------------------------------------------------
    def lml(self) -> float:
        return self._lml

    def mean(self, star: Any) -> Any:
        return self.s * (star.cross @ self.alpha)

    def _whitened(self, star: Any, U: dict) -> list[Any]:
        return self._forward(U, self._split(star.cross.T.astype(np.float64)))

    def _group_solve(self, g: int, rhs: Any) -> Any:
        """C_g⁻¹ rhs by the tiles' forward and backward solves (rhs (m, k) on the client; the result gathered)."""
        U = self.factors[g]
        return self._gather_rows(self._backward(U, self._forward(U, self._split(rhs))))

    def var(self, star: Any) -> Any:
        prior = star.prior_diag()
        out = self.backend.xp.empty((star.cross.shape[0], self.q))
        for (cols, _), U in zip(self.groups, self.factors):
            sums = gather(self.client, [self._submit(_column_sq_sums, w) for w in self._whitened(star, U)])
            out[:, cols] = (self.s * (prior - self.s * sum(sums)))[:, None]
        # where prior − reduction may have cancelled, the energy form, as on one machine
        return rescue_cancelled(out, star, self.s, self.groups, self._group_solve)

    def cov(self, star: Any) -> Any:
        prior = star.prior_full()
        m_star = star.cross.shape[0]
        out = self.backend.xp.empty((self.q, m_star, m_star))
        for (cols, _), U in zip(self.groups, self.factors):
            grams = gather(self.client, [self._submit(_gram, w) for w in self._whitened(star, U)])
            out[cols] = self.s * (prior - self.s * sum(grams))
        return rescue_cancelled_cov(out, star, self.s, self.groups, self._group_solve)

    def state(self) -> dict[str, Any]:
        """α and the lower factors L = Uᵀ gathered (m × m each): a saved model is an in-memory FunctionCholesky."""
        xp = self.backend.xp
        # the gathered tiles and the dense factor, per noise group
        v.check_memory(2 * len(self.factors) * v.nbytes_of((self.m, self.m), np.float64),
                       v.resolve_memory_budget(self.memory_budget, self.backend),
                       what=f"gathering the cluster's Cholesky factors ({len(self.factors)} of {self.m} × {self.m}) "
                            "for the archive", alternative="refit with method='iterative' (its state is α alone)")
        out = {"alpha": self.alpha}
        for g, U in enumerate(self.factors):
            L = xp.zeros((self.m, self.m))
            for (i, j), tile in zip(U, gather(self.client, list(U.values()))):
                L[self.starts[j]: self.starts[j + 1], self.starts[i]: self.starts[i + 1]] = tile.T
            out[f"factor{g}"] = L
        return out


# ----- tasks (run on the workers) -------------------------------------------------------------------------------

def _scaled_tile(K: Any, s: float, d: Any, jitter: float) -> Any:
    out = K.astype(np.float64) * s
    if d is not None:
        idx = backends.infer(out).xp.arange(out.shape[0])
        out[idx, idx] += backends.infer(out).xp.asarray(d) + jitter
    return out


def _tile_factor(C: Any) -> Any:
    """U_kk = chol(C_kk)ᵀ (upper); LinAlgError when not positive definite."""
    return backends.infer(C).cholesky(C).T.copy()


def _tile_panel(U_kk: Any, C_kj: Any) -> Any:
    return backends.infer(C_kj).solve_triangular(U_kk, C_kj, lower=False, trans=True)


def _tile_update(C_ij: Any, U_ki: Any, U_kj: Any) -> Any:
    return C_ij - U_ki.T @ U_kj


def _forward_step(U_ii: Any, B_i: Any, *pairs: Any) -> Any:
    acc = B_i.astype(np.float64)
    for U_ki, Y_k in zip(pairs[::2], pairs[1::2]):
        acc = acc - U_ki.T @ Y_k
    return backends.infer(acc).solve_triangular(U_ii, acc, lower=False, trans=True)


def _backward_step(U_ii: Any, Y_i: Any, *pairs: Any) -> Any:
    acc = Y_i
    for U_ij, X_j in zip(pairs[::2], pairs[1::2]):
        acc = acc - U_ij @ X_j
    return backends.infer(acc).solve_triangular(U_ii, acc, lower=False)


def _pivot_ratio(U_kk: Any, K_kk: Any, s: float, d: Any) -> float:
    """min U_ii² / C_ii over a diagonal tile, C_ii = s·K0_ii + d_i (without the jitter, as in memory)."""
    xp = backends.infer(U_kk).xp
    diagonal = s * xp.diagonal(K_kk).astype(np.float64) + xp.asarray(d)
    return float((xp.diagonal(U_kk) ** 2 / diagonal).min())


def _log_diagonal_sum(U_kk: Any) -> float:
    xp = backends.infer(U_kk).xp
    return float(xp.log(xp.diagonal(U_kk)).sum())


def _diagonal_sum(K: Any) -> float:
    return float(backends.infer(K).xp.diagonal(K).astype(np.float64).sum())


def _column_sq_sums(W: Any) -> Any:
    return (W * W).sum(axis=0)


def _gram(W: Any) -> Any:
    return W.T @ W
