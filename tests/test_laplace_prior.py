"""Per-layer (per-block) prior variances of LaplaceClassifier against a dense float64 NumPy oracle.

The oracle (written here, independent of lingp's engines) takes J and f₀ from torch.func.jacrev of a float64 copy of
the model (tests.test_laplace.problem), runs damped Newton on Ψ(w) = NLL(f₀ + J w) + ½ (w − m)ᵀ S⁻¹ (w − m) with S
diagonal (one variance per column, constant over each block), the exact Hessian H = Jᵀ Λ J + S⁻¹, and computes the
evidence −Ψ(ŵ) − ½ log det(S H), the predictive covariances J*_i H⁻¹ J*_iᵀ and γ_g = p_g − tr((H⁻¹)_gg)/s_g.
"""
from __future__ import annotations

import numpy as np
import pytest

import lingp_core as lg
from lingp_core.laplace import LaplaceClassifier
from tests.helpers import assert_matches
from tests.test_laplace import _curvature_blocks, dense_map, network_parameters, problem

F64 = 1e-9  # as in test_laplace: Newton to rtol 1e-12 and Cholesky solves of well-conditioned systems
SCALES = (0.3, 2.0)  # the test MLP has two Linear layers: two blocks


# ----- the dense oracle ---------------------------------------------------------------------------------------------

def column_variances(J, scales):
    """The prior variance of every column (p,): scales[g] over block g of J."""
    return np.concatenate([np.full(size, s) for size, s in zip(J.block_sizes, scales)])


def block_slices(J):
    starts = np.cumsum([0, *J.block_sizes])
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]


def dense_ggn(J, g, likelihood):
    n, c = g.shape
    Jb = J.reshape(n, c, -1)
    return np.einsum("ikp,ikl,ilq->pq", Jb, _curvature_blocks(g, likelihood), Jb, optimize=True)


def dense_layerwise(d, y, J, scales, likelihood, m=None):
    """ŵ, H, evidence, predictive mean and covariances, and γ_g per block, for per-block prior variances."""
    f0, p = d["f0"], d["J"].shape[1]
    m = np.zeros(p) if m is None else m
    variances = column_variances(J, scales)
    w, psi = dense_map(d, y, variances, likelihood, m)
    g = f0 + (d["J"] @ w).reshape(f0.shape)
    H = dense_ggn(d["J"], g, likelihood) + np.diag(1.0 / variances)
    evidence = -psi - 0.5 * (np.sum(np.log(variances)) + np.linalg.slogdet(H)[1])
    Hinv = np.linalg.inv(H)
    n_star, c = d["f0s"].shape
    Js = d["Js"].reshape(n_star, c, p)
    cov = np.einsum("ikp,pq,ilq->ikl", Js, Hinv, Js)
    mean = d["f0s"] + (d["Js"] @ w).reshape(n_star, c)
    gamma = np.array([(b.stop - b.start) - np.trace(Hinv[b, b]) / s for b, s in zip(block_slices(J), scales)])
    sq = np.array([np.sum((w - m)[b] ** 2) for b in block_slices(J)])
    return {"w": w, "g": g, "evidence": evidence, "mean": mean, "cov": cov, "gamma": gamma, "sq": sq, "m": m}


# ----- posterior and evidence ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("prior", ["network", "origin"])
@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
def test_block_scales_match_dense_newton(backend, likelihood, prior):
    J, Js, y, y_np, d = problem(backend, likelihood)
    m, m_np = network_parameters(J, backend, d) if prior == "origin" else (None, None)
    clf = LaplaceClassifier(SCALES, likelihood, rtol=1e-12).fit(J, y, prior_mean=m)
    ref = dense_layerwise(d, y_np, J, SCALES, likelihood, m_np)
    # n·c ≤ p here, so "auto" would take the function space for one scale; per-block scales need the weight space
    assert clf.plan_.space == "parameter" and "per-block" in clf.plan_.reason
    assert clf.prior_scale == SCALES and clf.fit_info_["converged"]
    assert_matches(clf.w_map_, ref["w"], backend, dtype=np.float64, rtol=F64)
    assert abs(clf.log_evidence() - ref["evidence"]) <= F64 * max(1.0, abs(ref["evidence"]))
    mean, cov = clf.predict_logits(Js, return_var="full")
    assert_matches(mean, ref["mean"], backend, dtype=np.float64, rtol=F64)
    assert_matches(cov, ref["cov"], backend, dtype=np.float64, rtol=F64)
    engine = clf._engine
    np.testing.assert_allclose(engine.group_effective_parameters(), ref["gamma"], rtol=F64)
    np.testing.assert_allclose(engine.group_sq_norms(), ref["sq"], rtol=F64)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
