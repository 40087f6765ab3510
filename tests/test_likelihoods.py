"""Likelihood curvatures Λ against torch autograd Hessians of the negative log-likelihood w.r.t. the outputs.

Each Λ is computed on the backend (float32 and float64) and compared with the float64 Hessian torch computes on the
CPU; the per-example factors L_i must satisfy L_i L_iᵀ = Λ_i. Bad shapes, labels and values raise clear errors.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

F = torch.nn.functional

from lingp_core._validate import DTypeError, NonFiniteError, ShapeError, ValueRangeError  # noqa: E402
from lingp_core.likelihoods import (  # noqa: E402
    BernoulliLikelihood,
    CategoricalLikelihood,
    GaussianLikelihood,
    as_likelihood,
)
from tests.helpers import assert_matches, tolerance  # noqa: E402


def per_example_hessian(loss, f64: np.ndarray) -> np.ndarray:
    """The (n, c, c) diagonal blocks of the Hessian of ``loss`` (summed over examples) w.r.t. the (n, c) outputs."""
    h = torch.autograd.functional.hessian(loss, torch.from_numpy(f64)).numpy()  # (n, c, n, c)
    n = f64.shape[0]
    off = h.copy()
    off[np.arange(n), :, np.arange(n), :] = 0
    assert np.abs(off).max() == 0, "examples must not couple"
    return h[np.arange(n), :, np.arange(n), :]


def logits(rng, n, c, spread=3.0) -> np.ndarray:
    f = spread * rng.standard_normal((n, c))
    f[0] += 40.0  # large logits: softmax and sigmoid must not overflow
    return f


def check_factor(lik, f, backend, dtype, expected):
    rtol = tolerance(dtype, 1e3)
    lam = lik.curvature(f)
    assert_matches(lam, expected, backend, dtype=dtype, rtol=rtol)
    L = lik.sqrt_curvature(f)
    L64 = backend.to_numpy(L).astype(np.float64)
    if L.ndim == 2:
        dense = np.einsum("ik,kl->ikl", L64**2, np.eye(L.shape[1]))
    else:
        dense = L64 @ L64.transpose(0, 2, 1)
    np.testing.assert_allclose(dense, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_categorical_curvature_is_hessian_of_cross_entropy(backend, dtype, rng):
    f64 = logits(rng, 5, 4)
    y = torch.from_numpy(rng.integers(0, 4, 5))
    expected = per_example_hessian(lambda z: F.cross_entropy(z, y, reduction="sum"), f64)
    lik = CategoricalLikelihood()
    check_factor(lik, backend.asarray(f64.astype(dtype)), backend, dtype, expected)
    assert lik.sqrt_curvature(backend.asarray(f64.astype(dtype))).shape == (5, 4, 4)
    p = lik.probabilities(backend.asarray(f64.astype(dtype)))
    assert_matches(p, torch.softmax(torch.from_numpy(f64), 1).numpy(), backend, dtype=dtype, rtol=tolerance(dtype))


def test_bernoulli_curvature_is_hessian_of_bce_with_logits(backend, dtype, rng):
    f64 = logits(rng, 6, 1)
    f64[1] = -700.0  # e^{700} overflows float64 when computed naively
    y = torch.from_numpy(rng.integers(0, 2, (6, 1)).astype(np.float64))
    expected = per_example_hessian(lambda z: F.binary_cross_entropy_with_logits(z, y, reduction="sum"), f64)
    f = backend.asarray(f64.astype(dtype))
    check_factor(BernoulliLikelihood(), f, backend, dtype, expected)
    assert BernoulliLikelihood().sqrt_curvature(f).shape == (6, 1)


@pytest.mark.parametrize("noise", [0.3, [0.5, 2.0, 0.1]], ids=["scalar", "per-output"])
def test_gaussian_curvature_is_inverse_noise(backend, dtype, rng, noise):
    f64 = rng.standard_normal((4, 3))
    y = torch.from_numpy(rng.standard_normal((4, 3)))
    var = torch.as_tensor(noise, dtype=torch.float64)
    expected = per_example_hessian(lambda z: (0.5 * (z - y) ** 2 / var).sum(), f64)
    check_factor(GaussianLikelihood(noise), backend.asarray(f64.astype(dtype)), backend, dtype, expected)


def test_likelihood_by_name():
    assert isinstance(as_likelihood("categorical"), CategoricalLikelihood)
    assert as_likelihood("gaussian").noise == 1.0
    with pytest.raises(ValueError, match="'gaussian', 'bernoulli', 'categorical'"):
        as_likelihood("poisson")
    with pytest.raises(TypeError, match="Likelihood"):
        as_likelihood(3)


# ----- bad input ----------------------------------------------------------------------------------------------------

def test_bad_outputs_raise(backend):
    f = backend.asarray(np.zeros((3, 2)))
    with pytest.raises(ShapeError, match=r"one logit per example.*\(3, 2\)"):
        BernoulliLikelihood().curvature(f)
    with pytest.raises(ShapeError, match=r"c ≥ 2.*\(3, 1\)"):
        CategoricalLikelihood().curvature(backend.asarray(np.zeros((3, 1))))
    with pytest.raises(ShapeError, match=r"2 dimension"):
        CategoricalLikelihood().curvature(backend.asarray(np.zeros(3)))
    with pytest.raises(ShapeError, match=r"3 per-output variances.*c = 2"):
        GaussianLikelihood([1.0, 2.0, 3.0]).curvature(f)
    nan = np.zeros((3, 2))
    nan[1, 0] = np.nan
    with pytest.raises(NonFiniteError, match=r"1 NaN.*\(1, 0\)"):
        CategoricalLikelihood().curvature(backend.asarray(nan))
    with pytest.raises(DTypeError, match="int64"):
        CategoricalLikelihood().curvature(backend.asarray(np.zeros((3, 2), dtype=np.int64)))


@pytest.mark.parametrize("noise, error, match", [
    (0.0, ValueRangeError, "> 0"), (-1.0, ValueRangeError, "> 0"), ([1.0, -2.0], ValueRangeError, "-2.0"),
    ([[1.0]], ShapeError, r"\(1, 1\)"), ([1.0, np.nan], NonFiniteError, "NaN"), ("a", TypeError, "real"),
])
def test_bad_noise_raises(noise, error, match):
    with pytest.raises(error, match=match):
        GaussianLikelihood(noise)


def test_label_checks(backend):
    f3 = backend.asarray(np.zeros((4, 3)))
    f1 = backend.asarray(np.zeros((4, 1)))
    good = CategoricalLikelihood().check_labels(backend.asarray(np.array([0, 2, 1, 2])), f3)
    assert good.shape == (4,)
    with pytest.raises(ValueRangeError, match=r"\[0, 3\).*e\.g\. 3"):
        CategoricalLikelihood().check_labels(backend.asarray(np.array([0, 3, 1, 2])), f3)
    with pytest.raises(ValueRangeError, match=r"e\.g\. -1"):
        CategoricalLikelihood().check_labels(backend.asarray(np.array([0, -1, 1, 2])), f3)
    with pytest.raises(DTypeError, match="integers"):
        CategoricalLikelihood().check_labels(backend.asarray(np.array([0.0, 1.0, 1.0, 2.0])), f3)
    with pytest.raises(ShapeError, match=r"\(3,\).*\(4,\)"):
        CategoricalLikelihood().check_labels(backend.asarray(np.array([0, 1, 1])), f3)
    assert BernoulliLikelihood().check_labels(backend.asarray(np.array([0, 1, 1, 0])), f1).shape == (4,)
    assert BernoulliLikelihood().check_labels(backend.asarray(np.array([0.0, 0.3, 1.0, 0.5])), f1).shape == (4,)
    with pytest.raises(ValueRangeError, match=r"\[0, 1\].*1\.5"):
        BernoulliLikelihood().check_labels(backend.asarray(np.array([0.0, 1.5, 1.0, 0.5])), f1)
    with pytest.raises(ValueRangeError, match="0 or 1.*2"):
        BernoulliLikelihood().check_labels(backend.asarray(np.array([0, 2, 1, 0])), f1)
    with pytest.raises(NonFiniteError, match="NaN"):
        BernoulliLikelihood().check_labels(backend.asarray(np.array([0.0, np.nan, 1.0, 0.5])), f1)
    y = GaussianLikelihood().check_labels(backend.asarray(np.zeros(4)), f1)
    assert y.shape == (4, 1)
    with pytest.raises(ShapeError, match=r"\(4, 2\).*\(4, 3\)"):
        GaussianLikelihood().check_labels(backend.asarray(np.zeros((4, 2))), f3)
