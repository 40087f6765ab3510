"""The estimator contract under failure: fits, refits, optimizations and loads that fail or are interrupted leave the
model exactly as it was; memory guards, float32-kernel warnings and overflow errors in the user's terms.

The fault test interrupts at random points, two ways: a real SIGALRM timer whose handler raises KeyboardInterrupt
(where a user's Ctrl-C lands), and a trace function that raises at the k-th executed line of lingp's code (reaching
points a timer rarely hits). After each, the model must predict bit-for-bit as before.
"""
from __future__ import annotations

import signal
import sys
import time
import warnings

import numpy as np
import pytest
import torch

import lingp_core as lg
from lingp_core import _plan, io
from lingp_core._validate import format_bytes
from tests.helpers import assert_matches, dense_gp_posterior, tolerance
from tests.test_export import mlp

BACKEND = lg.get_backend("numpy")
LINGP = ("/lingp_core/", "/backends/")


def gp_problem(seed=0, n=14, n_star=6, c=2):
    torch.manual_seed(seed)
    model = mlp(torch.nn.Tanh, (3, 8, c)).double()
    x = torch.randn(n + n_star, 3, dtype=torch.float64)
    J = lg.export_jacobian(model, x[:n])
    J_star = lg.export_jacobian(model, x[n:])
    rng = np.random.default_rng(seed)
    y = J.f0 + 0.5 * rng.standard_normal(J.f0.shape)
    return model, x, J, J_star, y


def snapshot(model, J_star):
    if isinstance(model, lg.LinearizedGP):
        mean, var = model.predict(J_star, return_var=True)
        return [mean, var, np.array(model.log_marginal_likelihood()), np.array(model.prior_scale)]
    mean, var = model.predict_logits(J_star, return_var=True)
    return [mean, var, np.array(model.log_marginal_likelihood()), np.array(model.prior_scale)]


def _same(a, b):
    return all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


def assert_unchanged(model, J_star, before):
    after = snapshot(model, J_star)
    for a, b in zip(after, before):
        assert a.shape == b.shape and np.array_equal(a, b), "the model changed after a failed or interrupted call"


class _Interrupt(BaseException):
    """Stands for any failure: raised where KeyboardInterrupt would land."""


def _trace_after(k, error=KeyboardInterrupt):
    """A trace function raising ``error`` at the k-th line executed in lingp's own modules."""
    count = [0]

    def tracer(frame, event, arg):
        if not any(part in frame.f_code.co_filename for part in LINGP):
            return None
        if event == "line":
            count[0] += 1
            if count[0] == k:
                raise error("injected")
        return tracer
    return tracer, count


def _count_lines(call):
    tracer, count = _trace_after(-1)
    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(None)
    return count[0]


def _interrupt_by_trace(call, k, error=KeyboardInterrupt):
    tracer, _ = _trace_after(k, error)
    sys.settrace(tracer)
    try:
        call()
        return False
    except (KeyboardInterrupt, MemoryError):
        return True
    finally:
        sys.settrace(None)


def _interrupt_by_signal(call, delay):
    """Run ``call`` with a SIGALRM after ``delay`` seconds whose handler raises KeyboardInterrupt; True if it
    fired (before or after the call completed: the caller tells which from the model's state)."""
    fired = []

    def handler(signum, frame):
        fired.append(True)
        raise KeyboardInterrupt("SIGALRM")
    previous = signal.signal(signal.SIGALRM, handler)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, delay)
            call()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)  # the alarm may still land here: the outer handler takes it
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGALRM, previous)
    return bool(fired)


