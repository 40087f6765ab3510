"""export_jacobian: factored and dense Jacobian blocks against float64 torch.func.jacrev oracles, on every backend.

Each model runs on the backend's device (CPU for NumPy, CUDA for CuPy); the oracle is the full Jacobian of a float64
CPU copy of the model, from torch.func.jacrev. float64 exports must match it to a relative error of 1e-10, float32
exports to tolerances derived from float32's machine epsilon.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

nn = torch.nn
F = torch.nn.functional

import lingp_core as lg  # noqa: E402
from lingp_core._validate import ValueRangeError  # noqa: E402
from lingp_core.autograd_operator import AutogradJacobian  # noqa: E402
from lingp_core.export import LAST_LAYER, export_jacobian  # noqa: E402
from lingp_core.jacobian import DenseBlock, FactoredLinearBlock, JacobianBlocks  # noqa: E402
from tests.helpers import assert_matches, tolerance  # noqa: E402

F64_RTOL = 1e-10  # the acceptance bound for float64 exports


# ----- helpers ------------------------------------------------------------------------------------------------------

def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(dtype)]


def on_backend(model: nn.Module, x: torch.Tensor, backend, dtype=np.float64) -> tuple:
    """The model and inputs on the backend's device, floating parts in ``dtype``."""
    device = "cpu" if backend.name == "numpy" else "cuda"
    model = model.to(device=device, dtype=torch_dtype(dtype))
    x = x.to(device=device, dtype=torch_dtype(dtype)) if x.is_floating_point() else x.to(device)
    return model, x


def rtol_for(dtype) -> float:
    return F64_RTOL if np.dtype(dtype) == np.float64 else tolerance(dtype)


def oracle(model: nn.Module, x: torch.Tensor, names=None, outputs=None) -> tuple[np.ndarray, np.ndarray]:
    """Full Jacobian (n·c, p) and outputs (n, c) of a float64 CPU copy of the model, by torch.func.jacrev."""
    m64 = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    x64 = x.detach().cpu()
    x64 = x64.double() if x64.is_floating_point() else x64
    named = dict(m64.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if names is None else list(names)
    params = {n: named[n].detach() for n in names}

    def f(p):
        out = torch.func.functional_call(m64, p, (x64,)).reshape(x64.shape[0], -1)
        return (out if outputs is None else out[:, list(outputs)]).reshape(-1)

    with torch.no_grad():  # frozen parameters need no graph; jacrev ignores an outer no_grad
        jac = torch.func.jacrev(f)(params)
        J = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], dim=1)
        return J.numpy(), f(params).reshape(x64.shape[0], -1).numpy()


def check_against_oracle(J: JacobianBlocks, J64: np.ndarray, f64: np.ndarray, backend, dtype, rng,
                         other: JacobianBlocks | None = None, other64: np.ndarray | None = None) -> None:
    """f0, the dense J, J V, Jᵀ U (multi-column and vector), J Jᵀ, its diagonal and J Jᵀ U against the oracle."""
    dtype = np.dtype(dtype)
    rtol = rtol_for(dtype)
    assert isinstance(J, JacobianBlocks)
    assert J.shape == J64.shape and J.dtype == dtype and J.backend == backend
    assert J.n * J.n_outputs == J64.shape[0] and sum(J.block_sizes) == J.p == J64.shape[1]
    assert_matches(J.f0, f64, backend, dtype=dtype, rtol=rtol)
    assert_matches(J.to_dense(), J64, backend, dtype=dtype, rtol=rtol)
    V = rng.standard_normal((J.p, 3)).astype(dtype)
    U = rng.standard_normal((J.shape[0], 3)).astype(dtype)
    V64, U64 = V.astype(np.float64), U.astype(np.float64)
    assert_matches(J.matmat(backend.asarray(V)), J64 @ V64, backend, dtype=dtype, rtol=rtol)
    assert_matches(J.matmat(backend.asarray(V[:, 0])), J64 @ V64[:, 0], backend, dtype=dtype, rtol=rtol)
    assert_matches(J.rmatmat(backend.asarray(U)), J64.T @ U64, backend, dtype=dtype, rtol=rtol)
    assert_matches(J.rmatmat(backend.asarray(U[:, 1])), J64.T @ U64[:, 1], backend, dtype=dtype, rtol=rtol)
    assert_matches(J.gram(), J64 @ J64.T, backend, dtype=dtype, rtol=rtol)
    assert_matches(J.gram_diagonal(), np.einsum("ij,ij->i", J64, J64), backend, dtype=dtype, rtol=rtol)
    assert_matches(J.gram_matmat(backend.asarray(U)), J64 @ (J64.T @ U64), backend, dtype=dtype, rtol=rtol)
    if other is not None:
        assert_matches(J.gram(other), J64 @ other64.T, backend, dtype=dtype, rtol=rtol)
        assert_matches(other.gram(J), other64 @ J64.T, backend, dtype=dtype, rtol=rtol)


