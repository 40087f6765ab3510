"""Export the Jacobian of a torch network as :class:`~lingp_core.jacobian.JacobianBlocks` on NumPy or CuPy.

This is the only module of the core that knows torch, and it imports torch inside functions, never at import time.

How it works, per batch of examples, in one ``torch.func.vmap`` over examples of ``torch.func.jacrev`` over the
selected outputs (so examples never mix, even in models that would mix them in a batch):

- plain ``nn.Linear`` layers are stored factored: a forward hook records the layer input a (→ A) and adds a zero
  perturbation ε to the layer output, and the Jacobian with respect to ε is the output sensitivity δ = ∂f/∂y (→ Δ).
  A layer called several times (weight sharing) or on inputs with extra dimensions (sequences) simply contributes
  several positions t per example; its weight Jacobian is Σ_t δ_t a_tᵀ, which the factored block sums exactly.
- every other selected parameter (convolutions, norms, embeddings, custom modules, Linear weights that are also
  used outside their layer's own forward, e.g. tied weights, and Linear layers with forward hooks, which may change
  the layer's output) gets a dense per-example Jacobian block from jacrev.

A first forward pass on one example (the probe) finds each Linear layer's calls and shapes, and checks with a
``TorchFunctionMode`` that its weight and bias are used only by ``F.linear`` inside that layer's own forward; any other
use makes the layer dense, so a factored block is always exact.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

import backends
from backends import Backend
from backends._base import is_cupy_array
from lingp_core._precision import float_dtype
from lingp_core._progress import progress_bar
from lingp_core._validate import (
    ArgumentTypeError,
    BackendMismatchError,
    DTypeError,
    ExportError,
    InvalidOptionError,
    LingpError,
    MemoryBudgetError,
    MissingDependencyError,
    NonFiniteError,
    ShapeError,
    SignatureError,
    ValueRangeError,
    check_choice,
    check_int,
    check_memory,
    check_positive,
    describe,
    format_bytes,
    resolve_memory_budget,
)
from lingp_core.jacobian import DenseBlock, FactoredLinearBlock, JacobianBlocks, JacobianShape
from lingp_core.sharded import ShardedJacobian, export_sharded, is_dask_array

__all__ = ["LAST_LAYER", "STRUCTURES", "export_jacobian", "parameter_vector"]

LAST_LAYER = "last_layer"
"""``params=LAST_LAYER`` selects the trainable parameters of the module that finishes its forward last."""

STRUCTURES = ("auto", "factored", "dense")
"""Block structures: ``"auto"`` factors a Linear layer when exact and smaller than its dense block; ``"factored"``
factors every Linear layer where exact; ``"dense"`` makes every block dense (the cross-check)."""

_MAX_AUTO_BATCH = 1024  # beyond this, bigger batches no longer speed up the batched GEMMs much


# ----- torch, model, inputs ---------------------------------------------------------------------------------------

def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("exporting a Jacobian needs torch: pip install 'lingp[torch]'") from None
    return torch


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Run ``model`` in eval mode and restore every submodule's own training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def _buffers_kept(model: Any) -> Iterator[None]:
    """Restore every buffer's values afterwards (whether the export succeeds or fails): a forward that updates
    buffers (a counter, a running average) must not leave the model changed by an export's probe and passes."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        torch = _torch()
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _check_model(model: Any) -> tuple[Any, Any]:
    """The device and floating dtype shared by all of ``model``'s parameters; clear errors otherwise."""
    torch = _torch()
    if not isinstance(model, torch.nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got "
                                f"{type(model).__module__}.{type(model).__qualname__}")
    lazy = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if torch.nn.parameter.is_lazy(t)]
    if lazy:
        raise ExportError(f"the model has uninitialized (lazy) parameters or buffers ({_preview(lazy)}), e.g. of "
                          "nn.LazyLinear, whose shapes are not known yet: run one forward pass on a batch of inputs "
                          "first (model(inputs[:1])), then export")
    parameters = list(model.parameters())
    if not parameters:
        raise ValueRangeError(f"no parameters selected: the model ({type(model).__name__}) has no parameters")
    devices = sorted({str(p.device) for p in parameters})
    if len(devices) > 1:
        raise BackendMismatchError(f"the model's parameters live on several devices ({', '.join(devices)}); "
                                   "move the model to one device with model.to(device)")
    dtypes = sorted({str(p.dtype) for p in parameters if p.is_floating_point()})
    if len(dtypes) != 1:
        raise DTypeError(f"the model's floating parameters must share one dtype, got {dtypes or 'none'}; convert "
                         "explicitly with model.float() or model.double()")
    dtype = next(p.dtype for p in parameters if p.is_floating_point())
    if dtype not in (torch.float32, torch.float64):
        raise DTypeError(f"the model's parameters have dtype {dtype}; lingp exports float32 or float64 networks: "
                         "convert explicitly with model.float() or model.double()")
    return parameters[0].device, dtype


@contextlib.contextmanager
def _own_tensors_kept(model: Any) -> Iterator[None]:
    """Put the model's own Parameter and buffer objects back on exit, even after an error.

    ``torch.func.functional_call`` swaps tensors into the modules and back; for a module reached under two names (one
    Linear used twice in a Sequential) it swaps the same slot twice and leaves one of its own tensors there (inside
    jacrev, a functorch wrapper): an optimizer built before would no longer train the model, and the weights
    fingerprint would no longer find the model's parameters.
    """
    saved = [(store, dict(store)) for m in model.modules() for store in (m._parameters, m._buffers)]
    try:
        yield
    finally:
        for store, items in saved:
            for key, tensor in items.items():
                if store.get(key) is not tensor:
                    store[key] = tensor


def _functional_call(model: Any, params: dict, args: tuple) -> Any:
    """``torch.func.functional_call`` that leaves the model holding its own tensors (see :func:`_own_tensors_kept`)."""
    from torch.func import functional_call as call

    with _own_tensors_kept(model):
        return call(model, params, args)