def test_equal_block_scales_reproduce_the_scalar_model(backend, likelihood):
    """The same prior written per block: the same arithmetic up to the order of a few sums."""
    J, Js, y, _, d = problem(backend, likelihood)
    m, _ = network_parameters(J, backend, d)
    one = LaplaceClassifier(0.7, likelihood, method="parameter", rtol=1e-12).fit(J, y, prior_mean=m)
    per_block = LaplaceClassifier((0.7, 0.7), likelihood, rtol=1e-12).fit(J, y, prior_mean=m)
    tight = 100 * np.finfo(np.float64).eps
    np.testing.assert_array_equal(backend.to_numpy(per_block.w_map_), backend.to_numpy(one.w_map_))
    assert abs(per_block.log_evidence() - one.log_evidence()) <= tight * abs(one.log_evidence())
    for a, b in zip(one.predict_logits(Js, return_var="full"), per_block.predict_logits(Js, return_var="full")):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    gamma_one = one._engine.effective_parameters()
    assert abs(per_block._engine.effective_parameters() - gamma_one) <= tight * gamma_one


# ----- the per-block evidence fixed point ---------------------------------------------------------------------------

def held_evidence(d, y, J, scales, m, ggn):
    """The evidence with the curvature held at ``ggn`` (the MAP still re-solved): the function whose stationarity
    MacKay's per-block condition is (see laplace.py's docstring)."""
    variances = column_variances(J, scales)
    w, psi = dense_map(d, y, variances, "categorical", m)
    return -psi - 0.5 * (np.sum(np.log(variances)) + np.linalg.slogdet(ggn + np.diag(1.0 / variances))[1])


def test_layerwise_fixed_point_is_a_stationary_point_of_the_evidence(backend):
    J, _, y, y_np, d = problem(backend)
    m, m_np = network_parameters(J, backend, d)
    clf = LaplaceClassifier(0.05, method="parameter", rtol=1e-12).fit(J, y, prior_mean=m)
    with np.errstate(all="raise"):
        clf.optimize_prior_scale(layerwise=True, tol=1e-7)
    scales = clf.prior_scale
    assert isinstance(scales, tuple) and len(scales) == 2 and all(1e-6 < s < 1e6 for s in scales)
    ref = dense_layerwise(d, y_np, J, scales, "categorical", m_np)
    assert abs(clf.log_evidence() - ref["evidence"]) <= F64 * abs(ref["evidence"])
    # MacKay's condition per block: ‖ŵ_g − m_g‖² / s_g = γ_g at the MAP of the s_g
    np.testing.assert_allclose(ref["sq"] / np.array(scales), ref["gamma"], rtol=1e-6)
    # ... i.e. the evidence with Λ held at this MAP is stationary in every log s_g (central differences)
    ggn = dense_ggn(d["J"], ref["g"], "categorical")
    h = 1e-4
    for g in range(2):
        ends = [held_evidence(d, y_np, J, tuple(s * np.exp(sign * h) if k == g else s
                                                 for k, s in enumerate(scales)), m_np, ggn) for sign in (1, -1)]
        slope = (ends[0] - ends[1]) / (2 * h)
        size = ref["sq"][g] / (2 * scales[g])  # each of the two terms that cancel in the slope
        assert abs(slope) <= 1e-5 * size
    history = clf.prior_scale_history_
    assert history[0][0] == (0.05, 0.05) and history[-1][0] == scales and len(history) >= 3


