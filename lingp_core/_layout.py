"""How LinearizedGP's output modes lay the (n, c) outputs out as GP problems ("tasks").

- ``"full"``: one task of m = n·c rows (example-major) and one target column;
- ``"independent"``: c tasks of n rows, task k the rows of output k;
- ``"trace"``: one task of n rows whose c target columns share the averaged kernel.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lingp_core.jacobian import JacobianBlocks

OUTPUT_MODES = ("full", "independent", "trace")


@dataclasses.dataclass
class Task:
    """One GP problem: the rows of J it uses, the kernel mode applied to them, the output it serves."""

    J: JacobianBlocks | None  # the task's training Jacobian (None after loading a parameter-space model)
    mode: str                 # kernel output mode applied to J: "full" or "trace"
    output: int | None        # the output an independent task serves


@dataclasses.dataclass(frozen=True)
class OutputLayout:
    """The output mode of a model with c outputs and its noise (one float, a host array of c values, or a host array
    (n, c) of one value per observation)."""

    mode: str

    def tasks(self, J: JacobianBlocks | None, c: int) -> list[Task]:
        """The tasks of J (or, with J None, of a model loaded without its Jacobian)."""
        if self.mode == "independent":
            return [Task(None if J is None else J.select(output=k), "full", k) for k in range(c)]
        return [Task(J, self.mode, None)]

    def rows(self, n: int, c: int) -> int:
        """Rows per task."""
        return n * c if self.mode == "full" else n

    def columns(self, c: int) -> int:
        """Target columns per task."""
        return c if self.mode == "trace" else 1

    def task_values(self, task: Task, values: Any) -> Any:
        """(n, c) per-example values → the task's (m, q) layout."""
        if self.mode == "full":
            return values.reshape(-1, 1)
        return values[:, task.output: task.output + 1] if task.output is not None else values

    def place(self, out: Any, task: Task, values: Any) -> None:
        """Add a task's (m*, q) result into the (n*, c) array ``out``."""
        if self.mode == "full":
            out += values.reshape(out.shape)
        elif task.output is not None:
            out[:, task.output] += values[:, 0]
        else:
            out += values

    def task_noise(self, noise: Any, task: Task, n: int) -> np.ndarray:
        """The noise of a task as a host array broadcastable to its (m, q) targets: from one σ², one per output (c,)
        or one per observation (n, c)."""
        if isinstance(noise, float):
            return np.array([[noise]])
        if noise.ndim == 2:
            if self.mode == "full":
                return noise.reshape(-1, 1)
            return noise[:, task.output: task.output + 1] if task.output is not None else noise
        if self.mode == "full":
            return np.tile(noise, n)[:, None]
        return np.array([[noise[task.output]]]) if task.output is not None else noise[None, :]

    def noise_index(self, noise: Any, task: Task, n: int) -> np.ndarray:
        """Which noise parameter each (row, column) of a task uses (all 0 for one shared σ²)."""
        if isinstance(noise, float):
            return np.zeros((1, 1), dtype=np.int64)
        c = noise.size
        if self.mode == "full":
            return np.tile(np.arange(c), n)[:, None]
        return np.array([[task.output]]) if task.output is not None else np.arange(c)[None, :]


def per_observation(noise: Any) -> bool:
    """Whether σ² is given per observation, (n, c): fixed noise, one value per target."""
    return not isinstance(noise, float) and noise.ndim == 2


def noise_groups(noise: np.ndarray, q: int) -> list[tuple[list[int], np.ndarray]]:
    """Columns of R that share one noise column: [(columns, noise (m,) or (1,))], in column order."""
    cols = np.broadcast_to(noise, (noise.shape[0], q))
    groups: list[tuple[list[int], np.ndarray]] = []
    for j in range(q):
        for members, value in groups:
            if np.array_equal(value, cols[:, j]):
                members.append(j)
                break
        else:
            groups.append(([j], cols[:, j].copy()))
    return groups
