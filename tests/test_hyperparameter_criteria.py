"""LinearizedGP.optimize_hyperparameters' criteria ("evidence", "loo"), hyperpriors (MAP), bound warnings and fixed
per-observation noise, against independent float64 dense computations.

Oracles, written out here from the dense Jacobian: the kernel K0 of each output mode, C = s·K0 + diag(noise) per
target column; the leave-one-out density by conditioning on the other rows for every row in turn (np.linalg.solve,
not the closed form); gradients by central differences of those; the evidence by slogdet and solve; MAP by the
maximum over a grid.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import lingp_core as lg
from lingp_core import _hyperparameters as hyper
from lingp_core import _plan
from lingp_core.jacobian import DenseBlock, JacobianBlocks
from tests.helpers import tolerance

RTOL = tolerance(np.float64, 1e5)  # ~2e-11: exact float64 paths on kernels of order 1 with noise ≥ 0.05
FD_STEP = 1e-5                     # central differences: error ~ h² · third derivative, ~1e-9 relative here
FD_RTOL = 1e-6


def random_problem(backend, rng, n=8, c=3, p=30):
    """A hand-built dense Jacobian (n·c, p) with its float64 copy, and targets y (n, c) (the prior mean is zero)."""
    Jd = rng.standard_normal((n * c, p)) / np.sqrt(p)
    block = DenseBlock(["w"], [(p,)], backend.asarray(Jd), c, backend.xp)
    J = JacobianBlocks(backend.asarray(np.zeros((n, c))), [block], backend=backend, outputs=tuple(range(c)))
    y = rng.standard_normal((n, c))
    return J, Jd, y


def column_problems(Jd, y, noise, mode):
    """[(K0, r, d)] per GP column of the output mode: kernel (m, m), targets (m,), noise variances (m,)."""
    n, c = y.shape
    noise = np.broadcast_to(np.asarray(noise, dtype=float), (n, c))
    rows = [Jd[k::c] for k in range(c)]  # the rows of output k
    if mode == "full":
        return [(Jd @ Jd.T, y.reshape(-1), noise.reshape(-1))]
    if mode == "independent":
        return [(rows[k] @ rows[k].T, y[:, k], noise[:, k]) for k in range(c)]
    K0 = sum(A @ A.T for A in rows) / c  # trace: the mean of the outputs' kernels
    return [(K0, y[:, k], noise[:, k]) for k in range(c)]


def brute_loo(problems, s):
    """Σ over columns and rows of log N(r_i | E[r_i | r_-i], Var[r_i | r_-i]) under N(0, s·K0 + diag(d))."""
    total = 0.0
    for K0, r, d in problems:
        C = s * K0 + np.diag(d)
        for i in range(len(r)):
            o = np.arange(len(r)) != i
            mean = C[i, o] @ np.linalg.solve(C[np.ix_(o, o)], r[o])
            var = C[i, i] - C[i, o] @ np.linalg.solve(C[np.ix_(o, o)], C[o, i])
            total += -0.5 * np.log(2 * np.pi * var) - 0.5 * (r[i] - mean) ** 2 / var
    return total


def dense_lml(problems, s):
    total = 0.0
    for K0, r, d in problems:
        C = s * K0 + np.diag(d)
        total += -0.5 * (r @ np.linalg.solve(C, r) + np.linalg.slogdet(C)[1] + len(r) * np.log(2 * np.pi))
    return total


def noise_of(kind, n, c, rng):
    if kind == "shared":
        return 0.3
    if kind == "per-output":
        return np.array([0.2, 0.5, 0.9][:c])
    return 0.1 + rng.random((n, c))  # per observation (n, c): fixed


def oracle(criterion, Jd, y, mode, theta, noise_kind, fixed_noise):
    """The criterion at θ = (log s, log σ²...) from the dense formulas."""
    s = np.exp(theta[0])
    noise = fixed_noise if noise_kind == "per-observation" else np.exp(theta[1:]) if theta.size > 2 else \
        np.exp(theta[1])
    problems = column_problems(Jd, y, noise, mode)
    return brute_loo(problems, s) if criterion == "loo" else dense_lml(problems, s)


def central_differences(f, theta):
    out = np.zeros(theta.size)
    for k in range(theta.size):
        step = np.zeros(theta.size)
        step[k] = FD_STEP
        out[k] = (f(theta + step) - f(theta - step)) / (2 * FD_STEP)
    return out


CASES = [  # (method, output mode, noise)
    ("function-spectral", "full", "shared"),
    ("function-spectral", "trace", "per-output"),
    ("parameter-spectral", "independent", "per-output"),
    ("function-cholesky", "full", "per-output"),
    ("function-cholesky", "trace", "per-observation"),
    ("parameter-cholesky", "independent", "per-observation"),
]


@pytest.mark.parametrize("method,mode,noise_kind", CASES)
@pytest.mark.parametrize("criterion", ["loo", "evidence"])
def test_criterion_value_and_gradient_match_brute_force(backend, rng, criterion, method, mode, noise_kind):
    """The closed-form LOO (every engine) against refitting without each row, and every objective's gradient against
    central differences of the dense oracle."""
    n, c = 8, 3
    p = 5 if method.startswith("parameter") else 30  # parameter space when p < rows per task
    J, Jd, y = random_problem(backend, rng, n, c, p)
    noise = noise_of(noise_kind, n, c, rng)
    gp = lg.LinearizedGP(0.7, noise, mean="zero", output_mode=mode, method=method).fit(J, backend.asarray(y))
    spectral = method.endswith("spectral")
    objective = hyper.spectral_objective(gp, criterion) if spectral else hyper.cholesky_objective(gp, criterion)
    theta = np.log(np.concatenate([[0.7], np.ravel(noise)]))[: len(hyper.parameter_names(gp))]
    theta = theta + rng.uniform(-0.5, 0.5, theta.size)  # away from the fitted values
    value, grad = objective(theta)
    f = lambda t: oracle(criterion, Jd, y, mode, t, noise_kind, noise)  # noqa: E731
    expected = f(theta)
    np.testing.assert_allclose(-value, expected, rtol=RTOL)
    fd = central_differences(f, theta)
    np.testing.assert_allclose(-grad, fd, rtol=FD_RTOL, atol=FD_RTOL * np.abs(fd).max())


def test_spectral_cholesky_and_parameter_loo_agree(backend, rng):
    """One problem, one shared noise, four engines: the function- and parameter-space spectral forms, and the
    Cholesky form (which computes C⁻¹ column by column from the factor) give the same LOO and gradient."""
    J, Jd, y = random_problem(backend, rng, n=8, c=2, p=5)
    results = []
    for method in ("function-spectral", "parameter-spectral", "function-cholesky"):
        gp = lg.LinearizedGP(0.7, 0.3, mean="zero", output_mode="independent", method=method).fit(J,
                                                                                                  backend.asarray(y))
        make = hyper.cholesky_objective if method.endswith("cholesky") else hyper.spectral_objective
        objective = make(gp, "loo")
        results.append([objective(np.array(theta)) for theta in ([-0.4, -1.2], [1.5, -3.0], [-3.0, 0.5])])
    for other in results[1:]:
        for (value, grad), (value0, grad0) in zip(other, results[0]):
            np.testing.assert_allclose(value, value0, rtol=RTOL)
            np.testing.assert_allclose(grad, grad0, rtol=1e3 * RTOL, atol=1e3 * RTOL * np.abs(grad0).max())


@pytest.mark.parametrize("mode,noise_kind", [("full", "shared"), ("trace", "per-output"),
                                             ("independent", "per-observation")])
def test_optimize_loo_finds_the_brute_force_maximum(backend, rng, mode, noise_kind):
    n, c, p = 12, 3, 3
    J, Jd, y = random_problem(backend, rng, n, c, p)  # c·p < n: no output mode's kernel can interpolate the targets
    y = y + 3.0 * (Jd @ rng.standard_normal(p)).reshape(n, c)  # a signal the kernel explains: an interior optimum
    noise = noise_of(noise_kind, n, c, rng)
    gp = lg.LinearizedGP(1.0, noise, mean="zero", output_mode=mode).fit(J, backend.asarray(y))
    gp.optimize_hyperparameters(criterion="loo")
    opt = gp.optimization_
    theta = np.log(np.concatenate([[gp.prior_scale], np.ravel(gp.noise)]))[: len(hyper.parameter_names(gp))]
    f = lambda t: oracle("loo", Jd, y, mode, t, noise_kind, noise)  # noqa: E731
    best = f(theta)
    assert opt["success"] and opt["criterion"] == "loo" and opt["at_bound"] == [] and opt["hyperprior"] is None
    np.testing.assert_allclose(opt["criterion_value"], best, rtol=RTOL)
    for k in range(theta.size):  # a maximum: nearby points are lower
        for step in (-0.03, 0.03):
            assert f(theta + step * np.eye(theta.size)[k]) < best
    np.testing.assert_allclose(gp.log_marginal_likelihood(), oracle("evidence", Jd, y, mode, theta, noise_kind,
                                                                    noise), rtol=RTOL)
    if noise_kind == "per-observation":
        np.testing.assert_array_equal(gp.noise, noise)  # fixed: only s was fitted


def test_map_matches_the_grid_maximum_of_evidence_plus_log_prior(backend, rng):
    """criterion + log-normal hyperprior: the optimizer's maximum against a dense grid of the oracle, for both
    criteria on the spectral path (2-D grid) and the Cholesky path with fixed noise (1-D grid over s)."""
    n, c = 8, 2
    J, Jd, y = random_problem(backend, rng, n, c, 30)
    prior = hyper.Hyperprior(log_prior_scale=-2.0, log_noise=0.5, prior_scale_width=0.7, noise_width=0.4)

    def log_prior(log_s, log_noise):
        return (-0.5 * ((log_s + 2.0) / 0.7) ** 2 - np.log(0.7) - 0.5 * ((log_noise - 0.5) / 0.4) ** 2 - np.log(0.4)
                - np.log(2 * np.pi))

    gp = lg.LinearizedGP(1.0, 0.3, mean="zero", output_mode="full").fit(J, backend.asarray(y))
    gp.optimize_hyperparameters(hyperprior=prior)
    grid_s, grid_noise = np.linspace(-5, 1, 61), np.linspace(-1.5, 2.5, 41)
    problems = [column_problems(Jd, y, np.exp(b), "full") for b in grid_noise]
    values = np.array([[dense_lml(problems[j], np.exp(a)) + log_prior(a, b) for j, b in enumerate(grid_noise)]
                       for a in grid_s])
    i, j = np.unravel_index(np.argmax(values), values.shape)
    found = np.log([gp.prior_scale, gp.noise])
    value = gp.optimization_["criterion_value"] + gp.optimization_["log_hyperprior"]
    np.testing.assert_allclose(value, dense_lml(column_problems(Jd, y, gp.noise, "full"), gp.prior_scale)
                               + log_prior(*found), rtol=RTOL)
    assert value >= values.max() - RTOL * abs(values.max())
    assert abs(found[0] - grid_s[i]) <= 0.1 and abs(found[1] - grid_noise[j]) <= 0.1  # within one grid step
    assert gp.optimization_["hyperprior"] == prior.as_dict()

    fixed = 0.1 + rng.random((n, c))  # the Cholesky path with fixed noise: s alone, LOO + prior on s
    gp = lg.LinearizedGP(1.0, fixed, mean="zero", output_mode="trace").fit(J, backend.asarray(y))
    gp.optimize_hyperparameters(criterion="loo", hyperprior=prior)
    grid = np.linspace(-4.5, 0.5, 101)
    problems = column_problems(Jd, y, fixed, "trace")
    values = np.array([brute_loo(problems, np.exp(a)) - 0.5 * ((a + 2.0) / 0.7) ** 2 for a in grid])
    found = np.log(gp.prior_scale)
    assert brute_loo(problems, gp.prior_scale) - 0.5 * ((found + 2.0) / 0.7) ** 2 >= values.max() - 1e-9
    assert abs(found - grid[np.argmax(values)]) <= 0.05


def test_data_hyperprior_is_centred_on_the_data_scaled_guess(backend, rng):
    n, c = 8, 2
    J, Jd, y = random_problem(backend, rng, n, c, 30)
    gp = lg.LinearizedGP(1.0, 0.3, mean="zero", output_mode="independent").fit(J, backend.asarray(y))
    gp.optimize_hyperparameters(criterion="loo", hyperprior="data")
    noise0 = 0.5 * np.mean(y**2)
    s0 = noise0 / np.mean(np.sum(Jd**2, axis=1))  # mean diag of the independent kernels = mean squared row norm
    recorded = gp.optimization_["hyperprior"]
    np.testing.assert_allclose([recorded["log_prior_scale"], recorded["log_noise"]], np.log([s0, noise0]), rtol=RTOL)
    assert (recorded["prior_scale_width"], recorded["noise_width"]) == (hyper.DATA_PRIOR_WIDTH, hyper.DATA_NOISE_WIDTH)


def test_a_hyperparameter_at_its_bound_warns_and_is_recorded(backend, rng):
    """Targets orthogonal to the Jacobian's column space: the evidence decreases in s everywhere, so s ends at
    e^-30; the warning names the parameter and what it means, and at_bound lists it."""
    n, c, p = 8, 2, 5
    J, Jd, y = random_problem(backend, rng, n, c, p)
    basis, _ = np.linalg.qr(Jd)
    r = rng.standard_normal(n * c)
    y = (r - basis @ (basis.T @ r)).reshape(n, c)
    gp = lg.LinearizedGP(1.0, 0.3, mean="zero", method="function-spectral").fit(J, backend.asarray(y))
    with warnings.catch_warnings():  # warnings as errors: the search raises before it commits
        warnings.simplefilter("error")
        with pytest.raises(lg.NumericalWarning):
            gp.optimize_hyperparameters()
    assert gp.prior_scale == 1.0 and gp.noise == 0.3 and not hasattr(gp, "optimization_")
    with pytest.warns(lg.NumericalWarning, match=r"prior_scale = 9\.36e-14 \(s at its lower bound e\^-30\): the data "
                                                 r"are explained as noise.*criterion='loo' or a hyperprior"):
        gp.optimize_hyperparameters()
    assert gp.optimization_["at_bound"] == ["prior_scale"]
    assert np.log(gp.prior_scale) == pytest.approx(hyper.LOG_BOUNDS[0], abs=hyper.BOUND_TOLERANCE)
    np.testing.assert_allclose(gp.noise, np.mean(y**2), rtol=1e-6)  # all noise: σ² = the targets' mean square


def test_spectral_loo_checks_its_work_array_against_the_memory_budget(backend, rng):
    """Function-space LOO holds U∘U (m × m float64) beside the engines: one byte short of that is refused, with the
    alternative named; exactly enough runs."""
    J, Jd, y = random_problem(backend, rng, 8, 2, 5)
    y = y + 3.0 * (Jd @ rng.standard_normal(5)).reshape(8, 2)  # signal and noise: an interior optimum
    gp = lg.LinearizedGP(1.0, 0.3, method="function-spectral").fit(J, backend.asarray(y))
    needed = _plan.engine_bytes("function-spectral", gp._problem(J)) + 8 * 16 * 16  # m = n·c = 16 rows
    gp.memory_budget = needed - 1
    with pytest.raises(lg.MemoryBudgetError, match="criterion='loo'.*use criterion='evidence'"):
        gp.optimize_hyperparameters(criterion="loo")
    assert not hasattr(gp, "optimization_")
    gp.memory_budget = needed
    assert gp.optimize_hyperparameters(criterion="loo").optimization_["criterion"] == "loo"


def test_bad_arguments_raise_the_right_error(backend, rng):
    J, _, y = random_problem(backend, rng, 6, 2, 10)
    gp = lg.LinearizedGP(1.0, 0.3).fit(J, backend.asarray(y))
    with pytest.raises(lg.InvalidOptionError, match="criterion must be one of 'evidence', 'loo'; got 'LOO'"):
        gp.optimize_hyperparameters(criterion="LOO")
    with pytest.raises(lg.InvalidOptionError, match="criterion"):
        gp.optimize_hyperparameters(criterion=None)
    with pytest.raises(lg.InvalidOptionError, match="hyperprior must be None, 'data' or a Hyperprior; got 'flat'"):
        gp.optimize_hyperparameters(hyperprior="flat")
    with pytest.raises(lg.ArgumentTypeError, match="hyperprior must be .* got builtins.float 1.0"):
        gp.optimize_hyperparameters(hyperprior=1.0)
    with pytest.raises(lg.ValueRangeError, match="prior_scale_width must be finite and > 0, got 0"):
        hyper.Hyperprior(prior_scale_width=0)
    with pytest.raises(lg.NonFiniteError, match="log_noise must be finite, got nan"):
        hyper.Hyperprior(log_noise=float("nan"))
    with pytest.raises(lg.ArgumentTypeError, match="log_prior_scale must be a real number"):
        hyper.Hyperprior(log_prior_scale="-2")
    with pytest.raises(lg.InvalidOptionError, match="data-scaled guess, which needs a fitted model"):
        hyper.Hyperprior().log_density(0.0, 0.0)
    flat = lg.LinearizedGP(1.0, 0.3, mean="zero").fit(J, backend.asarray(np.zeros(y.shape)))
    with pytest.raises(lg.ValueRangeError, match="hyperprior='data' .* mean square about the prior mean is 0"):
        flat.optimize_hyperparameters(hyperprior="data")
    fixed = lg.LinearizedGP(1.0, 0.1 + rng.random(y.shape), method="function-cholesky").fit(J, backend.asarray(y))
    for value in (True, False):
        with pytest.raises(lg.InvalidOptionError, match=r"per observation \(6, 2\) and stays fixed"):
            fixed.optimize_hyperparameters(per_output_noise=value)
    assert not hasattr(gp, "optimization_") and not hasattr(fixed, "optimization_")


def test_after_settling_on_a_bound_the_other_hyperparameters_are_reoptimized():
    """LOO with per-output noise where the optimum has s at its lower bound: with s → 0, C = diag(σ²_k) and the LOO
    density Σ log N(r_ik | 0, σ²_k) peaks at σ²_k = mean_i r_ik² — the noise must be re-fitted there, not left at the
    values tuned for the interior point L-BFGS stopped at."""
    import torch

    import backends
    from tests.test_gp import problem

    torch.manual_seed(0)
    J, _, y, o = problem(backends.get_backend("numpy"), np.random.default_rng(0), c=2)
    gp = lg.LinearizedGP(1.0, 0.3, output_mode="full", method="function-cholesky").fit(J, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lg.NumericalWarning)  # s at its bound is the point of the case
        gp.optimize_hyperparameters(criterion="loo", per_output_noise=True)
    assert gp.optimization_["at_bound"] == ["prior_scale"]
    r = o["y"] - o["f"]
    np.testing.assert_allclose(gp.noise, (r**2).mean(axis=0), rtol=1e-5)
