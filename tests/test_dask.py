"""The Dask scale-out (issue 16): a Jacobian exported in row shards on a LocalCluster of 2 worker processes, and the
models fitted on it, against the single-machine answers and an independent float64 dense oracle.

Oracles: the float64 Jacobian and outputs of a float64 copy of the network by torch.func.jacrev
(tests.helpers.torch_jacobian), the GP formulas written out densely in NumPy (tests.test_gp.dense_posterior), and
the in-memory export and fits of the same data. Exact paths must agree to 1e-10 relative (float64); the iterative
path is held to the tolerance tests/test_iterative.py uses for it against the exact path.

The module's Client is made with ``set_as_default=False`` and is made current only inside the tests that ask for the
``client`` fixture (``with client.as_current()``), so a test without it sees no client at all even while the cluster
runs: that is how the no-client path (dask's default scheduler, an in-memory export) is tested in the same process,
whatever order the tests run in.
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

pytest.importorskip("distributed", reason="the Dask scale-out tests need dask[distributed]: pip install 'lingp[dask]'")
da = pytest.importorskip("dask.array", reason="the Dask scale-out tests need dask[array]: pip install 'lingp[dask]'")

from distributed import Client, LocalCluster  # noqa: E402

import lingp_core as lg  # noqa: E402
from lingp_core import sharded  # noqa: E402
from lingp_core.sharded import ShardedJacobian  # noqa: E402
from tests.helpers import assert_matches, tolerance, torch_jacobian  # noqa: E402
from tests.test_gp import dense_posterior  # noqa: E402

# The scheduler and nannies run in this process; each creates its scratch directory under a timer and warns
# (UserWarning) when that took over 1 s, which a loaded 2-core machine can reach: a performance notice, not a fault
pytestmark = pytest.mark.filterwarnings(
    "ignore:Creating scratch directories is taking a surprisingly long time:UserWarning")

N, CHUNK, N_STAR = 45, 15, 5  # 3 shards of 15 examples; c = 2 outputs, so n·c = 90 training rows
F64_RTOL = 1e-10  # exact paths and float64 exports: the acceptance bound of the issue
# the iterative path against the exact one, as tests/test_iterative.py holds it: the mean to 1e-6 of its largest
# magnitude, every variance to 1e-2 relative
ITERATIVE_MEAN_RTOL, ITERATIVE_VAR_RTOL = 1e-6, 1e-2
S = 0.7
NOISES = {"scalar": 0.05, "per-output": np.array([0.05, 0.3])}
MODES = ("full", "trace", "independent")
SMALL_RANKS = {"preconditioner_rank": 10, "variance_rank": 10}  # every Lanczos step or pivot is a round trip
NUMPY = lg.get_backend("numpy")

# ----- the cluster -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    """A Client on a LocalCluster of 2 worker processes with 1 thread each; NOT the default client (see the module
    docstring). The memory limit lets the planner size the exact path from the workers' memory."""
    # the scheduler serves HTTP (metrics) even without a dashboard, on port 8787 unless told otherwise: a free port
    # here, else another cluster on the machine holding 8787 makes distributed warn (an error in this suite)
    local = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, memory_limit="2GiB")
    client = Client(local, set_as_default=False)
    yield client
    client.close()
    local.close()


@pytest.fixture
def client(cluster):
    """The cluster's client, current for the duration of one test (what ``Client(...)`` in a user's script does)."""
    with cluster.as_current():
        yield cluster


def rows(x, chunk=CHUNK):
    """A NumPy array as a dask array chunked by rows only."""
    return da.from_array(x, chunks=(chunk,) + tuple(-1 for _ in x.shape[1:]))


# ----- the data --------------------------------------------------------------------------------------------------

def tanh_mlp(dtype):
    """A seeded tanh MLP 3-8-8-2 (p = 122) in ``dtype``."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 2))
    return net.to(dtype)


@pytest.fixture(scope="module")
def data():
    """The float64 net, inputs, targets, the jacrev oracle (float64 J, f0, J*, f0*) and the in-memory exports."""
    net = tanh_mlp(torch.float64)
    rng = np.random.default_rng(16)
    X, Xs = rng.standard_normal((N, 3)), rng.standard_normal((N_STAR, 3))
    J64, f64 = torch_jacobian(net, X)
    Js64, fs64 = torch_jacobian(net, Xs)
    y = f64 + 0.5 * rng.standard_normal(f64.shape)
    return {"net": net, "X": X, "Xs": Xs, "y": y, "o": {"J": J64, "f": f64, "Js": Js64, "fs": fs64, "y": y},
            "J_local": lg.export_jacobian(net, torch.from_numpy(X)),
            "Js": lg.export_jacobian(net, torch.from_numpy(Xs))}


@pytest.fixture(scope="module")
def J_sharded(cluster, data):
    """The float64 training Jacobian in 3 shards on the workers."""
    with cluster.as_current():
        return lg.export_jacobian(data["net"], rows(data["X"]))


class Fit(NamedTuple):
    """A model fitted on the sharded J and its predictions at the test inputs."""

    gp: Any
    mean: np.ndarray  # (N_STAR, c) at the test inputs
    var: np.ndarray


@pytest.fixture(scope="module")
def fitted(cluster, data, J_sharded):
    """fitted(method, mode, noise_name): a LinearizedGP fitted on the sharded J and its predictions at the test
    inputs, each made once per module (an iterative fit and its variances are dozens of round trips)."""
    cache = {}

    def fit(method, mode, noise_name):
        key = (method, mode, noise_name)
        if key not in cache:
            with cluster.as_current():
                gp = lg.LinearizedGP(S, NOISES[noise_name], output_mode=mode, method=method, **SMALL_RANKS)
                gp.fit(J_sharded, rows(data["y"]))
                cache[key] = Fit(gp, *gp.predict(data["Js"], return_var=True))
        return cache[key]
    return fit


def assert_close(actual, expected, rtol):
    """float64 NumPy result against a float64 reference, relative to the reference's largest magnitude."""
    assert_matches(actual, np.asarray(expected, dtype=np.float64), NUMPY, dtype=np.float64, rtol=rtol)


