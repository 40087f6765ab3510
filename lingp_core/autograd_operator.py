"""A matrix-free Jacobian straight from a torch model: J V by ``torch.func.jvp``, Jᵀ U by ``torch.func.vjp``.

Nothing is stored but the model, the inputs and f₀; every product reruns the network (one forward pass per product,
as in the paper's own code). It is the cross-check of :class:`~lingp_core.jacobian.JacobianBlocks` in the tests and
the baseline in the benchmarks, and the way out when even factored blocks do not fit. Torch is imported lazily.
"""
from __future__ import annotations

import warnings
from typing import Any

from lingp_core._validate import check_int
from lingp_core.export import (
    _as_input_tensor,
    _buffers_kept,
    _check_model,
    _eval_mode,
    _functional_call,
    _probe_model,
    _resolve_backend,
    _select_outputs,
    _select_parameters,
)
from lingp_core.jacobian import JacobianShape

__all__ = ["AutogradJacobian"]


class AutogradJacobian(JacobianShape):
    """The Jacobian J (n·c × p) of ``model`` at ``inputs`` as a matrix-free operator with autograd products.

    Parameters
    ----------
    model, inputs, params, outputs, backend
        As for :func:`lingp_core.export_jacobian` (same parameter order, row order and selection rules).
    batch_size : int, optional
        Examples per forward pass (default: all n at once). A network whose forward mixes the examples of a batch
        (``x - x.mean(0)``, BatchNorm in train mode) has a Jacobian that depends on the batch: ``batch_size=1``
        runs each example alone, as :func:`~lingp_core.export_jacobian` does; larger batches give the batch's
        Jacobian (J V off by 100%+ against the per-example one for ``x - x.mean(0)``).
    column_chunk : int, optional
        Columns of V or U pushed through one vmapped jvp/vjp (default: all at once; smaller saves memory).

    Attributes
    ----------
    f0 : array of shape (n, c)
        The network outputs at the inputs, on the backend.
    """

    def __init__(self, model: Any, inputs: Any, *, params: Any = None, outputs: Any = None, backend: Any = "numpy",
                 batch_size: int | None = None, column_chunk: int | None = None) -> None:
        import torch

        device, model_dtype = _check_model(model)
        self.backend = _resolve_backend(backend, device)
        self._model = model
        self._x = _as_input_tensor(inputs, device, model_dtype)
        n = int(self._x.shape[0])
        self._batch = n if batch_size is None else check_int(batch_size, "batch_size", minimum=1)
        self._chunk = None if column_chunk is None else check_int(column_chunk, "column_chunk", minimum=1)
        with _eval_mode(model), _buffers_kept(model), torch.no_grad():
            probe = _probe_model(model, self._x[:1])
            selected = _select_parameters(model, params, probe)
            self.outputs = _select_outputs(outputs, probe.n_outputs)
            self._index = torch.as_tensor(self.outputs, device=device)
            self._primals = {name: p.detach() for name, p in selected}
            f0 = torch.cat([self._f(self._primals, self._x[s: s + self._batch]).reshape(-1, len(self.outputs))
                            for s in range(0, n, self._batch)])
        self.f0 = self.backend.asarray(f0)

    # ----- description -------------------------------------------------------------------------------------------
    @property
    def param_names(self) -> tuple[str, ...]:
        """Parameter names in column order."""
        return tuple(self._primals)

    @property
    def param_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Parameter shapes in column order."""
        return tuple(tuple(p.shape) for p in self._primals.values())

    @property
    def p(self) -> int:
        """Total number of parameters (columns of J)."""
        return sum(int(p.numel()) for p in self._primals.values())

    def __repr__(self) -> str:
        return (f"AutogradJacobian(n={self.n}, c={self.n_outputs}, p={self.p}, dtype={self.dtype}, "
                f"backend={self.backend.name!r})")

    # ----- products ----------------------------------------------------------------------------------------------
    def _f(self, params: dict, xb: Any) -> Any:
        """Selected outputs of a batch, flattened example-major: (b·c,); the model keeps its own Parameter objects."""
        out = _functional_call(self._model, params, (xb,))
        return out.reshape(out.shape[0], -1)[:, self._index].reshape(-1)

    def _operand(self, x: Any, name: str, rows: int) -> tuple[Any, bool]:
        """The checked operand as a 2-D torch tensor sharing its memory (DLPack), and whether it was 1-D."""
        import torch

        arr, vector = super()._operand(x, name, rows)
        return torch.from_dlpack(arr), vector

    def matmat(self, V: Any) -> Any:
        """J V for V of shape (p, k) or (p,) in parameter order: (n·c, k) or (n·c,), by vmapped ``jvp``."""
        import torch
        from torch.func import jvp, vmap

        v, vector = self._operand(V, "V", self.p)
        k = v.shape[1]
        tangents, start = {}, 0
        for name, p in self._primals.items():  # each (k, *shape): one tangent per column
            tangents[name] = v[start: start + p.numel()].T.reshape(k, *p.shape).contiguous()
            start += p.numel()
        rows = []
        with _eval_mode(self._model), _buffers_kept(self._model), torch.no_grad(), warnings.catch_warnings():
            # torch's first forward-mode AD call scripts its jvp decompositions with the deprecated torch.jit.script
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                                    category=DeprecationWarning)
            for s in range(0, self.n, self._batch):
                xb = self._x[s: s + self._batch]

                def push(t: dict, xb: Any = xb) -> Any:
                    return jvp(lambda q: self._f(q, xb), (self._primals,), (t,))[1]

                rows.append(vmap(push, chunk_size=self._chunk)(tangents).T)  # (b·c, k)
        result = self.backend.asarray(torch.cat(rows))
        return result[:, 0] if vector else result

    def rmatmat(self, U: Any) -> Any:
        """Jᵀ U for U of shape (n·c, k) or (n·c,): (p, k) or (p,) in parameter order, by vmapped ``vjp``."""
        import torch
        from torch.func import vjp, vmap

        u, vector = self._operand(U, "U", self.shape[0])
        c = self.n_outputs
        total = None
        with _eval_mode(self._model), _buffers_kept(self._model), torch.no_grad():
            for s in range(0, self.n, self._batch):
                xb = self._x[s: s + self._batch]
                _, pull = vjp(lambda q, xb=xb: self._f(q, xb), self._primals)
                grads = vmap(pull, chunk_size=self._chunk)(u[s * c: (s + xb.shape[0]) * c].T.contiguous())[0]
                part = torch.cat([grads[name].reshape(grads[name].shape[0], -1) for name in self._primals], dim=1)
                total = part if total is None else total + part
        result = self.backend.asarray(total.T.contiguous())
        return result[:, 0] if vector else result

    def gram_matmat(self, U: Any) -> Any:
        """J (Jᵀ U) for U of shape (n·c, k) or (n·c,): the kernel-vector product, one vjp and one jvp pass."""
        return self.matmat(self.rmatmat(U))
