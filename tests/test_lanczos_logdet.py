"""Lanczos, top eigenpairs, log-determinants and safe Cholesky against float64 dense oracles."""
from __future__ import annotations

import numpy as np
import pytest

import lingp_core as lg
from tests.helpers import assert_matches, spd_matrix, spd_with_outliers, tolerance

N = 80


def test_lanczos_full_reorthogonalization_keeps_q_orthonormal(backend, rng):
    a = spd_matrix(rng, N, 1e6)
    result = lg.lanczos(backend.asarray(a), 40)
    q = backend.to_numpy(result.Q)
    assert result.Q.shape == (N, 40) and result.Q.dtype == np.float64 and not result.breakdown
    assert np.abs(q.T @ q - np.eye(40)).max() <= 1e-8
    t = np.diag(backend.to_numpy(result.alpha)) + np.diag(backend.to_numpy(result.beta), 1) + \
        np.diag(backend.to_numpy(result.beta), -1)
    np.testing.assert_allclose(q.T @ a @ q, t, atol=1e-8 * np.abs(a).max())


def test_lanczos_float32(backend, rng):
    a = spd_matrix(rng, N, 1e2).astype(np.float32)
    result = lg.lanczos(backend.asarray(a), 20)
    q = backend.to_numpy(result.Q).astype(np.float64)
    assert result.Q.dtype == np.float32 and result.alpha.dtype == np.float64
    assert np.abs(q.T @ q - np.eye(20)).max() <= tolerance(np.float32, 100)


def test_lanczos_without_reorthogonalization_is_the_three_term_recurrence(backend, rng):
    a = spd_matrix(rng, N, 10.0)
    v0 = rng.standard_normal(N)
    full = lg.lanczos(backend.asarray(a), 8, v0=backend.asarray(v0))
    plain = lg.lanczos(backend.asarray(a), 8, v0=backend.asarray(v0), reorthogonalize="none")
    assert_matches(plain.alpha, backend.to_numpy(full.alpha), backend, dtype=np.float64, rtol=1e-10)


def test_lanczos_stops_when_the_krylov_space_is_exhausted(backend, rng):
    q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    a = (q * np.repeat([1.0, 2.0, 5.0], [30, 30, 20])) @ q.T  # three distinct eigenvalues
    result = lg.lanczos(backend.asarray(a), 10)
    assert result.breakdown and result.Q.shape == (N, 3)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(np.diag(backend.to_numpy(result.alpha)) +
                                                          np.diag(backend.to_numpy(result.beta), 1) +
                                                          np.diag(backend.to_numpy(result.beta), -1))),
                               [1.0, 2.0, 5.0], rtol=1e-10)


def test_lanczos_eigsh_matches_eigh(backend, rng):
    q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    values = np.concatenate([100.0 * 0.5 ** np.arange(10), 0.01 * rng.random(N - 10)])
    a = (q * values) @ q.T
    result = lg.lanczos_eigsh(backend.asarray(a), 6)
    expected = np.sort(values)[::-1][:6]
    assert_matches(result.values, expected, backend, dtype=np.float64, rtol=1e-10)
    vectors = backend.to_numpy(result.vectors)
    np.testing.assert_allclose(a @ vectors, vectors * expected, atol=1e-8 * expected[0])
    assert np.all(backend.to_numpy(result.residual_norms) <= 1e-8 * expected[0])


def _repeated_spectrum_matrix(kind, rng):
    """(A, k): float64 symmetric matrices whose top k eigenvalues repeat, for lanczos_eigsh."""
    if kind in ("diagonal", "rotated"):
        a = np.diag([5.0, 5.0, 5.0, 1.0, 1.0, 0.5])
        if kind == "rotated":
            q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
            a = q @ a @ q.T
        return (a + a.T) / 2, 3
    n = 80  # a cluster: a double eigenvalue and two neighbours 1e-9 away, among a random spectrum
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    values = np.concatenate([[10.0, 7.0, 7.0, 7.0 + 1e-9, 7.0 - 1e-9, 3.0], rng.random(n - 6)])
    a = (q * values) @ q.T
    return (a + a.T) / 2, 6