def kinds(J: JacobianBlocks) -> list[str]:
    return [b.kind for b in J.blocks]


def mlp(activation: type, widths=(3, 16, 16, 2)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """conv + batch norm (eval, non-trivial running statistics) + conv + linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)
        self.fc = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = F.relu(self.bn(self.conv1(x)))
        h = torch.tanh(self.conv2(h)).flatten(1)
        return self.head(torch.tanh(self.fc(h)))


class MeanVarNet(nn.Module):
    """The paper's regression net: outputs [mean, raw variance]."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 12), nn.ELU(), nn.Linear(12, 12), nn.ELU())
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        return self.head(self.body(x))


class SharedLinear(nn.Module):
    """One Linear layer called twice in a forward pass (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


class SequenceNet(nn.Module):
    """A Linear layer applied to every position of sequence inputs (n, *positions, features), then pooled."""

    def __init__(self, features: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(features, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        return self.head(h.flatten(1, -2).mean(dim=1))


class WeightUsedOutside(nn.Module):
    """A Linear layer whose weight is also used directly (as attention's out_proj or tied weights are)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(torch.tanh(h @ self.fc.weight))


class EmbeddingNet(nn.Module):
    """Integer inputs through an embedding, a custom parameter of the top module, and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx).mean(dim=1) * self.scale))


@pytest.fixture(autouse=True)
def _seed_and_exact_cuda_kernels():
    """Seeded weights; on CUDA, deterministic cuDNN without TF32 (torch's default lets float32 convs use TF32)."""
    torch.manual_seed(0)
    if not torch.cuda.is_available():
        yield
        return
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=False, deterministic=True, allow_tf32=False):
        yield


# ----- correctness against the jacrev oracle ------------------------------------------------------------------------

@pytest.mark.parametrize("structure", ["auto", "dense"])
@pytest.mark.parametrize("activation", [nn.Tanh, nn.ELU, nn.ReLU], ids=["tanh", "elu", "relu"])
def test_mlp_matches_jacrev(backend, dtype, rng, activation, structure):
    model, x = on_backend(mlp(activation), torch.randn(7, 3), backend, dtype)
    J = export_jacobian(model, x, backend=backend.name, batch_size=3, structure=structure)
    J64, f64 = oracle(model, x)
    check_against_oracle(J, J64, f64, backend, dtype, rng)
    assert kinds(J) == (["factored"] * 3 if structure == "auto" else ["dense"] * 3)
    assert J.param_names == ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")


def test_f0_equals_model_outputs(backend, dtype):
    model, x = on_backend(mlp(nn.Tanh), torch.randn(9, 3), backend, dtype)
    J = export_jacobian(model, x, batch_size=4, backend=backend.name)
    with torch.no_grad():
        expected = model(x).double().cpu().numpy()
    assert_matches(J.f0, expected, backend, dtype=dtype)


@pytest.mark.parametrize("structure", ["auto", "dense"])
def test_cnn_with_batch_norm_matches_jacrev(backend, dtype, rng, structure):
    model, x = on_backend(SmallCNN(), torch.randn(5, 2, 6, 6), backend, dtype)
    J = export_jacobian(model, x, backend=backend.name, batch_size=2, structure=structure)
    J64, f64 = oracle(model, x)
    check_against_oracle(J, J64, f64, backend, dtype, rng)
    expected = ["dense", "dense", "dense", "factored", "factored"] if structure == "auto" else ["dense"] * 5
    assert kinds(J) == expected


@pytest.mark.parametrize("outputs", [[0], [1, 0], 1, slice(0, 1)], ids=["mean", "reversed", "int", "slice"])
def test_output_selection(backend, rng, outputs):
    model, x = on_backend(MeanVarNet(), torch.randn(6, 3), backend)
    J = export_jacobian(model, x, outputs=outputs, backend=backend.name)
    chosen = {"[0]": [0], "[1, 0]": [1, 0], "1": [1], "slice(0, 1, None)": [0]}[repr(outputs)]
    assert J.outputs == tuple(chosen) and J.n_outputs == len(chosen)
    J64, f64 = oracle(model, x, outputs=chosen)
    check_against_oracle(J, J64, f64, backend, np.float64, rng)


@pytest.mark.parametrize("selector", ["prefix", "module", "parameter", "predicate", "list"])
def test_parameter_subset(backend, rng, selector):
    model, x = on_backend(MeanVarNet(), torch.randn(5, 3), backend)
    spec = {"prefix": "head", "module": model.head, "parameter": [model.head.weight, model.head.bias],
            "predicate": lambda name, p: name.startswith("head."), "list": ["head.weight", "head.bias"]}[selector]
    J = export_jacobian(model, x, params=spec, backend=backend.name)
    assert J.param_names == ("head.weight", "head.bias") and J.p == 26 and J.block_sizes == (26,)
    J64, f64 = oracle(model, x, names=J.param_names)
    check_against_oracle(J, J64, f64, backend, np.float64, rng)


def test_last_layer_shortcut_and_mixed_blocks(backend, rng):
    model, x = on_backend(SmallCNN(), torch.randn(4, 2, 6, 6), backend)
    J = export_jacobian(model, x, params=LAST_LAYER, backend=backend.name)
    assert J.param_names == ("head.weight", "head.bias")
    J = export_jacobian(model, x, params=["bn", "fc.weight", "head.bias"], backend=backend.name, structure="factored")
    assert J.param_names == ("bn.weight", "bn.bias", "fc.weight", "head.bias")
    assert kinds(J) == ["dense", "factored", "factored"]
    assert J.block_sizes == (8, 128, 3)
    J64, f64 = oracle(model, x, names=J.param_names)
    check_against_oracle(J, J64, f64, backend, np.float64, rng)


def test_frozen_parameters_left_out_unless_named(backend):
    model, x = on_backend(MeanVarNet(), torch.randn(3, 3), backend)
    model.body.requires_grad_(False)
    assert export_jacobian(model, x, backend=backend.name).param_names == ("head.weight", "head.bias")
    with pytest.raises(ValueRangeError, match="no parameters selected"):
        export_jacobian(model, x, params="body", backend=backend.name)  # a prefix does not name frozen ones
    J = export_jacobian(model, x, params=["body.0.weight", "head"], backend=backend.name)
    assert J.param_names == ("body.0.weight", "head.weight", "head.bias")
    assert all(p.requires_grad is False for p in model.body.parameters())


@pytest.mark.parametrize("structure", ["auto", "factored", "dense"])
def test_weight_sharing_is_exact(backend, dtype, rng, structure):
    model, x = on_backend(SharedLinear(), torch.randn(6, 3), backend, dtype)
    J = export_jacobian(model, x, structure=structure, batch_size=4, backend=backend.name)
    J64, f64 = oracle(model, x)
    check_against_oracle(J, J64, f64, backend, dtype, rng)
    shared = J.blocks[1]
    assert shared.names == ("shared.weight", "shared.bias")
    if structure == "factored":
        assert isinstance(shared, FactoredLinearBlock) and shared.T == 2


@pytest.mark.parametrize("positions", [(4,), (2, 3)], ids=["sequence", "grid"])
@pytest.mark.parametrize("structure", ["auto", "factored", "dense"])
def test_linear_on_sequence_inputs_is_exact(backend, dtype, rng, positions, structure):
    model, x = on_backend(SequenceNet(), torch.randn(5, *positions, 3), backend, dtype)
    J = export_jacobian(model, x, structure=structure, batch_size=2, backend=backend.name)
    J64, f64 = oracle(model, x)
    check_against_oracle(J, J64, f64, backend, dtype, rng)
    if structure == "factored":
        assert isinstance(J.blocks[0], FactoredLinearBlock) and J.blocks[0].T == int(np.prod(positions))


def test_gram_between_sequences_of_different_lengths(backend, rng):
    model, x1 = on_backend(SequenceNet(), torch.randn(5, 4, 3), backend)
    _, x2 = on_backend(SequenceNet(), torch.randn(3, 2, 3), backend)
    J1 = export_jacobian(model, x1, structure="factored", backend=backend.name)
    J2 = export_jacobian(model, x2, structure="factored", backend=backend.name)
    assert (J1.blocks[0].T, J2.blocks[0].T) == (4, 2)
    J64, f64 = oracle(model, x1)
    other64, _ = oracle(model, x2)
    check_against_oracle(J1, J64, f64, backend, np.float64, rng, other=J2, other64=other64)


def test_weight_used_outside_its_layer_falls_back_to_dense(backend, rng):
    model, x = on_backend(WeightUsedOutside(), torch.randn(5, 3), backend)
    J = export_jacobian(model, x, structure="factored", backend=backend.name)
    assert kinds(J) == ["dense", "factored"] and isinstance(J.blocks[0], DenseBlock)
    J64, f64 = oracle(model, x)
    check_against_oracle(J, J64, f64, backend, np.float64, rng)


def _scale_output(module, args, output):
    return 2.0 * output


def _scale_output_in_place(module, args, output):
    output.mul_(2.0)


def _scale_linear_outputs(module, args, output):
    return 2.0 * output if isinstance(module, nn.Linear) else None


@pytest.mark.parametrize("hook", ["module", "prepend", "in-place", "global"])
def test_linear_with_a_forward_hook_is_exported_dense_and_exact(backend, rng, hook):
    # a hook that changes a Linear's output after the layer: Δ of a factored block would be taken after the hook, off
    # by its factor; the hooked layer goes dense
    model, x = on_backend(mlp(nn.Tanh, (3, 5, 2)), torch.randn(5, 3), backend)
    if hook == "global":
        handle = torch.nn.modules.module.register_module_forward_hook(_scale_linear_outputs)
    else:
        handle = model[0].register_forward_hook(_scale_output_in_place if hook == "in-place" else _scale_output,
                                                prepend=hook == "prepend")
    try:
        J = export_jacobian(model, x, structure="factored", backend=backend.name)
        J64, f64 = oracle(model, x)  # jacrev through the same hooks
    finally:
        handle.remove()
    assert kinds(J) == (["dense", "dense"] if hook == "global" else ["dense", "factored"])
    check_against_oracle(J, J64, f64, backend, np.float64, rng)


@pytest.mark.parametrize("hook", ["module", "global"])
def test_linear_with_a_forward_pre_hook_stays_factored_and_exact(backend, rng, hook):
    # a pre-hook changes the layer's input, and A is the input its forward receives: the factored block stays exact
    def triple_input(module, args):
        return (3.0 * args[0],) if isinstance(module, nn.Linear) else None

    model, x = on_backend(mlp(nn.Tanh, (3, 5, 2)), torch.randn(5, 3), backend)
    if hook == "global":
        handle = torch.nn.modules.module.register_module_forward_pre_hook(triple_input)
    else:
        handle = model[2].register_forward_pre_hook(triple_input)
    try:
        J = export_jacobian(model, x, structure="factored", backend=backend.name)
        J64, f64 = oracle(model, x)
    finally:
        handle.remove()
    assert kinds(J) == ["factored", "factored"]
    check_against_oracle(J, J64, f64, backend, np.float64, rng)


def test_embedding_and_custom_parameter(backend, rng):
    model, _ = on_backend(EmbeddingNet(), torch.zeros(1), backend)
    idx = torch.as_tensor(rng.integers(0, 10, size=(6, 3))).to(next(model.parameters()).device)
    J = export_jacobian(model, idx, backend=backend.name, structure="factored")
    assert J.param_names == ("scale", "emb.weight", "head.weight", "head.bias")
    assert kinds(J) == ["dense", "dense", "factored"]
    J64, f64 = oracle(model, idx)
    check_against_oracle(J, J64, f64, backend, np.float64, rng)


def test_gram_between_two_exports_and_mixed_structures(backend, dtype, rng):
    model, x1 = on_backend(SharedLinear(), torch.randn(5, 3), backend, dtype)
    _, x2 = on_backend(SharedLinear(), torch.randn(3, 3), backend, dtype)
    J1 = export_jacobian(model, x1, structure="factored", backend=backend.name)
    J64, f64 = oracle(model, x1)
    other64, _ = oracle(model, x2)
    for structure in ("factored", "dense"):
        J2 = export_jacobian(model, x2, structure=structure, backend=backend.name)
        check_against_oracle(J1, J64, f64, backend, dtype, rng, other=J2, other64=other64)


def test_dtype_argument_casts_blocks(backend, rng):
    model, x = on_backend(mlp(nn.Tanh), torch.randn(6, 3), backend, np.float64)
    J = export_jacobian(model, x, dtype="float32", backend=backend.name)
    assert J.dtype == np.float32 and all(b.A.dtype == np.float32 for b in J.blocks)
    J64, f64 = oracle(model, x)
    check_against_oracle(J, J64, f64, backend, np.float32, rng)
    assert export_jacobian(model, x, dtype=torch.float64, backend=backend.name).dtype == np.float64


def test_factored_block_holds_layer_inputs_and_sensitivities(backend):
    model, x = on_backend(mlp(nn.Tanh, (3, 4, 2)), torch.randn(5, 3), backend)
    J = export_jacobian(model, x, structure="factored", backend=backend.name)
    first = J.blocks[0]
    assert isinstance(first, FactoredLinearBlock) and first.A.shape == (5, 1, 4) and first.delta.shape == (5, 2, 1, 4)
    assert_matches(first.inputs[:, 0, :], x.double().cpu().numpy(), backend, dtype=np.float64)
    assert_matches(first.A[:, 0, 3], np.ones(5), backend, dtype=np.float64)


def test_autograd_operator_matches_jacrev(backend, rng):
    model, x = on_backend(SmallCNN(), torch.randn(5, 2, 6, 6), backend)
    op = AutogradJacobian(model, x, params=["conv1", "fc", "head"], outputs=[2, 0], backend=backend.name,
                          batch_size=2, column_chunk=2)
    J64, f64 = oracle(model, x, names=op.param_names, outputs=[2, 0])
    assert op.shape == J64.shape and op.dtype == np.float64
    assert_matches(op.f0, f64, backend, dtype=np.float64, rtol=F64_RTOL)
    V = rng.standard_normal((op.p, 3))
    U = rng.standard_normal((op.shape[0], 3))
    assert_matches(op.matmat(backend.asarray(V)), J64 @ V, backend, dtype=np.float64, rtol=F64_RTOL)
    assert_matches(op.matmat(backend.asarray(V[:, 0])), J64 @ V[:, 0], backend, dtype=np.float64, rtol=F64_RTOL)
    assert_matches(op.rmatmat(backend.asarray(U)), J64.T @ U, backend, dtype=np.float64, rtol=F64_RTOL)
    assert_matches(op.gram_matmat(backend.asarray(U[:, 0])), J64 @ (J64.T @ U[:, 0]), backend, dtype=np.float64,
                   rtol=F64_RTOL)


def test_blocks_and_autograd_operator_agree(backend, rng):
    model, x = on_backend(mlp(nn.ELU, (5, 20, 30, 20, 1)), torch.randn(8, 5), backend, np.float32)
    J = export_jacobian(model, x, backend=backend.name)
    op = AutogradJacobian(model, x, backend=backend.name)
    assert op.param_names == J.param_names and op.shape == J.shape
    U = backend.asarray(rng.standard_normal((J.shape[0], 2)).astype(np.float32))
    expected = backend.to_numpy(op.gram_matmat(U)).astype(np.float64)
    assert_matches(J.gram_matmat(U), expected, backend, dtype=np.float32)
    assert_matches(J.gram() @ U, expected, backend, dtype=np.float32)


def test_disk_backed_dense_blocks(tmp_path, rng):
    backend = __import__("backends").get_backend("numpy")
    model, x = on_backend(SmallCNN(), torch.randn(4, 2, 6, 6), backend)
    J = export_jacobian(model, x, structure="dense", storage_dir=tmp_path)
    assert all(isinstance(b.values, np.memmap) for b in J.blocks)
    assert J.storage_path is not None and len(list((tmp_path / J.storage_path).glob("*.npy"))) == 5
    assert J.nbytes == J.f0.nbytes
    J64, f64 = oracle(model, x)
    check_against_oracle(J, J64, f64, backend, np.float64, rng)


# ----- model hygiene ------------------------------------------------------------------------------------------------

def test_model_mode_parameters_and_grads_unchanged_and_deterministic(backend):
    model, x = on_backend(SmallCNN(), torch.randn(4, 2, 6, 6), backend)
    model.train()
    model.bn.eval()  # a mixed state must come back as it was
    model(x).sum().backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.bn.train()
    J1 = export_jacobian(model, x, backend=backend.name)
    J2 = export_jacobian(model, x, backend=backend.name)
    assert model.training and model.bn.training and model.conv1.training
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n][0]) and torch.equal(p.grad, before[n][1]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n  # eval mode: batch norm statistics untouched
    assert np.array_equal(backend.to_numpy(J1.gram()), backend.to_numpy(J2.gram()))
    assert np.array_equal(backend.to_numpy(J1.f0), backend.to_numpy(J2.f0))


# ----- parameter_vector: θ̂ in J's column order ----------------------------------------------------------------------

def _bias_free_relu(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6, bias=False), torch.nn.ReLU(),
                               torch.nn.Linear(6, 3, bias=False)).double()


