"""Hostile inputs to the operators, solvers, Fisher and likelihoods: each must give the float64 dense answer or raise
the LingpError subclass that names the fault, never a raw NumPy error or a silently wrong number."""
from __future__ import annotations

import math

import numpy as np
import pytest

import lingp_core as lg
from lingp_core.solvers._common import column_norms
from lingp_core.solvers.lanczos import scale_range
from tests.helpers import assert_matches, spd_matrix, tolerance

N = 12


def blocks(backend, jd: np.ndarray, f0: np.ndarray) -> lg.JacobianBlocks:
    """JacobianBlocks of one dense block J (n·c, p) with outputs f0 (n, c), on the backend."""
    c = f0.shape[1]
    blk = lg.DenseBlock(["w"], [(jd.shape[1],)], backend.asarray(jd), c, backend.xp)
    return lg.JacobianBlocks(backend.asarray(f0), [blk], backend=backend, outputs=list(range(c)))


def nonsymmetric(rng) -> np.ndarray:
    return spd_matrix(rng, N) + np.triu(np.ones((N, N)), 1)


# ----- A1: AddedDiagonalOperator ----------------------------------------------------------------------------------

def test_added_diagonal_reads_a_list_as_one_entry_per_row(backend, rng):
    """A list diag used to broadcast along the columns: every product was wrong."""
    a = spd_matrix(rng, N)
    d = 1.0 + rng.random(N)
    x = rng.standard_normal((N, N))  # k = n, where the wrong broadcast had no shape error to give it away
    op = lg.AddedDiagonalOperator(lg.as_operator(backend.asarray(a)), d.tolist())
    dense = a + np.diag(d)
    assert_matches(op.matmat(backend.asarray(x)), dense @ x, backend, dtype=np.float64)
    assert_matches(op.matmat(backend.asarray(x[:, 0])), dense @ x[:, 0], backend, dtype=np.float64)
    assert_matches(op.columns([2, 5]), dense[:, [2, 5]], backend, dtype=np.float64)
    assert_matches(lg.cg(op, backend.asarray(x[:, 0])).x, np.linalg.solve(dense, x[:, 0]), backend,
                   dtype=np.float64, rtol=1e-6)


def test_added_diagonal_keeps_a_float32_operator_float32(backend, rng):
    a = spd_matrix(rng, N).astype(np.float32)
    x = rng.standard_normal((N, 2)).astype(np.float32)
    op = lg.AddedDiagonalOperator(lg.as_operator(backend.asarray(a)), 0.5)  # a Python number: used in float32
    assert_matches(op.matmat(backend.asarray(x)), (a.astype(np.float64) + 0.5 * np.eye(N)) @ x.astype(np.float64),
                   backend, dtype=np.float32, rtol=tolerance(np.float32, 100))


@pytest.mark.parametrize("diag, error, message", [
    (-100.0, lg.ValueRangeError, "diag must be finite and > 0, got -100"),
    (0.0, lg.ValueRangeError, "diag must be finite and > 0"),
    (float("nan"), lg.ValueRangeError, "diag must be finite and > 0, got nan"),
    (1e300, lg.ValueRangeError, "not a finite positive float32"),
    (np.full(N, -1.0, np.float32), lg.ValueRangeError, r"must be > 0, but holds -1 at index 0"),
    (np.full(N, np.nan, np.float32), lg.NonFiniteError, "diag .* holds 12 NaN"),
    (np.ones(N + 1, np.float32), lg.ShapeError, r"diag has shape \(13,\); expected \(\) or \(12,\)"),
    (np.ones(1, np.float32), lg.ShapeError, r"diag has shape \(1,\)"),
    (np.ones(N), lg.DTypeError, "diag has dtype float64 .* expected one of float32"),
    (np.ones(N, np.int64), lg.DTypeError, "diag has dtype int64"),
])
def test_added_diagonal_refuses_bad_diagonals(diag, error, message):
    base = lg.as_operator(spd_matrix(np.random.default_rng(0), N).astype(np.float32))
    with pytest.raises(error, match=message):
        lg.AddedDiagonalOperator(base, diag)