# ----- export ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_sharded_export_equals_the_in_memory_one_and_jacrev(client, data, dtype):
    net = tanh_mlp(dtype)
    X = data["X"].astype(np.float32 if dtype == torch.float32 else np.float64)
    J = lg.export_jacobian(net, rows(X))
    local = lg.export_jacobian(net, torch.from_numpy(X))
    J64, f64 = torch_jacobian(net, X)
    np_dtype = np.dtype(X.dtype)
    rtol = F64_RTOL if np_dtype == np.float64 else tolerance(np.float32)
    assert isinstance(J, ShardedJacobian) and len(J.shards) == N // CHUNK and J.counts == (CHUNK,) * 3
    assert (J.n, J.n_outputs, J.p, J.dtype) == (N, 2, J64.shape[1], np_dtype)
    assert J.signature() == local.signature()
    assert_matches(J.f0, f64, NUMPY, dtype=np_dtype, rtol=rtol)
    assert_matches(J.f0, local.f0.astype(np.float64), NUMPY, dtype=np_dtype, rtol=rtol)
    dense = J.matmat(np.eye(J.p, dtype=np_dtype))  # the whole J through the shards (gather: its own test)
    assert_matches(dense, J64, NUMPY, dtype=np_dtype, rtol=rtol)
    assert_matches(dense, local.to_dense().astype(np.float64), NUMPY, dtype=np_dtype, rtol=rtol)
    rng = np.random.default_rng(1)
    V, U = rng.standard_normal((J.p, 3)).astype(np_dtype), rng.standard_normal((N * 2, 3)).astype(np_dtype)
    V64, U64 = V.astype(np.float64), U.astype(np.float64)
    assert_matches(J.matmat(V), J64 @ V64, NUMPY, dtype=np_dtype, rtol=rtol)
    assert_matches(J.matmat(V[:, 0]), J64 @ V64[:, 0], NUMPY, dtype=np_dtype, rtol=rtol)
    assert_matches(J.rmatmat(U), J64.T @ U64, NUMPY, dtype=np_dtype, rtol=rtol)
    assert_matches(J.rmatmat(U), local.rmatmat(U).astype(np.float64), NUMPY, dtype=np_dtype, rtol=rtol)
    per_output = (J64 * J64).sum(axis=1).reshape(N, 2)
    for mode, expected in (("full", per_output.reshape(-1)), ("trace", per_output.mean(axis=1)),
                           ("independent", per_output.T)):
        got = lg.kernel_diag(J, prior_scale=S, output_mode=mode)
        assert_matches(got, S * expected, NUMPY, dtype=np.float64, rtol=rtol)
        assert_matches(got, lg.kernel_diag(local, prior_scale=S, output_mode=mode), NUMPY, dtype=np.float64,
                       rtol=rtol)


def test_gather_and_a_sharded_test_jacobian(client, data, J_sharded, fitted):
    """J.gather() is the in-memory export; a model predicts at a sharded J* as at the local one (the contract's
    ``gp.predict(lg.export_jacobian(model, Xs))`` with Xs a dask array)."""
    gathered = J_sharded.gather()
    assert isinstance(gathered, lg.JacobianBlocks) and gathered.signature() == data["J_local"].signature()
    assert_close(gathered.to_dense(), data["o"]["J"], F64_RTOL)
    assert np.array_equal(gathered.f0, data["J_local"].f0)
    exact = fitted("function-cholesky", "full", "scalar")
    Js_sharded = lg.export_jacobian(data["net"], rows(data["Xs"], 2))
    for a, b in zip(exact.gp.predict(Js_sharded, return_var=True), (exact.mean, exact.var)):
        assert_close(a, b, F64_RTOL)


# ----- kernels ---------------------------------------------------------------------------------------------------

def dense_kernel(A, B, mode, c=2):
    """s·A Bᵀ of row-stacked float64 Jacobians in an output mode: (na·c, nb·c), (na, nb) or (c, na, nb)."""
    if mode == "full":
        return S * A @ B.T
    per_output = [S * A[k::c] @ B[k::c].T for k in range(c)]
    return sum(per_output) / c if mode == "trace" else np.stack(per_output)


@pytest.mark.parametrize("mode", MODES)
def test_kernels_of_a_sharded_jacobian(client, data, J_sharded, mode):
    o = data["o"]
    K = lg.kernel(J_sharded, prior_scale=S, output_mode=mode)
    assert isinstance(K, da.Array)  # the tiles stay on the workers until asked for
    assert_close(K.compute(), dense_kernel(o["J"], o["J"], mode), F64_RTOL)
    cross = lg.kernel(data["Js"], J_sharded, prior_scale=S, output_mode=mode)
    assert_close(cross, dense_kernel(o["Js"], o["J"], mode), F64_RTOL)
    cross_t = lg.kernel(J_sharded, data["Js"], prior_scale=S, output_mode=mode)
    assert_close(cross_t, dense_kernel(o["J"], o["Js"], mode), F64_RTOL)


# ----- LinearizedGP ----------------------------------------------------------------------------------------------

def reference(data, mode, noise_name, method="function-cholesky"):
    """The same GP fitted on the in-memory export."""
    gp = lg.LinearizedGP(S, NOISES[noise_name], output_mode=mode, method=method)
    return gp.fit(data["J_local"], data["y"])


@pytest.mark.parametrize("noise_name", NOISES)
@pytest.mark.parametrize("mode", MODES)
def test_cluster_cholesky_equals_dense_formulas_and_the_in_memory_fit(data, fitted, mode, noise_name):
    gp, mean, var = fitted("function-cholesky", mode, noise_name)
    assert gp.plan_.method == "function-cholesky"
    d_mean, d_var, _, d_lml = dense_posterior(data["o"], S, NOISES[noise_name], mode)
    assert_close(mean, d_mean, F64_RTOL)
    assert_close(var, d_var, F64_RTOL)
    np.testing.assert_allclose(gp.log_marginal_likelihood(), d_lml, rtol=F64_RTOL)
    local = reference(data, mode, noise_name)
    r_mean, r_var = local.predict(data["Js"], return_var=True)
    assert_close(mean, r_mean, F64_RTOL)
    assert_close(var, r_var, F64_RTOL)
    np.testing.assert_allclose(gp.log_marginal_likelihood(), local.log_marginal_likelihood(), rtol=F64_RTOL)


