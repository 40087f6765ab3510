"""LinearizedGP against the float64 dense formulas of DESIGN.md, written out here from a torch.func.jacrev Jacobian.

Oracle: K = s·J Jᵀ per output mode, C = K + diag(noise), α = C⁻¹ r, mean* = m* + s·J* Jᵀ α,
var* = diag(s·J* J*ᵀ − s² J* Jᵀ C⁻¹ J J*ᵀ), log p(y) = log N(r | 0, C) by scipy.stats.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.stats
import torch

nn = torch.nn

import lingp_core as lg  # noqa: E402
from lingp_core import _posterior as post  # noqa: E402
from tests.helpers import assert_matches, data_pointer  # noqa: E402
from tests.test_export import mlp, on_backend, oracle  # noqa: E402

EXACT = ("function-cholesky", "function-spectral", "parameter-cholesky", "parameter-spectral")
RTOL = 1e-9  # exact float64 paths: a few thousand eps of conditioning (noise ≥ 0.05, kernels of order 1)
N, N_STAR = 14, 6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def problem(backend, rng, c=2, widths=None):
    """A small tanh MLP, training/test inputs, targets; J, J* on the backend and float64 oracle Jacobians."""
    model = mlp(nn.Tanh, widths or (3, 8, 8, c))
    x = torch.randn(N, 3, dtype=torch.float64)
    xs = torch.randn(N_STAR, 3, dtype=torch.float64)
    J64, f64 = oracle(model, x)
    Js64, fs64 = oracle(model, xs)
    y = f64 + 0.5 * rng.standard_normal(f64.shape)
    m, xb = on_backend(model, x, backend)
    _, xsb = on_backend(model, xs, backend)
    return (lg.export_jacobian(m, xb, backend=backend.name), lg.export_jacobian(m, xsb, backend=backend.name),
            backend.asarray(y), dict(J=J64, f=f64, Js=Js64, fs=fs64, y=y))


def dense_posterior(o, s, noise, mode, mean="network"):
    """Mean (n*, c), variances (n*, c), covariance, log marginal likelihood from the dense formulas."""
    J, Js, y = o["J"], o["Js"], o["y"]
    n, c = y.shape
    prior = {"network": (o["f"], o["fs"]), "zero": (0 * o["f"], 0 * o["fs"]),
             "constant": (np.broadcast_to(y.mean(0), y.shape), np.broadcast_to(y.mean(0), o["fs"].shape))}[mean]
    r = y - prior[0]
    noise = np.broadcast_to(np.asarray(noise, dtype=float), (c,))
    rows = lambda A, k: A.reshape(-1, c, A.shape[1])[:, k, :]  # noqa: E731  rows of output k
    mean_star, var_star, covs, lml = prior[1].copy(), np.zeros(o["fs"].shape), [], 0.0
    if mode == "full":
        C = s * J @ J.T + np.diag(np.tile(noise, n))
        Ks = s * Js @ J.T
        alpha = np.linalg.solve(C, r.reshape(-1))
        cov = s * Js @ Js.T - Ks @ np.linalg.solve(C, Ks.T)
        mean_star += (Ks @ alpha).reshape(-1, c)
        var_star = np.diag(cov).reshape(-1, c).copy()
        lml = scipy.stats.multivariate_normal(np.zeros(n * c), C).logpdf(r.reshape(-1))
        return mean_star, var_star, cov, lml
    for k in range(c):
        if mode == "independent":
            K, Ks, Kss = (s * rows(A, k) @ rows(B, k).T for A, B in ((J, J), (Js, J), (Js, Js)))
        else:  # trace: the mean over outputs of the per-output kernels
            pairs = ((J, J), (Js, J), (Js, Js))
            K, Ks, Kss = (sum(s * rows(A, j) @ rows(B, j).T for j in range(c)) / c for A, B in pairs)
        C = K + noise[k] * np.eye(n)
        mean_star[:, k] += Ks @ np.linalg.solve(C, r[:, k])
        cov = Kss - Ks @ np.linalg.solve(C, Ks.T)
        var_star[:, k] = np.diag(cov)
        covs.append(cov)
        lml += scipy.stats.multivariate_normal(np.zeros(n), C).logpdf(r[:, k])
    return mean_star, var_star, np.stack(covs), lml


def check_against_dense(gp, Js, o, backend, mode, *, rtol=RTOL, mean="network", lml=True):
    expected = dense_posterior(o, gp.prior_scale, gp.noise, mode, mean)
    mu, var, cov = gp.predict(Js, return_var=True, return_cov=True)
    assert_matches(mu, expected[0], backend, dtype=np.float64, rtol=rtol)
    assert_matches(var, expected[1], backend, dtype=np.float64, rtol=rtol)
    assert_matches(cov, expected[2], backend, dtype=np.float64, rtol=rtol)
    if lml:
        np.testing.assert_allclose(gp.log_marginal_likelihood(), expected[3], rtol=rtol)


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("mode", ["full", "independent", "trace"])
def test_exact_methods_equal_dense_formulas(backend, rng, method, mode):
    J, Js, y, o = problem(backend, rng)
    if mode == "trace" and method.startswith("parameter"):
        with pytest.raises(ValueError, match="trace"):
            lg.LinearizedGP(output_mode=mode, method=method).fit(J, y)
        return
    gp = lg.LinearizedGP(0.7, 0.05, output_mode=mode, method=method).fit(J, y)
    assert gp.plan_.method == method
    check_against_dense(gp, Js, o, backend, mode)


@pytest.mark.parametrize("mean", ["zero", "constant"])
@pytest.mark.parametrize("method", ["function-cholesky", "parameter-spectral"])
def test_prior_means(backend, rng, mean, method):
    J, Js, y, o = problem(backend, rng)
    gp = lg.LinearizedGP(1.3, 0.2, mean=mean, method=method).fit(J, y)
    check_against_dense(gp, Js, o, backend, "full", mean=mean)


def shifted_by_weight_mean(o, m):
    """The oracle problem with the prior mean function moved by J·m (train) and J*·m (test): a prior mean m on
    θ − θ̂ written out densely."""
    c = o["f"].shape[1]
    return dict(o, f=o["f"] + (o["J"] @ m).reshape(-1, c), fs=o["fs"] + (o["Js"] @ m).reshape(-1, c))


@pytest.mark.parametrize("mode,method", [("full", "function-cholesky"), ("full", "parameter-spectral"),
                                         ("trace", "function-spectral"), ("independent", "parameter-cholesky")])
def test_weight_space_prior_mean(backend, rng, mode, method):
    J, Js, y, o = problem(backend, rng)
    m = -0.5 * rng.standard_normal(J.p)  # e.g. −θ̂: the prior on θ itself
    gp = lg.LinearizedGP(0.7, 0.05, output_mode=mode, method=method).fit(J, y, prior_mean=backend.asarray(m))
    check_against_dense(gp, Js, shifted_by_weight_mean(o, m), backend, mode)
    # the evidence optimizer sees the same residuals y − f₀ − J m
    gp.optimize_hyperparameters()
    check_against_dense(gp, Js, shifted_by_weight_mean(o, m), backend, mode)


def test_weight_space_prior_mean_is_checked_and_saved(backend, rng, tmp_path):
    J, Js, y, o = problem(backend, rng)
    m = backend.asarray(rng.standard_normal(J.p))
    gp = lg.LinearizedGP(0.7, 0.05).fit(J, y, prior_mean=m)
    before = gp.predict(Js, return_var=True)
    for bad, error in ((backend.asarray(np.ones(J.p + 1)), lg.ShapeError),
                       (backend.asarray(np.full(J.p, np.nan)), lg.NonFiniteError),
                       (backend.asarray(np.arange(J.p)), lg.DTypeError),
                       (backend.asarray(np.full(J.p, 1e308)), lg.NonFiniteError)):  # J·m overflows float64
        with pytest.raises(error, match="prior_mean"):
            gp.fit(J, y, prior_mean=bad)
    for a, b in zip(gp.predict(Js, return_var=True), before):  # the failed fits left the model as it was
        assert_matches(a, backend.to_numpy(b), backend, dtype=np.float64, rtol=0)
    gp.save(tmp_path / "m.npz")
    loaded = lg.LinearizedGP.load(tmp_path / "m.npz", backend=backend.name)
    for a, b in zip(loaded.predict(Js, return_var=True), before):
        assert_matches(a, backend.to_numpy(b), backend, dtype=np.float64, rtol=1e-15)
    J32 = lg.export_jacobian(*on_backend(mlp(nn.Tanh, (3, 4, 2)), torch.randn(5, 3), backend, dtype=np.float32),
                             backend=backend.name)
    with pytest.raises(lg.ValueRangeError, match="prior_mean reaches 1e.39, beyond the largest float32"):
        lg.LinearizedGP(0.7, 0.05).fit(J32, J32.f0, prior_mean=backend.asarray(np.full(J32.p, 1e39)))
    plain = lg.LinearizedGP(0.7, 0.05).fit(J, y)  # without it: a different model
    assert not np.allclose(backend.to_numpy(plain.predict(Js)), backend.to_numpy(before[0]))


@pytest.mark.parametrize("method", ["function-cholesky", "parameter-cholesky", "iterative"])
@pytest.mark.parametrize("mode", ["full", "independent"])
def test_per_output_noise(backend, rng, method, mode):
    J, Js, y, o = problem(backend, rng)
    gp = lg.LinearizedGP(0.9, np.array([0.05, 0.4]), output_mode=mode, method=method, rtol=1e-12).fit(J, y)
    exact = method != "iterative"
    check_against_dense(gp, Js, o, backend, mode, rtol=RTOL if exact else 1e-7, lml=exact)


def test_function_space_equals_parameter_space_when_p_is_small(backend, rng):
    # a wide dataset and a small net: p = 3·2 + 2 + 2·2 + 2 = 14 < n·c = 28, so auto picks the parameter space
    J, Js, y, o = problem(backend, rng, widths=(3, 2, 2))
    auto = lg.LinearizedGP(0.5, 0.1).fit(J, y)
    assert auto.plan_.method == "parameter-cholesky" and "p = 14 < 28" in auto.plan_.reason
    function = lg.LinearizedGP(0.5, 0.1, method="function-cholesky").fit(J, y)
    for a, b in zip(auto.predict(Js, return_var=True), function.predict(Js, return_var=True)):
        assert_matches(a, backend.to_numpy(b), backend, dtype=np.float64, rtol=RTOL)
    np.testing.assert_allclose(auto.log_marginal_likelihood(), function.log_marginal_likelihood(), rtol=RTOL)
    check_against_dense(auto, Js, o, backend, "full")


@pytest.mark.parametrize("mode", ["full", "independent", "trace"])
def test_iterative_meets_its_tolerance(backend, rng, mode):
    J, Js, y, o = problem(backend, rng)
    gp = lg.LinearizedGP(0.7, 0.05, output_mode=mode, method="iterative", rtol=1e-11).fit(J, y)
    expected = dense_posterior(o, 0.7, 0.05, mode)
    mu, var = gp.predict(Js, return_var=True)
    # CG stops at ‖r‖ ≤ rtol‖b‖; the error of α is at most cond(C) times that, and cond(C) ≤ (λmax + σ²)/σ²
    cond = 1 + 0.7 * np.linalg.norm(o["J"], 2) ** 2 / 0.05
    assert_matches(mu, expected[0], backend, dtype=np.float64, rtol=10 * cond * 1e-11)
    assert_matches(var, expected[1], backend, dtype=np.float64, rtol=10 * cond * 1e-11)
    lml = gp.log_marginal_likelihood()
    assert gp.lml_std_error_ > 0
    assert abs(lml - expected[3]) <= 4 * gp.lml_std_error_ + 1e-8 * abs(expected[3])


def test_the_iterative_evidence_standard_error_is_calibrated_across_tasks(rng):
    # z = (SLQ − exact) / lml_std_error_ over 40 seeds should have spread ≈ 1. With every task probed by the same
    # vectors their errors were alike, and the summed standard error (squares added) too small: spread 1.57 in
    # output_mode "independent" (3 tasks); 1.13 with each task's own probes
    J, _, y, o = problem(lg.get_backend("numpy"), rng, c=3)
    exact = dense_posterior(o, 0.6, 0.07, "independent")[3]
    z = []
    for seed in range(40):
        gp = lg.LinearizedGP(0.6, 0.07, output_mode="independent", method="iterative", seed=seed,
                             num_probes=10).fit(J, y)
        z.append((gp.log_marginal_likelihood() - exact) / gp.lml_std_error_)
    assert 0.7 < np.std(z) < 1.35 and abs(np.mean(z)) < 0.5


def test_an_unconverged_iterative_evidence_says_so_and_its_error_covers_it():
    # 50 Lanczos steps on 400 rows whose spectrum spans 1e-4 to ~1e3: SLQ's quadrature has not converged; the
    # warning speaks of the GP (not of logdet's lanczos_steps, which a GP user cannot set) and lml_std_error_
    # covers the truncation (the probes' spread alone understated it 3–70× on such spectra)
    be = lg.get_backend("numpy")
    rng = np.random.default_rng(0)
    J0 = rng.standard_normal((400, 300)) * np.linspace(0.01, 3, 300)
    J, y = dense_jacobian(be, J0), rng.standard_normal((400, 1))
    gp = lg.LinearizedGP(1.0, 1e-4, method="iterative", preconditioner_rank=5).fit(J, y)
    exact = lg.LinearizedGP(1.0, 1e-4, method="function-cholesky").fit(J, y).log_marginal_likelihood()
    with pytest.warns(lg.ConvergenceWarning, match="iterative log marginal likelihood's log det .* not converged"):
        lml = gp.log_marginal_likelihood()
    assert abs(lml - exact) <= 3 * gp.lml_std_error_


def test_lanczos_variances_are_conservative_and_report_their_error(backend, rng):
    J, Js, y, o = problem(backend, rng)
    expected = dense_posterior(o, 0.7, 0.05, "full")[1]
    full = lg.LinearizedGP(0.7, 0.05, method="iterative", variance_cg_max=0, variance_rank=N * 2, rtol=1e-12)
    _, var = full.fit(J, y).predict(Js, return_var=True)
    assert full.diagnostics_[0]["variance_method"] == "lanczos, energy form"
    assert_matches(var, expected, backend, dtype=np.float64, rtol=1e-7)  # a full Krylov space: exact
    # a rank-4 cache is far off: measured on sampled rows, reported, and every variance recomputed by CG instead
    short = lg.LinearizedGP(0.7, 0.05, method="iterative", variance_cg_max=0, variance_rank=4, rtol=1e-12)
    _, var = short.fit(J, y).predict(Js, return_var=True)
    info = short.diagnostics_[0]
    assert info["lanczos_rank"] == 4 and info["variance_error"] > post.VARIANCE_TOLERANCE
    assert "Lanczos cache was off by" in info["variance_method"]
    assert_matches(var, expected, backend, dtype=np.float64, rtol=1e-7)


def test_a_truncated_lanczos_cache_only_errs_upwards(backend, rng):
    """Q (Qᵀ C Q)⁻¹ Qᵀ ≼ C⁻¹, and the energy form is a minimum at the exact solve: a truncated cache's variances
    are upper bounds (checked on the engine, before the CG fallback)."""
    J, Js, y, o = problem(backend, rng)
    expected = dense_posterior(o, 0.7, 0.05, "full")[1].reshape(-1)
    gp = lg.LinearizedGP(0.7, 0.05, method="iterative", variance_cg_max=0, variance_rank=4, rtol=1e-12).fit(J, y)
    engine = gp._engines[0]
    star = post.StarRows(Js, engine.J, "full", None)
    m_star = Js.n * Js.n_outputs
    cached = backend.to_numpy(engine._energy_variance(0, star, engine._love_solve(0, star.cross.T), np.arange(m_star)))
    assert np.all(cached >= expected - 1e-12) and np.max(cached / expected) > 1 + post.VARIANCE_TOLERANCE


def test_spectral_lml_gradient_matches_finite_differences(rng):
    lam = rng.uniform(0, 3, 7)
    weights, rest = rng.uniform(0, 1, (7, 2)), rng.uniform(0, 1, 2)
    s, noise = 0.8, np.array([0.3, 0.05])
    _, g_s, g_n = post.spectral_lml(lam, weights, rest, 10, s, noise)
    h = 1e-6
    f = lambda s_, n_: post.spectral_lml(lam, weights, rest, 10, s_, n_)[0]  # noqa: E731
    np.testing.assert_allclose(g_s, (f(s * np.exp(h), noise) - f(s * np.exp(-h), noise)) / (2 * h), rtol=1e-6)
    for j in range(2):
        step = np.zeros(2)
        step[j] = h
        fd = (f(s, noise * np.exp(step)) - f(s, noise * np.exp(-step))) / (2 * h)
        np.testing.assert_allclose(g_n[j], fd, rtol=1e-6)


@pytest.mark.parametrize("method,label", [("function-cholesky", "kernel"), ("iterative", "LinearizedGP CG")])
def test_progress_bars_change_nothing_but_stderr(rng, capsys, tmp_path, method, label):
    be = lg.get_backend("numpy")
    J, Js, y, _ = problem(be, rng)
    quiet = lg.LinearizedGP(0.7, 0.05, method=method, rtol=1e-10).fit(J, y)
    assert capsys.readouterr().err == ""
    loud = lg.LinearizedGP(0.7, 0.05, method=method, rtol=1e-10, progress=True).fit(J, y)
    assert label in capsys.readouterr().err
    for a, b in zip(quiet.predict(Js, return_var=True), loud.predict(Js, return_var=True)):
        assert np.array_equal(a, b)
    loud.save(tmp_path / "gp.npz")  # the bar is a display setting, not part of the model
    assert not lg.LinearizedGP.load(tmp_path / "gp.npz").progress


def test_function_cholesky_keeps_the_kernel_through_refits(backend, rng):
    """The first noise group's factor is written over the kernel's own lower triangle while its strict upper triangle
    keeps K0: refits at other hyperparameters, the rebuilt K0 and the saved factors all match the dense formulas.
    Noise columns with different values make two groups (the second factor gets an array of its own)."""
    m = 12
    B = rng.standard_normal((m, 5))
    K0 = np.triu(B @ B.T) + np.triu(B @ B.T, 1).T  # rank 5: only the noise makes s·K0 + D definite
    R = rng.standard_normal((m, 3))
    K0_arr = backend.asarray(K0.copy())
    engine = post.FunctionCholesky(K0_arr, backend)
    for s, noise in ((0.7, np.array([[0.3, 0.3, 0.05]])), (2.0, np.array([[0.1, 0.2, 0.1]]))):
        engine.fit(s, noise, backend.asarray(R))
        lml = 0.0
        for j in range(3):
            C = s * K0 + noise[0, j] * np.eye(m)
            np.testing.assert_allclose(backend.to_numpy(engine.alpha[:, j]), np.linalg.solve(C, R[:, j]), rtol=1e-10)
            lml += scipy.stats.multivariate_normal(np.zeros(m), C).logpdf(R[:, j])
        np.testing.assert_allclose(engine.lml(), lml, rtol=1e-12)
        state = engine.state()
        assert len(engine.groups) == 2
        for g, (_, d) in enumerate(engine.groups):
            expected = np.linalg.cholesky(s * K0 + np.diag(np.broadcast_to(d, (m,))))
            np.testing.assert_allclose(backend.to_numpy(state[f"factor{g}"]), expected, rtol=0, atol=1e-12)
        assert data_pointer(engine.factors[0]) == data_pointer(K0_arr)  # no copy of the kernel
        assert np.array_equal(backend.to_numpy(engine.K0), K0)


@pytest.mark.parametrize("per_row", [True, False])
def test_function_cholesky_gradient_matches_finite_differences(backend, rng, monkeypatch, per_row):
    """d lml/d(log s, log σ²_g) of the Cholesky engine against central differences of the dense log likelihood.
    per_row: rows alternate between two noise parameters (per-output noise in output_mode "full"); else each of
    the two target columns has its own (two noise groups). diag(C⁻¹) is taken in blocks of 5 columns."""
    monkeypatch.setattr(post, "TILE", 5)
    m, q = 12, 2
    B = rng.standard_normal((m, 6))
    K0 = np.triu(B @ B.T) + np.triu(B @ B.T, 1).T
    R = rng.standard_normal((m, q))
    index = np.broadcast_to(np.tile([0, 1], m // 2)[:, None] if per_row else np.array([[0, 1]]), (m, q))

    def noise_of(sigma2):
        return sigma2[np.tile([0, 1], m // 2)][:, None] if per_row else sigma2[None, :]

    def dense(log_theta):
        s, sigma2 = np.exp(log_theta[0]), np.exp(log_theta[1:])
        noise = np.broadcast_to(noise_of(sigma2), (m, q))
        return sum(scipy.stats.multivariate_normal(np.zeros(m), s * K0 + np.diag(noise[:, j])).logpdf(R[:, j])
                   for j in range(q))

    theta = np.log([0.6, 0.2, 0.05])
    engine = post.FunctionCholesky(backend.asarray(K0.copy()), backend)
    engine.fit(0.6, noise_of(np.exp(theta[1:])), backend.asarray(R))
    np.testing.assert_allclose(engine.lml(), dense(theta), rtol=1e-12)
    h, expected = 1e-5, []
    for k in range(3):
        step = np.zeros(3)
        step[k] = h
        expected.append((dense(theta + step) - dense(theta - step)) / (2 * h))
    np.testing.assert_allclose(engine.gradient(index), expected, rtol=1e-7, atol=1e-9)


def dense_lml(o, s, noise, mode):
    return dense_posterior(o, s, noise, mode)[3]


@pytest.mark.parametrize("method,mode,noise", [("auto", "full", 0.3), ("parameter-cholesky", "independent", 0.3),
                                               ("function-cholesky", "full", np.array([0.3, 0.3]))])
def test_optimize_hyperparameters_finds_the_dense_maximum(backend, rng, method, mode, noise):
    J, Js, y, o = problem(backend, rng)
    gp = lg.LinearizedGP(1.0, noise, output_mode=mode, method=method).fit(J, y)
    before = gp.log_marginal_likelihood()
    gp.optimize_hyperparameters()
    s, sigma2 = gp.prior_scale, gp.noise
    best = dense_lml(o, s, sigma2, mode)
    assert gp.optimization_["success"] and best > before
    np.testing.assert_allclose(gp.log_marginal_likelihood(), best, rtol=RTOL)
    for factor in (0.97, 1.03):  # a maximum: every nearby point is lower
        assert dense_lml(o, s * factor, sigma2, mode) < best
        assert dense_lml(o, s, sigma2 * factor, mode) < best
    if method != "auto":
        assert gp.plan_.method == method
    else:
        assert gp.plan_.solver == "spectral" and "kept" in gp.plan_.reason
    check_against_dense(gp, Js, o, backend, mode)


def test_sample_matches_posterior_moments_and_is_seeded(backend, rng):
    J, Js, y, o = problem(backend, rng)
    gp = lg.LinearizedGP(0.7, 0.05).fit(J, y)
    mean, cov = (backend.to_numpy(a) for a in gp.predict(Js, return_cov=True))
    draws = gp.sample(Js, 4000, seed=3)
    assert isinstance(draws, backend.xp.ndarray) and draws.shape == (4000, N_STAR, 2) and draws.dtype == np.float64
    flat = backend.to_numpy(draws).reshape(4000, -1)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(flat.mean(0) - mean.reshape(-1)) <= 5 * sd / np.sqrt(4000) + 1e-12)
    np.testing.assert_allclose(np.cov(flat.T), cov, atol=6 * sd.max() ** 2 / np.sqrt(4000))
    again = [backend.to_numpy(gp.sample(Js, 5, seed=1)) for _ in range(2)]
    np.testing.assert_array_equal(again[0], again[1])


@pytest.mark.parametrize("method", list(EXACT) + ["iterative"])
@pytest.mark.parametrize("mode", ["full", "independent"])
def test_save_load_predicts_identically(backend, rng, tmp_path, method, mode):
    J, Js, y, o = problem(backend, rng)
    gp = lg.LinearizedGP(0.7, 0.05, output_mode=mode, method=method, variance_cg_max=3).fit(J, y)
    path = gp.save(tmp_path / "model")
    loaded = lg.LinearizedGP.load(path, backend=backend.name)
    assert loaded.plan_ == gp.plan_ and loaded.data_hash_ == gp.data_hash_
    # bit-identical on NumPy; cuBLAS may pick another kernel for the loaded (contiguous) copy of a task's strided
    # Jacobian view than for the view itself, which moves the last bits of the kernel entries (order 1 here): the
    # variances, small differences of such entries, then differ by a few hundred ulps of the kernel's scale
    for a, b in zip(gp.predict(Js, return_var=True), loaded.predict(Js, return_var=True)):
        a, b = backend.to_numpy(a), backend.to_numpy(b)
        atol = 0.0 if backend.name == "numpy" else 1e3 * np.finfo(np.float64).eps * max(1.0, np.abs(a).max())
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    assert loaded.log_marginal_likelihood() == gp.log_marginal_likelihood()


def test_archive_errors(tmp_path, rng):
    backend = lg.get_backend("numpy")
    J, Js, y, _ = problem(backend, rng)
    path = lg.LinearizedGP(0.7, 0.05).fit(J, y).save(tmp_path / "m.npz")
    data = (tmp_path / "m.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(lg.ArchiveError, match="truncated"):
        lg.LinearizedGP.load(tmp_path / "cut.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["task0_alpha"] = arrays["task0_alpha"] + 1e-9
    np.savez(tmp_path / "edited.npz", **arrays)
    with pytest.raises(lg.ArchiveError, match="'task0_alpha'.*checksum"):
        lg.LinearizedGP.load(tmp_path / "edited.npz")
    header = str(arrays["__lingp_header__"])
    for old, new, match in [('"version": 1', '"version": 99', "version 99"),
                            ('"prior_scale": 0.7', '"prior_scale": 0.8', "configuration fails its checksum"),
                            ('"kind": "LinearizedGP"', '"kind": "Other"', "holds a 'Other'")]:
        arrays["task0_alpha"] = arrays["task0_alpha"] - 0  # untouched arrays from here on
        with np.load(path) as z:
            fresh = {k: z[k] for k in z.files}
        fresh["__lingp_header__"] = np.array(header.replace(old, new))
        np.savez(tmp_path / "h.npz", **fresh)
        with pytest.raises(lg.ArchiveError, match=match):
            lg.LinearizedGP.load(tmp_path / "h.npz")
    np.savez(tmp_path / "plain.npz", a=np.ones(3))
    with pytest.raises(lg.ArchiveError, match="not a lingp archive"):
        lg.LinearizedGP.load(tmp_path / "plain.npz")
    with pytest.raises(FileNotFoundError):
        lg.LinearizedGP.load(tmp_path / "missing.npz")


def test_bad_input_raises_clear_errors(backend, rng):
    J, Js, y, o = problem(backend, rng)
    with pytest.raises(RuntimeError, match="not fitted"):
        lg.LinearizedGP().predict(Js)
    with pytest.raises(lg.ValueRangeError, match="prior_scale"):
        lg.LinearizedGP(prior_scale=0.0)
    with pytest.raises(lg.ValueRangeError, match="noise"):
        lg.LinearizedGP(noise=np.array([0.1, -1.0]))
    with pytest.raises(ValueError, match="method must be one of"):
        lg.LinearizedGP(method="magic")
    gp = lg.LinearizedGP()
    with pytest.raises(lg.ShapeError, match=r"y has shape \(13, 2\); expected \(14, 2\)"):
        gp.fit(J, y[:13])
    bad = backend.to_numpy(y).copy()
    bad[3, 1] = np.nan
    with pytest.raises(lg.NonFiniteError, match=r"1 NaN.*\(3, 1\)"):
        gp.fit(J, backend.asarray(bad))
    with pytest.raises(lg.DTypeError, match="int64"):
        gp.fit(J, backend.xp.ones((N, 2), dtype=np.int64))
    with pytest.raises(lg.ShapeError, match="3 per-output variances but J has c = 2"):
        lg.LinearizedGP(noise=np.ones(3)).fit(J, y)
    with pytest.raises(ValueError, match="spectral methods need one noise variance"):
        lg.LinearizedGP(noise=np.ones(2), method="function-spectral").fit(J, y)
    gp.fit(J, y)
    model, x = on_backend(mlp(nn.Tanh, (3, 8, 8, 2)), torch.randn(4, 3, dtype=torch.float64), backend)
    other = lg.export_jacobian(model, x, params="last_layer", backend=backend.name)
    with pytest.raises(lg.ShapeError, match="exported with parameters"):
        gp.predict(other)
    with pytest.raises(TypeError, match="JacobianBlocks"):
        gp.predict(backend.to_numpy(y))


def test_plan_explains_the_choice(backend, rng):
    J, _, y, _ = problem(backend, rng)
    gp = lg.LinearizedGP(exact_max_rows=10).fit(J, y)  # 28 rows > 10, p = 122 > 28
    assert gp.plan_.method == "iterative" and "exact_max_rows = 10" in gp.plan_.reason
    gp = lg.LinearizedGP().fit(J, y)
    assert gp.plan_.method == "function-cholesky" and "p = 122" in str(gp.plan_)
    assert "plan='function-cholesky'" in repr(gp)


def test_optimizer_escapes_a_badly_scaled_start(backend, rng):
    J, _, y, o = problem(backend, rng)
    gp = lg.LinearizedGP(1e4, np.float64(1e-5), mean="zero").fit(J, y)  # NumPy scalars are accepted as noise
    gp.optimize_hyperparameters()
    grid = [(s, n) for s in np.logspace(-5, 3, 33) for n in np.logspace(-5, 1, 25)]
    best_on_grid = max(dense_posterior(o, s, n, "full", "zero")[3] for s, n in grid)
    assert gp.log_marginal_likelihood() >= best_on_grid - 1e-9 * abs(best_on_grid)


def test_float32_kernel_accumulation_is_close_to_the_float64_answer(backend, rng):
    J, Js, y, o = problem(backend, rng)
    expected = dense_posterior(o, 0.7, 0.05, "full")
    for method in ("function-cholesky", "function-spectral"):
        gp = lg.LinearizedGP(0.7, 0.05, method=method, kernel_dtype="float32").fit(J, y)
        mu, var = gp.predict(Js, return_var=True)
        # float32 sums add ~sqrt(width)·eps32 relative error to K's entries; cond(C) ≤ 1 + s‖J‖²/σ² amplifies it
        cond = 1 + 0.7 * np.linalg.norm(o["J"], 2) ** 2 / 0.05
        assert_matches(mu, expected[0], backend, dtype=np.float64, rtol=cond * 1e-6)
        assert_matches(var, expected[1], backend, dtype=np.float64, rtol=cond * 1e-6)
        assert np.abs(backend.to_numpy(mu) - expected[0]).max() > 0  # it is a different computation
    with pytest.raises(ValueError, match="kernel_dtype"):
        lg.LinearizedGP(kernel_dtype="float16")


# ----- contract edges found by an audit ------------------------------------------------------------------------------

def dense_jacobian(backend, values, c=1):
    """A hand-built JacobianBlocks of one dense block (n·c, p) with f₀ = 0."""
    values = np.asarray(values, dtype=np.float64)
    block = lg.DenseBlock(["w"], [(values.shape[1],)], backend.asarray(values), c, backend.xp)
    return lg.JacobianBlocks(backend.asarray(np.zeros((values.shape[0] // c, c))), [block], backend=backend,
                             outputs=list(range(c)))


def test_a_predict_whose_clamping_warning_is_an_error_changes_nothing(backend, monkeypatch):
    # a float32 kernel with σ² = 1e-8 makes some variances negative beyond rounding (with the energy-form rescue of
    # cancelled variances switched off, as it would otherwise repair them): predict warns, and under
    # warnings-as-errors it raises before recording the count
    monkeypatch.setattr(post, "rescue_cancelled", lambda var, *args: var)
    rng = np.random.default_rng(0)
    J0 = rng.standard_normal((40, 20))
    J, Js = dense_jacobian(backend, J0), dense_jacobian(backend, J0[:10])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lg.NumericalWarning)
        gp = lg.LinearizedGP(1.0, 1e-8, method="function-spectral", kernel_dtype="float32").fit(
            J, backend.asarray(rng.standard_normal((40, 1))))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lg.NumericalWarning)
        with pytest.raises(lg.NumericalWarning, match="negative"):
            gp.predict(Js, return_var=True)
    assert not hasattr(gp, "clamped_variances_")


def test_fit_needs_an_observation(backend):
    with pytest.raises(lg.ShapeError, match="no examples"):
        lg.LinearizedGP().fit(dense_jacobian(backend, np.zeros((0, 3))), backend.asarray(np.zeros((0, 1))))


def test_hyperparameter_search_arguments_are_checked_up_front(backend, rng, tmp_path):
    J, _, y, _ = problem(backend, rng)
    gp = lg.LinearizedGP(0.5, np.array([0.1, 0.2]), method="function-spectral", output_mode="independent").fit(J, y)
    with pytest.raises(lg.InvalidOptionError, match="disagree"):
        gp.optimize_hyperparameters(max_iter=200, maxiter=7)  # an explicit 200 is not "not passed"
    full = lg.LinearizedGP(0.5, 0.1, method="function-spectral").fit(J, y)
    with pytest.raises(lg.InvalidOptionError, match="cannot hold"):  # before the search, not after it
        full.optimize_hyperparameters(per_output_noise=True)
    loaded = lg.LinearizedGP.load(full.save(tmp_path / "m"))
    for call in (loaded.optimize_hyperparameters, loaded.average_hyperparameters):
        with pytest.raises(lg.MissingCapabilityError, match="no training targets"):
            call()


@pytest.mark.parametrize("method", ["function-cholesky", "function-spectral", "parameter-cholesky",
                                    "parameter-spectral"])
def test_an_ill_conditioned_exact_fit_warns(backend, method):
    # 5 inputs each repeated 3 times, p = 30: K has rank 5, so κ(s·K + σ²I) ≈ s·λmax/σ²
    rng = np.random.default_rng(1)
    J0 = np.repeat(rng.standard_normal((5, 30)), 3, axis=0)
    J, y = dense_jacobian(backend, J0), backend.asarray(rng.standard_normal((15, 1)))
    K = J0 @ J0.T
    fine = lg.LinearizedGP(1.0, 1e-2, method=method).fit(J, y)  # κ ≈ 1e4: no warning
    kappa = np.linalg.cond(K + 1e-2 * np.eye(15)) if method.startswith("function") else \
        np.linalg.cond(J0.T @ J0 / 1e-2 + np.eye(30))
    bound = fine.diagnostics_[0]["condition_bound"]
    if method.endswith("spectral"):  # the eigenvalues' ratio: κ itself
        np.testing.assert_allclose(bound, kappa, rtol=1e-8)
    else:  # a lower bound on κ of the diagonally scaled system, itself ≤ κ · max/min diagonal
        C = K + 1e-2 * np.eye(15) if method.startswith("function") else J0.T @ J0 / 1e-2 + np.eye(30)
        scaled = C / np.sqrt(np.outer(np.diag(C), np.diag(C)))
        assert 1.0 <= bound <= np.linalg.cond(scaled) * (1 + 1e-10)
    if method.startswith("function"):
        with pytest.warns(lg.NumericalWarning, match="ill-conditioned"):
            lg.LinearizedGP(1.0, 1e-13, method=method).fit(J, y)
    else:  # p × p systems are ill-conditioned by directions no data reach (p > n·c) without harm: reported only
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lg.NumericalWarning)  # parameter-cholesky's jitter
            gp = lg.LinearizedGP(1.0, 1e-13, method=method).fit(J, y)
        assert gp.diagnostics_[0]["condition_bound"] > 1e12


def test_the_ill_conditioning_warning_comes_once_per_call(backend):
    # a search refits at every trial point; only its final point may warn, once
    rng = np.random.default_rng(2)
    J0 = np.repeat(rng.standard_normal((5, 2, 30)), 3, axis=0).reshape(30, 30)  # 15 examples, c = 2
    J, y = dense_jacobian(backend, J0, c=2), backend.asarray(rng.standard_normal((15, 2)))
    gp = lg.LinearizedGP(1.0, np.array([1e-13, 1e-13]), method="function-cholesky", output_mode="full")
    counts = []
    for call in (lambda: gp.fit(J, y), lambda: gp.optimize_hyperparameters(max_iter=20)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        counts.append(sum("ill-conditioned" in str(w.message) for w in caught))
    assert counts[0] == 1 and counts[1] <= 1  # the fit's, and the search's final point's if still ill-conditioned


@pytest.mark.parametrize("scale", [1e-320, 1e-200, 1e200, 1e300])
def test_a_prior_scale_float64_cannot_carry_is_refused(scale):
    with pytest.raises(lg.ValueRangeError, match="prior_scale = .* is outside"):
        lg.LinearizedGP(scale)


@pytest.mark.parametrize("method", ["function-cholesky", "function-spectral"])
@pytest.mark.parametrize("mode,c", [("full", 1), ("full", 2), ("trace", 2), ("independent", 2)])
@pytest.mark.parametrize("scale", [1e9, 1e12])
def test_function_space_variances_far_below_the_prior(backend, method, mode, c, scale):
    # at the training inputs var_i = σ² − σ⁴ (C⁻¹)_ii exactly (s·K = C − σ²I), with C well-conditioned: an oracle
    # free of the cancellation prior − reduction suffers where var / prior ≈ 1e-12 (it was 1–170% off here)
    rng = np.random.default_rng(3)
    n, p = 30, 120
    J0 = 3 * rng.standard_normal((n * c, p))
    J = dense_jacobian(backend, J0, c=c)
    y = backend.asarray(rng.standard_normal((n, c)))
    gp = lg.LinearizedGP(scale, 1.0, method=method, output_mode=mode).fit(J, y)
    var = backend.to_numpy(gp.predict(J, return_var=True)[1])
    rows = J0.reshape(n, c, p)
    if mode == "full":
        kernels = [J0 @ J0.T]
    elif mode == "trace":
        kernels = [sum(rows[:, k] @ rows[:, k].T for k in range(c)) / c]
    else:
        kernels = [rows[:, k] @ rows[:, k].T for k in range(c)]
    expected = [1.0 - np.diag(np.linalg.inv(scale * K + np.eye(K.shape[0]))) for K in kernels]
    want = expected[0].reshape(n, c) if mode == "full" else np.stack(
        [expected[0]] * c if mode == "trace" else expected, axis=1)
    np.testing.assert_allclose(var, want, rtol=1e-9)
    # the covariances too: σ²I − σ⁴ C⁻¹ (they are as far below the prior's as the variances)
    cov = backend.to_numpy(gp.predict(J, return_cov=True)[1])
    expected_cov = [np.eye(K.shape[0]) - np.linalg.inv(scale * K + np.eye(K.shape[0])) for K in kernels]
    want_cov = expected_cov[0] if mode == "full" else np.stack(expected_cov * c if mode == "trace" else expected_cov)
    assert np.abs(cov - want_cov).max() <= 1e-9 * np.abs(want_cov).max()


@pytest.mark.parametrize("method", ["function-cholesky", "function-spectral", "iterative"])
@pytest.mark.parametrize("what", ["return_var", "return_cov"])
def test_function_space_variances_beyond_float64_say_so(backend, method, what):
    rng = np.random.default_rng(4)
    J0 = 3 * rng.standard_normal((20, 80))
    J = dense_jacobian(backend, J0)
    gp = lg.LinearizedGP(1e140, 1.0, method=method).fit(J, backend.asarray(rng.standard_normal((20, 1))))
    with pytest.warns(lg.NumericalWarning, match="below float64's resolution") as record:
        gp.predict(J, **{what: True})
    assert record[0].filename == __file__  # attributed to the user's call, not to lingp's internals


@pytest.mark.parametrize("scale,noise", [(1.0, 1e-2), (1.0, 1e-10), (1e12, 1e-12)])
def test_parameter_spectral_with_more_parameters_than_rows(backend, scale, noise):
    # p = 60 > n·c = 20: JᵀJ has 40 eigenvalues at rounding level (J's null space). Kept as λ ≈ 1e-14 they carried
    # their rounding into the mean times s/σ² (1e9 relative at s/σ² = 1e24) and shrank the variances there below
    # the prior s; the oracle is the function-space posterior, whose 20 × 20 system is well-conditioned
    rng = np.random.default_rng(9)
    J0, Js0 = rng.standard_normal((20, 60)), rng.standard_normal((5, 60))
    r = rng.standard_normal(20)
    C = scale * J0 @ J0.T + noise * np.eye(20)
    cross = scale * Js0 @ J0.T
    mean = cross @ np.linalg.solve(C, r)
    var = scale * (Js0 * Js0).sum(axis=1) - np.einsum("ij,ji->i", cross, np.linalg.solve(C, cross.T))
    gp = lg.LinearizedGP(scale, noise, method="parameter-spectral", mean="zero").fit(
        dense_jacobian(backend, J0), backend.asarray(r[:, None]))
    got_mean, got_var = gp.predict(dense_jacobian(backend, Js0), return_var=True)
    assert_matches(got_mean[:, 0], mean, backend, dtype=np.float64, rtol=1e-9)
    assert_matches(got_var[:, 0], var, backend, dtype=np.float64, rtol=1e-9)


def test_an_ill_conditioned_parameter_space_cholesky_says_so(backend):
    # J's null space (p = 60 > n·c = 20) holds A's eigenvalue 1/s; the factor's rounding, ε·λmax/σ², lands there
    # times s: condition s·λmax/σ² ≈ 1e15 here
    rng = np.random.default_rng(9)
    J = dense_jacobian(backend, rng.standard_normal((20, 60)))
    with pytest.warns(lg.NumericalWarning, match=r"parameter-cholesky system JᵀJ/σ² \+ I/s is ill-conditioned"):
        lg.LinearizedGP(1.0, 1e-13, method="parameter-cholesky").fit(J, backend.asarray(rng.standard_normal((20, 1))))


def weight_space_posterior(A, B, s, noise):
    """B (AᵀA/σ² + I/s)⁻¹ Bᵀ in float64: the posterior covariance of f* = B w given y = A w + N(0, σ²): no
    subtraction, so exact where the function-space form cancels."""
    return B @ np.linalg.solve(A.T @ A / noise + np.eye(A.shape[1]) / s, B.T)


@pytest.mark.parametrize("method", ["function-cholesky", "function-spectral"])
@pytest.mark.parametrize("mode", ["full", "trace", "independent"])
def test_covariances_far_below_the_prior_off_the_training_inputs(backend, method, mode):
    # p < m and s = 1e8, σ² = 1e-2: posterior/prior ≈ 1e-12 at test points near and far from the training inputs,
    # with real correlations between them; every entry against the weight-space float64 covariance, relative to
    # √(var_i var_j) (1e-4..3e-3 off without the energy-form rescue, ≤ 3e-6 with it). Not the iterative path: at
    # s·λ/σ² ≈ 1e11 CG stalls near ε·1e11 and says so (its covariances: tests/test_iterative.py)
    rng = np.random.default_rng(7)
    n, n_star, c, p, s, noise = 60, 6, 2, 15, 1e8, 1e-2
    J0 = rng.standard_normal((n * c, p))
    Js0 = np.concatenate([J0[: 3 * c] + 1e-3 * rng.standard_normal((3 * c, p)), rng.standard_normal((3 * c, p))])
    J, Js = dense_jacobian(backend, J0, c=c), dense_jacobian(backend, Js0, c=c)
    gp = lg.LinearizedGP(s, noise, method=method, output_mode=mode)
    gp.fit(J, backend.asarray(rng.standard_normal((n, c))))
    var, cov = (backend.to_numpy(a) for a in gp.predict(Js, return_var=True, return_cov=True)[1:])
    rows, star_rows = J0.reshape(n, c, p), Js0.reshape(n_star, c, p)
    if mode == "full":
        want = [weight_space_posterior(J0, Js0, s, noise)]
    elif mode == "trace":  # the kernel of the stacked per-output Jacobians / √c
        stack = [np.hstack([r[:, k] for k in range(c)]) / np.sqrt(c) for r in (rows, star_rows)]
        want = [weight_space_posterior(*stack, s, noise)] * c
    else:
        want = [weight_space_posterior(rows[:, k], star_rows[:, k], s, noise) for k in range(c)]
    got = [cov] if mode == "full" else list(cov)
    for g, w in zip(got, want):
        scale = np.sqrt(np.outer(np.diag(w), np.diag(w)))
        assert (np.abs(g - w) <= 1e-5 * scale).all()
    want_var = np.diag(want[0]).reshape(n_star, c) if mode == "full" else np.stack([np.diag(w) for w in want], 1)
    np.testing.assert_allclose(var, want_var, rtol=1e-5)
