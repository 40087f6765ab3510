"""LaplaceClassifier against a dense float64 NumPy Laplace approximation (Newton on w with J as a dense matrix).

The oracle takes J (n·c × p) and f₀ from torch.func.jacrev of a float64 copy of the same torch model on the same
inputs (never from lingp's export), runs damped Newton on Ψ(w) = NLL(f₀ + J w) + ‖w‖²/(2s) with the exact Hessian
Jᵀ Λ J + I/s, and computes the evidence −Ψ(ŵ) − ½ log det(s·H) and the predictive covariances J*_i H⁻¹ J*_iᵀ
directly. Both of lingp's methods (parameter and function space) must reproduce it on every backend.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lingp_core as lg
from lingp_core.io import ArchiveError
from lingp_core.laplace import LaplaceClassifier, NotFittedError
from tests.helpers import assert_matches, tolerance
from tests.test_export import SharedLinear, mlp, on_backend, oracle

METHODS = ("parameter", "function")
F64 = 1e-9  # relative agreement in float64: Newton to rtol 1e-12 and Cholesky solves of well-conditioned systems


# ----- problems and the dense oracle --------------------------------------------------------------------------------

def problem(backend, likelihood="categorical", n=14, n_star=6, widths=(3, 6, 3), dtype=np.float64, seed=0):
    """A tiny random tanh MLP, its training/test Jacobians on the backend, labels, and the jacrev oracle (float64)."""
    torch.manual_seed(seed)
    c = widths[-1] if likelihood == "categorical" else 1
    model = mlp(torch.nn.Tanh, widths[:-1] + (c,))
    with torch.no_grad():
        for prm in model.parameters():
            prm.mul_(2.0)  # logits of a few units: non-trivial curvature
    x = torch.randn(n + n_star, widths[0], generator=torch.Generator().manual_seed(seed + 1))
    model, x = on_backend(model, x, backend, dtype)
    J = lg.export_jacobian(model, x[:n], backend=backend)
    J_star = lg.export_jacobian(model, x[n:], backend=backend)
    rng = np.random.default_rng(seed + 2)
    y = rng.integers(0, max(c, 2), size=n)
    return J, J_star, backend.asarray(y), y, dense_arrays(model, x[:n], x[n:], J)


def dense_arrays(model, x, x_star, J, names=None):
    """The oracle's float64 J, f₀ (training) and J*, f₀* (test) by torch.func.jacrev, independent of lingp's export.

    ``names`` lists the exported parameters in the model's order (default: all); J's columns must follow it.
    """
    names = [k for k, prm in model.named_parameters() if prm.requires_grad] if names is None else list(names)
    assert J.param_names == tuple(names), f"exported columns {J.param_names}, oracle columns {names}"
    (J64, f64), (Js64, fs64) = oracle(model, x, names), oracle(model, x_star, names)
    return {"J": J64, "f0": f64, "Js": Js64, "f0s": fs64}


def _probs(g, likelihood):
    if likelihood == "categorical":
        e = np.exp(g - g.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-g))


def _nll(g, y, likelihood):
    if likelihood == "categorical":
        top = g.max(axis=1)
        return float(np.sum(top + np.log(np.exp(g - top[:, None]).sum(axis=1)) - g[np.arange(len(y)), y]))
    return float(np.sum(np.logaddexp(0.0, g[:, 0]) - y * g[:, 0]))


def _curvature_blocks(g, likelihood):
    """The per-example blocks Λ_i (n, c, c) of the NLL's Hessian in the logits."""
    pr = _probs(g, likelihood)
    if likelihood == "categorical":
        return pr[:, :, None] * np.eye(pr.shape[1]) - pr[:, :, None] * pr[:, None, :]
    return (pr * (1 - pr))[:, :, None]


def _curvature(g, likelihood):
    """Block-diagonal Λ (n·c, n·c) of the NLL in the logits."""
    blocks = _curvature_blocks(g, likelihood)
    n, c, _ = blocks.shape
    lam = np.zeros((n * c, n * c))
    for i, b in enumerate(blocks):
        lam[i * c:(i + 1) * c, i * c:(i + 1) * c] = b
    return lam


def _hessian(J, g, s, likelihood):
    """Jᵀ Λ J + I/s (p, p), summed example by example (Λ is block diagonal)."""
    n, c = g.shape
    Jb = J.reshape(n, c, -1)
    ggn = np.einsum("ikp,ikl,ilq->pq", Jb, _curvature_blocks(g, likelihood), Jb, optimize=True)
    return ggn + np.eye(J.shape[1]) / s


def dense_map(d, y, variances, likelihood, m):
    """The MAP of Ψ(w) = NLL + ½ (w − m)ᵀ diag(1/variances) (w − m) by damped Newton with the exact Hessian, from w = m;
    returns (ŵ, Ψ(ŵ))."""
    J, f0 = d["J"], d["f0"]
    n, c = f0.shape
    target = np.eye(c)[y] if likelihood == "categorical" else y[:, None].astype(np.float64)

    def psi(w):
        return _nll(f0 + (J @ w).reshape(n, c), y, likelihood) + 0.5 * (w - m) @ ((w - m) / variances)

    w = m.copy()
    for _ in range(100):
        g = f0 + (J @ w).reshape(n, c)
        grad = J.T @ (_probs(g, likelihood) - target).ravel() + (w - m) / variances
        Jb = J.reshape(n, c, -1)
        ggn = np.einsum("ikp,ikl,ilq->pq", Jb, _curvature_blocks(g, likelihood), Jb, optimize=True)
        step = np.linalg.solve(ggn + np.diag(1.0 / variances), grad)
        alpha = 1.0
        while psi(w - alpha * step) > psi(w) and alpha > 1e-10:
            alpha /= 2
        w = w - alpha * step
        if np.linalg.norm(alpha * step) <= 1e-15 * (1 + np.linalg.norm(w)):
            break
    return w, psi(w)


