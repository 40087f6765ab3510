"""Jacobian blocks built by hand are validated at construction, and every Jacobian carries a fingerprint of the
weights it was exported at: models refuse a test Jacobian from other weights, kernels between two networks do not."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

nn = torch.nn

import lingp_core as lg  # noqa: E402
from lingp_core import io  # noqa: E402
from lingp_core.jacobian import (  # noqa: E402
    DenseBlock,
    FactoredLinearBlock,
    JacobianBlocks,
    SignatureDTypeError,
    SignatureShapeError,
)
from tests.helpers import assert_matches, dense_gp_posterior  # noqa: E402
from tests.test_export import SmallCNN, mlp, on_backend, oracle  # noqa: E402

S = 0.7  # prior scale


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def hand_built(backend, rng, n=3, c=2, dtype=np.float64):
    """A valid hand-built Jacobian: a dense block (w (2, 2), b (2,)) and a factored Linear layer fc (out 3, in 4)."""
    xp = backend.xp
    dense = DenseBlock(["w", "b"], [(2, 2), (2,)], backend.asarray(rng.standard_normal((n * c, 6)).astype(dtype)), c,
                       xp)
    A = rng.standard_normal((n, 1, 5)).astype(dtype)
    A[:, :, -1] = 1.0
    delta = rng.standard_normal((n, c, 1, 3)).astype(dtype)
    factored = FactoredLinearBlock(["fc.weight", "fc.bias"], [(3, 4), (3,)], backend.asarray(A),
                                   backend.asarray(delta), has_weight=True, has_bias=True, xp=xp)
    f0 = backend.asarray(rng.standard_normal((n, c)).astype(dtype))
    return f0, dense, factored, A, delta


# ----- hand-built blocks: NaN/Inf, shapes, dtypes, backends ---------------------------------------------------------

def test_non_finite_hand_built_blocks_name_the_block_and_parameter(backend, rng):
    xp = backend.xp
    values = rng.standard_normal((6, 6))
    values[3, 5] = np.nan  # row 3 = example 1, output 1; column 5 = b[1]
    with pytest.raises(lg.NonFiniteError, match=r"values of the dense block of w, b .* 1 NaN and 0 Inf .*row 3 "
                                                r"\(example 1, output 1\), column 5 \(parameter b\)"):
        DenseBlock(["w", "b"], [(2, 2), (2,)], backend.asarray(values), 2, xp)
    _, _, _, A, delta = hand_built(backend, rng)
    bad_A = A.copy()
    bad_A[2, 0, 1] = np.inf
    with pytest.raises(lg.NonFiniteError, match=r"layer inputs A of the factored block of fc.weight, fc.bias .*"
                                                r"0 NaN and 1 Inf .*example 2"):
        FactoredLinearBlock(["fc.weight", "fc.bias"], [(3, 4), (3,)], backend.asarray(bad_A), backend.asarray(delta),
                            has_weight=True, has_bias=True, xp=xp)
    bad_delta = delta.copy()
    bad_delta[1, 1, 0, 2] = np.nan
    with pytest.raises(lg.NonFiniteError, match=r"output sensitivities Δ of the factored block of fc.weight.*"
                                                r"example 1, output 1"):
        FactoredLinearBlock(["fc.weight", "fc.bias"], [(3, 4), (3,)], backend.asarray(A), backend.asarray(bad_delta),
                            has_weight=True, has_bias=True, xp=xp)
    f0, dense, factored, _, _ = hand_built(backend, rng)
    f0[0, 1] = np.nan
    with pytest.raises(lg.NonFiniteError, match=r"f0 .* example 0, output 1"):
        JacobianBlocks(f0, [dense, factored], backend=backend, outputs=(0, 1))


def test_finite_values_whose_sum_overflows_are_accepted(backend):
    """The one-sum finiteness check must not mistake an overflowing sum of finite entries for Inf."""
    big = backend.asarray(np.full((2, 2), 3e38, dtype=np.float32))
    block = DenseBlock(["w"], [(2,)], big, 1, backend.xp)
    J = JacobianBlocks(backend.asarray(np.zeros((2, 1), dtype=np.float32)), [block], backend=backend, outputs=(0,))
    assert J.shape == (2, 2)


def test_inconsistent_shapes_name_the_shapes(backend, rng):
    xp = backend.xp
    f0, dense, factored, A, delta = hand_built(backend, rng)
    with pytest.raises(lg.ShapeError, match="has 7 rows, not a multiple of c = 2"):
        DenseBlock(["w", "b"], [(2, 2), (2,)], backend.asarray(rng.standard_normal((7, 6))), 2, xp)
    with pytest.raises(lg.ShapeError, match=r"shape \(6, 5\) but its parameters' shapes \(2, 2\), \(2,\) make 6 "
                                            "columns"):
        DenseBlock(["w", "b"], [(2, 2), (2,)], backend.asarray(rng.standard_normal((6, 5))), 2, xp)
    with pytest.raises(lg.ShapeError, match=r"A has shape \(2, 1, 5\) .* but Δ \(3, 2, 1, 3\)"):
        FactoredLinearBlock(["fc.weight", "fc.bias"], [(3, 4), (3,)], backend.asarray(A[:2]), backend.asarray(delta),
                            has_weight=True, has_bias=True, xp=xp)
    with pytest.raises(lg.ShapeError, match=r"needs parameter shapes \(3, 4\), \(3,\).*got \(4, 3\), \(3,\)"):
        FactoredLinearBlock(["fc.weight", "fc.bias"], [(4, 3), (3,)], backend.asarray(A), backend.asarray(delta),
                            has_weight=True, has_bias=True, xp=xp)
    with pytest.raises(lg.ShapeError, match=r"dense block of w, b has n = 3 examples × c = 2 outputs .* f0 has shape "
                                            r"\(2, 2\)"):
        JacobianBlocks(f0[:2], [dense, factored], backend=backend, outputs=(0, 1))
    with pytest.raises(lg.ShapeError, match=r"outputs \(0,\) names 1 model outputs but f0 has shape \(3, 2\)"):
        JacobianBlocks(f0, [dense, factored], backend=backend, outputs=(0,))
    no_ones = A.copy()
    no_ones[1, 0, -1] = 0.5
    with pytest.raises(lg.ValueRangeError, match="last column must be ones"):
        FactoredLinearBlock(["fc.weight", "fc.bias"], [(3, 4), (3,)], backend.asarray(no_ones), backend.asarray(delta),
                            has_weight=True, has_bias=True, xp=xp)


def test_dtype_mismatches_raise(backend, rng):
    xp = backend.xp
    f0, dense, factored, A, delta = hand_built(backend, rng)
    with pytest.raises(lg.DTypeError, match="A have dtype float32 but output sensitivities Δ float64"):
        FactoredLinearBlock(["fc.weight", "fc.bias"], [(3, 4), (3,)], backend.asarray(A.astype(np.float32)),
                            backend.asarray(delta), has_weight=True, has_bias=True, xp=xp)
    dense32 = DenseBlock(["w", "b"], [(2, 2), (2,)], dense.values.astype(np.float32), 2, xp)
    with pytest.raises(lg.DTypeError, match="dense block of w, b has dtype float32 but f0 float64"):
        JacobianBlocks(f0, [dense32, factored], backend=backend, outputs=(0, 1))
    with pytest.raises(lg.DTypeError, match="dtype int64"):
        DenseBlock(["w"], [(2,)], backend.asarray(np.ones((2, 2), dtype=np.int64)), 1, xp)


def test_wrong_types_raise(rng):
    be = lg.get_backend("numpy")
    f0, dense, factored, _, _ = hand_built(be, rng)
    with pytest.raises(lg.ArgumentTypeError, match="must be a numpy array, got torch.Tensor"):
        DenseBlock(["w"], [(2,)], torch.ones(2, 2, dtype=torch.float64), 1, np)
    with pytest.raises(lg.ArgumentTypeError, match="blocks must hold DenseBlock or FactoredLinearBlock"):
        JacobianBlocks(f0, [dense, "factored"], backend=be, outputs=(0, 1))
    with pytest.raises(lg.ArgumentTypeError, match="backend must be a Backend"):
        JacobianBlocks(f0, [dense, factored], backend="numpy", outputs=(0, 1))


def test_mixed_backends_raise(cupy_backend, rng):
    host = lg.get_backend("numpy")
    with pytest.raises(lg.BackendMismatchError, match="backend 'cupy'.*array module is numpy"):
        DenseBlock(["w"], [(2,)], cupy_backend.asarray(np.ones((2, 2))), 1, np)
    f0, dense, factored, _, _ = hand_built(host, rng)
    with pytest.raises(lg.BackendMismatchError, match="holds numpy arrays but the Jacobian lives on backend 'cupy'"):
        JacobianBlocks(cupy_backend.asarray(f0), [dense, factored], backend=cupy_backend, outputs=(0, 1))


def test_archive_round_trip_rebuilds_validated_blocks(backend, rng):
    f0, dense, factored, _, _ = hand_built(backend, rng)
    J = JacobianBlocks(f0, [dense, factored], backend=backend, outputs=(0, 1), weights_fingerprint="abc")
    arrays, config = io.jacobian_to_arrays(J)
    host = {name: backend.to_numpy(a) for name, a in arrays.items()}
    back = io.jacobian_from_arrays(host, config, backend)
    assert [b.kind for b in back.blocks] == ["dense", "factored"] and back.weights_fingerprint == "abc"
    assert np.array_equal(backend.to_numpy(back.to_dense()), backend.to_numpy(J.to_dense()))
    old_config = {k: v for k, v in config.items() if k != "weights_fingerprint"}  # an archive from before
    assert io.jacobian_from_arrays(host, old_config, backend).weights_fingerprint is None
    tampered = dict(host, J_1_delta=host["J_1_delta"].copy())
    tampered["J_1_delta"][0, 0, 0, 0] = np.nan
    with pytest.raises(io.ArchiveError, match="cannot be rebuilt.*NonFiniteError.*output sensitivities"):
        io.jacobian_from_arrays(tampered, config, backend)
    with pytest.raises(io.ArchiveError, match="unknown Jacobian block kind 'sparse'"):
        io.jacobian_from_arrays(host, dict(config, blocks=[dict(config["blocks"][0], kind="sparse")]), backend)


# ----- the weights fingerprint ----------------------------------------------------------------------------------------

def test_fingerprint_follows_the_weights_not_the_export_options(backend):
    model, x = on_backend(SmallCNN(), torch.randn(4, 2, 6, 6), backend)
    J = lg.export_jacobian(model, x, backend=backend.name)
    assert isinstance(J.weights_fingerprint, str) and J.signature()["weights"] == J.weights_fingerprint
    same = [lg.export_jacobian(model, x[:2], backend=backend.name, structure="dense"),
            lg.export_jacobian(model, x, backend=backend.name, dtype="float32")]
    assert all(other.weights_fingerprint == J.weights_fingerprint for other in same)
    head = lg.export_jacobian(model, x, params="head", backend=backend.name)
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] += 1e-6  # not among head's columns, but J_head depends on it
    assert lg.export_jacobian(model, x, params="head", backend=backend.name).weights_fingerprint != \
        head.weights_fingerprint
    fingerprints = {J.weights_fingerprint}
    model.bn.running_mean[0] += 1e-6  # eval-mode batch norm: its statistics shape J
    fingerprints.add(lg.export_jacobian(model, x, backend=backend.name).weights_fingerprint)
    with torch.no_grad():
        model.head.bias[1] += 1e-6
    fingerprints.add(lg.export_jacobian(model, x, backend=backend.name).weights_fingerprint)
    assert len(fingerprints) == 3


def test_derived_jacobians_carry_the_fingerprint(backend, rng):
    model, x = on_backend(mlp(nn.Tanh, (3, 5, 2)), torch.randn(4, 3), backend)
    J = lg.export_jacobian(model, x, backend=backend.name)
    factors = backend.asarray(rng.standard_normal((4, 2)))
    derived = [J.examples(slice(1, 3)), J.select(output=1), J.select(slice(0, 2), output=0),
               J.transform_rows(factors)]
    assert all(d.weights_fingerprint == J.weights_fingerprint for d in derived)
    one = J.select(slice(1, 3), output=1)
    assert one.outputs == (1,) and one.shape == (2, J.p)
    J64 = backend.to_numpy(J.to_dense())
    assert np.array_equal(backend.to_numpy(one.to_dense()), J64.reshape(4, 2, -1)[1:3, 1])


def test_example_slices_of_non_integers_are_refused():
    J = lg.export_jacobian(mlp(nn.Tanh, (3, 5, 2)), torch.randn(4, 3))
    for bad in (slice(0.5, 3), slice(0, 2.0), slice(True, 3)):  # slice.indices raised a bare TypeError (or took bool)
        with pytest.raises(lg.ArgumentTypeError, match="slice of integers"):
            J.select(bad)
    assert J.select(slice(np.int64(1), 3)).n == 2


def test_check_signature_names_the_mismatch(backend):
    model, x = on_backend(mlp(nn.Tanh, (3, 5, 2)), torch.randn(4, 3), backend)
    J = lg.export_jacobian(model, x, backend=backend.name)
    signature = J.signature()
    J.check_signature(signature)
    J.check_signature({k: v for k, v in signature.items() if k != "weights"})  # saved before fingerprints: accepted
    with pytest.raises(SignatureShapeError, match="other parameters or outputs"):
        lg.export_jacobian(model, x, params="2", backend=backend.name).check_signature(signature)
    with pytest.raises(SignatureDTypeError, match="export both in one dtype"):
        lg.export_jacobian(model, x, dtype="float32", backend=backend.name).check_signature(signature)
    with torch.no_grad():
        model[0].weight.mul_(1.001)
    with pytest.raises(lg.SignatureError, match="other weights than the training Jacobian.*trained further.*Export "
                                                "the test Jacobian from the weights of the fit.*or refit"):
        lg.export_jacobian(model, x, backend=backend.name).check_signature(signature)
    assert issubclass(SignatureShapeError, lg.ShapeError) and issubclass(SignatureDTypeError, lg.DTypeError)


def test_cross_kernel_between_two_weights_is_allowed(backend):
    """kernel(J1, J2) of two networks of one architecture is a legitimate computation: no signature check."""
    model, x = on_backend(mlp(nn.Tanh, (3, 5, 2)), torch.randn(4, 3), backend)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    J1, J2 = lg.export_jacobian(model, x, backend=backend.name), lg.export_jacobian(other, x[:3], backend=backend.name)
    assert J1.weights_fingerprint != J2.weights_fingerprint
    expected = S * oracle(model, x)[0] @ oracle(other, x[:3])[0].T
    assert_matches(lg.kernel(J1, J2, prior_scale=S), expected, backend, dtype=np.float64, rtol=1e-10)


def test_models_refuse_a_test_jacobian_from_other_weights(backend, tmp_path, rng):
    model, x = on_backend(mlp(nn.Tanh, (3, 6, 2)), torch.randn(12, 3), backend)
    x_star = x[:4] + 0.1
    J = lg.export_jacobian(model, x, backend=backend.name)
    y = backend.asarray(rng.standard_normal((12, 2)))
    gp = lg.LinearizedGP(1.0, 0.1).fit(J, y)
    classifier = lg.LaplaceClassifier(1.0).fit(J, backend.asarray(rng.integers(0, 2, 12)))
    J_star = lg.export_jacobian(model, x_star, backend=backend.name)
    gp.predict(J_star)  # same weights: accepted
    classifier.predict_logits(J_star)
    loaded = lg.LinearizedGP.load(gp.save(tmp_path / "gp.npz"), backend=backend.name)
    with torch.no_grad():  # the network is trained further after fit
        for p in model.parameters():
            p.add_(0.01)
    moved = lg.export_jacobian(model, x_star, backend=backend.name)
    for predict in (gp.predict, loaded.predict, classifier.predict_logits):
        with pytest.raises(lg.SignatureError, match="exported from other weights than the training Jacobian"):
            predict(moved)


# ----- block weights (scale_blocks) are part of the signature --------------------------------------------------------

def test_block_weights_are_part_of_the_signature(backend):
    model, x = on_backend(mlp(nn.Tanh, (3, 5, 2)), torch.randn(4, 3), backend)
    J = lg.export_jacobian(model, x, backend=backend.name)
    w = np.linspace(9.0, 1.0, len(J.blocks))
    scaled = J.scale_blocks(w)
    assert J.signature()["block_weights"] is None and scaled.signature()["block_weights"] == w.tolist()
    assert scaled.select(slice(1, 3), output=1).signature()["block_weights"] == w.tolist()  # derived: carried
    assert scaled.scale_blocks(w).signature()["block_weights"] == (w * w).tolist()  # scaled twice: the product
    scaled.check_signature(J.scale_blocks(w * (1 + 4 * np.finfo(np.float64).eps)).signature())  # rounding only
    with pytest.raises(lg.SignatureError, match=r"the training Jacobian was scaled by blocks \(weights \[9\.0, .*\]\) "
                                                r"but J_star is not.*J_star\.scale_blocks"):
        J.check_signature(scaled.signature())
    with pytest.raises(lg.SignatureError, match=r"J_star is scaled by blocks \(weights \[9\.0, .*\]\) but the "
                                                r"training Jacobian is not"):
        scaled.check_signature(J.signature())
    with pytest.raises(lg.SignatureError, match=r"scaled by other block weights"):
        J.scale_blocks(w[::-1]).check_signature(scaled.signature())
    old = {k: v for k, v in J.signature().items() if k != "block_weights"}  # saved before block weights: unknown
    J.check_signature(old)
    scaled.check_signature(old)
    with pytest.raises(lg.ShapeError, match="block_weights"):
        JacobianBlocks(J.f0, J.blocks, backend=backend, outputs=J.outputs, block_weights=[1.0] * (len(J.blocks) + 1))
    with pytest.raises(lg.ValueRangeError, match="block_weights"):
        JacobianBlocks(J.f0, J.blocks, backend=backend, outputs=J.outputs, block_weights=[0.0] * len(J.blocks))


def test_a_model_fitted_on_scaled_blocks_predicts_only_with_scaled_test_jacobians(backend, rng):
    """Fitted on J.scale_blocks(w), an unscaled J_star mixed two kernels (the mean was 66% off, review t20)."""
    model, x = on_backend(mlp(nn.Tanh, (3, 6, 1)), torch.randn(10, 3), backend)
    _, x_star = on_backend(model, torch.randn(4, 3), backend)
    J, Js = (lg.export_jacobian(model, a, backend=backend.name) for a in (x, x_star))
    (Jd, f0), (Jsd, f0s) = oracle(model, x), oracle(model, x_star)
    y = f0[:, 0] + 0.3 * rng.standard_normal(f0.shape[0])
    w = np.linspace(9.0, 0.5, len(J.blocks))
    gp = lg.LinearizedGP(0.5, 0.1).fit(J.scale_blocks(w), backend.asarray(y))
    with pytest.raises(lg.SignatureError, match=r"scaled by blocks.*J_star\.scale_blocks"):
        gp.predict(Js)
    roots = np.repeat(np.sqrt(w), J.block_sizes)  # the per-block prior: columns of block b times √w_b
    mean, var, _ = dense_gp_posterior(Jd * roots, f0, Jsd * roots, f0s, y, 0.5, 0.1)
    got_mean, got_var = gp.predict(Js.scale_blocks(w), return_var=True)
    assert_matches(got_mean, mean[:, None], backend, dtype=np.float64, rtol=1e-9)
    assert_matches(got_var, var[:, None], backend, dtype=np.float64, rtol=1e-9)
