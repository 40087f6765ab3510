"""LinearizedGP's planner: which engine solves the problem, why, and whether it fits in memory.

Every method, whether chosen here or forced by the user, is checked against the memory budget with what it really
allocates (per task: every task's engine is kept), so a forced method fails with the numbers before allocating.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lingp_core import _validate as v
from lingp_core._layout import noise_groups
from lingp_core.jacobian import _WORK_ELEMENTS
from lingp_core.kernels import _TILE_ROWS, work_bytes
from lingp_core.sharded import CLUSTER_MEMORY_SHARE, is_sharded, scheduler_workers

#: Kernel rows per tile of the kernels' assembly: a prediction's chunks of test rows are at most this many
TILE_ROWS = _TILE_ROWS

#: The blocked Cholesky runs ~T³/6 tile tasks for T shards: beyond this, auto goes iterative
MAX_TILES = 48


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :class:`~lingp_core.LinearizedGP` chose and why.

    Attributes
    ----------
    method : str
        One of the concrete methods ("function-cholesky", ..., "iterative").
    space, solver : str
        "function" or "parameter"; "cholesky", "spectral" or "iterative".
    tasks, rows, p : int
        Independent GP problems solved, rows per problem (n·c or n), parameters.
    reason : str
        Why, in words.
    """

    method: str
    space: str
    solver: str
    tasks: int
    rows: int
    p: int
    reason: str

    def __str__(self) -> str:
        return f"{self.method} ({self.tasks} task(s) of {self.rows} rows, p = {self.p}): {self.reason}"

    def with_method(self, method: str, reason: str | None = None) -> Plan:
        space, solver = split_method(method)
        return dataclasses.replace(self, method=method, space=space, solver=solver,
                                   reason=self.reason if reason is None else reason)


def split_method(method: str) -> tuple[str, str]:
    """("function" | "parameter", "cholesky" | "spectral" | "iterative") of a concrete method."""
    if method == "iterative":
        return "function", "iterative"
    space, solver = method.split("-")
    return space, solver


@dataclasses.dataclass(frozen=True)
class Problem:
    """Sizes of a LinearizedGP problem: tasks of m rows and q target columns, p parameters, and the settings that
    change what the engines allocate."""

    tasks: int
    m: int
    q: int
    p: int
    kernel_itemsize: int  # 8 (float64 kernel) or 4 (float32)
    noise_groups: int  # factors per task (one per distinct noise column)
    preconditioner_rank: int
    variance_rank: int
    kernel_work: int = 0  # bytes kernel assembly needs beside the kernel (function space)
    jacobian_copy: int = 0  # bytes of the float64 copy of a float32 Jacobian's blocks an iterative engine keeps
    product_work: int = 0  # bytes of one float64 kernel product J(Jᵀ v) on one column ("iterative"; w columns: ≤ w×)
    mode: str = "full"  # the output mode and the outputs c (what advice fits)
    outputs: int = 1


def engine_bytes(method: str, pb: Problem) -> int:
    """Bytes the engines of ``method`` hold or need at their peak, all tasks together (8-byte float64 factors)."""
    m, p, q = pb.m, pb.p, pb.q
    if method == "function-cholesky":
        # the kernel, whose lower triangle becomes the first factor in place (float64, by LAPACK or cuSOLVER potrf
        # on its own buffer); a float32 kernel or a further noise group needs a float64 factor of its own
        factors = pb.noise_groups - (1 if pb.kernel_itemsize == 8 else 0)
        per_task = pb.kernel_itemsize * m * m + factors * 8 * m * m + 8 * m * q
    elif method == "function-spectral":
        per_task = pb.kernel_itemsize * m * m + 8 * m * m * 3 + 8 * m * q  # K0, its float64 copy, U, eigh's work
    elif method == "parameter-cholesky":
        # dense J (float64) and its noise-weighted copy, Jᵀ D⁻¹ J and its factor per noise group
        per_task = 2 * 8 * m * p + 2 * 8 * p * p * pb.noise_groups + 8 * p * q
    elif method == "parameter-spectral":
        per_task = 2 * 8 * m * p + 3 * 8 * p * p + 8 * p * q  # dense J, Jᵀ J, V, eigh's work
    elif method == "iterative":  # no kernel is assembled: no kernel_work
        per_task = _iterative_kept(pb)
    else:
        raise v.InvalidOptionError(f"unknown method {method!r}")
    if method == "iterative":
        return pb.tasks * per_task + _iterative_step(pb)
    # the exact methods' tasks are assembled one after another, each kernel with kernel_work beside it
    return pb.tasks * per_task + (pb.kernel_work if method.startswith("function") else 0)


