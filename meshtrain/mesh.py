"""The job's mesh as a training script sees it (the public API).

`init()` returns a `Mesh`. Started plainly (`python script.py`) it is world
size 1 and every call is local; started by an agent or `meshtrain run --local`,
the worker runtime fills in rank, size and a ring (see meshtrain.worker).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def resolve_wire_dtype(tree: Any, wire_dtype: str | None) -> str:
    """The wire dtype an all-reduce of `tree` uses ("auto" decides by what is reduced): see
    meshtrain.ring.codecs.resolve, where the codecs and this policy live."""
    from meshtrain.errors import UserError
    from meshtrain.ring.codecs import resolve  # late: the ring package is heavier

    name = resolve(tree, wire_dtype)
    if name == "qint8":  # integers on an agreed grid: only local SGD's compressed sync makes them
        raise UserError("wire_dtype 'qint8' is internal: use OuterOptimizer(..., compress='int8')")
    return name


class Mesh:
    """World-size-1 mesh; the worker runtime subclasses it with a real ring."""

    rank: int = 0
    size: int = 1
    job: str | None = None  # the job id when started by `meshtrain run`
    node: str = "local"  # the name of the node this worker runs on

    _committed: int = 0
    _resumed_from: int | None = None
    local_batch_size: int | None = None  # the size of the slice `batches` handed out last (stage 3's weight)
    shard_replicas: int | None = None  # the job's --shard-replicas (None: auto, meshtrain.shard.replicas)
    accumulating: int = 1  # K while `batches(..., accumulate=K)` yields micro-batches

    @property
    def is_main(self) -> bool:
        """True on the one worker that should print or save (rank 0 of the current generation)."""
        return self.rank == 0

    @property
    def step(self) -> int:
        """The global step: training steps committed so far in this run, the same on every worker,
        continued across `--resume` and by a worker that joins mid-run. Key schedules, logging and
        "every K steps" decisions on it, not on a loop counter (a joiner's loop starts at 0)."""
        return self._committed

    @property
    def resumed_from(self) -> int | None:
        """The checkpoint step this run resumed from (`meshtrain run --resume`), else None."""
        return self._resumed_from

    @property
    def output_dir(self) -> Path:
        """Where to write files that must outlive the job (a model, samples, logs). Run plainly, the
        current directory; inside a job, the job's output directory on this node, which `meshtrain run`
        names at the end (relative paths land in a temporary copy of the script's directory)."""
        return Path.cwd()

    @property
    def data_path(self) -> Path | None:
        """Where `meshtrain run --data PATH` put PATH for this worker (a file or a directory, the same
        bytes on every node, at PATH's relative path in the worker's working directory), or None
        when the job was given no data (and when run plainly)."""
        import os

        from meshtrain.env import DATA_PATH

        where = os.environ.get(DATA_PATH)
        return Path(where) if where else None

    def evaluate(self, n_samples: int, fn: Callable[[np.ndarray], Mapping[str, float]]) -> dict[str, float]:
        """Evaluation spread over the workers: `fn(indices)` returns sums over those samples (say
        `{"correct": 931, "loss_sum": 210.4, "count": 1000}`) and every worker gets the sums over all
        `n_samples`, each index counted once. Call it on every worker at the same point of the loop
        (at the same `mesh.step`). If a worker is lost meanwhile, the survivors evaluate the whole set
        themselves: slower once, never wrong. For an epoch that ended before this worker took part (a
        joiner's loop passing the epochs already done) the sums are NaN: nobody evaluates it with us.
        Sums travel as float32 (counts exact below 2**24)."""
        return {k: float(v) for k, v in fn(np.arange(n_samples, dtype=np.int64)).items()}

    def register(self, model: Any, optimizer: Any) -> None:
        """Name the training state (model and optimizer): what a node joining a running job receives,
        what checkpoints store and resume. A no-op at world size 1."""

    def allreduce(self, tree: Any, weight: float = 1.0, *, wire_dtype: str | None = "auto") -> Any:
        """Weighted mean of `tree` (an MLX array tree) over the mesh; identity here.

        `weight` is this worker's share (its local batch size makes the mean
        exact). `wire_dtype` is what travels between nodes (the sum is always
        taken in float32): "auto" (the default) sends an MLX tree of float32
        leaves as bfloat16, halving the bytes (see `resolve_wire_dtype`);
        "float32" (or None) sends exact float32; "bfloat16"/"float16" force
        16 bits.
        """
        resolve_wire_dtype(tree, wire_dtype)  # a bad name fails at world size 1 too
        return tree

    def batches(
        self,
        n_samples: int,
        batch_size: int,
        *,
        epoch: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        accumulate: int = 1,
    ) -> Iterator[np.ndarray]:
        """Index arrays of this worker's slice of each global batch of one epoch.

        The permutation depends only on (seed, epoch), so every worker agrees on
        it; the global batch is `batch_size`, split between workers. With
        `accumulate=K` each slice comes as K micro-batches, one optimizer step
        (and one all-reduce) per K (meshtrain.train.accumulate shows the loop).
        """
        if accumulate != 1:
            whole = self.batches(n_samples, batch_size, epoch=epoch, seed=seed, drop_last=drop_last)
            yield from self._micro_batches(whole, accumulate)
            return
        perm = np.random.default_rng([seed, epoch]).permutation(n_samples)
        stop = n_samples - (n_samples % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            global_batch = perm[start : start + batch_size]
            mine = np.array_split(global_batch, self.size)[self.rank]
            self.local_batch_size = len(mine)
            yield mine
            self._committed += 1

    def _micro_batches(self, whole: Iterator[np.ndarray], accumulate: int) -> Iterator[np.ndarray]:
        """Each slice of `whole` as `accumulate` micro-batches; `accumulating` says K meanwhile."""
        from meshtrain.train.accumulate import check_accumulate, micro_batches

        self.accumulating = check_accumulate(accumulate)
        try:
            yield from micro_batches(whole, self.accumulating)
        finally:
            self.accumulating = 1

    def config(self, **params: Any) -> dict[str, Any]:
        """Declare the run's hyper-parameters (`mesh.config(lr=1e-3, layers=4)`): recorded with the
        run (`meshtrain runs show`); returns them, a sweep trial's values in place of the declared ones."""
        from meshtrain.tracking import capture  # late: plain scripts need none of it

        return capture.config(params)

    def report(self, **metrics: Any) -> None:
        """Send metrics to the live view; at world size 1 only checked.

        Any named scalar goes (`val_loss=`, `perplexity=`, `lr=` ...; MLX and
        numpy scalars too) and every view shows it. First-class keys keep their
        places: `epoch` and `step` as loop indices (from 0, like `range`),
        `epochs`, `steps_per_epoch`, `loss`, `samples` (this worker's samples in
        this step, for samples/s) and `test_accuracy` (a fraction, from the main
        worker). A non-scalar value is a UserError (meshtrain.metrics). Call it
        every step: inside a job it only queues.
        """
        from meshtrain.metrics import check  # late: as light as the rest of this module's imports

        check(metrics)

    # --- sharded training (meshtrain.shard) ------------------------------------------------
    @property
    def roster(self) -> tuple[str, ...]:
        """The members of the current generation in rank order (who holds which shard)."""
        return (self.node,)

    @property
    def checkpointing(self) -> bool:
        """Whether this job writes checkpoints (sharded jobs cannot yet)."""
        return False

    def reduce_scatter(
        self,
        buf: np.ndarray,
        shards: Any = None,
        weight: float = 1.0,
        *,
        wire_dtype: str | None = "float32",
        overwrite: bool = False,
    ) -> np.ndarray:
        """This worker's shard of the weighted mean of the 1-D float32 `buf` over the mesh.

        `shards` are the shard sizes in rank order (default: near-equal); with
        `overwrite` a job may use `buf` as scratch. At world size 1 the one
        shard is the whole buffer (a copy).
        """
        resolve_wire_dtype(buf, wire_dtype)
        return np.array(buf, np.float32, copy=True)

    def all_gather(
        self,
        shard: np.ndarray,
        shards: Any = None,
        *,
        wire_dtype: str | None = "float32",
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Every worker's 1-D float32 shard concatenated in rank order (into `out` if given).

        At world size 1 that is a copy of `shard`."""
        resolve_wire_dtype(shard, wire_dtype)
        if out is None:
            return np.array(shard, np.float32, copy=True)
        out[:] = shard
        return out

    def shard(self, model: Any, optimizer: Any, *, stage: int = 1, **options: Any) -> Any:
        """Shard `optimizer`'s state (stage 1) and the gradients too (stage 2) across the mesh.

        Returns a registered meshtrain.shard.ShardedOptimizer: call its
        `update(model, grads, weight=...)` instead of `mesh.allreduce` and
        `optimizer.update`. Replaces `mesh.register(model, optimizer)`.
        """
        from meshtrain.shard import ShardedOptimizer

        sharded = ShardedOptimizer(optimizer, self, stage=stage, **options)
        sharded.register(model)
        return sharded

    def close(self) -> None:
        """Leave the ring; nothing to do at world size 1."""


_MESH: Mesh | None = None


def init() -> Mesh:
    """Join this process's job mesh (or a world-size-1 mesh when run plainly).

    Inside a job the worker runtime has installed the job's mesh before the
    script started; run plainly, this is world size 1, and MLX on a Linux CPU
    is pointed at a fast BLAS first (meshtrain.blas), as workers already are.
    """
    global _MESH
    if _MESH is None:
        try:
            blas = importlib.import_module("meshtrain.blas")
        except ImportError:  # pragma: no cover - blas.py is optional for the API
            pass
        else:
            blas.ensure_fast_blas()
        _MESH = Mesh()
    return _MESH