@pytest.mark.parametrize("kind", ["diagonal", "rotated", "cluster"])
def test_lanczos_eigsh_counts_repeated_eigenvalues(backend, rng, dtype, kind):
    """One Krylov space holds one direction per eigenspace: diag(5, 5, 5, 1, 1, 0.5) once gave [5, 1, 0.5] with zero
    residuals. Values must match eigh with multiplicity, vectors be orthonormal, residuals be the true ones."""
    a, k = _repeated_spectrum_matrix(kind, rng)
    a_dtype = a.astype(dtype)
    a = a_dtype.astype(np.float64)  # the matrix the solver sees
    result = lg.lanczos_eigsh(backend.asarray(a_dtype), k)
    expected = np.linalg.eigvalsh(a)[::-1][:k]
    scale = np.abs(expected).max()
    tol = np.sqrt(np.finfo(dtype).eps)  # lanczos_eigsh's default convergence tolerance, relative to max |λ|
    assert result.values.dtype == np.float64 and result.vectors.dtype == dtype and result.vectors.shape == (len(a), k)
    assert result.converged.all() and result.runs >= 1
    values = backend.to_numpy(result.values)
    # a converged pair's value lies within its residual of an eigenvalue; rounding of A in dtype adds eps·‖A‖
    np.testing.assert_allclose(values, expected, rtol=0, atol=(tol + tolerance(dtype, 10)) * scale)
    vectors = backend.to_numpy(result.vectors).astype(np.float64)
    assert np.abs(vectors.T @ vectors - np.eye(k)).max() <= tolerance(dtype, 100 * k)
    true = np.linalg.norm(a @ vectors - vectors * values, axis=0)
    assert np.all(true <= tol * scale + tolerance(dtype, 10) * scale)
    rounding = np.sqrt(len(a)) * np.finfo(dtype).eps * scale  # of A v − λ v evaluated in dtype
    np.testing.assert_allclose(backend.to_numpy(result.residual_norms), true, rtol=0, atol=10 * rounding)


def test_lanczos_eigsh_flags_pairs_that_did_not_converge(backend, rng):
    """Too few steps for a flat spectrum: the pairs come back with their true residuals and converged False."""
    n = 200
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = (q * np.linspace(1.0, 2.0, n)) @ q.T
    result = lg.lanczos_eigsh(backend.asarray(a), 3, steps=6)
    vectors = backend.to_numpy(result.vectors)
    values = backend.to_numpy(result.values)
    true = np.linalg.norm(a @ vectors - vectors * values, axis=0)
    np.testing.assert_allclose(backend.to_numpy(result.residual_norms), true, rtol=1e-6, atol=1e-14)
    assert np.array_equal(result.converged, true <= np.sqrt(np.finfo(np.float64).eps) * np.abs(values).max())
    assert not result.converged.all()


def test_lanczos_bad_inputs(backend, rng):
    a = backend.asarray(spd_matrix(rng, 10))
    with pytest.raises(lg.ValueRangeError, match=r"k must lie in \[1, 10\], got 11"):
        lg.lanczos(a, 11)
    with pytest.raises(ValueError, match="reorthogonalize must be one of 'full', 'none'"):
        lg.lanczos(a, 3, reorthogonalize="partial")
    with pytest.raises(lg.ShapeError, match=r"v0 has shape \(9,\); expected \(10,\)"):
        lg.lanczos(a, 3, v0=a[0, :9])


