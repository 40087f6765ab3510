"""The reproductions' baselines (benchmarks/_baselines.py) against independent float64 closed forms.

ABLR-style Bayesian linear regression: its SVD evidence against the dense Gaussian log-density, its gradient against
finite differences, its evidence-optimal (α, β) against scikit-learn's BayesianRidge (MacKay's fixed point, flat
hyperpriors), its weight-space posterior against the function-space (GP) formulas. Training loops: last-layer
retraining and fine-tuning of models whose optimum is a least-squares solution reach numpy's lstsq answer. lingp
through the helper: each point choice of (s, σ²) against a dense GP at that point (evidence and leave-one-out also as
local maxima of the dense criteria, leave-one-out computed by refitting without each point), averaging against the
dense mixture of its grid (weights against dense evidence ratios).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _baselines as bl  # noqa: E402
from lingp_core import DTypeError, InvalidOptionError, NonFiniteError, ShapeError, ValueRangeError  # noqa: E402
from lingp_core._hyperparameters import DATA_NOISE_WIDTH, DATA_PRIOR_WIDTH  # noqa: E402


def regression_data(rng: np.random.Generator, n: int, d: int, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    phi = rng.standard_normal((n, d))
    return phi, phi @ rng.standard_normal(d) + noise * rng.standard_normal(n)


def dense_log_evidence(phi: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y; 0, ΦΦᵀ/α + I/β) by a dense slogdet and solve."""
    n = y.shape[0]
    cov = phi @ phi.T / alpha + np.eye(n) / beta
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    return float(-0.5 * (y @ np.linalg.solve(cov, y) + logdet + n * np.log(2 * np.pi)))


def with_bias(phi: np.ndarray) -> np.ndarray:
    return np.hstack([phi, np.ones((phi.shape[0], 1))])


@pytest.mark.parametrize(("n", "d"), [(40, 6), (8, 20)], ids=["n>d", "n<d"])
def test_log_evidence_matches_dense_density(rng, n, d):
    phi, y = regression_data(rng, n, d)
    for alpha, beta in [(0.5, 4.0), (30.0, 0.2)]:
        got = bl.BayesianLinearRegression().log_evidence(phi, y, alpha, beta)
        assert isinstance(got, float)
        np.testing.assert_allclose(got, dense_log_evidence(with_bias(phi), y, alpha, beta), rtol=1e-11)


def test_evidence_gradient_matches_finite_differences(rng):
    phi, y = regression_data(rng, 30, 5)
    blr = bl.BayesianLinearRegression(add_bias=False)
    point = np.array([np.log(0.7), np.log(3.0)])

    def neg_log_evidence(log_params):
        return -dense_log_evidence(phi, y, *np.exp(log_params))

    blr.log_evidence(phi, y, 1.0, 1.0)  # caches the spectrum of this data
    _, grad = blr._neg_log_evidence(point)
    step = 1e-6
    numeric = [(neg_log_evidence(point + step * e) - neg_log_evidence(point - step * e)) / (2 * step)
               for e in np.eye(2)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-6)


def test_fit_matches_sklearn_bayesian_ridge(rng):
    from sklearn.linear_model import BayesianRidge

    phi, y = regression_data(rng, 60, 5)
    ours = bl.BayesianLinearRegression(add_bias=False).fit(phi, y)
    ref = BayesianRidge(fit_intercept=False, alpha_1=0, alpha_2=0, lambda_1=0, lambda_2=0, tol=1e-14,
                        max_iter=100_000).fit(phi, y)
    # sklearn calls the noise precision alpha_ and the weight precision lambda_
    np.testing.assert_allclose([ours.alpha_, ours.beta_], [ref.lambda_, ref.alpha_], rtol=1e-6)
    np.testing.assert_allclose(ours.mean_, ref.coef_, rtol=1e-6)
    assert ours.log_evidence_ >= dense_log_evidence(phi, y, ref.lambda_, ref.alpha_) - 1e-9


def test_fit_is_a_local_maximum_of_the_dense_evidence(rng):
    phi, y = regression_data(rng, 40, 6)
    blr = bl.BayesianLinearRegression().fit(phi, y)
    design = with_bias(phi)
    best = dense_log_evidence(design, y, blr.alpha_, blr.beta_)
    np.testing.assert_allclose(blr.log_evidence_, best, rtol=1e-10)
    for fa, fb in [(1.05, 1), (1 / 1.05, 1), (1, 1.05), (1, 1 / 1.05)]:
        assert dense_log_evidence(design, y, blr.alpha_ * fa, blr.beta_ * fb) <= best + 1e-10