def _iterative_ranks(pb: Problem) -> tuple[int, int]:
    """The pivoted-Cholesky rank and the Lanczos steps of the variance cache, both at most the rows m."""
    return min(pb.preconditioner_rank, pb.m), min(pb.variance_rank, pb.m)


def _iterative_kept(pb: Problem) -> int:
    """Bytes one task's iterative engine keeps: per noise group the preconditioner's basis (m × r) and, once a
    prediction asked for variances, the Lanczos variance cache (m × k); α (m × q); and the float64 copy of a float32
    Jacobian's blocks it computes on (measured: float32 products left CG's answers orders of magnitude off)."""
    r, k = _iterative_ranks(pb)
    return 8 * pb.m * (pb.noise_groups * (r + k) + pb.q) + pb.jacobian_copy


def _iterative_step(pb: Problem) -> int:
    """Bytes the largest single step of an iterative engine adds to what it keeps (one step runs at a time, every
    task's engine alike), from tracemalloc measurements: building a preconditioner (its pivoted-Cholesky factor, the
    factor's SVD and the basis copied from it: 2.2–2.7 more m × r), a variance cache (the Lanczos basis, its copy
    and the triangular solve on it, 2.0–2.3 more m × k, and a few k × k tridiagonal arrays), each with one kernel
    product, or CG on the fit's q columns (about 12 m-vectors a column with the products). Solves for test rows
    are a prediction's arrays (:func:`prediction_row_bytes`)."""
    r, k = _iterative_ranks(pb)
    return max(8 * pb.m * (3 * r + 8) + pb.product_work, 8 * (pb.m * (2 * k + 8) + 3 * k * k) + pb.product_work,
               pb.q * (8 * pb.m * 12 + pb.product_work))


def choose(method: str, pb: Problem, budget: int, *, parameter_ok: bool, per_row_noise: bool,
           exact_max_rows: int | None) -> Plan:
    """The plan for ``method`` ("auto", "cholesky", "spectral" or a concrete method); MemoryBudgetError when it does
    not fit ``budget``, InvalidOptionError when it cannot serve the output mode or noise."""
    m, p = pb.m, pb.p
    why = "forced by method="
    if method in ("cholesky", "spectral"):
        if parameter_ok:
            space = "parameter" if p < m else "function"
            why = f"the smaller space (rows per task {m}, p = {p})"
        else:
            space, why = "function", f"{_NO_PARAMETER_SPACE} (rows per task {m}, p = {p})"
        method = f"{space}-{method}"
    elif method == "auto":
        method, why = _auto(pb, budget, parameter_ok, exact_max_rows)
    if method.startswith("parameter") and not parameter_ok:
        raise v.InvalidOptionError("output_mode='trace' has no parameter-space form (its kernel averages the "
                                   "outputs' Jacobians); use a function-space method or output_mode='independent'")
    if method.endswith("spectral") and per_row_noise:
        raise v.InvalidOptionError("spectral methods need one noise variance per target column; this noise is given "
                                   "per row of the system (per-observation noise, or per-output noise in "
                                   "output_mode='full', where each example's c rows are one column): use "
                                   "method='function-cholesky' or 'parameter-cholesky' (or, for per-output noise, "
                                   "output_mode='independent'; with one output or equal values, pass one float)")
    check_fits(method, pb, budget)
    space, solver = split_method(method)
    return Plan(method, space, solver, pb.tasks, m, p, why)


_NO_PARAMETER_SPACE = "output_mode='trace' has no parameter-space form"


