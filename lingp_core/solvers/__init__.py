"""Solvers: batched preconditioned CG, Lanczos, log-determinants, safe Cholesky and preconditioners."""
from lingp_core.solvers.cg import CGResult, cg
from lingp_core.solvers.cholesky import CholeskyResult, cholesky_from_upper, safe_cholesky
from lingp_core.solvers.lanczos import EigenResult, LanczosResult, lanczos, lanczos_eigsh
from lingp_core.solvers.logdet import LogdetResult, logdet
from lingp_core.solvers.preconditioners import (
    PivotedCholesky,
    jacobi_preconditioner,
    nystrom_preconditioner,
    pivoted_cholesky,
    pivoted_cholesky_preconditioner,
)

__all__ = ["CGResult", "CholeskyResult", "EigenResult", "LanczosResult", "LogdetResult", "PivotedCholesky", "cg",
           "cholesky_from_upper", "jacobi_preconditioner", "lanczos", "lanczos_eigsh", "logdet",
           "nystrom_preconditioner", "pivoted_cholesky", "pivoted_cholesky_preconditioner", "safe_cholesky"]