def test_added_diagonal_needs_a_square_linear_operator(rng):
    with pytest.raises(lg.ArgumentTypeError, match="base must be a LinearOperator, got numpy.ndarray"):
        lg.AddedDiagonalOperator(spd_matrix(rng, N), 1.0)
    with pytest.raises(lg.ShapeError, match="base must be square"):
        lg.AddedDiagonalOperator(lg.as_operator(np.ones((3, 4)), square=False), 1.0)


# ----- A2: one checked public product, unchecked solver loops -------------------------------------------------------

def operators(backend, rng) -> dict:
    """Every operator kind, float64, with its dense (n, n) float64 oracle."""
    jd, f0 = rng.standard_normal((3 * 4, 5)), rng.standard_normal((4, 3))
    J = blocks(backend, jd, f0)
    a = spd_matrix(rng, 5)
    u, s, d = np.linalg.qr(rng.standard_normal((5, 2)))[0], np.array([2.0, 1.0]), np.full(5, 0.5)
    low = lg.fisher_lowrank(J, lg.GaussianLikelihood(1.0), 2, damping=0.1)
    return {
        "fisher": (lg.fisher(J, lg.GaussianLikelihood(1.0), damping=0.1), jd.T @ jd + 0.1 * np.eye(5)),
        "kernel": (lg.KernelOperator(J, prior_scale=2.0), 2.0 * jd @ jd.T),
        "dense": (lg.DenseOperator(backend.asarray(a), backend), a),
        "added": (lg.AddedDiagonalOperator(lg.as_operator(backend.asarray(a)), 0.5), a + 0.5 * np.eye(5)),
        "lowrank": (lg.LowRankPlusDiagonal(backend.asarray(u), backend.asarray(s), backend.asarray(d), backend),
                    (u * s) @ u.T + np.diag(d)),
        "lowrank-result": (low, backend.to_numpy(low.vectors) * backend.to_numpy(low.values) @
                           backend.to_numpy(low.vectors).T + 0.1 * np.eye(5)),
    }


@pytest.mark.parametrize("kind", ["fisher", "kernel", "dense", "added", "lowrank", "lowrank-result"])
def test_products_check_their_operand(backend, rng, kind):
    """FisherOperator.matmat used to return F @ x[:p] for x with p + 1 rows, and to take int and NaN input."""
    op, dense = operators(backend, rng)[kind]
    n = dense.shape[0]
    x = rng.standard_normal((n, 2))
    assert_matches(op.matmat(backend.asarray(x)), dense @ x, backend, dtype=np.float64)
    assert_matches(op.matmat(backend.asarray(x[:, 0])), dense @ x[:, 0], backend, dtype=np.float64)
    with pytest.raises(lg.ShapeError, match=rf"x has shape \({n + 1}, 2\) but .* {n} rows"):
        op.matmat(backend.asarray(np.ones((n + 1, 2))))
    with pytest.raises(lg.ShapeError, match=rf"x has shape \({n - 1},\)"):
        op.matmat(backend.asarray(np.ones(n - 1)))
    with pytest.raises(lg.ShapeError, match="1 or 2 dimension"):
        op.matmat(backend.asarray(np.ones((n, 1, 1))))
    with pytest.raises(lg.DTypeError, match="x has dtype int64"):
        op.matmat(backend.asarray(np.ones(n, dtype=np.int64)))
    with pytest.raises(lg.DTypeError, match="x has dtype float32"):
        op.matmat(backend.asarray(np.ones(n, dtype=np.float32)))
    with pytest.raises(lg.NonFiniteError, match="x .* holds 1 NaN"):
        op.matmat(backend.asarray(np.r_[np.nan, np.ones(n - 1)]))


def test_operands_of_another_backend_are_refused(cupy_backend, rng):
    op = lg.DenseOperator(np.eye(3), "numpy")
    with pytest.raises(lg.BackendMismatchError, match="backend 'numpy'"):
        op.matmat(cupy_backend.asarray(np.ones(3)))


