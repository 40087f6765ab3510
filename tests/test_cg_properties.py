"""Hypothesis property tests of CG: any small SPD system, any number of right-hand sides, either float dtype."""
from __future__ import annotations

import hypothesis
import numpy as np

import lingp_core as lg
from tests.helpers import spd_matrix

given, settings, st = hypothesis.given, hypothesis.settings, hypothesis.strategies


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 25), k=st.integers(0, 4), use_float32=st.booleans(), seed=st.integers(0, 2**16))
def test_cg_shapes_and_dtypes_property(n, k, use_float32, seed):
    rng = np.random.default_rng(seed)
    dtype = np.float32 if use_float32 else np.float64
    a = spd_matrix(rng, n, 10.0).astype(dtype)
    b = rng.standard_normal((n, k)).astype(dtype)
    result = lg.cg(a, b)
    assert result.x.shape == (n, k) and result.x.dtype == dtype
    assert result.converged.shape == result.iterations.shape == result.residual_norms.shape == (k,)
    assert result.converged.dtype == bool and result.iterations.dtype == np.int64  # also with k = 0
    assert result.converged.all()
    assert np.all(result.iterations <= 10 * n)
