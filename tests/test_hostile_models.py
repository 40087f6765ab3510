"""Hostile input to dirichlet_targets, kernel dtypes, probability_of_largest and BlockWeightAverage, and warnings
raised as errors by averaging calls: each must raise a LingpError naming the value at fault (or the warning) and
leave every model exactly as it was.

Oracles: the Dirichlet targets from Milios et al.'s formulas written out here; class probabilities by scipy's adaptive
quadrature of P(y_k largest) = ∫ φ(z) Π_{j≠k} Φ((m_k + √v_k z − m_j)/√v_j) dz; kernels in another dtype spelling
compared with the same call's NumPy-dtype result (the kernel's values are tested against dense oracles in
test_kernels.py).
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import scipy.integrate
import scipy.special
import torch

import lingp_core as lg
from lingp_core import _validate as v
from lingp_core import class_probabilities, kernels
from tests.test_export import mlp
from tests.test_gp import problem
from tests.test_laplace import problem as classification_problem

nn = torch.nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----- dirichlet_targets ----------------------------------------------------------------------------------------

def milios_targets(labels, c, alpha_epsilon):
    """ỹ and σ̃² (n, c) from the log-normal moment match of Gamma(α, 1), α = onehot + α_ε."""
    alpha = np.where(np.arange(c)[None, :] == np.asarray(labels)[:, None], 1.0 + alpha_epsilon, alpha_epsilon)
    noise = np.log(1.0 / alpha + 1.0)
    return np.log(alpha) - noise / 2, noise


@pytest.mark.parametrize("labels,c,alpha_epsilon,error,match", [
    (np.array([0, -1]), 3, 0.01, lg.ValueRangeError, r"\[0, 3\).*-1"),
    (np.array([0, 3]), 3, 0.01, lg.ValueRangeError, r"\[0, 3\).*e\.g\. 3"),
    (np.array([[0], [1]]), 3, 0.01, lg.ShapeError, r"shape \(2, 1\)"),
    (np.array(1), 3, 0.01, lg.ShapeError, r"shape \(\)"),
    ([[0], [1, 2]], 3, 0.01, lg.ShapeError, "ragged"),
    (np.array([0.0, 1.0]), 3, 0.01, lg.DTypeError, "float64"),
    (np.array([True, False]), 3, 0.01, lg.DTypeError, "bool"),
    (None, 3, 0.01, lg.ArgumentTypeError, "labels is required"),
    (np.array([0, 1]), 3, -0.5, lg.ValueRangeError, "alpha_epsilon.*-0.5"),
    (np.array([0, 1]), 3, 0.0, lg.ValueRangeError, "alpha_epsilon.*0.0"),
    (np.array([0, 1]), 3, float("nan"), lg.ValueRangeError, "alpha_epsilon.*nan"),
    (np.array([0, 1]), 3, "0.01", lg.ArgumentTypeError, "alpha_epsilon"),
    (np.array([0, 1]), 3, 1e-320, lg.ValueRangeError, "alpha_epsilon = 1e-320.*overflow"),
    (np.array([0, 1]), 2.5, 0.01, lg.ArgumentTypeError, "c must be an integer.*2.5"),
    (np.array([0, 0]), 1, 0.01, lg.ValueRangeError, r"c must lie in \[2, inf\], got 1"),
    (np.array([0]), 10**15, 0.01, lg.MemoryBudgetError, "c = 1000000000000000 classes"),
])
def test_dirichlet_targets_refuses_hostile_input(labels, c, alpha_epsilon, error, match):
    with pytest.raises(error, match=match):
        lg.dirichlet_targets(labels, c, alpha_epsilon)


def test_dirichlet_targets_accept_every_integer_array_kind(backend):
    labels = [2, 0, 1, 1]
    want_targets, want_noise = milios_targets(labels, 3, 0.03)
    for given in (labels, np.array(labels, dtype=np.uint8), torch.tensor(labels), backend.asarray(labels)):
        targets, noise = lg.dirichlet_targets(given, 3, 0.03)
        assert isinstance(targets, np.ndarray) and targets.dtype == np.float64 and targets.shape == (4, 3)
        np.testing.assert_allclose(targets, want_targets, rtol=4 * np.finfo(np.float64).eps)
        np.testing.assert_allclose(noise, want_noise, rtol=4 * np.finfo(np.float64).eps)


# ----- a warning raised as an error leaves the model as it was ---------------------------------------------------

def _state(model):
    """The model's attribute names and, for plain values, the values: what a failed call must not change."""
    return {k: (v if isinstance(v, (int, float, str, tuple, type(None))) else id(v)) for k, v in vars(model).items()}