def dense_laplace(d, y, s, likelihood, m=None):
    """MAP ŵ, Hessian H(ŵ), evidence and per-example predictive covariances, all in float64 NumPy (prior N(m, sI))."""
    J, f0 = d["J"], d["f0"]
    n, c = f0.shape
    p = J.shape[1]
    m = np.zeros(p) if m is None else m
    w, psi_w = dense_map(d, y, np.full(p, float(s)), likelihood, m)
    g = f0 + (J @ w).reshape(n, c)
    H = _hessian(J, g, s, likelihood)
    evidence = -psi_w - 0.5 * np.linalg.slogdet(s * H)[1]
    Js = d["Js"]
    n_star = d["f0s"].shape[0]
    blocks = Js.reshape(n_star, c, p)
    cov = np.einsum("ikp,ilp->ikl", blocks, np.linalg.solve(H, Js.T).T.reshape(n_star, c, p))  # J*_i H⁻¹ J*_iᵀ
    mean = d["f0s"] + (Js @ w).reshape(n_star, c)
    gamma = p - np.trace(np.linalg.inv(H)) / s
    return {"w": w, "H": H, "evidence": evidence, "mean": mean, "cov": cov, "gamma": gamma, "m": m}


def network_parameters(J, backend, d):
    """A prior mean for w: minus stand-in "network weights" (seeded), in J's column order and dtype."""
    theta = np.random.default_rng(7).standard_normal(d["J"].shape[1])
    return backend.asarray((-theta).astype(J.dtype)), -theta


# ----- MAP, posterior and evidence against the oracle ---------------------------------------------------------------

@pytest.mark.parametrize("prior", ["network", "origin"])
@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
@pytest.mark.parametrize("method", METHODS)
def test_map_posterior_and_evidence_match_dense_newton(backend, likelihood, method, prior):
    J, Js, y, y_np, d = problem(backend, likelihood)
    s = 0.8
    m, m_np = network_parameters(J, backend, d) if prior == "origin" else (None, None)
    clf = LaplaceClassifier(s, likelihood, method=method, rtol=1e-12).fit(J, y, prior_mean=m)
    ref = dense_laplace(d, y_np, s, likelihood, m_np)
    assert clf.plan_.method == method and clf.fit_info_["converged"]
    assert_matches(clf.w_map_, ref["w"], backend, dtype=np.float64, rtol=F64)
    assert abs(clf.log_evidence() - ref["evidence"]) <= F64 * max(1.0, abs(ref["evidence"]))
    mean, cov = clf.predict_logits(Js, return_var="full")
    assert_matches(mean, ref["mean"], backend, dtype=np.float64, rtol=F64)
    assert_matches(cov, ref["cov"], backend, dtype=np.float64, rtol=F64)
    mean2, var = clf.predict_logits(Js, return_var=True)
    assert_matches(mean2, ref["mean"], backend, dtype=np.float64, rtol=F64)
    assert_matches(var, np.diagonal(ref["cov"], axis1=1, axis2=2).copy(), backend, dtype=np.float64, rtol=F64)
    assert_matches(clf.predict_logits(Js), ref["mean"], backend, dtype=np.float64, rtol=F64)


def test_both_methods_agree_on_a_larger_problem(backend):
    """n·c > p here, so the parameter space is the natural one; the function space must still agree."""
    J, Js, y, _, _ = problem(backend, n=40, widths=(3, 5, 4))
    fits = [LaplaceClassifier(1.5, method=m, rtol=1e-12).fit(J, y) for m in METHODS]
    a, b = (f.predict_logits(Js, return_var="full") for f in fits)
    for x, z in zip(a, b):
        assert_matches(x, backend.to_numpy(z), backend, dtype=np.float64, rtol=F64)
    assert abs(fits[0].log_evidence() - fits[1].log_evidence()) <= F64 * abs(fits[0].log_evidence())


@pytest.mark.parametrize("structure", ["factored", "dense"])
def test_dense_ggn_paths_on_shared_weights_and_dense_blocks(backend, structure):
    """Weight sharing (a factored block applied twice, T = 2) and all-dense blocks take the Gᵀ G route of the dense
    GGN, next to the Kronecker route of plain factored blocks: every route must give the oracle's posterior."""
    torch.manual_seed(3)
    model, x = on_backend(SharedLinear(), torch.randn(30, 3, generator=torch.Generator().manual_seed(4)), backend)
    J = lg.export_jacobian(model, x[:24], backend=backend, structure=structure)
    Js = lg.export_jacobian(model, x[24:], backend=backend, structure=structure)
    kinds = {(b.kind, getattr(b, "T", 1)) for b in J.blocks}
    assert kinds == ({("factored", 1), ("factored", 2)} if structure == "factored" else {("dense", 1)})
    y_np = np.random.default_rng(5).integers(0, 2, size=24)
    ref = dense_laplace(dense_arrays(model, x[:24], x[24:], J), y_np, 0.6, "categorical")
    clf = LaplaceClassifier(0.6, method="parameter", rtol=1e-12).fit(J, backend.asarray(y_np))
    mean, cov = clf.predict_logits(Js, return_var="full")
    assert_matches(mean, ref["mean"], backend, dtype=np.float64, rtol=F64)
    assert_matches(cov, ref["cov"], backend, dtype=np.float64, rtol=F64)
    assert abs(clf.log_evidence() - ref["evidence"]) <= F64 * abs(ref["evidence"])