def test_interpolating_fit_stops_at_the_noise_floor(rng):
    # n < d: the evidence rises monotonically as the noise goes to 0, so the fit must end on the floor
    phi, y = regression_data(rng, 8, 20)
    blr = bl.BayesianLinearRegression(min_noise_fraction=1e-4).fit(phi, y)
    np.testing.assert_allclose(1 / blr.beta_, 1e-4 * np.var(y), rtol=1e-10)
    design = with_bias(phi)
    at_floor = dense_log_evidence(design, y, blr.alpha_, blr.beta_)
    assert dense_log_evidence(design, y, blr.alpha_, blr.beta_ / 2) < at_floor
    for fa in (1.05, 1 / 1.05):
        assert dense_log_evidence(design, y, blr.alpha_ * fa, blr.beta_) <= at_floor + 1e-10


@pytest.mark.parametrize(("n", "d", "fixed"), [(40, 6, False), (40, 6, True), (8, 20, True)],
                         ids=["n>d-fitted", "n>d-fixed", "n<d-fixed"])
def test_posterior_matches_function_space_formulas(rng, n, d, fixed):
    phi, y = regression_data(rng, n, d)
    phi_star = rng.standard_normal((7, d))
    blr = bl.BayesianLinearRegression()
    blr.fit(phi, y, alpha=0.8, beta=5.0) if fixed else blr.fit(phi, y)
    if fixed:
        assert (blr.alpha_, blr.beta_) == (0.8, 5.0)
    mean, var = blr.predict(phi_star)
    a, b = with_bias(phi), with_bias(phi_star)
    k = a @ a.T / blr.alpha_ + np.eye(n) / blr.beta_          # Cov(y)
    k_star = b @ a.T / blr.alpha_                              # Cov(f*, y)
    expected_mean = k_star @ np.linalg.solve(k, y)
    expected_var = np.sum(b * b, axis=1) / blr.alpha_ - np.sum(k_star * np.linalg.solve(k, k_star.T).T, axis=1)
    for got, expected in [(mean, expected_mean), (var, expected_var)]:
        assert got.dtype == np.float64 and got.shape == (7,)
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


def test_bayesian_regression_rejects_bad_inputs(rng):
    phi, y = regression_data(rng, 10, 3)
    blr = bl.BayesianLinearRegression()
    with pytest.raises(DTypeError, match="float32"):
        blr.fit(phi.astype(np.float32), y)
    with pytest.raises(ShapeError, match=r"\(9,\)"):
        blr.fit(phi, y[:9])
    with pytest.raises(ShapeError, match=r"\(10,\)"):
        blr.fit(phi[:, 0], y)
    bad = y.copy()
    bad[3] = np.nan
    with pytest.raises(NonFiniteError):
        blr.fit(phi, bad)
    with pytest.raises(ValueRangeError, match="beta=0"):
        blr.fit(phi, y, beta=0.0)
    blr.fit(phi, y)
    with pytest.raises(ShapeError, match="4 columns"):
        blr.predict(rng.standard_normal((2, 4)))


# ----- training loops ---------------------------------------------------------------------------------------------

import torch  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny networks train fastest on one thread (and far faster on a busy machine); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(seed: int, widths=(6, 4, 1)):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(widths[0], widths[1]), torch.nn.Tanh(),
                               torch.nn.Linear(widths[1], widths[2])).double()


def lstsq_fit(design: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(design, y, rcond=None)[0]


def test_hidden_features_are_the_last_layer_inputs(rng):
    model = mlp(0)
    x = torch.from_numpy(rng.standard_normal((5, 6)))
    feats = bl.hidden_features(model, x)
    assert feats.shape == (5, 4) and feats.dtype == torch.float64
    expected = np.tanh(x.numpy() @ model[0].weight.detach().numpy().T + model[0].bias.detach().numpy())
    np.testing.assert_allclose(feats.numpy(), expected, rtol=1e-12)
    assert bl.last_linear(model) is model[2]
    with pytest.raises(ValueRangeError, match="no torch.nn.Linear"):
        bl.last_linear(torch.nn.Tanh())
    with pytest.raises(ValueRangeError, match="is a Conv1d, not a torch.nn.Linear"):
        bl.last_linear(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Conv1d(1, 1, 1)))


