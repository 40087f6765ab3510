"""Fixtures: the same test body runs on every usable backend.

A backend that is not usable here is skipped with its reason, unless it is named in the environment variable
LINGP_TEST_BACKENDS (e.g. ``LINGP_TEST_BACKENDS=numpy,cupy`` on the GPU machine), where it is a failure instead.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import backends


def _required_backends() -> set[str]:
    names = {n.strip().lower() for n in os.environ.get("LINGP_TEST_BACKENDS", "").split(",") if n.strip()}
    unknown = names - set(backends.BACKEND_NAMES)
    if unknown:
        raise pytest.UsageError(f"LINGP_TEST_BACKENDS names unknown backends {sorted(unknown)}; "
                                f"valid: {', '.join(backends.BACKEND_NAMES)}")
    return names


def use_backend(name: str) -> backends.Backend:
    """The backend ``name``, or a skip (a failure when LINGP_TEST_BACKENDS requires it) saying why it is unusable."""
    status = {s.name: s for s in backends.available_backends()}[name]
    if not status.usable:
        message = f"backend {name!r} not usable here: {status.reason}"
        if name in _required_backends():
            pytest.fail(message + " (LINGP_TEST_BACKENDS requires it)")
        pytest.skip(message)
    return backends.get_backend(name)


@pytest.fixture(params=backends.BACKEND_NAMES)
def backend(request: pytest.FixtureRequest) -> backends.Backend:
    """Each backend in turn."""
    return use_backend(request.param)


@pytest.fixture
def cupy_backend() -> backends.Backend:
    """The CuPy backend, for tests that need host and device arrays together."""
    return use_backend("cupy")


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> np.dtype:
    """Each float dtype lingp computes in."""
    return np.dtype(request.param)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator: every test sees the same data on every run."""
    return np.random.default_rng(20210413)