@pytest.mark.parametrize("mode", MODES)
def test_cluster_samples_equal_the_in_memory_ones(data, fitted, mode):
    # the same seed, covariances equal to rounding: the same draws (eigenvector signs fixed, not left to eigh)
    gp = fitted("function-cholesky", mode, "scalar").gp
    assert_close(gp.sample(data["Js"], 5, seed=1), reference(data, mode, "scalar").sample(data["Js"], 5, seed=1),
                 1e-8)


@pytest.mark.parametrize("mode,noise_name", [("full", "scalar"), ("trace", "scalar"), ("independent", "per-output")])
def test_cluster_iterative_matches_the_exact_path(data, fitted, mode, noise_name):
    gp, mean, var = fitted("iterative", mode, noise_name)
    assert gp.plan_.method == "iterative"
    d_mean, d_var, _, _ = dense_posterior(data["o"], S, NOISES[noise_name], mode)
    assert np.abs(mean - d_mean).max() <= ITERATIVE_MEAN_RTOL * np.abs(d_mean).max()
    np.testing.assert_allclose(var, d_var, rtol=ITERATIVE_VAR_RTOL, atol=0)
    assert gp.clamped_variances_ == 0


def test_auto_on_a_cluster_factors_exactly_and_says_so(client, data, J_sharded):
    gp = lg.LinearizedGP(S, NOISES["scalar"], method="auto").fit(J_sharded, rows(data["y"]))
    assert gp.plan_.method == "function-cholesky"
    assert "Dask cluster" in gp.plan_.reason and "workers" in gp.plan_.reason
    d_mean, d_var, _, d_lml = dense_posterior(data["o"], S, NOISES["scalar"], "full")
    mean, var = gp.predict(data["Js"], return_var=True)
    assert_close(mean, d_mean, F64_RTOL)
    assert_close(var, d_var, F64_RTOL)
    np.testing.assert_allclose(gp.log_marginal_likelihood(), d_lml, rtol=F64_RTOL)


def test_a_prior_on_the_weights_on_a_cluster(client, data, J_sharded):
    # prior_mean = −θ̂ (θ ~ N(0, s·I)): the prior mean function f₀ − J θ̂ evaluated where the shards live
    theta = lg.parameter_vector(data["net"], J_sharded)
    gp = lg.LinearizedGP(S, NOISES["scalar"], method="function-cholesky").fit(J_sharded, rows(data["y"]),
                                                                              prior_mean=-theta)
    o = data["o"]
    shifted = dict(o, f=o["f"] - (o["J"] @ theta).reshape(o["f"].shape), fs=o["fs"] - (o["Js"] @ theta).reshape(
        o["fs"].shape))
    d_mean, d_var, _, d_lml = dense_posterior(shifted, S, NOISES["scalar"], "full")
    mean, var = gp.predict(data["Js"], return_var=True)
    assert_close(mean, d_mean, F64_RTOL)
    assert_close(var, d_var, F64_RTOL)
    np.testing.assert_allclose(gp.log_marginal_likelihood(), d_lml, rtol=F64_RTOL)


def test_iterative_variances_in_the_cancellation_regime(client):
    """A float32 Jacobian, σ² = 1e-3 and test inputs 1e-3 from training ones: posterior variances far below the
    prior's, where prior − reduction in float32 loses every digit. The cluster's iterative path against the exact
    in-memory one, as in tests/test_iterative.py."""
    net = tanh_mlp(torch.float32)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((N, 3)).astype(np.float32)
    Xs = X[:N_STAR] + np.float32(1e-3) * rng.standard_normal((N_STAR, 3)).astype(np.float32)
    J_local, Js = lg.export_jacobian(net, torch.from_numpy(X)), lg.export_jacobian(net, torch.from_numpy(Xs))
    y = (J_local.f0 + 0.1 * np.sin(np.arange(N * 2)).reshape(N, 2)).astype(np.float32)
    exact = lg.LinearizedGP(1.0, 1e-3, method="function-cholesky").fit(J_local, y)
    e_mean, e_var = exact.predict(Js, return_var=True)
    assert (e_var / lg.kernel_diag(Js).reshape(N_STAR, 2)).max() < 1e-3, "not the cancellation regime"
    # σ² = 1e-3 needs a stronger preconditioner than SMALL_RANKS: 30 pivots save more CG rounds than they cost
    gp = lg.LinearizedGP(1.0, 1e-3, method="iterative", preconditioner_rank=30, variance_rank=10)
    gp.fit(lg.export_jacobian(net, rows(X)), rows(y))
    mean, var = gp.predict(Js, return_var=True)
    assert np.abs(mean - e_mean).max() <= ITERATIVE_MEAN_RTOL * np.abs(e_mean).max()
    np.testing.assert_allclose(var, e_var, rtol=ITERATIVE_VAR_RTOL, atol=0)
    assert gp.clamped_variances_ == 0