@pytest.mark.parametrize("params", [["0.weight", "2.bias"], ["0.bias", "2.weight"], ["2.weight", "0.weight"]])
def test_dense_ggn_on_weight_only_and_bias_only_blocks(backend, params):
    """Blocks holding only a layer's weight or only its bias (the Kronecker route writes each part separately)."""
    y_np = np.random.default_rng(2).integers(0, 3, size=30)
    y = backend.asarray(y_np)
    torch.manual_seed(0)
    model = mlp(torch.nn.Tanh, (3, 6, 3))
    with torch.no_grad():
        for prm in model.parameters():
            prm.mul_(2.0)
    x = torch.randn(36, 3, generator=torch.Generator().manual_seed(1))
    model, x = on_backend(model, x, backend, np.float64)
    J = lg.export_jacobian(model, x[:30], params=params, backend=backend)
    Js = lg.export_jacobian(model, x[30:], params=params, backend=backend)
    in_model_order = [k for k, _ in model.named_parameters() if k in params]
    ref = dense_laplace(dense_arrays(model, x[:30], x[30:], J, in_model_order), y_np, 0.7, "categorical")
    clf = LaplaceClassifier(0.7, method="parameter", rtol=1e-12).fit(J, y)
    mean, cov = clf.predict_logits(Js, return_var="full")
    assert_matches(mean, ref["mean"], backend, dtype=np.float64, rtol=F64)
    assert_matches(cov, ref["cov"], backend, dtype=np.float64, rtol=F64)


@pytest.mark.parametrize("params", [None, ["0.weight", "2.weight", "2.bias"], ["0.bias", "2.bias"]])
def test_dense_ggn_matches_the_dense_oracle_and_is_symmetric(backend, params):
    """dense_ggn against Jᵀ Λ J from jacrev (float64), for factored blocks with a weight and a bias (two parameter
    segments: the symmetric unpacking of a block with itself mixes them), only one of them, and several blocks
    (the mirrored cross pairs); F is exactly symmetric, and ``out`` receives the same F in a given buffer."""
    from lingp_core._ggn import dense_ggn
    from lingp_core.likelihoods import CategoricalLikelihood

    torch.manual_seed(0)
    model = mlp(torch.nn.Tanh, (4, 7, 3))
    x = torch.randn(25, 4, generator=torch.Generator().manual_seed(1))
    model, x = on_backend(model, x, backend, np.float64)
    J = lg.export_jacobian(model, x, params=params, backend=backend)
    names = [k for k, _ in model.named_parameters() if params is None or k in params]
    d = dense_arrays(model, x, x[:1], J, names)
    factors = CategoricalLikelihood().sqrt_curvature(J.f0)
    n, c = d["f0"].shape
    Jb = d["J"].reshape(n, c, -1)
    expected = np.einsum("ikp,ikl,ilq->pq", Jb, _curvature_blocks(d["f0"], "categorical"), Jb)
    F = dense_ggn(J, factors, None)
    assert_matches(F, expected, backend, dtype=np.float64, rtol=tolerance(np.float64, 1e3))
    F_host = backend.to_numpy(F)
    assert np.array_equal(F_host, F_host.T)
    buffer = backend.xp.full((J.p, J.p), np.nan)
    assert dense_ggn(J, factors, None, out=buffer) is buffer
    assert np.array_equal(backend.to_numpy(buffer), F_host)
    with pytest.raises(lg.ShapeError, match="C-contiguous float64"):
        dense_ggn(J, factors, None, out=backend.xp.zeros((J.p, J.p)).T[:, : J.p - 1])


def test_weight_space_cholesky_in_place_jitter_and_errors(backend):
    """The weight-space engine's in-place Cholesky: the factor of an SPD matrix with its strict upper triangle
    cleared; a singular PSD matrix retried from its untouched upper triangle with jitter (and a warning); NaN and
    an indefinite matrix raise."""
    from lingp_core._laplace_engines import _symmetric_cholesky_in_place

    xp = backend.xp
    rng = np.random.default_rng(3)
    X = rng.standard_normal((6, 9))
    A = X @ X.T
    a = xp.array(A)  # a copy: factored in place
    factor = _symmetric_cholesky_in_place(a, backend)
    assert factor is a
    assert_matches(factor, np.linalg.cholesky(A), backend, dtype=np.float64)
    singular = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # the second pivot is exactly 0
    with pytest.warns(lg.NumericalWarning, match="jitter"):
        factor = backend.to_numpy(_symmetric_cholesky_in_place(xp.array(singular), backend))
    assert np.array_equal(factor, np.tril(factor))
    jitter = factor @ factor.T - singular
    assert np.allclose(jitter, jitter[0, 0] * np.eye(3), rtol=0, atol=1e-14) and 0 < jitter[0, 0] < 1e-6
    for at in ((2, 2), (4, 1)):  # a NaN in the diagonal, and one off it (in both triangles)
        bad = A.copy()
        bad[at], bad[at[::-1]] = np.nan, np.nan
        with pytest.raises(lg.NonFiniteError):
            _symmetric_cholesky_in_place(xp.array(bad), backend)
    with pytest.raises(lg.NotPositiveDefiniteError):
        _symmetric_cholesky_in_place(xp.asarray(np.array([[1.0, 2.0], [2.0, 1.0]])), backend)


