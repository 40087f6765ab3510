"""Batched preconditioned CG against float64 dense solves."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import lingp_core as lg
from lingp_core._precision import default_rtol
from tests.helpers import spd_matrix, spd_with_outliers

N = 120


def _relative_error_bound(a: np.ndarray, result: lg.CGResult, b: np.ndarray) -> np.ndarray:
    """‖x − x*‖/‖x*‖ ≤ cond(A)·‖r‖/‖b‖: what a residual certifies about the error."""
    cond = np.linalg.cond(a)
    return cond * result.residual_norms / np.linalg.norm(b, axis=0)


@pytest.mark.parametrize("matrix", ["cond1e2", "cond1e4", "outliers1e6", "outliers1e8"])
@pytest.mark.parametrize("k", [1, 5])
def test_cg_solves_spd_systems_like_a_dense_solve(backend, rng, matrix, k):
    a = {"cond1e2": lambda: spd_matrix(rng, N, 1e2), "cond1e4": lambda: spd_matrix(rng, N, 1e4),
         "outliers1e6": lambda: spd_with_outliers(rng, N, 1e6), "outliers1e8": lambda: spd_with_outliers(rng, N, 1e8)}[
        matrix]()
    b = rng.standard_normal((N, k))
    result = lg.cg(backend.asarray(a), backend.asarray(b[:, 0] if k == 1 else b))
    expected = np.linalg.solve(a, b)
    assert result.converged.all(), result.status
    assert result.status == ("converged",) * k
    x = backend.to_numpy(result.x).reshape(N, k)
    assert isinstance(result.x, backend.xp.ndarray) and result.x.dtype == np.float64
    assert result.x.shape == ((N,) if k == 1 else (N, k))
    true_residual = np.linalg.norm(b - a @ x, axis=0)
    # both residuals are computed in floating point (GEMV on the device vs on the host): they may differ by the
    # rounding of b − A x, about N·eps·(‖A‖‖x‖ + ‖b‖) per column
    rounding = N * np.finfo(np.float64).eps * (np.linalg.norm(a, 2) * np.linalg.norm(x, axis=0)
                                               + np.linalg.norm(b, axis=0))
    np.testing.assert_allclose(result.residual_norms, true_residual, rtol=1e-6, atol=rounding.max())
    assert np.all(true_residual <= default_rtol(np.float64) * np.linalg.norm(b, axis=0))
    error = np.linalg.norm(x - expected, axis=0) / np.linalg.norm(expected, axis=0)
    assert np.all(error <= _relative_error_bound(a, result, b))


@pytest.mark.parametrize("condition", [1e2, 1e3])
def test_float32_cg_meets_its_dtype_tolerance(backend, rng, condition):
    a = spd_matrix(rng, N, condition)
    b = rng.standard_normal((N, 3))
    result = lg.cg(backend.asarray(a.astype(np.float32)), backend.asarray(b.astype(np.float32)))
    assert result.x.dtype == np.float32 and result.converged.all(), result.status
    x = backend.to_numpy(result.x).astype(np.float64)
    residual = np.linalg.norm(b - a @ x, axis=0) / np.linalg.norm(b, axis=0)
    # the float32 inputs differ from the float64 ones by one rounding: allow eps32·cond on top of rtol
    assert np.all(residual <= default_rtol(np.float32) + np.finfo(np.float32).eps * condition * 10)


def test_float32_on_an_ill_conditioned_system_says_it_failed(backend, rng):
    a = spd_matrix(rng, N, 1e8).astype(np.float32)
    b = rng.standard_normal((N, 2)).astype(np.float32)
    with pytest.warns(lg.ConvergenceWarning, match=r"did not reach max\(rtol=0\.000345"):
        result = lg.cg(backend.asarray(a), backend.asarray(b), maxiter=3 * N)
    assert not result.converged.any()
    assert set(result.status) <= {"stagnated", "maxiter"}
    assert np.all(result.residual_norms > result.thresholds)


def test_batched_equals_column_by_column(backend, rng):
    a = spd_with_outliers(rng, N, 1e3)
    b = rng.standard_normal((N, 4)) * np.array([1.0, 1e-3, 1e3, 1.0])
    # check every iteration (CuPy's default checks every 10th) so that iteration counts are comparable one by one
    batched = lg.cg(backend.asarray(a), backend.asarray(b), check_every=1)
    for j in range(4):
        single = lg.cg(backend.asarray(a), backend.asarray(b[:, j]), check_every=1)
        # the same iteration: only GEMM-versus-GEMV rounding differs, which can move a column across its threshold
        # one iteration earlier or later; both answers are certified by their residuals
        assert abs(int(single.iterations[0]) - int(batched.iterations[j])) <= 1
        x = backend.to_numpy(single.x)
        bound = np.linalg.cond(a) * (single.residual_norms[0] + batched.residual_norms[j]) / np.linalg.norm(b[:, j])
        assert np.linalg.norm(x - backend.to_numpy(batched.x[:, j])) <= bound * np.linalg.norm(x)


def test_zero_rhs_and_exact_start_take_no_iterations(backend, rng):
    a = spd_matrix(rng, 30)
    b = rng.standard_normal((30, 2))
    b[:, 1] = 0.0
    result = lg.cg(backend.asarray(a), backend.asarray(b))
    assert result.iterations[1] == 0 and result.converged[1]
    assert float(abs(result.x[:, 1]).max()) == 0.0
    exact = np.linalg.solve(a, b)
    again = lg.cg(backend.asarray(a), backend.asarray(b), x0=backend.asarray(exact), rtol=1e-8)
    assert np.all(again.iterations == 0) and again.converged.all()


@pytest.mark.parametrize("kind", ["jacobi", "pivoted_cholesky", "nystrom"])
def test_preconditioned_cg_reaches_the_same_solution(backend, rng, kind, dtype):
    q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    kernel = (q * (1e4 * np.arange(1, N + 1) ** -3.0)) @ q.T
    # decaying spectrum + noise, as in GP regression; float32 only reaches its tolerance when eps32·cond(A) stays
    # below it, hence more noise there (cond ~1e3 against ~1e6 for float64)
    noise = 10.0 if dtype == np.float32 else 1e-2
    a = kernel + noise * np.diag(1 + rng.random(N))
    b = rng.standard_normal((N, 3))
    a_b = backend.asarray(a.astype(dtype))
    m = {"jacobi": lambda: lg.jacobi_preconditioner(a_b),
         "pivoted_cholesky": lambda: lg.pivoted_cholesky_preconditioner(a_b, rank=30),
         "nystrom": lambda: lg.nystrom_preconditioner(a_b, rank=30)}[kind]()
    assert m.dtype == dtype and m.shape == (N, N)
    plain = lg.cg(a_b, backend.asarray(b.astype(dtype)), warn=False)
    pre = lg.cg(a_b, backend.asarray(b.astype(dtype)), M=m)
    assert pre.converged.all(), pre.status
    x = backend.to_numpy(pre.x).astype(np.float64)
    rel = np.linalg.norm(b - a @ x, axis=0) / np.linalg.norm(b, axis=0)
    assert np.all(rel <= default_rtol(dtype) + np.finfo(dtype).eps * np.linalg.cond(a))
    if kind != "jacobi":
        assert pre.iterations.max() * 2 <= plain.iterations.max()  # the 3× target is benchmarked


def test_check_every_delays_checks_but_converges(backend, rng):
    a = spd_matrix(rng, N, 1e3)
    b = rng.standard_normal((N, 2))
    result = lg.cg(backend.asarray(a), backend.asarray(b), check_every=7)
    assert result.converged.all()
    assert np.all(result.iterations % 7 == 0)


def test_callback_history_and_restarts_fields(backend, rng):
    a = spd_matrix(rng, 40, 1e2)
    b = rng.standard_normal((40, 2))
    seen = []
    result = lg.cg(backend.asarray(a), backend.asarray(b), callback=lambda it, norms: seen.append((it, norms.copy())),
                   return_history=True, check_every=1)
    assert len(seen) == len(result.history) and seen[0][0] == 1
    assert seen[-1][0] == result.iterations.max()
    assert all(norms.shape == (2,) for _, norms in seen)
    assert result.restarts.shape == (2,)


def test_maxiter_stops_and_warns_with_advice(backend, rng):
    a = spd_matrix(rng, N, 1e4)
    b = rng.standard_normal(N)
    expected = r"1 of 1 right-hand sides.*status: maxiter.*raise maxiter \(now 5\)"
    with pytest.warns(lg.ConvergenceWarning, match=expected):
        result = lg.cg(backend.asarray(a), backend.asarray(b), maxiter=5)
    assert result.iterations[0] == 5 and result.status == ("maxiter",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = lg.cg(backend.asarray(a), backend.asarray(b), maxiter=5, warn=False)
    assert not quiet.converged[0]


def test_indefinite_matrix_is_flagged(backend, rng):
    a = spd_matrix(rng, 40)
    a -= 5.0 * np.eye(40)  # eigenvalues from −4 to 95
    b = rng.standard_normal((40, 2))
    with pytest.warns(lg.ConvergenceWarning, match="not positive definite"):
        result = lg.cg(backend.asarray(a), backend.asarray(b))
    assert "indefinite" in result.status


def test_cg_tridiagonal_matches_lanczos(backend, rng):
    a = spd_matrix(rng, 60, 1e2)
    b = rng.standard_normal(60)
    result = lg.cg(backend.asarray(a), backend.asarray(b), maxiter=10, warn=False, return_tridiagonal=True)
    diag, off = result.tridiagonal
    lanczos = lg.lanczos(backend.asarray(a), 10, v0=backend.asarray(b))
    np.testing.assert_allclose(diag[:, 0], backend.to_numpy(lanczos.alpha), rtol=1e-8)
    np.testing.assert_allclose(off[:, 0], backend.to_numpy(lanczos.beta), rtol=1e-8)


def test_cg_takes_an_operator(backend, rng):
    a = spd_matrix(rng, 50)
    op = lg.AddedDiagonalOperator(lg.as_operator(backend.asarray(a)), 2.0)
    b = rng.standard_normal((50, 2))
    result = lg.cg(op, backend.asarray(b))
    expected = np.linalg.solve(a + 2.0 * np.eye(50), b)
    # cond(A + 2I) ≈ 34 times the default rtol 1.5e-8 bounds the error by ~5e-7
    np.testing.assert_allclose(backend.to_numpy(result.x), expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_bad_inputs_raise_clear_errors(backend, rng):
    a = backend.asarray(spd_matrix(rng, 10))
    b = backend.asarray(rng.standard_normal(10))
    with pytest.raises(lg.ShapeError, match=r"A must be square, got shape \(10, 9\)"):
        lg.cg(a[:, :9], b)
    with pytest.raises(lg.ShapeError, match=r"A has shape \(10, 10\) but B has shape \(9,\)"):
        lg.cg(a, b[:9])
    with pytest.raises(lg.DTypeError, match="A has dtype float64 but B has dtype float32"):
        lg.cg(a, b.astype(np.float32))
    bad = b.copy()
    bad[3] = np.nan
    with pytest.raises(lg.NonFiniteError, match=r"B .* holds 1 NaN and 0 Inf entries, the first at index \(3,\)"):
        lg.cg(a, bad)
    a_bad = a.copy()
    a_bad[0, 1] = np.inf
    with pytest.raises(lg.NonFiniteError, match="A .* 0 NaN and 1 Inf"):
        lg.cg(a_bad, b)
    with pytest.raises(lg.ValueRangeError, match=r"maxiter must lie in \[1, inf\], got 0"):
        lg.cg(a, b, maxiter=0)
    with pytest.raises(lg.ShapeError, match=r"x0 has shape \(9,\); expected \(10,\)"):
        lg.cg(a, b, x0=b[:9])
    with pytest.raises(lg.DTypeError, match="int64"):
        lg.cg(a, backend.xp.arange(10))


def test_mixed_backends_raise(cupy_backend, rng):
    a = spd_matrix(rng, 10)
    with pytest.raises(lg.BackendMismatchError):
        lg.cg(a, cupy_backend.asarray(rng.standard_normal(10)))


def _bad_warm_start(rng, dtype):
    """A well-conditioned SPD system started from x0 ~1e6–1e8 times too large (a warm start from a wrongly scaled
    problem): the recursive residual then drifts from b − A x by ~eps·‖A‖·‖x0‖, far above the tolerance asked."""
    n = 60
    a = spd_matrix(rng, n, 10.0)
    b = rng.standard_normal((n, 3))
    x0 = (1e8 if dtype == np.float64 else 1e6) * rng.standard_normal((n, 3))
    rtol = 1e-10 if dtype == np.float64 else default_rtol(np.float32)
    # the system CG really sees, in float64: the inputs rounded to dtype
    a_exact, b_exact = a.astype(dtype).astype(np.float64), b.astype(dtype).astype(np.float64)
    return a_exact, b_exact, x0.astype(dtype), rtol


def _residual_allowance(a, x, b, dtype):
    """How far CG's own evaluation of b − A x in ``dtype`` can be off (rounding of a GEMV, √n·eps·(‖A‖‖x‖ + ‖b‖))."""
    return np.sqrt(a.shape[0]) * np.finfo(dtype).eps * (np.linalg.norm(a, 2) * np.linalg.norm(x, axis=0)
                                                         + np.linalg.norm(b, axis=0))