@pytest.mark.parametrize("mode", ["full", "trace"])
def test_cluster_variances_and_covariances_far_below_the_prior(client, mode):
    """A wide linear model (well-conditioned kernel) at s = 1e9, σ² = 1, predicted at its training inputs: there
    var = σ² − σ⁴ (C⁻¹)_ii and cov = σ²I − σ⁴ C⁻¹ exactly (s·K = C − σ²I), about 1e-11 of the prior, where the
    blocked Cholesky's prior − reduction loses every digit. The cluster recomputes them in the energy form, as one
    machine does."""
    torch.manual_seed(1)
    net = torch.nn.Linear(80, 2).to(torch.float64)
    rng = np.random.default_rng(5)
    X, y = rng.standard_normal((N, 80)), rng.standard_normal((N, 2))
    J_local = lg.export_jacobian(net, torch.from_numpy(X))
    gp = lg.LinearizedGP(1e9, 1.0, method="function-cholesky", output_mode=mode)
    gp.fit(lg.export_jacobian(net, rows(X)), rows(y))
    _, var, cov = gp.predict(J_local, return_var=True, return_cov=True)
    A = J_local.to_dense()  # (N·2, p), rows example-major
    K = A @ A.T if mode == "full" else sum(A[k::2] @ A[k::2].T for k in range(2)) / 2
    inverse = np.linalg.inv(1e9 * K + np.eye(len(K)))
    assert (np.linalg.eigvalsh(K).min() > 1.0), "the oracle needs a well-conditioned kernel"
    want_cov = np.eye(len(K)) - inverse
    want_var = np.diag(want_cov).reshape(N, 2) if mode == "full" else np.repeat(np.diag(want_cov)[:, None], 2, 1)
    np.testing.assert_allclose(var, want_var, rtol=1e-9)
    want = want_cov if mode == "full" else np.stack([want_cov] * 2)
    assert np.abs(cov - want).max() <= 1e-9 * np.abs(want).max()


# ----- the planner -----------------------------------------------------------------------------------------------

# half of one float64 (n·c)² kernel: the blocked Cholesky (its tiles, their scaled copies and the factor) needs more,
# the iterative path (a few n·c vectors, rank-1 preconditioner and Lanczos cache on the client) far less; the same
# budget bounds both
TINY_BUDGET = 8 * (2 * N) ** 2 // 2


@pytest.mark.parametrize("limit,because", [({"memory_budget": TINY_BUDGET}, "over the cluster budget"),
                                           ({"exact_max_rows": 10}, "exact_max_rows = 10")])
def test_auto_goes_iterative_when_the_exact_path_does_not_fit(client, data, J_sharded, limit, because):
    noise = 1.0  # well conditioned: CG converges in a few rounds with one pivot; this test is about the plan
    gp = lg.LinearizedGP(S, noise, method="auto", preconditioner_rank=1, variance_rank=1,
                         **limit).fit(J_sharded, rows(data["y"]))
    assert gp.plan_.method == "iterative"
    assert because in gp.plan_.reason and "Dask cluster" in gp.plan_.reason
    d_mean = dense_posterior(data["o"], S, noise, "full")[0]
    assert np.abs(gp.predict(data["Js"]) - d_mean).max() <= ITERATIVE_MEAN_RTOL * np.abs(d_mean).max()


# ----- LaplaceClassifier -----------------------------------------------------------------------------------------

def test_laplace_on_a_cluster_equals_the_in_memory_fit(client, data, J_sharded):
    labels = np.argmax(data["o"]["f"] + np.random.default_rng(5).standard_normal((N, 2)), axis=1)
    clf = lg.LaplaceClassifier(1.0, rtol=1e-12).fit(J_sharded, rows(labels))
    local = lg.LaplaceClassifier(1.0, method="parameter", rtol=1e-12).fit(data["J_local"], labels)
    assert clf.plan_.method == "parameter" and "Dask cluster" in clf.plan_.reason
    assert_close(clf.w_map_, local.w_map_, F64_RTOL)
    np.testing.assert_allclose(clf.log_marginal_likelihood(), local.log_marginal_likelihood(), rtol=F64_RTOL)
    assert_close(clf.predict_proba(data["Js"]), local.predict_proba(data["Js"]), F64_RTOL)
    with pytest.raises(lg.InvalidOptionError, match="weight space"):
        lg.LaplaceClassifier(1.0, method="function").fit(J_sharded, rows(labels))


# ----- bad input -------------------------------------------------------------------------------------------------

def test_inputs_chunked_along_features_are_rechunked(client, data, J_sharded):
    J = lg.export_jacobian(data["net"], da.from_array(data["X"], chunks=(CHUNK, 1)))
    assert J.counts == J_sharded.counts
    assert np.array_equal(J.f0, J_sharded.f0)
    eye = np.eye(J.p)
    assert np.array_equal(J.matmat(eye), J_sharded.matmat(eye))  # the same shards: the same numbers
    assert_close(J.matmat(eye), data["J_local"].to_dense(), F64_RTOL)


def test_dask_and_in_memory_training_data_are_not_mixed(client, data, J_sharded):
    gp = lg.LinearizedGP(S, 0.05, method="function-cholesky")
    with pytest.raises(lg.ArgumentTypeError, match=r"y is a dask array but J is in memory .* client is running"):
        gp.fit(data["J_local"], rows(data["y"]))
    with pytest.raises(lg.ArgumentTypeError, match=r"J is sharded on a Dask cluster but y is"):
        gp.fit(J_sharded, data["y"])
    with pytest.raises(lg.ArgumentTypeError, match=r"J is sharded on a Dask cluster but y is"):
        lg.LaplaceClassifier(1.0).fit(J_sharded, np.zeros(N, dtype=np.int64))


def test_unknown_chunk_sizes_are_refused(client, data):
    X = rows(data["X"])
    with pytest.raises(lg.ShapeError, match="compute_chunk_sizes"):
        lg.export_jacobian(data["net"], X[X[:, 0] > 0])


def test_nan_in_one_shard_names_its_examples(client, data):
    X = data["X"].copy()
    X[CHUNK + 4, 1] = np.nan  # in the second shard, examples [15, 30)
    with pytest.raises(lg.NonFiniteError, match=rf"\[{CHUNK}, {2 * CHUNK}\)"):
        lg.export_jacobian(data["net"], rows(X))


def test_float32_inputs_to_a_float64_model_are_refused(client, data):
    with pytest.raises(lg.DTypeError, match=r"float32.*float64"):
        lg.export_jacobian(data["net"], rows(data["X"].astype(np.float32)))