def test_exact_logdet_matches_slogdet(backend, rng, dtype):
    a = spd_matrix(rng, N, 1e3)
    result = lg.logdet(backend.asarray(a.astype(dtype)))
    sign, expected = np.linalg.slogdet(a.astype(dtype).astype(np.float64))
    assert sign == 1 and result.method == "cholesky" and result.std_error == 0.0
    assert abs(result.logdet - expected) <= tolerance(np.float64, 1e3) * N * np.log(1e3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slq_logdet_is_within_three_standard_errors(backend, rng, seed):
    a = spd_with_outliers(rng, 200, 1e4)
    _, expected = np.linalg.slogdet(a)
    result = lg.logdet(backend.asarray(a), method="slq", num_probes=40, lanczos_steps=30, seed=seed)
    assert result.method == "slq" and result.probe_estimates.shape == (40,)
    assert result.std_error > 0
    assert abs(result.logdet - expected) <= 3 * result.std_error


def _narrow_spectrum_matrix(rng, n=50):
    """SPD with eigenvalues log-spaced in [100, 200]: log det ≈ 5·n, but the probes vary little (log A is close to a
    multiple of I), so SLQ's standard error (~0.4 with 30 probes) is small against a bias of log det / n."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.logspace(2.0, np.log10(200.0), n)) @ q.T


@pytest.mark.parametrize("seed", range(5))
def test_slq_logdet_matches_slogdet_within_its_standard_error(backend, rng, seed):
    a = _narrow_spectrum_matrix(rng)
    sign, expected = np.linalg.slogdet(a)
    result = lg.logdet(backend.asarray(a), method="slq", num_probes=30, lanczos_steps=20, seed=seed)
    assert sign == 1 and result.method == "slq" and result.std_error > 0
    # a Rademacher probe's variance is 2·Σ_{i≠j} (log A)_ij²: the error bar must be of that size, not just positive
    w, u = np.linalg.eigh(a)
    log_a = (u * np.log(w)) @ u.T
    probe_std = np.sqrt(2 * (np.sum(log_a**2) - np.sum(np.diag(log_a) ** 2)))
    assert 0.5 * probe_std / np.sqrt(30) <= result.std_error <= 2 * probe_std / np.sqrt(30)
    assert abs(result.logdet - expected) <= 4 * result.std_error


def test_slq_standard_error_matches_the_spread_over_seeds(backend, rng):
    """The reported standard error against the estimates' own spread over 20 seeds, and their mean against
    slogdet: a standard error not divided by sqrt(num_probes) is ~5× too large, a bias of log det / n shows."""
    a = _narrow_spectrum_matrix(rng)
    _, expected = np.linalg.slogdet(a)
    runs = [lg.logdet(backend.asarray(a), method="slq", num_probes=30, lanczos_steps=20, seed=s) for s in range(20)]
    estimates = np.array([r.logdet for r in runs])
    std_errors = np.array([r.std_error for r in runs])
    spread = estimates.std(ddof=1)
    assert 0.5 <= spread / std_errors.mean() <= 2.0, (spread, std_errors.mean())
    assert abs(estimates.mean() - expected) <= 4 * std_errors.mean() / np.sqrt(len(runs))


def test_slq_is_reproducible_and_runs_on_operators(backend, rng):
    a = spd_matrix(rng, 60, 1e2)
    op = lg.AddedDiagonalOperator(lg.as_operator(backend.asarray(a)), 0.5)
    first = lg.logdet(op, num_probes=10, seed=7)
    second = lg.logdet(op, num_probes=10, seed=7)
    assert first.method == "slq" and first.logdet == second.logdet
    _, expected = np.linalg.slogdet(a + 0.5 * np.eye(60))
    assert abs(first.logdet - expected) <= 4 * first.std_error
    exact = lg.logdet(op, method="cholesky")
    assert abs(exact.logdet - expected) <= 1e-9 * abs(expected)


def test_slq_on_an_indefinite_matrix_raises(backend, rng):
    a = spd_matrix(rng, 40) - 10.0 * np.eye(40)
    with pytest.raises(lg.NotPositiveDefiniteError, match="Ritz value"):
        lg.logdet(backend.asarray(a), method="slq", num_probes=4)


def test_safe_cholesky_of_a_pd_matrix_adds_nothing(backend, rng, dtype):
    a = spd_matrix(rng, N, 1e3).astype(dtype)
    result = lg.safe_cholesky(backend.asarray(a))
    assert result.jitter == 0.0 and result.tries == 1
    assert result.factor.dtype == np.float64  # float64 factorization even for float32 input
    lower = backend.to_numpy(result.factor)
    np.testing.assert_allclose(lower @ lower.T, a.astype(np.float64), atol=tolerance(np.float64) * np.abs(a).max())
    assert np.all(np.triu(lower, 1) == 0)


def test_safe_cholesky_of_a_singular_matrix_adds_reported_jitter(backend, rng):
    j = rng.standard_normal((N, 10))
    a = j @ j.T  # rank 10: not positive definite
    with pytest.warns(lg.NumericalWarning, match=r"added jitter .* of the mean diagonal"):
        result = lg.safe_cholesky(backend.asarray(a))
    assert result.jitter > 0 and result.tries > 1
    lower = backend.to_numpy(result.factor)
    np.testing.assert_allclose(lower @ lower.T, a + result.jitter * np.eye(N), atol=1e-10 * np.abs(a).max())


def test_safe_cholesky_overwrite_a_factors_in_place_and_still_retries_with_jitter(backend, rng):
    """overwrite_a: the first attempt may use A's memory (NumPy); after a failed attempt the jittered retries start
    from the unchanged A, so the factor is that of A + jitter·I."""
    a = spd_matrix(rng, N, 1e3)
    result = lg.safe_cholesky(backend.asarray(a.copy()), overwrite_a=True)
    lower = backend.to_numpy(result.factor)
    np.testing.assert_allclose(lower @ lower.T, a, atol=tolerance(np.float64) * np.abs(a).max())
    j = rng.standard_normal((N, 10))
    singular = j @ j.T
    with pytest.warns(lg.NumericalWarning, match="added jitter"):
        result = lg.safe_cholesky(backend.asarray(singular.copy()), overwrite_a=True)
    lower = backend.to_numpy(result.factor)
    np.testing.assert_allclose(lower @ lower.T, singular + result.jitter * np.eye(N),
                               atol=1e-10 * np.abs(singular).max())


def test_safe_cholesky_rejects_indefinite_and_asymmetric(backend, rng):
    a = spd_matrix(rng, 20)
    with pytest.raises(lg.NotPositiveDefiniteError, match="not positive definite even with jitter"):
        lg.safe_cholesky(backend.asarray(a - 5.0 * np.eye(20)))  # eigenvalues from −4 to 95
    asym = a.copy()
    asym[0, 1] += 1.0
    with pytest.raises(lg.ValueRangeError, match="not symmetric"):
        lg.safe_cholesky(backend.asarray(asym))
    with pytest.raises(lg.ShapeError, match="square"):
        lg.safe_cholesky(backend.asarray(a[:, :5]))


def _upper_source(rng, n, dtype=np.float64):
    """(S, source): a symmetric S and an array holding S's strict upper triangle above unrelated numbers."""
    S = spd_matrix(rng, n, 1e3).astype(dtype)
    S = np.triu(S) + np.triu(S, 1).T
    return S, (np.triu(S, 1) + np.tril(rng.standard_normal((n, n)))).astype(dtype)


@pytest.mark.parametrize("in_place", [True, False])
def test_cholesky_from_upper_factors_scale_times_s_plus_a_diagonal(backend, rng, monkeypatch, in_place):
    """A = scale·S off the diagonal, ``diagonal`` on it, from S's strict upper triangle alone. In place the factor is
    the source's lower triangle and S's strict upper triangle survives bit for bit. Tiles of 7 rows make the mirror
    cross tile edges."""
    from backends import _triangles

    monkeypatch.setattr(_triangles, "TILE", 7)
    S, source = _upper_source(rng, N)
    scale, diagonal = 0.37, 0.37 * np.diag(S) + rng.uniform(0.1, 1.0, N)
    A = scale * S
    A[np.diag_indices(N)] = diagonal
    src = backend.asarray(source.copy())
    result = lg.cholesky_from_upper(src, backend.asarray(diagonal), scale=scale, out=src if in_place else None)
    assert result.jitter == 0.0 and result.tries == 1 and result.factor.dtype == np.float64
    lower = np.tril(backend.to_numpy(result.factor))
    np.testing.assert_allclose(lower, np.linalg.cholesky(A), rtol=0, atol=1e-12 * np.abs(A).max())
    after = backend.to_numpy(src)
    assert np.array_equal(np.triu(after, 1), np.triu(source, 1))
    if not in_place:
        assert np.array_equal(after, source)  # the source is only read


def test_cholesky_from_upper_of_a_float32_source_multiplies_in_float64(backend, rng):
    S, source = _upper_source(rng, N, np.float32)
    scale = 1.0 / 3.0  # not a power of two: a float32 product would round differently
    diagonal = np.diag(S).astype(np.float64) * scale + 0.5
    A = S.astype(np.float64) * scale
    A[np.diag_indices(N)] = diagonal
    result = lg.cholesky_from_upper(backend.asarray(source), backend.asarray(diagonal), scale=scale)
    lower = np.tril(backend.to_numpy(result.factor))
    np.testing.assert_allclose(lower, np.linalg.cholesky(A), rtol=0, atol=1e-13 * np.abs(A).max())


def test_cholesky_from_upper_retries_with_jitter_from_the_kept_triangle(backend, rng):
    j = rng.standard_normal((N, 10))
    S = j @ j.T  # rank 10
    S = np.triu(S) + np.triu(S, 1).T
    src = backend.asarray(S.copy())
    with pytest.warns(lg.NumericalWarning, match="cholesky_from_upper: .*added jitter"):
        result = lg.cholesky_from_upper(src, backend.asarray(np.diag(S).copy()), out=src)
    assert result.jitter > 0 and result.tries > 1
    lower = np.tril(backend.to_numpy(result.factor))
    np.testing.assert_allclose(lower @ lower.T, S + result.jitter * np.eye(N), atol=1e-10 * np.abs(S).max())
    assert np.array_equal(np.triu(backend.to_numpy(src), 1), np.triu(S, 1))


def test_cholesky_from_upper_factors_a_filled_matrix_where_it_lies(backend, rng):
    j = rng.standard_normal((N, N + 3))
    S = j @ j.T
    S = np.triu(S) + np.triu(S, 1).T  # exactly symmetric, as lower_filled requires
    filled = backend.asarray(S.copy())
    result = lg.cholesky_from_upper(filled, backend.asarray(np.diag(S).copy()), out=filled, lower_filled=True)
    assert result.factor is filled and result.tries == 1
    np.testing.assert_allclose(np.tril(backend.to_numpy(filled)), np.linalg.cholesky(S), rtol=1e-10,
                               atol=1e-12 * np.abs(S).max())
    assert np.array_equal(np.triu(backend.to_numpy(filled), 1), np.triu(S, 1))  # S kept for a retry
    with pytest.raises(lg.InvalidOptionError, match="out=source"):
        lg.cholesky_from_upper(backend.asarray(S), backend.asarray(np.diag(S).copy()), lower_filled=True)


def test_cholesky_from_upper_errors(backend, rng):
    S, source = _upper_source(rng, 20)
    d = np.diag(S).copy()
    with pytest.raises(lg.NotPositiveDefiniteError, match="not positive definite even with jitter"):
        lg.cholesky_from_upper(backend.asarray(source), backend.asarray(d - 5.0))
    bad = source.copy()
    bad[3, 11] = np.nan
    with pytest.raises(lg.NonFiniteError, match="NaN or Inf"):
        lg.cholesky_from_upper(backend.asarray(bad), backend.asarray(d))
    with pytest.raises(lg.ShapeError, match="diagonal"):
        lg.cholesky_from_upper(backend.asarray(source), backend.asarray(d[:5]))
    with pytest.raises(lg.DTypeError, match="out"):
        lg.cholesky_from_upper(backend.asarray(source), backend.asarray(d), out=backend.asarray(source, np.float32))
    with pytest.raises(lg.ValueRangeError, match="C-ordered"):
        fortran = backend.asarray(np.asfortranarray(source))
        lg.cholesky_from_upper(backend.asarray(source), backend.asarray(d), out=fortran)
    with pytest.raises(lg.ValueRangeError, match="scale"):
        lg.cholesky_from_upper(backend.asarray(source), backend.asarray(d), scale=0.0)


def test_cholesky_from_upper_names_a_nan_after_one_failed_attempt(rng, monkeypatch):
    """Where LAPACK stops on a NaN (reference potrf does), the first failure checks the matrix, in tiles of 7 rows,
    and names the NaN instead of retrying with jitter."""
    from backends import _triangles

    monkeypatch.setattr(_triangles, "TILE", 7)
    be = lg.get_backend("numpy")
    attempts = []

    def failing(a):
        attempts.append(1)
        raise np.linalg.LinAlgError("potrf info = 3")

    monkeypatch.setattr(be, "cholesky_lower_in_place", failing)
    S, source = _upper_source(rng, 20)
    source[11, 17] = np.nan  # in the third tile of rows
    with pytest.raises(lg.NonFiniteError, match="NaN or Inf"):
        lg.cholesky_from_upper(source, np.diag(S).copy())
    assert len(attempts) == 1
    source[11, 17] = S[11, 17]
    with pytest.raises(lg.NotPositiveDefiniteError):  # finite: the jitter retries run, then it gives up
        lg.cholesky_from_upper(source, np.diag(S).copy(), max_tries=2)
    assert len(attempts) == 1 + 3


@pytest.mark.parametrize("where", [(17, 2), (2, 17), (9, 15)])
def test_safe_cholesky_symmetry_check_covers_every_tile(backend, rng, monkeypatch, where):
    from backends import _triangles

    monkeypatch.setattr(_triangles, "TILE", 4)  # 20 × 20: a 5 × 5 grid of tiles
    a = spd_matrix(rng, 20, 10.0)
    a[where] += 1e-3
    with pytest.raises(lg.ValueRangeError, match=r"not symmetric: max \|A − Aᵀ\| = 0.001"):
        lg.safe_cholesky(backend.asarray(a))


def _log_spaced_spd(rng, n, low, high, zero_first=None):
    """SPD (n, n) with eigenvalues log-spaced in [10^low, 10^high] (the smallest replaced by ``zero_first`` when
    given), and the exact log det from those eigenvalues (the independent oracle)."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = np.logspace(low, high, n)
    if zero_first is not None:
        w[0] = zero_first
    a = (q * w) @ q.T
    return (a + a.T) / 2, float(np.sum(np.log(w))) if w.min() > 0 else None


@pytest.mark.parametrize("low, high, steps", [(-4, 2, None), (-6, 2, None), (-6, 2, 10), (-6, 2, 5), (-3, 3, 3)])
def test_slq_standard_error_covers_the_quadrature_truncation(backend, rng, low, high, steps):
    """On ill-conditioned spectra m Gauss nodes miss the small eigenvalues: the estimate was 5–70 standard errors
    off (the probes' spread alone); the truncation estimate now enters std_error, and a warning says it dominates."""
    a, expected = _log_spaced_spd(rng, 200, low, high)
    with pytest.warns(lg.ConvergenceWarning, match="lanczos_steps"):
        result = lg.logdet(backend.asarray(a), method="slq", num_probes=30, lanczos_steps=steps)
    probe_error = result.probe_estimates.std(ddof=1) / np.sqrt(30)
    assert result.truncation_error > probe_error
    assert result.std_error == pytest.approx(np.hypot(probe_error, result.truncation_error), rel=1e-12)
    assert abs(result.logdet - expected) <= 3 * result.std_error, (result.logdet, expected, result.std_error)


def test_slq_truncation_error_vanishes_with_a_full_krylov_space(backend, rng):
    """n steps: Gauss quadrature is exact, so the error is the probes' alone (and the estimate as good as it was)."""
    a, expected = _log_spaced_spd(rng, 60, -4, 2)
    result = lg.logdet(backend.asarray(a), method="slq", num_probes=30, lanczos_steps=60)
    assert result.truncation_error == 0.0
    assert result.std_error == pytest.approx(result.probe_estimates.std(ddof=1) / np.sqrt(30), rel=1e-12)
    assert abs(result.logdet - expected) <= 3 * result.std_error


@pytest.mark.parametrize("smallest", [0.0, -1e-6])
def test_slq_of_a_singular_or_slightly_indefinite_matrix_raises(backend, smallest):
    """An eigenvalue 0 or -1e-6 next to 1e-2..1e2: SLQ returned 2.5 ± 10.3 silently. With a Krylov space that
    reaches it, a Ritz value at or below rounding level of the largest says A is not positive definite."""
    for seed in range(20):  # rounding gives a zero eigenvalue's Ritz value either sign: θ ≤ 0 missed 3 of these 20
        a, _ = _log_spaced_spd(np.random.default_rng(seed), 60, -2, 2, zero_first=smallest)
        with pytest.raises(lg.NotPositiveDefiniteError, match="Ritz value"):
            lg.logdet(backend.asarray(a), method="slq", num_probes=4, lanczos_steps=60, seed=seed)


def test_slq_needs_two_steps_to_estimate_its_truncation(rng):
    a = spd_matrix(rng, 10)
    with pytest.raises(lg.ValueRangeError, match="lanczos_steps"):
        lg.logdet(a, method="slq", lanczos_steps=1)
    one = lg.logdet(np.array([[3.0]]), method="slq", lanczos_steps=1)  # n = 1: one step is the whole space
    assert one.logdet == pytest.approx(np.log(3.0), rel=1e-14) and one.truncation_error == 0.0
