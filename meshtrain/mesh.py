"""The job's mesh as a training script sees it (the public API).

`init()` returns a `Mesh`. Started plainly (`python script.py`) it is world
size 1 and every call is local; started by an agent or `meshtrain run --local`,
the worker runtime fills in rank, size and a ring (see meshtrain.worker).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import numpy as np


class Mesh:
    """World-size-1 mesh; the worker runtime subclasses it with a real ring."""

    rank: int = 0
    size: int = 1
    job: str | None = None  # the job id when started by `meshtrain run`
    node: str = "local"  # the name of the node this worker runs on

    @property
    def is_main(self) -> bool:
        """True on the one worker that should print, evaluate or save."""
        return self.rank == 0

    def allreduce(self, tree: Any, weight: float = 1.0, *, wire_dtype: str | None = None) -> Any:
        """Weighted mean of `tree` (an MLX array tree) over the mesh; identity here.

        `weight` is this worker's share (its local batch size makes the mean
        exact); `wire_dtype="bfloat16"` halves the bytes sent, for slow links.
        """
        return tree

    def batches(
        self, n_samples: int, batch_size: int, *, epoch: int = 0, seed: int = 0, drop_last: bool = False
    ) -> Iterator[np.ndarray]:
        """Index arrays of this worker's slice of each global batch of one epoch.

        The permutation depends only on (seed, epoch), so every worker agrees on
        it; the global batch is `batch_size`, split between workers.
        """
        perm = np.random.default_rng([seed, epoch]).permutation(n_samples)
        stop = n_samples - (n_samples % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            global_batch = perm[start : start + batch_size]
            yield np.array_split(global_batch, self.size)[self.rank]

    def report(self, **metrics: float) -> None:
        """Send metrics to the live view; a no-op at world size 1.

        Known keys: `epoch` and `step` as loop indices (from 0, like `range`),
        `epochs`, `steps_per_epoch`, `loss`, `samples` (this worker's samples in
        this step, for samples/s) and `test_accuracy` (a fraction, from the main
        worker). Call it every step: inside a job it only queues.
        """

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
