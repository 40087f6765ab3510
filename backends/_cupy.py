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
        elif isinstance(x, np.ma.MaskedArray):  # cp.asarray would drop the mask and expose the values under it
            from lingp_core._validate import refuse_masked

            refuse_masked(x, "the array")
        return cp.asarray(x, dtype=dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        return self.xp.asnumpy(x) if isinstance(x, self.xp.ndarray) else np.asarray(x)

    def synchronize(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()

    #: a device's memory is the process's own and running out raises a clean OutOfMemoryError: budgets default to
    #: all free memory (CuPy's pool included) but a 5% headroom for cuBLAS/cuSOLVER workspaces and small arrays
    budget_fraction = 0.95

    def free_memory(self) -> MemoryInfo:
        free_device, _total = self.xp.cuda.runtime.memGetInfo()
        pooled = self.xp.get_default_memory_pool().free_bytes()  # held by CuPy's pool but reusable
        return MemoryInfo(host=host_free_bytes(), device=int(free_device + pooled))

    def cholesky(self, a: Any, *, overwrite: bool = False) -> Any:  # cuSOLVER's wrapper always copies
        # cuSOLVER reports failure in an info array that CuPy ignores by default; make it raise.
        with self._cupyx.errstate(linalg="raise"):
            return self.xp.linalg.cholesky(a)

    def cholesky_lower_in_place(self, a: Any) -> None:
        if not (a.ndim == 2 and a.flags.c_contiguous and a.dtype in self.float_dtypes):
            super().cholesky_lower_in_place(a)
            return
        from cupy.cuda import device
        from cupy_backends.cuda.libs import cublas, cusolver

        n = int(a.shape[0])
        if n == 0:
            return
        if a.dtype == np.float64:
            potrf, buffer_size = cusolver.dpotrf, cusolver.dpotrf_bufferSize
        else:
            potrf, buffer_size = cusolver.spotrf, cusolver.spotrf_bufferSize
        # C-ordered a is Fortran-ordered aᵀ: potrf on aᵀ's upper triangle reads and writes exactly a's lower one, in
        # a's own buffer (peak: a plus cuSOLVER's workspace, instead of the two copies of cupy.linalg.cholesky)
        handle, upper = device.get_cusolver_handle(), cublas.CUBLAS_FILL_MODE_UPPER
        lwork = buffer_size(handle, upper, n, a.data.ptr, n)
        work = self.xp.empty(lwork, dtype=a.dtype)
        info = self.xp.zeros(1, dtype=np.int32)
        potrf(handle, upper, n, a.data.ptr, n, work.data.ptr, lwork, info.data.ptr)
        code = int(info.get()[0])
        if code != 0:
            raise np.linalg.LinAlgError(f"the matrix is not positive definite (cuSOLVER potrf info = {code})")

    # cuBLAS is column-major: a C-ordered factor is the Fortran-ordered transpose, so triangular solves go through
    # it (cupyx would otherwise copy the n × n factor into Fortran order on every call)
    def solve_triangular(self, a: Any, b: Any, *, lower: bool = True, trans: bool = False) -> Any:
        if a.flags.c_contiguous and not a.flags.f_contiguous:
            return self._linalg.solve_triangular(a.T, b, lower=not lower, trans=0 if trans else 1)
        return self._linalg.solve_triangular(a, b, lower=lower, trans=1 if trans else 0)

    def eigh(self, a: Any) -> tuple[Any, Any]:
        with self._cupyx.errstate(linalg="raise"):
            return self.xp.linalg.eigh(a)

    def svd(self, a: Any) -> tuple[Any, Any, Any]:
        with self._cupyx.errstate(linalg="raise"):
            return self.xp.linalg.svd(a, full_matrices=False)
