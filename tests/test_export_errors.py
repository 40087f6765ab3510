"""export_jacobian and the Jacobian products: clear errors (never silent fixes), memory budgets, progress, imports."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

nn = torch.nn

from lingp_core._validate import (  # noqa: E402
    ArgumentTypeError,
    BackendMismatchError,
    DTypeError,
    ExportError,
    InvalidOptionError,
    MemoryBudgetError,
    NonFiniteError,
    ShapeError,
    ValueRangeError,
)
from lingp_core.autograd_operator import AutogradJacobian  # noqa: E402
from lingp_core.export import export_jacobian  # noqa: E402
from tests.test_export import MeanVarNet, SmallCNN, mlp, on_backend, oracle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class SqrtNet(nn.Module):
    """sqrt(u·[u > 0]) with u = w·x: finite outputs everywhere, but a NaN Jacobian (∞·0) where u < 0."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[1.0, 0.0]]))

    def forward(self, x):
        u = self.lin(x)
        return torch.sqrt(u * (u > 0))


# ----- parameters, inputs, outputs --------------------------------------------------------------------------------

def test_no_parameters_selected(backend):
    model, x = on_backend(MeanVarNet(), torch.randn(3, 3), backend)
    with pytest.raises(ValueRangeError, match=r"params entry 'nope' names no parameter or module.*'body.0.weight'"):
        export_jacobian(model, x, params="nope", backend=backend.name)
    with pytest.raises(ValueRangeError, match="no parameters selected"):
        export_jacobian(model, x, params=lambda name, p: False, backend=backend.name)
    model.requires_grad_(False)
    with pytest.raises(ValueRangeError, match=r"no parameters selected.*named exactly"):
        export_jacobian(model, x, backend=backend.name)
    with pytest.raises(ValueRangeError, match="not part of the model"):
        export_jacobian(model, x, params=nn.Linear(2, 2), backend=backend.name)
    with pytest.raises(TypeError, match="params entries must be"):
        export_jacobian(model, x, params=[3], backend=backend.name)


def test_inputs_of_wrong_type_shape_or_dtype(backend):
    model, x = on_backend(MeanVarNet(), torch.randn(3, 3), backend)
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        export_jacobian(model, [[1.0, 2.0, 3.0]], backend=backend.name)
    with pytest.raises(ShapeError, match=r"the model failed on inputs of shape \(1, 4\).*mat1 and mat2"):
        export_jacobian(model, torch.randn(3, 4, dtype=x.dtype, device=x.device), backend=backend.name)
    with pytest.raises(DTypeError, match=r"failed on inputs .* dtype torch.int64.*runs on these inputs converted"):
        export_jacobian(model, torch.ones(3, 3, dtype=torch.int64, device=x.device), backend=backend.name)
    # a network made for integer inputs: a bad token is the values' fault, not the dtype's
    tokens = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 1)).to(dtype=x.dtype, device=x.device)
    with pytest.raises(ShapeError, match="IndexError"):
        export_jacobian(tokens, torch.tensor([[1, 7]] * 3, device=x.device), backend=backend.name)
    with pytest.raises(ShapeError, match=r"leading example dimension.*shape \(\)"):
        export_jacobian(model, x[0, 0], backend=backend.name)
    with pytest.raises(DTypeError, match=r"inputs have dtype torch.float32 .* torch.float64"):
        export_jacobian(model, x.float(), backend=backend.name)
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="inputs .* NaN or Inf, the first at example 2"):
        export_jacobian(model, bad, backend=backend.name)


def test_params_of_the_wrong_type():
    with pytest.raises(ArgumentTypeError, match=r"params must be None, 'last_layer', .* or a list of these; got "
                                                r"builtins.int 3"):
        export_jacobian(MeanVarNet(), torch.randn(3, 3), params=3)


