"""The demo's class probabilities: :func:`lingp_core.class_probabilities.probability_of_largest` (kept importable
from here for scripts that used the demo's copy)."""
from lingp_core.class_probabilities import probability_of_largest

__all__ = ["probability_of_largest"]