def _auto(pb: Problem, budget: int, parameter_ok: bool, exact_max_rows: int | None) -> tuple[str, str]:
    """("auto"'s method, why): the parameter-space Cholesky when p < rows and it fits, else the kernel's when it
    fits (and exact_max_rows allows), else iterative; the reason names what ruled each exact system out."""
    m, p = pb.m, pb.p
    param_bytes, kernel_bytes = engine_bytes("parameter-cholesky", pb), engine_bytes("function-cholesky", pb)
    smaller_param = p < m  # the p × p precision is the smaller exact system
    if parameter_ok and smaller_param and param_bytes <= budget:
        return "parameter-cholesky", exact_reason("parameter-cholesky", pb, budget, parameter_ok=True)
    over_cap = exact_max_rows is not None and m > exact_max_rows
    if not over_cap and kernel_bytes <= budget:
        return "function-cholesky", exact_reason("function-cholesky", pb, budget, parameter_ok=parameter_ok,
                                                 exact_max_rows=exact_max_rows)
    obstacles = []
    if parameter_ok and smaller_param:
        obstacles.append(f"the p × p precision (p = {p}) needs {v.format_bytes(param_bytes)}")
    elif smaller_param:
        obstacles.append(f"{_NO_PARAMETER_SPACE} (p = {p})")
    obstacles.append(f"the kernel factorization has more rows than exact_max_rows = {exact_max_rows}" if over_cap
                     else f"the {m} × {m} kernel factorization needs {v.format_bytes(kernel_bytes)}")
    over = any("needs" in text for text in obstacles)
    return "iterative", (f"{m} rows per task: {'; '.join(obstacles)}"
                         f"{f', over the budget of {v.format_bytes(budget)}' if over else ''}; CG on matrix-free "
                         "kernel products")


#: What an exact method computes, in plan_.reason
_EXACT_SYSTEMS = {"parameter-cholesky": "the p × p precision is the smaller exact system",
                  "parameter-spectral": "the eigendecomposition of the p × p Jᵀ J is the smaller exact system",
                  "function-cholesky": "the exact kernel factorization fits",
                  "function-spectral": "the kernel's eigendecomposition fits"}


def exact_reason(method: str, pb: Problem, budget: int, *, parameter_ok: bool,
                 exact_max_rows: int | None = None) -> str:
    """Why the exact ``method`` serves this problem, in plan_.reason's words: the space (p against the rows per
    task, and why the smaller p × p system was passed over), then the method's bytes against ``budget``."""
    m, p = pb.m, pb.p
    capped = "" if exact_max_rows is None else f" (≤ exact_max_rows = {exact_max_rows})"
    if method.startswith("parameter"):
        space = f"p = {p} < {m} rows per task" if p < m else f"p = {p} ≥ {m} rows per task"
    elif p >= m:
        space = f"{m} rows per task ≤ p = {p}{capped}"
    elif not parameter_ok:
        space = f"p = {p} < {m} rows per task, but {_NO_PARAMETER_SPACE}{capped}"
    else:
        space = (f"p = {p} < {m} rows per task, but the p × p precision needs "
                 f"{v.format_bytes(engine_bytes('parameter-cholesky', pb))}, over the budget{capped}")
    return (f"{space}: {_EXACT_SYSTEMS[method]} ({v.format_bytes(engine_bytes(method, pb))} of a budget of "
            f"{v.format_bytes(budget)})")


def check_fits(method: str, pb: Problem, budget: int, *, extra: int = 0, what: str = "",
               alternative: str | None = None) -> None:
    """MemoryBudgetError, with the numbers and the alternatives (``alternative``, or what helps ``method`` here),
    when ``method``'s engines (plus ``extra`` bytes) exceed ``budget``."""
    v.check_memory(engine_bytes(method, pb) + extra, budget,
                   what=what or f"method={method!r} ({pb.tasks} task(s) of {pb.m} rows, p = {pb.p})",
                   alternative=alternative or _advice(method, pb))