def _calls(kind):
    """(a fitted model, its test Jacobian, the calls that may be interrupted: refit, optimize, another method)."""
    net, _, J, J_star, y = gp_problem(0)
    x2 = torch.randn(14, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    J2 = lg.export_jacobian(net, x2)  # other data, the same network: the refitted model predicts on J_star too
    y2 = J2.f0 + np.cos(np.arange(J2.f0.size)).reshape(J2.f0.shape)
    if kind == "gp-full":
        model = lg.LinearizedGP(0.7, 0.05).fit(J, y)
        calls = [lambda: model.fit(J2, y2), lambda: model.optimize_hyperparameters(max_iter=5),
                 lambda: model.optimize_hyperparameters(per_output_noise=True, max_iter=3)]
    elif kind == "gp-independent":
        model = lg.LinearizedGP(0.7, np.array([0.05, 0.1]), output_mode="independent",
                                method="function-cholesky").fit(J, y)
        calls = [lambda: model.fit(J2, y2), lambda: model.optimize_hyperparameters(max_iter=5)]
    elif kind == "gp-trace-averaged":
        model = lg.LinearizedGP(0.7, 0.05, output_mode="trace").fit(J, y)
        calls = [lambda: model.fit(J2, y2), lambda: model.average_hyperparameters(grid_size=5, hyperprior="data"),
                 lambda: model.optimize_hyperparameters(criterion="loo", max_iter=5)]
    elif kind == "dirichlet":
        labels = np.argmax(J.f0, axis=1)
        labels2 = np.argmax(J2.f0 + 0.3, axis=1)[::-1].copy()
        model = lg.DirichletClassifier(0.5).fit(J, labels)
        calls = [lambda: model.fit(J2, labels2), lambda: model.optimize_prior_scale(max_iter=5)]
    else:
        labels = np.argmax(J.f0, axis=1)
        labels2 = np.argmax(J2.f0 + 0.3, axis=1)[::-1].copy()
        model = lg.LaplaceClassifier(1.0, method=kind.split("-")[1]).fit(J, labels)
        calls = [lambda: model.fit(J2, labels2), lambda: model.optimize_prior_scale(max_iter=5)]
    return model, J_star, calls


@pytest.mark.parametrize("kind", ["gp-full", "gp-independent", "gp-trace-averaged", "dirichlet", "laplace-parameter",
                                  "laplace-function"])
def test_interrupted_fits_leave_the_model_exactly_as_it_was(kind):
    """Per model kind, 30 interrupts and failures at random points of refit and optimize: timer signals, and
    KeyboardInterrupt or MemoryError raised at a random traced line."""
    model, J_star, calls = _calls(kind)
    before = snapshot(model, J_star)
    rng = np.random.default_rng(123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optimizer warnings from the completed runs are beside the point here
        lines = []
        durations = []
        for call in calls:  # sizes of each call, measured on a throwaway model
            probe, _, probe_calls = _calls(kind)
            lines.append(_count_lines(probe_calls[calls.index(call)]))
            start = time.perf_counter()
            _calls(kind)[2][calls.index(call)]()
            durations.append(time.perf_counter() - start)
        completed = []  # each call's result on a throwaway model: the only other state the model may be in
        for index in range(len(calls)):
            probe, _, probe_calls = _calls(kind)
            probe_calls[index]()
            completed.append(snapshot(probe, J_star))
        interrupted = 0
        for trial in range(30):
            which = int(rng.integers(len(calls)))
            if trial % 2:
                error = KeyboardInterrupt if trial % 4 == 1 else MemoryError
                hit = _interrupt_by_trace(calls[which], int(rng.integers(1, lines[which] + 1)), error)
            else:
                hit = _interrupt_by_signal(calls[which], float(rng.uniform(1e-5, durations[which])))
            after = snapshot(model, J_star)
            if _same(after, completed[which]) and not _same(after, before):
                model, J_star, calls = _calls(kind)  # it completed (the interrupt came too late): start over
                continue
            assert _same(after, before), "the model changed after a failed or interrupted call"
            interrupted += hit
    assert interrupted >= 15, f"only {interrupted} of 30 calls were interrupted: the injection misses the fit"


def test_a_failed_refit_leaves_the_gp_as_it_was():
    """The issue's case: J finite, J Jᵀ overflows → NonFiniteError naming the kernel; predictions unchanged."""
    model_net, x, J, J_star, y = gp_problem(0)
    gp = lg.LinearizedGP(1.0, 0.1).fit(J, y)
    before = snapshot(gp, J_star)
    J_huge = lg.export_jacobian(model_net, x[:14] * 1e200)
    assert np.isfinite(J_huge.to_dense()).all()
    with pytest.raises(lg.NonFiniteError, match="kernel s·J J'ᵀ overflows"):
        gp.fit(J_huge, y)
    assert_unchanged(gp, J_star, before)


def test_a_failed_refit_leaves_the_laplace_classifier_as_it_was():
    _, _, J, J_star, _ = gp_problem(0)
    labels = np.argmax(J.f0, axis=1)
    clf = lg.LaplaceClassifier(1.0).fit(J, labels)
    before = snapshot(clf, J_star)
    with pytest.raises(lg.LingpError):
        clf.fit(J, labels + 7)  # labels out of range
    with pytest.raises(lg.LingpError):
        clf.fit(J, labels, prior_mean=np.full(J.p + 1, 0.0))
    assert_unchanged(clf, J_star, before)


@pytest.mark.parametrize("kind", ["gp", "laplace-function", "laplace-parameter", "dirichlet"])
def test_a_parameter_set_after_the_fit_is_refused_until_a_refit(tmp_path, kind):
    """Setting prior_scale (or noise) on a fitted model, sklearn-style, then predicting or saving without a refit
    (or after a refit that failed) mixed the new value with the old posterior: the function-space Laplace predicted
    at the new s (51× off), an archive stored the new s with the old state (its load predicted 3e6 off). Now each
    refuses, naming the change; setting it back, or refitting, restores them."""
    _, _, J, J_star, y = gp_problem(0)
    labels = np.argmax(J.f0, axis=1)
    model = {"gp": lambda: lg.LinearizedGP(1.0, 0.1).fit(J, y),
             "laplace-function": lambda: lg.LaplaceClassifier(1.0, method="function").fit(J, labels),
             "laplace-parameter": lambda: lg.LaplaceClassifier(1.0, method="parameter").fit(J, labels),
             "dirichlet": lambda: lg.DirichletClassifier(1.0).fit(J, labels)}[kind]()
    before = snapshot(model, J_star) if kind != "dirichlet" else None
    model.prior_scale = 100.0
    predict = model.predict if isinstance(model, lg.LinearizedGP) else model.predict_logits
    for call in (lambda: predict(J_star), model.log_marginal_likelihood, lambda: model.save(tmp_path / "m")):
        with pytest.raises(lg.InvalidOptionError, match=r"prior_scale is 100.0, fitted with 1.0"):
            call()
    assert not list(tmp_path.iterdir())  # nothing written
    with pytest.raises(lg.LingpError):  # a refit that fails keeps the old posterior, and the refusal
        model.fit(J, labels + 7 if kind != "gp" else y[:3])
    with pytest.raises(lg.InvalidOptionError, match="changed after its fit"):
        predict(J_star)
    model.prior_scale = 1.0
    if before is not None:
        assert_unchanged(model, J_star, before)
    model.prior_scale = 100.0
    model.fit(J, y if kind == "gp" else labels)
    loaded = type(model).load(model.save(tmp_path / "refit"))
    assert loaded.prior_scale == 100.0
    np.testing.assert_array_equal(predict(J_star), (loaded.predict if kind in ("gp", "dirichlet")
                                                    else loaded.predict_logits)(J_star))


def test_no_test_inputs_give_empty_predictions_everywhere():
    """n* = 0 (a filtered test set can be empty): sample and the weight-space Laplace probabilities raised bare
    ValueError / ZeroDivisionError; every prediction is now an empty array of the documented shape."""
    _, _, J, J_star, y = gp_problem(0)
    empty = J_star.examples(slice(0, 0))
    for mode in ("full", "independent", "trace"):
        gp = lg.LinearizedGP(1.0, 0.1, output_mode=mode).fit(J, y)
        assert gp.sample(empty, 3).shape == (3, 0, 2)
        assert [a.shape for a in gp.predict(empty, return_var=True)] == [(0, 2), (0, 2)]
    labels = np.argmax(J.f0, axis=1)
    for method in ("parameter", "function"):
        clf = lg.LaplaceClassifier(1.0, method=method).fit(J, labels)
        for how in ("probit", "mc"):
            assert clf.predict_proba(empty, method=how).shape == (0, 2)
        assert clf.predict_logits(empty, return_var="full")[1].shape == (0, 2, 2)


def test_interrupted_load_leaves_the_archive_and_a_later_load_intact(tmp_path):
    _, _, J, J_star, y = gp_problem(0)
    gp = lg.LinearizedGP(0.7, 0.05, method="function-cholesky").fit(J, y)
    path = gp.save(tmp_path / "gp.npz")
    before = snapshot(gp, J_star)
    lines = _count_lines(lambda: lg.LinearizedGP.load(path))
    for k in np.random.default_rng(0).integers(1, lines + 1, size=10):
        _interrupt_by_trace(lambda: lg.LinearizedGP.load(path), int(k))
    assert_unchanged(lg.LinearizedGP.load(path), J_star, before)


# ----- memory guards ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["parameter-cholesky", "parameter-spectral", "function-cholesky",
                                    "function-spectral"])