def test_retrain_last_layer_reaches_least_squares_and_leaves_the_rest(rng):
    model = mlp(1)
    source = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.from_numpy(2 * rng.standard_normal((40, 6)))   # well-conditioned features: Adam converges fast
    y = torch.from_numpy(rng.standard_normal((40, 1)))
    adapted = bl.retrain_last_layer(model, x, y, steps=1000, lr=0.1)
    for key, value in model.state_dict().items():          # the source network is untouched
        assert torch.equal(value, source[key])
    for key in ("0.weight", "0.bias"):                     # the hidden layer of the copy too
        assert torch.equal(adapted.state_dict()[key], source[key])
    design = with_bias(bl.to_numpy(bl.hidden_features(model, x)))
    coef = lstsq_fit(design, y.numpy()[:, 0])
    got = np.concatenate([adapted[2].weight.detach().numpy()[0], adapted[2].bias.detach().numpy()])
    np.testing.assert_allclose(got, coef, rtol=1e-8, atol=1e-8 * np.abs(coef).max())
    assert not adapted.training


def test_fine_tune_of_a_linear_model_reaches_least_squares(rng):
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 1)).double()
    x = torch.from_numpy(rng.standard_normal((30, 4)))
    y = torch.from_numpy(rng.standard_normal((30, 1)))
    adapted = bl.fine_tune(model, x, y, steps=1000, lr=0.1)
    coef = lstsq_fit(with_bias(x.numpy()), y.numpy()[:, 0])
    got = np.concatenate([adapted[0].weight.detach().numpy()[0], adapted[0].bias.detach().numpy()])
    np.testing.assert_allclose(got, coef, rtol=1e-8, atol=1e-8 * np.abs(coef).max())
    assert not torch.equal(model[0].weight, adapted[0].weight)


def test_linearized_network_is_the_first_order_taylor_expansion(rng):
    # oracle: f(x; θ̂) + J(x) δ with J from torch.func.jacrev (tests.helpers.torch_jacobian), δ set by hand
    from tests.helpers import torch_jacobian

    model = mlp(4)
    x = torch.from_numpy(rng.standard_normal((9, 6)))
    lin = bl.linearized(model)
    assert [name for name, _ in lin.named_parameters()] == [f"delta.{i}" for i in range(len(lin.names))]
    J, f0 = torch_jacobian(model, x)
    delta = rng.standard_normal(J.shape[1])
    with torch.no_grad():
        start = 0
        for d in lin.delta:
            d.copy_(torch.from_numpy(delta[start:start + d.numel()]).reshape(d.shape))
            start += d.numel()
    got = bl.predict(lin, x).numpy()
    want = f0 + (J @ delta).reshape(f0.shape)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), lin.source.parameters()))  # source untouched


def test_linearized_fine_tune_of_a_linear_model_is_fine_tuning(rng):
    # a network linear in its parameters is its own Taylor expansion: the same Adam steps give the same predictions
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 1)).double()
    x = torch.from_numpy(rng.standard_normal((20, 4)))
    y = torch.from_numpy(rng.standard_normal((20, 1)))
    tuned = bl.predict(bl.fine_tune(model, x, y, steps=40, lr=0.05), x).numpy()
    linear = bl.predict(bl.linearized_fine_tune(model, x, y, steps=40, lr=0.05), x).numpy()
    np.testing.assert_allclose(linear, tuned, rtol=1e-10, atol=1e-12)
    assert not np.allclose(tuned, bl.predict(model, x).numpy())  # it did train


def test_train_mse_lowers_the_loss_with_minibatches_and_is_seeded(rng):
    x = torch.from_numpy(rng.standard_normal((64, 6)))
    y = 0.5 * x[:, :1] - 0.3 * x[:, 1:2]                     # representable by the network
    runs = []
    for _ in range(2):
        model = mlp(3)
        runs.append(bl.train_mse(model, x, y, steps=300, lr=1e-2, batch_size=16, seed=5))
    assert runs[0] == runs[1] and len(runs[0]) == 300
    assert np.mean(runs[0][-20:]) < 0.5 * np.mean(runs[0][:20])