@pytest.mark.parametrize("params", [None, LAST_LAYER])
def test_parameter_vector_is_the_linearization_point(backend, params):
    # Euler: a network homogeneous of degree k in the exported parameters has J(x) θ̂ = k·f(x), which pins the order
    x = torch.randn(7, 4, dtype=torch.float64)
    expected = _bias_free_relu(0)(x).detach().numpy()
    model, xb = on_backend(_bias_free_relu(0), x, backend)
    J = export_jacobian(model, xb, params=params, backend=backend.name)
    theta = lg.parameter_vector(model, J)
    assert theta.shape == (J.p,) and theta.dtype == J.dtype
    degree = 2 if params is None else 1
    assert_matches(J.matmat(theta).reshape(J.n, J.n_outputs), degree * expected, backend, dtype=np.float64)


def test_parameter_vector_refuses_another_network():
    model = _bias_free_relu(0)
    J = export_jacobian(model, torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(lg.SignatureError, match="weights are not those J was exported at"):
        lg.parameter_vector(_bias_free_relu(1), J)  # same architecture, other weights
    with pytest.raises(lg.SignatureError, match="'0.weight'"):
        lg.parameter_vector(torch.nn.Sequential(torch.nn.Linear(3, 6, bias=False)).double(), J)
    with pytest.raises(lg.ArgumentTypeError, match="torch.nn.Module"):
        lg.parameter_vector(np.zeros(3), J)
    with pytest.raises(lg.ArgumentTypeError, match="J must be a Jacobian"):
        lg.parameter_vector(model, np.zeros((3, 4)))


def test_parameter_vector_needs_an_exported_jacobian(backend):
    model, x = on_backend(_bias_free_relu(0), torch.randn(3, 4), backend)
    J = export_jacobian(model, x, backend=backend.name)
    by_hand = JacobianBlocks(J.f0, J.blocks, backend=J.backend, outputs=J.outputs)  # no weights fingerprint
    with pytest.raises(lg.SignatureError, match=r"θ̂ cannot be checked against J: J has no weights fingerprint .*"
                                                r"by hand.*J\.param_names order"):
        lg.parameter_vector(model, by_hand)
    with pytest.raises(lg.ArgumentTypeError, match=r"JacobianBlocks or ShardedJacobian .* got an AutogradJacobian"):
        lg.parameter_vector(model, AutogradJacobian(model, x, backend=backend.name))


# ----- tied weights: the model keeps its own Parameter objects --------------------------------------------------------

def _tied_relu(kind: str) -> nn.Sequential:
    """Bias-free ReLU net f = H relu(W relu(W x)): one Linear used twice ("reused") or two sharing W ("tied")."""
    first = nn.Linear(4, 4, bias=False)
    second = first if kind == "reused" else nn.Linear(4, 4, bias=False)
    second.weight = first.weight
    return nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), nn.Linear(4, 2, bias=False))


