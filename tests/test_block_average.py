"""BlockWeightAverage and JacobianBlocks.scale_blocks against dense float64 formulas computed here.

Oracle: the dense Jacobian from torch.func (tests.test_gp.problem), its columns of block b scaled by √ω_b with
ω_b = r_b / mean diag(J_b J_bᵀ) recomputed here; for every r on the grid and every (s, σ²) on the component's grid
(the grid's centre recomputed here from the targets), the dense posterior and log marginal likelihood by scipy.stats;
weights ∝ exp(lml) within a component, components weighted by Σ exp(lml) (uniform priors); the mixture's mean and
variance by the textbook form Σ w (v + m²) − mean².
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.special
import torch

import lingp_core as lg
from lingp_core import io
from tests.test_gp import dense_posterior, problem

narrow_grid = pytest.mark.filterwarnings("ignore:.*edge of the averaging grid:lingp_core.NumericalWarning",
                                         "ignore:components holding:lingp_core.NumericalWarning")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def column_blocks(J):
    edges = np.cumsum((0,) + J.block_sizes)
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def scaled_dense(o, J, omega):
    out = dict(o)
    for key in ("J", "Js"):
        A = o[key].copy()
        for cols, w in zip(column_blocks(J), omega):
            A[:, cols] *= np.sqrt(w)
        out[key] = A
    return out


def brute_force(o, J, levels, decades, grid_size, span):
    sizes = np.array([(o["J"][:, cols] ** 2).sum(1).mean() for cols in column_blocks(J)])
    values = np.logspace(-decades, 0, levels)
    r = o["y"] - o["f"]
    components = []
    for rel in itertools.product(values, repeat=len(sizes)):
        if max(rel) != 1.0:
            continue
        so = scaled_dense(o, J, np.array(rel) / sizes)
        noise0 = 0.5 * (r**2).mean()
        s0 = noise0 / (so["J"] ** 2).sum(1).mean()
        log_s = np.log(s0) + np.linspace(-span, span, grid_size) * np.log(10)
        log_n = np.log(noise0) + np.linspace(-span, 1.0, grid_size) * np.log(10)
        for a in log_s:
            for b in log_n:
                m, var, _, lml = dense_posterior(so, np.exp(a), np.exp(b), "full")
                components.append((lml, m, var))
    lml = np.array([c[0] for c in components])
    w = np.exp(lml - lml.max())
    w /= w.sum()
    mean = sum(wi * c[1] for wi, c in zip(w, components))
    var = sum(wi * (c[2] + c[1] ** 2) for wi, c in zip(w, components)) - mean**2
    # log p(y): the mean over ω points of ∫ p(y | θ) dθ / area on the grid (uniform prior), by the same quadrature
    ten = np.log(10)
    cell = (2 * span * ten / (grid_size - 1)) * ((span + 1.0) * ten / (grid_size - 1))
    per_point = scipy.special.logsumexp(lml.reshape(-1, grid_size**2), axis=1) + np.log(cell)
    evidence = scipy.special.logsumexp(per_point) - np.log(per_point.size) - np.log(2 * span * ten * (span + 1) * ten)
    return mean, var, evidence


@pytest.mark.parametrize("structure", ["auto", "dense"])
def test_scaled_blocks_give_the_weighted_sum_of_block_kernels(backend, structure):
    rng = np.random.default_rng(0)
    J, _, _, o = problem(backend, rng, c=2)
    if structure == "dense":
        J = J._derived(J.f0, [lg.DenseBlock(b.names, b.shapes, b.to_dense(), b.c, backend.xp) for b in J.blocks])
    omega = np.array([0.3, 2.0, 1e-3])
    got = backend.to_numpy(lg.kernel(J.scale_blocks(omega), output_mode="full"))
    want = sum(w * o["J"][:, cols] @ o["J"][:, cols].T for cols, w in zip(column_blocks(J), omega))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13 * np.abs(want).max())
    assert J.scale_blocks(omega).signature() == dict(J.signature(), block_weights=omega.tolist())


def test_scale_blocks_refuses_bad_weights(backend):
    J, _, _, _ = problem(backend, np.random.default_rng(0), c=2)
    with pytest.raises(lg.ShapeError, match="one number per block"):
        J.scale_blocks([1.0, 2.0])
    with pytest.raises(lg.ShapeError):
        J.scale_blocks("abc")
    with pytest.raises(lg.ArgumentTypeError):
        J.scale_blocks([1.0, {}, 2.0])
    for bad in ([1.0, 0.0, 1.0], [1.0, -1.0, 1.0], [1.0, np.nan, 1.0], [1.0, np.inf, 1.0], [1.0, 1e-320, 1.0]):
        with pytest.raises(lg.ValueRangeError, match="finite and > 0"):
            J.scale_blocks(bad)


@narrow_grid
def test_block_weight_average_with_a_prior_on_the_weights(backend, tmp_path):
    # prior mean m on θ − θ̂ (here −θ̂-like): every component has the mean function f₀ + J m, whatever its ω
    J, Js, y, o = problem(backend, np.random.default_rng(4), c=1)
    m = -0.3 * np.random.default_rng(5).standard_normal(J.p)
    avg = lg.BlockWeightAverage(levels=2, decades=2.0, grid_size=5, span=1.5, hyperprior=None, keep_mass=1.0,
                                output_mode="full").fit(J, y, prior_mean=backend.asarray(m))
    shifted = dict(o, f=o["f"] + (o["J"] @ m)[:, None], fs=o["fs"] + (o["Js"] @ m)[:, None])
    want_mean, want_var, want_evidence = brute_force(shifted, J, 2, 2.0, 5, 1.5)
    mean, var = (backend.to_numpy(a) for a in avg.predict(Js, return_var=True))
    assert avg.log_marginal_likelihood() == pytest.approx(want_evidence, rel=1e-10)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-8, atol=1e-9 * np.abs(want_mean).max())
    np.testing.assert_allclose(var, want_var, rtol=1e-7, atol=1e-9 * np.abs(want_var).max())
    avg.save(tmp_path / "avg.npz")  # each component keeps its prior mean (in its own scaled coordinates)
    back = lg.BlockWeightAverage.load(tmp_path / "avg.npz", backend=backend.name)
    for a, b in zip(back.predict(Js, return_var=True), (mean, var)):
        np.testing.assert_allclose(backend.to_numpy(a), b, rtol=1e-14, atol=0)


@narrow_grid
def test_block_weight_average_equals_the_brute_force_mixture(backend):
    J, Js, y, o = problem(backend, np.random.default_rng(3), c=1)
    avg = lg.BlockWeightAverage(levels=2, decades=2.0, grid_size=5, span=1.5, hyperprior=None, keep_mass=1.0,
                                output_mode="full").fit(J, y)
    assert len(avg.models_) == 2**3 - 1
    mean, var = (backend.to_numpy(a) for a in avg.predict(Js, return_var=True))
    want_mean, want_var, want_evidence = brute_force(o, J, 2, 2.0, 5, 1.5)
    assert avg.log_marginal_likelihood() == pytest.approx(want_evidence, rel=1e-10)
    # a marginal likelihood never exceeds its largest integrand
    assert avg.log_marginal_likelihood() < max(m.log_marginal_likelihood() for m in avg.models_)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-8, atol=1e-9 * np.abs(want_mean).max())
    np.testing.assert_allclose(var, want_var, rtol=1e-7, atol=1e-9 * np.abs(want_var).max())
    np.testing.assert_allclose(avg.weights_.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(avg.predict(Js)), mean, rtol=1e-12, atol=0)


@narrow_grid
def test_one_level_is_one_averaged_gp_on_normalized_blocks(backend):
    J, Js, y, o = problem(backend, np.random.default_rng(4), c=2)
    avg = lg.BlockWeightAverage(levels=1, grid_size=9, output_mode="trace").fit(J, y)
    sizes = np.array([(o["J"][:, cols] ** 2).sum(1).mean() for cols in column_blocks(J)])
    np.testing.assert_allclose(avg.block_weights_[0], 1 / sizes, rtol=1e-12)
    gp = lg.LinearizedGP(output_mode="trace").fit(J.scale_blocks(avg.block_weights_[0]), y)
    gp.average_hyperparameters(grid_size=9, hyperprior="data")
    want = gp.predict(Js.scale_blocks(avg.block_weights_[0]), return_var=True)
    for got, ref in zip(avg.predict(Js, return_var=True), want):
        np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(ref))


@narrow_grid
def test_round_trip_and_tampering(backend, tmp_path):
    J, Js, y, _ = problem(backend, np.random.default_rng(5), c=1)
    avg = lg.BlockWeightAverage(levels=2, grid_size=5, kernel_dtype=np.float64).fit(J, y)  # kept as "float64"
    path = avg.save(tmp_path / "avg")
    back = lg.BlockWeightAverage.load(path, backend=backend.name)
    for got, ref in zip(back.predict(Js, return_var=True), avg.predict(Js, return_var=True)):
        np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(ref))
    assert back.log_marginal_likelihood() == avg.log_marginal_likelihood()
    arrays, config = io.load_archive(path, "BlockWeightAverage")
    edits = {"weights": lambda a: a * 2, "block_scales": lambda a: -a,
             "relative_weights": lambda a: a * 0 + 7.0, "log_masses": lambda a: a + np.arange(a.size)}
    swapped = arrays["relative_weights"].copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # consistent on its own, but not with the saved Jacobians
    edits["relative_weights (swapped)"] = lambda a: swapped
    for name, edit in edits.items():
        key = name.split(" ")[0]
        io.save_archive(tmp_path / "bad", "BlockWeightAverage", {**arrays, key: edit(arrays[key])}, config)
        with pytest.raises(lg.ArchiveError, match="block-weight"):
            lg.BlockWeightAverage.load(tmp_path / "bad")


@narrow_grid
def test_bad_input_fails_clearly_and_leaves_the_model(backend):
    J, Js, y, _ = problem(backend, np.random.default_rng(6), c=1)
    with pytest.raises(lg.InvalidOptionError, match="averages over noise"):
        lg.BlockWeightAverage(noise=0.1)
    with pytest.raises(lg.ArgumentTypeError, match="unknown LinearizedGP setting"):
        lg.BlockWeightAverage(colour="red")
    with pytest.raises(lg.InvalidOptionError, match="hyperprior"):
        lg.BlockWeightAverage(hyperprior="flat")
    with pytest.raises(lg.InvalidOptionError, match="max_components = 5"):
        lg.BlockWeightAverage(levels=3, max_components=5).fit(J, y)
    with pytest.raises(lg.ValueRangeError, match="not distinct"):
        lg.BlockWeightAverage(levels=3, decades=1e-17).fit(J, y)
    with pytest.raises(lg.ValueRangeError, match="memory_budget"):  # a known setting's own error, not "unknown"
        lg.BlockWeightAverage(memory_budget=-1.0)
    with pytest.raises(lg.ArgumentTypeError):
        lg.BlockWeightAverage().fit(np.zeros((3, 3)), y)
    with pytest.raises(lg.NotFittedError):
        lg.BlockWeightAverage().predict(Js)
    avg = lg.BlockWeightAverage(levels=2, grid_size=5).fit(J, y)
    before = backend.to_numpy(avg.predict(Js))
    bad = backend.to_numpy(y).copy()
    bad[0, 0] = np.nan
    with pytest.raises(lg.NonFiniteError):
        avg.fit(J, backend.asarray(bad))
    np.testing.assert_array_equal(backend.to_numpy(avg.predict(Js)), before)
    other = lg.export_jacobian(torch.nn.Linear(3, 1).double(), torch.randn(4, 3, dtype=torch.float64),
                               backend=backend.name)
    with pytest.raises(lg.SignatureError):
        avg.predict(other)


@narrow_grid
def test_a_zero_block_is_left_out_of_the_grid(backend):
    J, Js, y, _ = problem(backend, np.random.default_rng(7), c=1)
    zero = lg.DenseBlock(["extra"], [(2,)], backend.xp.zeros((J.n, 2)), 1, backend.xp)
    J0 = J._derived(J.f0, [*J.blocks, zero])
    avg = lg.BlockWeightAverage(levels=2, grid_size=5).fit(J0, y)
    assert len(avg.models_) == 2**3 - 1
    np.testing.assert_array_equal(avg.relative_weights_[:, -1], 1.0)


@narrow_grid
def test_components_that_cannot_matter_are_dropped_and_memory_is_checked(backend):
    J, Js, _, o = problem(backend, np.random.default_rng(8), c=1)
    rng = np.random.default_rng(1)  # targets from the first layer alone: points that switch it off lose by far
    first = o["J"][:, : J.block_sizes[0]] @ rng.standard_normal(J.block_sizes[0])
    y = backend.asarray(o["f"] + first[:, None] + 1e-3 * rng.standard_normal(o["f"].shape))
    everything = lg.BlockWeightAverage(levels=3, grid_size=5, keep_mass=1.0).fit(J, y)
    pruned = lg.BlockWeightAverage(levels=3, grid_size=5, keep_mass=1 - 1e-6).fit(J, y)
    assert len(pruned.models_) < len(everything.models_) == 3**3 - 2**3
    for got, ref in zip(pruned.predict(Js, return_var=True), everything.predict(Js, return_var=True)):
        np.testing.assert_allclose(backend.to_numpy(got), backend.to_numpy(ref), rtol=1e-5,
                                   atol=1e-5 * float(np.abs(backend.to_numpy(ref)).max()))
    assert pruned.log_marginal_likelihood() == pytest.approx(everything.log_marginal_likelihood(), rel=1e-12)
    model = everything.models_[0]
    one = sum(int(a.nbytes) for e in model._engines for a in e.state().values()) + int(model._J.nbytes)
    with pytest.raises(lg.MemoryBudgetError, match="19 block-weight components"):
        lg.BlockWeightAverage(levels=3, grid_size=5, memory_budget=4 * one).fit(J, y)
