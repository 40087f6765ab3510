"""A progress bar that costs nothing when it is off; tqdm is imported only when a bar is asked for."""
from __future__ import annotations

from typing import Any

from lingp_core._validate import MissingDependencyError


class _NoBar:
    """Stands in for a tqdm bar when progress is off."""

    def update(self, k: int = 1) -> None:
        """Do nothing."""

    def close(self) -> None:
        """Do nothing."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int | None, *, enabled: bool, desc: str, unit: str = "it") -> Any:
    """A tqdm bar over ``total`` units (None: a counter without an end) when ``enabled``, else a no-op with the same
    ``update``/``close`` methods.

    Raises
    ------
    MissingDependencyError
        (an ImportError) When ``enabled`` and tqdm is not installed (the message says ``pip install tqdm``).
    """
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        raise MissingDependencyError("progress=True needs tqdm, which is not installed: pip install tqdm") from None
    return tqdm(total=total, desc=desc, unit=unit, leave=False)


def iteration_callback(bar: Any) -> Any:
    """A ``cg`` callback that moves ``bar`` on to the iteration each call reports."""
    done = 0

    def callback(iteration: int, _residual_norms: Any) -> None:
        nonlocal done
        bar.update(iteration - done)
        done = iteration

    return callback
