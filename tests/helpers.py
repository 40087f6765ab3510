"""Assertion and tolerance helpers shared by the tests: every result is checked against a float64 NumPy oracle."""
from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def tolerance(dtype: Any, factor: float = 1000.0) -> float:
    """A relative tolerance derived from the dtype: ``factor`` units of its machine epsilon.

    The default gives ~2e-13 for float64 and ~1e-4 for float32; ill-conditioned checks pass a factor scaled by the
    condition number instead of a hand-picked number.
    """
    return float(factor * np.finfo(np.dtype(dtype)).eps)


def assert_matches(actual: Any, expected: np.ndarray, backend: Any, *, dtype: Any, rtol: float | None = None,
                   atol: float | None = None) -> None:
    """Check array type, dtype, shape and values of ``actual`` against a float64 NumPy oracle ``expected``.

    Tolerances default to :func:`tolerance` of ``dtype``; ``atol`` defaults to ``rtol`` times the oracle's largest
    magnitude, so entries that cancel to ~0 are judged on the scale of the whole result.
    """
    assert isinstance(expected, np.ndarray) and expected.dtype == np.float64, "the oracle must be a float64 NumPy array"
    assert isinstance(actual, backend.xp.ndarray), f"expected a {backend.name} array, got {type(actual)}"
    assert actual.dtype == np.dtype(dtype), f"dtype {actual.dtype}, expected {np.dtype(dtype)}"
    assert tuple(actual.shape) == expected.shape, f"shape {tuple(actual.shape)}, expected {expected.shape}"
    rtol = tolerance(dtype) if rtol is None else rtol
    if atol is None:
        atol = rtol * (float(np.abs(expected).max()) if expected.size else 0.0)
    np.testing.assert_allclose(backend.to_numpy(actual).astype(np.float64), expected, rtol=rtol, atol=atol)


def spd_matrix(rng: np.random.Generator, n: int, condition: float = 100.0) -> np.ndarray:
    """A float64 symmetric positive-definite (n, n) matrix with eigenvalues log-spaced from 1 to ``condition``."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = np.logspace(0.0, np.log10(condition), n)
    return (q * eigenvalues) @ q.T


def data_pointer(x: Any) -> int:
    """Address of the first element of a NumPy or CuPy array (to prove that no copy was made)."""
    return int(x.data.ptr) if hasattr(x.data, "ptr") else int(x.__array_interface__["data"][0])


def spd_with_outliers(rng: np.random.Generator, n: int, condition: float, outliers: int = 10) -> np.ndarray:
    """A float64 SPD (n, n) matrix shaped like a kernel plus noise: ``outliers`` eigenvalues spread log-evenly up to
    ``condition``, the rest clustered near 1 (the noise floor)."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = 1.0 + 0.1 * rng.random(n)
    eigenvalues[:outliers] = np.logspace(np.log10(condition), 1.0, outliers)
    return (q * eigenvalues) @ q.T


def torch_jacobian(model: Any, x: Any, names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Jacobian (n·c, p) and outputs (n, c) of a float64 CPU copy of ``model`` at inputs ``x`` (n, ...), by
    torch.func (jacrev per example under vmap): the oracle for benchmark runs, independent of lingp's export.

    ``names`` selects parameters (default: all that require gradients), columns in the model's parameter order.
    """
    import copy

    import torch

    m64 = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    x64 = torch.as_tensor(x).detach().cpu().double()
    wanted = [k for k, prm in m64.named_parameters() if prm.requires_grad] if names is None else list(names)
    params = {k: prm.detach() for k, prm in m64.named_parameters() if k in wanted}

    def f(p: dict, xi: Any) -> Any:
        return torch.func.functional_call(m64, p, (xi.unsqueeze(0),)).reshape(-1)

    with torch.no_grad():
        jac = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, x64)  # {name: (n, c, *shape)}
        J = torch.cat([jac[k].reshape(jac[k].shape[0] * jac[k].shape[1], -1) for k in params], dim=1)
        out = torch.func.functional_call(m64, params, (x64,)).reshape(x64.shape[0], -1)
    return J.numpy(), out.numpy()


def run_alongside(command: Sequence[str], work: Callable[[], Any], *, timeout: float = 300,
                  **popen_kwargs: Any) -> tuple[subprocess.CompletedProcess, Any]:
    """Run ``command`` (text output captured) while ``work()`` computes an oracle in this process, so that the oracle
    adds no wall time on a machine with two cores; the process is killed if ``work`` fails."""
    proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs)
    try:
        value = work()
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(list(command), proc.returncode, stdout, stderr), value


def dense_gp_posterior(J, f0, Js, f0s, y, s, noise):
    """Mean and variance of the one-output GP with mean f0 and kernel s·J Jᵀ (noise σ²) at the test rows Js, written
    out densely in float64: K* = s·J* Jᵀ, C = s·J Jᵀ + σ²I, mean = f0* + K* C⁻¹ (y − f0), var = s·‖j*‖² −
    diag(K* C⁻¹ K*ᵀ), and C itself."""
    cross = s * Js @ J.T
    C = s * J @ J.T + noise * np.eye(J.shape[0])
    mean = f0s[:, 0] + cross @ np.linalg.solve(C, y - f0[:, 0])
    var = s * np.einsum("ij,ij->i", Js, Js) - np.einsum("ij,ji->i", cross, np.linalg.solve(C, cross.T))
    return mean, var, C