def test_cg_accepts_a_column_only_once_its_true_residual_passes(backend, rng, dtype):
    """Started far from the answer, the recursive residual meets the tolerance long before b − A x does; a CG that
    trusted it would return an x whose true residual is ~10³ times the tolerance."""
    a, b, x0, rtol = _bad_warm_start(rng, dtype)
    result = lg.cg(backend.asarray(a.astype(dtype)), backend.asarray(b.astype(dtype)), x0=backend.asarray(x0),
                   rtol=rtol)
    assert result.converged.all() and result.status == ("converged",) * 3, result.status
    assert np.all(result.restarts >= 1)  # the true-residual check caught the drift in every column
    x = backend.to_numpy(result.x).astype(np.float64)
    true = np.linalg.norm(b - a @ x, axis=0)  # float64, independent of the solver
    assert np.all(true <= rtol * np.linalg.norm(b, axis=0) + _residual_allowance(a, x, b, dtype))


def test_cg_restart_from_the_true_residual_reaches_the_dense_solution(backend, rng, dtype):
    """The restart path: a column whose recursive residual lied continues from the true residual, and converges."""
    a, b, x0, rtol = _bad_warm_start(rng, dtype)
    result = lg.cg(backend.asarray(a.astype(dtype)), backend.asarray(b.astype(dtype)), x0=backend.asarray(x0),
                   rtol=rtol, return_history=True)
    assert np.all(result.restarts >= 1) and np.all(result.restarts <= 3), result.restarts  # reached, not stagnated
    assert result.converged.all(), result.status
    expected = np.linalg.solve(a, b)
    x = backend.to_numpy(result.x).astype(np.float64)
    # what the certified residual says about the error: ‖x − x*‖/‖x*‖ ≤ cond(A)·‖r‖/‖b‖
    bound = np.linalg.cond(a) * (rtol * np.linalg.norm(b, axis=0) + _residual_allowance(a, x, b, dtype)) \
        / np.linalg.norm(b, axis=0)
    assert np.all(np.linalg.norm(x - expected, axis=0) / np.linalg.norm(expected, axis=0) <= bound)
    # after a restart the history shows the true residual, far above the recursive one it replaced
    norms = np.array([h for _, h in result.history])
    assert np.any(norms[1:] > 10 * norms[:-1])


