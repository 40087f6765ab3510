"""lingp: a trained PyTorch network as a Gaussian process with its Jacobian kernel, on NumPy (CPU) or CuPy (GPU).

Importing lingp_core imports neither torch nor cupy; they load when a function needs them.
"""
from backends import available_backends, get_backend, infer
from lingp_core._validate import (
    BackendMismatchError,
    ConvergenceError,
    ConvergenceWarning,
    DTypeError,
    LingpError,
    MemoryBudgetError,
    NonFiniteError,
    ShapeError,
    ValueRangeError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendMismatchError",
    "ConvergenceError",
    "ConvergenceWarning",
    "DTypeError",
    "LingpError",
    "MemoryBudgetError",
    "NonFiniteError",
    "ShapeError",
    "ValueRangeError",
    "available_backends",
    "get_backend",
    "infer",
]