def _advice(method: str, pb: Problem) -> str:
    """What lowers ``method``'s bytes for this problem (only what applies to its output mode and sizes)."""
    if method == "iterative":  # output_mode='independent' keeps the same bytes per example: no help
        r, k = _iterative_ranks(pb)
        text = (f"lower preconditioner_rank / variance_rank (now {pb.preconditioner_rank} / {pb.variance_rank}: "
                f"their m × rank bases take {v.format_bytes(8 * pb.m * pb.noise_groups * (r + k) * pb.tasks)})")
        if pb.jacobian_copy:
            text += (f"; the float64 copy of the float32 Jacobian's blocks CG computes on takes "
                     f"{v.format_bytes(pb.tasks * pb.jacobian_copy)}: a float64 export is used as it is")
        return text
    if split_method(method)[0] == "parameter":
        return "use a function-space method (n·c rows) or method='iterative'"
    options = ["use method='iterative' (matrix-free)"]
    if pb.mode != "trace" and pb.p < pb.m:
        options.append(f"a parameter-space method (p = {pb.p} < {pb.m} rows)")
    if pb.mode == "full" and pb.outputs > 1:
        options.append("output_mode='independent' (n rows per task instead of n·c)")
    return ", ".join(options[:-1]) + (" or " if len(options) > 1 else "") + options[-1]


def problem_of(J: Any, layout: Any, noise: Any, settings: Any) -> Problem:
    """The Problem of fitting training Jacobian J with this output layout, noise and settings."""
    n, c = J.n, J.n_outputs
    m, q = layout.rows(n, c), layout.columns(c)
    # one factor per distinct noise column: only "trace" tasks have several columns with their own noise
    groups = 1
    if layout.mode == "trace" and not isinstance(noise, float):
        groups = len(noise_groups(layout.task_noise(noise, layout.tasks(None, c)[0], n), q))
    tasks = c if layout.mode == "independent" else 1
    if is_sharded(J):  # kernel tiles, the blocks and their products' work are on the workers
        work, copy, product = 0, 0, 8 * (2 * J.p + 4 * m)  # the client's reductions Jᵀ V and its vectors
    else:
        rows_J = J.select(output=0) if layout.mode != "full" else J  # a task's kernel assembles one output's rows
        work = work_bytes(rows_J, rows_J.n, settings.kernel_dtype, symmetric=True)
        task_J = rows_J if layout.mode == "independent" else J  # what one iterative engine computes on
        copy = task_J.n * task_J.n_outputs * float64_copy_row_bytes(J)
        product = product_bytes(task_J, m)
    return Problem(tasks, m, q, J.p, 4 if settings.kernel_dtype == "float32" else 8, groups,
                   settings.preconditioner_rank, settings.variance_rank, work, copy, product, layout.mode, c)


def float64_copy_row_bytes(J: Any) -> int:
    """Bytes per row (of n·c) of the float64 copy of J's blocks that float64 computations on a float32 J make; 0
    for a float64 J, used as it is."""
    return 0 if J.dtype == np.float64 else 8 * sum(b.stored_per_row for b in J.blocks)


def product_bytes(J: Any, m: int) -> int:
    """Bytes of the intermediates of one float64 kernel product s·J(Jᵀ v) + D v on one column v (m,), m the task's
    rows of J: the result and its scaled copies (4 m-vectors), Jᵀ v with its transposes (2 p-vectors) and, for a
    factored block, its reshaped copies (3 p_b-vectors) and the product chunks of JacobianBlocks.matmat / rmatmat. On
    w columns a product needs at most w times this (its chunks are capped at _WORK_ELEMENTS values)."""
    factored = [b for b in J.blocks if b.kind == "factored"]
    chunk = max((min(_WORK_ELEMENTS, b.n * b.T * b.out_features) for b in factored), default=0)
    return 8 * (2 * J.p + 3 * sum(b.p for b in factored) + 4 * m + 2 * chunk)


def prediction_row_bytes(method: str, pb: Problem, return_var: bool, star_copy: int = 0) -> int:
    """Bytes one of a task's m* test rows needs at the peak of a prediction by ``method``'s engines, all alive at
    once (an upper bound; the products' BLAS work space aside).

    Function space: its row of the cross kernel K(X*, X) (m values of the kernel's dtype; a float32 one is cast to
    float64 in the products) and, for variances, the rows of the same length the engine forms: the whitened rows of
    each noise group and their squares (Cholesky), K(X*, X)·U and its squares (spectral), CG's vectors on it
    (iterative, about 12 m-vectors a right-hand side, its right-hand side and solution, a kernel product's
    intermediates and the energy form's three p-vectors), plus the rescue of cancelled variances (whose p-vectors
    energy_variance checks itself) and ``star_copy``, the bytes of a float32 test row converted to float64. Parameter
    space: its dense row of J* (p values, and the float64 copy) and, for variances, the whitened rows (Cholesky) or
    J*·V and its squares (spectral)."""
    m, p, groups = pb.m, pb.p, pb.noise_groups
    if split_method(method)[0] == "parameter":
        dense = 2 * 8 * p
        if not return_var:
            return dense + 8 * pb.q
        return dense + 8 * p * ((groups + 1) if method.endswith("cholesky") else 3)
    cross = pb.kernel_itemsize * m + (8 * m if pb.kernel_itemsize == 4 else 0)
    if not return_var:
        return cross + 8 * pb.q
    if method == "iterative":  # CG's vectors and products, and the energy form's p-vectors (3 a row)
        return cross + 8 * m * 16 + max(pb.product_work, 8 * (2 * p + 4 * m)) + 3 * 8 * p + star_copy
    return cross + 8 * m * (groups + 2 if method == "function-cholesky" else 3) + star_copy