def test_forced_methods_are_checked_against_the_budget_before_allocating(method):
    _, _, J, _, y = gp_problem(0, n=40)
    m, p = J.n * J.n_outputs, J.p
    square = p if method.startswith("parameter") else m
    budget = 8 * square * square  # one float64 square matrix: every method needs more than that
    with pytest.raises(lg.MemoryBudgetError, match=rf"method='{method}'"):
        lg.LinearizedGP(0.7, 0.05, method=method, memory_budget=budget).fit(J, y)
    gp = lg.LinearizedGP(0.7, 0.05, method=method, memory_budget=50 * budget).fit(J, y)
    assert gp.plan_.method == method


def test_laplace_is_checked_against_the_budget():
    _, _, J, _, _ = gp_problem(0)
    labels = np.argmax(J.f0, axis=1)
    with pytest.raises(lg.MemoryBudgetError, match="parameter-space Laplace"):
        lg.LaplaceClassifier(1.0, method="parameter", memory_budget=8 * J.p * J.p).fit(J, labels)


# ----- float32 kernels ----------------------------------------------------------------------------------------------

def test_float32_kernel_warns_where_its_rounding_swamps_the_noise():
    """Duplicated training points with noise 1e-10: the float32 kernel's answer is far off; lingp says so."""
    _, x, _, J_star, _ = gp_problem(0)
    model = mlp(torch.nn.Tanh, (3, 8, 1)).double()
    xd = torch.cat([x[:10], x[:10]])
    J = lg.export_jacobian(model, xd)
    Js = lg.export_jacobian(model, x[14:])
    y = J.f0 + np.sin(np.arange(20.0))[:, None] * 0.1
    exact = lg.LinearizedGP(1.0, 1e-10).fit(J, y)
    with pytest.warns(lg.NumericalWarning, match="kernel_dtype='float32'"):
        rough = lg.LinearizedGP(1.0, 1e-10, kernel_dtype="float32").fit(J, y)
    estimate = rough.diagnostics_[0]["kernel_float32_error"]
    error = np.abs(rough.predict(Js) - exact.predict(Js)).max() / np.abs(exact.predict(Js) - Js.f0).max()
    assert estimate > lg.gp.FLOAT32_KERNEL_WARN
    # how far off the float32 answer lands depends on the BLAS's rounding (OpenBLAS here: ~4e3 relative; the
    # H200 image's: 3e-5, its duplicated kernel rows rounding identically); the estimate bounds it either way
    assert error <= estimate


