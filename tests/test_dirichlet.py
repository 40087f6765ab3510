"""Per-observation noise in LinearizedGP and DirichletClassifier, against float64 dense formulas written out here.

Oracle: per output mode, C = s·K + diag(σ²_ik) with the noise of each (example, output) observation, α = C⁻¹ r,
mean* = m* + K* α, var* = diag(K** − K* C⁻¹ K*ᵀ), log p(y) = log N(r | 0, C); the Dirichlet targets and noise from
Milios et al.'s formulas (Gamma(α, 1) moment-matched by a log-normal: σ² = log(1/α + 1), ỹ = log α − σ²/2).
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

import lingp_core as lg
from lingp_core import _validate as v
from tests.test_gp import N, problem

nn = torch.nn
RTOL = 1e-9


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def dense_per_observation(o, s, noise, mode, mean_rows, mean_star, y):
    """Mean, variances (n*, c) and log marginal likelihood for noise (n, c), from J (n·c, p) example-major."""
    J, Js = o["J"], o["Js"]
    n, c = y.shape
    r = y - mean_rows
    rows = lambda A, k: A.reshape(-1, c, A.shape[1])[:, k, :]  # noqa: E731
    out_mean, out_var, lml = mean_star.copy(), np.zeros(mean_star.shape), 0.0
    if mode == "full":
        C = s * J @ J.T + np.diag(noise.reshape(-1))
        Ks = s * Js @ J.T
        out_mean += (Ks @ np.linalg.solve(C, r.reshape(-1))).reshape(-1, c)
        out_var = np.diag(s * Js @ Js.T - Ks @ np.linalg.solve(C, Ks.T)).reshape(-1, c)
        return out_mean, out_var, scipy.stats.multivariate_normal(np.zeros(n * c), C).logpdf(r.reshape(-1))
    for k in range(c):
        if mode == "independent":
            K, Ks, Kss = (s * rows(A, k) @ rows(B, k).T for A, B in ((J, J), (Js, J), (Js, Js)))
        else:
            K, Ks, Kss = (sum(s * rows(A, j) @ rows(B, j).T for j in range(c)) / c
                          for A, B in ((J, J), (Js, J), (Js, Js)))
        C = K + np.diag(noise[:, k])
        out_mean[:, k] += Ks @ np.linalg.solve(C, r[:, k])
        out_var[:, k] = np.diag(Kss - Ks @ np.linalg.solve(C, Ks.T))
        lml += scipy.stats.multivariate_normal(np.zeros(n), C).logpdf(r[:, k])
    return out_mean, out_var, lml


def heteroscedastic(rng, c):
    return np.exp(rng.uniform(np.log(0.05), np.log(2.0), size=(N, c)))


@pytest.mark.parametrize("mode", ["full", "independent", "trace"])
@pytest.mark.parametrize("method", ["function-cholesky", "parameter-cholesky", "iterative"])
def test_per_observation_noise_matches_dense(backend, mode, method):
    if mode == "trace" and method == "parameter-cholesky":
        pytest.skip("trace mode has no parameter-space form")
    rng = np.random.default_rng(3)
    J, Js, y, o = problem(backend, rng, c=3)
    noise = heteroscedastic(rng, 3)
    gp = lg.LinearizedGP(0.7, noise, output_mode=mode, method=method,
                         rtol=1e-12 if method == "iterative" else None).fit(J, y)
    mean, var = (backend.to_numpy(a) for a in gp.predict(Js, return_var=True))
    want_mean, want_var, want_lml = dense_per_observation(o, 0.7, noise, mode, o["f"], o["fs"], o["y"])
    tol = 1e-8 if method == "iterative" else RTOL
    np.testing.assert_allclose(mean, want_mean, rtol=tol, atol=tol * np.abs(want_mean).max())
    np.testing.assert_allclose(var, want_var, rtol=max(tol, 1e-6 if method == "iterative" else 0),
                               atol=tol * np.abs(want_var).max())
    if method != "iterative":
        assert gp.log_marginal_likelihood() == pytest.approx(want_lml, rel=RTOL)


def test_per_observation_noise_refuses_spectral_and_bad_shapes(backend):
    rng = np.random.default_rng(0)
    J, _, y, _ = problem(backend, rng, c=2)
    noise = heteroscedastic(rng, 2)
    with pytest.raises(v.InvalidOptionError, match="spectral"):
        lg.LinearizedGP(1.0, noise, method="function-spectral", output_mode="trace").fit(J, y)
    with pytest.raises(v.ShapeError, match=r"\(n, c\) = \(14, 2\)"):
        lg.LinearizedGP(1.0, noise[:-1]).fit(J, y)
    bad = noise.copy()
    bad[2, 1] = np.nan
    with pytest.raises(v.NonFiniteError, match=r"\(2, 1\)"):
        lg.LinearizedGP(1.0, bad)
    bad[2, 1] = -1.0
    with pytest.raises(v.ValueRangeError, match=r"noise\[2, 1\]"):
        lg.LinearizedGP(1.0, bad)
    with pytest.raises(v.DTypeError):
        lg.LinearizedGP(1.0, noise.astype(complex))


def test_per_observation_noise_survives_save_and_load(backend, tmp_path):
    rng = np.random.default_rng(1)
    J, Js, y, _ = problem(backend, rng, c=2)
    noise = heteroscedastic(rng, 2)
    gp = lg.LinearizedGP(0.5, noise, output_mode="trace").fit(J, y)
    loaded = lg.LinearizedGP.load(gp.save(tmp_path / "gp"), backend=backend.name)
    np.testing.assert_array_equal(loaded.noise, noise)
    for a, b in zip(gp.predict(Js, return_var=True), loaded.predict(Js, return_var=True)):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))


def test_dirichlet_targets_follow_the_lognormal_moment_match():
    labels = np.array([2, 0, 1, 2])
    targets, noise = lg.dirichlet_targets(labels, 3, 0.05)
    for i, label in enumerate(labels):
        for k in range(3):
            a = 1.05 if k == label else 0.05
            # log-normal with the Gamma(a, 1)'s mean a and variance a: σ² = log(var/mean² + 1), μ = log mean − σ²/2
            assert noise[i, k] == pytest.approx(np.log(a / a**2 + 1), rel=1e-15)
            assert targets[i, k] == pytest.approx(np.log(a) - noise[i, k] / 2, rel=1e-15)


def classifier_problem(backend, seed=0, c=3):
    rng = np.random.default_rng(seed)
    J, Js, _, o = problem(backend, rng, c=c)
    labels = rng.integers(0, c, size=N)
    labels[:c] = np.arange(c)  # every class labelled
    return J, Js, labels, o


def on(backend, labels):
    return backend.asarray(labels)


@pytest.mark.parametrize("mode", ["trace", "independent", "full"])
def test_dirichlet_classifier_matches_dense(backend, mode):
    J, Js, labels, o = classifier_problem(backend)
    clf = lg.DirichletClassifier(0.8, alpha_epsilon=0.02, output_mode=mode).fit(J, on(backend, labels))
    targets, noise = lg.dirichlet_targets(labels, 3, 0.02)
    constant = targets.mean(axis=0)
    want_mean, want_var, want_lml = dense_per_observation(
        o, 0.8, noise, mode, np.broadcast_to(constant, targets.shape), np.broadcast_to(constant, o["fs"].shape),
        targets)
    mean, var = (backend.to_numpy(a) for a in clf.predict_latent(Js))
    np.testing.assert_allclose(mean, want_mean, rtol=RTOL, atol=RTOL * np.abs(want_mean).max())
    np.testing.assert_allclose(var, want_var, rtol=RTOL, atol=RTOL * np.abs(want_var).max())
    assert clf.log_marginal_likelihood() == pytest.approx(want_lml, rel=RTOL)
    probs = backend.to_numpy(clf.predict_proba(Js))
    # P(f_k largest) by brute-force sampling of the independent posterior Gaussians
    draws = want_mean[None] + np.sqrt(want_var)[None] * np.random.default_rng(0).standard_normal((200_000,) +
                                                                                               want_mean.shape)
    frequencies = np.stack([(draws.argmax(axis=2) == k).mean(axis=0) for k in range(3)], axis=1)
    np.testing.assert_allclose(probs, frequencies, atol=5e-3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)


def test_dirichlet_prior_scale_maximizes_the_dense_evidence(backend):
    J, Js, labels, o = classifier_problem(backend, seed=4)
    clf = lg.DirichletClassifier(1.0).fit(J, on(backend, labels)).optimize_prior_scale()
    targets, noise = lg.dirichlet_targets(labels, 3, 0.01)
    constant = np.broadcast_to(targets.mean(axis=0), targets.shape)

    def evidence(s):
        return dense_per_observation(o, s, noise, "trace", constant, constant[: o["fs"].shape[0]], targets)[2]

    s = clf.prior_scale
    assert evidence(s) >= max(evidence(s * 1.01), evidence(s / 1.01)) - 1e-9 * abs(evidence(s))
    grid = np.exp(np.linspace(np.log(s) - 8, np.log(s) + 8, 161))
    assert evidence(s) >= max(evidence(g) for g in grid) - 1e-9 * abs(evidence(s))
    np.testing.assert_array_equal(clf.noise, noise)  # the noise stays fixed


def test_dirichlet_classifier_round_trips_and_refuses_bad_labels(backend, tmp_path):
    J, Js, labels, _ = classifier_problem(backend, seed=2)
    clf = lg.DirichletClassifier(0.3, alpha_epsilon=0.05).fit(J, on(backend, labels))
    loaded = lg.DirichletClassifier.load(clf.save(tmp_path / "clf"), backend=backend.name)
    assert loaded.alpha_epsilon == 0.05 and isinstance(loaded, lg.DirichletClassifier)
    loaded = lg.DirichletClassifier.load(clf.save(tmp_path / "clf"), backend=backend.name)
    np.testing.assert_array_equal(backend.to_numpy(loaded.predict_proba(Js)), backend.to_numpy(clf.predict_proba(Js)))
    before = backend.to_numpy(clf.predict_proba(Js))
    with pytest.raises(v.ValueRangeError, match=r"\[0, 3\)"):
        clf.fit(J, on(backend, np.where(labels == 0, 3, labels)))
    with pytest.raises(v.DTypeError):
        clf.fit(J, on(backend, labels.astype(float)))
    with pytest.raises(v.ShapeError):
        clf.fit(J, on(backend, labels[:-1]))
    np.testing.assert_array_equal(backend.to_numpy(clf.predict_proba(Js)), before)  # failed fits changed nothing
    with pytest.raises(v.InvalidOptionError, match="noise"):
        lg.DirichletClassifier(noise=0.1)
    with pytest.raises(v.ValueRangeError):
        lg.DirichletClassifier(alpha_epsilon=0.0)
    with pytest.raises(v.ValueRangeError, match="alpha_epsilon"):
        lg.DirichletClassifier(alpha_epsilon=1e-320).fit(J, on(backend, labels))


@pytest.mark.parametrize("make,error,match", [
    (lambda: lg.LinearizedGP(1.0, [[1, 2], [3]]), v.ShapeError, "ragged"),
    (lambda: lg.LinearizedGP(1.0, [1.0, [2.0]]), v.ShapeError, "ragged"),
    (lambda: lg.Hyperprior(log_noise=1e300), v.ValueRangeError, "log_noise"),
    (lambda: lg.Hyperprior(noise_width=1e-300), v.ValueRangeError, "noise_width"),
    (lambda: lg.LaplaceClassifier([1.0, 1e-320]), v.ValueRangeError, r"prior_scale\[1\]"),
])
def test_hostile_hyperparameters_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_dirichlet_prior_scale_by_loo_matches_the_dense_leave_one_out_maximum(backend):
    """criterion="loo" through optimize_prior_scale: s maximizes Σ_ik log N(ỹ_ik | μ_-i,k, v_-i,k), computed here by
    refitting the dense GP without each example (trace kernel, per-observation noise, constant mean kept fixed)."""
    J, _, labels, o = classifier_problem(backend, seed=6)
    clf = lg.DirichletClassifier(1.0).fit(J, on(backend, labels)).optimize_prior_scale(criterion="loo")
    targets, noise = lg.dirichlet_targets(labels, 3, 0.01)
    r = targets - targets.mean(axis=0)
    c = 3
    rows = o["J"].reshape(-1, c, o["J"].shape[1])
    K0 = sum(rows[:, k, :] @ rows[:, k, :].T for k in range(c)) / c

    def loo(s):
        total = 0.0
        for k in range(c):
            for i in range(N):
                keep = np.arange(N) != i
                C = s * K0[np.ix_(keep, keep)] + np.diag(noise[keep, k])
                kx = s * K0[i, keep]
                mu = kx @ np.linalg.solve(C, r[keep, k])
                var = s * K0[i, i] - kx @ np.linalg.solve(C, kx) + noise[i, k]
                total += -0.5 * np.log(2 * np.pi * var) - 0.5 * (r[i, k] - mu) ** 2 / var
        return total

    s = clf.prior_scale
    assert clf.optimization_["criterion"] == "loo" and clf.optimization_["at_bound"] == []
    assert loo(s) >= max(loo(s * 1.02), loo(s / 1.02)) - 1e-9 * abs(loo(s))


def test_dirichlet_probabilities_are_exact_when_one_class_barely_moves():
    # one class's logit barely moves with the weights at the test inputs: its latent variance is ~1e5 times below the
    # others', the case where 128 Gauss–Hermite nodes gave probabilities off by 0.02
    from tests.test_class_probabilities import QUAD_ATOL, quadrature_probabilities
    from tests.test_gp import dense_jacobian

    backend = lg.get_backend("numpy")
    rng = np.random.default_rng(0)
    c = 3
    J_train, J_test = rng.standard_normal((6 * c, 20)), rng.standard_normal((3 * c, 20))
    J_test[1::c] *= 3e-3
    labels = rng.integers(0, c, 6)
    clf = lg.DirichletClassifier(1.0, output_mode="independent").fit(dense_jacobian(backend, J_train, c), labels)
    Js = dense_jacobian(backend, J_test, c)
    mean, var = clf.predict_latent(Js)
    assert (var.max(axis=1) / var.min(axis=1)).min() > 1e4  # the case under test
    probs = clf.predict_proba(Js)
    want = [quadrature_probabilities(m, s) for m, s in zip(mean, var)]
    np.testing.assert_allclose(probs, want, rtol=0, atol=QUAD_ATOL)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=QUAD_ATOL)