def _same_device(a: Any, b: Any) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _resolve_backend(backend: Any, device: Any) -> Backend:
    """The backend for a model on ``device``: ``"auto"`` follows the device, a named backend must match it."""
    if isinstance(backend, str) and backend.lower() == "auto":
        name = {"cpu": "numpy", "cuda": "cupy"}.get(device.type)
        if name is None:
            raise BackendMismatchError(f"the model lives on device {device}, which has no lingp backend; move it to "
                                       "'cpu' (NumPy) or 'cuda' (CuPy)")
        return backends.get_backend(name)
    be = backends.get_backend(backend)
    wanted = "cpu" if be.name == "numpy" else "cuda"
    if device.type != wanted:
        other = {"cpu": "'numpy'", "cuda": "'cupy'"}.get(device.type, "a backend on its device")
        raise BackendMismatchError(f"the model lives on device {device} but backend {be.name!r} keeps its arrays on "
                                   f"{wanted}; move the model and inputs with model.to({wanted!r}), or pass "
                                   f"backend={other}")
    if be.name == "cupy":
        current = int(be.xp.cuda.Device().id)
        if (device.index if device.index is not None else current) != current:
            raise BackendMismatchError(f"the model lives on {device} but CuPy's current device is cuda:{current}; "
                                       f"run inside `with cupy.cuda.Device({device.index}):` or move the model")
    return be


def _as_input_tensor(inputs: Any, device: Any, model_dtype: Any) -> Any:
    """``inputs`` as a detached torch tensor on the model's device, checked for type, shape, dtype and NaN/Inf."""
    torch = _torch()
    if isinstance(inputs, torch.Tensor):
        x = inputs.detach()
    elif isinstance(inputs, np.ndarray):
        x = _from_numpy(inputs)
    elif is_cupy_array(inputs):
        x = torch.from_dlpack(inputs)
    else:
        raise ArgumentTypeError(f"inputs must be a torch.Tensor (or a NumPy/CuPy array), got "
                                f"{type(inputs).__module__}.{type(inputs).__qualname__}")
    if x.is_nested or x.layout != torch.strided:
        kind = "a nested tensor" if x.is_nested else f"a tensor with layout {x.layout}"
        raise ArgumentTypeError(f"inputs must be a dense (strided) tensor, got {kind}; convert explicitly, e.g. "
                                "inputs.to_dense() for a sparse tensor, or pad a nested tensor to one shape")
    if x.is_complex():
        raise DTypeError(f"inputs have complex dtype {x.dtype} (shape {tuple(x.shape)}) but the model's parameters "
                         f"are real ({model_dtype}); lingp does not drop imaginary parts silently: pass real inputs, "
                         "e.g. torch.view_as_real(inputs) or inputs.real")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ShapeError(f"inputs must have a leading example dimension holding at least one example, got shape "
                         f"{tuple(x.shape)}")
    if not _same_device(x.device, device):
        raise BackendMismatchError(f"inputs live on device {x.device} but the model on {device}; move them with "
                                   f"inputs.to({str(device)!r})")
    if x.is_floating_point():
        if x.dtype != model_dtype:
            raise DTypeError(f"inputs have dtype {x.dtype} (shape {tuple(x.shape)}) but the model's parameters "
                             f"{model_dtype}; lingp does not cast silently: convert explicitly, e.g. "
                             f"inputs.to({model_dtype})")
        bad = _first_bad_example(x)
        if bad is not None:
            raise NonFiniteError(f"inputs (shape {tuple(x.shape)}) hold NaN or Inf, the first at example {bad}; "
                                 "lingp never replaces them, clean the inputs first")
    return x


def _from_numpy(a: np.ndarray) -> Any:
    """A NumPy array as a torch tensor: shared memory where torch allows it, a copy only for negative strides."""
    torch = _torch()
    if isinstance(a, np.ma.MaskedArray):
        raise ArgumentTypeError(f"inputs are a numpy.ma.MaskedArray of shape {a.shape}: export would ignore its mask; "
                                "pass inputs.filled(value) or drop the masked examples explicitly")
    if a.dtype.kind not in "biuf":
        raise DTypeError(f"inputs have NumPy dtype {a.dtype} (shape {a.shape}); lingp takes numeric (float, int or "
                         "bool) inputs: convert explicitly, e.g. inputs.astype(np.float64)")
    if any(step < 0 for step in a.strides):
        a = np.ascontiguousarray(a)  # torch has no negative strides: the one case that needs a copy
    try:
        with warnings.catch_warnings():
            # torch warns that a read-only array becomes a writable tensor; export never writes its inputs
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            return torch.from_numpy(a)
    except TypeError as exc:  # a dtype torch does not take (e.g. float128)
        raise DTypeError(f"inputs have NumPy dtype {a.dtype} (shape {a.shape}), which torch cannot take: {exc}; "
                         "convert explicitly, e.g. inputs.astype(np.float64)") from None


def _resolve_dtype(dtype: Any, model_dtype: Any) -> np.dtype:
    """The dtype of the exported arrays: the model's by default, else the given one (float32 or float64)."""
    if dtype is None:
        return np.dtype(str(model_dtype).removeprefix("torch."))
    return float_dtype(dtype, "dtype")


def _first_bad_example(t: Any) -> int | None:
    """Index along dim 0 of the first example with a NaN/Inf entry, or None."""
    torch = _torch()
    finite = torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    if bool(finite.all()):
        return None
    return int((~finite).nonzero()[0, 0])


# ----- probe: one forward pass on one example ---------------------------------------------------------------------

@dataclasses.dataclass
class _Probe:
    """What one forward pass on one example tells about the model."""

    n_outputs: int  # size of the flattened model output per example
    linear_calls: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]]  # Linear name → (input, output) shapes
    tainted: set[str]  # Linear layers whose weight/bias are used outside F.linear in their own forward
    finish_order: list[str]  # modules owning parameters, in the order their forward finished
    activation_elements: int  # elements of all module outputs (a rough activation size, for memory estimates)


def _is_plain_linear(module: Any) -> bool:
    """An ``nn.Linear`` running torch's own forward with no forward hook: its output is exactly W a + b.

    A forward hook (the module's own or a global one) may change the output after the layer (a scale, an adapter),
    and the factored block's Δ is taken after every hook, so such a layer is exported dense, which is exact. Forward
    pre-hooks are fine: A is the input the layer's forward receives, after them.
    """
    torch = _torch()
    return (isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward
            and not module._forward_hooks and not torch.nn.modules.module._global_forward_hooks)


def _tensors(obj: Any) -> Iterator[Any]:
    """Every tensor in a nested structure of tuples, lists and dicts."""
    torch = _torch()
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _first_input(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get("input")


def _runs_as_float(model: Any, x1: Any) -> bool:
    """Whether the model runs on the integer or bool example ``x1`` converted to its parameters' dtype (then the
    failure was the dtype's, not the shape's or the values')."""
    torch = _torch()
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.get_default_dtype())
    try:
        with torch.no_grad():
            model(x1.to(dtype))
    except Exception:  # the model's own error, whatever its type: it fails on floats too
        return False
    return True