@pytest.mark.parametrize("options, error, match", [
    ({"outputs": [5]}, lg.ValueRangeError, r"outputs must lie in \[-2, 1\], got 5"),
    ({"params": "nope"}, lg.ValueRangeError, "'nope' names no parameter"),
    ({"params": 3}, lg.ArgumentTypeError, "params must be"),
    ({"dtype": "float16"}, lg.DTypeError, "float16"),
    ({"batch_size": 0}, lg.ValueRangeError, "batch_size"),
    ({"memory_budget": -1.0}, lg.ValueRangeError, "memory_budget"),
])
def test_bad_export_options_fail_on_the_client_before_any_shard(client, data, options, error, match):
    from distributed import get_task_stream
    began = time.time()
    with get_task_stream(client) as stream, pytest.raises(error, match=match) as raised:
        lg.export_jacobian(data["net"], rows(data["X"]), **options)
    assert "before any shard" in str(raised.value) and str(tuple(data["X"].shape)) in str(raised.value)
    # (a previous test's shards may still be finishing: only tasks started during this call count)
    started = [task for task in stream.data if "_export_shard" in str(task["key"])
               and min(part["start"] for part in task["startstops"]) >= began]
    assert not started


@pytest.mark.parametrize("method", ["parameter-cholesky", "parameter-spectral", "function-spectral", "spectral"])
def test_in_memory_methods_are_refused_on_a_sharded_jacobian(client, data, J_sharded, method):
    with pytest.raises(lg.InvalidOptionError, match="needs the Jacobian in memory"):
        lg.LinearizedGP(S, 0.05, method=method).fit(J_sharded, rows(data["y"]))


def test_a_failed_fit_leaves_a_fitted_model_as_it_was(client, data, J_sharded):
    gp = lg.LinearizedGP(S, 0.05, method="function-cholesky").fit(J_sharded, rows(data["y"]))
    before = gp.predict(data["Js"], return_var=True)
    plan, lml = gp.plan_, gp.log_marginal_likelihood()
    with pytest.raises(lg.ShapeError, match="rows"):
        gp.fit(J_sharded, rows(data["y"][:-1]))
    y_nan = data["y"].copy()
    y_nan[CHUNK + 1, 0] = np.nan
    with pytest.raises(lg.NonFiniteError):
        gp.fit(J_sharded, rows(y_nan))
    gp.memory_budget = 1000.0  # the plan fails after the draft has taken the new data
    with pytest.raises(lg.MemoryBudgetError, match="blocked Cholesky needs .* over the cluster budget"):
        gp.fit(J_sharded, rows(2 * data["y"]))
    gp.memory_budget = None
    assert gp.plan_ is plan and gp.log_marginal_likelihood() == lml
    after = gp.predict(data["Js"], return_var=True)
    for a, b in zip(before, after):
        assert np.array_equal(a, b)


def test_hyperparameter_search_needs_an_in_memory_jacobian(data, fitted):
    gp = fitted("function-cholesky", "full", "scalar").gp
    with pytest.raises(lg.MissingCapabilityError, match="in-memory subset"):
        gp.optimize_hyperparameters()
    with pytest.raises(lg.MissingCapabilityError, match="in-memory subset"):
        gp.average_hyperparameters()


# ----- save / load -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["function-cholesky", "iterative"])
def test_a_cluster_model_saves_to_one_archive_and_loads_without_the_cluster(data, fitted, tmp_path, method):
    fit = fitted(method, "full", "scalar")
    path = fit.gp.save(tmp_path / "gp.npz")
    assert sorted(os.listdir(tmp_path)) == ["gp.npz"]
    assert sharded.current_client() is None  # this test does not make the cluster current: load cannot use it
    loaded = lg.LinearizedGP.load(path)
    assert loaded.plan_.method == method
    for a, b in zip(loaded.predict(data["Js"], return_var=True), (fit.mean, fit.var)):
        assert_close(a, b, 1e-12)


# ----- no client -------------------------------------------------------------------------------------------------

def test_without_a_client_dask_inputs_export_in_memory(data):
    """Dask's default scheduler computes the inputs in this process. The module's cluster may be running (tests
    before this one started it) but its Client is not the default one and is current only inside tests that ask
    for it, so none is current here."""
    assert sharded.current_client() is None
    J = lg.export_jacobian(data["net"], rows(data["X"]))
    assert isinstance(J, lg.JacobianBlocks)
    assert J.signature() == data["J_local"].signature()
    assert np.array_equal(J.f0, data["J_local"].f0)
    assert_close(J.to_dense(), data["o"]["J"], F64_RTOL)
    assert_close(J.to_dense(), data["J_local"].to_dense(), F64_RTOL)
    # the README's workflow with dask targets too: the default scheduler computes them for the in-memory fit
    gp = lg.LinearizedGP(S, 0.05, method="function-cholesky").fit(J, rows(data["y"]))
    local = lg.LinearizedGP(S, 0.05, method="function-cholesky").fit(data["J_local"], data["y"])
    assert_close(gp.predict(data["Js"]), local.predict(data["Js"]), F64_RTOL)
    labels = np.arange(N) % 2
    clf = lg.LaplaceClassifier(1.0).fit(J, rows(labels))
    assert_close(clf.predict_proba(data["Js"]), lg.LaplaceClassifier(1.0).fit(J, labels).predict_proba(data["Js"]),
                 F64_RTOL)


def test_parameter_objects_select_the_same_columns_on_the_workers(client, data):
    """params= given as a module and as a parameter object name parts of the model the workers unpickle."""
    net = data["net"]
    for params in (net[2], [net[4].weight]):
        J = lg.export_jacobian(net, rows(data["X"]), params=params)
        local = lg.export_jacobian(net, torch.from_numpy(data["X"]), params=params)
        assert J.param_names == local.param_names and J.p == local.p < data["J_local"].p
        eye = np.eye(J.p)
        assert_close(J.matmat(eye), local.to_dense(), F64_RTOL)