def test_train_mse_rejects_bad_inputs(rng):
    model = mlp(0)
    x = torch.from_numpy(rng.standard_normal((6, 6)))
    with pytest.raises(ShapeError, match=r"\(6,\)"):
        bl.train_mse(model, x, torch.zeros(6, dtype=torch.float64), steps=1, lr=1e-3)
    with pytest.raises(ShapeError, match=r"\(5, 1\)"):
        bl.train_mse(model, x, torch.zeros(5, 1, dtype=torch.float64), steps=1, lr=1e-3)
    y = torch.zeros(6, 1, dtype=torch.float64)
    y[2] = float("inf")
    with pytest.raises(NonFiniteError):
        bl.train_mse(model, x, y, steps=1, lr=1e-3)
    with pytest.raises(ValueRangeError, match="lr=0"):
        bl.train_mse(model, x, torch.zeros(6, 1, dtype=torch.float64), steps=1, lr=0)


def test_mean_and_stderr():
    values = [1.0, 2.0, 4.0, 7.0]
    mean, stderr = bl.mean_and_stderr(values)
    assert mean == pytest.approx(3.5)
    assert stderr == pytest.approx(np.sqrt(np.var(values, ddof=1) / 4))
    assert bl.mean_and_stderr([2.5]) == (2.5, 0.0)


# ----- lingp through the helper -----------------------------------------------------------------------------------

def dense_jacobian(model, x) -> np.ndarray:
    """(n, p) float64 Jacobian of a one-output model by torch.func, columns in named_parameters order."""
    params = dict(model.named_parameters())

    def f(p, xi):
        return torch.func.functional_call(model, p, (xi[None],))[0, 0]

    jac = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, x)
    return np.hstack([jac[name].reshape(x.shape[0], -1).detach().numpy() for name in params])


def dense_lml(j: np.ndarray, residual: np.ndarray, s: float, noise: float) -> float:
    """log N(residual; 0, s J Jᵀ + σ²I) by a dense slogdet and solve."""
    cov = s * j @ j.T + noise * np.eye(j.shape[0])
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    return float(-0.5 * (residual @ np.linalg.solve(cov, residual) + logdet + j.shape[0] * np.log(2 * np.pi)))


def dense_loo(j: np.ndarray, residual: np.ndarray, s: float, noise: float) -> float:
    """Σᵢ log p(yᵢ | y₋ᵢ) of the GP by leaving each point out and conditioning on the rest (no closed form)."""
    cov = s * j @ j.T + noise * np.eye(j.shape[0])
    total = 0.0
    for i in range(j.shape[0]):
        rest = np.arange(j.shape[0]) != i
        weights = np.linalg.solve(cov[np.ix_(rest, rest)], cov[rest, i])
        mean, var = weights @ residual[rest], cov[i, i] - weights @ cov[rest, i]
        total += -0.5 * (np.log(2 * np.pi * var) + (residual[i] - mean) ** 2 / var)
    return total


def dense_log_data_prior(j: np.ndarray, residual: np.ndarray, s: Any, noise: Any) -> Any:
    """hyperprior="data" as documented, up to a constant: log s ~ N(log s₀, w²), log σ² ~ N(log σ²₀, w²) with
    σ²₀ = mean(r²) / 2, s₀ = σ²₀ / mean diag(J Jᵀ), widths DATA_PRIOR_WIDTH (s) and DATA_NOISE_WIDTH (σ²)."""
    noise0 = 0.5 * np.mean(residual**2)
    s0 = noise0 / np.mean(np.sum(j**2, axis=1))
    return -0.5 * (((np.log(s) - np.log(s0)) / DATA_PRIOR_WIDTH) ** 2
                   + ((np.log(noise) - np.log(noise0)) / DATA_NOISE_WIDTH) ** 2)


def dense_posterior(j: np.ndarray, j_star: np.ndarray, residual: np.ndarray, s: float,
                    noise: float) -> tuple[np.ndarray, np.ndarray]:
    """The correction to the network's mean at the test inputs and the latent variance, s J*Jᵀ C⁻¹ r and
    s diag(J*J*ᵀ) − diag(s J*Jᵀ C⁻¹ s J Jᵀ*)."""
    cov = s * j @ j.T + noise * np.eye(j.shape[0])
    k_star = s * j_star @ j.T
    return (k_star @ np.linalg.solve(cov, residual),
            s * np.sum(j_star**2, axis=1) - np.sum(k_star * np.linalg.solve(cov, k_star.T).T, axis=1))