def _probe_model(model: Any, x1: Any) -> _Probe:
    """Run ``model`` on one example (no grad, eval mode assumed) and record what export needs to plan its blocks."""
    torch = _torch()
    from torch.overrides import TorchFunctionMode

    linear = torch.nn.functional.linear
    modules = dict(model.named_modules())
    linears = {name: m for name, m in modules.items() if _is_plain_linear(m)}
    watched: dict[int, tuple[str, Any]] = {}
    for name, m in linears.items():
        for p in (m.weight, m.bias):
            if p is not None:
                watched.setdefault(id(p), (name, p))
    stack: list[str] = []
    calls: dict[str, list] = {name: [] for name in linears}
    tainted: set[str] = set()
    order: list[str] = []
    activations = [0]

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            kwargs = kwargs or {}
            result = func(*args, **kwargs)
            for t in _tensors((args, kwargs)):
                entry = watched.get(id(t))
                if entry is None or entry[1] is not t:
                    continue
                owner, param = entry
                roles = list(args[1:3]) + [kwargs.get("weight"), kwargs.get("bias")]  # F.linear(input, weight, bias)
                in_own_linear = (func is linear and bool(stack) and stack[-1] == owner
                                 and any(param is a for a in roles))
                harmless = getattr(func, "__name__", "") == "__get__" and not isinstance(result, torch.Tensor)
                if not (in_own_linear or harmless):
                    tainted.add(owner)
            return result

    def pre_hook(name: str) -> Callable:
        def hook(module: Any, args: tuple) -> None:
            stack.append(name)
        return hook

    def post_hook(name: str) -> Callable:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            stack.pop()
            if name in linears:
                calls[name].append((tuple(_first_input(args, kwargs).shape), tuple(output.shape)))
            if any(True for _ in module.parameters(recurse=False)):
                order.append(name)
            activations[0] += sum(int(t.numel()) for t in _tensors(output))
        return hook

    handles, failure = [], None
    try:
        for name, m in modules.items():
            handles.append(m.register_forward_pre_hook(pre_hook(name)))
            handles.append(m.register_forward_hook(post_hook(name), with_kwargs=True))
        with torch.no_grad(), Watch():
            out = model(x1)
    except LingpError:
        raise
    except Exception as exc:  # the model's own error, whatever its type: said below, with what went in
        failure = exc
    finally:
        for h in handles:
            h.remove()
    if failure is not None:
        message = (f"the model failed on inputs of shape {tuple(x1.shape)} (one example) and dtype {x1.dtype}: "
                   f"{type(failure).__name__}: {failure}")
        if not (x1.dtype.is_floating_point or x1.dtype.is_complex) and _runs_as_float(model, x1):
            raise DTypeError(f"{message}; the network runs on these inputs converted to floats: convert them "
                             "explicitly, e.g. inputs.float()") from failure
        raise ShapeError(message) from failure
    if not isinstance(out, torch.Tensor):
        raise ArgumentTypeError(f"the model must return one tensor of outputs, got {type(out).__name__}")
    if out.ndim < 1 or out.shape[0] != 1:
        raise ShapeError(f"the model's output has shape {tuple(out.shape)} for one example of shape "
                         f"{tuple(x1.shape)}; expected a leading example dimension of size 1")
    if not out.is_floating_point():
        raise DTypeError(f"the model's output has dtype {out.dtype}; expected floating outputs")
    return _Probe(int(out[0].numel()), calls, tainted, order, activations[0])


# ----- selection ----------------------------------------------------------------------------------------------------

def _preview(names: Sequence[str], k: int = 8) -> str:
    shown = ", ".join(map(repr, names[:k]))
    return shown + (f", ... ({len(names)} in all)" if len(names) > k else "")


def _match(spec: Any, named: list[tuple[str, Any]], model: Any) -> set[str]:
    """Names selected by one ``params`` entry (frozen parameters only when named exactly)."""
    torch = _torch()
    names = [n for n, _ in named]
    if isinstance(spec, str):
        if spec in names:
            return {spec}
        under = {n for n, p in named if n.startswith(spec + ".")}
        if not under:
            raise ValueRangeError(f"params entry {spec!r} names no parameter or module of the model; parameter names "
                                  f"are {_preview(names)}")
        return {n for n, p in named if n in under and p.requires_grad}
    if isinstance(spec, torch.nn.Module):
        if not any(m is spec for m in model.modules()):
            raise ValueRangeError(f"params entry {type(spec).__name__} module is not part of the model")
        ids = {id(p) for p in spec.parameters()}
        return {n for n, p in named if id(p) in ids and p.requires_grad}
    if isinstance(spec, torch.Tensor):
        found = {n for n, p in named if p is spec}
        if not found:
            raise ValueRangeError(f"params entry (a tensor of shape {tuple(spec.shape)}) is not a parameter of the "
                                  "model")
        return found
    if callable(spec):
        return {n for n, p in named if p.requires_grad and spec(n, p)}
    raise ArgumentTypeError(f"params entries must be names, modules, parameters or a predicate (name, param) -> bool; "
                            f"got {type(spec).__name__} {spec!r}")


def _select_parameters(model: Any, params: Any, probe: _Probe) -> list[tuple[str, Any]]:
    """The selected (name, parameter) pairs in the model's ``named_parameters`` order.

    ``params`` is None (all trainable), :data:`LAST_LAYER`, or one or a list of: a parameter name (exact: included
    even when frozen), a module name prefix, a module, a parameter, or a predicate ``(name, param) -> bool``.
    Parameters with ``requires_grad=False`` are left out unless named exactly.
    """
    torch = _torch()
    named = list(model.named_parameters())
    if params is None:
        chosen = {n for n, p in named if p.requires_grad}
    elif isinstance(params, str) and params == LAST_LAYER:
        chosen = set()
        for owner in reversed(probe.finish_order):
            ids = {id(p) for p in model.get_submodule(owner).parameters(recurse=False) if p.requires_grad}
            chosen = {n for n, p in named if id(p) in ids}
            if chosen:
                break
    else:
        single = isinstance(params, (str, torch.nn.Module, torch.Tensor)) or callable(params)
        try:
            specs = [params] if single else list(params)
        except TypeError:
            raise ArgumentTypeError(f"params must be None, {LAST_LAYER!r}, a parameter or module name, a module, a "
                                    "parameter, a predicate (name, param) -> bool, or a list of these; got "
                                    f"{describe(params)}") from None
        chosen = set()
        for spec in specs:
            chosen |= _match(spec, named, model)
    selected = [(n, p) for n, p in named if n in chosen]
    if not selected:
        raise ValueRangeError(f"no parameters selected: params={params!r} matched none of the model's {len(named)} "
                              f"trainable parameters ({_preview([n for n, _ in named])}); frozen parameters "
                              "(requires_grad=False) are included only when named exactly")
    return selected


