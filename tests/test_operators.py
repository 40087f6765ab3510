"""The operator protocol, low-rank + diagonal algebra and pivoted Cholesky against dense float64 oracles."""
from __future__ import annotations

import numpy as np
import pytest

import lingp_core as lg
from tests.helpers import assert_matches, spd_matrix, tolerance


def test_dense_and_added_diagonal_operators(backend, rng, dtype):
    a = spd_matrix(rng, 30).astype(dtype)
    d = (1.0 + rng.random(30)).astype(dtype)
    op = lg.AddedDiagonalOperator(lg.as_operator(backend.asarray(a)), backend.asarray(d))
    dense = a.astype(np.float64) + np.diag(d.astype(np.float64))
    x = rng.standard_normal((30, 4)).astype(dtype)
    assert_matches(op.matmat(backend.asarray(x)), dense @ x.astype(np.float64), backend, dtype=dtype,
                   rtol=tolerance(dtype, 100))
    assert_matches(op.matmat(backend.asarray(x[:, 0])), dense @ x[:, 0].astype(np.float64), backend, dtype=dtype,
                   rtol=tolerance(dtype, 100))
    assert_matches(op.diagonal(), np.diag(dense), backend, dtype=dtype)
    assert_matches(op.columns([3, 7]), dense[:, [3, 7]], backend, dtype=dtype)
    assert_matches(op.to_dense(), dense, backend, dtype=dtype)
    scalar = lg.AddedDiagonalOperator(lg.as_operator(backend.asarray(a)), 2.0)
    assert_matches(scalar.columns([0]), (a.astype(np.float64) + 2 * np.eye(30))[:, [0]], backend, dtype=dtype)


def test_to_dense_is_guarded_by_the_memory_budget(backend, rng):
    op = lg.AddedDiagonalOperator(lg.as_operator(backend.asarray(spd_matrix(rng, 30))), 1.0)
    with pytest.raises(lg.MemoryBudgetError, match=r"needs 7\.0 KiB but the memory budget is 1000 B"):
        op.to_dense(memory_budget=1000)


def test_low_rank_plus_diagonal_solve_and_logdet(backend, rng, dtype):
    n, r = 50, 6
    u = rng.standard_normal((n, r)).astype(dtype)
    s = np.concatenate([rng.random(r - 1) * 10, [0.0]]).astype(dtype)  # one zero value: no inverse needed
    d = (0.1 + rng.random(n)).astype(dtype)
    op = lg.LowRankPlusDiagonal(backend.asarray(u), backend.asarray(s), backend.asarray(d), backend)
    dense = (u.astype(np.float64) * s) @ u.T.astype(np.float64) + np.diag(d.astype(np.float64))
    b = rng.standard_normal((n, 3)).astype(dtype)
    assert_matches(op.solve(backend.asarray(b)), np.linalg.solve(dense, b.astype(np.float64)), backend, dtype=dtype,
                   rtol=tolerance(dtype, 1e3))
    assert_matches(op.inverse().matmat(backend.asarray(b[:, 0])), np.linalg.solve(dense, b[:, 0].astype(np.float64)),
                   backend, dtype=dtype, rtol=tolerance(dtype, 1e3))
    assert abs(op.logdet() - np.linalg.slogdet(dense)[1]) <= tolerance(np.float64, 1e3) * n
    assert_matches(op.diagonal(), np.diag(dense), backend, dtype=dtype, rtol=tolerance(dtype, 10))


def test_as_operator_accepts_duck_typed_operators(backend, rng):
    a = spd_matrix(rng, 20)
    a_b = backend.asarray(a)

    class Duck:
        shape, dtype = (20, 20), np.float64

        def matmat(self, x):
            return a_b @ x

    result = lg.cg(Duck(), backend.asarray(rng.standard_normal(20)))
    assert result.converged.all() and isinstance(result.x, backend.xp.ndarray)
    with pytest.raises(lg.ShapeError, match=r"A must be square, got shape \(20, 3\)"):
        lg.as_operator(a_b[:, :3])


def test_pivoted_cholesky_is_exact_on_a_low_rank_matrix(backend, rng):
    j = rng.standard_normal((40, 7))
    a = j @ j.T
    result = lg.pivoted_cholesky(backend.asarray(a), 7)
    lower = backend.to_numpy(result.factor)
    assert lower.shape == (40, 7) and len(set(result.pivots.tolist())) == 7
    np.testing.assert_allclose(lower @ lower.T, a, atol=1e-10 * np.abs(a).max())
    assert result.residual_trace <= 1e-10 * np.trace(a)
    early = lg.pivoted_cholesky(backend.asarray(a), 20, rtol=1e-12)  # stops once nothing is left
    assert early.factor.shape[1] == 7


def test_pivoted_cholesky_picks_the_largest_residual_diagonal(backend, rng):
    a = spd_matrix(rng, 30, 1e3)
    result = lg.pivoted_cholesky(backend.asarray(a), 5)
    lower = backend.to_numpy(result.factor)
    assert result.pivots[0] == int(np.argmax(np.diag(a)))
    residual = a - lower @ lower.T
    assert_matches(result.residual_diagonal, np.maximum(np.diag(residual), 0.0), backend, dtype=np.float64,
                   rtol=1e-10)
    assert np.linalg.eigvalsh(residual).min() >= -1e-10 * np.abs(a).max()  # the remainder stays PSD