def test_float32_kernel_is_quiet_and_accurate_where_the_noise_dominates_its_rounding():
    _, _, J, J_star, y = gp_problem(0)
    exact = lg.LinearizedGP(0.7, 0.05).fit(J, y)
    rough = lg.LinearizedGP(0.7, 0.05, kernel_dtype="float32").fit(J, y)  # filterwarnings=error: no warning
    estimate = rough.diagnostics_[0]["kernel_float32_error"]
    assert 0 < estimate < lg.gp.FLOAT32_KERNEL_WARN
    error = np.abs(rough.predict(J_star) - exact.predict(J_star)).max() / np.abs(exact.predict(J_star)).max()
    assert error <= estimate
    assert error > 1e-12, "kernel_dtype='float32' was not applied (the answer equals the float64 one)"
    assert exact.diagnostics_[0]["kernel_float32_error"] == 0.0


# ----- overflow in the user's terms -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_kernel_error_estimate_covers_decaying_columns(seed):
    """Columns decaying like exp(−j/50) (a few directions carry the kernel): the posterior mean's float32 error
    exceeded 2·u₃₂·s·λmax/σ², the estimate without its safety factor of 2, on two of these three problems (1.1×;
    up to 2.6× in measured ones of this kind, gp.FLOAT32_KERNEL_SAFETY)."""
    rng = np.random.default_rng(seed)
    n, p, noise = 200, 600, 0.1
    Jd = rng.standard_normal((n, p)) / np.sqrt(p) * np.exp(-np.arange(p) / 50)
    Js = Jd[:50] + 0.1 * rng.standard_normal((50, p)) / np.sqrt(p)
    y = rng.standard_normal((n, 1))

    def jacobian(values):
        return lg.JacobianBlocks(np.zeros((len(values), 1)), [lg.DenseBlock(["w"], [(p,)], values, 1, np)],
                                 backend=BACKEND, outputs=(0,))
    rough = lg.LinearizedGP(1.0, noise, method="function-cholesky", kernel_dtype="float32").fit(jacobian(Jd), y)
    mean = rough.predict(jacobian(Js))[:, 0]
    exact = Js @ Jd.T @ np.linalg.solve(Jd @ Jd.T + noise * np.eye(n), y[:, 0])  # the float64 dense oracle
    error = np.abs(mean - exact).max() / np.abs(exact).max()
    assert 1e-12 < error <= rough.diagnostics_[0]["kernel_float32_error"]


