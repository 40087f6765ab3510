"""LinearizedGP.average_hyperparameters against a brute-force mixture computed here from dense float64 formulas.

Oracle: on the same (log s, log σ²) grid (its centre recomputed here from the targets and the dense Jacobian), each
point's log marginal likelihood by scipy.stats and its posterior mean/variances by dense solves; weights
∝ exp(lml); the mixture's mean Σ w m_g and variance Σ w (v_g + m_g²) − mean² (the textbook form, in float64).
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

import lingp_core as lg
from lingp_core import _validate as v
from tests.test_gp import dense_jacobian, dense_posterior, problem


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# small grids on purpose: the brute force is O(points · n³); their edges hold weight, which a warning reports
narrow_grid = pytest.mark.filterwarnings("ignore:.*edge of the averaging grid:lingp_core.NumericalWarning")


def brute_force(o, mode, grid_size, span, width=None):
    J, y, c = o["J"], o["y"], o["y"].shape[1]
    r = y - o["f"]
    rows = J.reshape(-1, c, J.shape[1])
    diag = {"full": (J**2).sum(1).mean(), "independent": (J**2).sum(1).mean(),
            "trace": np.mean([(rows[:, k, :] ** 2).sum(1) for k in range(c)], axis=0).mean()}[mode]
    noise0 = 0.5 * (r**2).mean()
    s0 = noise0 / diag
    log_s = np.log(s0) + np.linspace(-span, span, grid_size) * np.log(10)
    log_n = np.log(noise0) + np.linspace(-span, 1.0, grid_size) * np.log(10)
    points = [(np.exp(a), np.exp(b)) for a in log_s for b in log_n]
    results = [dense_posterior(o, s, n, mode) for s, n in points]
    lml = np.array([res[3] for res in results])
    if width is not None:  # independent log-normal priors on s and σ² at the grid's centre, `width` nats wide
        lml = lml + np.array([-0.5 * ((np.log(s / s0) / width) ** 2 + (np.log(n / noise0) / width) ** 2)
                              for s, n in points])
    w = np.exp(lml - lml.max())
    w /= w.sum()
    mean = sum(wi * res[0] for wi, res in zip(w, results))
    var = sum(wi * (res[1] + res[0] ** 2) for wi, res in zip(w, results)) - mean**2
    return mean, var, points[int(np.argmax(w))]


@narrow_grid
@pytest.mark.parametrize("mode,method", [("trace", "auto"), ("independent", "auto"), ("full", "parameter-spectral")])
def test_averaged_predictions_equal_the_brute_force_mixture(backend, mode, method):
    rng = np.random.default_rng(5)
    J, Js, y, o = problem(backend, rng, c=2)
    gp = lg.LinearizedGP(output_mode=mode, method=method).fit(J, y)
    gp.average_hyperparameters(grid_size=7, span=2.0, keep_mass=1.0)
    mean, var = (backend.to_numpy(a) for a in gp.predict(Js, return_var=True))
    want_mean, want_var, heaviest = brute_force(o, mode, 7, 2.0)
    scale = np.abs(want_mean).max()
    np.testing.assert_allclose(mean, want_mean, rtol=1e-8, atol=1e-9 * scale)
    np.testing.assert_allclose(var, want_var, rtol=1e-6, atol=1e-9 * scale**2)
    assert gp.prior_scale == pytest.approx(heaviest[0], rel=1e-12)
    assert gp.noise == pytest.approx(heaviest[1], rel=1e-12)


@narrow_grid
def test_averaging_with_the_data_hyperprior_equals_the_brute_force_mixture(backend):
    rng = np.random.default_rng(9)
    J, Js, y, o = problem(backend, rng, c=2)
    gp = lg.LinearizedGP(output_mode="trace").fit(J, y)
    gp.average_hyperparameters(grid_size=9, span=2.0, keep_mass=1.0, hyperprior=lg.Hyperprior(prior_scale_width=0.7,
                                                                                               noise_width=0.7))
    mean, var = (backend.to_numpy(a) for a in gp.predict(Js, return_var=True))
    want_mean, want_var, _ = brute_force(o, "trace", 9, 2.0, width=0.7)
    scale = np.abs(want_mean).max()
    np.testing.assert_allclose(mean, want_mean, rtol=1e-8, atol=1e-9 * scale)
    np.testing.assert_allclose(var, want_var, rtol=1e-6, atol=1e-9 * scale**2)


@narrow_grid
def test_pruning_keeps_the_mass_asked_for(backend):
    rng = np.random.default_rng(6)
    J, Js, y, o = problem(backend, rng, c=2)
    gp = lg.LinearizedGP(output_mode="trace").fit(J, y).average_hyperparameters(grid_size=15, span=3.0,
                                                                               keep_mass=0.999)
    assert 1 <= gp.averaging_["points_kept"] < 225
    assert gp.mixture_.weights.sum() == pytest.approx(1.0, rel=1e-12)
    assert gp.mixture_.prior_scales.shape == gp.mixture_.noises.shape == (gp.averaging_["points_kept"],)
    full = lg.LinearizedGP(output_mode="trace").fit(J, y).average_hyperparameters(grid_size=15, span=3.0,
                                                                                 keep_mass=1.0)
    a, b = gp.predict(Js, return_var=True), full.predict(Js, return_var=True)
    for x, z in zip(a, b):  # the dropped 0.1% changes the moments by about that much
        x, z = backend.to_numpy(x), backend.to_numpy(z)
        assert np.abs(x - z).max() <= 0.01 * np.abs(z).max()


@narrow_grid
def test_averaged_model_round_trips_and_refit_ends_it(backend, tmp_path):
    rng = np.random.default_rng(7)
    J, Js, y, _ = problem(backend, rng, c=2)
    gp = lg.LinearizedGP(output_mode="independent").fit(J, y).average_hyperparameters(grid_size=9, span=2.0)
    loaded = lg.LinearizedGP.load(gp.save(tmp_path / "avg"), backend=backend.name)
    for x, z in zip(gp.predict(Js, return_var=True), loaded.predict(Js, return_var=True)):
        np.testing.assert_array_equal(backend.to_numpy(x), backend.to_numpy(z))
    assert loaded.averaging_ == gp.averaging_
    np.testing.assert_array_equal(loaded.mixture_.weights, gp.mixture_.weights)
    gp.fit(J, y)
    assert not hasattr(gp, "averaging_") and gp.mixture_ is None
    single = lg.LinearizedGP(gp.prior_scale, gp.noise, output_mode="independent").fit(J, y)
    np.testing.assert_array_equal(backend.to_numpy(gp.predict(Js)), backend.to_numpy(single.predict(Js)))


@narrow_grid
def test_averaging_refuses_what_it_cannot_do_and_leaves_the_model(backend):
    rng = np.random.default_rng(8)
    J, Js, y, _ = problem(backend, rng, c=2)
    gp = lg.LinearizedGP(1.0, [0.1, 0.2], output_mode="independent").fit(J, y)
    before = backend.to_numpy(gp.predict(Js))
    with pytest.raises(v.InvalidOptionError, match="one shared noise"):
        gp.average_hyperparameters()
    for bad in ({"grid_size": 2}, {"span": 0.0}, {"keep_mass": 1.5}, {"keep_mass": 0.0}, {"span": 310.0}):
        with pytest.raises(v.LingpError):
            lg.LinearizedGP().fit(J, y).average_hyperparameters(**bad)
    with pytest.raises(v.ValueRangeError, match="smaller span"):  # s and σ²/s would leave float64
        lg.LinearizedGP().fit(J, y).average_hyperparameters(span=300.0)
    with pytest.raises(v.MemoryBudgetError, match="smaller grid_size"):  # before any grid array is allocated
        lg.LinearizedGP().fit(J, y).average_hyperparameters(grid_size=10**9)
    np.testing.assert_array_equal(backend.to_numpy(gp.predict(Js)), before)
    with pytest.raises(v.InvalidOptionError, match="spectral"):
        lg.LinearizedGP(method="iterative").fit(J, y).average_hyperparameters()
    averaged = lg.LinearizedGP().fit(J, y).average_hyperparameters(grid_size=5)
    with pytest.raises(v.MissingCapabilityError, match="return_cov"):
        averaged.predict(Js, return_cov=True)


def test_posterior_mass_on_the_grid_edge_is_reported(backend):
    rng = np.random.default_rng(5)
    J, _, y, _ = problem(backend, rng, c=2)
    gp = lg.LinearizedGP(output_mode="trace").fit(J, y)
    with pytest.warns(v.NumericalWarning, match="edge of the averaging grid") as record:
        gp.average_hyperparameters(grid_size=7, span=0.5)
    assert record[0].filename == __file__  # attributed to the user's call
    assert gp.averaging_["weight_on_grid_edge"] > 0.01


@narrow_grid
@pytest.mark.parametrize("mode,method", [("trace", "function-spectral"), ("independent", "parameter-spectral")])
def test_grid_points_evaluated_in_batches_give_the_same_mixture(backend, mode, method, monkeypatch):
    # the points are evaluated together in batches sized by BATCH_VALUES and merged by the parallel West update:
    # one point per batch, three per batch and all at once must agree to rounding
    from lingp_core import _averaging

    rng = np.random.default_rng(8)
    J, Js, y, _ = problem(backend, rng, c=2)
    gp = lg.LinearizedGP(output_mode=mode, method=method).fit(J, y)
    gp.average_hyperparameters(grid_size=9, span=2.0, keep_mass=1.0)
    assert gp.mixture_.weights.size > 6  # several batches of 1 and of 3
    results = []
    for size in (1, 3, 10**9):
        monkeypatch.setattr(_averaging, "batch_points", lambda values, size=size: size)
        results.append([backend.to_numpy(a) for a in gp.predict(Js, return_var=True)])
    for mean, var in results[:2]:
        np.testing.assert_allclose(mean, results[2][0], rtol=1e-12, atol=1e-13 * np.abs(mean).max())
        np.testing.assert_allclose(var, results[2][1], rtol=1e-11)


def test_averaged_variances_far_below_the_prior_are_rescued(backend):
    # nearly noise-free targets in the span of a rank-10 kernel: the evidence puts its weight where s·λ/σ² ≫ 1e12,
    # and at the training inputs every grid point's variance is σ² Σ_j U_ij² sλ_j / (sλ_j + σ²) (K = U Λ Uᵀ by the
    # SVD of J, so K's null space is exactly 0, not rounding that the sum would pick up) — a sum
    # of positive terms, an oracle free of prior − reduction's cancellation, which the batched grid evaluation must
    # hand to the energy-form rescue point by point
    rng = np.random.default_rng(6)
    n, p, grid, span = 40, 10, 7, 12.0
    J0 = 3 * rng.standard_normal((n, p))
    J = dense_jacobian(backend, J0)
    y = J0 @ rng.standard_normal(p) * 1e-3 + 1e-15 * rng.standard_normal(n)
    gp = lg.LinearizedGP(method="function-spectral").fit(J, backend.asarray(y[:, None]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lg.NumericalWarning)  # weight on the grid's edge
        gp.average_hyperparameters(grid_size=grid, span=span, keep_mass=1.0)
        mean, var = (backend.to_numpy(a)[:, 0] for a in gp.predict(J, return_var=True))
    U, singular, _ = np.linalg.svd(J0, full_matrices=False)  # K = U diag(λ) Uᵀ on its rank-p range, 0 beyond
    lam, z = singular**2, U.T @ y
    rest = y @ y - z @ z  # the targets' squared norm outside K's range (n − p directions of variance σ²)
    noise0 = 0.5 * np.mean(y**2)
    s0 = noise0 / np.mean(np.sum(J0**2, axis=1))
    points = [(s0 * 10.0**a, noise0 * 10.0**b) for a in np.linspace(-span, span, grid)
              for b in np.linspace(-span, 1.0, grid)]
    lml, means, variances = [], [], []
    for s, noise in points:
        d = s * lam + noise
        lml.append(-0.5 * (np.sum(z**2 / d) + rest / noise + np.sum(np.log(d)) + (n - p) * np.log(noise)
                           + n * np.log(2 * np.pi)))
        means.append(U @ (s * lam * z / d))  # s K C⁻¹ y
        variances.append(noise * ((U**2) @ (s * lam / d)))
    w = np.exp(np.array(lml) - max(lml))
    w /= w.sum()
    ratios = np.array([s * lam.max() / noise for s, noise in points])
    assert w[ratios > 1e12].sum() > 0.5  # the weight sits where prior − reduction would cancel
    want_mean = w @ np.array(means)
    want_var = w @ (np.array(variances) + (np.array(means) - want_mean) ** 2)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-9 * np.abs(y).max())
    np.testing.assert_allclose(var, want_var, rtol=1e-4)  # prior − reduction alone: 1.1% off here


def test_a_batch_mixing_rescued_and_plain_points_gives_each_its_exact_variance(backend):
    # one batch of grid points from s·λmax/σ² ≈ 1 (plain prior − reduction) to ≈ 1e13 (cancelled: rescued point by
    # point) at the training inputs, each against σ² Σ_j U_ij² sλ_j / (sλ_j + σ²) (K = U Λ Uᵀ by the SVD of J), and
    # the means against s K C⁻¹ y
    from lingp_core import _energy as post

    rng = np.random.default_rng(9)
    n, p = 40, 10
    J0 = 3 * rng.standard_normal((n, p))
    J = dense_jacobian(backend, J0)
    y = rng.standard_normal(n)
    gp = lg.LinearizedGP(1.0, 1.0, method="function-spectral").fit(J, backend.asarray(y[:, None]))
    engine, star = gp._engines[0], gp._stars(J)[0]
    scales = np.array([1e-3, 1.0, 1e3, 1e6, 1e7])  # s·λmax/σ² from ≈ 1 to ≈ 1e12 (past ≈ 1e13 fit warns)
    noises = np.array([1.0, 1e-1, 1e-2, 1e-2, 1e-2])
    means, variances = (backend.to_numpy(a) for a in engine.moments_at(star, scales, noises, True))
    U, singular, _ = np.linalg.svd(J0, full_matrices=False)
    lam, z = singular**2, U.T @ y
    prior = np.sum(J0**2, axis=1)
    flagged = 0
    for g, (s, noise) in enumerate(zip(scales, noises)):
        want_var = noise * ((U**2) @ (s * lam / (s * lam + noise)))
        np.testing.assert_allclose(variances[:, 0, g], want_var, rtol=1e-6)  # unrescued 1.5e-4 off at 1e6, 1e-2
        want_mean = U @ (s * lam * z / (s * lam + noise))
        tolerance = max(1e-12, 10 * np.finfo(float).eps * (s * lam.max() / noise + 1))  # the solve's ε·condition
        np.testing.assert_allclose(means[:, 0, g], want_mean, rtol=0, atol=tolerance * np.abs(want_mean).max())
        flagged += bool(np.any(want_var < n * np.finfo(float).eps / post.CANCELLED_TOLERANCE * s * prior))
    assert 1 <= flagged < len(scales)  # the batch holds both kinds


@pytest.mark.filterwarnings("ignore:.*edge of the averaging grid:lingp_core.NumericalWarning")
def test_an_average_whose_weight_sits_on_ill_conditioned_points_warns(backend):
    # the fitted (heaviest) point is checked as every fit is, and so is every grid point holding ≥ 1% of the weight
    rng = np.random.default_rng(6)
    J0 = 3 * rng.standard_normal((40, 10))
    J = dense_jacobian(backend, J0)
    y = J0 @ rng.standard_normal(10) * 1e-3 + 1e-15 * rng.standard_normal(40)
    gp = lg.LinearizedGP(method="function-spectral").fit(J, backend.asarray(y[:, None]))
    with pytest.warns(lg.NumericalWarning, match="ill-conditioned"):
        gp.average_hyperparameters(grid_size=9, span=12.0, keep_mass=1.0)
    # here the heaviest point is the worst one; with its own system taken as well-conditioned, the other heavy
    # points are still checked, from the spectrum: condition 1 + s·λmax/σ² (K is singular, λmin = 0)
    for engine in gp._engines:
        engine.condition = 1.0
    heavy = gp.mixture_.weights >= 0.01
    lam_max = np.linalg.eigvalsh(J0 @ J0.T).max()
    worst = (1 + gp.mixture_.prior_scales * lam_max / gp.mixture_.noises)[heavy].max()
    assert worst > 1e-3 / np.finfo(float).eps
    message = "averaging grid holding .*condition number ≥ " + re.escape(f"{worst:.2g}")
    with pytest.warns(lg.NumericalWarning, match=message):
        gp._warn_if_ill_conditioned()
