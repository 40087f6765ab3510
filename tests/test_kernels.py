"""kernel, kernel_diag and KernelOperator against float64 dense kernels from torch.func Jacobians, in every mode."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

nn = torch.nn

import lingp_core as lg  # noqa: E402
from lingp_core import kernels as kernels_module  # noqa: E402
from tests.helpers import assert_matches, tolerance  # noqa: E402
from tests.test_export import SmallCNN, mlp, on_backend, oracle  # noqa: E402

MODES = ["full", "independent", "trace", 1]
S = 0.7  # prior scale


def dense_kernel(J1: np.ndarray, J2: np.ndarray, c: int, mode) -> np.ndarray:
    """The float64 oracle: s·J1 J2ᵀ rearranged for the output mode."""
    full = S * J1 @ J2.T
    n1, n2 = J1.shape[0] // c, J2.shape[0] // c
    per_output = full.reshape(n1, c, n2, c)
    independent = np.stack([per_output[:, k, :, k] for k in range(c)])
    if mode == "full":
        return full
    if mode == "independent":
        return independent
    if mode == "trace":
        return independent.mean(axis=0)
    return independent[mode]


def exported(backend, model, x, dtype=np.float64, **kw):
    model, x = on_backend(model, x, backend, dtype)
    return lg.export_jacobian(model, x, backend=backend.name, **kw), oracle(model, x)[0]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("structure", ["auto", "dense"])
def test_kernel_matches_the_dense_oracle(backend, mode, structure):
    J, J64 = exported(backend, mlp(nn.Tanh, widths=(3, 8, 8, 3)), torch.randn(6, 3), structure=structure)
    K = lg.kernel(J, prior_scale=S, output_mode=mode)
    assert_matches(K, dense_kernel(J64, J64, 3, mode), backend, dtype=np.float64, rtol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_cross_kernel_between_test_and_training_inputs(backend, mode):
    model = SmallCNN()
    J, J64 = exported(backend, model, torch.randn(5, 2, 6, 6))
    Js, Js64 = exported(backend, model, torch.randn(3, 2, 6, 6))
    K = lg.kernel(Js, J, prior_scale=S, output_mode=mode)
    assert_matches(K, dense_kernel(Js64, J64, 3, mode), backend, dtype=np.float64, rtol=1e-10)


def test_many_tiles_give_the_same_symmetric_kernel(backend, monkeypatch):
    monkeypatch.setattr(kernels_module, "_TILE_ROWS", 7)  # several tiles per side, uneven last tile
    model = mlp(nn.ELU, widths=(3, 8, 2))
    J, J64 = exported(backend, model, torch.randn(11, 3))
    Js, Js64 = exported(backend, model, torch.randn(2, 3), dtype=np.float32)  # one tile against J's four
    J32, J32_64 = exported(backend, model, torch.randn(11, 3), dtype=np.float32)
    for mode in MODES[:3]:
        K = lg.kernel(J, prior_scale=S, output_mode=mode)
        assert_matches(K, dense_kernel(J64, J64, 2, mode), backend, dtype=np.float64, rtol=1e-10)
        K = backend.to_numpy(K)
        assert np.array_equal(K, np.swapaxes(K, -1, -2))  # mirrored, not recomputed: exactly symmetric
        # float32 blocks converted to float64 tile by tile when used once (a single left tile), or kept when reused
        for left, right, left64, right64 in ((Js, J32, Js64, J32_64), (J32, Js, J32_64, Js64)):
            K = lg.kernel(left, right, prior_scale=S, output_mode=mode)
            assert_matches(K, dense_kernel(left64, right64, 2, mode), backend, dtype=np.float64,
                           rtol=tolerance(np.float32, 100))  # the blocks carry float32 rounding


@pytest.mark.parametrize("mode,symmetric,total", [("full", True, 10), ("independent", True, 6), ("full", False, 8)])
def test_kernel_progress_bar_counts_every_tile(monkeypatch, capsys, mode, symmetric, total):
    """11 examples × 2 outputs in tiles of 7 rows: "full" has 4 row tiles (3 examples each) → 10 upper tile pairs,
    each output of "independent" 2 → 3 pairs × 2 outputs; against 5 examples (2 tiles), 4 × 2 = 8 pairs. The kernel
    is the same with and without the bar."""
    monkeypatch.setattr(kernels_module, "_TILE_ROWS", 7)
    be = lg.get_backend("numpy")
    model = mlp(nn.ELU, widths=(3, 8, 2))
    J = exported(be, model, torch.randn(11, 3))[0]
    other = None if symmetric else exported(be, model, torch.randn(5, 3))[0]
    real_bar, updates = kernels_module.progress_bar, []

    def recording_bar(*args, **kwargs):
        bar = real_bar(*args, **kwargs)
        update = bar.update
        bar.update = lambda k=1: (updates.append(k), update(k))
        return bar

    monkeypatch.setattr(kernels_module, "progress_bar", recording_bar)
    quiet = lg.kernel(J, other, prior_scale=S, output_mode=mode)
    assert capsys.readouterr().err == ""  # no bar asked for: nothing shown
    updates.clear()
    loud = lg.kernel(J, other, prior_scale=S, output_mode=mode, progress=True)
    assert f"kernel:   0%|          | 0/{total}" in capsys.readouterr().err and sum(updates) == total
    assert np.array_equal(quiet, loud)


def stored_jacobian64(J) -> np.ndarray:
    """The Jacobian that J's stored (float32) numbers represent, formed in float64 by the test itself: dense blocks
    cast, factored ones as Σ_t δ_ikt a_itᵀ (and Σ_t δ_ikt for the bias) from A and Δ cast to float64."""
    parts = []
    for b in J.blocks:
        if b.kind == "dense":
            parts.append(np.asarray(J.backend.to_numpy(b.values), dtype=np.float64))
            continue
        A = J.backend.to_numpy(b.A).astype(np.float64)
        D = J.backend.to_numpy(b.delta).astype(np.float64)
        n, c, _, out = D.shape
        if b.has_weight:
            parts.append(np.einsum("icto,itj->icoj", D, A[:, :, :b.in_features]).reshape(n * c, -1))
        if b.has_bias:
            parts.append(D.sum(axis=2).reshape(n * c, out))
    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize("structure", ["auto", "dense"])
def test_float32_blocks_accumulate_in_float64_by_default(backend, monkeypatch, structure):
    """float32 blocks, float64 kernel: the products of the stored float32 numbers must be exact to float64, in every
    output mode, symmetric and cross, with one tile and with several (a float32 accumulation is off by ~1e-7)."""
    model = mlp(nn.Tanh, widths=(3, 8, 2))
    J, J64 = exported(backend, model, torch.randn(9, 3), dtype=np.float32, structure=structure)
    Js, _ = exported(backend, model, torch.randn(2, 3), dtype=np.float32, structure=structure)
    assert ("factored" in [b.kind for b in J.blocks]) == (structure == "auto")
    G, Gs = stored_jacobian64(J), stored_jacobian64(Js)
    np.testing.assert_allclose(G, J64, rtol=tolerance(np.float32), atol=tolerance(np.float32) * np.abs(J64).max())
    f64 = tolerance(np.float64)
    for tile_rows in (1024, 4):  # one tile; several (J2's tiles converted once and reused, or one left tile)
        monkeypatch.setattr(kernels_module, "_TILE_ROWS", tile_rows)
        for mode in MODES:
            for left, right, left64, right64 in ((J, None, G, G), (Js, J, Gs, G), (J, Js, G, Gs)):
                K = lg.kernel(left, right, prior_scale=S, output_mode=mode)
                assert_matches(K, dense_kernel(left64, right64, 2, mode), backend, dtype=np.float64, rtol=f64)
        assert_matches(lg.kernel_diag(J, prior_scale=S), S * np.einsum("ij,ij->i", G, G), backend, dtype=np.float64,
                       rtol=f64)


def test_float32_kernel_accumulates_in_float32(backend):
    """dtype=float32 is the documented float32 accumulation (half the work space): float32 accuracy, and not merely
    the float64 kernel rounded at the end."""
    J, _ = exported(backend, mlp(nn.Tanh, widths=(3, 32, 32, 2)), torch.randn(12, 3), dtype=np.float32)
    G = stored_jacobian64(J)
    scale = 0.5  # exact in both dtypes: the float64 kernel rounded once is exactly what a float64 accumulation gives
    K32 = lg.kernel(J, prior_scale=scale, dtype=np.float32)
    assert_matches(K32, scale / S * dense_kernel(G, G, 2, "full"), backend, dtype=np.float32,
                   rtol=tolerance(np.float32, 100))
    K64 = lg.kernel(J, prior_scale=scale)
    assert not np.array_equal(backend.to_numpy(K32), backend.to_numpy(K64).astype(np.float32))


def test_kernel_of_a_sequence_model(backend):
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):  # x: (b, T, 3)
            return self.head(torch.tanh(self.inner(x)).mean(dim=1))

    J, J64 = exported(backend, Seq(), torch.randn(5, 4, 3), structure="factored")
    assert [getattr(b, "T", None) for b in J.blocks] == [4, 1]
    for mode in MODES:
        assert_matches(lg.kernel(J, prior_scale=S, output_mode=mode), dense_kernel(J64, J64, 2, mode), backend,
                       dtype=np.float64, rtol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_kernel_diag_matches_the_oracle(backend, mode):
    J, J64 = exported(backend, mlp(nn.ReLU, widths=(3, 8, 3)), torch.randn(6, 3))
    full = dense_kernel(J64, J64, 3, mode)
    expected = np.stack([np.diag(k) for k in full]) if mode == "independent" else np.diag(full)
    assert_matches(lg.kernel_diag(J, prior_scale=S, output_mode=mode), expected, backend, dtype=np.float64,
                   rtol=1e-10)


@pytest.mark.parametrize("mode", ["full", "trace", 0])
def test_kernel_operator_products_and_diagonal(backend, rng, mode):
    J, J64 = exported(backend, mlp(nn.Tanh, widths=(3, 8, 2)), torch.randn(6, 3))
    op = lg.KernelOperator(J, prior_scale=S, output_mode=mode, noise=0.1)
    K = dense_kernel(J64, J64, 2, mode) + 0.1 * np.eye(op.shape[0])
    assert op.shape == K.shape and op.dtype == np.float64
    V = rng.standard_normal((op.shape[0], 3))
    assert_matches(op.matmat(backend.asarray(V)), K @ V, backend, dtype=np.float64, rtol=1e-10)
    assert_matches(op.matmat(backend.asarray(V[:, 0])), K @ V[:, 0], backend, dtype=np.float64, rtol=1e-10)
    assert_matches(op.diagonal(), np.diag(K), backend, dtype=np.float64, rtol=1e-10)
    assert_matches(op.to_dense(), K, backend, dtype=np.float64, rtol=1e-10)
    solved = lg.cg(op, backend.asarray(V))  # the operator plugs into the solvers
    assert solved.converged.all()


def test_bad_inputs(backend):
    model = mlp(nn.Tanh, widths=(3, 8, 2))
    J, _ = exported(backend, model, torch.randn(4, 3))
    J_last, _ = exported(backend, model, torch.randn(4, 3), params="last_layer")
    J_out, _ = exported(backend, model, torch.randn(4, 3), outputs=[0])
    with pytest.raises(lg.ShapeError, match="export both with the same params"):
        lg.kernel(J, J_last)
    with pytest.raises(lg.ShapeError, match=r"J1 holds model outputs \(0, 1\) but J2 holds \(0,\)"):
        lg.kernel(J, J_out)
    with pytest.raises(ValueError, match="output_mode must be one of 'full', 'independent', 'trace'"):
        lg.kernel(J, output_mode="diag")
    with pytest.raises(lg.ValueRangeError, match=r"output_mode \(an output index\) must lie in \[0, 1\], got 2"):
        lg.kernel_diag(J, output_mode=2)
    with pytest.raises(lg.ValueRangeError, match="prior_scale must be finite and > 0"):
        lg.kernel(J, prior_scale=0.0)
    with pytest.raises(TypeError, match="J1 must be a JacobianBlocks"):
        lg.kernel(np.zeros((3, 3)))
    with pytest.raises(lg.DTypeError, match="dtype must be float32 or float64"):
        lg.kernel(J, dtype=np.int32)
    with pytest.raises(lg.MemoryBudgetError, match=r"the kernel of shape \(8, 8\)"):
        lg.kernel(J, memory_budget=100)
    with pytest.raises(ValueError, match="one operator per output"):
        lg.KernelOperator(J, output_mode="independent")


def test_a_kernel_that_overflows_raises_naming_the_jacobians():
    """Finite Jacobians whose products overflow float64: an error naming their size, not arrays of inf and NaN."""
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 2)).double()
    J = lg.export_jacobian(linear, torch.randn(6, 3, dtype=torch.float64) * 1e200)
    for call in (lambda: lg.kernel(J), lambda: lg.kernel_diag(J), lambda: lg.kernel(J, prior_scale=1e308)):
        with pytest.raises(lg.NonFiniteError, match=r"stored entries reach \d"):
            call()


# ----- prior_scale and noise must survive the cast to the dtype they are computed in ------------------------------

def test_scales_outside_the_dtype_are_refused_not_cast_to_zero_or_inf(backend, rng):
    """prior_scale = 1e-50 cast to float32 gave an all-zero kernel, 1e50 an Inf one (review t13)."""
    model, x = on_backend(mlp(nn.Tanh, (3, 5, 2)), torch.randn(4, 3), backend)
    J64, J32 = lg.export_jacobian(model, x, backend=backend.name), lg.export_jacobian(model, x, dtype="float32",
                                                                                     backend=backend.name)
    calls = (lambda s: lg.KernelOperator(J32, prior_scale=s), lambda s: lg.kernel(J32, prior_scale=s, dtype="float32"),
             lambda s: lg.kernel_diag(J64, prior_scale=s, dtype="float32"),
             lambda s: lg.kernel(J32, prior_scale=s, output_mode="trace", dtype="float32"))
    for s in (1e-50, 1e50):
        for call in calls:
            with pytest.raises(lg.ValueRangeError, match=rf"prior_scale = {re.escape(f'{s:.3g}')}.* float32.*float64"):
                call(s)
    with pytest.raises(lg.ValueRangeError, match=r"noise = 1e-50.* float32"):
        lg.KernelOperator(J32, noise=1e-50)
    # the same numbers are normal in float64: the results are s·J Jᵀ (+ σ²I) of the float64 oracle, not 0 or Inf
    Jd = oracle(model, x)[0]
    V = rng.standard_normal((Jd.shape[0], 2))
    for s in (1e-50, 1e50):
        assert_matches(lg.kernel(J32, prior_scale=s), s * Jd @ Jd.T, backend, dtype=np.float64,
                       rtol=tolerance(np.float32, 100))  # float32 blocks, float64 kernel
        op = lg.KernelOperator(J64, prior_scale=s, noise=s * 1e-3)
        assert_matches(op.matmat(backend.asarray(V)), s * Jd @ (Jd.T @ V) + s * 1e-3 * V, backend, dtype=np.float64)
    op = lg.KernelOperator(J32, noise=0.0)  # zero noise stays allowed
    assert_matches(op.matmat(backend.asarray(V.astype(np.float32))), Jd @ (Jd.T @ V.astype(np.float32)), backend,
                   dtype=np.float32)


def test_a_kernel_that_overflows_through_prior_scale_names_prior_scale(backend, dtype):
    """Finite Jacobians, a prior_scale normal in the dtype, but s·max|J J'ᵀ| past its largest number: the error blames
    prior_scale, not the Jacobian's size; and a scale that makes even the largest entry subnormal is refused."""
    model, x = on_backend(mlp(nn.Tanh, (3, 5, 2)), 3 * torch.randn(4, 3), backend, dtype)
    J = lg.export_jacobian(model, x, backend=backend.name)
    Jd = oracle(model, x)[0]
    info = np.finfo(dtype)
    largest = float(np.abs(Jd @ Jd.T).max())
    assert np.einsum("ij,ij->i", Jd, Jd).max() == pytest.approx(largest)  # diag reaches K's largest (Cauchy–Schwarz)
    s = float(info.max) / (largest / 4)  # s·largest = 4·max, s itself below max
    assert s < info.max and largest > 4
    for call in (lg.kernel, lg.kernel_diag):
        with pytest.raises(lg.NonFiniteError, match=rf"prior_scale = {re.escape(f'{s:.3g}')} times.* overflows "
                                                    rf"{np.dtype(dtype)}"):
            call(J, prior_scale=s, dtype=dtype)
    small = J.scale_blocks([1e-6] * len(J.blocks))  # K ~ 1e-12·(J Jᵀ)
    s = float(info.tiny) * 8
    assert s * 1e-12 * largest < info.tiny
    for call in (lg.kernel, lg.kernel_diag):
        with pytest.raises(lg.ValueRangeError, match=rf"prior_scale = {re.escape(f'{s:.3g}')} times.* underflows "
                                                     rf"{np.dtype(dtype)}"):
            call(small, prior_scale=s, dtype=dtype)
