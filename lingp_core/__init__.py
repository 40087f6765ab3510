"""lingp: a trained PyTorch network as a Gaussian process with its Jacobian kernel, on NumPy (CPU) or CuPy (GPU).

Importing lingp_core imports neither torch nor cupy; they load when a function needs them.
"""
from backends import available_backends, get_backend, infer
from lingp_core._hyperparameters import Hyperprior
from lingp_core._validate import (
    ArgumentTypeError,
    BackendMismatchError,
    ConvergenceError,
    ConvergenceWarning,
    DTypeError,
    ExportError,
    InvalidOptionError,
    LingpError,
    MemoryBudgetError,
    MissingCapabilityError,
    MissingDependencyError,
    NonFiniteError,
    NotFittedError,
    NotPositiveDefiniteError,
    NumericalWarning,
    ShapeError,
    SignatureDTypeError,
    SignatureError,
    SignatureShapeError,
    ValueRangeError,
)
from lingp_core.autograd_operator import AutogradJacobian
from lingp_core.block_average import BlockWeightAverage
from lingp_core.class_probabilities import probability_of_largest
from lingp_core.dirichlet import DirichletClassifier, dirichlet_targets
from lingp_core.export import LAST_LAYER, STRUCTURES, export_jacobian
from lingp_core.fisher import LOWRANK_METHODS, FisherOperator, LowRankResult, fisher, fisher_lowrank, kernel_lowrank
from lingp_core.gp import GP_METHODS, MEANS, LinearizedGP, Plan
from lingp_core.io import ArchiveError, ArchiveNotFoundError, ArchivePathError
from lingp_core.jacobian import DenseBlock, FactoredLinearBlock, JacobianBlocks
from lingp_core.kernels import KernelOperator, kernel, kernel_diag
from lingp_core.laplace import LAPLACE_METHODS, PREDICTIVE_METHODS, LaplaceClassifier
from lingp_core.likelihoods import (
    LIKELIHOODS,
    BernoulliLikelihood,
    CategoricalLikelihood,
    GaussianLikelihood,
    Likelihood,
    as_likelihood,
)
from lingp_core.operators import AddedDiagonalOperator, DenseOperator, LinearOperator, LowRankPlusDiagonal, as_operator
from lingp_core.sharded import ShardedJacobian
from lingp_core.solvers import (
    CGResult,
    CholeskyResult,
    EigenResult,
    LanczosResult,
    LogdetResult,
    PivotedCholesky,
    cg,
    cholesky_from_upper,
    jacobi_preconditioner,
    lanczos,
    lanczos_eigsh,
    logdet,
    nystrom_preconditioner,
    pivoted_cholesky,
    pivoted_cholesky_preconditioner,
    safe_cholesky,
)

__version__ = "0.1.0"

__all__ = [
    "LAST_LAYER",
    "LAPLACE_METHODS",
    "LIKELIHOODS",
    "LOWRANK_METHODS",
    "PREDICTIVE_METHODS",
    "STRUCTURES",
    "GP_METHODS",
    "MEANS",
    "AddedDiagonalOperator",
    "BlockWeightAverage",
    "ArchiveError",
    "ArchiveNotFoundError",
    "ArchivePathError",
    "ArgumentTypeError",
    "AutogradJacobian",
    "BackendMismatchError",
    "BernoulliLikelihood",
    "CategoricalLikelihood",
    "CGResult",
    "CholeskyResult",
    "DenseBlock",
    "DenseOperator",
    "DirichletClassifier",
    "EigenResult",
    "FactoredLinearBlock",
    "FisherOperator",
    "GaussianLikelihood",
    "Hyperprior",
    "JacobianBlocks",
    "KernelOperator",
    "LanczosResult",
    "LaplaceClassifier",
    "ShardedJacobian",
    "LinearizedGP",
    "Likelihood",
    "LinearOperator",
    "LogdetResult",
    "LowRankPlusDiagonal",
    "LowRankResult",
    "PivotedCholesky",
    "Plan",
    "ConvergenceError",
    "ConvergenceWarning",
    "DTypeError",
    "ExportError",
    "InvalidOptionError",
    "LingpError",
    "MemoryBudgetError",
    "MissingCapabilityError",
    "MissingDependencyError",
    "NonFiniteError",
    "NotFittedError",
    "NotPositiveDefiniteError",
    "NumericalWarning",
    "ShapeError",
    "SignatureDTypeError",
    "SignatureError",
    "SignatureShapeError",
    "ValueRangeError",
    "as_likelihood",
    "as_operator",
    "available_backends",
    "cg",
    "cholesky_from_upper",
    "dirichlet_targets",
    "export_jacobian",
    "fisher",
    "fisher_lowrank",
    "get_backend",
    "infer",
    "jacobi_preconditioner",
    "kernel",
    "kernel_diag",
    "kernel_lowrank",
    "lanczos",
    "lanczos_eigsh",
    "logdet",
    "nystrom_preconditioner",
    "pivoted_cholesky",
    "pivoted_cholesky_preconditioner",
    "probability_of_largest",
    "safe_cholesky",
]