@pytest.mark.parametrize("kind", ["reused", "tied"])
def test_tied_weights_keep_their_parameter_objects(backend, rng, kind):
    # torch.func.functional_call leaves its own tensors in a module reached under two names (or a slot tied to another
    # module's): an optimizer built before the export would stop training the model
    model, x = on_backend(_tied_relu(kind), torch.randn(6, 4), backend)
    before = list(model.named_parameters(remove_duplicate=False))
    values = [p.detach().clone() for _, p in before]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    J = export_jacobian(model, x, backend=backend.name)
    AutogradJacobian(model, x, backend=backend.name).gram_matmat(backend.xp.ones(J.shape[0]))
    after = list(model.named_parameters(remove_duplicate=False))
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(q is p for (_, p), (_, q) in zip(before, after))
    assert all(torch.equal(q.detach(), v) for (_, q), v in zip(after, values))
    J64, f64 = oracle(model, x)
    check_against_oracle(J, J64, f64, backend, np.float64, rng)
    # f is homogeneous of degree 3 in θ = (W, H) (W enters twice): Euler gives J θ̂ = 3 f
    theta = lg.parameter_vector(model, J)
    assert_matches(J.matmat(theta).reshape(J.n, J.n_outputs), 3 * f64, backend, dtype=np.float64)
    other = export_jacobian(model, torch.randn(3, 4, dtype=x.dtype, device=x.device), backend=backend.name)
    assert other.weights_fingerprint == J.weights_fingerprint  # train and test exports of one model agree
    model(x).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight.detach(), values[0])  # the optimizer still trains the shared weight


