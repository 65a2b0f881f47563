"""Local SGD in the DiLoCo style: H local steps, then one all-reduce of the parameter delta.

Why: per-step gradient sync costs one full all-reduce per step, which on a
home link (1 Gbit/s or Wi-Fi) can take ten times a fast node's compute.
DiLoCo (Douillard et al., 2023) lets every worker take H steps of its own
optimizer on its own shard, then averages the *outer gradient*
(anchor - current parameters, weighted by the samples each worker saw) and
applies an outer Nesterov-momentum SGD step to the shared anchor. Comms drop
by a factor H; the outer momentum recovers most of the accuracy.

Use it in a plain MLX loop (see examples/mnist.py)::

    outer = OuterOptimizer(model, mesh, sync_every=4)     # or sync_every="auto"
    for idx in mesh.batches(...):
        loss, grads = loss_and_grad(...)                  # no per-step all-reduce
        optimizer.update(model, grads); mx.eval(model.parameters(), optimizer.state)
        outer.step(samples=len(idx))                      # syncs every H calls
    outer.flush()                                         # before evaluating or saving

After every sync all replicas hold bit-identical parameters: the ring hands
every member the owner's bytes of the averaged delta, and the outer update
is the same elementwise float32 arithmetic from the same anchor and momentum
on every member. The inner optimizer's state stays local, as in DiLoCo.

`sync_every="auto"`: the first `AUTO_PROBE_SYNCS` syncs run at H = 1 while
each worker times its compute per step (between `step` calls, minus the
sync) and its delta all-reduce; the mesh then averages those two numbers
(an exact float32 all-reduce, so every worker gets the same pair) and every
worker picks the same H = `choose_sync_every(compute, comm)`: the smallest H
whose communication is at most `AUTO_TARGET_OVERHEAD` (10%) of the compute
of H steps, capped at `AUTO_MAX_SYNC_EVERY`. H is then fixed for the run.

At world size 1 `OuterOptimizer` is a no-op wrapper: `step` and `flush`
leave the model exactly as the inner optimizer made it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from meshtrain.errors import UserError
from meshtrain.mesh import Mesh

AUTO = "auto"
AUTO_TARGET_OVERHEAD = 0.1  # comm / (H * compute) at most this
AUTO_MAX_SYNC_EVERY = 64  # beyond this, replicas drift too far apart between syncs
AUTO_PROBE_SYNCS = 4  # H = 1 syncs timed before choosing (the first one is warm-up, dropped)


def choose_sync_every(
    compute_s: float,
    comm_s: float,
    target: float = AUTO_TARGET_OVERHEAD,
    cap: int = AUTO_MAX_SYNC_EVERY,
) -> int:
    """Smallest H >= 1 with comm_s / (H * compute_s) <= target, capped at `cap`."""
    if not compute_s > 0:
        return cap
    return max(1, min(cap, math.ceil(comm_s / (target * compute_s) - 1e-9)))


def parse_sync_every(text: str) -> int | str:
    """`--sync-every` values: a positive integer or "auto"; UserError otherwise."""
    if text == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"--sync-every must be a positive integer or 'auto' (got {text!r})") from None
    if value < 1:
        raise UserError(f"--sync-every must be a positive integer or 'auto' (got {text!r})")
    return value


def outer_update(
    anchor: mx.array, velocity: mx.array, delta: mx.array, lr: float, momentum: float, nesterov: bool
) -> tuple[mx.array, mx.array]:
    """One outer SGD step on one tensor: (new anchor, new velocity), PyTorch's SGD semantics.

    v = momentum * v + delta; step = delta + momentum * v (Nesterov) or v; anchor -= lr * step.
    `delta` is the averaged outer gradient, anchor - local parameters.
    """
    velocity = momentum * velocity + delta
    step = delta + momentum * velocity if nesterov else velocity
    return anchor - lr * step, velocity


class OuterOptimizer:
    """Wraps a model trained by any local optimizer; every H `step`s it syncs the replicas (DiLoCo)."""

    def __init__(
        self,
        model: nn.Module,
        mesh: Mesh,
        *,
        sync_every: int | str = 1,
        outer_lr: float = 0.7,
        momentum: float = 0.9,
        nesterov: bool = True,
        wire_dtype: str | None = "auto",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if sync_every != AUTO and not (isinstance(sync_every, int) and sync_every >= 1):
            raise UserError(f"sync_every must be a positive integer or 'auto' (got {sync_every!r})")
        self.model = model
        self.mesh = mesh
        self.auto = sync_every == AUTO
        self.sync_every: int = 1 if self.auto else int(sync_every)
        self.outer_lr = float(outer_lr)
        self.momentum = float(momentum)
        self.nesterov = nesterov
        self.wire_dtype = wire_dtype
        self._clock = clock
        self.active = mesh.size > 1
        self.syncs = 0
        self._steps_since = 0
        self._samples_since = 0
        self._compute_s = 0.0  # this worker's step time since the last sync, sync excluded
        self._gaps = 0  # how many step intervals _compute_s covers
        self._last_tick: float | None = None
        self._probe: list[tuple[float, float]] = []  # (compute per step, comm) per probe sync
        self.last_comm_s: float | None = None
        params = model.trainable_parameters()
        self._anchor: dict[str, mx.array] = dict(tree_flatten(tree_map(mx.array, params)))
        self._velocity: dict[str, mx.array] = {k: mx.zeros_like(v) for k, v in self._anchor.items()}
        mx.eval(self._anchor, self._velocity)

    # --- the loop's calls ----------------------------------------------------------
    def step(self, samples: int) -> bool:
        """Count one inner step of `samples` local samples; sync when H are done. True if it synced."""
        if not self.active:
            return False
        now = self._clock()
        if self._last_tick is not None:
            self._compute_s += now - self._last_tick
            self._gaps += 1
        self._last_tick = now
        self._steps_since += 1
        self._samples_since += int(samples)
        if self._steps_since < self.sync_every:
            return False
        self.sync()
        return True

    def flush(self) -> bool:
        """Sync now if any step is pending (every worker must call it at the same point)."""
        if not self.active or self._steps_since == 0:
            return False
        self.sync()
        return True

    def sync(self) -> None:
        """All-reduce the outer gradient, apply the outer step to the anchor, load it into the model."""
        current = dict(tree_flatten(self.model.trainable_parameters()))
        delta = {k: self._anchor[k] - current[k] for k in self._anchor}
        mx.eval(delta)
        started = self._clock()
        averaged = self.mesh.allreduce(delta, weight=float(self._samples_since), wire_dtype=self.wire_dtype)
        mx.eval(averaged)
        comm = self._clock() - started
        self.last_comm_s = comm
        for k, d in averaged.items():
            self._anchor[k], self._velocity[k] = outer_update(
                self._anchor[k], self._velocity[k], d, self.outer_lr, self.momentum, self.nesterov
            )
        mx.eval(self._anchor, self._velocity)
        self.model.update(tree_unflatten([(k, mx.array(v)) for k, v in self._anchor.items()]))
        mx.eval(self.model.parameters())
        per_step = self._compute_s / self._gaps if self._gaps else 0.0
        self.syncs += 1
        self._steps_since = 0
        self._samples_since = 0
        self._compute_s = 0.0
        self._gaps = 0
        self._last_tick = self._clock()
        if self.auto and len(self._probe) < AUTO_PROBE_SYNCS:
            self._probe.append((per_step, comm))
            if len(self._probe) == AUTO_PROBE_SYNCS:
                self._choose()

    def _choose(self) -> None:
        """Agree on H from the mesh-wide mean of the probe timings (same floats on every worker)."""
        timed = [p for p in self._probe[1:] if p[0] > 0] or self._probe  # the first sync warms up
        local = np.array(
            [float(np.median([c for c, _ in timed])), float(np.median([m for _, m in timed]))], np.float32
        )
        mean = np.asarray(self.mesh.allreduce(local, wire_dtype="float32"), np.float64)
        self.measured = (float(mean[0]), float(mean[1]))
        self.sync_every = choose_sync_every(*self.measured)

    measured: tuple[float, float] | None = None  # (compute s/step, all-reduce s) behind an auto H

    def describe(self) -> str:
        """One line for the log: the mode and, for auto, what it measured."""
        if not self.active:
            return "local SGD: world size 1, no-op"
        text = f"local SGD: sync every {self.sync_every} steps{' (auto)' if self.auto else ''}"
        if self.measured is not None:
            compute, comm = self.measured
            text += f", compute {compute * 1e3:.2f} ms/step, all-reduce {comm * 1e3:.2f} ms"
        return text


def params_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two parameter trees (what "replicas are identical" means)."""
    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    return fa.keys() == fb.keys() and all(
        np.array_equal(np.array(fa[k]).view(np.uint8), np.array(fb[k]).view(np.uint8)) for k in fa
    )
