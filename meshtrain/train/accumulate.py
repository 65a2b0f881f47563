"""Gradient accumulation: K micro-batches per optimizer step, one all-reduce per step.

Why: a global batch that does not fit a node's memory, or a link slow enough
that one all-reduce per small batch dominates, wants fewer, larger steps
without larger activations. `mesh.batches(n, batch, accumulate=K)` hands out
the same global batches of `batch` samples as without it (the exactly-once
sampler and its ledger see one step per global batch), but yields this
worker's slice of each in K contiguous micro-batches (some may be empty when
the slice is shorter than K). The script sums their gradients, weighted by
their sizes, and reduces once, at the K-th::

    acc = Accumulation(accumulate=K)
    for idx in mesh.batches(n, batch, epoch=e, accumulate=K):
        loss, grads = loss_and_grad(x[idx], y[idx]) if len(idx) else (0.0, None)
        if acc.add(grads, len(idx)):                      # the step's last micro-batch
            grads = mesh.allreduce(acc.mean(like=params), weight=acc.samples)
            optimizer.update(model, grads)

`acc.mean()` is the mean gradient over this worker's slice (sum of n_k * g_k
over n), so the step equals the un-accumulated one up to float rounding.
The step's reduction is still the first all-reduce after its batch was
handed out, so it survives lost workers as a plain step does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from meshtrain.errors import UserError

__all__ = ["Accumulation", "check_accumulate", "micro_batches"]


def check_accumulate(accumulate: object) -> int:
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise UserError(f"mesh.batches: accumulate must be a positive integer (got {accumulate!r})")
    return accumulate


def micro_batches(slices: Iterator[np.ndarray], accumulate: int) -> Iterator[np.ndarray]:
    """Each slice the sampler hands out, as `accumulate` contiguous parts (in order, some maybe empty)."""
    for mine in slices:
        yield from np.array_split(mine, accumulate)


class Accumulation:
    """Sums the micro-batches' gradients of one step, weighted by their sizes."""

    def __init__(self, accumulate: int) -> None:
        self.accumulate = check_accumulate(accumulate)
        self.samples = 0  # of the step in progress (after `add` said ready: of the finished step)
        self._sum: Any = None
        self._count = 0
        self._done = False

    def add(self, grads: Any, samples: int) -> bool:
        """Add one micro-batch's mean gradient over `samples` (None with 0); True at the step's last."""
        import mlx.core as mx
        from mlx.utils import tree_map

        if self._done:
            self._sum, self.samples, self._done = None, 0, False
        self._count += 1
        if samples > 0 and grads is not None:
            scaled = tree_map(lambda g: g * float(samples), grads)
            self._sum = scaled if self._sum is None else tree_map(mx.add, self._sum, scaled)
            self.samples += int(samples)
        if self._count < self.accumulate:
            return False
        self._count, self._done = 0, True
        return True

    def mean(self, like: Any = None) -> Any:
        """The step's mean gradient over its samples; zeros shaped like `like` for a step with none."""
        import mlx.core as mx
        from mlx.utils import tree_map

        if self._sum is None:
            if like is None:
                raise UserError("Accumulation.mean: no samples in this step; pass like=params for zeros")
            return tree_map(mx.zeros_like, like)
        scale = 1.0 / self.samples
        return tree_map(lambda g: g * scale, self._sum)