def test_predictive_covariance_in_column_chunks_skips_blocks_that_meet_zeros(backend, monkeypatch):
    """Z = J* R⁻ᵀ in chunks of a few columns: chunks that end before the last block starts skip it (R⁻ᵀ is upper
    triangular); the covariances must still be the oracle's."""
    import lingp_core._laplace_engines as engines

    monkeypatch.setattr(engines, "_PREDICT_COLUMNS", 4)
    J, Js, y, y_np, d = problem(backend, n=30, widths=(3, 6, 3))
    assert J.p > 4 * 3 and J.block_sizes[0] > 4  # several chunks, the first ones before the last block
    ref = dense_laplace(d, y_np, 0.7, "categorical")
    clf = LaplaceClassifier(0.7, method="parameter", rtol=1e-12).fit(J, y)
    mean, cov = clf.predict_logits(Js, return_var="full")
    assert_matches(mean, ref["mean"], backend, dtype=np.float64, rtol=F64)
    assert_matches(cov, ref["cov"], backend, dtype=np.float64, rtol=F64)


def test_refits_write_over_their_own_factor_never_the_committed_one(backend, monkeypatch):
    """optimize_prior_scale's refits build each Hessian in the memory of the draft's previous factor once the
    draft has its own (not in the committed model's, which a copy shares): a search that fails on its third refit
    leaves the fitted model's factor as it was, and its predictions (computed from it afterwards) those of an
    identical fit."""
    import lingp_core._laplace_engines as engines

    J, Js, y, _, _ = problem(backend, n=30)
    clf, same = (LaplaceClassifier(1e-3, method="parameter", rtol=1e-12).fit(J, y) for _ in range(2))
    factor = backend.to_numpy(clf._engine.factor).copy()
    buffers, real = [], engines.dense_ggn

    def fails_third(J, factors, budget, out=None):
        buffers.append(out)
        if len(buffers) == 3:
            raise RuntimeError("stop")
        return real(J, factors, budget, out=out)

    monkeypatch.setattr(engines, "dense_ggn", fails_third)
    with pytest.raises(RuntimeError, match="stop"):
        clf.optimize_prior_scale(tol=1e-12)
    assert buffers[0] is None and buffers[1] is not None  # the first refit's factor was the draft's own
    assert np.array_equal(backend.to_numpy(clf._engine.factor), factor)
    for x, z in zip(clf.predict_logits(Js, return_var="full"), same.predict_logits(Js, return_var="full")):
        assert_matches(x, backend.to_numpy(z), backend, dtype=np.float64, rtol=F64)


def test_float32_jacobians_give_float64_results_near_the_float64_answer(backend):
    J, Js, y, y_np, d = problem(backend, dtype=np.float32)
    ref = dense_laplace(d, y_np, 0.8, "categorical")
    rtol = tolerance(np.float32, 1e4)  # products in float32 (~1e-7 each), Newton stops at sqrt(eps32)
    for method in METHODS:
        clf = LaplaceClassifier(0.8, method=method).fit(J, y)
        mean, var = clf.predict_logits(Js, return_var=True)
        assert_matches(mean, ref["mean"], backend, dtype=np.float64, rtol=rtol)
        assert_matches(var, np.diagonal(ref["cov"], axis1=1, axis2=2).copy(), backend, dtype=np.float64, rtol=rtol)
        assert abs(clf.log_evidence() - ref["evidence"]) <= rtol * abs(ref["evidence"])


def test_auto_plan_picks_the_smaller_system(backend):
    J, _, y, _, _ = problem(backend, n=5, widths=(3, 6, 3))  # n·c = 15 ≤ p = 45
    clf = LaplaceClassifier(method="auto").fit(J, y)
    assert clf.plan_.method == "function" and "15" in clf.plan_.reason and str(J.p) in clf.plan_.reason
    J, _, y, _, _ = problem(backend, n=40, widths=(3, 6, 3))  # n·c = 120 > p = 45
    clf = LaplaceClassifier(method="auto").fit(J, y)
    assert clf.plan_.method == "parameter" and "120" in clf.plan_.reason
    assert "forced" in LaplaceClassifier(method="function").fit(J, y).plan_.reason


# ----- prior scale by the evidence ----------------------------------------------------------------------------------