class _CountingChecks(lg.LinearOperator):
    """A dense operator that counts checked (public) and unchecked products."""

    def __init__(self, a, backend):
        self.a, self.checks, self.products = backend.asarray(a), 0, 0
        self.shape, self.dtype, self.backend = a.shape, np.dtype(a.dtype), backend

    def _check_operand(self, x, name):
        self.checks += 1
        return super()._check_operand(x, name)

    def _matmat(self, x):
        self.products += 1
        return self.a @ x


@pytest.mark.parametrize("solver", ["cg", "lanczos", "lanczos_eigsh", "logdet", "nystrom", "pcg"])
def test_solver_loops_use_the_unchecked_product(backend, rng, solver):
    """The operand check (a pass over X and, on a GPU, a synchronization) is paid at the boundary, not per step."""
    a = spd_matrix(rng, 40, 1e3)
    op = _CountingChecks(a, backend)
    precond = _CountingChecks(np.eye(40), backend)
    b = backend.asarray(rng.standard_normal(40))
    calls = {
        "cg": lambda: lg.cg(op, b),
        "lanczos": lambda: lg.lanczos(op, 10),
        "lanczos_eigsh": lambda: lg.lanczos_eigsh(op, 2),
        "logdet": lambda: lg.logdet(op, method="slq", num_probes=3, lanczos_steps=40),  # n steps: no truncation
        "nystrom": lambda: lg.nystrom_preconditioner(op, 5),
        "pcg": lambda: lg.cg(op, b, M=lg.AddedDiagonalOperator(precond, 1.0)),
    }
    calls[solver]()
    assert op.products > 0 and op.checks == 0 and precond.checks == 0
    assert precond.products > 0 or solver != "pcg"


def test_duck_typed_products_of_the_wrong_shape_or_dtype_raise(backend, rng):
    a = backend.asarray(spd_matrix(rng, N))

    class Short:
        shape, dtype = (N, N), np.float64

        def matmat(self, x):
            return (a @ x)[:-1]

    class Float32:
        shape, dtype = (N, N), np.float64

        def matmat(self, x):
            return (a @ x).astype(np.float32)

    b = backend.asarray(rng.standard_normal(N))
    with pytest.raises(lg.ShapeError, match=r"A.matmat returned .* shape \(11, 1\) .* must return shape \(12, 1\)"):
        lg.cg(Short(), b)
    with pytest.raises(lg.DTypeError, match="A.matmat returned dtype float32 but the operator declares .* float64"):
        lg.cg(Float32(), b)  # used to run on and report "stagnated"


class _DuckWithDiagonal:
    """A duck-typed SPD operator whose diagonal() returns whatever it is given."""

    def __init__(self, a, diagonal, dtype=np.float64):
        self.a, self.d, self.shape, self.dtype = a, diagonal, a.shape, np.dtype(dtype)

    def matmat(self, x):
        return self.a @ x

    def diagonal(self):
        return self.d


def _bad_diagonals(a):
    d = np.diag(a).copy()
    return {
        "wrong shape": (d[:5], lg.ShapeError, r"A.diagonal\(\) has shape \(5,\); expected \(12,\)"),
        "2-D": (np.diag(d), lg.ShapeError, r"A.diagonal\(\) has shape \(12, 12\)"),
        "Inf": (np.r_[np.inf, d[1:]], lg.NonFiniteError, r"A.diagonal\(\) .* 0 NaN and 1 Inf"),
        "NaN": (np.r_[np.nan, d[1:]], lg.NonFiniteError, r"A.diagonal\(\) .* 1 NaN and 0 Inf"),
        "float32 for float64": (d.astype(np.float32), lg.DTypeError, r"A.diagonal\(\) has dtype float32"),
        "integers": (np.ones(N, dtype=np.int64), lg.DTypeError, r"A.diagonal\(\) has dtype int64"),
    }