def test_predictions_that_overflow_raise_naming_the_test_jacobian():
    net, x, J, _, y = gp_problem(0)
    gp = lg.LinearizedGP(1.0, 0.1).fit(J, y)
    J_far = lg.export_jacobian(net, x[14:] * 1e160)
    with pytest.raises(lg.NonFiniteError, match="overflow"):
        gp.predict(J_far, return_var=True)


def test_a_marginal_likelihood_that_overflows_raises_naming_the_targets(tmp_path):
    _, _, J, J_star, y = gp_problem(0)
    gp = lg.LinearizedGP(1.0, 0.1, method="function-spectral").fit(J, y * 1e200)
    with pytest.raises(lg.NonFiniteError, match="targets"):
        gp.log_marginal_likelihood()
    # the predictions are finite: the model saves (save failed on the evidence before), and its load says so too
    loaded = lg.LinearizedGP.load(gp.save(tmp_path / "huge"))
    np.testing.assert_array_equal(loaded.predict(J_star), gp.predict(J_star))
    with pytest.raises(lg.NonFiniteError, match="overflowed float64 when it was saved"):
        loaded.log_marginal_likelihood()


def test_bool_options_are_real_bools():
    _, _, J, J_star, y = gp_problem(0)
    gp = lg.LinearizedGP(1.0, 0.1).fit(J, y)
    with pytest.raises(lg.ArgumentTypeError, match="return_var"):
        gp.predict(J_star, return_var="no")
    clf = lg.LaplaceClassifier(1.0).fit(J, np.argmax(J.f0, axis=1))
    with pytest.raises(lg.InvalidOptionError, match="return_var"):
        clf.predict_logits(J_star, return_var="no")
    with pytest.raises(lg.ArgumentTypeError, match="progress"):
        lg.LinearizedGP(progress="yes")