@pytest.mark.parametrize("prior", ["network", "origin"])
@pytest.mark.parametrize("method", METHODS)
def test_optimize_prior_scale_reaches_the_evidence_fixed_point(backend, method, prior):
    J, _, y, y_np, d = problem(backend)
    m, m_np = network_parameters(J, backend, d) if prior == "origin" else (None, None)
    clf = LaplaceClassifier(0.05, method=method, rtol=1e-12).fit(J, y, prior_mean=m).optimize_prior_scale(tol=1e-8)
    s = clf.prior_scale
    ref = dense_laplace(d, y_np, s, "categorical", m_np)
    # MacKay's condition: ‖ŵ − m‖² / s = γ at the MAP of s
    dw = ref["w"] - ref["m"]
    assert abs(np.log(dw @ dw / (s * ref["gamma"]))) <= 1e-6
    assert abs(clf.log_evidence() - ref["evidence"]) <= F64 * abs(ref["evidence"])
    # the fixed point neglects Λ's dependence on ŵ(s), so it sits near (not at) the maximum of the re-solved evidence
    for factor in (2.0, 0.5):
        assert dense_laplace(d, y_np, s * factor, "categorical", m_np)["evidence"] < ref["evidence"]
    history = clf.prior_scale_history_
    assert history[0][0] == 0.05 and history[-1][0] == s and len(history) >= 3


@pytest.mark.parametrize("method", METHODS)
def test_optimize_prior_scale_with_a_hyperprior_reaches_the_map_condition(backend, method):
    """With log s ~ N(μ, w²) the fixed point is the MAP condition ‖ŵ − m‖²/s = γ + 2(log s − μ)/w², checked on the
    dense posterior; a narrow hyperprior pulls s from the evidence's fixed point towards μ."""
    J, _, y, y_np, d = problem(backend)
    plain = LaplaceClassifier(0.05, method=method, rtol=1e-12).fit(J, y).optimize_prior_scale(tol=1e-8).prior_scale
    mu, width = float(np.log(plain)) + 3.0, 0.5
    clf = LaplaceClassifier(0.05, method=method, rtol=1e-12).fit(J, y)
    clf.optimize_prior_scale(tol=1e-8, hyperprior=lg.Hyperprior(log_prior_scale=mu, prior_scale_width=width))
    s = clf.prior_scale
    ref = dense_laplace(d, y_np, s, "categorical", None)
    dw = ref["w"] - ref["m"]
    assert abs(np.log(dw @ dw / (s * (ref["gamma"] + 2 * (np.log(s) - mu) / width**2)))) <= 1e-6
    assert plain < s < np.exp(mu)


def test_prior_scale_hyperprior_options(backend):
    J, _, y, _, d = problem(backend)
    clf = LaplaceClassifier(0.05, method="parameter").fit(J, y)
    f0 = d["f0"]
    centre = np.log(((f0 - f0.mean(axis=0)) ** 2).mean() / np.einsum("ij,ij->i", d["J"], d["J"]).mean())
    assert clf._hyperprior_centre(lg.Hyperprior()) == pytest.approx((centre, 1.0), rel=1e-10)
    clf.optimize_prior_scale(hyperprior="data")
    assert np.isfinite(clf.log_evidence())
    with pytest.raises(lg.InvalidOptionError, match="layerwise"):
        clf.optimize_prior_scale(layerwise=True, hyperprior="data")
    with pytest.raises(lg.InvalidOptionError, match="hyperprior"):
        clf.optimize_prior_scale(hyperprior="evidence")


def _dense_gamma_pieces(d, y_np, s, m_np, likelihood):
    """At the dense MAP of s: γ, the matrix M = I − H⁻¹/s (tr M = γ) and A with tr A = dγ/d log s, the curvature held
    (M − M²) plus its change as the MAP moves (H⁻¹ Jᵀ Λ' J H⁻¹ / s, Λ' by central differences of the dense Λ)."""
    ref = dense_laplace(d, y_np, s, likelihood, m_np)
    J, f0 = d["J"], d["f0"]
    Hinv = np.linalg.inv(ref["H"])
    hat = np.eye(len(ref["w"])) - Hinv / s
    g = f0 + (J @ ref["w"]).reshape(f0.shape)
    dg = (J @ (Hinv @ (ref["w"] - m_np) / s)).reshape(f0.shape)
    eps = 1e-6
    change = (_curvature(g + eps * dg, likelihood) - _curvature(g - eps * dg, likelihood)) / (2 * eps)
    return ref["gamma"], hat, hat - hat @ hat + Hinv @ J.T @ change @ J @ Hinv / s


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
@pytest.mark.parametrize("method", METHODS)
def test_prior_scale_step_ingredients_match_the_dense_posterior(backend, method, likelihood):
    """The Newton steps' ingredients at a MAP: d‖ŵ − m‖²/d log s and dγ/d log s against central differences of the
    dense MAP and γ; the Hutchinson estimates of dγ/d log s and of γ within 4 standard errors (bounded by the
    Frobenius norms) of the dense traces, and in weight space equal to the same probes' average over the dense
    matrix."""
    from lingp_core._laplace_engines import _SLOPE_PROBES, _rademacher

    J, _, y, y_np, d = problem(backend, likelihood)
    m, m_np = network_parameters(J, backend, d)
    s, h = 0.3, 1e-4
    engine = LaplaceClassifier(s, likelihood, method=method, rtol=1e-12).fit(J, y, prior_mean=m)._engine
    ends = [dense_laplace(d, y_np, s * np.exp(e), likelihood, m_np) for e in (h, -h)]
    sq_slope = sum(sign * np.sum((r["w"] - m_np) ** 2) for sign, r in zip((1, -1), ends)) / (2 * h)
    assert abs(engine.sq_norm_w_slope() - sq_slope) <= 1e-6 * abs(sq_slope)
    gamma, hat, slope_matrix = _dense_gamma_pieces(d, y_np, s, m_np, likelihood)
    gamma_slope = (ends[0]["gamma"] - ends[1]["gamma"]) / (2 * h)
    assert abs(np.trace(slope_matrix) - gamma_slope) <= 1e-5 * abs(gamma_slope)  # the oracle's own consistency
    assert abs(engine.effective_parameters() - gamma) <= F64 * gamma
    for estimate, exact, matrix in ((engine.effective_parameters_slope(), gamma_slope, slope_matrix),
                                    (engine.effective_parameters(exact=False), gamma, hat)):
        assert abs(estimate - exact) <= 4 * np.sqrt(2 * np.sum(matrix ** 2) / _SLOPE_PROBES)
        if method == "parameter":
            z = backend.to_numpy(_rademacher(len(m_np), backend))
            same_probes = np.einsum("ik,ij,jk->", z, matrix, z) / _SLOPE_PROBES
            assert abs(estimate - same_probes) <= 1e-6 * abs(same_probes)