@pytest.mark.parametrize("scale", [1e160, 1e-170])
def test_cg_refuses_right_hand_sides_whose_inner_products_overflow_or_underflow(scale):
    """At these scales ‖b‖² is not a float64: CG used to return x = 0 as "converged". It must refuse, saying how to
    rescale — and at a scale where the squares fit, reach the unscaled answer."""
    rng = np.random.default_rng(0)
    M = rng.standard_normal((30, 30))
    A, b = M @ M.T + 30 * np.eye(30), rng.standard_normal((30, 1))
    with pytest.raises(lg.ValueRangeError, match="rescale A and B"):
        lg.cg(A * scale, b * scale)
    result = lg.cg(A * 1e100, b * 1e100)
    assert result.converged.all()
    np.testing.assert_allclose(result.x, np.linalg.solve(A, b), rtol=1e-6)


def test_a_non_symmetric_dense_a_or_m_is_refused(backend, rng):
    """CG assumes symmetry: on A + 0.3·triu it ran 10·n iterations and advised a preconditioner."""
    a = spd_matrix(rng, 40, 1e3)
    b = backend.asarray(rng.standard_normal((40, 2)))
    skewed = a + 0.3 * np.triu(rng.standard_normal((40, 40)))
    with pytest.raises(lg.ValueRangeError, match=r"A \(40 × 40, float64\) is not symmetric"):
        lg.cg(backend.asarray(skewed), b)
    m = np.eye(40) + 0.5 * np.triu(rng.standard_normal((40, 40)), 1)
    with pytest.raises(lg.ValueRangeError, match=r"M \(40 × 40, float64\) is not symmetric: max \|M − Mᵀ\|"):
        lg.cg(backend.asarray(a), b, M=backend.asarray(m))