def test_layerwise_with_estimated_gamma_stops_on_the_exact_condition(backend, monkeypatch):
    """Forced onto the Hutchinson path (as above p = 1024), the last steps still use the exact γ_g."""
    import lingp_core.laplace as laplace_module

    monkeypatch.setattr(laplace_module, "_EXACT_TRACE_MAX", 0)
    J, _, y, y_np, d = problem(backend)
    m, m_np = network_parameters(J, backend, d)
    tol = 1e-3
    clf = LaplaceClassifier(0.05, method="parameter", rtol=1e-12).fit(J, y, prior_mean=m)
    clf.optimize_prior_scale(layerwise=True, tol=tol)
    ref = dense_layerwise(d, y_np, J, clf.prior_scale, "categorical", m_np)
    # a further step would move each log s_g by less than tol: |φ_g| ≤ tol·|φ_g'|, |φ_g'| ≤ 1.5 on this problem
    assert np.abs(np.log(ref["sq"] / (np.array(clf.prior_scale) * ref["gamma"]))).max() <= 1.5 * tol


def test_a_block_the_evidence_switches_off_warns(backend):
    """Labels the network already predicts and the prior centred at the network: the first layer need not move
    from it, so the evidence rises as its s_g falls; the search ends at the lower bound and names the block."""
    J, _, _, y_np, d = problem(backend)
    y = backend.asarray(np.argmax(d["f0"], axis=1))
    clf = LaplaceClassifier(0.05, method="parameter", rtol=1e-12).fit(J, y)
    with pytest.warns(lg.NumericalWarning, match=r"\['0\.weight', '0\.bias'\]\] reached the lower bound 1e-06.*off"):
        clf.optimize_prior_scale(layerwise=True, bounds=(1e-6, 1e6), tol=1e-6)
    assert clf.prior_scale[0] == 1e-6 and 1e-6 < clf.prior_scale[1] < 1e6
    ref = dense_layerwise(d, np.argmax(d["f0"], axis=1), J, clf.prior_scale, "categorical")
    assert ref["sq"][0] / (clf.prior_scale[0] * ref["gamma"][0]) < 1  # the update would lower s_0 further
    assert abs(np.log(ref["sq"][1] / (clf.prior_scale[1] * ref["gamma"][1]))) <= 1.5e-6  # block 1 at its fixed point


# ----- persistence and errors ---------------------------------------------------------------------------------------

def test_save_load_keeps_the_block_scales(backend, tmp_path):
    J, Js, y, _, d = problem(backend)
    m, _ = network_parameters(J, backend, d)
    clf = LaplaceClassifier(0.05, method="parameter").fit(J, y, prior_mean=m)
    clf.optimize_prior_scale(layerwise=True, tol=1e-3)
    loaded = LaplaceClassifier.load(clf.save(tmp_path / "clf"), backend=backend.name)
    assert isinstance(loaded.prior_scale, tuple) and loaded.prior_scale == clf.prior_scale
    assert loaded.log_evidence() == clf.log_evidence() and repr(loaded) == repr(clf)
    for a, b in zip(clf.predict_logits(Js, return_var="full"), loaded.predict_logits(Js, return_var="full")):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))


def test_bad_block_scales_raise_clear_errors(backend):
    J, _, y, _, _ = problem(backend)
    for bad, error, match in [((0.3, -1.0), lg.ValueRangeError, r"prior_scale\[1\]"),
                              ((0.3, float("nan")), lg.ValueRangeError, r"prior_scale\[1\]"),
                              ((), lg.ShapeError, "non-empty"),
                              (np.ones((2, 1)), lg.ShapeError, r"\(2, 1\)"),
                              ((0.3, "1"), lg.ArgumentTypeError, r"prior_scale\[1\]"),
                              ("0.3", lg.ArgumentTypeError, "prior_scale")]:
        with pytest.raises(error, match=match):
            LaplaceClassifier(bad)
    with pytest.raises(lg.ShapeError, match=r"3 prior variances.*2 blocks"):
        LaplaceClassifier((0.3, 0.3, 0.3)).fit(J, y)
    with pytest.raises(lg.InvalidOptionError, match="weight-space"):
        LaplaceClassifier(SCALES, method="function").fit(J, y)
    with pytest.raises(lg.InvalidOptionError, match="weight-space"):
        LaplaceClassifier(0.3, method="function").fit(J, y).optimize_prior_scale(layerwise=True)
    clf = LaplaceClassifier(SCALES).fit(J, y)
    with pytest.raises(lg.InvalidOptionError, match="layerwise=True"):
        clf.optimize_prior_scale()
    with pytest.raises(lg.ArgumentTypeError, match="layerwise"):
        clf.optimize_prior_scale(layerwise="yes")
    assert clf.prior_scale == SCALES  # the failed calls left the model as it was