@pytest.mark.parametrize("method", METHODS)
def test_optimize_prior_scale_with_estimated_gamma_stops_on_the_exact_condition(backend, method, monkeypatch):
    """Forced onto the Hutchinson path (as for large p or n·c), the last step still uses the exact γ: the chosen s
    meets MacKay's condition within tol."""
    import lingp_core.laplace as laplace_module

    monkeypatch.setattr(laplace_module, "_EXACT_TRACE_MAX", 0)
    J, _, y, y_np, d = problem(backend)
    m, m_np = network_parameters(J, backend, d)
    tol = 1e-3
    clf = LaplaceClassifier(0.05, method=method, rtol=1e-12).fit(J, y, prior_mean=m).optimize_prior_scale(tol=tol)
    s = clf.prior_scale
    ref = dense_laplace(d, y_np, s, "categorical", m_np)
    dw = ref["w"] - m_np
    # one more Newton step would move log s by less than tol: |φ| ≤ tol·|φ'|, and |φ'| ≤ 1.5 on this problem
    assert abs(np.log(dw @ dw / (s * ref["gamma"]))) <= 1.5 * tol


# ----- predictive probabilities -------------------------------------------------------------------------------------

@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
def test_probit_probabilities(backend, likelihood):
    J, Js, y, y_np, d = problem(backend, likelihood)
    clf = LaplaceClassifier(0.8, likelihood, rtol=1e-12).fit(J, y)
    ref = dense_laplace(d, y_np, 0.8, likelihood)
    var = np.diagonal(ref["cov"], axis1=1, axis2=2)
    expected = _probs(ref["mean"] / np.sqrt(1 + np.pi / 8 * var), likelihood)
    if likelihood == "bernoulli":
        expected = np.concatenate([1 - expected, expected], axis=1)
    proba = clf.predict_proba(Js)
    assert_matches(proba, expected, backend, dtype=np.float64, rtol=F64)
    np.testing.assert_allclose(backend.to_numpy(proba).sum(axis=1), 1.0, rtol=1e-14)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
def test_monte_carlo_probabilities_match_the_gaussian_integral(backend, likelihood):
    J, Js, y, y_np, d = problem(backend, likelihood)
    clf = LaplaceClassifier(3.0, likelihood, rtol=1e-12).fit(J, y)  # a wide posterior: MC ≠ probit ≠ plug-in
    ref = dense_laplace(d, y_np, 3.0, likelihood)
    draws = 20000
    proba = clf.predict_proba(Js, method="mc", n_samples=draws, seed=5)
    # the oracle integral: many draws from the oracle's N(μ_i, Σ_i) by Cholesky
    rng = np.random.default_rng(123)
    c = ref["mean"].shape[1]
    expected, spread = [], []
    for mu, cov in zip(ref["mean"], ref["cov"]):
        z = rng.standard_normal((200000, c)) @ np.linalg.cholesky(cov + 1e-12 * np.eye(c)).T + mu
        pr = _probs(z, likelihood)
        expected.append(pr.mean(axis=0))
        spread.append(pr.std(axis=0))
    expected, spread = np.array(expected), np.array(spread)
    if likelihood == "bernoulli":
        expected = np.concatenate([1 - expected, expected], axis=1)
        spread = np.concatenate([spread, spread], axis=1)
    got = backend.to_numpy(proba)
    assert isinstance(proba, backend.xp.ndarray) and proba.dtype == np.float64 and got.shape == expected.shape
    assert np.all(np.abs(got - expected) <= 5 * spread / np.sqrt(draws) + 1e-12)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-13)
    np.testing.assert_array_equal(got, backend.to_numpy(clf.predict_proba(Js, method="mc", n_samples=draws, seed=5)))
    assert not np.array_equal(got, backend.to_numpy(clf.predict_proba(Js, method="mc", n_samples=draws, seed=6)))