# ----- archives -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gp-function", "gp-parameter", "laplace-parameter", "laplace-function"])
def test_archives_with_recomputed_checksums_but_wrong_shapes_are_refused(tmp_path, kind):
    """An edited archive whose checksums were recomputed (io.save_archive) must still fail at load, naming the
    array, for every state array of the model."""
    _, _, J, _, y = gp_problem(0, n=20)
    if kind.startswith("gp"):
        method = "function-cholesky" if kind == "gp-function" else "parameter-cholesky"
        model, cls, name = lg.LinearizedGP(0.7, 0.05, method=method).fit(J, y), lg.LinearizedGP, "LinearizedGP"
    else:
        model = lg.LaplaceClassifier(1.0, method=kind.split("-")[1]).fit(J, np.argmax(J.f0, axis=1))
        cls, name = lg.LaplaceClassifier, "LaplaceClassifier"
    path = model.save(tmp_path / "m.npz")
    arrays, config = io.load_archive(path, name)
    for key in sorted(arrays):
        if key.startswith("J_") and key != "J_f0":
            continue  # block arrays: checked by JacobianBlocks (tests/test_jacobian_blocks.py)
        edited = dict(arrays)
        edited[key] = np.concatenate([arrays[key].ravel(), [1.0]]) if arrays[key].ndim else arrays[key][None]
        io.save_archive(tmp_path / "edited.npz", name, edited, config)
        with pytest.raises(lg.ArchiveError, match=key):
            cls.load(tmp_path / "edited.npz")


def test_the_work_space_charge_scales_with_the_problem():
    """A 20 × 20 kernel under a 100 MB budget: the work space charged is the problem's, not a fixed 256 MiB."""
    _, _, J, _, y = gp_problem(0, n=10)
    K = lg.kernel(J, memory_budget=100e6)
    assert K.shape == (20, 20)
    assert np.allclose(K, J.to_dense() @ J.to_dense().T, rtol=1e-12, atol=0)
    assert J.gram(memory_budget=100e6).shape == (20, 20)
    lg.LinearizedGP(1.0, 0.1, memory_budget=100e6).fit(J, y)
    with pytest.raises(lg.MemoryBudgetError, match=r"\(20, 20\)"):
        lg.kernel(J, memory_budget=8 * 20 * 20)  # the kernel alone: no room for its work space


def test_both_models_refuse_a_test_jacobian_on_another_backend(cupy_backend):
    """One backend policy: a test Jacobian on another backend is an error for both models, never moved silently."""
    net, x, J, J_star, y = gp_problem(0)
    J_star_gpu = lg.export_jacobian(net.cuda(), x[14:].cuda(), backend="cupy")
    gp = lg.LinearizedGP(1.0, 0.1).fit(J, y)
    clf = lg.LaplaceClassifier(1.0).fit(J, np.argmax(J.f0, axis=1))
    with pytest.raises(lg.BackendMismatchError, match="backend='cupy'"):
        gp.predict(J_star_gpu)
    with pytest.raises(lg.BackendMismatchError, match="backend='cupy'"):
        clf.predict_proba(J_star_gpu)