def cross_work(J_star: Any, J: Any, kernel_dtype: Any) -> int:
    """Bytes the cross kernel K(X*, X) of a task's test rows J_star and training rows J needs beside itself (0 when
    the training Jacobian is sharded: the tiles are computed on the workers)."""
    return 0 if is_sharded(J) else work_bytes(J_star, J.n, kernel_dtype, symmetric=False)


def cluster_cholesky_bytes(pb: Problem) -> int:
    """Bytes the blocked Cholesky holds on the cluster at its peak, all tasks: the upper kernel tiles, the scaled
    tiles being updated and one upper factor per noise group (each about half of an m × m array)."""
    return pb.tasks * pb.m * pb.m * (pb.kernel_itemsize + 8 + 8 * pb.noise_groups) // 2


@dataclasses.dataclass(frozen=True)
class ClusterMemory:
    """What an exact factorization may take on the cluster: ``budget`` bytes in all and ``per_worker`` on the
    smallest worker (None: not known), and where the numbers came from."""

    budget: int
    per_worker: int | None
    source: str


def _worker_memory(client: Any, backend_name: str) -> tuple[list[int], str]:
    """Each worker's memory for lingp's arrays (0: not reported) and what it is: their device memory for CuPy
    shards (asked of each worker), their ``memory_limit`` otherwise."""
    if backend_name == "cupy":
        return [int(x) for x in client.run(_device_memory).values()], "GPUs' free memory"
    return [int(w.get("memory_limit") or 0) for w in scheduler_workers(client).values()], "memory limits"


def worker_share(client: Any, backend_name: str) -> int | None:
    """CLUSTER_MEMORY_SHARE of the smallest worker's memory (:func:`_worker_memory`); None when not reported."""
    return _smallest_share(_worker_memory(client, backend_name)[0])


def _smallest_share(limits: list[int]) -> int | None:
    """CLUSTER_MEMORY_SHARE of the smallest of the workers' ``limits``; None when any reports none (0)."""
    return int(CLUSTER_MEMORY_SHARE * min(limits)) if limits and min(limits) > 0 else None


def cluster_budget(client: Any, memory_budget: Any, backend_name: str = "numpy") -> ClusterMemory:
    """``memory_budget`` if given, else CLUSTER_MEMORY_SHARE of what the workers have (:func:`_worker_memory`)."""
    limits, where = _worker_memory(client, backend_name)
    smallest = _smallest_share(limits)
    if memory_budget is not None:
        return ClusterMemory(int(v.check_positive(memory_budget, "memory_budget")), smallest, "memory_budget")
    if smallest is None:
        raise v.MemoryBudgetError(f"the cluster's {len(limits)} worker(s) report no memory limit, so the exact path "
                                  "cannot be sized; pass memory_budget= (bytes for the kernel and its factor on the "
                                  "cluster) or start the workers with a memory_limit")
    return ClusterMemory(int(CLUSTER_MEMORY_SHARE * sum(limits)), smallest,
                         f"{CLUSTER_MEMORY_SHARE:.0%} of the {len(limits)} workers' {where}, "
                         f"{v.format_bytes(sum(limits))}")


def _device_memory() -> int:
    """Free bytes where this worker's CuPy arrays go (run on each worker)."""
    import backends
    return int(backends.get_backend("cupy").free_memory().arrays)