# ----- save and load ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_save_load_predicts_identically(backend, tmp_path, method):
    J, Js, y, _, _ = problem(backend)
    clf = LaplaceClassifier(0.8, method=method).fit(J, y)
    path = clf.save(tmp_path / "clf")
    loaded = LaplaceClassifier.load(path, backend=backend.name)
    assert loaded.plan_ == clf.plan_ and loaded.data_hash_ == clf.data_hash_
    assert loaded.prior_scale == clf.prior_scale and loaded.log_evidence() == clf.log_evidence()
    np.testing.assert_array_equal(backend.to_numpy(loaded.w_map_), backend.to_numpy(clf.w_map_))
    with np.load(path) as archive:  # ŵ is stored once (weight space keeps it as its state)
        assert ("w_map" in archive.files) == (method == "function")
    for a, b in zip(clf.predict_logits(Js, return_var="full"), loaded.predict_logits(Js, return_var="full")):
        assert isinstance(b, backend.xp.ndarray)
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    np.testing.assert_array_equal(backend.to_numpy(clf.predict_proba(Js, method="mc", n_samples=50)),
                                  backend.to_numpy(loaded.predict_proba(Js, method="mc", n_samples=50)))
    with pytest.raises(NotFittedError, match="loaded model"):
        loaded.optimize_prior_scale()