def test_more_hostile_calls_fail_clearly():
    """Cases from a hostile sweep: huge prior scales, sample sizes over budget, conflicting aliases, and advice that
    does not point at the method that just failed."""
    net, x, J, J_star, y = gp_problem(0)
    for method in ("function-cholesky", "function-spectral", "parameter-cholesky", "parameter-spectral"):
        with pytest.raises(lg.ValueRangeError, match="prior_scale"):  # was a bare OverflowError from s**2
            lg.LinearizedGP(1e300, 0.1, method=method)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lg.NumericalWarning)  # jitter for the p × p precision's 1/s = 1e-150
            gp = lg.LinearizedGP(1e150, 0.1, method=method).fit(J, y)
            try:  # the largest prior variance accepted may also give a finite answer
                mean, var = gp.predict(J_star, return_var=True)
                assert np.isfinite(mean).all() and np.isfinite(var).all()
            except lg.NonFiniteError as error:
                assert "test Jacobian" in str(error)
    gp = lg.LinearizedGP(1.0, 0.1, memory_budget=200_000).fit(J, y)
    with pytest.raises(lg.MemoryBudgetError, match="joint samples"):
        gp.sample(J_star, 10**6)
    assert gp.sample(J_star, 3).shape == (3, J_star.n, J_star.n_outputs)
    with pytest.raises(lg.InvalidOptionError, match="disagree"):
        gp.optimize_hyperparameters(max_iter=5, maxiter=6)
    with pytest.raises(lg.MemoryBudgetError) as info:
        lg.LinearizedGP(1.0, 0.1, method="iterative", memory_budget=1000).fit(J, y)
    assert "use method='iterative'" not in str(info.value)


def test_the_planner_counts_the_kernels_work_space():
    """A budget that holds the kernel and its factor but not the assembly's work space fails in the planner, with
    the method's name, instead of later inside kernel() with advice for kernel() callers."""
    _, _, J, _, y = gp_problem(0, n=30)
    from lingp_core import _plan
    gp = lg.LinearizedGP(1.0, 0.1, method="function-cholesky")
    problem = _plan.problem_of(J, gp._layout, gp.noise, gp)
    assert problem.kernel_work > 0
    just_short = _plan.engine_bytes("function-cholesky", problem) - 1
    with pytest.raises(lg.MemoryBudgetError, match="method='function-cholesky'"):
        lg.LinearizedGP(1.0, 0.1, method="function-cholesky", memory_budget=just_short).fit(J, y)
    lg.LinearizedGP(1.0, 0.1, method="function-cholesky", memory_budget=just_short + 1).fit(J, y)


# ----- predictions within the memory budget -------------------------------------------------------------------------