@pytest.fixture(scope="module")
def small_problem():
    """A 2-5-1 tanh network, 12 noisy observations of sin(x₁), 6 test inputs, and their dense float64 Jacobians."""
    rng = np.random.default_rng(7)
    model = mlp(4, widths=(2, 5, 1)).eval()
    x = torch.from_numpy(rng.standard_normal((12, 2)))
    y = torch.sin(x[:, :1]) + 0.1 * torch.from_numpy(rng.standard_normal((12, 1)))
    x_star = torch.from_numpy(rng.standard_normal((6, 2)))
    f0, f0_star = bl.to_numpy(bl.predict(model, x))[:, 0], bl.to_numpy(bl.predict(model, x_star))[:, 0]
    return {"model": model, "x": x, "y": y, "x_star": x_star, "j": dense_jacobian(model, x),
            "j_star": dense_jacobian(model, x_star), "f0_star": f0_star, "residual": y.numpy()[:, 0] - f0}


def perturbed(s: float, noise: float) -> list[tuple[float, float]]:
    """(s, σ²) moved by 10% along each axis."""
    return [(1.1 * s, noise), (s / 1.1, noise), (s, 1.1 * noise), (s, noise / 1.1)]


@pytest.mark.parametrize("choice", ["evidence", "loo", "map"])
def test_linearized_gp_matches_a_dense_gp_at_its_hyperparameters(small_problem, choice):
    d = small_problem
    out = bl.linearized_gp(d["model"], d["x"], d["y"], d["x_star"], hyperparameters=choice)
    s, noise = out["prior_scale"], out["noise"]
    assert out["hyperparameters"] == choice and out["averaging"] is None and out["predictive_noise"] == noise
    correction, expected_var = dense_posterior(d["j"], d["j_star"], d["residual"], s, noise)
    assert out["mean"].shape == (6, 1) and out["var"].shape == (6, 1) and out["mean"].dtype == np.float64
    np.testing.assert_allclose(out["mean"][:, 0], d["f0_star"] + correction, rtol=1e-8, atol=1e-10)
    prior = s * np.sum(d["j_star"] ** 2, 1).max()
    np.testing.assert_allclose(out["var"][:, 0], expected_var, rtol=1e-6, atol=1e-10 * prior)
    lml = dense_lml(d["j"], d["residual"], s, noise)
    np.testing.assert_allclose(out["log_marginal_likelihood"], lml, rtol=1e-8)
    assert out["p"] == d["j"].shape[1] == 2 * 5 + 5 + 5 + 1
    if choice == "evidence":  # a maximum of the dense marginal likelihood along s and σ²
        assert all(dense_lml(d["j"], d["residual"], *point) <= lml + 1e-7 for point in perturbed(s, noise))
    elif choice == "loo":  # a maximum of the leave-one-out density, computed here by refitting without each point
        loo = dense_loo(d["j"], d["residual"], s, noise)
        assert all(dense_loo(d["j"], d["residual"], *point) <= loo + 1e-7 for point in perturbed(s, noise))
    else:  # a maximum of the dense evidence + log hyperprior, away from the evidence's own maximum
        def log_posterior(s, noise):
            return dense_lml(d["j"], d["residual"], s, noise) + dense_log_data_prior(d["j"], d["residual"], s, noise)
        top = log_posterior(s, noise)
        assert all(log_posterior(*point) <= top + 1e-7 for point in perturbed(s, noise))
        best = bl.linearized_gp(d["model"], d["x"], d["y"], d["x_star"], hyperparameters="evidence")
        assert lml < best["log_marginal_likelihood"] - 1e-3