def test_archive_errors(tmp_path):
    backend = lg.get_backend("numpy")
    J, _, y, _, _ = problem(backend)
    path = LaplaceClassifier(0.8).fit(J, y).save(tmp_path / "m.npz")
    data = (tmp_path / "m.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError, match="truncated"):
        LaplaceClassifier.load(tmp_path / "cut.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    edited = dict(arrays, state_a=arrays["state_a"] + 1e-9)
    np.savez(tmp_path / "edited.npz", **edited)
    with pytest.raises(ArchiveError, match="'state_a'.*checksum"):
        LaplaceClassifier.load(tmp_path / "edited.npz")
    header = str(arrays["__lingp_header__"])
    for old, new, match in [('"version": 1', '"version": 99', "version 99"),
                            ('"kind": "LaplaceClassifier"', '"kind": "LinearizedGP"', "holds a 'LinearizedGP'"),
                            ('"prior_scale": 0.8', '"prior_scale": 0.9', "checksum|hash")]:
        assert old in header
        np.savez(tmp_path / "h.npz", **dict(arrays, __lingp_header__=np.array(header.replace(old, new))))
        with pytest.raises(ArchiveError, match=match):
            LaplaceClassifier.load(tmp_path / "h.npz")


# ----- bad input ----------------------------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors(backend):
    J, Js, y, y_np, _ = problem(backend)
    with pytest.raises(NotFittedError, match="not fitted"):
        LaplaceClassifier().predict_logits(Js)
    with pytest.raises(NotFittedError, match="not fitted"):
        LaplaceClassifier().log_evidence()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(lg.ValueRangeError, match="prior_scale"):
            LaplaceClassifier(prior_scale=bad)
    with pytest.raises(ValueError, match="likelihood"):
        LaplaceClassifier(likelihood="gaussian")
    with pytest.raises(ValueError, match="method"):
        LaplaceClassifier(method="weights")
    clf = LaplaceClassifier()
    bad_labels = y_np.copy()
    bad_labels[3] = 3
    with pytest.raises(lg.ValueRangeError, match=r"\[0, 3\).*e\.g\. 3"):
        clf.fit(J, backend.asarray(bad_labels))
    with pytest.raises(lg.DTypeError, match="integers"):
        clf.fit(J, backend.asarray(y_np.astype(np.float64)))
    with pytest.raises(lg.ShapeError, match=r"\(13,\)"):
        clf.fit(J, y[:13])
    with pytest.raises(TypeError, match="JacobianBlocks"):
        clf.fit(d_array := backend.asarray(np.ones((3, 3))), y)
    del d_array
    with pytest.raises(lg.ShapeError, match="one logit"):
        LaplaceClassifier(likelihood="bernoulli").fit(J, y)
    clf.fit(J, y)
    _, other, _, _, _ = problem(backend, widths=(3, 5, 3))
    with pytest.raises(lg.ShapeError, match="other parameters"):
        clf.predict_logits(other)
    with pytest.raises(ValueError, match="return_var"):
        clf.predict_logits(Js, return_var="cov")
    with pytest.raises(ValueError, match="method"):
        clf.predict_proba(Js, method="bridge")
    with pytest.raises(lg.ValueRangeError, match="n_samples"):
        clf.predict_proba(Js, method="mc", n_samples=0)
    J32, Js32, *_ = problem(backend, dtype=np.float32)
    with pytest.raises(lg.DTypeError, match="float32"):
        clf.predict_logits(Js32)
    with pytest.raises(lg.ValueRangeError, match="bounds"):
        clf.optimize_prior_scale(bounds=(2.0, 1.0))
    with pytest.raises(lg.ShapeError, match="prior_mean"):
        clf.fit(J, y, prior_mean=backend.asarray(np.zeros(J.p - 1)))
    with pytest.raises(lg.NonFiniteError, match="prior_mean"):
        clf.fit(J, y, prior_mean=backend.asarray(np.full(J.p, np.nan)))


def test_newton_that_runs_out_of_iterations_warns(backend):
    J, _, y, _, _ = problem(backend)
    with pytest.warns(lg.ConvergenceWarning, match="Newton stopped after 1 iterations"):
        LaplaceClassifier(0.8, maxiter=1, rtol=1e-12).fit(J, y)


# ----- averaging over the prior scale -------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*edge of the averaging grid:lingp_core.NumericalWarning")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("hyperprior", [None, lg.Hyperprior(log_prior_scale=0.0, prior_scale_width=0.5)])
def test_average_over_s_is_the_dense_mixture_of_its_grid(backend, method, hyperprior, tmp_path):
    J, Js, y, y_np, d = problem(backend)
    clf = LaplaceClassifier(0.8, method=method, rtol=1e-12).fit(J, y)
    clf.average_prior_scale(grid_size=5, span=1.0, hyperprior=hyperprior, keep_mass=1.0)
    grid = 0.8 * 10.0 ** np.linspace(-1, 1, 5)
    np.testing.assert_allclose(clf.mixture_scales_, grid, rtol=1e-12)
    refs = [dense_laplace(d, y_np, s, "categorical") for s in grid]
    log_w = np.array([r["evidence"] for r in refs])
    if hyperprior is not None:  # log s ~ N(0, 0.5²)
        log_w += -0.5 * (np.log(grid) / 0.5) ** 2
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    np.testing.assert_allclose(clf.mixture_weights_, w, rtol=1e-8)
    heaviest = int(np.argmax(w))
    assert clf.prior_scale == pytest.approx(grid[heaviest], rel=1e-12)
    assert abs(clf.log_evidence() - refs[heaviest]["evidence"]) <= F64 * max(1.0, abs(refs[heaviest]["evidence"]))
    mean = sum(wi * r["mean"] for wi, r in zip(w, refs))
    cov = sum(wi * (r["cov"] + np.einsum("ik,il->ikl", r["mean"] - mean, r["mean"] - mean)) for wi, r in zip(w, refs))
    got_mean, got_cov = clf.predict_logits(Js, return_var="full")
    assert_matches(got_mean, mean, backend, dtype=np.float64, rtol=F64)
    assert_matches(got_cov, cov, backend, dtype=np.float64, rtol=F64)
    _, got_var = clf.predict_logits(Js, return_var=True)
    assert_matches(got_var, np.diagonal(cov, axis1=1, axis2=2).copy(), backend, dtype=np.float64, rtol=F64)
    # class probabilities: the mixture of the points' probit probabilities
    probit = sum(wi * _probs(r["mean"] / np.sqrt(1 + np.pi / 8 * np.diagonal(r["cov"], axis1=1, axis2=2)),
                             "categorical") for wi, r in zip(w, refs))
    assert_matches(clf.predict_proba(Js), probit, backend, dtype=np.float64, rtol=F64)
    back = LaplaceClassifier.load(clf.save(tmp_path / "avg"), backend=backend.name)
    for method_ in ("probit", "mc"):
        np.testing.assert_array_equal(backend.to_numpy(back.predict_proba(Js, method=method_, n_samples=50)),
                                      backend.to_numpy(clf.predict_proba(Js, method=method_, n_samples=50)))
    clf.fit(J, y)  # a refit ends the average
    assert not any(hasattr(clf, name) for name in ("_mixture", "mixture_scales_", "mixture_weights_", "averaging_"))
    assert_matches(clf.predict_logits(Js), refs[heaviest]["mean"], backend, dtype=np.float64, rtol=F64)


@pytest.mark.filterwarnings("ignore:.*edge of the averaging grid:lingp_core.NumericalWarning")
def test_average_over_s_refuses_bad_options_and_leaves_the_model(backend, tmp_path):
    J, Js, y, _, _ = problem(backend)
    clf = LaplaceClassifier(0.8, rtol=1e-12).fit(J, y)
    before = backend.to_numpy(clf.predict_proba(Js))
    for bad, error, match in (({"grid_size": 2}, lg.ValueRangeError, "grid_size"),
                              ({"span": 0.0}, lg.ValueRangeError, "span must be"),
                              ({"keep_mass": 1.5}, lg.ValueRangeError, "keep_mass must lie"),
                              ({"span": 400.0}, lg.ValueRangeError, "leaves float64"),
                              ({"hyperprior": "flat"}, lg.InvalidOptionError, "hyperprior")):
        with pytest.raises(error, match=match):
            clf.average_prior_scale(**bad)
    with pytest.raises(lg.MemoryBudgetError, match="posterior states"):
        LaplaceClassifier(0.8, memory_budget=1e5).fit(J, y).average_prior_scale(grid_size=50)
    np.testing.assert_array_equal(backend.to_numpy(clf.predict_proba(Js)), before)
    with pytest.raises(NotFittedError, match="does not keep"):
        LaplaceClassifier.load(clf.save(tmp_path / "m"), backend=backend.name).average_prior_scale()
    clf.average_prior_scale(grid_size=3, span=0.5)
    arrays, config = lg.io.load_archive(clf.save(tmp_path / "avg"), "LaplaceClassifier")
    arrays["mixture_weights"] = arrays["mixture_weights"] * 2
    lg.io.save_archive(tmp_path / "bad", "LaplaceClassifier", arrays, config)
    with pytest.raises(ArchiveError, match="average over s"):
        LaplaceClassifier.load(tmp_path / "bad")