def _exact_obstacle(pb: Problem, J: Any, memory: ClusterMemory, exact_max_rows: int | None) -> tuple[str, Any] | None:
    """Why the blocked Cholesky cannot run here, with the error class to raise when it is forced; None if it can."""
    needed, tiles = cluster_cholesky_bytes(pb), len(J.shards)
    # one tile update holds four tiles (C_ij, U_ki, U_kj and the result) on one worker
    tile_peak = 4 * 8 * (max(J.counts) * (pb.m // J.n)) ** 2  # a task's rows per example: c ("full") or 1
    if exact_max_rows is not None and pb.m > exact_max_rows:
        return f"more rows than exact_max_rows = {exact_max_rows}", v.InvalidOptionError
    if tiles > MAX_TILES:
        return (f"{tiles} × {tiles} tiles (one per pair of shards; more than {MAX_TILES} shards make "
                f"~{tiles ** 3 // 6} tasks: rechunk the inputs into fewer, larger row chunks)", v.InvalidOptionError)
    if needed > memory.budget:
        return (f"{v.format_bytes(needed)}, over the cluster budget of {v.format_bytes(memory.budget)} "
                f"({memory.source})", v.MemoryBudgetError)
    if memory.per_worker is not None and tile_peak > memory.per_worker:
        return (f"{v.format_bytes(tile_peak)} on one worker for a tile update (four of the largest tiles), over "
                f"the smallest worker's share of {v.format_bytes(memory.per_worker)}: use smaller row chunks",
                v.MemoryBudgetError)
    return None


def choose_on_cluster(method: str, J: Any, layout: Any, noise: Any, settings: Any) -> Plan:
    """The plan for a Jacobian sharded on a Dask cluster: 'function-cholesky' (blocked, over the kernel's tiles on
    the workers) when it fits the cluster's memory (in all and per worker), exact_max_rows and MAX_TILES, else
    'iterative' (matrix-free products on the shards); the client holds the m × q vectors either way."""
    pb = problem_of(J, layout, noise, settings)
    if method not in ("auto", "cholesky", "function-cholesky", "iterative"):
        raise v.InvalidOptionError(f"method {method!r} needs the Jacobian in memory; a Jacobian sharded on a Dask "
                                   "cluster is fitted by 'auto', 'cholesky', 'function-cholesky' or 'iterative'")
    memory = None
    if method == "iterative":
        why = "forced by method= (on the Dask cluster)"
    else:
        try:
            memory = cluster_budget(J.client, settings.memory_budget, J.backend.name)
        except v.MemoryBudgetError as exc:  # the exact path cannot be sized: "auto" goes matrix-free, saying why
            if method != "auto":
                raise
            method, why = "iterative", (f"on the Dask cluster ({len(J.shards)} shards): {exc}; CG on kernel "
                                        "products over the shards")
    if memory is not None:
        obstacle = _exact_obstacle(pb, J, memory, settings.exact_max_rows if method == "auto" else None)
        if obstacle is None:
            forced = "" if method == "auto" else "forced by method=; "
            method, why = "function-cholesky", (f"{forced}on the Dask cluster ({len(J.shards)} shards): blocked "
                                                f"Cholesky over the kernel's tiles, "
                                                f"{v.format_bytes(cluster_cholesky_bytes(pb))} of a budget of "
                                                f"{v.format_bytes(memory.budget)} ({memory.source})")
        elif method == "auto":
            method, why = "iterative", (f"on the Dask cluster ({len(J.shards)} shards), {pb.m} rows per task: an "
                                        f"exact factorization needs {obstacle[0]}; CG on kernel products over the "
                                        "shards")
        else:
            message = (f"method={method!r} on the Dask cluster ({pb.tasks} task(s) of {pb.m} rows): the blocked "
                       f"Cholesky needs {obstacle[0]}; use method='iterative' (matrix-free)")
            if obstacle[1] is v.MemoryBudgetError:
                raise v.MemoryBudgetError(message)
            raise v.InvalidOptionError(message)
    if method == "iterative":  # the client's vectors and bases, against the budget the engine itself will check
        check_fits("iterative", pb, v.resolve_memory_budget(settings.memory_budget, J.backend))
    space, solver = split_method(method)
    return Plan(method, space, solver, pb.tasks, pb.m, pb.p, why)
