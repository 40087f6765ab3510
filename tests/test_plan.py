"""LinearizedGP's planner: its choices for given sizes and budgets (no device needed: budgets are passed in)."""
from __future__ import annotations

import numpy as np
import pytest

import lingp_core as lg
from lingp_core import _plan
from lingp_core._validate import resolve_memory_budget

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