def test_shards_stay_where_they_were_exported(client):
    """A wide network (p = 92,102) whose product operands (a p-vector, the p-vector sum of a kernel product)
    outweigh its factored shards: ten products of each kind leave every shard on its one home worker. Unpinned, the
    scheduler moved shards to wherever the operand was."""
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(3, 300), torch.nn.Tanh(), torch.nn.Linear(300, 300), torch.nn.Tanh(),
                              torch.nn.Linear(300, 2)).double()
    J = lg.export_jacobian(net, rows(np.random.default_rng(4).standard_normal((60, 3))))

    def placement():
        held = client.who_has(J.shards)
        return [tuple(sorted(held[shard.key])) for shard in J.shards]

    before = placement()
    assert all(len(workers) == 1 for workers in before) and len({w for (w,) in before}) == 2
    for _ in range(10):
        J.matmat(np.ones((J.p, 1)))
        J.kernel_matmat(np.ones((2 * 60, 1)), "full")
    assert placement() == before


def test_sharded_jacobian_methods_work_or_say_why(client, data, J_sharded):
    assert_close(J_sharded.gram_diagonal(), data["J_local"].gram_diagonal(), F64_RTOL)
    U = np.random.default_rng(3).standard_normal((2 * N, 2))
    assert_close(J_sharded.gram_matmat(U), data["J_local"].gram_matmat(U), F64_RTOL)
    for call in (J_sharded.gram, lambda: J_sharded.examples(slice(0, 3)), J_sharded.to_dense,
                 lambda: J_sharded.blocks, lambda: lg.KernelOperator(J_sharded)):
        with pytest.raises(lg.MissingCapabilityError):
            call()
    with pytest.raises(lg.ArgumentTypeError, match="must be Jacobians"):
        lg.kernel(np.zeros(3), J_sharded)
    with pytest.raises(lg.MemoryBudgetError, match="cross kernel"):
        lg.kernel(data["Js"], J_sharded, memory_budget=1000)
    # row factors checked on the client as in memory (extra rows were dropped per shard, NaN found lazily)
    for factors, error in ((np.ones((N + 5, 2)), lg.ShapeError), (np.full((N, 2), np.nan), lg.NonFiniteError),
                           (np.ones((N, 2), dtype=np.float32), lg.DTypeError)):
        for J in (J_sharded, data["J_local"]):
            with pytest.raises(error, match="factors"):
                J.transform_rows(factors)
    for wrong, error in ((True, lg.ArgumentTypeError), (1.0, lg.ArgumentTypeError), (2, lg.ValueRangeError)):
        for J in (J_sharded, data["J_local"]):
            with pytest.raises(error, match="output"):
                J.select(output=wrong)


def test_cluster_jitter_is_added_and_announced_as_in_memory(client):
    """A kernel of rank 8 < m = 60 with noise far below its rounding: the plain factorization fails on the cluster
    as in memory, both add the same jitter and warn."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2)).double()  # p = 12
    X = np.random.default_rng(4).standard_normal((30, 2))
    y = np.random.default_rng(5).standard_normal((30, 2))
    J, J_local = lg.export_jacobian(net, rows(X, 10)), lg.export_jacobian(net, torch.from_numpy(X))
    noise = 1e-300
    with pytest.warns(lg.NumericalWarning, match="jitter"):
        local = lg.LinearizedGP(1.0, noise, method="function-cholesky").fit(J_local, y)
    with pytest.warns(lg.NumericalWarning, match="jitter"):
        gp = lg.LinearizedGP(1.0, noise, method="function-cholesky").fit(J, rows(y, 10))
    assert local.diagnostics_[0]["jitter"] > 0
    assert gp.diagnostics_[0]["jitter"] == pytest.approx(local.diagnostics_[0]["jitter"], rel=1e-12)


def test_many_shards_make_auto_go_iterative(client, data):
    """More shards than _plan.MAX_TILES: ~T³/6 tile tasks; auto goes iterative and a forced exact fit says why."""
    from lingp_core import _plan
    rng = np.random.default_rng(6)
    n = _plan.MAX_TILES + 2
    X, y = rows(rng.standard_normal((n, 3)), 1), rows(rng.standard_normal((n, 2)), 1)
    J = lg.export_jacobian(data["net"], X)
    assert len(J.shards) == n
    gp = lg.LinearizedGP(S, 1.0, method="auto", preconditioner_rank=1, variance_rank=1).fit(J, y)
    assert gp.plan_.method == "iterative" and "rechunk" in gp.plan_.reason
    with pytest.raises(lg.InvalidOptionError, match="rechunk"):
        lg.LinearizedGP(S, 1.0, method="function-cholesky").fit(J, y)


def test_a_hessian_over_a_workers_share_fails_before_any_task(client, data, J_sharded):
    """p = 10,100: three p × p float64 arrays (2.4 GiB) on one worker, over half its 2 GiB limit; the fit fails on
    the client before any Hessian part is computed, and a fitted model stays as it was."""
    from distributed import get_task_stream
    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Linear(3, 100), torch.nn.Tanh(), torch.nn.Linear(100, 100)).double()
    labels = np.arange(N) % 100
    J = lg.export_jacobian(wide, rows(data["X"]), params="2")
    fitted_labels = np.argmax(data["o"]["f"], axis=1)
    clf = lg.LaplaceClassifier(1.0).fit(J_sharded, rows(fitted_labels))
    before = clf.predict_logits(data["Js"])
    began = time.time()
    with get_task_stream(client) as stream, pytest.raises(lg.MemoryBudgetError, match=r"parts on one worker .* 10100"):
        clf.fit(J, rows(labels))
    started = [task for task in stream.data if "_dense_ggn" in str(task["key"])
               and min(part["start"] for part in task["startstops"]) >= began]
    assert not started
    assert_close(clf.predict_logits(data["Js"]), before, rtol=0.0)


class _NoLimitClient:
    """What the planner reads of a cluster whose workers report no memory limit."""

    def scheduler_info(self, **_):
        return {"workers": {"w0": {"memory_limit": 0}, "w1": {"memory_limit": 0}}}


class _GPUClient:
    """What the planner asks of a cluster of CuPy workers: each worker's free device memory (client.run)."""

    def run(self, fn):
        return {"w0": 3000, "w1": 1000}


