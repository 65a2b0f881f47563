"""The `Mesh` a training script gets inside a job: a real ring behind the same API."""

from __future__ import annotations

from typing import Any

import numpy as np

from meshtrain.mesh import Mesh, resolve_wire_dtype
from meshtrain.worker.reporter import Reporter


class WorkerMesh(Mesh):
    """Rank `rank` of `size`; all-reduces go over `ring` (None when the job has one worker)."""

    def __init__(self, *, rank: int, size: int, job: str, node: str, ring: Any, reporter: Reporter) -> None:
        self.rank = rank
        self.size = size
        self.job = job
        self.node = node
        self._ring = ring
        self._reporter = reporter
        self._step = 0
        self._ring_mb_s: float | None = None
        self.wire_dtype: str | None = None  # what the last all-reduce sent (resolved from "auto")

    @property
    def ring_authenticated(self) -> bool | None:
        """Whether this job's ring proves the mesh secret and tags every frame (None: no ring)."""
        return bool(getattr(self._ring, "authenticated", False)) if self._ring is not None else None

    def allreduce(self, tree: Any, weight: float = 1.0, *, wire_dtype: str | None = "auto") -> Any:
        """Weighted mean of `tree` over every worker of the job (exact with weight = local batch size).

        `wire_dtype="auto"` sends float32 MLX trees as bfloat16 (Mesh.allreduce says why).
        """
        wire_dtype = resolve_wire_dtype(tree, wire_dtype)
        self.wire_dtype = wire_dtype
        if self._ring is None:
            return tree
        step, self._step = self._step, self._step + 1
        if isinstance(tree, np.ndarray) and tree.ndim == 1 and tree.dtype == np.float32:
            out = self._ring.allreduce(tree, step=step, weight=weight, wire_dtype=wire_dtype)
        else:
            out = self._ring.allreduce_tree(tree, step=step, weight=weight, wire_dtype=wire_dtype)
        stats = getattr(self._ring, "last_stats", None) or {}
        busbw = stats.get("busbw")
        if isinstance(busbw, (int, float)):
            self._ring_mb_s = float(busbw) / 1e6
        return out

    def report(self, **metrics: float) -> None:
        """Queue metrics for the live view; batched, never blocks the step."""
        if self._ring_mb_s is not None:
            metrics = {**metrics, "ring_mb_s": self._ring_mb_s}
        self._reporter.report(metrics)

    def close(self) -> None:
        self._reporter.close()
        if self._ring is not None:
            self._ring.close()
            self._ring = None