def test_numpy_inputs_with_negative_strides_or_read_only_are_taken():
    model = MeanVarNet().double()
    a = np.random.default_rng(0).standard_normal((5, 3))
    with torch.no_grad():
        expected = model(torch.from_numpy(a[::-1].copy())).numpy()
    read_only = a[::-1].copy()
    read_only.setflags(write=False)
    # torch refuses negative strides and warns about read-only arrays (an error under filterwarnings=error)
    for inputs in (a[::-1], a[::-1, ::-1][:, ::-1], read_only):
        J = export_jacobian(model, inputs)
        np.testing.assert_allclose(J.f0, expected, rtol=1e-14, atol=1e-14 * np.abs(expected).max())
    assert not read_only.flags.writeable and a.flags.writeable


@pytest.mark.parametrize("kind", [object, str, np.complex128])
def test_numpy_inputs_of_a_non_real_dtype(kind):
    a = np.random.default_rng(0).standard_normal((4, 3)).astype(kind)
    with pytest.raises(DTypeError, match=rf"inputs have NumPy dtype {re.escape(str(a.dtype))} \(shape \(4, 3\)\); "
                                         r"lingp takes numeric \(float, int or bool\) inputs"):
        export_jacobian(MeanVarNet().double(), a)


def test_masked_sparse_and_nested_inputs_are_refused():
    model = MeanVarNet().double()
    a = np.random.default_rng(0).standard_normal((4, 3))
    with pytest.raises(ArgumentTypeError, match=r"MaskedArray of shape \(4, 3\): export would ignore its mask"):
        export_jacobian(model, np.ma.masked_array(a, mask=a > 0))
    with pytest.raises(ArgumentTypeError, match=r"dense \(strided\) tensor, got a tensor with layout torch.sparse_coo"):
        export_jacobian(model, torch.from_numpy(a).to_sparse())
    nested = torch.nested.nested_tensor([torch.from_numpy(a[0]), torch.from_numpy(a[1, :2])], layout=torch.jagged)
    with pytest.raises(ArgumentTypeError, match=r"dense \(strided\) tensor, got a nested tensor"):
        export_jacobian(model, nested)


def test_complex_inputs_are_refused():
    class RealPart(nn.Module):  # runs on complex inputs, silently dropping their imaginary parts
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x.real)

    x = torch.randn(4, 3, dtype=torch.complex128)
    with pytest.raises(DTypeError, match=r"inputs have complex dtype torch.complex128 .*real \(torch.float64\)"):
        export_jacobian(RealPart().double(), x)
    with pytest.raises(DTypeError, match=r"complex dtype torch.complex128"):
        AutogradJacobian(RealPart().double(), x)


def test_lazy_model_must_run_once_first():
    model = nn.Sequential(nn.LazyLinear(2))
    x = torch.randn(3, 4)
    with pytest.raises(ExportError, match=r"uninitialized \(lazy\) parameters .*'0.weight'.*run one forward pass"):
        export_jacobian(model, x)
    with pytest.raises(ExportError, match="run one forward pass"):
        AutogradJacobian(model, x)
    model(x[:1])
    assert export_jacobian(model, x).p == 10


def test_model_must_return_a_tensor_with_an_example_dimension():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x), x

    class Summed(Pair):
        def forward(self, x):
            return self.lin(x).sum()

    with pytest.raises(TypeError, match="must return one tensor"):
        export_jacobian(Pair(), torch.randn(3, 2))
    with pytest.raises(ShapeError, match=r"output has shape \(\)"):
        export_jacobian(Summed(), torch.randn(3, 2))


def test_bad_output_selection(backend):
    model, x = on_backend(MeanVarNet(), torch.randn(3, 3), backend)
    with pytest.raises(ValueRangeError, match=r"outputs must lie in \[-2, 1\], got 2"):
        export_jacobian(model, x, outputs=[2], backend=backend.name)
    with pytest.raises(ValueRangeError, match="twice"):
        export_jacobian(model, x, outputs=[0, -2], backend=backend.name)
    with pytest.raises(ValueRangeError, match="selects none"):
        export_jacobian(model, x, outputs=[], backend=backend.name)


