"""The solver benchmark's quick mode keeps working: it runs, prints its table and writes JSON and a plot; lingp's CG
takes the iterations of a textbook CG written out here on the same seeded system."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import linear_operator  # noqa: F401  (the GPyTorch baseline)
import matplotlib  # noqa: F401  (the plot is part of the run)
import numpy as np

from benchmarks import bench_solvers as bench
from tests.helpers import run_alongside

ROOT = Path(__file__).resolve().parents[1]
N = 200
ROUNDING_SLACK = 2  # iterations: float64 round-off may move the step where ‖r‖ ≤ rtol·‖b‖ by one or two


def textbook_cg_iterations(features: int, rhs: int, noise: float, rtol: float) -> int:
    """Most iterations plain CG (recursive residual, x₀ = 0) needs on the benchmark's K = J Jᵀ + σ²I and B."""
    jac = bench.make_jacobian(N, features)
    K = jac @ jac.T + noise * np.eye(N)
    B = np.random.default_rng(1).standard_normal((N, rhs))
    most = 0
    for b in B.T:
        x, r = np.zeros(N), b.copy()
        d, rr = r.copy(), r @ r
        for k in range(1, 10 * N + 1):  # noqa: B007 (k counts the iterations)
            Kd = K @ d
            step = rr / (d @ Kd)
            x, r = x + step * d, r - step * Kd
            rr, previous = r @ r, rr
            if np.sqrt(rr) <= rtol * np.linalg.norm(b):
                break
            d = r + rr / previous * d
        assert np.linalg.norm(b - K @ x) <= 2 * rtol * np.linalg.norm(b)  # the oracle's own check
        most = max(most, k)
    return most


def test_bench_solvers_quick(tmp_path):
    options = ["--quick", "--sizes", str(N), "--out", str(tmp_path)]
    args = bench.parse_args(options)
    result, expected = run_alongside([sys.executable, str(ROOT / "benchmarks" / "bench_solvers.py"), *options],
                                     lambda: textbook_cg_iterations(args.features, args.rhs, args.noise, args.rtol))
    assert result.returncode == 0, result.stderr
    assert "GPyT/CG" in result.stdout
    data = json.loads((tmp_path / "bench_solvers.json").read_text())
    (row,) = data["rows"]
    assert row["n"] == N and row["lingp_cg_converged"] and row["lingp_pcg_converged"]
    assert row["lingp_cg_relres"] <= row["rtol"]
    assert (row["p"], row["rhs"], row["rtol"], data["args"]["noise"]) == (args.features, args.rhs, args.rtol,
                                                                         str(args.noise))
    assert abs(row["lingp_cg_iters"] - expected) <= ROUNDING_SLACK
    assert abs(row["lingp_cg_matfree_iters"] - expected) <= ROUNDING_SLACK  # the same K as J (Jᵀ v) + σ² v
    assert row["lingp_pcg_iters"] < row["lingp_cg_iters"]  # a rank-20 pivoted Cholesky removes the top of K
    # GPyTorch's residual is the benchmark's own ‖b − K x‖, and it stops on its own criterion
    assert 0 < row["gpytorch_cg_relres_mean"] <= row["gpytorch_cg_relres_max"]
    assert row["gpytorch_cg_reached_rtol"] == (row["gpytorch_cg_relres_max"] <= row["rtol"])
    assert (tmp_path / "bench_solvers.png").stat().st_size > 0
