"""The NumPy backend: host arrays, linalg extras from scipy.linalg."""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg

from backends._base import Backend, MemoryInfo, host_free_bytes, is_cupy_array, is_torch_tensor, torch_to_dlpack_ready
from backends._triangles import clear_upper, fill_lower


class NumpyBackend(Backend):
    name = "numpy"
    xp = np

    def asarray(self, x: Any, dtype: Any = None) -> np.ndarray:
        if is_torch_tensor(x):
            t = torch_to_dlpack_ready(x)
            if t.device.type != "cpu":
                t = t.cpu()  # a device → host transfer is a copy by necessity
            x = np.from_dlpack(t)
        elif is_cupy_array(x):
            x = x.get()
        elif isinstance(x, np.ma.MaskedArray):  # np.asarray would drop the mask and expose the values under it
            from lingp_core._validate import refuse_masked

            refuse_masked(x, "the array")
        return np.asarray(x, dtype=dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        return self.asarray(x)

    def free_memory(self) -> MemoryInfo:
        return MemoryInfo(host=host_free_bytes(), device=None)

    def cholesky(self, a: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
        if overwrite and a.flags.c_contiguous and a.dtype in self.float_dtypes:
            return _cholesky_in_place(a, self)
        if a.flags.c_contiguous:  # see cholesky_lower_in_place: through the transpose LAPACK needs no Fortran copy
            return scipy.linalg.cholesky(a.T, lower=False, check_finite=False).T
        return scipy.linalg.cholesky(a, lower=True, check_finite=False)

    def cholesky_lower_in_place(self, a: np.ndarray) -> None:
        if not (a.flags.c_contiguous and a.dtype in self.float_dtypes):
            super().cholesky_lower_in_place(a)
            return
        # C-ordered a is Fortran-ordered aᵀ: potrf on aᵀ's upper triangle reads and writes exactly a's lower one
        potrf = scipy.linalg.get_lapack_funcs("potrf", (a,))
        c, info = potrf(a.T, lower=0, clean=0, overwrite_a=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"the matrix is not positive definite (LAPACK potrf info = {info})")
        if not np.may_share_memory(c, a):  # f2py worked on a copy (an unaligned or foreign buffer): bring it back
            a[...] = c.T

    # LAPACK copies a C-ordered matrix into Fortran order on every call; its transpose is Fortran-ordered already, so
    # triangular work on a C-ordered factor goes through the transpose (the factors of ``cholesky`` are C-ordered)
    def solve_triangular(self, a: np.ndarray, b: np.ndarray, *, lower: bool = True, trans: bool = False) -> np.ndarray:
        if a.flags.c_contiguous and not a.flags.f_contiguous:
            return scipy.linalg.solve_triangular(a.T, b, lower=not lower, trans=0 if trans else 1, check_finite=False)
        return scipy.linalg.solve_triangular(a, b, lower=lower, trans=1 if trans else 0, check_finite=False)

    def cho_solve(self, lower_factor: np.ndarray, b: np.ndarray) -> np.ndarray:
        if lower_factor.flags.c_contiguous and not lower_factor.flags.f_contiguous:
            return scipy.linalg.cho_solve((lower_factor.T, False), b, check_finite=False)
        return scipy.linalg.cho_solve((lower_factor, True), b, check_finite=False)

    def eigh(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return scipy.linalg.eigh(a, check_finite=False)

    def qr(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return scipy.linalg.qr(a, mode="economic", check_finite=False)

    def svd(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        try:
            return scipy.linalg.svd(a, full_matrices=False, check_finite=False)
        except np.linalg.LinAlgError:  # gesdd can fail to converge where the slower gesvd does not
            return scipy.linalg.svd(a, full_matrices=False, check_finite=False, lapack_driver="gesvd")


def _cholesky_in_place(a: np.ndarray, backend: NumpyBackend) -> np.ndarray:
    """L with L Lᵀ = a, written over a (C-ordered, symmetric), its strict upper triangle cleared; on failure a is
    restored from its strict upper triangle, which LAPACK leaves untouched, and its saved diagonal (bit for bit when a
    was exactly symmetric) and numpy.linalg.LinAlgError raised."""
    diagonal = np.diagonal(a).copy()
    try:
        backend.cholesky_lower_in_place(a)
    except np.linalg.LinAlgError:
        fill_lower(a, a, 1.0, np)
        a[np.arange(a.shape[0]), np.arange(a.shape[0])] = diagonal
        raise
    clear_upper(a, np)
    return a
