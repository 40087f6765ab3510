"""LinearizedGP's planner: its choices for given sizes and budgets (no device needed: budgets are passed in)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import lingp_core as lg
from lingp_core import _plan
from lingp_core._validate import format_bytes, resolve_memory_budget

GIB = 1024**3
PAPER_P = 803_601  # the paper's speed-test MLP
PAPER_WORK = 100_000 * 4810 * 8 + 2 * 1024 * 4810 * 8 + 2 * 8 * 1024 * 1024  # its kernel's assembly at n = 1e5


def problem(m, p=PAPER_P, work=PAPER_WORK, groups=1):
    return _plan.Problem(tasks=1, m=m, q=1, p=p, kernel_itemsize=8, noise_groups=groups, preconditioner_rank=100,
                         variance_rank=200, kernel_work=work)


def choose(pb, budget, method="auto", exact_max_rows=None):
    return _plan.choose(method, pb, int(budget), parameter_ok=True, per_row_noise=False,
                        exact_max_rows=exact_max_rows)


@pytest.mark.parametrize("m", [10_000, 50_000, 100_000])
def test_an_h200_factors_the_paper_problem_exactly_up_to_1e5_rows(m):
    """95% of an H200's 139 GiB holds the n·c = 1e5 kernel (80 GB) with its work space: exact, and plan_ says the
    numbers."""
    plan = choose(problem(m), 0.95 * 139 * GIB)
    assert plan.method == "function-cholesky"
    assert "budget" in plan.reason and "GiB" in plan.reason


def test_over_budget_goes_iterative_and_says_why():
    plan = choose(problem(100_000), 70 * GIB)  # an 80 GB card's share
    assert plan.method == "iterative"
    assert "over the budget of 70.0 GiB" in plan.reason
    capped = choose(problem(50_000), 139 * GIB, exact_max_rows=20_000)
    assert capped.method == "iterative" and "exact_max_rows = 20000" in capped.reason


def test_engine_bytes_are_the_kernel_plus_what_the_method_adds():
    pb = problem(30_000, work=0)
    assert _plan.engine_bytes("function-cholesky", pb) == 8 * 30_000**2 + 8 * 30_000
    two_groups = problem(30_000, work=0, groups=2)  # a second noise group needs a factor of its own
    assert _plan.engine_bytes("function-cholesky", two_groups) == 2 * 8 * 30_000**2 + 8 * 30_000
    small_p = problem(30_000, p=2_000, work=0)
    assert _plan.engine_bytes("parameter-cholesky", small_p) == 2 * 8 * 30_000 * 2_000 + 2 * 8 * 2_000**2 + 8 * 2_000


def test_the_smaller_exact_system_wins_when_it_fits():
    assert choose(problem(30_000, p=2_000), 64 * GIB).method == "parameter-cholesky"
    assert choose(problem(1_000, p=2_000), 64 * GIB).method == "function-cholesky"


def test_a_forced_method_over_budget_fails_before_allocating():
    with pytest.raises(lg.MemoryBudgetError, match="method='function-cholesky'"):
        choose(problem(100_000), 70 * GIB, method="function-cholesky")


def test_default_budgets_are_the_backends_share_of_free_memory():
    numpy_backend = lg.get_backend("numpy")
    free = numpy_backend.free_memory().arrays
    budget = resolve_memory_budget(None, numpy_backend)
    assert numpy_backend.budget_fraction == 0.5
    assert abs(budget - 0.5 * free) <= 0.05 * free  # free memory moves between the two readings
    assert resolve_memory_budget(123_456, numpy_backend) == 123_456


def test_a_fitted_plan_reports_its_budget():
    rng = np.random.default_rng(0)
    J = lg.JacobianBlocks(np.zeros((6, 1)), [lg.DenseBlock(["w"], [(4,)], rng.standard_normal((6, 4)), 1, np)],
                         backend=lg.get_backend("numpy"), outputs=(0,))
    gp = lg.LinearizedGP(1.0, 0.1, memory_budget=10**6).fit(J, rng.standard_normal((6, 1)))
    assert gp.plan_.method == "parameter-cholesky" and "budget of 976.6 KiB" in gp.plan_.reason


# ----- the iterative engine's memory ---------------------------------------------------------------------------------

def dense_jacobian(rng, n, p, c=1, dtype=np.float64):
    """A one-block Jacobian of n examples and c outputs, (n·c, p) in ``dtype``, with its float64 dense values."""
    values = (rng.standard_normal((n * c, p)) / np.sqrt(p)).astype(dtype)
    J = lg.JacobianBlocks(np.zeros((n, c), dtype=dtype), [lg.DenseBlock(["w"], [(p,)], values, c, np)],
                         backend=lg.get_backend("numpy"), outputs=tuple(range(c)))
    return J, values.astype(np.float64)


def traced_peak(work):
    """Bytes ``work()`` allocates at its peak beyond what was allocated when it started (NumPy reports its arrays to
    tracemalloc)."""
    import gc
    import tracemalloc
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        work()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("c, mode, dtype", [(1, "full", np.float64), (1, "full", np.float32), (3, "full", np.float64),
                                            (3, "independent", np.float32), (3, "trace", np.float32)])
def test_the_iterative_estimate_bounds_what_the_engine_allocates(c, mode, dtype):
    """The planner's bytes for "iterative" bound the traced peak of a fit, and with a prediction's own bytes the
    peak of a fit and a prediction that builds the variance cache; they are within 3× of the fit's peak: no
    kernel-assembly work space, which the matrix-free engine never allocates (n = 1500, p = 2000 was refused at a
    10 MiB budget as needing 50.8 MiB while its fit peaked at 3.9 MiB)."""
    rng = np.random.default_rng(1)
    n, p = 240 // c, 320
    J, _ = dense_jacobian(rng, n, p, c, dtype)
    J_star, _ = dense_jacobian(rng, 1, p, c, dtype)
    y = rng.standard_normal((n, c))
    # variances from the Lanczos cache (the engine's largest state); a float32 kernel for a float32 Jacobian, so the
    # prediction's cross kernel is no converted copy of J (the prediction's, checked where it is built)
    gp = lg.LinearizedGP(1.0, 0.1, output_mode=mode, method="iterative", preconditioner_rank=20, variance_rank=30,
                         variance_cg_max=0, kernel_dtype=dtype)
    gp.fit(J, y).predict(J_star, return_var=True)  # once untraced: first calls' imports and caches are no part of it
    fit_peak = traced_peak(lambda: gp.fit(J, y))
    peak = traced_peak(lambda: gp.fit(J, y).predict(J_star, return_var=True))
    pb = gp._problem(J)
    estimate = _plan.engine_bytes("iterative", pb)
    copy = 0 if dtype == np.float64 else 8 * p
    prediction = (c if mode == "full" else 1) * _plan.prediction_row_bytes("iterative", pb, True, copy)
    assert fit_peak <= estimate <= 3 * fit_peak, (fit_peak, estimate)
    assert peak <= estimate + prediction, (peak, estimate, prediction)


def test_auto_goes_iterative_when_only_the_matrix_free_engine_fits():
    """A budget below the exact kernel's but above what CG, its preconditioner and variance cache need: "auto" goes
    iterative and "iterative" fits (both raised while the kernel's assembly space was charged to CG)."""
    rng = np.random.default_rng(2)
    J, _ = dense_jacobian(rng, 300, 400)
    y = rng.standard_normal((300, 1))
    budget = 3_000_000
    problem = lg.LinearizedGP()._problem(J)
    assert _plan.engine_bytes("function-cholesky", problem) > budget
    gp = lg.LinearizedGP(1.0, 0.1, memory_budget=budget).fit(J, y)
    assert gp.plan_.method == "iterative"
    assert lg.LinearizedGP(1.0, 0.1, method="iterative", memory_budget=budget).fit(J, y).plan_.method == "iterative"


def test_iterative_advice_names_what_would_help():
    """Over budget, "iterative" names its own terms (ranks; a float32 Jacobian's float64 copy), never
    output_mode='independent', which keeps the same bytes per example (and trace has n rows per task already)."""
    rng = np.random.default_rng(3)
    for c, mode, dtype in ((1, "full", np.float64), (3, "trace", np.float64), (2, "full", np.float32)):
        J, _ = dense_jacobian(rng, 50, 30, c, dtype)
        pb = lg.LinearizedGP(output_mode=mode)._problem(J)
        with pytest.raises(lg.MemoryBudgetError) as info:
            _plan.check_fits("iterative", pb, 1000)
        message = str(info.value)
        assert "independent" not in message and "preconditioner_rank" in message
        assert ("float64 copy" in message) == (dtype == np.float32)


# ----- plan_.reason says what happened -------------------------------------------------------------------------------

def choose_trace(pb, budget, method="auto"):
    pb = dataclasses.replace(pb, mode="trace")
    return _plan.choose(method, pb, int(budget), parameter_ok=False, per_row_noise=False, exact_max_rows=None)


def test_reasons_in_trace_mode_do_not_claim_a_parameter_space():
    """output_mode='trace' has no parameter-space form: with p < rows its exact reason does not claim rows ≤ p or the
    smaller space, and its iterative reason states the kernel's bytes, not the p × p precision's."""
    pb = dataclasses.replace(problem(500, p=10, work=0), preconditioner_rank=1, variance_rank=1)
    kernel = _plan.engine_bytes("function-cholesky", pb)
    exact = choose_trace(pb, 2 * kernel)
    assert exact.method == "function-cholesky"
    assert "≤ p" not in exact.reason and "trace" in exact.reason
    spectral = choose_trace(pb, 10 * kernel, method="spectral")
    assert "smaller space" not in spectral.reason and "trace" in spectral.reason
    iterative = choose_trace(pb, kernel - 1)
    assert iterative.method == "iterative"
    assert format_bytes(kernel) in iterative.reason
    assert format_bytes(_plan.engine_bytes("parameter-cholesky", pb)) not in iterative.reason


def test_reasons_say_why_the_precision_was_passed_over():
    """p < rows, but the p × p precision (with its dense J) is over budget while the kernel fits: the reason says so
    instead of "rows ≤ p"."""
    pb = dataclasses.replace(problem(2_000, p=1_900, work=0), preconditioner_rank=1, variance_rank=1)
    param, kernel = _plan.engine_bytes("parameter-cholesky", pb), _plan.engine_bytes("function-cholesky", pb)
    assert kernel < param
    plan = choose(pb, (kernel + param) // 2)
    assert plan.method == "function-cholesky"
    assert "≤ p" not in plan.reason and format_bytes(param) in plan.reason
    iterative = choose(pb, kernel - 1)  # both over: both named
    assert iterative.method == "iterative"
    assert format_bytes(param) in iterative.reason and format_bytes(kernel) in iterative.reason