@pytest.mark.parametrize("choice", ["average", "average-map"])
def test_linearized_gp_average_is_the_dense_mixture_of_its_grid(small_problem, choice):
    d = small_problem
    out = bl.linearized_gp(d["model"], d["x"], d["y"], d["x_star"], hyperparameters=choice)
    mixture = out["averaging"]["mixture"]
    scales, noises, weights = (np.asarray(mixture[k]) for k in ("prior_scales", "noises", "weights"))
    assert out["hyperparameters"] == choice and weights.size >= 2 and weights.sum() == pytest.approx(1.0, rel=1e-12)
    parts = [dense_posterior(d["j"], d["j_star"], d["residual"], s, n) for s, n in zip(scales, noises)]
    means = np.array([d["f0_star"] + c for c, _ in parts])
    mean = weights @ means
    var = weights @ (np.array([v for _, v in parts]) + (means - mean) ** 2)
    np.testing.assert_allclose(out["mean"][:, 0], mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(out["var"][:, 0], var, rtol=1e-6, atol=1e-10 * var.max())
    assert out["predictive_noise"] == pytest.approx(weights @ noises, rel=1e-12)
    heaviest = int(np.argmax(weights))
    assert (out["prior_scale"], out["noise"]) == pytest.approx((scales[heaviest], noises[heaviest]), rel=1e-12)
    assert out["averaging"]["effective_points"] == pytest.approx(1 / np.sum(weights**2), rel=1e-12)
    # weight ratios: dense evidence ratios (a flat prior on the log grid) times the hyperprior's ratios
    log_w = np.array([dense_lml(d["j"], d["residual"], s, n) for s, n in zip(scales, noises)])
    if choice == "average-map":
        log_w += dense_log_data_prior(d["j"], d["residual"], scales, noises)
    np.testing.assert_allclose(np.log(weights) - np.log(weights[heaviest]), log_w - log_w[heaviest], atol=1e-6)


@pytest.mark.parametrize("choice", ["layerwise-average", "layerwise-average-map"])
def test_linearized_gp_layerwise_is_the_block_weight_average(small_problem, choice):
    import lingp_core as lg

    d = small_problem
    out = bl.linearized_gp(d["model"], d["x"], d["y"], d["x_star"], hyperparameters=choice)
    J, J_star = bl.export_pair(d["model"], d["x"], d["x_star"], "numpy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lg.NumericalWarning)
        avg = lg.BlockWeightAverage(mean="network", hyperprior="data" if choice.endswith("map") else None)
        avg.fit(J, d["y"].numpy())
    mean, var = avg.predict(J_star, return_var=True)
    np.testing.assert_array_equal(out["mean"], mean)
    np.testing.assert_array_equal(out["var"], var)
    assert out["hyperparameters"] == choice and out["averaging"] is None
    assert out["predictive_noise"] == avg.predictive_noise_
    assert bl.lingp_record(out)["layerwise"]["components"] == len(avg.models_)


def flat_parameters(model: Any) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])


