"""Jacobians held in row shards on a Dask cluster: :class:`ShardedJacobian`, made by :func:`export_jacobian` from a
dask array, and the products, kernels and reductions the models need from it.

Each shard is an ordinary :class:`~lingp_core.jacobian.JacobianBlocks` of consecutive examples, computed by a task
on a worker (the network shipped once per worker) and kept there as a distributed future; the client holds only
the small things: f₀ (n, c), the row counts, the signature. Every product is a round of tasks, one per shard, driven
from the client (never one lazy graph that grows per iteration):

- J V: V (p, k) goes to every shard, each returns its rows J_i V, the client stacks them (n·c, k);
- Jᵀ U: each shard gets its rows of U and returns J_iᵀ U_i (p, k); the client sums them — one reduction of
  p-vectors per product, the only traffic that grows with p;
- kernel products K V = J (Jᵀ V) are those two rounds; Fisher products Σ_i G_iᵀ (G_i V) are one round.

A shard lost with its worker is recomputed by Dask from its inputs (the task's lineage), so a fit survives a killed
worker with the same answer. Dask is imported only here, and only when a dask array is passed.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import backends
from lingp_core import _validate as v
from lingp_core.jacobian import JacobianBlocks, JacobianShape, _count, check_row_factors
from lingp_core.operators import LinearOperator

__all__ = ["ShardedJacobian", "is_dask_array", "is_sharded"]

#: Of the cluster's worker memory, the share an exact kernel and its factor may take (the rest: shards, work space,
#: Dask's own buffers and its spill threshold).
CLUSTER_MEMORY_SHARE = 0.5
#: Operands shared by every shard's task above this size travel as one future instead of inside each task
_SHARED_INLINE_BYTES = 1 << 20


def register_sizeof() -> None:
    """Tell Dask what a shard weighs (its arrays' bytes): without it the scheduler counts a JacobianBlocks as a few
    dozen bytes and moves shards next to their small operands instead of the other way round. Called where dask is
    in use (workers load this module to run its tasks; the client on export), never at ``import lingp_core``."""
    from dask.sizeof import sizeof

    @sizeof.register(JacobianBlocks)
    def _jacobian_bytes(J: JacobianBlocks) -> int:
        return int(J.nbytes + J.f0.nbytes)


def is_dask_array(x: Any) -> bool:
    """Whether ``x`` is a dask collection, without importing dask."""
    return type(x).__module__.split(".")[0] == "dask" and hasattr(x, "dask")


def is_sharded(J: Any) -> bool:
    return isinstance(J, ShardedJacobian)


def current_client() -> Any:
    """The running dask.distributed Client, or None (no distributed installed, or no client: dask's default
    scheduler then computes the inputs and everything runs in this process)."""
    try:
        from distributed import get_client
    except ImportError:
        return None
    try:
        return get_client()
    except ValueError:
        return None


_GONE = ("its Dask client was closed or the cluster restarted, so its shards no longer exist: export the "
         "Jacobian again on a running client (and save() a model fitted on a cluster before closing the client)")


def check_running(client: Any) -> None:
    """ClusterError unless ``client`` is running."""
    status = getattr(client, "status", "running")
    if status != "running":
        raise v.ClusterError(f"the Dask client is {status}: {_GONE}")


def gather(client: Any, futures: Any) -> Any:
    """``client.gather(futures)``, a lost cluster (closed client, cancelled futures after a restart) reported as a
    ClusterError rather than distributed's own exceptions."""
    from concurrent.futures import CancelledError

    check_running(client)
    try:
        return client.gather(futures)
    except CancelledError as exc:
        raise v.ClusterError(f"a sharded computation was cancelled ({exc}): {_GONE}") from exc
    except Exception as exc:
        closed = type(exc).__name__ in ("ClosedClientError", "CommClosedError")
        if closed or getattr(client, "status", "running") != "running":
            raise v.ClusterError(f"the Dask client stopped during a sharded computation ({exc!r}): {_GONE}") from exc
        raise


def scheduler_workers(client: Any) -> dict[str, dict[str, Any]]:
    """Every worker the scheduler knows: address → its info (memory_limit, ...)."""
    check_running(client)
    try:
        info = client.scheduler_info(n_workers=-1)  # newer distributed lists only a few workers by default
    except TypeError:  # older distributed: no n_workers keyword, every worker listed
        info = client.scheduler_info()
    return info["workers"]


def _dask_array_module() -> Any:
    try:
        import dask.array as da
    except ImportError:  # a dask collection without dask.array cannot reach here; kept for a clear message
        raise v.MissingDependencyError("dask arrays need dask[array]: pip install 'lingp[dask]'") from None
    return da


def row_chunked(x: Any, name: str) -> Any:
    """A dask array chunked by rows only (feature axes rechunked to one chunk each), with known chunk sizes."""
    da = _dask_array_module()
    if not isinstance(x, da.Array):
        raise v.ArgumentTypeError(f"{name} must be a dask array (dask.array.Array), got {v.describe(x)}")
    if x.ndim == 0:
        raise v.ShapeError(f"{name} must have a leading example axis, got a 0-d dask array")
    if any(np.isnan(size) for sizes in x.chunks for size in sizes):
        raise v.ShapeError(f"{name} has unknown chunk sizes {x.chunks} (e.g. after boolean indexing); call "
                           f"{name}.compute_chunk_sizes() first")
    if any(len(sizes) > 1 for sizes in x.chunks[1:]):
        x = x.rechunk({axis: -1 for axis in range(1, x.ndim)})  # rows stay where they are: one shard per row chunk
    return x


def gather_array(x: Any, name: str, rows: int | None = None) -> np.ndarray:
    """A small dask array (targets, labels) computed to the client: on the cluster when there is one."""
    x = row_chunked(x, name)
    if rows is not None and x.shape[0] != rows:
        raise v.ShapeError(f"{name} has {x.shape[0]} rows (shape {tuple(x.shape)}) but the Jacobian has n = {rows} "
                           "examples")
    client = current_client()
    return gather(client, client.compute(x)) if client is not None else x.compute()


def training_pair(J: Any, y: Any, name: str = "y") -> Any:
    """y as an in-memory array for a fit on J; dask and in-memory training data are not mixed."""
    if is_sharded(J) and not is_dask_array(y):
        raise v.ArgumentTypeError(f"J is sharded on a Dask cluster but {name} is {v.describe(y)}: pass {name} as a "
                                  "dask array with the same row chunks as the inputs J was exported from")
    if not is_sharded(J) and is_dask_array(y):
        if current_client() is not None:
            raise v.ArgumentTypeError(f"{name} is a dask array but J is in memory ({type(J).__name__}) while a Dask "
                                      "client is running; export J from a dask array of the inputs too (then it is "
                                      f"sharded on the cluster), or pass {name}.compute()")
        return gather_array(y, name, J.n)  # no client: export computed the inputs too, by the default scheduler
    return gather_array(y, name, J.n) if is_sharded(J) else y


# ----- export ---------------------------------------------------------------------------------------------------

def export_sharded(model: Any, inputs: Any, options: dict[str, Any]) -> Any:
    """:func:`export_jacobian` for a dask array of inputs: a ShardedJacobian on the running client's workers, one
    shard per row chunk; without a client, the inputs are computed by dask's default scheduler and exported here
    (an in-memory JacobianBlocks)."""
    from lingp_core.export import check_sharded_export, export_jacobian
    x = row_chunked(inputs, "inputs")
    client = current_client()
    if client is None:
        return export_jacobian(model, x.compute(), **options)
    register_sizeof()
    progress = options.pop("progress", False)
    if x.shape[0] == 0:
        raise v.ShapeError(f"inputs has no rows (shape {tuple(x.shape)})")
    # shard i lives on worker i mod W (left to itself the scheduler runs every export where the network's bytes
    # are); each shard's later tasks are sent to its home too, or a shared operand larger than a shard would pull
    # the shards to itself. Homes are loose: after a lost worker Dask recomputes and runs elsewhere
    addresses = sorted(scheduler_workers(client))
    if not addresses:  # (the first example's compute below would wait for one forever)
        raise v.MissingCapabilityError("the Dask cluster has no workers: start some (or wait for them: "
                                       "client.wait_for_workers(1)) before exporting")
    chunks = [c for c in x.to_delayed().reshape(-1)]
    counts = [int(s) for s in x.chunks[0]]
    kept = [(chunk, count) for chunk, count in zip(chunks, counts) if count > 0]
    _free_stranded_tasks(client)
    homes = [addresses[i % len(addresses)] for i in range(len(kept))]
    # the input chunks, computed once where their shards will live; the checks below read the first example
    futures = [client.compute(chunk, workers=[home], allow_other_workers=True) for (chunk, _), home in zip(kept, homes)]
    first = gather(client, client.submit(_first_example, futures[0], pure=False))
    try:
        check_sharded_export(model, first, **{k: options[k] for k in ("params", "outputs", "dtype", "batch_size",
                                                                      "memory_budget")})
    except v.LingpError as exc:  # the same error, saying that it was found on the first example only
        exc.args = (f"checked on the client with the first example of the dask inputs (shape {tuple(x.shape)}, "
                    f"chunks {x.chunks[0]}), before any shard: {exc}",)
        raise
    # the network travels once per worker as bytes (a torch module moved between workers by Dask's own
    # serialization loses its hook dicts' type), inside a task, so a lost copy is recomputable; the options are
    # pickled with it, so params= given as modules or parameters still name parts of that very model
    import cloudpickle
    shipped = client.submit(_identity, cloudpickle.dumps((model, options)), pure=False)
    starts = np.cumsum([0] + [count for _, count in kept])
    shards = [client.submit(_export_shard, shipped, part, int(start), pure=False, workers=[home],
                            allow_other_workers=True) for part, start, home in zip(futures, starts, homes)]
    described = _gather_described(client, shards, progress)
    return ShardedJacobian._from_shards(client, shards, described, homes)


def _free_stranded_tasks(client: Any) -> None:
    """Install (once per scheduler) a plugin that frees tasks stranded by a lost home worker. A task loosely
    restricted to workers that are all gone runs anywhere while some worker is alive; but if none is at that
    moment it goes to 'no-worker', and distributed never reconsiders it for a worker that joins later (a nanny's
    restart has a new address): the fit would wait forever. When a worker joins, the plugin drops such stale
    restrictions, just before the scheduler looks for tasks the new worker can run."""
    def install(dask_scheduler: Any) -> None:  # a closure: pickled by value, no lingp import on the scheduler
        from distributed.diagnostics.plugin import SchedulerPlugin

        class FreeStrandedTasks(SchedulerPlugin):
            def add_worker(self, scheduler: Any, worker: str) -> None:
                for task in list(scheduler.unrunnable):
                    restricted = task.worker_restrictions
                    if (restricted and task.loose_restrictions
                            and not any(address in scheduler.workers for address in restricted)):
                        task.worker_restrictions, task.loose_restrictions = None, False

        dask_scheduler.add_plugin(FreeStrandedTasks(), name="lingp-free-stranded-tasks", idempotent=True)

    client.run_on_scheduler(install)


def _identity(x: Any) -> Any:
    return x


def _first_example(x: Any) -> Any:
    return x[:1]


def _export_shard(shipped: bytes, inputs: Any, start: int) -> JacobianBlocks:
    import pickle

    from lingp_core.export import export_jacobian
    model, options = pickle.loads(shipped)
    try:
        return export_jacobian(model, inputs, **options)
    except v.LingpError as exc:  # the same error, its message naming the shard
        exc.args = (f"exporting the shard of examples [{start}, {start + len(inputs)}) on a worker (an example index "
                    f"below counts from the shard's start: add {start} for its index in the inputs): {exc}",)
        raise


def _describe(J: JacobianBlocks) -> dict[str, Any]:
    return {"f0": J.f0, "signature": J.signature(), "block_sizes": J.block_sizes,
            "block_names": tuple(tuple(b.names) for b in J.blocks), "param_names": J.param_names,
            "param_shapes": J.param_shapes, "outputs": J.outputs, "fingerprint": J.weights_fingerprint,
            "nbytes": J.nbytes, "backend": J.backend.name}


def _gather_described(client: Any, shards: list[Any], progress: bool) -> list[dict[str, Any]]:
    from lingp_core._progress import progress_bar
    described = [client.submit(_describe, shard, pure=False) for shard in shards]
    if progress:
        from distributed import wait
        with progress_bar(len(shards), enabled=True, desc="export_jacobian (shards)", unit="shard") as bar:
            for future in described:
                wait(future)
                bar.update(1)
    return gather(client, described)


# ----- the sharded Jacobian ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class ShardTimings:
    """Where the time of the shard rounds went (seconds, summed over calls): ``compute`` the slowest shard's own
    work per round (the critical path), ``reduction`` the client's sums and stacking, ``wall`` the rounds end to
    end; wall − compute − reduction is scheduling and transfer."""

    rounds: int = 0
    compute: float = 0.0
    reduction: float = 0.0
    wall: float = 0.0

    def reset(self) -> None:
        self.rounds, self.compute, self.reduction, self.wall = 0, 0.0, 0.0, 0.0


class ShardedJacobian(JacobianShape):
    """The Jacobian J (n·c × p) of a network, held in row shards by the workers of a Dask cluster.

    Made by :func:`lingp_core.export_jacobian` from a dask array of inputs (one shard per row chunk). Models take
    it like a :class:`~lingp_core.jacobian.JacobianBlocks`; products, kernels and reductions run where the shards
    live. ``f0`` (n, c) is held by the client.

    Attributes
    ----------
    client : distributed.Client
    shards : list of distributed.Future
        One JacobianBlocks per shard, on the workers.
    counts : tuple of int
        Examples per shard.
    timings : ShardTimings
        Accumulated time of the shard rounds (for benchmarks).
    """

    def __init__(self, client: Any, shards: Sequence[Any], counts: Sequence[int], f0: Any, meta: dict[str, Any],
                 backend: backends.Backend, homes: Sequence[str | None] | None = None) -> None:
        self.client, self.shards, self.counts = client, list(shards), tuple(int(c) for c in counts)
        self.homes = list(homes) if homes is not None else [None] * len(self.shards)
        self.starts = tuple(int(s) for s in np.cumsum((0,) + self.counts))
        self.f0, self.backend, self._meta = f0, backend, meta
        self.outputs = tuple(meta["outputs"])
        self.weights_fingerprint = meta["fingerprint"]
        # JacobianBlocks' description, read from the shards at export (the same for every shard)
        self.param_names: tuple[str, ...] = tuple(meta["param_names"])
        self.param_shapes: tuple[tuple[int, ...], ...] = tuple(meta["param_shapes"])
        self.block_sizes: tuple[int, ...] = tuple(meta["block_sizes"])
        self.block_names: tuple[tuple[str, ...], ...] = tuple(meta["block_names"])
        self.nbytes = int(meta["nbytes"])
        self.timings = ShardTimings()

    @classmethod
    def _from_shards(cls, client: Any, shards: list[Any], described: list[dict[str, Any]],
                     homes: list[str]) -> ShardedJacobian:
        first = described[0]
        for k, d in enumerate(described[1:], start=1):
            if d["backend"] != first["backend"]:
                raise v.BackendMismatchError(f"shard {k} lives on backend {d['backend']!r} but shard 0 on "
                                             f"{first['backend']!r}: give export_jacobian backend= explicitly and "
                                             "workers of one kind")
            if d["signature"] != first["signature"]:
                raise v.SignatureError(f"shard {k} was exported with another signature than shard 0 ({d['signature']}"
                                       f" vs {first['signature']}): the network changed during the export")
        be = backends.get_backend(first["backend"])
        f0 = be.xp.concatenate([d["f0"] for d in described], axis=0)
        meta = {key: first[key] for key in ("signature", "block_sizes", "block_names", "param_names",
                                            "param_shapes", "outputs", "fingerprint")}
        meta["nbytes"] = sum(d["nbytes"] for d in described)
        return cls(client, shards, [d["f0"].shape[0] for d in described], f0, meta, be, homes)

    def _derived(self, shards: list[Any], f0: Any, **changes: Any) -> ShardedJacobian:
        meta = dict(self._meta, **changes)
        out = ShardedJacobian(self.client, shards, self.counts, f0, meta, self.backend, self.homes)
        out.timings = self.timings  # one account per export
        return out

    # ----- description -------------------------------------------------------------------------------------------
    @property
    def xp(self) -> Any:
        return self.backend.xp

    @property
    def p(self) -> int:
        return int(sum(self.block_sizes))

    def gram_diagonal(self) -> Any:
        """diag(J Jᵀ): (n·c,)."""
        return self.kernel_diag("full", self.dtype)

    def gram_matmat(self, U: Any) -> Any:
        """J (Jᵀ U): (n·c, k)."""
        U, flat = self._operand(U, "U", self.n * self.n_outputs)
        out = self.kernel_matmat(U, "full")
        return out[:, 0] if flat else out

    def gram(self, other: Any = None, *, memory_budget: Any = None) -> Any:
        raise v.MissingCapabilityError("J.gram() of a ShardedJacobian: use lingp_core.kernel(J) (a dask array of "
                                       "tiles) or kernel(J_local, J) for an in-memory cross kernel")

    def examples(self, rows: slice) -> Any:
        raise v.MissingCapabilityError("ShardedJacobian.examples: select the examples on the dask array of inputs "
                                       "before exporting")

    def check_compatible(self, other: Any) -> None:
        raise v.MissingCapabilityError("ShardedJacobian.check_compatible: compare signatures instead "
                                       "(other.check_signature(J.signature()))")

    def to_dense(self, memory_budget: Any = None) -> Any:
        raise v.MissingCapabilityError("a dense J (n·c × p) of a ShardedJacobian would gather every shard; use "
                                       "J.gather() when it fits, or the matrix-free products")

    @property
    def blocks(self) -> Any:
        raise v.MissingCapabilityError("the blocks of a ShardedJacobian live on the Dask workers; this operation needs "
                                       "them in memory: J.gather() (when it fits) or an in-memory export")

    def __repr__(self) -> str:
        return (f"ShardedJacobian(n={self.n}, c={self.n_outputs}, p={self.p}, dtype={self.dtype}, "
                f"shards={len(self.shards)}, backend={self.backend.name!r})")

    def signature(self) -> dict[str, Any]:
        return dict(self._meta["signature"])

    check_signature = JacobianBlocks.check_signature

    def check_alive(self) -> None:
        """ClusterError when the client is no longer running or a shard was cancelled (a restarted cluster)."""
        check_running(self.client)
        if any(shard.status == "cancelled" for shard in self.shards):
            raise v.ClusterError(f"the shards of {self!r} were cancelled: {_GONE}")

    def persist(self) -> ShardedJacobian:
        """Wait until every shard is computed (export already waits; derived Jacobians such as ``select(output=k)``
        are computed on first use)."""
        from distributed import wait
        self.check_alive()
        wait(self.shards)  # the shards stay on their workers: nothing is gathered
        self.check_alive()  # a restart during the wait cancels them
        failed = [shard for shard in self.shards if shard.status == "error"]
        if failed:
            gather(self.client, failed[:1])  # raises that shard's own error
        return self

    # ----- rounds of shard tasks ---------------------------------------------------------------------------------
    def _round(self, fn: Callable, per_shard: Sequence[Any] | None = None, *shared: Any) -> list[Any]:
        """Run ``fn(shard, [part], *shared)`` on every shard where it lives; fn returns (result, seconds). The
        results in shard order; the slowest shard's seconds and the whole round's are added to ``timings``."""
        self.check_alive()
        begin = time.perf_counter()
        shared = tuple(self._once(x) for x in shared)
        futures = [self._at(i, _timed, fn, shard, *(() if per_shard is None else (per_shard[i],)), *shared)
                   for i, shard in enumerate(self.shards)]
        done = gather(self.client, futures)
        self.timings.rounds += 1
        self.timings.compute += max(seconds for _, seconds in done)
        self.timings.wall += time.perf_counter() - begin
        return [result for result, _ in done]

    def _at(self, i: int, fn: Callable, *args: Any) -> Any:
        """Submit a task of shard i to the shard's home worker (a loose preference: another runs it if the home is
        gone; :func:`_free_stranded_tasks` covers the moment when no worker is alive)."""
        check_running(self.client)
        home = self.homes[i]
        return self.client.submit(fn, *args, pure=False, workers=None if home is None else [home],
                                  allow_other_workers=True)

    def _once(self, x: Any) -> Any:
        """A large operand every shard's task reads (a p × k block, a test Jacobian) as one future made by a task:
        it travels to each worker once instead of inside every task, and stays recomputable."""
        if getattr(x, "nbytes", 0) >= _SHARED_INLINE_BYTES:
            check_running(self.client)
            return self.client.submit(_identity, x, pure=False)
        return x

    def _tree_sum(self, futures: list[Any]) -> Any:
        """Σ of the futures' results, added pairwise on the workers: one result comes back to the client."""
        while len(futures) > 1:
            pairs = [self.client.submit(_add, a, b, pure=False) for a, b in zip(futures[::2], futures[1::2])]
            futures = pairs + ([futures[-1]] if len(futures) % 2 else [])
        return gather(self.client, futures[0])

    def _reduce(self, parts: list[Any], how: Callable) -> Any:
        begin = time.perf_counter()
        out = how(parts)
        self.timings.reduction += time.perf_counter() - begin
        self.timings.wall += time.perf_counter() - begin
        return out

    def _split(self, U: Any, rows_per_example: int) -> list[Any]:
        return [U[a * rows_per_example: b * rows_per_example] for a, b in zip(self.starts[:-1], self.starts[1:])]

    def _map(self, fn: Callable, *args: Any) -> list[Any]:
        """New shard futures ``fn(shard, *args)``, lazy (computed on first use, recomputable)."""
        return [self._at(i, fn, shard, *args) for i, shard in enumerate(self.shards)]

    # ----- derived Jacobians ---------------------------------------------------------------------------------------
    def select(self, examples: Any = None, output: int | None = None) -> ShardedJacobian:
        """One output's rows (``output=k``); selecting examples needs an in-memory Jacobian."""
        if examples is not None:
            raise v.MissingCapabilityError("ShardedJacobian.select selects an output only; select examples on the "
                                           "dask array of inputs before exporting")
        if output is None:
            return self
        k = _count(output, "output", 0)  # ArgumentTypeError for a bool or a float, as in memory
        if k >= self.n_outputs:
            raise v.ValueRangeError(f"output must be an int in [0, {self.n_outputs - 1}], got {output!r}")
        signature = dict(self._meta["signature"], outputs=[self.outputs[k]])
        return self._derived(self._map(_select_output, k), self.f0[:, k: k + 1], outputs=(self.outputs[k],),
                             signature=signature)

    def as_float64(self) -> ShardedJacobian:
        """Every shard's blocks (and f0) in float64; self when already float64."""
        if self.dtype == np.float64:
            return self
        signature = dict(self._meta["signature"], dtype="float64")
        return self._derived(self._map(_as_float64), self.f0.astype(np.float64), signature=signature)

    def transform_rows(self, factors: Any) -> ShardedJacobian:
        """G = L_iᵀ J_i per example (factors (n, c) or (n, c, c)), shard by shard."""
        parts = self._split(check_row_factors(factors, self), 1)
        shards = [self._at(i, _transform_rows, shard, part) for i, (shard, part) in enumerate(zip(self.shards, parts))]
        return self._derived(shards, self.f0)

    def gather(self, memory_budget: float | None = None) -> JacobianBlocks:
        """The whole Jacobian in this process, as one JacobianBlocks (checked against the memory budget)."""
        budget = v.resolve_memory_budget(memory_budget, self.backend)
        v.check_memory(2 * self.nbytes, budget, what=f"gathering the sharded Jacobian ({self!r})",
                       alternative="keep it on the cluster")
        return concatenate(gather(self.client, self.shards))

    # ----- products --------------------------------------------------------------------------------------------
    def matmat(self, V: Any) -> Any:
        """J V: (n·c, k) for V (p, k) (or (n·c,) for (p,))."""
        V, flat = self._operand(V, "V", self.p)
        rows = self._round(_matmat, None, V)
        out = self._reduce(rows, lambda parts: self.xp.concatenate(parts, axis=0))
        return out[:, 0] if flat else out

    def rmatmat(self, U: Any) -> Any:
        """Jᵀ U: (p, k) for U (n·c, k): one reduction of p-vectors."""
        U, flat = self._operand(U, "U", self.n * self.n_outputs)
        parts = self._round(_rmatmat, self._split(U, self.n_outputs))
        out = self._reduce(parts, sum)
        return out[:, 0] if flat else out

    def normal_matmat(self, V: Any) -> Any:
        """Jᵀ J V = Σ_i J_iᵀ (J_i V): (p, k) for V (p, k), one round and one reduction."""
        return self._reduce(self._round(_normal_matmat, None, V), sum)

    def column_sq_norms(self) -> Any:
        """diag(Jᵀ J): (p,)."""
        return self._reduce(self._round(_column_sq_norms), sum)

    def dense_ggn(self, factors: Any, memory_budget: Any) -> Any:
        """Σ_i J_iᵀ Λ_i J_i (p, p) float64, each shard's part on its worker, summed by the client."""
        v.check_memory(2 * v.nbytes_of((self.p, self.p), np.float64),
                       v.resolve_memory_budget(memory_budget, self.backend),
                       what=f"the p × p Hessian (p = {self.p}) gathered from the shards", alternative="export fewer "
                       "parameters (params=, e.g. 'last_layer')")
        self._check_worker_ggn(memory_budget)
        begin = time.perf_counter()
        parts = [self._at(i, _dense_ggn, shard, part, memory_budget)
                 for i, (shard, part) in enumerate(zip(self.shards, self._split(factors, 1)))]
        out = self._tree_sum(parts)
        self.timings.rounds += 1
        self.timings.wall += time.perf_counter() - begin
        return out

    def _check_worker_ggn(self, memory_budget: Any) -> None:
        """Before any task: a worker holds its shard's p × p part and, in the tree sum, two more (its own and one
        received), against ``memory_budget`` if given (the workers use it too), else the smallest worker's share of
        its memory (not checked when the workers report none)."""
        from lingp_core._plan import worker_share
        budget = memory_budget if memory_budget is not None else worker_share(self.client, self.backend.name)
        if budget is not None:
            v.check_memory(3 * v.nbytes_of((self.p, self.p), np.float64), int(budget),
                           what=f"the p × p Hessian's parts on one worker (its shard's and two in the sum, p = "
                                f"{self.p})", alternative="export fewer parameters (params=, e.g. 'last_layer'), "
                                "or start workers with more memory")

    def kernel_matmat(self, X: Any, mode: Any) -> Any:
        """K0 X for the unscaled kernel K0 of output mode "full" (X (n·c, k)), "trace" (the mean over outputs,
        X (n, k)) or one output k (X (n, k)): two rounds, one reduction of p × (outputs·k)."""
        # one submission: the p-vector sum is a task on a worker, which the second products wait for, so the
        # client is not on the path between the two halves
        begin = time.perf_counter()
        per_example = self.n_outputs if mode == "full" else 1
        pieces = [self._at(i, _timed, _kernel_rmatmat, shard, part, mode)
                  for i, (shard, part) in enumerate(zip(self.shards, self._split(X, per_example)))]
        total = self.client.submit(_timed_sum, *pieces, pure=False)
        done = gather(self.client, [self._at(i, _kernel_matmat_after, shard, total, mode)
                                   for i, shard in enumerate(self.shards)])
        self.timings.rounds += 1
        self.timings.compute += done[0][2] + max(seconds for _, seconds, _, _ in done)
        self.timings.reduction += done[0][3]
        self.timings.wall += time.perf_counter() - begin
        return self._reduce([rows for rows, _, _, _ in done], lambda parts: self.xp.concatenate(parts, axis=0))

    def kernel_diag(self, mode: Any, dtype: Any) -> Any:
        from lingp_core.kernels import kernel_diag
        parts = self._round(_shard_call, None, kernel_diag, {"output_mode": mode, "dtype": dtype})
        axis = 1 if mode == "independent" else 0
        return self._reduce(parts, lambda ps: self.xp.concatenate(ps, axis=axis))

    def cross_kernel(self, J_local: JacobianBlocks, mode: Any, dtype: Any, memory_budget: Any = None) -> Any:
        """K0(X_local, X) with the local Jacobian's rows first: the shards' columns side by side (the parts and
        the result on the client: checked against the client's budget first)."""
        from lingp_core.kernels import kernel
        rows = J_local.n * (J_local.n_outputs if mode == "full" else 1)
        cols = self.n * (self.n_outputs if mode == "full" else 1)
        outputs = self.n_outputs if mode == "independent" else 1
        v.check_memory(2 * v.nbytes_of((outputs, rows, cols), dtype), v.resolve_memory_budget(memory_budget,
                                                                                                self.backend),
                       what=f"the cross kernel ({rows} test × {cols} training rows) on the client",
                       alternative="predict fewer test points per call")
        parts = self._round(_cross_kernel, None, J_local, kernel, {"output_mode": mode, "dtype": dtype})
        return self._reduce(parts, lambda ps: self.xp.concatenate(ps, axis=-1))

    def kernel_tiles(self, mode: Any, dtype: Any) -> dict[tuple[int, int], Any]:
        """Futures of the kernel's tiles K0[i, j] (shard i's rows × shard j's), upper triangle (i ≤ j) only."""
        from lingp_core.kernels import kernel
        self.check_alive()  # the tiles are futures: a cancelled shard would surface only when they are computed
        T = len(self.shards)
        return {(i, j): self._at(i, _tile, self.shards[i], self.shards[j], kernel,
                                 {"output_mode": mode, "dtype": dtype})
                for i in range(T) for j in range(i, T)}

    def tile_rows(self, mode: Any) -> list[int]:
        """Rows of each shard's tiles."""
        return [count * (self.n_outputs if mode == "full" else 1) for count in self.counts]

    def kernel_array(self, mode: Any, dtype: Any, prior_scale: float = 1.0) -> Any:
        """s·K0 as a 2-D dask array of the tiles (lower tiles are the upper ones transposed, never recomputed)."""
        import dask
        da = _dask_array_module()
        tiles, sizes = self.kernel_tiles(mode, dtype), self.tile_rows(mode)
        T = len(sizes)

        def tile(i: int, j: int) -> Any:
            future = tiles[(min(i, j), max(i, j))]
            block = da.from_delayed(dask.delayed(future), (sizes[min(i, j)], sizes[max(i, j)]), dtype=dtype,
                                    meta=self.xp.empty((0, 0), dtype=dtype))
            return block if i <= j else block.T

        return prior_scale * da.block([[tile(i, j) for j in range(T)] for i in range(T)])


def concatenate(parts: Sequence[JacobianBlocks]) -> JacobianBlocks:
    """One JacobianBlocks of the examples of ``parts`` (same parameters, outputs, backend), in order."""
    from lingp_core.jacobian import _Block
    first = parts[0]
    xp = first.xp
    blocks = []
    for k, block in enumerate(first.blocks):
        arrays, entry = block.to_arrays()
        joined = {name: xp.concatenate([p.blocks[k].to_arrays()[0][name] for p in parts], axis=0) for name in arrays}
        blocks.append(_Block.kind_class(block.kind).from_arrays(entry, joined, xp))
    f0 = xp.concatenate([p.f0 for p in parts], axis=0)
    return JacobianBlocks(f0, blocks, backend=first.backend, outputs=first.outputs,
                          weights_fingerprint=first.weights_fingerprint)


# ----- tasks (run on the workers) -------------------------------------------------------------------------------

def _add(a: Any, b: Any) -> Any:
    return a + b


def _timed(fn: Callable, *args: Any) -> tuple[Any, float]:
    begin = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - begin


def _select_output(J: JacobianBlocks, k: int) -> JacobianBlocks:
    return J.select(output=k)


def _as_float64(J: JacobianBlocks) -> JacobianBlocks:
    from lingp_core._energy import _as_float64 as convert
    return convert(J)


def _transform_rows(J: JacobianBlocks, factors: Any) -> JacobianBlocks:
    return J.transform_rows(factors)


def _matmat(J: JacobianBlocks, V: Any) -> Any:
    return J.matmat(V)


def _rmatmat(J: JacobianBlocks, U: Any) -> Any:
    return J.rmatmat(U)


def _normal_matmat(J: JacobianBlocks, V: Any) -> Any:
    return J.rmatmat(J.matmat(V))


def _column_sq_norms(J: JacobianBlocks) -> Any:
    return J.column_sq_norms()


def _dense_ggn(J: JacobianBlocks, factors: Any, memory_budget: Any) -> Any:
    from lingp_core._ggn import dense_ggn
    return dense_ggn(J, factors, memory_budget)


def _output_views(J: JacobianBlocks, mode: Any) -> list[JacobianBlocks]:
    if mode == "full":
        return [J]
    outputs = range(J.n_outputs) if mode == "trace" else [int(mode)]
    return [J.select(output=k) for k in outputs]


def _kernel_rmatmat(J: JacobianBlocks, X: Any, mode: Any) -> Any:
    """[J_kᵀ X for each output view k] side by side: (p, views·k)."""
    return J.xp.concatenate([view.rmatmat(X) for view in _output_views(J, mode)], axis=1)


def _kernel_matmat(J: JacobianBlocks, W: Any, mode: Any) -> Any:
    """Σ_k J_k W_k / views for the views' column groups of W."""
    views = _output_views(J, mode)
    k = W.shape[1] // len(views)
    out = sum(view.matmat(W[:, i * k: (i + 1) * k]) for i, view in enumerate(views))
    return out / len(views) if len(views) > 1 else out


def _timed_sum(*parts: tuple[Any, float]) -> tuple[Any, float, float]:
    """(Σ results, the slowest part's seconds, the sum's own seconds)."""
    begin = time.perf_counter()
    total = sum(result for result, _ in parts)
    return total, max(seconds for _, seconds in parts), time.perf_counter() - begin


def _kernel_matmat_after(J: JacobianBlocks, total: tuple[Any, float, float], mode: Any) -> tuple:
    """(J's kernel rows from the reduced W, own seconds, the first half's slowest seconds, the sum's seconds)."""
    begin = time.perf_counter()
    rows = _kernel_matmat(J, total[0], mode)
    return rows, time.perf_counter() - begin, total[1], total[2]


def _shard_call(J: JacobianBlocks, fn: Callable, kwargs: dict[str, Any]) -> Any:
    return fn(J, **kwargs)


def _cross_kernel(J: JacobianBlocks, J_local: JacobianBlocks, kernel: Callable, kwargs: dict[str, Any]) -> Any:
    return kernel(J_local, J, **kwargs)


def _tile(J1: JacobianBlocks, J2: JacobianBlocks, kernel: Callable, kwargs: dict[str, Any]) -> Any:
    return kernel(J1, None if J2 is J1 else J2, **kwargs)


# ----- the kernel as an operator ------------------------------------------------------------------------------

class ShardedKernelOperator(LinearOperator):
    """s·K0 + noise·I of a ShardedJacobian as a matrix-free operator (output mode "full", "trace" or an int)."""

    def __init__(self, J: ShardedJacobian, *, prior_scale: float, output_mode: Any, noise: float = 0.0) -> None:
        self.J, self.prior_scale, self.output_mode, self.noise = J, prior_scale, output_mode, noise
        rows = J.n * J.n_outputs if output_mode == "full" else J.n
        self.shape, self.dtype, self.backend = (rows, rows), J.dtype, J.backend

    def _matmat(self, x: Any) -> Any:
        out = self.J.kernel_matmat(x, self.output_mode)
        return out * self.dtype.type(self.prior_scale) + self.dtype.type(self.noise) * x

    def diagonal(self) -> Any:
        d = self.J.kernel_diag(self.output_mode, self.dtype)
        return d * self.dtype.type(self.prior_scale) + self.dtype.type(self.noise)


if "dask" in sys.modules:  # a worker (or a client that imported dask first) loading this module: register now
    register_sizeof()