def test_tied_weights_kept_when_export_fails(backend):
    class ReusedBranchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = self.a  # one module under two names

        def forward(self, x):
            h = self.b(torch.tanh(self.a(x)))
            return 2 * h if h.sum() > 0 else h  # fails inside torch.func.vmap, within functional_call

    model, x = on_backend(ReusedBranchy(), torch.randn(4, 3), backend)
    before = list(model.named_parameters(remove_duplicate=False))
    with pytest.raises(lg.ExportError, match="data-dependent Python control flow"):
        export_jacobian(model, x, backend=backend.name)
    after = list(model.named_parameters(remove_duplicate=False))
    assert len(after) == len(before) and all(q is p for (_, p), (_, q) in zip(before, after))


class _InPlaceResidual(nn.Module):
    """h = a(x); h += b(h) (or out of place); c(tanh h): b's input is changed in place after b ran."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place, self.a, self.b, self.c = in_place, nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        if self.in_place:
            h += self.b(h)
        else:
            h = h + self.b(h)
        return self.c(torch.tanh(h))


@pytest.mark.parametrize("structure", ["auto", "factored"])
def test_a_layer_input_changed_in_place_after_the_call_is_captured_as_it_was(structure):
    # the factored blocks kept a view of each Linear's input, which `h += b(h)` then rewrote: b.weight's columns
    # were 49% off (the whole J 27%), silently; the oracle is the out-of-place twin (autograd refuses the in-place
    # model itself, and so does the dense export, saying why)
    model = _InPlaceResidual(True).double()
    twin = _InPlaceResidual(False).double()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64)
    J = lg.export_jacobian(model, x, structure=structure)
    assert all(isinstance(b, lg.FactoredLinearBlock) for b in J.blocks)
    J_oracle, f_oracle = oracle(twin, x)
    np.testing.assert_allclose(J.to_dense(), J_oracle, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(J.f0, f_oracle, rtol=1e-12)
    with pytest.raises(lg.ExportError, match="changes in place a tensor that its gradient needs"):
        lg.export_jacobian(model, x, structure="dense")


class _CountingModel(nn.Module):
    """A forward that updates a buffer in place: a call counter."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls += 1
        return self.layer(x) * self.calls


def test_an_export_that_fails_on_a_buffer_update_leaves_the_buffers_as_they_were():
    # the probe's forward counted 1 before the per-example pass refused the update: the model was changed by a
    # failed export, and the message blamed control flow
    model = _CountingModel().double()
    with pytest.raises(lg.ExportError, match="changes a buffer .* in place during forward"):
        lg.export_jacobian(model, torch.randn(4, 3, dtype=torch.float64))
    assert float(model.calls) == 0.0