@pytest.mark.parametrize("case", ["wrong shape", "2-D", "Inf", "NaN", "float32 for float64", "integers"])
@pytest.mark.parametrize("use", ["jacobi", "cg with jacobi", "pivoted_cholesky", "pivoted_cholesky_preconditioner"])
def test_a_duck_typed_operators_diagonal_is_checked(backend, rng, case, use):
    """A diagonal() of the wrong shape raised a raw broadcasting ValueError, Inf gave a zero inverse (CG then ran to
    maxiter advising a preconditioner), NaN was reported as "≤ 0: not positive definite"."""
    a = spd_matrix(rng, N)
    diagonal, error, message = _bad_diagonals(a)[case]
    op = _DuckWithDiagonal(backend.asarray(a), backend.asarray(diagonal))
    b = backend.asarray(rng.standard_normal(N))
    calls = {"jacobi": lambda: lg.jacobi_preconditioner(op),
             "cg with jacobi": lambda: lg.cg(op, b, M=lg.jacobi_preconditioner(op)),
             "pivoted_cholesky": lambda: lg.pivoted_cholesky(op, 3),
             "pivoted_cholesky_preconditioner": lambda: lg.pivoted_cholesky_preconditioner(op, 3)}
    with pytest.raises(error, match=message):
        calls[use]()


def test_a_float64_diagonal_of_a_float32_operator_is_refused_not_blamed_on_a(backend, rng):
    """Its Jacobi inverse came out float64, so CG's next product with A raised a DTypeError naming A.matmat."""
    a = spd_matrix(rng, N).astype(np.float32)
    op = _DuckWithDiagonal(backend.asarray(a), backend.asarray(np.diag(a).astype(np.float64)), np.float32)
    with pytest.raises(lg.DTypeError, match=r"A.diagonal\(\) has dtype float64 .* expected one of float32"):
        lg.jacobi_preconditioner(op)


def test_a_duck_typed_diagonal_given_as_a_list_is_read_like_an_array(rng):
    """A list raised a raw TypeError ('>' between list and int); read as float64 it is a valid diagonal."""
    a = spd_matrix(rng, N)
    b = rng.standard_normal(N)
    result = lg.cg(_DuckWithDiagonal(a, list(np.diag(a))), b, M=lg.jacobi_preconditioner(
        _DuckWithDiagonal(a, list(np.diag(a)))))
    assert result.converged.all()
    np.testing.assert_allclose(result.x, np.linalg.solve(a, b), rtol=1e-6)


def test_a_linear_operator_subclass_diagonal_is_checked_too(backend, rng):
    """Subclasses implement diagonal() themselves; what they return enters the preconditioners the same way."""
    a = spd_matrix(rng, N)

    class Short(lg.LinearOperator):
        shape, dtype = (N, N), np.dtype(np.float64)

        def _matmat(self, x):
            return backend.asarray(a) @ x

        def diagonal(self):
            return backend.asarray(np.diag(a)[:-1])

    op = Short()
    op.backend = backend
    with pytest.raises(lg.ShapeError, match=r"A.diagonal\(\) has shape \(11,\); expected \(12,\)"):
        lg.jacobi_preconditioner(op)
    with pytest.raises(lg.ShapeError, match=r"A.diagonal\(\) has shape \(11,\)"):
        lg.pivoted_cholesky(op, 2)