def test_preconditioner_inputs_are_checked(backend, rng):
    a = spd_matrix(rng, 10)
    a[2, 2] = -1.0
    with pytest.raises(lg.NotPositiveDefiniteError, match="diagonal entry -1 ≤ 0 at index 2"):
        lg.jacobi_preconditioner(backend.asarray(a))
    with pytest.raises(lg.ValueRangeError, match=r"rank must lie in \[1, 10\], got 0"):
        lg.nystrom_preconditioner(backend.asarray(spd_matrix(rng, 10)), rank=0)


class _Counting(lg.LinearOperator):
    """A dense matrix behind the operator protocol that counts its products (to see that a guard fired first)."""

    def __init__(self, a, backend, *, with_diagonal=True):
        self.a, self.products, self.with_diagonal = backend.asarray(a), 0, with_diagonal
        self.shape, self.dtype, self.backend = a.shape, np.dtype(a.dtype), backend

    def _matmat(self, x):
        self.products += 1
        return self.a @ x

    def diagonal(self):
        if not self.with_diagonal:
            return super().diagonal()
        return self.backend.xp.diagonal(self.a).copy()


N_GUARD = 60
# method -> (call with a memory budget, bytes of the one array the method cannot do without, the advice it gives)
GUARDED = {
    "lanczos": (lambda op, b: lg.lanczos(op, 40, memory_budget=b), 40 * N_GUARD * 8, "fewer steps"),
    "lanczos_eigsh": (lambda op, b: lg.lanczos_eigsh(op, 5, steps=40, memory_budget=b), 40 * N_GUARD * 8,
                      "fewer pairs"),
    "logdet_slq": (lambda op, b: lg.logdet(op, method="slq", num_probes=10, lanczos_steps=20, memory_budget=b),
                   20 * N_GUARD * 10 * 8, "fewer num_probes"),
    "logdet_cholesky": (lambda op, b: lg.logdet(op, method="cholesky", memory_budget=b), N_GUARD**2 * 8,
                        "method='slq'"),
    "pivoted_cholesky": (lambda op, b: lg.pivoted_cholesky(op, 30, memory_budget=b), 30 * N_GUARD * 8, "lower rank"),
    "pivoted_cholesky_preconditioner": (lambda op, b: lg.pivoted_cholesky_preconditioner(op, 30, memory_budget=b),
                                        30 * N_GUARD * 8, "lower rank"),
    "nystrom_preconditioner": (lambda op, b: lg.nystrom_preconditioner(op, 30, memory_budget=b), 30 * N_GUARD * 8,
                               "lower rank"),
}


@pytest.mark.parametrize("method", sorted(GUARDED))
def test_bases_and_factors_go_through_the_memory_guard(backend, rng, method):
    """A budget one byte short of the basis (k·n) or factor (n·r, n²) the method must hold raises before any product,
    with the numbers and the way out; ten times that is enough for everything the method needs besides."""
    call, basis_bytes, advice = GUARDED[method]
    op = _Counting(spd_matrix(rng, N_GUARD, 10.0), backend)
    with pytest.raises(lg.MemoryBudgetError, match=rf"needs .* but the memory budget is .*{advice}"):
        call(op, basis_bytes - 1)
    assert op.products == 0
    call(op, 10 * basis_bytes)
    assert op.products > 0


def test_missing_capabilities_and_zero_start_vectors_raise_lingp_errors(backend, rng):
    a = spd_matrix(rng, 20)
    no_diagonal = _Counting(a, backend, with_diagonal=False)
    with pytest.raises(lg.ArgumentTypeError, match=r"_Counting \(20, 20\) has no cheap diagonal") as info:
        lg.jacobi_preconditioner(no_diagonal)
    assert isinstance(info.value, NotImplementedError)  # what code catching the old error still sees

    class NoProduct(lg.LinearOperator):
        shape, dtype = (20, 20), np.dtype(np.float64)

    no_product = NoProduct()
    no_product.backend = backend
    with pytest.raises(lg.ArgumentTypeError, match="NoProduct does not implement _matmat"):
        lg.cg(no_product, backend.asarray(rng.standard_normal(20)))
    for solver in (lg.lanczos, lg.lanczos_eigsh):
        with pytest.raises(lg.ValueRangeError, match=r"v0 \(shape \(20,\)\) is zero"):
            solver(backend.asarray(a), 3, v0=backend.asarray(np.zeros(20)))


def test_pivoted_cholesky_refuses_an_indefinite_diagonal_and_woodbury_solves_check_shapes():
    indefinite = np.diag(np.r_[np.ones(15), -np.ones(15)])
    with pytest.raises(lg.NotPositiveDefiniteError, match="15 entries ≤ 0"):
        lg.pivoted_cholesky_preconditioner(indefinite, 20)
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((12, 3)))[0]
    op = lg.LowRankPlusDiagonal(u, np.array([3.0, 2.0, 1.0]), np.full(12, 0.5), lg.get_backend("numpy"))
    with pytest.raises(lg.ShapeError, match="needs 12 rows"):
        op.solve(np.ones((13, 1)))
    x = rng.standard_normal((12, 2))
    dense = u @ np.diag([3.0, 2.0, 1.0]) @ u.T + 0.5 * np.eye(12)
    np.testing.assert_allclose(op.solve(x), np.linalg.solve(dense, x), rtol=1e-12)