def test_linearized_gp_head_prior_is_the_dense_gp_with_the_output_layer_centred_at_zero(small_problem):
    d = small_problem
    out = bl.linearized_gp(d["model"], d["x"], d["y"], d["x_star"], hyperparameters="evidence", prior="head")
    s, noise = out["prior_scale"], out["noise"]
    assert out["prior"] == "head" and bl.output_layer_names(d["model"]) == ["2.weight", "2.bias"]
    theta_head = flat_parameters(d["model"]) * (np.arange(d["j"].shape[1]) >= 2 * 5 + 5)  # 2.weight, 2.bias last
    shift, shift_star = d["j"] @ theta_head, d["j_star"] @ theta_head  # prior mean: f0 − J θ̂_head (= 0 here)
    correction, expected_var = dense_posterior(d["j"], d["j_star"], d["residual"] + shift, s, noise)
    np.testing.assert_allclose(out["mean"][:, 0], d["f0_star"] - shift_star + correction, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(d["f0_star"] - shift_star, 0.0, atol=1e-12)  # a linear output layer with a bias
    np.testing.assert_allclose(out["var"][:, 0], expected_var, rtol=1e-6, atol=1e-10 * expected_var.max())
    lml = dense_lml(d["j"], d["residual"] + shift, s, noise)
    np.testing.assert_allclose(out["log_marginal_likelihood"], lml, rtol=1e-8)
    assert all(dense_lml(d["j"], d["residual"] + shift, *point) <= lml + 1e-7 for point in perturbed(s, noise))


def centre_results(d: dict, hyperparameters: str) -> tuple[dict, dict]:
    """linearized_gp with prior "network+head", and with each centre alone."""
    args = (d["model"], d["x"], d["y"], d["x_star"])
    out = bl.linearized_gp(*args, hyperparameters=hyperparameters, prior="network+head")
    return out, {centre: bl.linearized_gp(*args, hyperparameters=hyperparameters, prior=centre)
                 for centre in ("network", "head")}


def test_linearized_gp_network_plus_head_is_the_evidence_weighted_mixture(small_problem):
    d = small_problem
    out, parts = centre_results(d, "evidence")
    theta_head = flat_parameters(d["model"]) * (np.arange(d["j"].shape[1]) >= 2 * 5 + 5)
    shifts = {"network": (0.0, 0.0), "head": (d["j"] @ theta_head, d["j_star"] @ theta_head)}
    log_ml, means, variances = [], [], []
    for centre in ("network", "head"):  # each centre by the dense formulas at the hyperparameters it chose
        shift, shift_star = shifts[centre]
        s, noise = parts[centre]["prior_scale"], parts[centre]["noise"]
        correction, var = dense_posterior(d["j"], d["j_star"], d["residual"] + shift, s, noise)
        log_ml.append(dense_lml(d["j"], d["residual"] + shift, s, noise))
        means.append(d["f0_star"] - shift_star + correction)
        variances.append(var)
    weights = np.exp(np.array(log_ml) - max(log_ml))
    weights /= weights.sum()
    assert 1e-6 < weights[0] < 1 - 1e-6  # both centres matter here: the mixture is tested, not one of its parts
    mean = weights @ np.array(means)
    var = weights @ (np.array(variances) + (np.array(means) - mean) ** 2)
    np.testing.assert_allclose(out["mean"][:, 0], mean, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(out["var"][:, 0], var, rtol=1e-6, atol=1e-10 * var.max())
    assert out["prior_weights"] == pytest.approx({"network": weights[0], "head": weights[1]}, rel=1e-6)
    assert out["predictive_noise"] == pytest.approx(weights @ [parts[c]["noise"] for c in ("network", "head")])
    assert bl.lingp_record(out)["prior_weights"] == out["prior_weights"] and out["prior"] == "network+head"


def test_network_plus_head_weighs_averaged_centres_by_their_integrated_evidence(small_problem):
    out, parts = centre_results(small_problem, "average-map")
    for part in parts.values():  # the grid's integrated evidence (× hyperprior), not its heaviest point's
        assert abs(part["log_evidence"] - part["log_marginal_likelihood"]) > 1e-3
    log_evidence = np.array([parts[c]["log_evidence"] for c in ("network", "head")])
    weights = np.exp(log_evidence - log_evidence.max())
    weights /= weights.sum()
    assert out["prior_weights"] == pytest.approx({"network": weights[0], "head": weights[1]}, rel=1e-9)
    mean = weights[0] * parts["network"]["mean"] + weights[1] * parts["head"]["mean"]
    np.testing.assert_allclose(out["mean"], mean, rtol=1e-10, atol=1e-12)
    assert out["log_evidence"] == pytest.approx(np.log(np.mean(np.exp(log_evidence - log_evidence.max())))
                                                + log_evidence.max(), rel=1e-12)


def test_readme_prior_centre_snippet_is_the_reproductions_default(small_problem):
    # README's snippet (mean="zero" for the output layer at 0, which a linear output layer with a bias makes exact)
    # gives what the reproductions run by default: prior "network+head" with layerwise-average-map
    import re
    import textwrap

    import lingp_core as lg

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    snippet, = [block for block in re.findall(r"```python\n(.*?)```", text, flags=re.S)
                if 'for centre in ("network", "zero")' in block]
    d = small_problem
    J, J_star = bl.export_pair(d["model"], d["x"], d["x_star"], "numpy")
    scope = {"lg": lg, "np": np, "J": J, "J_star": J_star, "y": d["y"].numpy()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lg.NumericalWarning)
        exec(textwrap.dedent(snippet), scope)  # noqa: S102  the README's own text (indented in its list item)
    out = bl.linearized_gp(d["model"], d["x"], d["y"], d["x_star"], prior=bl.DEFAULT_PRIOR,
                           hyperparameters=bl.DEFAULT_HYPERPARAMETERS)
    assert bl.DEFAULT_PRIOR == "network+head" and 1e-6 < scope["weights"][0] < 1 - 1e-6
    np.testing.assert_allclose(scope["mean"], out["mean"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(scope["var"], out["var"], rtol=1e-9, atol=1e-12 * np.abs(out["var"]).max())


def test_head_prior_needs_the_output_layer_among_the_columns(small_problem):
    import lingp_core as lg

    d = small_problem
    J = lg.export_jacobian(d["model"], d["x"], params=["0.weight", "0.bias"])
    assert bl.prior_mean_for(d["model"], J, "network") is None
    np.testing.assert_array_equal(bl.prior_mean_for(d["model"], J, "weights"), -flat_parameters(d["model"])[:15])
    with pytest.raises(InvalidOptionError, match="2.weight"):
        bl.prior_mean_for(d["model"], J, "head")
    with pytest.raises(InvalidOptionError, match="'middle'"):
        bl.prior_mean_for(d["model"], J, "middle")
    nested = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 3)), torch.nn.Tanh(),
                                 torch.nn.Sequential(torch.nn.Linear(3, 1, bias=False)), torch.nn.Identity()).double()
    assert bl.output_layer_names(nested) == ["2.0.weight"]
    assert bl.output_layer_names(torch.nn.Linear(3, 1)) == ["weight", "bias"]
    with pytest.raises(InvalidOptionError, match="no parameters"):
        bl.output_layer_names(torch.nn.Tanh())

    class HeadFirst(torch.nn.Module):  # registers its output layer first: registration order is not use order
        def __init__(self) -> None:
            super().__init__()
            self.head, self.body = torch.nn.Linear(3, 1), torch.nn.Linear(2, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.body(x)))

    with pytest.raises(InvalidOptionError, match="only an nn.Sequential says"):
        bl.output_layer_names(HeadFirst())


