"""Fisher / GGN operator and low-rank F and K against float64 dense oracles from torch.func.jacrev, on every backend.

The oracle is F = Jᵀ B J with J the full jacrev Jacobian of a float64 CPU copy of the model and B the block-diagonal
n·c × n·c matrix of the per-example Λ_i, written out here from the closed forms (softmax, sigmoid, 1/σ²).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

nn = torch.nn

from lingp_core._validate import (  # noqa: E402
    DTypeError,
    MemoryBudgetError,
    NonFiniteError,
    ShapeError,
    ValueRangeError,
)
from lingp_core.autograd_operator import AutogradJacobian  # noqa: E402
from lingp_core.export import export_jacobian  # noqa: E402
from lingp_core.fisher import FisherOperator, fisher, fisher_lowrank, kernel_lowrank  # noqa: E402
from lingp_core.likelihoods import BernoulliLikelihood, CategoricalLikelihood, GaussianLikelihood  # noqa: E402
from tests.helpers import assert_matches, tolerance  # noqa: E402
from tests.test_export import SequenceNet, SharedLinear, SmallCNN, mlp, on_backend, oracle  # noqa: E402

F64_RTOL = 1e-10
LOWRANK_RTOL = 1e-8  # acceptance: the low-rank Fisher of an exactly rank-r F reproduces F to 1e-8 (float64)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rtol_for(dtype) -> float:
    return F64_RTOL if np.dtype(dtype) == np.float64 else tolerance(dtype, 3e3)


def dense_lambda(name: str, f: np.ndarray, noise=None) -> np.ndarray:
    """Block-diagonal (n·c, n·c) Λ from the closed forms, in float64."""
    n, c = f.shape
    if name == "categorical":
        e = np.exp(f - f.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        blocks = np.einsum("ik,kl->ikl", p, np.eye(c)) - p[:, :, None] * p[:, None, :]
    elif name == "bernoulli":
        p = 1 / (1 + np.exp(-f))
        blocks = (p * (1 - p))[:, :, None]
    else:
        blocks = np.einsum("k,kl->kl", 1 / np.broadcast_to(noise, (c,)), np.eye(c))[None].repeat(n, 0)
    out = np.zeros((n * c, n * c))
    for i in range(n):
        out[i * c:(i + 1) * c, i * c:(i + 1) * c] = blocks[i]
    return out


CASES = {  # model, inputs, likelihood name, noise; each exercises a different block layout
    "mlp-categorical": (lambda: mlp(nn.Tanh, (3, 8, 8, 3)), (5, 3), "categorical", None),
    "mlp-bernoulli": (lambda: mlp(nn.ELU, (3, 8, 1)), (6, 3), "bernoulli", None),
    "sequence-gaussian": (lambda: SequenceNet(), (4, 3, 3), "gaussian", np.array([0.5, 2.0])),  # T = 3
    "shared-categorical": (lambda: SharedLinear(), (4, 3), "categorical", None),  # T = 2 (weight sharing)
    "cnn-categorical": (lambda: SmallCNN(), (3, 2, 6, 6), "categorical", None),  # dense conv/bn blocks
}


def make_likelihood(name, noise):
    return {"categorical": CategoricalLikelihood, "bernoulli": BernoulliLikelihood}[name]() if noise is None \
        else GaussianLikelihood(noise)


def setup_case(case, backend, dtype, structure="auto"):
    make_model, x_shape, name, noise = CASES[case]
    model, x = on_backend(make_model(), torch.randn(*x_shape), backend, dtype)
    J = export_jacobian(model, x, backend=backend.name, structure=structure, batch_size=2)
    J64, f64 = oracle(model, x)
    lik = make_likelihood(name, noise)
    return model, x, J, lik, J64, J64.T @ dense_lambda(name, f64, noise) @ J64


@pytest.mark.parametrize("structure", ["auto", "dense"])
@pytest.mark.parametrize("case", list(CASES))
def test_fisher_products_diagonal_and_dense(backend, dtype, rng, case, structure):
    if case == "cnn-categorical" and np.dtype(dtype) == np.float32:
        pytest.skip("float32 covered by the other cases")
    _, _, J, lik, J64, F64 = setup_case(case, backend, dtype, structure)
    rtol = rtol_for(dtype)
    op = fisher(J, lik, damping=0.25)
    assert isinstance(op, FisherOperator) and op.shape == (J.p, J.p) and op.dtype == dtype and op.backend == backend
    eye = np.eye(J.p)
    V = rng.standard_normal((J.p, 3)).astype(dtype)
    assert_matches(op.matmat(backend.asarray(V)), (F64 + 0.25 * eye) @ V.astype(np.float64), backend, dtype=dtype,
                   rtol=rtol)
    assert_matches(op.matmat(backend.asarray(V[:, 0])), (F64 + 0.25 * eye) @ V[:, 0].astype(np.float64), backend,
                   dtype=dtype, rtol=rtol)
    assert_matches(op.diagonal(), np.diag(F64) + 0.25, backend, dtype=dtype, rtol=rtol)
    assert_matches(op.to_dense(), F64 + 0.25 * eye, backend, dtype=dtype, rtol=rtol)
    assert_matches(fisher(J, lik).diagonal(), np.diag(F64), backend, dtype=dtype, rtol=rtol)
    assert_matches(J.column_sq_norms(), (J64**2).sum(axis=0), backend, dtype=dtype, rtol=rtol)


@pytest.mark.parametrize("case", ["mlp-categorical", "sequence-gaussian", "shared-categorical"])
@pytest.mark.parametrize("structure", ["factored", "dense"])
def test_transform_rows_and_column_norms(backend, rng, case, structure):
    _, _, J, lik, J64, _ = setup_case(case, backend, np.float64, structure)
    L = lik.sqrt_curvature(J.f0)
    G = J.transform_rows(L)
    L64 = backend.to_numpy(L)
    if L64.ndim == 2:
        L64 = np.einsum("ik,kl->ikl", L64, np.eye(J.n_outputs))
    n, c = J.n, J.n_outputs
    expected = np.einsum("ijk,ijp->ikp", L64, J64.reshape(n, c, -1)).reshape(n * c, -1)  # L_iᵀ J_i
    assert [b.kind for b in G.blocks] == [b.kind for b in J.blocks]
    assert_matches(G.to_dense(), expected, backend, dtype=np.float64, rtol=F64_RTOL)
    assert_matches(G.column_sq_norms(), (expected**2).sum(axis=0), backend, dtype=np.float64, rtol=F64_RTOL)
    if structure == "factored":
        assert all(g.A is b.A for g, b in zip(G.blocks, J.blocks))  # A is shared, only Δ is transformed
        if case != "mlp-categorical":
            assert max(b.T for b in J.blocks) > 1


def test_fisher_on_autograd_jacobian_and_explicit_f(backend, rng):
    model, x, J, lik, J64, F64 = setup_case("mlp-categorical", backend, np.float64)
    A = AutogradJacobian(model, x, backend=backend.name)
    V = rng.standard_normal((J.p, 2))
    assert_matches(fisher(A, lik).matmat(backend.asarray(V)), F64 @ V, backend, dtype=np.float64, rtol=F64_RTOL)
    with pytest.raises(NotImplementedError, match="exported blocks"):
        fisher(A, lik).diagonal()
    # Λ at other outputs than f0
    f_other = rng.standard_normal((J.n, J.n_outputs))
    F_other = J64.T @ dense_lambda("categorical", f_other) @ J64
    assert_matches(fisher(J, lik, backend.asarray(f_other)).matmat(backend.asarray(V)), F_other @ V, backend,
                   dtype=np.float64, rtol=F64_RTOL)
    assert_matches(fisher(J, "gaussian").to_dense(), J64.T @ J64, backend, dtype=np.float64, rtol=F64_RTOL)


# ----- low rank -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lanczos", "randomized"])
@pytest.mark.parametrize("case", ["sequence-gaussian", "mlp-categorical"])
def test_lowrank_fisher_reproduces_exactly_low_rank_F(backend, method, case):
    # n·c < p, so F has rank r ≤ n·c (n·(c − 1) for the categorical: each Λ_i has the null vector 1)
    _, _, J, lik, _, F64 = setup_case(case, backend, np.float64)
    r = J.n * (J.n_outputs - 1) if lik.name == "categorical" else J.n * J.n_outputs
    assert np.linalg.matrix_rank(F64) == r < J.p
    result = fisher_lowrank(J, lik, r, method=method, damping=0.1)
    assert result.vectors.shape == (J.p, r) and result.values.shape == (r,)
    values = backend.to_numpy(result.values)
    assert (values >= 0).all() and (np.diff(values) <= 0).all()
    assert_matches(result.matmat(backend.asarray(np.eye(J.p))), F64 + 0.1 * np.eye(J.p), backend, dtype=np.float64,
                   rtol=LOWRANK_RTOL)
    dense = F64 + 0.1 * np.eye(J.p)
    op = result.operator
    assert_matches(op.to_dense(), dense, backend, dtype=np.float64, rtol=LOWRANK_RTOL)
    B = np.random.default_rng(1).standard_normal((J.p, 2))
    assert_matches(op.solve(backend.asarray(B)), np.linalg.solve(dense, B), backend, dtype=np.float64,
                   rtol=LOWRANK_RTOL)
    assert op.logdet() == pytest.approx(np.linalg.slogdet(dense)[1], rel=LOWRANK_RTOL)
    assert result.trace == pytest.approx(np.trace(F64), rel=1e-12)
    assert 0 <= result.truncated_trace <= LOWRANK_RTOL * np.trace(F64)


@pytest.mark.parametrize("method", ["lanczos", "randomized"])
def test_lowrank_truncation_reports_dropped_trace(backend, method):
    _, _, J, lik, _, F64 = setup_case("mlp-categorical", backend, np.float64)
    eig = np.sort(np.linalg.eigvalsh(F64))[::-1]
    k = 4
    result = fisher_lowrank(J, lik, k, method=method, power_iters=4)
    values = backend.to_numpy(result.values)
    assert result.truncated_trace == pytest.approx(np.trace(F64) - values.sum(), rel=1e-10)
    # an approximation of a full-rank F: the top pairs are found to the accuracy the spectral gaps allow (1e-3 is a
    # quality check, not an exactness one), so what was dropped is the tail of the spectrum
    np.testing.assert_allclose(values, eig[:k], rtol=1e-3)
    assert result.truncated_trace == pytest.approx(eig[k:].sum(), rel=1e-2)
    assert backend.to_numpy(result.residual_norms).max() < 1e-2 * eig[0]


@pytest.mark.parametrize("method", ["lanczos", "randomized"])
def test_lowrank_kernel(backend, method):
    _, _, J, _, J64, _ = setup_case("sequence-gaussian", backend, np.float64)
    K = 2.5 * J64 @ J64.T  # n·c = 8 < p: full rank, reproduced exactly at k = n·c
    d = K.shape[0]
    result = kernel_lowrank(J, d, prior_scale=2.5, shift=0.3, method=method)
    dense = K + 0.3 * np.eye(d)
    assert_matches(result.operator.to_dense(), dense, backend, dtype=np.float64, rtol=LOWRANK_RTOL)
    y = np.random.default_rng(2).standard_normal(d)
    assert_matches(result.operator.solve(backend.asarray(y)), np.linalg.solve(dense, y), backend, dtype=np.float64,
                   rtol=LOWRANK_RTOL)
    assert result.operator.logdet() == pytest.approx(np.linalg.slogdet(dense)[1], rel=LOWRANK_RTOL)
    assert result.trace == pytest.approx(np.trace(K), rel=1e-12) and result.truncated_trace >= 0
    partial = kernel_lowrank(J, 3, prior_scale=2.5, method=method, power_iters=4)
    eig = np.sort(np.linalg.eigvalsh(K))[::-1]
    assert partial.truncated_trace == pytest.approx(eig[3:].sum(), rel=1e-3)


def test_lowrank_float32(backend):
    _, _, J, lik, _, F64 = setup_case("sequence-gaussian", backend, np.float32)
    r = J.n * J.n_outputs
    for method in ("lanczos", "randomized"):
        result = fisher_lowrank(J, lik, r, method=method, damping=0.1)
        assert result.vectors.dtype == np.float32 and result.operator.dtype == np.float32
        assert_matches(result.operator.to_dense(), F64 + 0.1 * np.eye(J.p), backend, dtype=np.float32,
                       rtol=tolerance(np.float32, 1e4))


# ----- bad input ----------------------------------------------------------------------------------------------------

def test_bad_inputs_raise(backend):
    _, _, J, lik, _, _ = setup_case("mlp-categorical", backend, np.float64)
    n, c = J.n, J.n_outputs
    with pytest.raises(ShapeError, match=rf"f has shape \(4, 3\); expected \(n, c\) = \({n}, {c}\)"):
        fisher(J, lik, backend.asarray(np.zeros((4, 3))))
    with pytest.raises(DTypeError, match="float32"):
        fisher(J, lik, backend.asarray(np.zeros((n, c), dtype=np.float32)))
    bad = np.zeros((n, c))
    bad[2, 1] = np.nan
    with pytest.raises(NonFiniteError, match="NaN"):
        fisher(J, lik, backend.asarray(bad))
    with pytest.raises(ShapeError, match="one logit per example"):
        fisher(J, BernoulliLikelihood())
    with pytest.raises(ShapeError, match="2 per-output variances"):
        fisher(J, GaussianLikelihood([1.0, 2.0]))
    with pytest.raises(ValueRangeError, match="damping"):
        fisher(J, lik, damping=-1.0)
    with pytest.raises(TypeError, match="JacobianBlocks"):
        fisher(np.zeros((3, 3)), lik)
    with pytest.raises(ShapeError, match=r"factors has shape \(5, 2\)"):
        J.transform_rows(backend.asarray(np.zeros((5, 2))))
    with pytest.raises(MemoryBudgetError, match="matrix-free"):
        fisher(J, lik).to_dense(memory_budget=100)
    with pytest.raises(ValueRangeError, match=r"k must lie in \[1, 15\]"):
        fisher_lowrank(J, lik, 16)
    with pytest.raises(ValueError, match="'lanczos', 'randomized'"):
        fisher_lowrank(J, lik, 2, method="svd")
    with pytest.raises(ValueRangeError, match="shift > 0"):
        _ = fisher_lowrank(J, lik, 2).operator
    with pytest.raises(ValueRangeError, match="prior_scale"):
        kernel_lowrank(J, 2, prior_scale=0.0)
    with pytest.raises(ValueRangeError, match="shift"):
        kernel_lowrank(J, 2, shift=-1.0)


def test_damping_and_shift_outside_the_dtype_are_refused(backend):
    """damping = 1e50 cast to float32 gave an Inf/NaN Fisher, 1e-50 silently none (review t14)."""
    model, x, J, lik, J64, F64 = setup_case("mlp-categorical", backend, np.float32)
    calls = ((lambda d: fisher(J, lik, damping=d), "damping"),
             (lambda d: fisher_lowrank(J, lik, 2, damping=d), "damping"),
             (lambda d: kernel_lowrank(J, 2, shift=d), "shift"),
             (lambda d: kernel_lowrank(J, 2, prior_scale=d, method="randomized"), "prior_scale"))
    for d in (1e-50, 1e50):
        for call, name in calls:
            with pytest.raises(ValueRangeError, match=rf"{name} = {re.escape(f'{d:.3g}')}.* float32.*float64"):
                call(d)
    # a large damping that float32 holds: F + damping·I of the float64 oracle, finite
    d = 1e30
    F = fisher(J, lik, damping=d)
    expected = F64 + d * np.eye(F64.shape[0])
    assert_matches(F.diagonal(), np.diag(expected).copy(), backend, dtype=np.float32)
    assert_matches(F.matmat(backend.xp.eye(F64.shape[0], dtype=np.float32)), expected, backend, dtype=np.float32)
    assert_matches(fisher(J, lik, damping=0.0).to_dense(), F64, backend, dtype=np.float32, rtol=rtol_for(np.float32))