# ----- A3: LowRankPlusDiagonal ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, error, message", [
    ({"values": np.array([3.0, -0.4])}, lg.ValueRangeError, r"values .* must be ≥ 0, but holds -0.4 at index 1"),
    ({"values": np.array([np.nan, 1.0])}, lg.NonFiniteError, "values .* holds 1 NaN"),
    ({"values": np.ones(3)}, lg.ShapeError, r"values has shape \(3,\); expected \(2,\)"),
    ({"values": np.ones(2, np.float32)}, lg.DTypeError, "values has dtype float32"),
    ({"diag": np.zeros(8)}, lg.ValueRangeError, r"diag .* must be > 0, but holds 0 at index 0"),
    ({"diag": -0.5}, lg.ValueRangeError, "diag must be finite and > 0"),
    ({"diag": np.ones(9)}, lg.ShapeError, r"diag has shape \(9,\)"),
    ({"diag": np.full(8, np.inf)}, lg.NonFiniteError, "diag .* holds 0 NaN and 8 Inf"),
    ({"factor": np.ones(8)}, lg.ShapeError, "factor must have 2 dimension"),
    ({"factor": np.full((8, 2), 1e200)}, lg.ValueRangeError, "Woodbury core .* overflows"),
    ({"backend": 3}, lg.ArgumentTypeError, "backend must be a Backend or a backend name"),
])
def test_low_rank_plus_diagonal_refuses_what_its_woodbury_form_cannot_use(args, error, message):
    """Negative values were clamped in the core but used raw in matmat; a zero diagonal gave NaN; a negative one
    a raw LinAlgError; shape and dtype mismatches numpy errors or mixed-precision products."""
    given = {"factor": np.linalg.qr(np.random.default_rng(1).standard_normal((8, 2)))[0],
             "values": np.array([3.0, 1.0]), "diag": np.full(8, 0.5), "backend": "numpy"} | args
    with pytest.raises(error, match=message):
        lg.LowRankPlusDiagonal(given["factor"], given["values"], given["diag"], given["backend"])


def test_low_rank_plus_diagonal_takes_a_scalar_diagonal(backend, rng, dtype):
    u = np.linalg.qr(rng.standard_normal((20, 3)))[0].astype(dtype)
    s = np.array([4.0, 2.0, 0.0], dtype)
    op = lg.LowRankPlusDiagonal(backend.asarray(u), backend.asarray(s), 0.25, backend.name)
    dense = (u.astype(np.float64) * s) @ u.T.astype(np.float64) + 0.25 * np.eye(20)
    b = rng.standard_normal((20, 2)).astype(dtype)
    assert_matches(op.solve(backend.asarray(b)), np.linalg.solve(dense, b.astype(np.float64)), backend, dtype=dtype,
                   rtol=tolerance(dtype, 100))
    assert abs(op.logdet() - np.linalg.slogdet(dense)[1]) <= tolerance(dtype, 100) * 20
    with pytest.raises(lg.DTypeError, match="dtype must be float32 or float64, got 'x'"):
        op.inverse("x")
    with pytest.raises(lg.DTypeError, match="got int64"):
        op.inverse(np.int64)


# ----- A4: Lanczos at the edges of the floating-point range -------------------------------------------------------

def test_column_norms_survive_tiny_and_huge_entries(backend, rng):
    x = rng.standard_normal((30, 5))
    x[:, 1] *= 1e-200
    x[:, 2] *= 1e200
    x[:, 3] = 0.0
    x[:, 4] = 0.0
    x[0, 4] = 1e-310  # a subnormal alone
    expected = np.array([math.hypot(*x[:, j]) for j in range(5)])  # Python's hypot scales, in float64
    got = column_norms(backend.asarray(x), backend)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=tolerance(np.float64, 10))


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_lanczos_start_vectors_of_any_scale(backend, rng, scale):
    """sqrt(Σ v0²) underflowed (NaN basis) or overflowed (zero basis) for entries beyond ~1e∓154."""
    a = spd_matrix(rng, 30)
    v0 = rng.standard_normal(30)
    result = lg.lanczos(backend.asarray(a), 6, v0=backend.asarray(v0 * scale))
    q = backend.to_numpy(result.Q)
    alpha, beta = backend.to_numpy(result.alpha), backend.to_numpy(result.beta)
    t = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    np.testing.assert_allclose(q.T @ a @ q, t, atol=tolerance(np.float64, 1e3) * np.abs(a).max())
    np.testing.assert_allclose(q[:, 0], v0 / np.linalg.norm(v0), rtol=tolerance(np.float64, 10))


