"""The CuPy backend: device arrays, linalg extras from cupy.linalg and cupyx.scipy.linalg.

cupy is imported when this backend is first made, never at ``import backends``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from backends._base import Backend, MemoryInfo, host_free_bytes, is_torch_tensor, torch_to_dlpack_ready


class CupyBackend(Backend):
    name = "cupy"

    def __init__(self) -> None:
        import cupy
        import cupyx
        import cupyx.scipy.linalg

        self.xp = cupy
        self._cupyx = cupyx
        self._linalg = cupyx.scipy.linalg

    def asarray(self, x: Any, dtype: Any = None) -> Any:
        cp = self.xp
        if is_torch_tensor(x):
            t = torch_to_dlpack_ready(x)
            if t.device.type == "cuda":
                x = cp.from_dlpack(t)  # same device: shares memory
            else:
                x = np.from_dlpack(t.cpu())
        return cp.asarray(x, dtype=dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        return self.xp.asnumpy(x) if isinstance(x, self.xp.ndarray) else np.asarray(x)

    def synchronize(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()

    def free_memory(self) -> MemoryInfo:
        free_device, _total = self.xp.cuda.runtime.memGetInfo()
        pooled = self.xp.get_default_memory_pool().free_bytes()  # held by CuPy's pool but reusable
        return MemoryInfo(host=host_free_bytes(), device=int(free_device + pooled))

    def cholesky(self, a: Any, *, overwrite: bool = False) -> Any:  # cuSOLVER's wrapper always copies
        # cuSOLVER reports failure in an info array that CuPy ignores by default; make it raise.
        with self._cupyx.errstate(linalg="raise"):
            return self.xp.linalg.cholesky(a)

    def solve_triangular(self, a: Any, b: Any, *, lower: bool = True, trans: bool = False) -> Any:
        return self._linalg.solve_triangular(a, b, lower=lower, trans=1 if trans else 0)

    def eigh(self, a: Any) -> tuple[Any, Any]:
        with self._cupyx.errstate(linalg="raise"):
            return self.xp.linalg.eigh(a)

    def svd(self, a: Any) -> tuple[Any, Any, Any]:
        with self._cupyx.errstate(linalg="raise"):
            return self.xp.linalg.svd(a, full_matrices=False)