def test_workers_without_a_memory_limit_need_a_budget_for_the_exact_path_only():
    from lingp_core import _plan
    with pytest.raises(lg.MemoryBudgetError, match="no memory limit"):
        _plan.cluster_budget(_NoLimitClient(), None)
    given = _plan.cluster_budget(_NoLimitClient(), 12345)
    assert (given.budget, given.per_worker) == (12345, None)
    gpus = _plan.cluster_budget(_GPUClient(), None, "cupy")  # device memory, not the hosts' memory limits
    assert (gpus.budget, gpus.per_worker) == (2000, 500) and "GPUs" in gpus.source


def test_a_tile_update_must_fit_one_worker(client, data, J_sharded):
    """The cluster's total can hold the factorization while one worker cannot hold a tile update (four tiles)."""
    from lingp_core import _plan
    gp = lg.LinearizedGP(S, 0.05)
    pb = _plan.problem_of(J_sharded, gp._layout, 0.05, gp)
    tile = 4 * 8 * (CHUNK * 2) ** 2
    roomy = _plan.ClusterMemory(10**12, tile, "test")
    assert _plan._exact_obstacle(pb, J_sharded, roomy, None) is None
    tight = _plan.ClusterMemory(10**12, tile - 1, "test")
    why, error = _plan._exact_obstacle(pb, J_sharded, tight, None)
    assert error is lg.MemoryBudgetError and "one worker" in why


# ----- a worker dies ---------------------------------------------------------------------------------------------

def test_an_iterative_fit_survives_a_killed_worker(client, data, J_sharded, fitted, monkeypatch):
    """SIGKILL the worker process holding shard 0 at the 3rd kernel product of an iterative fit: Dask recomputes
    the lost shards from their lineage, the nanny restarts the worker, and the fit ends with the undisturbed fit's
    answer. Runs last: the cluster is back to 2 workers afterwards."""
    undisturbed = fitted("iterative", "full", "scalar")
    killed, calls = [], {"n": 0}
    original = ShardedJacobian.kernel_matmat

    def kill_at_third_call(self, X, mode):
        calls["n"] += 1
        if calls["n"] == 3:
            address = next(iter(client.who_has(self.shards)[self.shards[0].key]))
            pid = client.run(os.getpid, workers=[address])[address]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return original(self, X, mode)

    monkeypatch.setattr(ShardedJacobian, "kernel_matmat", kill_at_third_call)
    gp = lg.LinearizedGP(S, NOISES["scalar"], method="iterative", **SMALL_RANKS).fit(J_sharded, rows(data["y"]))
    monkeypatch.undo()
    assert len(killed) == 1 and calls["n"] > 3
    # the same CG run on the same (recomputed) shards: the same iterations and, to rounding, the same mean
    assert gp.diagnostics_[0]["cg_iterations"] == undisturbed.gp.diagnostics_[0]["cg_iterations"]
    assert_close(gp.predict(data["Js"]), undisturbed.mean, 1e-12)
    client.wait_for_workers(2, timeout=60)
    assert killed[0] not in client.run(os.getpid).values()
    V = np.random.default_rng(2).standard_normal((J_sharded.p, 2))
    assert_close(J_sharded.matmat(V), data["o"]["J"] @ V, F64_RTOL)  # the restarted cluster still serves J


def test_a_fit_survives_the_only_worker_killed(data, monkeypatch):
    """A one-worker cluster (one GPU's LocalCUDACluster, say) whose worker is SIGKILLed at the 3rd kernel product of
    an iterative fit: the nanny restarts it under a new address, Dask recomputes the shards there, and the fit ends
    with the exact path's answer. It used to wait forever: the export's tasks stayed restricted to the dead address,
    which distributed does not reconsider for a new worker even for loose restrictions."""
    local = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                         scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, memory_limit="2GiB")
    client = Client(local, set_as_default=False)
    killed, calls = [], {"n": 0}
    original = ShardedJacobian.kernel_matmat

    def kill_at_third_call(self, X, mode):
        calls["n"] += 1
        if calls["n"] == 3:
            pid = next(iter(client.run(os.getpid).values()))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return original(self, X, mode)

    def fit():
        with client.as_current():
            J = lg.export_jacobian(data["net"], rows(data["X"]))
            monkeypatch.setattr(ShardedJacobian, "kernel_matmat", kill_at_third_call)
            gp = lg.LinearizedGP(S, NOISES["scalar"], method="iterative", **SMALL_RANKS).fit(J, rows(data["y"]))
            monkeypatch.undo()
            return gp.predict(data["Js"])

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        mean = pool.submit(fit).result(timeout=180)  # a hang fails here instead of stalling the suite
    finally:
        client.close()  # a fit still waiting then fails in its thread, which ends
        local.close()
        pool.shutdown(wait=False)
    d_mean = dense_posterior(data["o"], S, NOISES["scalar"], "full")[0]
    assert len(killed) == 1 and calls["n"] > 3
    assert np.abs(mean - d_mean).max() <= ITERATIVE_MEAN_RTOL * np.abs(d_mean).max()


def _threads_cluster(**options):
    """A small in-process cluster (threads, no worker processes) with options of its own."""
    local = LocalCluster(threads_per_worker=1, processes=False, dashboard_address=None,
                         scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, **options)
    return local, Client(local, set_as_default=False)


def test_an_export_on_a_cluster_without_workers_says_so(data):
    """It waited forever (the client-side check's compute of the first example waits for a worker)."""
    local, client = _threads_cluster(n_workers=0)
    pool = concurrent.futures.ThreadPoolExecutor(1)

    def export():
        with client.as_current():
            return lg.export_jacobian(data["net"], rows(data["X"]))

    try:
        with pytest.raises(lg.MissingCapabilityError, match="no workers"):
            pool.submit(export).result(timeout=60)
    finally:
        client.close()
        local.close()
        pool.shutdown(wait=False)