def _select_outputs(outputs: Any, n_outputs: int) -> tuple[int, ...]:
    """Indices into the flattened model output: all (None), an int, a slice, or a sequence of distinct ints."""
    if outputs is None:
        return tuple(range(n_outputs))
    if isinstance(outputs, slice):
        chosen = list(range(n_outputs)[outputs])
    elif isinstance(outputs, (list, tuple, range, np.ndarray)):
        chosen = [check_int(o, "outputs", minimum=-n_outputs, maximum=n_outputs - 1) for o in list(outputs)]
    else:
        chosen = [check_int(outputs, "outputs", minimum=-n_outputs, maximum=n_outputs - 1)]
    chosen = [o % n_outputs for o in chosen]
    if not chosen:
        raise ValueRangeError(f"outputs={outputs!r} selects none of the model's {n_outputs} outputs")
    if len(set(chosen)) != len(chosen):
        raise ValueRangeError(f"outputs={outputs!r} selects an output twice")
    return tuple(chosen)


# ----- planning the blocks ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Plan:
    """One block to export."""

    kind: str
    names: list[str]
    shapes: list[tuple[int, ...]]
    owner: str
    has_weight: bool = False
    has_bias: bool = False
    in_features: int = 0
    out_features: int = 0
    call_T: list[int] = dataclasses.field(default_factory=list)  # positions per call
    call_out_shapes: list[tuple[int, ...]] = dataclasses.field(default_factory=list)

    @property
    def p(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def T(self) -> int:
        return sum(self.call_T)

    @property
    def m(self) -> int:
        """Columns of A: the layer inputs plus a ones column for the bias (just the ones for a bias-only block)."""
        return (self.in_features + int(self.has_bias)) if self.has_weight else 1

    def stored_elements_per_example(self, c: int) -> int:
        if self.kind == "dense":
            return c * self.p
        return self.T * self.m + c * self.T * self.out_features


def _plan_blocks(model: Any, selected: list[tuple[str, Any]], probe: _Probe, structure: str, c: int) -> list[_Plan]:
    """Group the selected parameters by owning module (consecutive in model order) and pick each group's kind."""
    groups: list[tuple[str, list[tuple[str, Any]]]] = []
    for name, param in selected:
        owner = name.rpartition(".")[0]
        if groups and groups[-1][0] == owner:
            groups[-1][1].append((name, param))
        else:
            groups.append((owner, [(name, param)]))
    plans = []
    for owner, items in groups:
        plan = _Plan("dense", [n for n, _ in items], [tuple(p.shape) for _, p in items], owner)
        if structure != "dense" and _factorable(model, owner, items, probe):
            module = model.get_submodule(owner)
            plan.has_weight = any(p is module.weight for _, p in items)
            plan.has_bias = any(module.bias is not None and p is module.bias for _, p in items)
            plan.in_features, plan.out_features = module.in_features, module.out_features
            calls = probe.linear_calls[owner]
            plan.call_T = [int(np.prod(s_in, dtype=np.int64)) // module.in_features for s_in, _ in calls]
            plan.call_out_shapes = [s_out for _, s_out in calls]
            if structure == "factored" or _factored_pays(plan, c):
                plan.kind = "factored"
        plans.append(plan)
    return plans


def _factorable(model: Any, owner: str, items: list[tuple[str, Any]], probe: _Probe) -> bool:
    """Whether a group is exactly a plain Linear layer's weight/bias, used only by that layer's own forward."""
    if owner not in probe.linear_calls or not probe.linear_calls[owner] or owner in probe.tainted:
        return False
    module = model.get_submodule(owner)
    return all(p is module.weight or (module.bias is not None and p is module.bias) for _, p in items)


def _factored_pays(plan: _Plan, c: int) -> bool:
    """Factored when it stores less than the dense block and its gram (∝ T²(m + out)) costs less than dense (∝ p)."""
    factored = plan.T * plan.m + c * plan.T * plan.out_features
    return factored <= c * plan.p and plan.T * plan.T * (plan.m + plan.out_features) <= plan.p


# ----- memory -------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _MemoryPlan:
    storage: int  # bytes of the exported arrays in memory
    disk: int  # bytes of dense blocks on disk
    per_example: int  # bytes of per-batch work space per example
    batch_size: int


def _plan_memory(plans: list[_Plan], n: int, c: int, probe: _Probe, *, out_itemsize: int, model_itemsize: int,
                 on_disk: bool, batch_size: int | None, budget: int, backend: Backend, structure: str) -> _MemoryPlan:
    """Estimate every allocation of the export before making any; pick or check the batch size against the budget."""
    dense_bytes = sum(n * pl.stored_elements_per_example(c) * out_itemsize for pl in plans if pl.kind == "dense")
    factored_bytes = sum(n * pl.stored_elements_per_example(c) * out_itemsize for pl in plans if pl.kind != "dense")
    storage = n * c * out_itemsize + factored_bytes + (0 if on_disk else dense_bytes)
    # per example: torch's results (twice: jacrev's output and the reshaped copy) plus forward activations kept once
    # and their c cotangents in the backward passes
    results = c + sum(pl.stored_elements_per_example(c) for pl in plans)
    per_example = model_itemsize * (2 * results + (1 + c) * probe.activation_elements)
    if batch_size is None:
        fit = (budget - storage) // max(1, per_example)
        batch_size = int(max(1, min(n, _MAX_AUTO_BATCH, fit)))
    needed = storage + batch_size * per_example
    if needed > budget:
        ways = []
        if batch_size > 1:
            ways.append(f"a smaller batch_size (now {batch_size}; each example needs "
                        f"{format_bytes(per_example)} of work space)")
        if structure == "dense" and any(pl.owner in probe.linear_calls for pl in plans):
            ways.append("structure='auto' so Linear layers are stored factored")
        biggest = sorted((pl for pl in plans if pl.kind == "dense"), key=lambda pl: -pl.p)[:3]
        if biggest:
            listed = ", ".join(f"{'+'.join(pl.names)} ({format_bytes(n * c * pl.p * out_itemsize)})" for pl in biggest)
            ways.append(f"fewer parameters via params=... (largest dense blocks: {listed})")
            if not on_disk and backend.name == "numpy":
                ways.append("storage_dir=DIR to keep dense blocks on disk")
        ways.append("matrix-free products with AutogradJacobian")
        what = (f"exporting the Jacobian of {n} examples × {c} outputs (stored blocks "
                f"{format_bytes(storage)}{f', plus {format_bytes(dense_bytes)} on disk' if on_disk else ''}; "
                f"work space {format_bytes(batch_size * per_example)} for batch_size={batch_size})")
        check_memory(needed, budget, what=what, alternative="ways out: " + "; ".join(ways))
    return _MemoryPlan(storage, dense_bytes if on_disk else 0, per_example, batch_size)


def _disk_directory(storage_dir: Any, disk_bytes: int, backend: Backend) -> str:
    """A fresh directory under ``storage_dir`` for this export's dense blocks, after checking the free disk space."""
    if backend.name != "numpy":
        raise InvalidOptionError("storage_dir keeps dense blocks in np.memmap files on the host; it needs "
                                 "backend='numpy'")
    root = os.fspath(storage_dir)
    if not os.path.isdir(root):
        raise InvalidOptionError(f"storage_dir {root!r} is not a directory; create it first or choose another")
    free = shutil.disk_usage(root).free
    if disk_bytes > free:
        raise MemoryBudgetError(f"dense blocks on disk need {format_bytes(disk_bytes)} but {root!r} has only "
                                f"{format_bytes(free)} free; choose another storage_dir or fewer parameters")
    return tempfile.mkdtemp(prefix="lingp-jacobian-", dir=root)


# ----- the batched per-example computation ----------------------------------------------------------------------------

class _Capture:
    """Forward hooks for factored Linear layers: record each call's input, add that call's zero perturbation ε."""

    def __init__(self, plans: list[_Plan]) -> None:
        self.slots: dict[tuple[str, int], int] = {}
        for pl in plans:
            if pl.kind == "factored":
                for call in range(len(pl.call_T)):
                    self.slots[(pl.owner, call)] = len(self.slots)
        self.reset(())

    def reset(self, eps: tuple) -> None:
        self.eps = eps
        self.count: dict[str, int] = defaultdict(int)
        self.inputs: list[Any] = [None] * len(self.slots)

    def hook(self, owner: str) -> Callable:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
            call = self.count[owner]
            self.count[owner] += 1
            slot = self.slots.get((owner, call))
            if slot is None:
                raise ExportError(f"layer {owner!r} ran more often than in the first pass (data-dependent control "
                                  "flow); export it densely with structure='dense'")
            x = _first_input(args, kwargs)
            # a copy: a reshape may be a view, and the forward can change its input in place after the call
            # (h += layer(h), relu_(h)); only ε is differentiated, so autograd's version check never sees it
            self.inputs[slot] = x.reshape(-1, x.shape[-1]).clone()
            return output + self.eps[slot]
        return hook


def _make_batch_fn(model: Any, plans: list[_Plan], index: tuple[int, ...] | None, device: Any,
                   dtype: Any) -> tuple[Callable, _Capture]:
    """A function of an example batch → (f (b, c), dense jacobians {name: (b, c, *shape)}, Δ per call, A per call)."""
    torch = _torch()
    from torch.func import jacrev, vmap

    capture = _Capture(plans)
    named = dict(model.named_parameters())
    dense = {name: named[name].detach() for pl in plans if pl.kind == "dense" for name in pl.names}
    eps = tuple(torch.zeros(shape, dtype=dtype, device=device)
                for pl in plans if pl.kind == "factored" for shape in pl.call_out_shapes)
    select = None if index is None else torch.as_tensor(index, device=device)

    def per_example(dense_params: dict, eps_: tuple, x: Any) -> tuple:
        capture.reset(eps_)
        out = _functional_call(model, dense_params, (x.unsqueeze(0),)).reshape(-1)
        if select is not None:
            out = out[select]
        if any(a is None for a in capture.inputs):
            raise ExportError("a factored Linear layer ran less often than in the first pass (data-dependent "
                              "control flow); export it densely with structure='dense'")
        return out, (out, tuple(capture.inputs))

    argnums = tuple(i for i, args in ((0, dense), (1, eps)) if args)
    jac = vmap(jacrev(per_example, argnums=argnums, has_aux=True), in_dims=(None, None, 0))

    def batch_fn(xb: Any) -> tuple:
        grads, (f, inputs) = jac(dense, eps, xb)
        by_arg = dict(zip(argnums, grads))
        return f, by_arg.get(0, {}), by_arg.get(1, ()), inputs

    return batch_fn, capture


def _check_batch(arr: Any, what: str, start: int, n: int, xp: Any) -> None:
    """NonFiniteError naming ``what`` and the first example (global index) of a batch array (b, ...) with NaN/Inf.

    Checked on the backend array (a zero-copy view of torch's result): one fast pass, no torch thread-pool overhead.
    """
    finite = xp.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
    if bool(finite.all()):
        return
    bad = int(xp.flatnonzero(~finite)[0])
    raise NonFiniteError(f"{what} holds NaN or Inf, the first at example {start + bad} (of {n}); lingp never "
                         "replaces them: check the model at that input (e.g. a log or sqrt at 0)")


# ----- weights fingerprint -------------------------------------------------------------------------------------------

_SAMPLE = 1024  # entries sampled from each parameter or buffer outside the selection


def _words(t: Any) -> Any:
    """A contiguous 1-D tensor's bytes as integers of its item size (int8/16/32/64): exact, order-free to sum."""
    torch = _torch()
    word = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(t.element_size())
    return t.view(torch.uint8) if word is None else t.view(word)


def _weights_fingerprint(model: Any, selected: list[tuple[str, Any]]) -> str:
    """SHA-256 of the weights the Jacobian was computed at, for :meth:`JacobianBlocks.check_signature`.

    The selected parameters (J's columns) enter with all their bytes: 2 ms for the p = 803,601 network of the paper,
    far below the export of its n·c·p derivatives. Every other parameter and buffer shapes J too (a last-layer
    Jacobian depends on the body, an eval-mode batch norm on its running statistics) and may be far larger than the
    selection, so each enters with its name, dtype, shape, 1,024 strided entries and the integer sum of its bit
    patterns (modulo 2⁶⁴: exact, so the same on every device and thread count, and changed by any changed entry short
    of an exact cancellation).
    """
    torch = _torch()
    h = hashlib.sha256()
    chosen = {name for name, _ in selected}  # by name: a Parameter object may be swapped (see _own_tensors_kept)
    for name, p in selected:
        flat = p.detach().reshape(-1).contiguous().cpu()
        h.update(f"{name}:{flat.dtype}:{tuple(p.shape)};".encode())
        h.update(_words(flat).numpy())
    others = [(n, t) for n, t in model.named_parameters() if n not in chosen] + list(model.named_buffers())
    for name, t in others:
        flat = t.detach().reshape(-1).contiguous()
        stride = max(1, -(-flat.numel() // _SAMPLE))
        total = int(torch.sum(_words(flat), dtype=torch.int64)) if flat.numel() else 0
        h.update(f"{name}:{flat.dtype}:{tuple(t.shape)}:{total};".encode())
        h.update(_words(flat[::stride].contiguous().cpu()).numpy())
    return h.hexdigest()


def parameter_vector(model: Any, J: Any) -> Any:
    """θ̂: the network's parameters that are J's columns, flattened in J's column order, in J's dtype and on J's
    backend — for a prior on θ itself (``prior_mean=-parameter_vector(model, J)`` in :meth:`LinearizedGP.fit`,
    :meth:`BlockWeightAverage.fit` and :meth:`LaplaceClassifier.fit`).

    Parameters
    ----------
    model : torch.nn.Module
        The network J was exported from, with the same weights.
    J : JacobianBlocks or ShardedJacobian
        A Jacobian exported from ``model`` (:func:`export_jacobian`), carrying its weights fingerprint.

    Returns
    -------
    array of shape (p,)

    Raises
    ------
    ArgumentTypeError
        ``model`` is not a torch module, or J is not a JacobianBlocks or ShardedJacobian (e.g. an AutogradJacobian).
    SignatureError
        J has no weights fingerprint (built by hand, or loaded from an old archive), ``model`` lacks one of J's
        parameters or has it in another shape, or its weights are not those J was exported at (J's weights
        fingerprint differs): θ̂ must be the point J linearizes around.
    """
    _check_model(model)
    if not isinstance(J, (JacobianBlocks, ShardedJacobian)):
        found = ("an AutogradJacobian, which reads the model's current weights at every product and records none"
                 if isinstance(J, JacobianShape) else describe(J))
        raise ArgumentTypeError(f"J must be a JacobianBlocks or ShardedJacobian from export_jacobian, got {found}; "
                                "build θ̂ yourself in J.param_names order if you need it for another operator")
    if J.weights_fingerprint is None:
        raise SignatureError("θ̂ cannot be checked against J: J has no weights fingerprint (it was built by hand or "
                             "loaded from an archive written before fingerprints, not returned by export_jacobian); "
                             "export J again with export_jacobian, or build θ̂ yourself by concatenating the flattened "
                             "parameters in J.param_names order")
    named = dict(model.named_parameters())
    for name, shape in zip(J.param_names, J.param_shapes):
        if name not in named or tuple(named[name].shape) != tuple(shape):
            found = "missing" if name not in named else f"of shape {tuple(named[name].shape)}"
            raise SignatureError(f"J has parameter {name!r} of shape {tuple(shape)} but the model's is {found}: "
                                 "pass the network J was exported from")
    selected = [(name, named[name]) for name in J.param_names]
    if _weights_fingerprint(model, selected) != J.weights_fingerprint:
        raise SignatureError("the model's weights are not those J was exported at (its weights fingerprint differs): "
                             "θ̂ must be the point J linearizes around; export J again or restore the weights")
    theta = _torch().cat([p.detach().reshape(-1) for _, p in selected]).cpu().numpy()
    return J.backend.asarray(theta.astype(J.dtype, copy=False))


# ----- the public entry point ---------------------------------------------------------------------------------------

def export_jacobian(model: Any, inputs: Any, *, params: Any = None, outputs: Any = None, backend: Any = "numpy",
                    batch_size: int | None = None, dtype: Any = None, structure: str = "auto",
                    memory_budget: float | None = None, storage_dir: Any = None,
                    progress: bool = False) -> JacobianBlocks:
    """Export the Jacobian of a torch network at ``inputs`` as blocks on NumPy or CuPy, with f₀ = model(inputs).

    Parameters
    ----------
    model : torch.nn.Module
        The trained network, mapping inputs of shape (b, ...) to outputs of shape (b, ...) (flattened per example to
        c_total outputs). It runs in eval mode; its training flags and its buffers' values are restored afterwards;
        its Parameter objects (tied ones too), their values and ``.grad`` are left untouched. Examples are treated
        independently (each is its own batch of one inside ``torch.func.vmap``).
    inputs : torch.Tensor of shape (n, ...), or a dask array
        On the model's device; a floating tensor must have the model's dtype (NumPy/CuPy arrays share their memory;
        a NumPy array with negative strides is copied). Complex inputs are refused.
        A dask array (chunked by rows; other axes are rechunked whole) gives a
        :class:`~lingp_core.sharded.ShardedJacobian`: with a running ``dask.distributed`` Client, each row chunk is
        exported on a worker and kept there (one shard per chunk); without one, dask's default scheduler computes the
        inputs and the export is the in-memory one.
    params : None, "last_layer", str, module, parameter, callable or a list of these
        Which parameters form the columns of J. None: all with ``requires_grad=True``. ``"last_layer"``: the trainable
        parameters of the module whose forward finishes last. A string is an exact parameter name or a module prefix
        (``"head"`` selects ``head.weight`` and ``head.bias``); a callable is a predicate ``(name, param) -> bool``.
        Frozen parameters (``requires_grad=False``) are included only when named exactly (full name or the parameter
        object). Columns always follow the model's ``named_parameters`` order.
    outputs : None, int, slice or sequence of int
        Which of the c_total flattened outputs form the rows (default all), in the order given; e.g. ``outputs=[0]``
        for the mean of a network that outputs [mean, raw variance].
    backend : {"numpy", "cupy", "auto"} or Backend
        Where the arrays go. It must match the model's device (NumPy: CPU, CuPy: CUDA); ``"auto"`` follows it.
        Arrays come from torch through DLPack: no host round trip for a CUDA model, no copy of a batch for a CPU one.
    batch_size : int, optional
        Examples per vmapped pass. Default: as many as fit in the memory budget, at most 1024.
    dtype : {None, "float32", "float64"} or numpy/torch dtype
        dtype of the exported arrays. Default: the model's parameter dtype. A different dtype is an explicit cast:
        blocks are computed in the model's dtype and cast as they are stored (e.g. float32 blocks of a float64 net).
    structure : {"auto", "factored", "dense"}
        ``"auto"``: plain ``nn.Linear`` layers become :class:`FactoredLinearBlock` (layer inputs A and output
        sensitivities Δ, never the n·c × in·out block) when that is exact and smaller; ``"factored"``: whenever
        exact; ``"dense"``: every block dense (the cross-check). Other layers are always dense, and so is a Linear
        layer with a forward hook of its own or a global one (the hook may change its output).
    memory_budget : float, optional
        Bytes the export may allocate (stored blocks plus per-batch work space). Default: a safe fraction of the
        free memory where the backend keeps its arrays. Everything is estimated before anything is allocated.
    storage_dir : path, optional
        Keep dense blocks on disk as ``.npy`` memmaps in a fresh subdirectory of this directory (NumPy backend only,
        for out-of-core use); they do not count against ``memory_budget``. The subdirectory is
        ``JacobianBlocks.storage_path``; delete it when done.
    progress : bool
        Show a tqdm progress bar over examples.

    Returns
    -------
    JacobianBlocks (or ShardedJacobian for dask inputs on a cluster)
        ``f0`` of shape (n, c) and the blocks of J (n·c × p), rows example-major (row ``i*c + k``: example i,
        output k), columns in ``param_names`` order.

    Raises
    ------
    ValueRangeError
        No parameters selected, or an output index out of range.
    ArgumentTypeError, ShapeError, DTypeError
        Inputs of the wrong type (also masked, sparse or nested arrays), shape or dtype (also complex or non-numeric)
        for the model; an unsupported dtype; ``params`` of the wrong type.
    ExportError
        A model with uninitialized lazy parameters (run one forward pass first), or one torch.func.vmap cannot run.
    BackendMismatchError
        Model and backend (or inputs) on different devices.
    NonFiniteError
        NaN/Inf in the inputs, the outputs f₀ or a Jacobian block (naming the block and the first bad example).
    MemoryBudgetError
        When the export would exceed ``memory_budget``; the message gives the numbers and the ways out.

    Notes
    -----
    Results are deterministic on CPU. On CUDA they are as deterministic as torch's kernels, and torch's own TF32
    settings apply: float32 cuDNN convolutions use TF32 by default, which loosens float32 blocks to about 1e-3; turn it
    off (e.g. ``torch.backends.cudnn.allow_tf32 = False``) for true float32.
    """
    torch = _torch()
    device, model_dtype = _check_model(model)
    structure = check_choice(structure, "structure", STRUCTURES)
    if is_dask_array(inputs):
        if storage_dir is not None:
            raise InvalidOptionError("storage_dir is not available for dask inputs: each worker keeps its shard in "
                                     "memory (Dask spills to its own local directory when memory runs short)")
        return export_sharded(model, inputs, {"params": params, "outputs": outputs, "backend": backend,
                                              "batch_size": batch_size, "dtype": dtype, "structure": structure,
                                              "memory_budget": memory_budget, "progress": progress})
    be = _resolve_backend(backend, device)
    x = _as_input_tensor(inputs, device, model_dtype)
    out_dtype = _resolve_dtype(dtype, model_dtype)
    if batch_size is not None:
        batch_size = check_int(batch_size, "batch_size", minimum=1)
    if storage_dir is not None and be.name != "numpy":
        raise InvalidOptionError("storage_dir keeps dense blocks in np.memmap files on the host; it needs "
                                 "backend='numpy'")
    budget = resolve_memory_budget(memory_budget, be)
    n = int(x.shape[0])
    bar = progress_bar(n, enabled=bool(progress), desc="export_jacobian", unit="example")  # tqdm missing: fail early
    try:
        with _eval_mode(model), _buffers_kept(model), torch.no_grad(), warnings.catch_warnings():
            # torch announces, once per thread, that it makes the CUDA primary context current for cuBLAS (CuPy may
            # have created it): an initialization notice, not a problem with the export
            warnings.filterwarnings("ignore", message="Attempting to run cuBLAS, but there was no current CUDA context")
            return _export(model, x, params, outputs, structure, out_dtype, batch_size, budget, storage_dir, be,
                           device, model_dtype, bar)
    finally:
        bar.close()


def check_sharded_export(model: Any, first: Any, params: Any, outputs: Any, dtype: Any, batch_size: Any,
                         memory_budget: Any) -> None:
    """The checks of :func:`export_jacobian` that do not depend on a worker, run on the client before any shard is
    exported, on the inputs' first example ``first`` (shape (1, ...), as the workers receive it): the options, the
    inputs' type, dtype and device, and the parameter and output selections (one forward pass). A bad option then
    fails once, here, instead of in every shard. The backend and the default memory budget are the workers' own."""
    torch = _torch()
    device, model_dtype = _check_model(model)
    _resolve_dtype(dtype, model_dtype)
    if batch_size is not None:
        check_int(batch_size, "batch_size", minimum=1)
    if memory_budget is not None:
        check_positive(memory_budget, "memory_budget")
    x = _as_input_tensor(first, device, model_dtype)
    with _eval_mode(model), _buffers_kept(model), torch.no_grad():
        probe = _probe_model(model, x)
    _select_parameters(model, params, probe)
    _select_outputs(outputs, probe.n_outputs)


def _export(model: Any, x: Any, params: Any, outputs: Any, structure: str, out_dtype: np.dtype,
            batch_size: int | None, budget: int, storage_dir: Any, be: Backend, device: Any, model_dtype: Any,
            bar: Any) -> JacobianBlocks:
    """Probe, select, plan, check memory, allocate, fill (eval mode and no_grad are set by the caller)."""
    torch = _torch()
    n = int(x.shape[0])
    probe = _probe_model(model, x[:1])
    selected = _select_parameters(model, params, probe)
    index = _select_outputs(outputs, probe.n_outputs)
    c = len(index)
    plans = _plan_blocks(model, selected, probe, structure, c)
    memory = _plan_memory(plans, n, c, probe, out_itemsize=out_dtype.itemsize,
                          model_itemsize=torch.empty((), dtype=model_dtype).element_size(),
                          on_disk=storage_dir is not None, batch_size=batch_size, budget=budget, backend=be,
                          structure=structure)
    storage_path = None if storage_dir is None else _disk_directory(storage_dir, memory.disk, be)
    f0, stores = _allocate(plans, n, c, out_dtype, be, storage_path)
    all_outputs = index == tuple(range(probe.n_outputs))
    _fill(model, x, plans, stores, f0, None if all_outputs else index, memory.batch_size, be, device,
          model_dtype, bar)
    blocks = [_make_block(pl, store, c, be) for pl, store in zip(plans, stores)]
    return JacobianBlocks(f0, blocks, backend=be, outputs=index, storage_path=storage_path,
                          weights_fingerprint=_weights_fingerprint(model, selected))


def _allocate(plans: list[_Plan], n: int, c: int, dtype: np.dtype, be: Backend,
              storage_path: str | None) -> tuple[Any, list[tuple]]:
    """f0 (n, c) and, per block, (values,) for dense or (A, Δ) for factored, preallocated in ``dtype``."""
    xp = be.xp
    f0 = xp.empty((n, c), dtype=dtype)
    stores: list[tuple] = []
    for k, pl in enumerate(plans):
        if pl.kind == "dense":
            shape = (n * c, pl.p)
            if storage_path is None:
                stores.append((xp.empty(shape, dtype=dtype),))
            else:
                safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in (pl.owner or "model"))
                path = os.path.join(storage_path, f"block{k:03d}_{safe}.npy")
                stores.append((np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape),))
        else:
            A = xp.empty((n, pl.T, pl.m), dtype=dtype)
            if pl.has_bias or not pl.has_weight:
                A[:, :, pl.m - 1] = 1  # the bias's "input"
            stores.append((A, xp.empty((n, c, pl.T, pl.out_features), dtype=dtype)))
    return f0, stores


def _fill(model: Any, x: Any, plans: list[_Plan], stores: list[tuple], f0: Any, index: tuple[int, ...] | None,
          batch_size: int, be: Backend, device: Any, model_dtype: Any, bar: Any) -> None:
    """Run the batched per-example Jacobians and write every batch into the preallocated arrays."""
    batch_fn, capture = _make_batch_fn(model, plans, index, device, model_dtype)
    n, c = f0.shape
    handles = [model.get_submodule(pl.owner).register_forward_hook(capture.hook(pl.owner), with_kwargs=True)
               for pl in plans if pl.kind == "factored"]
    try:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            f, dense, deltas, inputs = _run_batch(batch_fn, x[start:stop])
            f = be.asarray(f)
            _check_batch(f, "the network outputs f0", start, n, be.xp)
            slot = 0
            for pl, store in zip(plans, stores):
                if pl.kind == "dense":
                    _write_dense(pl, store[0], dense, start, stop, c, n, be)
                else:
                    slot = _write_factored(pl, store, deltas, inputs, slot, start, stop, c, n, be)
            f0[start:stop] = f
            bar.update(stop - start)
    finally:
        for h in handles:
            h.remove()
    for store in stores:
        if isinstance(store[0], np.memmap):
            store[0].flush()


def _run_batch(batch_fn: Callable, xb: Any) -> tuple:
    """One vmapped batch; a failure of torch.func (the model ran fine on one example in the probe) → ExportError."""
    try:
        return batch_fn(xb)
    except (LingpError, MemoryError):
        raise
    except Exception as exc:
        if "out of memory" in str(exc).lower():  # torch's CUDA OOM is a RuntimeError: not a vmap problem
            raise
        raise _vmap_failure(exc) from exc


def _vmap_failure(exc: Exception) -> ExportError:
    """The error for a model torch.func.vmap cannot run per example, quoting torch briefly."""
    said = " ".join(str(exc).split())
    said = said if len(said) <= 240 else said[:240] + "…"
    if "would mutate a captured Tensor" in said:
        cause = ("the network changes a buffer or another tensor outside the example in place during forward (a "
                 "counter, a running average: `self.count += 1`); per-example Jacobians cannot, and the buffers were "
                 "restored: compute such state outside forward")
    elif "modified by an inplace operation" in said:
        cause = ("the network changes in place a tensor that its gradient needs (e.g. `h += layer(h)`, "
                 "`relu_(h)`, `h.mul_(3)` in forward): write those operations out of place (`h = h + layer(h)`)")
    else:
        cause = ("the network most likely has data-dependent Python control flow (e.g. `if x.sum() > 0:` in "
                 "forward), calls .item() or .tolist() on a tensor, or uses another operation vmap does not support")
    return ExportError("exporting failed inside torch.func.vmap (the per-example Jacobians) although the model ran on "
                       f"one example: {cause}. torch said: {type(exc).__name__}: {said}. Use "
                       "lingp_core.AutogradJacobian(model, inputs, batch_size=1) instead: a matrix-free Jacobian "
                       "(J V, Jᵀ U by torch.func jvp/vjp on whole batches, no vmap over examples; batch_size=1 runs "
                       "each example as its own batch, as export does), usable with fisher() and matrix-free solvers")


def _block_label(pl: _Plan) -> str:
    return f"the Jacobian block of {', '.join(pl.names)}"


def _write_dense(pl: _Plan, values: Any, dense: dict, start: int, stop: int, c: int, n: int, be: Backend) -> None:
    col = 0
    for name in pl.names:
        jac = be.asarray(dense[name])  # (b, c, *shape)
        _check_batch(jac, f"{_block_label(pl)} (parameter {name})", start, n, be.xp)
        width = int(np.prod(jac.shape[2:], dtype=np.int64))
        values[start * c: stop * c, col: col + width] = jac.reshape((stop - start) * c, width)
        col += width


def _write_factored(pl: _Plan, store: tuple, deltas: tuple, inputs: tuple, slot: int, start: int, stop: int, c: int,
                    n: int, be: Backend) -> int:
    A, delta = store
    b = stop - start
    t0 = 0
    for T_call in pl.call_T:
        d = be.asarray(deltas[slot]).reshape(b, c, T_call, pl.out_features)
        _check_batch(d, f"{_block_label(pl)} (factored: output sensitivities Δ)", start, n, be.xp)
        delta[start:stop, :, t0: t0 + T_call, :] = d
        if pl.has_weight:
            a = be.asarray(inputs[slot]).reshape(b, T_call, pl.in_features)
            _check_batch(a, f"{_block_label(pl)} (factored: layer inputs A)", start, n, be.xp)
            A[start:stop, t0: t0 + T_call, : pl.in_features] = a
        t0 += T_call
        slot += 1
    return slot


def _make_block(pl: _Plan, store: tuple, c: int, be: Backend) -> Any:
    """The block of a filled store; its values were checked for NaN/Inf batch by batch (_check_batch)."""
    if pl.kind == "dense":
        return DenseBlock._trusted(pl.names, pl.shapes, store[0], c, be.xp)
    return FactoredLinearBlock._trusted(pl.names, pl.shapes, store[0], store[1], has_weight=pl.has_weight,
                                        has_bias=pl.has_bias, xp=be.xp)