def test_laplace_average_that_warns_as_an_error_leaves_the_model(backend):
    J, Js, y, _, _ = classification_problem(backend)
    clf = lg.LaplaceClassifier(0.8).fit(J, y)
    before, state = backend.to_numpy(clf.predict_proba(Js)), _state(clf)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lg.NumericalWarning)
        with pytest.raises(lg.NumericalWarning, match="edge of the averaging grid"):
            clf.average_prior_scale(grid_size=3, span=0.01)  # a flat posterior over ±0.01 decades: all on the edge
    assert _state(clf) == state and not hasattr(clf, "mixture_scales_")
    np.testing.assert_array_equal(backend.to_numpy(clf.predict_proba(Js)), before)
    with pytest.warns(lg.NumericalWarning, match="edge of the averaging grid"):  # as a warning: the average is made
        clf.average_prior_scale(grid_size=3, span=0.01)
    assert clf.mixture_scales_.shape == (3,)


def test_block_weight_fit_that_warns_as_an_error_leaves_the_model(backend):
    J, Js, y, _ = problem(backend, np.random.default_rng(2), c=1)
    avg = lg.BlockWeightAverage(levels=2, grid_size=3, span=0.01)
    fresh = _state(avg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lg.NumericalWarning)
        with pytest.raises(lg.NumericalWarning, match="components holding"):
            avg.fit(J, y)
    assert _state(avg) == fresh and not avg.is_fitted
    with pytest.warns(lg.NumericalWarning, match="components holding"):
        avg.fit(J, y)
    before, state = backend.to_numpy(avg.predict(Js)), _state(avg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lg.NumericalWarning)
        with pytest.raises(lg.NumericalWarning, match="components holding"):
            avg.fit(J, 2 * y)
    assert _state(avg) == state
    np.testing.assert_array_equal(backend.to_numpy(avg.predict(Js)), before)


# ----- BlockWeightAverage options ---------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:components holding:lingp_core.NumericalWarning")
def test_block_weight_memory_check_counts_each_components_prior_mean(backend):
    J, _, y, _ = problem(backend, np.random.default_rng(8), c=1)
    m = backend.asarray(np.random.default_rng(9).standard_normal(J.p))
    options = dict(levels=2, grid_size=3, span=1.0, keep_mass=1.0)
    model = lg.BlockWeightAverage(**options).fit(J, y, prior_mean=m).models_[0]
    own = sum(int(a.nbytes) for e in model._engines for a in e.state().values())
    own += int(model._J.nbytes) if model.plan_.space == "function" else 0
    count = 2**3 - 1  # ω points for 2 levels over 3 blocks
    budget = count * (own + 4 * J.p)  # room for each component's state and J, not for its float64 prior mean too
    lg.BlockWeightAverage(**options, memory_budget=budget).fit(J, y)  # without a prior mean it fits
    with pytest.raises(lg.MemoryBudgetError, match=f"{count} block-weight components"):
        lg.BlockWeightAverage(**options, memory_budget=budget).fit(J, y, prior_mean=m)


@pytest.mark.parametrize("hyperprior", [np.array([1, 2]), np.array(["data"]), "flat", 1.0])
def test_block_weight_hyperprior_of_another_kind_is_refused(hyperprior):
    with pytest.raises(lg.InvalidOptionError, match="hyperprior must be None, 'data' or a Hyperprior"):
        lg.BlockWeightAverage(hyperprior=hyperprior)


@pytest.mark.parametrize("decades", [308.0, 320, 400, 1e300])
def test_block_weight_decades_beyond_float64_are_refused(decades):
    with pytest.raises(lg.ValueRangeError, match=f"decades must be at most 307.65.*got {re.escape(repr(decades))}"):
        lg.BlockWeightAverage(decades=decades)
    assert lg.BlockWeightAverage(decades=307.0).decades == 307.0  # 1e-307 is still a normal float64


def test_block_weight_decades_whose_scaling_leaves_float32_are_refused_at_fit():
    model = mlp(nn.Tanh, (3, 4, 1))
    x = torch.randn(6, 3)
    J = lg.export_jacobian(model, x, dtype="float32")
    y = model(x).detach().numpy()
    # √(10^-80 / mean diag J_b J_bᵀ) is far below float32's smallest normal number, 1.2e-38
    with pytest.raises(lg.ValueRangeError, match="decades = 80 .*normal float32"):
        lg.BlockWeightAverage(levels=2, decades=80, grid_size=3).fit(J, y)