def dense_problem(seed, n, p, n_star, c=1):
    """A one-block dense Jacobian (n·c, p) and test Jacobian (n*·c, p) with targets that are a linear function of
    the Jacobian's rows plus noise, and their float64 values."""
    rng = np.random.default_rng(seed)
    values, star = (rng.standard_normal((rows * c, p)) / np.sqrt(p) for rows in (n, n_star))
    targets = (values @ rng.standard_normal(p)).reshape(n, c) + 0.3 * rng.standard_normal((n, c))

    def jacobian(v):
        return lg.JacobianBlocks(np.zeros((v.shape[0] // c, c)), [lg.DenseBlock(["w"], [(p,)], v, c, np)],
                                 backend=BACKEND, outputs=tuple(range(c)))
    return jacobian(values), jacobian(star), targets, values, star


def traced_peak(work):
    """(``work()``, the bytes it allocated at its peak beyond what was allocated when it started)."""
    import gc
    import tracemalloc
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = work()
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("method, n, p, n_star, budget", [("function-cholesky", 300, 100, 2000, 12_000_000),
                                                         ("function-spectral", 300, 100, 2000, 12_000_000),
                                                         ("parameter-cholesky", 400, 100, 3000, 6_000_000)])
def test_predictions_stay_within_the_budget_by_chunks_of_test_inputs(method, n, p, n_star, budget):
    """Test sets whose cross kernel (or dense J*) with its work space fits the budget, but not the variances' arrays
    of the same size beside it: predict went over the budget (m = 1500, n* = 6000: 206 MiB at 116 MiB); now it
    works through chunks of test inputs within the budget, with the dense float64 answer."""
    J, J_star, y, Jd, Js = dense_problem(0, n, p, n_star)
    gp = lg.LinearizedGP(0.7, 0.05, method=method, memory_budget=budget).fit(J, y)
    (mean, var), peak = traced_peak(lambda: gp.predict(J_star, return_var=True))
    assert peak <= budget, (peak, budget)
    expected_mean, expected_var, C = dense_gp_posterior(Jd, np.zeros((n, 1)), Js, np.zeros((n_star, 1)), y[:, 0],
                                                        0.7, 0.05)
    rtol = tolerance(np.float64, 10 * np.linalg.cond(C))
    assert_matches(mean, expected_mean[:, None], BACKEND, dtype=np.float64, rtol=rtol)
    prior = 0.7 * np.einsum("ij,ij->i", Js, Js)  # prior − reduction variances round on the prior's scale
    assert_matches(var, expected_var[:, None], BACKEND, dtype=np.float64, rtol=rtol, atol=rtol * prior.max())


def test_a_covariance_over_the_budget_fails_before_allocating():
    """The covariance needs the whole test set at once: its cross kernel (n* × m) and the whitened rows as much
    again, not only the n* × n* result, are checked before anything is allocated."""
    J, J_star, y, _, _ = dense_problem(1, 2000, 2500, 60)
    gp = lg.LinearizedGP(0.7, 0.05, method="function-cholesky").fit(J, y)
    gp.memory_budget = 2_000_000  # the cross kernel alone, 60 × 2000 float64, is 0.96 MB
    import tracemalloc
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        shape = r"posterior covariance of shape \(60, 60\).*test inputs"
        with pytest.raises(lg.MemoryBudgetError, match=shape) as info:
            gp.predict(J_star, return_cov=True)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert "1.9 MiB" in str(info.value)
    assert peak < 60 * 2000 * 8  # refused before the cross kernel was allocated


# ----- what plan_ and the errors say around optimize_hyperparameters ------------------------------------------------

def test_per_output_noise_advice_does_not_name_the_method_that_failed():
    """p < n·c: 'auto' chose the parameter space, whose per-output noise in output_mode='full' cannot be optimized;
    the advice named "'auto'" as a remedy."""
    J, _, y, _, _ = dense_problem(2, 30, 10, 3, c=2)
    gp = lg.LinearizedGP(1.0, 0.1).fit(J, y)
    assert gp.plan_.method == "parameter-cholesky"
    with pytest.raises(lg.InvalidOptionError, match="function-cholesky") as info:
        gp.optimize_hyperparameters(per_output_noise=True)
    assert "'auto'" not in str(info.value)


def test_the_search_over_budget_advises_what_the_search_can_use():
    """A budget that holds the Cholesky fit but not the eigendecomposition beside it: the error advised
    method='iterative', which optimize_hyperparameters refuses."""
    J, _, y, _, _ = dense_problem(3, 120, 200, 3)
    problem = lg.LinearizedGP()._problem(J)
    gp = lg.LinearizedGP(1.0, 0.1, memory_budget=_plan.engine_bytes("function-cholesky", problem) + 1000).fit(J, y)
    with pytest.raises(lg.MemoryBudgetError, match="subset") as info:
        gp.optimize_hyperparameters()
    assert "iterative" not in str(info.value)


def test_after_a_search_the_plan_states_the_decomposition_it_keeps():
    """'auto' fitted by Cholesky, the search then kept an eigendecomposition: plan_.reason gave the Cholesky's
    bytes for it."""
    J, _, y, _, _ = dense_problem(4, 120, 200, 3)
    gp = lg.LinearizedGP(1.0, 0.1).fit(J, y)
    problem = gp._problem(J)
    gp.optimize_hyperparameters()
    assert gp.plan_.method == "function-spectral"
    assert format_bytes(_plan.engine_bytes("function-spectral", problem)) in gp.plan_.reason
    assert format_bytes(_plan.engine_bytes("function-cholesky", problem)) not in gp.plan_.reason
    assert "eigendecomposition" in gp.plan_.reason
