"""The backend registry, transfers and the linalg extras, against scipy in float64."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

import backends
import lingp_core
from tests.helpers import assert_matches, spd_matrix, tolerance

# ----- registry ---------------------------------------------------------------------------------------------------

def test_unknown_backend_name_lists_the_valid_ones():
    with pytest.raises(lingp_core.InvalidOptionError, match=r"unknown backend 'jax'.*'numpy', 'cupy', 'auto'"):
        backends.get_backend("jax")


def test_available_backends_lists_numpy_usable_and_cupy_with_a_reason():
    statuses = {s.name: s for s in backends.available_backends()}
    assert set(statuses) == {"numpy", "cupy"}
    assert statuses["numpy"].usable
    cupy_status = statuses["cupy"]
    assert cupy_status.reason == "usable" if cupy_status.usable else cupy_status.reason.startswith("cupy ")


def test_unusable_cupy_raises_with_its_reason():
    cupy_status = {s.name: s for s in backends.available_backends()}["cupy"]
    if cupy_status.usable:
        pytest.skip("cupy is usable here")
    with pytest.raises(lingp_core.MissingDependencyError, match="backend 'cupy' is not usable: cupy "):
        backends.get_backend("cupy")


def test_auto_is_cupy_exactly_when_cupy_is_usable():
    cupy_usable = {s.name: s.usable for s in backends.available_backends()}["cupy"]
    assert backends.get_backend("auto").name == ("cupy" if cupy_usable else "numpy")


def test_get_backend_of_an_array_and_of_a_backend(backend):
    x = backend.xp.zeros(3)
    assert backends.get_backend(x) is backend
    assert backends.get_backend(backend) is backend
    assert backends.infer(x, None, 2.0) is backend


def test_infer_without_arrays_is_numpy():
    assert backends.infer().name == "numpy"
    assert backends.infer(None, 1.5, [1.0, 2.0]).name == "numpy"


def test_mixed_numpy_and_cupy_arrays_raise_type_error_naming_both(cupy_backend):
    host, device = np.zeros(3), cupy_backend.xp.zeros(3)
    with pytest.raises(lingp_core.BackendMismatchError, match=r"numpy\.ndarray.*cupy.*ndarray"):
        backends.infer(host, device)


def test_mixing_is_detected_from_the_array_type_alone():
    # A stand-in type from a module named like CuPy's: the dispatch logic, runnable without a GPU.
    stand_in = type("ndarray", (), {"__module__": "cupy._core.core"})
    expected = r"argument 0: numpy\.ndarray \(numpy\), argument 1: cupy\._core\.core\.ndarray"
    with pytest.raises(lingp_core.BackendMismatchError, match=expected):
        backends.infer(np.zeros(2), stand_in())


def test_torch_tensor_on_an_unsupported_device_raises():
    with pytest.raises(lingp_core.BackendMismatchError, match="device meta"):
        backends.infer(torch.zeros(2, device="meta"))


# ----- transfers --------------------------------------------------------------------------------------------------

def test_cpu_torch_tensor_becomes_a_numpy_array_without_a_copy():
    nb = backends.get_backend("numpy")
    t = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    a = nb.asarray(t)
    assert isinstance(a, np.ndarray) and a.dtype == np.float64 and a.shape == (2, 3)
    assert a.ctypes.data == t.data_ptr()
    t[0, 0] = 42.0
    assert a[0, 0] == 42.0


def test_tensor_that_requires_grad_is_detached_not_copied():
    nb = backends.get_backend("numpy")
    t = torch.ones(4, dtype=torch.float32, requires_grad=True)
    a = nb.asarray(t)
    assert a.dtype == np.float32 and a.ctypes.data == t.data_ptr()


def test_tensor_without_numpy_dtype_raises_naming_it(backend):
    with pytest.raises(lingp_core.DTypeError, match=r"torch\.bfloat16 \(shape \(3,\)\)"):
        backend.asarray(torch.ones(3, dtype=torch.bfloat16))


def test_asarray_keeps_the_dtype_unless_one_is_given(backend):
    x32 = np.ones(3, dtype=np.float32)
    assert backend.asarray(x32).dtype == np.float32
    assert backend.asarray(x32, dtype=np.float64).dtype == np.float64
    assert backend.asarray(torch.ones(2, dtype=torch.float32)).dtype == np.float32


def test_cuda_torch_tensor_becomes_a_cupy_array_without_a_copy(cupy_backend):
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device here")
    t = torch.arange(5, dtype=torch.float32, device="cuda")
    a = cupy_backend.asarray(t)
    assert isinstance(a, cupy_backend.xp.ndarray) and a.data.ptr == t.data_ptr()


def test_to_numpy_and_back(backend, rng):
    x = rng.standard_normal((4, 3))
    on_backend = backend.asarray(x)
    assert isinstance(on_backend, backend.xp.ndarray)
    back = backend.to_numpy(on_backend)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, x)


def test_free_memory_and_synchronize(backend):
    backend.synchronize()
    info = backend.free_memory()
    assert isinstance(info.host, int) and info.host > 0
    if backend.name == "numpy":
        assert info.device is None and info.arrays == info.host
    else:
        assert isinstance(info.device, int) and info.device > 0 and info.arrays == info.device


def test_float_dtypes(backend):
    assert backend.float_dtypes == (np.dtype(np.float32), np.dtype(np.float64))


# ----- linalg extras against scipy, float64 -----------------------------------------------------------------------

N = 40


def test_cholesky_and_cho_solve_match_scipy(backend, rng):
    a = spd_matrix(rng, N, condition=1e4)
    b = rng.standard_normal((N, 3))
    lower = backend.cholesky(backend.asarray(a))
    assert_matches(lower, scipy.linalg.cholesky(a, lower=True), backend, dtype=np.float64)
    x = backend.cho_solve(lower, backend.asarray(b))
    assert_matches(x, scipy.linalg.cho_solve((scipy.linalg.cholesky(a, lower=True), True), b), backend,
                   dtype=np.float64, rtol=tolerance(np.float64, 1e4 * 10))


def test_cholesky_of_an_indefinite_matrix_raises(backend, rng):
    a = spd_matrix(rng, N)
    a[0, 0] = -1.0
    with pytest.raises(np.linalg.LinAlgError):
        backend.cholesky(backend.asarray(a))


def test_numpy_cholesky_in_place_writes_the_factor_or_restores_the_matrix(rng, monkeypatch):
    """overwrite=True on NumPy: the factor (strict upper triangle cleared) in a's memory; a failed attempt restores a
    from its untouched strict upper triangle and its saved diagonal (exactly a when a is exactly symmetric). Tiles of
    7 rows make the clearing and restoring passes cross tile edges."""
    from backends import _triangles

    monkeypatch.setattr(_triangles, "TILE", 7)
    be = backends.get_backend("numpy")
    a = spd_matrix(rng, N, condition=1e4)
    work = a.copy()
    lower = be.cholesky(work, overwrite=True)
    assert np.shares_memory(lower, work)
    np.testing.assert_allclose(lower, scipy.linalg.cholesky(a, lower=True), rtol=0, atol=1e-12 * np.abs(a).max())
    assert np.all(np.triu(lower, 1) == 0)
    bad = a.copy()
    bad[N // 2, N // 2] = -1.0
    mirrored = np.triu(bad) + np.triu(bad, 1).T  # symmetric to the last bit (spd_matrix is only to rounding)
    for matrix, restored in ((bad, mirrored), (mirrored, mirrored)):
        work = matrix.copy()
        with pytest.raises(np.linalg.LinAlgError):
            be.cholesky(work, overwrite=True)
        assert np.array_equal(work, restored)


@pytest.mark.parametrize("generic", [False, True])
def test_cholesky_lower_in_place_factors_the_lower_triangle_and_keeps_the_upper(backend, rng, monkeypatch, generic):
    """L over a's lower triangle and diagonal from that triangle alone (the upper one holds something else); the
    strict upper triangle is not changed. ``generic``: the Backend base form (a symmetric copy mirrored in tiles of
    7 rows, L written back)."""
    from backends import _triangles
    from backends._base import Backend

    monkeypatch.setattr(_triangles, "TILE", 7)

    factor = (lambda x: Backend.cholesky_lower_in_place(backend, x)) if generic else backend.cholesky_lower_in_place
    a = spd_matrix(rng, N, condition=1e4)
    other = rng.standard_normal((N, N))
    work = np.tril(a) + np.triu(other, 1)
    arr = backend.asarray(work)
    factor(arr)
    got = backend.to_numpy(arr)
    np.testing.assert_allclose(np.tril(got), scipy.linalg.cholesky(a, lower=True), rtol=0,
                               atol=1e-12 * np.abs(a).max())
    assert np.array_equal(np.triu(got, 1), np.triu(other, 1))
    indefinite = np.tril(a) - 2 * np.abs(a).max() * np.eye(N)
    with pytest.raises(np.linalg.LinAlgError):
        factor(backend.asarray(indefinite))


@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("trans", [False, True])
def test_solve_triangular_matches_scipy(backend, rng, lower, trans):
    t = np.tril(rng.standard_normal((N, N))) + N * np.eye(N)
    t = t if lower else t.T
    b = rng.standard_normal((N, 2))
    expected = scipy.linalg.solve_triangular(t, b, lower=lower, trans=1 if trans else 0)
    got = backend.solve_triangular(backend.asarray(t), backend.asarray(b), lower=lower, trans=trans)
    assert_matches(got, expected, backend, dtype=np.float64)


def test_eigh_matches_scipy(backend, rng):
    a = spd_matrix(rng, N, condition=1e3)
    w, v = backend.eigh(backend.asarray(a))
    w_ref, v_ref = scipy.linalg.eigh(a)
    assert_matches(w, w_ref, backend, dtype=np.float64)
    v_np = backend.to_numpy(v)
    np.testing.assert_allclose(np.abs(np.sum(v_np * v_ref, axis=0)), 1.0, atol=1e-9)  # same vectors up to sign


def test_qr_matches_scipy(backend, rng):
    a = rng.standard_normal((N, 7))
    q, r = backend.qr(backend.asarray(a))
    q_ref, r_ref = scipy.linalg.qr(a, mode="economic")
    signs = np.sign(np.diag(backend.to_numpy(r))) * np.sign(np.diag(r_ref))  # QR is unique up to column signs
    assert_matches(q, q_ref * signs, backend, dtype=np.float64)
    assert_matches(r, r_ref * signs[:, None], backend, dtype=np.float64)


def test_svd_matches_scipy(backend, rng):
    a = rng.standard_normal((N, 9))
    u, s, vh = backend.svd(backend.asarray(a))
    u_ref, s_ref, vh_ref = scipy.linalg.svd(a, full_matrices=False)
    assert_matches(s, s_ref, backend, dtype=np.float64)
    assert u.shape == (N, 9) and vh.shape == (9, 9)
    reconstructed = backend.to_numpy((u * s) @ vh)
    np.testing.assert_allclose(reconstructed, a, atol=tolerance(np.float64) * np.abs(a).max())
    np.testing.assert_allclose(np.abs(np.sum(backend.to_numpy(vh) * vh_ref, axis=1)), 1.0, atol=1e-9)


def test_eigh_tridiagonal_matches_dense_eigh_in_float64(backend, rng, dtype):
    d = rng.standard_normal(12).astype(dtype)
    e = rng.standard_normal(11).astype(dtype)
    w, v = backend.eigh_tridiagonal(backend.asarray(d), backend.asarray(e))
    dense = np.diag(d.astype(np.float64)) + np.diag(e.astype(np.float64), 1) + np.diag(e.astype(np.float64), -1)
    w_ref = np.linalg.eigvalsh(dense)
    assert_matches(w, w_ref, backend, dtype=np.float64)
    v_np = backend.to_numpy(v)
    np.testing.assert_allclose(dense @ v_np, v_np * backend.to_numpy(w), atol=1e-12 * np.abs(w_ref).max())


def test_eigh_tridiagonal_of_size_one(backend):
    w, v = backend.eigh_tridiagonal(backend.asarray(np.array([3.0])), backend.asarray(np.zeros(0)))
    assert_matches(w, np.array([3.0]), backend, dtype=np.float64)
    assert_matches(v, np.ones((1, 1)), backend, dtype=np.float64)


def test_numpy_in_place_cholesky_of_an_unaligned_buffer():
    """Arrays deserialized from another process (Dask's out-of-band pickle buffers) can be unaligned; LAPACK then
    works on a copy, and the in-place factorization must still leave the factor in the caller's array."""
    be = backends.get_backend("numpy")
    rng = np.random.default_rng(0)
    B = rng.standard_normal((7, 7))
    A = B @ B.T + 7 * np.eye(7)
    raw = np.zeros(A.size * 8 + 1, dtype=np.uint8)
    a = np.frombuffer(raw[1:].data, dtype=np.float64).reshape(7, 7)
    a[...] = A
    assert not a.flags.aligned
    L = be.cholesky(a, overwrite=True)
    np.testing.assert_allclose(np.tril(L) @ np.tril(L).T, A, rtol=1e-13, atol=1e-13 * np.abs(A).max())
    np.testing.assert_allclose(np.tril(L), np.linalg.cholesky(A), rtol=1e-12, atol=1e-13)