@pytest.mark.parametrize("factor", [2.0**-500, 2.0**-480, 2.0**520])
def test_lanczos_refuses_operators_out_of_floating_point_range(backend, rng, factor):
    """At these scales β = sqrt(Σ w²) under- or overflows in float64: eigenvalues came out wrong but flagged
    converged, and the SLQ log-determinant was off by several units with a small standard error."""
    a = backend.asarray(spd_matrix(rng, 30) * factor)
    low, high = scale_range(30, np.float64)
    assert factor * 100 < low or factor > high  # the test is about the range, not about these numbers
    for call in (lambda: lg.lanczos_eigsh(a, 2), lambda: lg.lanczos(a, 5),
                 lambda: lg.logdet(a, method="slq", num_probes=4, lanczos_steps=10)):
        with pytest.raises(lg.ValueRangeError, match="rescale A by a common factor"):
            call()


def test_lanczos_within_range_matches_eigh(backend, rng):
    a = spd_matrix(rng, 30)
    factor = 2.0**-400  # small, but inside scale_range: exact answers, scaled
    assert scale_range(30, np.float64)[0] < factor < scale_range(30, np.float64)[1]
    result = lg.lanczos_eigsh(backend.asarray(a * factor), 3)
    expected = np.sort(np.linalg.eigvalsh(a))[::-1][:3]
    np.testing.assert_allclose(backend.to_numpy(result.values) / factor, expected, rtol=tolerance(np.float64, 1e3))
    assert result.converged.all()


def test_lanczos_of_a_zero_operator_is_a_breakdown_not_an_error(backend):
    result = lg.lanczos(backend.asarray(np.zeros((8, 8))), 3)
    assert result.breakdown and float(backend.to_numpy(result.alpha)[0]) == 0.0


# ----- A5: pivoted Cholesky and Nyström on indefinite matrices ----------------------------------------------------

def indefinite_with_positive_diagonal(rng) -> np.ndarray:
    a = spd_matrix(rng, N)
    a[0, 1] = a[1, 0] = 100.0
    return a


def test_pivoted_cholesky_refuses_an_indefinite_matrix_with_positive_diagonal(backend, rng):
    """Negative residual diagonals were clamped to 0: residual_trace 0 for a factor 1972 away from A."""
    a = backend.asarray(indefinite_with_positive_diagonal(rng))
    with pytest.raises(lg.NotPositiveDefiniteError, match="not positive semi-definite .* residual diagonal at index"):
        lg.pivoted_cholesky(a, N)
    with pytest.raises(lg.NotPositiveDefiniteError, match="not positive semi-definite"):
        lg.pivoted_cholesky_preconditioner(a, N)


def test_pivoted_cholesky_beyond_the_rank_of_a_psd_matrix_is_not_refused(backend, rng, dtype):
    """The rounding allowance: pivots on the rounding noise of a rank-7 PSD matrix stay within it."""
    j = rng.standard_normal((40, 7))
    a = (j @ j.T).astype(dtype)
    result = lg.pivoted_cholesky(backend.asarray(a), 20)
    lower = backend.to_numpy(result.factor)
    np.testing.assert_allclose(lower @ lower.T, a.astype(np.float64), atol=tolerance(dtype, 1e3) * np.abs(a).max())


@pytest.mark.parametrize("matrix", ["zero", "negative definite"])
def test_nystrom_refuses_matrices_without_positive_spectrum(backend, rng, matrix):
    a = np.zeros((N, N)) if matrix == "zero" else -spd_matrix(rng, N)
    with pytest.raises(lg.NotPositiveDefiniteError, match="Nyström core .* is not positive definite"):
        lg.nystrom_preconditioner(backend.asarray(a), 4)


# ----- A6: symmetry of dense inputs -------------------------------------------------------------------------------

