"""What a worker measures of its own steps for performance shares: compute time and memory per sample.

A step's compute is everything but its reduction: from handing out the batch
to its gradients, plus from the reduction's return to the next boundary (the
optimizer update, the loop's own work). A local step (local SGD) has no
reduction and is timed whole. The cost of a sample in memory is the largest
step peak above what was held before the step, per sample; free memory over
that cost caps the share a node can take. The clock and the memory probe are
injected, so the arithmetic is tested without MLX or sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from meshtrain.train.shares import WARMUP, ThroughputMeter, memory_cap

__all__ = ["StepTimer"]

MAX_CAP = 2**23  # samples: exact in the float32 vector the members swap


class StepTimer:
    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        free_memory: Callable[[], int] | None = None,
    ) -> None:
        self._clock = clock
        self._free_memory = free_memory
        self.meter = ThroughputMeter(warmup=WARMUP)
        self.bytes_per_sample = 0.0
        self._handed_out = 0.0
        self._before_reduce_s = 0.0
        self._reduced_at: float | None = None
        self._samples = 0

    def handed_out(self, samples: int) -> None:
        """A batch of `samples` for this worker was handed out: its step starts now."""
        self._handed_out, self._reduced_at, self._samples = self._clock(), None, samples

    def gradients_ready(self, peak_bytes_above_base: int | None = None) -> None:
        """The step's gradients are computed (its reduction is next)."""
        if peak_bytes_above_base is not None and self._samples > 0:
            per_sample = max(peak_bytes_above_base, 1) / self._samples
            self.bytes_per_sample = max(self.bytes_per_sample, per_sample)
        self._before_reduce_s = self._clock() - self._handed_out

    def reduced(self) -> None:
        """The step's reduction returned cleanly: the rest of the step, to the boundary, is compute."""
        self._reduced_at = self._clock()

    def local_step_done(self) -> None:
        """A step without a reduction ended at this boundary: timed whole."""
        self.meter.record(self._samples, self._clock() - self._handed_out)

    def boundary(self) -> None:
        """A step with a clean reduction ended: its compute is both parts; an interrupted one is not
        counted (recovery time is not compute)."""
        if self._reduced_at is not None:
            self.meter.record(self._samples, self._before_reduce_s + self._clock() - self._reduced_at)
            self._reduced_at = None

    def rate(self) -> float | None:
        return self.meter.rate()

    def memory_cap(self) -> int:
        """Samples per step this node's free memory holds at the measured cost per sample (-1: unknown)."""
        if self.bytes_per_sample <= 0 or self._free_memory is None:
            return -1
        return min(memory_cap(self._free_memory(), self.bytes_per_sample), MAX_CAP)


def mlx_peak_probe() -> tuple[Callable[[], None], Callable[[Any], int]]:
    """(start, finish(grads)): evaluate `grads` and return MLX's peak memory above what was held
    before (the graph is built, not run, when `start` is called)."""
    import mlx.core as mx

    base = [0]

    def start() -> None:
        base[0] = mx.get_active_memory()
        mx.reset_peak_memory()

    def finish(grads: Any) -> int:
        mx.eval(grads)
        return int(mx.get_peak_memory() - base[0])

    return start, finish


def free_memory() -> int:
    """psutil's `available` (unified memory on Apple silicon)."""
    import psutil

    return int(psutil.virtual_memory().available)