def test_linearized_gp_reports_a_collapsed_prior_scale_instead_of_warning():
    # the network already fits: the residuals are white noise, and here the evidence drives s to its bound (e^-30)
    rng = np.random.default_rng(7)
    model = mlp(4, widths=(2, 5, 1)).eval()
    x, x_star = torch.from_numpy(rng.standard_normal((40, 2))), torch.from_numpy(rng.standard_normal((3, 2)))
    y = bl.predict(model, x) + 0.1 * torch.from_numpy(rng.standard_normal((40, 1)))
    out = bl.linearized_gp(model, x, y, x_star, hyperparameters="evidence")  # a warning would fail (as errors)
    assert out["at_bound"] == ["prior_scale"] and out["prior_scale"] <= np.exp(-30) * (1 + 1e-5)
    averaged = bl.linearized_gp(model, x, y, x_star, hyperparameters="average")
    assert averaged["at_bound"] == [] and averaged["averaging"]["weight_on_grid_edge"] > 0.01
    assert bl.lingp_record(averaged)["weight_on_grid_edge"] == averaged["averaging"]["weight_on_grid_edge"]


def test_linearized_gp_rejects_bad_hyperparameter_options(small_problem):
    d = small_problem
    args = (d["model"], d["x"], d["y"], d["x_star"])
    with pytest.raises(InvalidOptionError, match="'ml2'"):
        bl.linearized_gp(*args, hyperparameters="ml2")
    with pytest.raises(InvalidOptionError, match="pass one of the two"):
        bl.linearized_gp(*args, fixed=(1.0, 0.1), hyperparameters="loo")
    out = bl.linearized_gp(*args, fixed=(1.0, 0.1))
    assert out["hyperparameters"] == "fixed" and out["noise"] == 0.1
    with pytest.raises(InvalidOptionError, match="average-map"):  # checked before any method trains
        bl.adapt_and_predict(*args, lingp_hyperparameters="bayes")


def test_adapt_and_predict_runs_every_method_on_the_same_data(rng):
    model = mlp(5).eval()
    x = torch.from_numpy(rng.standard_normal((15, 6)))
    y = torch.from_numpy(rng.standard_normal((15, 1)))
    x_star = torch.from_numpy(rng.standard_normal((4, 6)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = bl.adapt_and_predict(model, x, y, x_star, last_layer={"steps": 20}, fine_tuning={"steps": 20},
                               lingp_hyperparameters="average")
    assert set(out) == set(bl.METHODS) and out["lingp"]["hyperparameters"] == "average"
    for name, result in out.items():
        assert result["mean"].shape == (4, 1) and result["mean"].dtype == np.float64 and result["seconds"] >= 0
        assert (result["var"] is None) == (name not in ("lingp", "ablr"))
    np.testing.assert_array_equal(out["source"]["mean"], bl.to_numpy(model(x_star)))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueRangeError, match="maml"):
        bl.adapt_and_predict(model, x, y, x_star, methods=["maml"])