@pytest.mark.parametrize("call", ["logdet_slq", "lanczos", "lanczos_eigsh", "pivoted_cholesky", "nystrom"])
def test_dense_inputs_must_be_symmetric(backend, rng, call):
    """Cholesky refused a non-symmetric A; SLQ, Lanczos and the preconditioners returned numbers for it."""
    a = backend.asarray(nonsymmetric(rng))
    calls = {"logdet_slq": lambda: lg.logdet(a, method="slq"), "lanczos": lambda: lg.lanczos(a, 4),
             "lanczos_eigsh": lambda: lg.lanczos_eigsh(a, 2), "pivoted_cholesky": lambda: lg.pivoted_cholesky(a, N),
             "nystrom": lambda: lg.nystrom_preconditioner(a, 3)}
    with pytest.raises(lg.ValueRangeError, match=r"A \(12 × 12, float64\) is not symmetric: max \|A − Aᵀ\| = 1"):
        calls[call]()


# ----- C: error classes -------------------------------------------------------------------------------------------

def seeded_calls(rng) -> dict:
    a = spd_matrix(rng, N)
    J = blocks(lg.get_backend("numpy"), rng.standard_normal((12, 6)), rng.standard_normal((4, 3)))
    return {
        "logdet": lambda seed: lg.logdet(a, method="slq", seed=seed),
        "lanczos": lambda seed: lg.lanczos(a, 3, seed=seed),
        "lanczos_eigsh": lambda seed: lg.lanczos_eigsh(a, 2, seed=seed),
        "nystrom": lambda seed: lg.nystrom_preconditioner(a, 3, seed=seed),
        "fisher_lowrank": lambda seed: lg.fisher_lowrank(J, "categorical", 2, seed=seed),
        "fisher_lowrank_randomized": lambda seed: lg.fisher_lowrank(J, "categorical", 2, method="randomized",
                                                                    seed=seed),
        "kernel_lowrank": lambda seed: lg.kernel_lowrank(J, 2, seed=seed),
        "kernel_lowrank_randomized": lambda seed: lg.kernel_lowrank(J, 2, method="randomized", seed=seed),
    }


@pytest.mark.parametrize("name", sorted(seeded_calls(np.random.default_rng(0))))
def test_seeds_are_checked(rng, name):
    call = seeded_calls(rng)[name]
    with pytest.raises(lg.ValueRangeError, match=r"seed must lie in \[0, inf\], got -1"):
        call(-1)
    with pytest.raises(lg.ArgumentTypeError, match="seed must be an integer, got float 1.5"):
        call(1.5)
    call(np.int64(3))  # NumPy integers are integers


def test_empty_systems_raise_shape_errors(backend):
    for call in (lambda: lg.cg(backend.asarray(np.zeros((0, 0))), backend.asarray(np.zeros(0))),
                 lambda: lg.cg(backend.asarray(np.zeros((0, 0))), backend.asarray(np.zeros((0, 2))))):
        with pytest.raises(lg.ShapeError, match=r"A has shape \(0, 0\): CG needs"):
            call()
    for method in ("cholesky", "slq", "auto"):
        with pytest.raises(lg.ShapeError, match=r"A has shape \(0, 0\): log det needs"):
            lg.logdet(backend.asarray(np.zeros((0, 0))), method=method)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"callback": 3}, lg.ArgumentTypeError, "callback must be callable or None, got int 3"),
    ({"warn": 1}, lg.ArgumentTypeError, "warn must be True or False, got int 1"),
    ({"return_history": "x"}, lg.ArgumentTypeError, "return_history must be True or False"),
    ({"return_tridiagonal": None}, lg.ArgumentTypeError, "return_tridiagonal must be True or False"),
    ({"M": np.eye(N, dtype=np.float32)}, lg.DTypeError, "M has dtype float32 but A and B have dtype float64"),
    ({"M": np.eye(N + 1)}, lg.ShapeError, r"M has shape \(13, 13\); expected \(12, 12\)"),
])
def test_cg_options_are_checked(rng, kwargs, error, message):
    with pytest.raises(error, match=message):
        lg.cg(spd_matrix(rng, N), rng.standard_normal(N), **kwargs)