def test_a_preconditioner_whose_products_vanish_is_named(backend, rng):
    """M = 0 gives rᵀMr = 0: CG stood still for 10·n iterations and then advised passing a preconditioner."""
    a = spd_matrix(rng, 40, 1e3)
    b = rng.standard_normal((40, 2))
    with pytest.warns(lg.ConvergenceWarning, match=r"M's products .* zero") as record:
        result = lg.cg(backend.asarray(a), backend.asarray(b), M=backend.asarray(np.zeros((40, 40))))
    assert "pass a preconditioner" not in str(record[0].message)
    assert result.status == ("indefinite", "indefinite") and not result.converged.any()
    assert np.all(result.iterations < 40)  # stopped at once, not after 10·n iterations
    np.testing.assert_allclose(result.residual_norms, np.linalg.norm(b, axis=0), rtol=1e-12)  # x stayed 0


class _NaNProducts:
    """A duck-typed SPD operator whose products hold NaN from its ``after``-th call on."""

    def __init__(self, a, after):
        self.a, self.after, self.calls = a, after, 0
        self.shape, self.dtype = a.shape, a.dtype

    def matmat(self, x):
        self.calls += 1
        out = self.a @ x
        if self.calls > self.after:
            out[3] = np.nan
        return out


@pytest.mark.parametrize("after", [0, 3])
def test_non_finite_products_of_a_are_named(backend, rng, after):
    """A NaN product was reported as 'diverged: check that A is symmetric positive definite'."""
    a = backend.asarray(spd_matrix(rng, 40, 1e3))
    b = rng.standard_normal((40, 2))
    with pytest.warns(lg.ConvergenceWarning, match=r"A's products .* not finite") as record:
        result = lg.cg(_NaNProducts(a, after), backend.asarray(b))
    assert "symmetric positive definite" not in str(record[0].message)
    assert result.status == ("diverged", "diverged") and not result.converged.any()