class Branchy(nn.Module):
    """Data-dependent Python control flow in forward: fine on one example, impossible inside torch.func.vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if h.sum() > 0:
            h = 2 * h
        return self.b(h)


def test_data_dependent_control_flow_points_to_autograd_jacobian(backend):
    model, x = on_backend(Branchy(), torch.randn(5, 3), backend)
    with pytest.raises(ExportError, match=r"data-dependent Python control flow.*torch said: RuntimeError: vmap: .*"
                                          r"Use lingp_core.AutogradJacobian\(model, inputs, batch_size=1\)"):
        export_jacobian(model, x, backend=backend.name)
    # the way out works: each example its own batch, as export would do, against per-example jacrev
    op = AutogradJacobian(model, x, backend=backend.name, batch_size=1)
    expected = np.concatenate([oracle(model, x[i: i + 1])[0] for i in range(5)])
    dense = backend.to_numpy(op.matmat(backend.xp.eye(op.p)))
    np.testing.assert_allclose(dense, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())


# ----- NaN / Inf ----------------------------------------------------------------------------------------------------

def test_nan_in_outputs_names_f0_and_the_example(backend):
    class LogNet(MeanVarNet):
        def forward(self, x):
            return torch.log(x[:, :1]) + super().forward(x)

    model, x = on_backend(LogNet(), torch.rand(6, 3) + 0.1, backend)
    x[4, 0] = -1.0
    with pytest.raises(NonFiniteError, match=r"network outputs f0 holds NaN or Inf, the first at example 4 \(of 6\)"):
        export_jacobian(model, x, batch_size=3, backend=backend.name)


@pytest.mark.parametrize("structure, part", [("factored", r"factored: output sensitivities"), ("dense", "parameter")])
def test_nan_in_a_jacobian_names_the_block_and_the_example(backend, structure, part):
    model, x = on_backend(SqrtNet(), torch.tensor([[1.0, 0.5], [2.0, 1.0], [0.5, 0.1], [-1.0, 2.0], [-2.0, 0.0]]),
                          backend)
    with pytest.raises(NonFiniteError, match=rf"block of lin.weight \({part}.* first at example 3 \(of 5\)"):
        export_jacobian(model, x, structure=structure, batch_size=2, backend=backend.name)


# ----- devices and dtypes -------------------------------------------------------------------------------------------

def test_model_on_another_device_than_the_backend():
    model = MeanVarNet().to("meta")
    with pytest.raises(BackendMismatchError, match=r"device meta but backend 'numpy' keeps its arrays on cpu"):
        export_jacobian(model, torch.randn(3, 3, device="meta"))
    with pytest.raises(BackendMismatchError, match="device meta, which has no lingp backend"):
        export_jacobian(model, torch.randn(3, 3, device="meta"), backend="auto")
    with pytest.raises(BackendMismatchError, match=r"inputs live on device meta but the model on cpu"):
        export_jacobian(MeanVarNet(), torch.randn(3, 3, device="meta"))


def test_cupy_backend_needs_a_cuda_model(cupy_backend):
    with pytest.raises(BackendMismatchError, match="model lives on device cpu but backend 'cupy'"):
        export_jacobian(MeanVarNet(), torch.randn(3, 3), backend="cupy")


def test_unsupported_dtypes():
    x = torch.randn(3, 3)
    with pytest.raises(DTypeError, match=r"torch.float16; lingp exports float32 or float64"):
        export_jacobian(MeanVarNet().half(), x.half())
    with pytest.raises(DTypeError, match="dtype int32 is not supported"):
        export_jacobian(MeanVarNet(), x, dtype="int32")
    with pytest.raises(DTypeError, match="is not a dtype"):
        export_jacobian(MeanVarNet(), x, dtype="not-a-dtype")
    with pytest.raises(ValueError, match="structure must be one of 'auto', 'factored', 'dense'"):
        export_jacobian(MeanVarNet(), x, structure="sparse")
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        export_jacobian(lambda t: t, x)


# ----- memory -------------------------------------------------------------------------------------------------------

def test_memory_budget_error_gives_numbers_and_ways_out(backend):
    model, x = on_backend(SmallCNN(), torch.randn(50, 2, 6, 6), backend)
    with pytest.raises(MemoryBudgetError, match=r"needs [\d.]+ KiB but the memory budget is 1000 B; ways out: .*"
                                                r"smaller batch_size.*fewer parameters.*AutogradJacobian"):
        export_jacobian(model, x, structure="dense", batch_size=10, memory_budget=1000, backend=backend.name)
    J = export_jacobian(model, x, memory_budget=2**30, backend=backend.name)
    with pytest.raises(MemoryBudgetError, match=r"kernel matrix J J'ᵀ of shape \(150, 150\).*gram_matmat"):
        J.gram(memory_budget=1000)
    with pytest.raises(MemoryBudgetError, match=r"dense Jacobian of shape \(150, 395\)"):
        J.to_dense(memory_budget=1000)


def test_auto_batch_size_fits_the_budget():
    model = mlp(nn.Tanh, (3, 64, 64, 2))
    x = torch.randn(40, 3)
    small = export_jacobian(model, x, structure="dense", memory_budget=2_000_000)  # 1.4 MiB stored, ~7 per batch
    full = export_jacobian(model, x, structure="dense")
    np.testing.assert_allclose(small.gram(), full.gram(), rtol=1e-5, atol=1e-5)  # batch shapes change float32 sums


def test_storage_dir_must_be_a_directory(tmp_path):
    with pytest.raises(InvalidOptionError, match="storage_dir .*missing.* is not a directory"):
        export_jacobian(MeanVarNet(), torch.randn(3, 3), structure="dense", storage_dir=tmp_path / "missing")


def test_storage_dir_needs_numpy(cupy_backend, tmp_path):
    model, x = on_backend(MeanVarNet(), torch.randn(3, 3), cupy_backend)
    with pytest.raises(ValueError, match="storage_dir .* needs backend='numpy'"):
        export_jacobian(model, x, backend="cupy", storage_dir=tmp_path)


# ----- products -----------------------------------------------------------------------------------------------------

def test_product_operands_are_checked(backend):
    model, x = on_backend(MeanVarNet(), torch.randn(3, 3), backend)
    J = export_jacobian(model, x, backend=backend.name)
    xp = backend.xp
    with pytest.raises(DTypeError, match=r"V has dtype float32 .* expected one of float64"):
        J.matmat(xp.ones((J.p, 2), dtype=np.float32))
    with pytest.raises(ShapeError, match=rf"V has shape \(5, 2\); expected \({J.p},\) or \({J.p}, k\)"):
        J.matmat(xp.ones((5, 2)))
    with pytest.raises(ShapeError, match=r"U has shape \(7,\)"):
        J.rmatmat(xp.ones(7))
    bad = xp.ones(J.shape[0])
    bad[1] = np.inf
    with pytest.raises(NonFiniteError, match="U"):
        J.rmatmat(bad)
    head = export_jacobian(model, x, params="head", backend=backend.name)
    with pytest.raises(ShapeError, match="differ from"):
        J.gram(head)
    with pytest.raises(DTypeError, match="export both in one dtype"):
        J.gram(export_jacobian(model, x, dtype="float32", backend=backend.name))
    op = AutogradJacobian(model, x, backend=backend.name)
    with pytest.raises(ShapeError, match=r"V has shape \(2,\)"):
        op.matmat(xp.ones(2))


def test_products_reject_arrays_of_another_backend(cupy_backend):
    model, x = on_backend(MeanVarNet(), torch.randn(3, 3), cupy_backend)
    J = export_jacobian(model, x, backend="cupy")
    with pytest.raises(BackendMismatchError, match="V is a numpy.ndarray"):
        J.matmat(np.ones(J.p))


# ----- progress bar and imports ------------------------------------------------------------------------------------

def test_progress_bar(capsys):
    export_jacobian(mlp(nn.Tanh), torch.randn(6, 3), batch_size=2, progress=True)
    assert "export_jacobian" in capsys.readouterr().err


def test_progress_without_tqdm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(ImportError, match="pip install tqdm"):
        export_jacobian(mlp(nn.Tanh), torch.randn(6, 3), progress=True)
    export_jacobian(mlp(nn.Tanh), torch.randn(6, 3), progress=False)


def test_export_modules_import_neither_torch_nor_tqdm():
    code = ("import sys, lingp_core.export, lingp_core.jacobian, lingp_core.autograd_operator, lingp_core._progress; "
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tqdm', 'cupy'))))")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
