"""External check: LinearizedGP equals GPyTorch's ExactGP given the same precomputed Jacobian kernel.

GPyTorch sees the kernel through a Kernel whose inputs are example indices into the precomputed matrix s·J Jᵀ over
training and test inputs; its noise is fixed to ours and it runs its Cholesky path in float64.
"""
from __future__ import annotations

import gpytorch
import numpy as np
import torch

import lingp_core as lg  # noqa: E402
from tests.test_export import mlp  # noqa: E402


class PrecomputedKernel(gpytorch.kernels.Kernel):
    """k(i, j) = K[i, j] for integer-valued inputs i, j indexing a fixed matrix K."""

    def __init__(self, K: torch.Tensor):
        super().__init__()
        self.K = K

    def forward(self, x1, x2, diag=False, **kwargs):
        i, j = x1[..., 0].long(), x2[..., 0].long()
        return self.K[i][:, j] if not diag else self.K[i, j]


class IndexGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, K):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = PrecomputedKernel(K)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def test_linearized_gp_equals_gpytorch_exact_gp():
    torch.manual_seed(0)
    model = mlp(torch.nn.Tanh, (3, 16, 1)).double()
    x, xs = torch.randn(30, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    J, Js = lg.export_jacobian(model, x), lg.export_jacobian(model, xs)
    y = J.f0[:, 0] + np.sin(3 * x[:, 0].numpy())
    s, noise = 0.6, 0.02
    gp = lg.LinearizedGP(s, noise, method="function-cholesky").fit(J, y)
    mean, var = gp.predict(Js, return_var=True)

    # GPyTorch gets the residual targets and the kernel over [train; test], nothing else from lingp
    J64 = np.vstack([J.to_dense(), Js.to_dense()])
    K = torch.from_numpy(s * J64 @ J64.T)
    # fixed noise: GaussianLikelihood's constrained parameter would store σ² only to ~1e-9
    likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=torch.full((30,), noise, dtype=torch.float64))
    train_idx = torch.arange(30, dtype=torch.float64)[:, None]
    test_idx = torch.arange(30, 37, dtype=torch.float64)[:, None]
    residual = torch.from_numpy(y - J.f0[:, 0])
    ref = IndexGP(train_idx, residual, likelihood, K).double()
    with gpytorch.settings.fast_computations(False, False, False), gpytorch.settings.max_cholesky_size(10**6):
        ref.train()
        likelihood.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, ref)
        lml_ref = float(mll(ref(train_idx), residual).detach()) * 30  # GPyTorch divides by the number of targets
        ref.eval()
        likelihood.eval()
        with torch.no_grad():
            pred = ref(test_idx)
            mean_ref = pred.mean.numpy() + Js.f0[:, 0]
            var_ref = pred.variance.numpy()
    np.testing.assert_allclose(mean[:, 0], mean_ref, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(var[:, 0], var_ref, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(gp.log_marginal_likelihood(), lml_ref, rtol=1e-8)