def test_non_finite_products_of_m_are_named(backend, rng):
    a = spd_matrix(rng, 40, 1e3)
    b = rng.standard_normal((40, 2))
    m = _NaNProducts(backend.asarray(np.eye(40)), 2)
    with pytest.warns(lg.ConvergenceWarning, match=r"M's products .* not finite") as record:
        result = lg.cg(backend.asarray(a), backend.asarray(b), M=m)
    assert "A is symmetric positive definite" not in str(record[0].message)
    assert result.status == ("diverged", "diverged")


@pytest.mark.parametrize("check_every", [1, 7])
def test_a_zero_tolerance_is_reported_as_stagnation_at_rounding_level(backend, rng, check_every):
    """rtol = atol = 0 can only be met by an exact zero residual: CG ran 10·n iterations at rounding level and said
    'maxiter' (raise maxiter); it now stops once restarts show the floor, and says 'stagnated'."""
    a = spd_matrix(rng, 40, 1e3)
    b = rng.standard_normal((40, 2))
    with pytest.warns(lg.ConvergenceWarning, match="status: stagnated"):
        result = lg.cg(backend.asarray(a), backend.asarray(b), rtol=0.0, check_every=check_every)
    assert result.status == ("stagnated", "stagnated") and np.all(result.iterations < 10 * 40)
    expected = np.linalg.solve(a, b)
    # at the floor: the error is what cond(A)·eps allows
    np.testing.assert_allclose(backend.to_numpy(result.x), expected, rtol=0, atol=1e3 * 1e3 * np.finfo(float).eps *
                               np.abs(expected).max())


def test_no_right_hand_sides_give_empty_diagnostics_of_their_documented_dtypes(backend, rng):
    result = lg.cg(backend.asarray(spd_matrix(rng, 10)), backend.asarray(np.ones((10, 0))))
    assert result.x.shape == (10, 0) and result.status == ()
    assert result.converged.dtype == bool and result.converged.shape == (0,)  # was float64
    assert result.iterations.dtype == np.int64 and result.residual_norms.dtype == np.float64