# ----- kernel dtypes ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["banana", np.float16, "int64", np.complex128, torch.int64, torch.float16, object()])
def test_kernel_dtype_that_is_not_float32_or_float64_is_refused(backend, dtype):
    J = lg.export_jacobian(mlp(nn.Tanh, (3, 4, 2)).double(), torch.randn(3, 3, dtype=torch.float64),
                           backend=backend.name)
    for call in (lambda: lg.kernel(J, dtype=dtype), lambda: lg.kernel_diag(J, dtype=dtype),
                 lambda: kernels.work_bytes(J, 3, dtype, symmetric=True)):
        with pytest.raises(lg.DTypeError, match="dtype must be float32 or float64"):
            call()


@pytest.mark.parametrize("spelling", [(torch.float32, np.float32), (torch.float64, np.float64),
                                      ("float32", np.float32)])
def test_kernel_dtype_given_as_torch_dtype_or_name_is_the_numpy_one(backend, spelling):
    J = lg.export_jacobian(mlp(nn.Tanh, (3, 4, 2)).double(), torch.randn(3, 3, dtype=torch.float64),
                           backend=backend.name)
    given, numpy_dtype = spelling
    for call in (lambda d: lg.kernel(J, dtype=d), lambda d: lg.kernel_diag(J, output_mode="trace", dtype=d)):
        got, ref = call(given), call(numpy_dtype)
        assert got.dtype == np.dtype(numpy_dtype)
        np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(ref))


# ----- probability_of_largest -------------------------------------------------------------------------------------

def quadrature_probabilities(mean, var):
    """P(y_k largest) per class of one example by scipy's adaptive quadrature."""
    sd = np.sqrt(var)

    others = [np.arange(mean.size) != k for k in range(mean.size)]

    def integrand(z, k):
        y = mean[k] + sd[k] * z
        return np.exp(-z * z / 2) / np.sqrt(2 * np.pi) * np.prod(scipy.special.ndtr((y - mean) / sd)[others[k]])
    return np.array([scipy.integrate.quad(integrand, -np.inf, np.inf, args=(k,), epsabs=1e-13, epsrel=1e-12)[0]
                     for k in range(mean.size)])


@pytest.mark.parametrize("n_nodes", [0, class_probabilities._MAX_NODES + 1, 10**6])
def test_probability_of_largest_refuses_node_counts_outside_its_rule(n_nodes):
    with pytest.raises(lg.ValueRangeError, match=f"n_nodes must lie in \\[1, {class_probabilities._MAX_NODES}\\]"):
        lg.probability_of_largest(np.zeros((1, 3)), np.ones((1, 3)), n_nodes=n_nodes)


def test_probability_of_largest_at_the_most_nodes_matches_adaptive_quadrature():
    mean, var = np.array([[0.0, 0.5, -0.3]]), np.array([[1.0, 0.3, 2.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy's rule must not overflow at the cap
        got = lg.probability_of_largest(mean, var, n_nodes=class_probabilities._MAX_NODES)
    np.testing.assert_allclose(got[0], quadrature_probabilities(mean[0], var[0]), rtol=0, atol=1e-10)


def test_probability_of_largest_refuses_work_beyond_the_memory_budget():
    c = 20_000  # one example's work: 3 · c² · 128 float64 numbers, about 1.2 TB
    with pytest.raises(lg.MemoryBudgetError, match="c = 20000 classes and n_nodes = 128"):
        lg.probability_of_largest(np.zeros((1, c)), np.ones((1, c)))


def test_probability_of_largest_in_small_chunks_gives_the_same_probabilities(monkeypatch):
    rng = np.random.default_rng(0)
    mean, var = rng.standard_normal((5, 4)), rng.uniform(0.5, 2.0, (5, 4))
    whole = lg.probability_of_largest(mean, var)
    per_example = 3 * 4 * 4 * 128 * 8  # three (c, c, nodes) float64 work arrays
    monkeypatch.setattr(v, "resolve_memory_budget", lambda budget, backend: 2 * per_example)
    assert class_probabilities._chunk_rows(4, 128) == 2
    np.testing.assert_array_equal(lg.probability_of_largest(mean, var), whole)
    want = np.array([quadrature_probabilities(m, s) for m, s in zip(mean, var)])
    np.testing.assert_allclose(whole, want, rtol=0, atol=1e-10)