def test_auto_goes_iterative_where_workers_report_no_memory_limit(data):
    """The exact path cannot be sized without a memory limit: "auto" goes matrix-free and says why (it raised);
    a forced exact fit still asks for memory_budget=."""
    local, client = _threads_cluster(n_workers=1, memory_limit=0)
    try:
        with client.as_current():
            J = lg.export_jacobian(data["net"], rows(data["X"]))
            gp = lg.LinearizedGP(S, NOISES["scalar"], method="auto", **SMALL_RANKS).fit(J, rows(data["y"]))
            assert gp.plan_.method == "iterative" and "no memory limit" in gp.plan_.reason
            d_mean = dense_posterior(data["o"], S, NOISES["scalar"], "full")[0]
            assert np.abs(gp.predict(data["Js"]) - d_mean).max() <= ITERATIVE_MEAN_RTOL * np.abs(d_mean).max()
            with pytest.raises(lg.MemoryBudgetError, match="no memory limit"):
                lg.LinearizedGP(S, NOISES["scalar"], method="function-cholesky").fit(J, rows(data["y"]))
    finally:
        client.close()
        local.close()


def test_every_lingp_error_survives_distributed_error_pickling():
    """What a worker does with a failed task's exception (distributed's error_message, then its pickle): each
    LingpError class comes back as itself with its message; MemoryBudgetError (a MemoryError) used to arrive as a
    bare Exception."""
    from distributed.core import error_message
    from distributed.protocol import pickle as dask_pickle

    from lingp_core import _validate as v

    classes = [c for c in vars(v).values() if isinstance(c, type) and issubclass(c, v.LingpError)]
    assert v.MemoryBudgetError in classes and len(classes) > 10
    for cls in classes:
        error = cls(f"{cls.__name__}: the shapes at fault")
        error_message(error)
        back = dask_pickle.loads(dask_pickle.dumps(error))
        assert type(back) is cls and back.args == error.args


def test_cluster_fits_report_conditioning_and_float32_rounding_as_in_memory(client, data):
    """Inputs twice each and σ² = 1e-13: the blocked Cholesky reports the in-memory engine's condition bound and
    warns the same way; a float32 kernel's estimated error (s·λmax by power steps through the shards' products) is
    the in-memory one and warns past its threshold. Both were missing on the cluster."""
    from lingp_core import gp as gp_module

    X = np.vstack([data["X"][: N // 2]] * 2)
    y = data["y"][: len(X)]
    J_local, J = lg.export_jacobian(data["net"], torch.from_numpy(X)), lg.export_jacobian(data["net"], rows(X))
    bounds = []
    for JJ, yy in ((J_local, y), (J, rows(y))):
        with pytest.warns(lg.NumericalWarning, match="ill-conditioned"):
            gp = lg.LinearizedGP(1.0, 1e-13, method="function-cholesky").fit(JJ, yy)
        bounds.append(gp.diagnostics_[0]["condition_bound"])
    assert bounds[0] > gp_module.ILL_CONDITIONED
    np.testing.assert_allclose(bounds[1], bounds[0], rtol=1e-4)  # pivots that lost ~13 digits agree to ~4e-6
    errors = []
    for JJ, yy in ((data["J_local"], data["y"]), (J_sharded_of(data), rows(data["y"]))):
        with pytest.warns(lg.NumericalWarning, match="float32 rounding"):
            gp = lg.LinearizedGP(100.0, 0.05, method="function-cholesky", kernel_dtype="float32").fit(JJ, yy)
        errors.append(gp.diagnostics_[0]["kernel_float32_error"])
    assert errors[0] > gp_module.FLOAT32_KERNEL_WARN
    np.testing.assert_allclose(errors[1], errors[0], rtol=1e-6)  # in memory the power steps run in float32
    net32 = tanh_mlp(torch.float32)  # a float32 export: the power steps' vectors in its dtype
    X32 = data["X"].astype(np.float32)
    for JJ, yy in ((lg.export_jacobian(net32, torch.from_numpy(X32)), data["y"].astype(np.float32)),
                   (lg.export_jacobian(net32, rows(X32)), rows(data["y"].astype(np.float32)))):
        with pytest.warns(lg.NumericalWarning, match="float32 rounding"):
            lg.LinearizedGP(100.0, 0.05, method="function-cholesky", kernel_dtype="float32").fit(JJ, yy)


def J_sharded_of(data):
    return lg.export_jacobian(data["net"], rows(data["X"]))


def test_a_lost_cluster_is_reported_as_such(data, tmp_path):
    """After the cluster restarts (its futures cancelled) and after the client closes, every use of a sharded
    Jacobian or of a model holding a cluster factorization raises ClusterError, not distributed's own exceptions,
    and save() writes nothing."""
    local = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                         scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, memory_limit="2GiB")
    client = Client(local, set_as_default=False)
    try:
        with client.as_current():
            J = lg.export_jacobian(data["net"], rows(data["X"]))
            exact = lg.LinearizedGP(S, NOISES["scalar"], method="function-cholesky").fit(J, rows(data["y"]))
            client.restart()
            uses = {"J.matmat": lambda: J.matmat(np.ones((J.p, 1))),
                    "predict": lambda: exact.predict(data["Js"], return_var=True),
                    "save": lambda: exact.save(tmp_path / "restarted.npz"),
                    "fit": lambda: lg.LinearizedGP(S, NOISES["scalar"]).fit(J, rows(data["y"])),
                    "kernel": lambda: lg.kernel(data["Js"], J), "persist": J.persist,
                    "kernel tiles": lambda: lg.kernel(J)}
            for name, use in uses.items():
                with pytest.raises(lg.ClusterError, match="cancelled"):
                    use()
                    pytest.fail(f"{name} did not raise")
            J2 = lg.export_jacobian(data["net"], rows(data["X"]))
        client.close()
        for use in (lambda: J2.matmat(np.ones((J2.p, 1))), lambda: lg.LinearizedGP(S, 0.1).fit(J2, rows(data["y"])),
                    lambda: lg.kernel(data["Js"], J2), J2.persist, lambda: lg.kernel(J2)):
            with pytest.raises(lg.ClusterError, match="client is closed"):
                use()
        assert not list(tmp_path.iterdir())
    finally:
        client.close()
        local.close()
