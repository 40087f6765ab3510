"""What every backend shares: the Backend interface and the code that is the same on NumPy and CuPy.

A Backend subclass holds only what NumPy and CuPy do not share (linalg extras, transfers, synchronization,
memory queries); everything else the core does through ``backend.xp``, the array module.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np

from backends._triangles import fill_lower


class MemoryInfo(NamedTuple):
    """Free memory in bytes. ``device`` is None for a host-only backend."""

    host: int
    device: int | None

    @property
    def arrays(self) -> int:
        """Free bytes where this backend allocates its arrays (the device if there is one, else the host)."""
        return self.host if self.device is None else self.device


def host_free_bytes() -> int:
    """Bytes the host can still hand out: MemAvailable from /proc/meminfo, else free physical pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def is_torch_tensor(x: Any) -> bool:
    """True for a torch.Tensor, decided without importing torch."""
    return any(c.__module__ == "torch" and c.__name__ == "Tensor" for c in type(x).__mro__)


def is_cupy_array(x: Any) -> bool:
    """True for a cupy.ndarray, decided without importing cupy."""
    return any(c.__module__.startswith("cupy") and c.__name__ == "ndarray" for c in type(x).__mro__)


def torch_to_dlpack_ready(t: Any) -> Any:
    """A torch tensor that DLPack can export: detached from autograd (no copy), else a clear error."""
    t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    name = str(t.dtype).removeprefix("torch.")
    if name in ("bfloat16",) or name.startswith("float8") or name.startswith("complex32"):
        from lingp_core._validate import DTypeError  # here: lingp_core imports backends

        raise DTypeError(f"torch tensor of dtype {t.dtype} (shape {tuple(t.shape)}) has no NumPy/CuPy equivalent; "
                         "convert it explicitly, e.g. tensor.to(torch.float32)")
    return t


class Backend:
    """An array backend: its array module ``xp`` plus the operations NumPy and CuPy do not share.

    Attributes
    ----------
    name : str
        "numpy" or "cupy".
    xp : module
        The array module (numpy or cupy).
    float_dtypes : tuple of numpy.dtype
        The floating dtypes the core computes in (float32, float64).
    budget_fraction : float
        The share of free memory a default memory budget takes (host: half, the host being shared with the system,
        other processes and the caller's own arrays, and swapping worse than failing; a device says its own).
    """

    name: str = ""
    xp: Any = None
    float_dtypes: tuple[np.dtype, ...] = (np.dtype(np.float32), np.dtype(np.float64))
    budget_fraction: float = 0.5

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Backend) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    # ----- arrays -------------------------------------------------------------------------------------
    def asarray(self, x: Any, dtype: Any = None) -> Any:
        """x as an array of this backend.

        torch tensors come through DLPack, sharing memory when the tensor already lives where this backend
        keeps its arrays. With ``dtype=None`` the dtype is kept as it is; a given dtype is an explicit cast.
        """
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        """A NumPy array on the host (a copy for device arrays, no copy for NumPy arrays)."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for all queued work (a no-op on the host)."""

    def free_memory(self) -> MemoryInfo:
        """Free memory in bytes on the host and, for a device backend, on the device."""
        raise NotImplementedError

    # ----- linalg extras ------------------------------------------------------------------------------
    def cholesky(self, a: Any, *, overwrite: bool = False) -> Any:
        """Lower Cholesky factor L of an SPD (n, n) matrix, a = L Lᵀ (only its lower triangle is read). Raises
        numpy.linalg.LinAlgError if not PD. ``overwrite=True`` lets the factorization reuse a's memory (a is then
        undefined, also on failure)."""
        raise NotImplementedError

    def cholesky_lower_in_place(self, a: Any) -> None:
        """Factor the SPD matrix held in the lower triangle (and diagonal) of the C-ordered (n, n) array ``a`` in
        place: L (A = L Lᵀ) is written over that lower triangle, and a's strict upper triangle is neither read nor
        changed, so it can keep another matrix. Raises numpy.linalg.LinAlgError if not PD (the lower triangle is
        then undefined).

        This generic form factors a symmetric copy and writes L back: with ``cholesky``'s own copy that is two n × n
        temporaries; a backend that can run LAPACK in place overrides it."""
        xp = self.xp
        symmetric = a.copy()
        fill_lower(symmetric.T, symmetric.T, 1.0, xp)  # the transpose's lower triangle is the copy's upper one
        factor = self.cholesky(symmetric, overwrite=True)
        del symmetric
        xp.copyto(a, factor, where=xp.tri(a.shape[0], dtype=bool))

    def solve_triangular(self, a: Any, b: Any, *, lower: bool = True, trans: bool = False) -> Any:
        """Solve a x = b (or aᵀ x = b with ``trans=True``) for triangular (n, n) a and b of shape (n,) or (n, k)."""
        raise NotImplementedError

    def cho_solve(self, lower_factor: Any, b: Any) -> Any:
        """Solve (L Lᵀ) x = b given the lower Cholesky factor L (n, n); b is (n,) or (n, k)."""
        y = self.solve_triangular(lower_factor, b, lower=True)
        return self.solve_triangular(lower_factor, y, lower=True, trans=True)

    def eigh(self, a: Any) -> tuple[Any, Any]:
        """Eigenvalues (ascending, (n,)) and eigenvectors ((n, n), columns) of a symmetric (n, n) matrix."""
        return self.xp.linalg.eigh(a)

    def qr(self, a: Any) -> tuple[Any, Any]:
        """Reduced QR of an (m, n) matrix: Q (m, min(m, n)) with orthonormal columns, R (min(m, n), n)."""
        return self.xp.linalg.qr(a, mode="reduced")

    def svd(self, a: Any) -> tuple[Any, Any, Any]:
        """Thin SVD of an (m, n) matrix: U (m, r), s (r,) descending, Vh (r, n), r = min(m, n)."""
        return self.xp.linalg.svd(a, full_matrices=False)

    def eigh_tridiagonal(self, diagonal: Any, off_diagonal: Any) -> tuple[Any, Any]:
        """Eigenpairs of the symmetric tridiagonal matrix with diagonal (k,) and off-diagonal (k-1,).

        Tridiagonal problems are small (k is a Lanczos depth), so they are solved on the host in float64 by
        scipy and the eigenvalues (k,) and eigenvectors (k, k) come back in float64 on this backend.
        """
        import scipy.linalg

        d = np.asarray(self.to_numpy(diagonal), dtype=np.float64)
        e = np.asarray(self.to_numpy(off_diagonal), dtype=np.float64)
        if d.size == 1:
            w, v = d.copy(), np.ones((1, 1))
        else:
            w, v = scipy.linalg.eigh_tridiagonal(d, e, check_finite=True)
        return self.asarray(w), self.asarray(v)