def test_cg_callback_still_runs(rng):
    seen = []
    lg.cg(spd_matrix(rng, N), rng.standard_normal(N), callback=lambda it, norms: seen.append(it))
    assert seen and seen == sorted(seen)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"compute_dtype": "x"}, lg.DTypeError, "compute_dtype must be float32 or float64, got 'x'"),
    ({"compute_dtype": int}, lg.DTypeError, "compute_dtype must be float32 or float64, got int64"),
    ({"warn": "no"}, lg.ArgumentTypeError, "warn must be True or False, got str 'no'"),
    ({"overwrite_a": 1}, lg.ArgumentTypeError, "overwrite_a must be True or False"),
])
def test_safe_cholesky_options_are_checked(rng, kwargs, error, message):
    with pytest.raises(error, match=message):
        lg.safe_cholesky(spd_matrix(rng, N), **kwargs)


def test_dense_operators_are_checked_and_take_backend_names(backend, rng):
    a = spd_matrix(rng, N)
    x = rng.standard_normal(N)
    from_list = lg.DenseOperator(a.tolist(), "numpy")  # a list is read as float64 on the named backend
    np.testing.assert_allclose(from_list.matmat(x), a @ x, rtol=tolerance(np.float64, 10))
    by_name = lg.DenseOperator(backend.asarray(a), backend.name)
    assert_matches(by_name.matmat(backend.asarray(x)), a @ x, backend, dtype=np.float64, rtol=tolerance(np.float64, 10))
    assert lg.as_operator(backend.asarray(a), backend=backend.name).backend.name == backend.name
    bad = a.copy()
    bad[3, 4] = np.nan
    with pytest.raises(lg.NonFiniteError, match=r"matrix .* holds 1 NaN .* at index \(3, 4\)"):
        lg.DenseOperator(backend.asarray(bad), backend)
    with pytest.raises(lg.DTypeError, match="matrix has dtype int64"):
        lg.DenseOperator(backend.asarray(np.eye(N, dtype=np.int64)), backend)
    with pytest.raises(lg.ArgumentTypeError, match="backend must be a Backend or a backend name"):
        lg.DenseOperator(a, 3)
    with pytest.raises(lg.InvalidOptionError):
        lg.as_operator(a, backend="nummpy")


# ----- D8: Gaussian curvature in float32 --------------------------------------------------------------------------

@pytest.mark.parametrize("noise, method, what", [
    (1e-80, "sqrt_curvature", "1/σ"), (1e80, "sqrt_curvature", "1/σ"), (1e-40, "curvature", "1/σ²"),
    ([1.0, 1e-80], "sqrt_curvature", "1/σ"),
])
def test_gaussian_curvature_out_of_float32_range_raises(backend, noise, method, what):
    """1/√σ² was cast to float32 silently: Inf (or 0) curvature for σ² beyond float32's range."""
    f = backend.asarray(np.zeros((3, 2), np.float32))
    with pytest.raises(lg.ValueRangeError, match=f"gives {what} = .* outside the normal range .* float32"):
        getattr(lg.GaussianLikelihood(noise), method)(f)


def test_gaussian_curvature_in_float64_matches_the_closed_form(backend):
    f = backend.asarray(np.zeros((3, 2)))
    lik = lg.GaussianLikelihood(1e-80)
    assert_matches(lik.sqrt_curvature(f), np.full((3, 2), 1e40), backend, dtype=np.float64)
    assert_matches(lik.curvature(f), np.broadcast_to(np.diag([1e80, 1e80]), (3, 2, 2)).copy(), backend,
                   dtype=np.float64)


def test_fisher_with_float32_jacobian_and_tiny_noise_raises(backend, rng):
    J = blocks(backend, rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal((3, 2)).astype(np.float32))
    with pytest.raises(lg.ValueRangeError, match="noise σ² = 1e-80 gives 1/σ = 1e\\+40"):
        lg.fisher(J, lg.GaussianLikelihood(1e-80))
