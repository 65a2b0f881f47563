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
of H steps, capped at `AUTO_MAX_SYNC_EVERY` (with `overlap=`, only the part of
the sync that the overlapped steps do not hide counts). H is then fixed for the run.

Run plainly (`python script.py`, world size 1) `OuterOptimizer` is a no-op
wrapper: `step` and `flush` leave the model exactly as the inner optimizer
made it. Inside a job it syncs whatever the job's size, since workers may
join: a job of one worker runs DiLoCo with one replica.

`overlap=τ` (a job only, 1 <= τ < H; or "auto" with `sync_every="auto"`:
τ the steps one sync takes, from the same probes): the sync runs on a thread while the
next τ steps compute (the overlap of Streaming DiLoCo, arXiv:2501.18512, of
the whole model rather than its fragments), and its outer step is applied
at the τ-th step after: the new anchor, plus the progress this worker made
in those τ steps (theta = anchor' + (theta_now - theta_at_sync)), so no
sample's update is dropped and the anchor stays bit-identical on every
replica (the parameters between syncs differ, as they always do in local
SGD). The first sync, one that ends an epoch, a `flush` and one a checkpoint
or a share re-plan needs run in the foreground; a background sync the ring
broke under (a lost member, a new view) makes every member meet in a
foreground one at once. Cost: two more copies of the
parameters while a sync is in flight (the ones it started from, and the
flat delta the thread reduces).

Inside a job the syncs are elastic (meshtrain.worker.local_rounds): a lost
worker costs its unsynced steps (its slices are trained again), a joiner
enters at the next sync, and the sync is forced at each epoch's last step.
In that mode the sampling, recovery and `sync_every="auto"` agreement ride
the sync itself: the probe medians travel in its header (the 5th sync
decides), and the probes time the sync as configured, so `compress="int8"`
(meshtrain.train.compression; or "int4", half a byte an element) measures
less communication and picks a smaller H.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from meshtrain.errors import UserError
from meshtrain.mesh import Mesh
from meshtrain.train.compression import ErrorFeedback, parse_compress

AUTO = "auto"
AUTO_TARGET_OVERHEAD = 0.1  # comm / (H * compute) at most this
AUTO_MAX_SYNC_EVERY = 64  # beyond this, replicas drift too far apart between syncs
AUTO_PROBE_SYNCS = 4  # H = 1 syncs timed before choosing (the first one is warm-up, dropped)


def choose_sync_every(
    compute_s: float,
    comm_s: float,
    target: float = AUTO_TARGET_OVERHEAD,
    cap: int = AUTO_MAX_SYNC_EVERY,
    overlap: int = 0,
) -> int:
    """Smallest H >= 1 with comm_s / (H * compute_s) <= target, capped at `cap`. With `overlap` τ
    the sync runs under min(τ, H - 1) steps of compute, so only what sticks out of them counts."""
    if not compute_s > 0:
        return cap
    if overlap <= 0:
        return max(1, min(cap, math.ceil(comm_s / (target * compute_s) - 1e-9)))
    for h in range(1, cap + 1):
        exposed = max(0.0, comm_s - min(overlap, h - 1) * compute_s)
        if exposed <= target * h * compute_s * (1 + 1e-9):
            return h
    return cap


def choose_overlap(
    compute_s: float, comm_s: float, target: float = AUTO_TARGET_OVERHEAD, cap: int = AUTO_MAX_SYNC_EVERY
) -> tuple[int, int]:
    """(τ, H) for `overlap="auto"`: τ the steps of compute one sync needs (at least 1), H the smallest
    that keeps what τ steps do not hide under `target`, τ then at most H - 1 (0 when H is 1)."""
    if not compute_s > 0:
        return 0, cap
    needed = max(1, math.ceil(comm_s / compute_s - 1e-9))
    h = choose_sync_every(compute_s, comm_s, target, cap, overlap=needed)
    return min(needed, h - 1), h


def parse_overlap(text: str) -> int | str:
    """`--overlap` values: a non-negative integer or "auto"; UserError otherwise."""
    return _auto_or_int(text, "--overlap", 0, "a non-negative integer")


def parse_sync_every(text: str) -> int | str:
    """`--sync-every` values: a positive integer or "auto"; UserError otherwise."""
    return _auto_or_int(text, "--sync-every", 1, "a positive integer")


def _auto_or_int(text: str, flag: str, least: int, what: str) -> int | str:
    if text == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise UserError(f"{flag} must be {what} or 'auto' (got {text!r})")
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
        compress: str | None = None,
        overlap: int | str = 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if sync_every != AUTO and not (isinstance(sync_every, int) and sync_every >= 1):
            raise UserError(f"sync_every must be a positive integer or 'auto' (got {sync_every!r})")
        check_overlap(overlap, sync_every)
        try:
            self.compress = parse_compress(compress)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.model = model
        self.mesh = mesh
        self.auto = sync_every == AUTO
        self.sync_every: int = 1 if self.auto else int(sync_every)
        self.outer_lr = float(outer_lr)
        self.momentum = float(momentum)
        self.nesterov = nesterov
        self.wire_dtype = wire_dtype
        self._clock = clock
        self.syncs = 0
        self._steps_since = 0
        self._samples_since = 0
        self._compute_s = 0.0  # this worker's step time since the last sync, sync excluded
        self._gaps = 0  # how many step intervals _compute_s covers
        self._last_tick: float | None = None
        self._probe: list[tuple[float, float]] = []  # (compute per step, comm) per probe sync
        self.last_comm_s: float | None = None
        self.bytes_sent = 0  # outer-sync bytes this worker sent (header + delta), all syncs
        self.last_bytes = 0  # ... in the last sync
        self.feedback = ErrorFeedback() if self.compress else None
        self.overlap_auto = overlap == AUTO  # τ from the probes that choose H
        self.overlap = 0 if self.overlap_auto else int(overlap)
        self.overlapped = 0  # syncs that ran in the background
        self._flight: _Started | None = None
        params = model.trainable_parameters()
        self._anchor: dict[str, mx.array] = dict(tree_flatten(tree_map(mx.array, params)))
        self._velocity: dict[str, mx.array] = {k: mx.zeros_like(v) for k, v in self._anchor.items()}
        mx.eval(self._anchor, self._velocity)
        self.param_count = sum(int(v.size) for v in self._anchor.values())
        attach = getattr(mesh, "local_sgd", None)  # a job's mesh: elastic syncs (worker/local_rounds.py)
        self._rounds: Any = attach(self) if callable(attach) else None
        resumed = getattr(mesh, "resumed_outer", None)  # a resumed checkpoint's outer momentum and H
        if resumed is not None and set(resumed[0]) == set(self._anchor):
            self._velocity = {k: mx.array(resumed[0][k]) for k in self._anchor}
            mx.eval(self._velocity)
            meta = resumed[1]
            self.syncs = int(meta.get("syncs", 0))
            if self.auto and meta.get("measured"):
                self._decide((float(meta["measured"][0]), float(meta["measured"][1])))
        self.active = self._rounds is not None or mesh.size > 1

    # --- the loop's calls ----------------------------------------------------------
    def step(self, samples: int) -> bool:
        """Count one inner step of `samples` local samples; sync when H are done, and at the step
        that ends an epoch (so a lost node's slices stay in their epoch). True if it synced."""
        if not self.active:
            return False
        now = self._clock()
        if self._last_tick is not None:
            self._compute_s += now - self._last_tick
            self._gaps += 1
        self._last_tick = now
        self._steps_since += 1
        self._samples_since += int(samples)
        if self._flight is not None and self._steps_since >= self._overlap_now():
            self.settle()
            if self._rounds.ring_unusable():  # a lost worker or a new view: every member meets now
                self.sync()
                return True
        ends_epoch = self._rounds is not None and self._rounds.epoch_ends()
        cut = self._rounds is not None and self._rounds.cut_now()  # a checkpoint's step starts next
        if self._steps_since < self.sync_every and not ends_epoch and not cut:
            return False
        if not ends_epoch and not cut and self._may_overlap():
            self._start()
        else:
            self.sync()
        return True

    def flush(self) -> bool:
        """Sync now if any step is pending (every worker must call it at the same point)."""
        if not self.active:
            return False
        self.settle()
        if self._steps_since == 0:
            return False
        self.sync()
        return True

    def sync(self) -> None:
        """All-reduce the outer gradient, apply the outer step to the anchor, load it into the model."""
        self.settle()
        _, delta = self._delta()
        per_step = self._compute_s / self._gaps if self._gaps else 0.0
        started = self._clock()
        recovered, sums = False, None
        if self._rounds is None:
            weight = float(self._samples_since)
            averaged = self.mesh.allreduce(delta, weight=weight, wire_dtype=self.wire_dtype)
        else:
            from meshtrain.ring import tensors

            flat, layout = tensors.flatten_tree(delta)
            wire = self._delta_wire(delta)
            timing = self._timing()
            before = self._rounds.recoveries
            got = self._rounds.sync(flat, float(self._samples_since), wire, self.feedback, timing)
            if got is None:  # this worker took the holders' state (it joined, or fell behind)
                return
            mean, sums = got
            averaged = tensors.unflatten_tree(delta, mean, layout)
            recovered = self._rounds.recoveries != before
            self.last_bytes = int(self._rounds.last_sent_bytes)
            self.bytes_sent += self.last_bytes
        mx.eval(averaged)
        comm = self._clock() - started
        self.last_comm_s = comm
        self._outer_step(averaged)
        self._load({k: mx.array(v) for k, v in self._anchor.items()})
        self.syncs += 1  # before the hand-over: a joiner takes the count of syncs done, this one too
        if self._rounds is not None:
            self._rounds.finish()  # members that took no part receive this state now
        self._restart()
        if not self.auto or self.measured is not None:
            return
        if self._rounds is None:
            if len(self._probe) < AUTO_PROBE_SYNCS:
                self._probe.append((per_step, comm))
                if len(self._probe) == AUTO_PROBE_SYNCS:
                    self._choose()
            return
        assert sums is not None
        if sums[2] > 0:  # the header carried timings: every member decides alike from the same sums
            self._decide((float(sums[3] / sums[2]), float(sums[4] / sums[2])))
        elif not recovered:  # a sync that recovered timed the recovery, not the link
            self._probe.append((per_step, comm))

    # --- the sync in the background (overlap=) ------------------------------------------------
    def _overlap_now(self) -> int:
        return min(self.overlap, self.sync_every - 1)

    def _may_overlap(self) -> bool:
        decided = not self.auto or self.measured is not None  # auto H's probes time foreground syncs
        if self._overlap_now() < 1 or self._rounds is None or not decided:
            return False
        return bool(self._rounds.can_overlap())

    def _start(self) -> None:
        """Begin this interval's sync on a thread (meshtrain.worker.overlapped_sync); training goes on."""
        from meshtrain.ring import tensors

        current, delta = self._delta()  # the current arrays are immutable: kept as they are
        flat, layout = tensors.flatten_tree(delta)
        self._rounds.start_sync(flat, float(self._samples_since), self._delta_wire(delta), self.feedback)
        self._flight = _Started(current, layout, self._samples_since)
        self._restart()

    def settle(self) -> None:
        """Wait for a sync in flight and apply it: the outer step to the anchor, then this worker's
        progress since the sync started on top (a no-op without one). The mesh calls it before
        anything else uses the ring (an evaluation, a free all-reduce)."""
        started, self._flight = self._flight, None
        if started is None:
            return
        got = self._rounds.join_sync()
        if got is None:  # the ring broke: the interval is merged into this one, its samples too
            self._samples_since += started.samples
            return
        from meshtrain.ring import tensors

        averaged = tensors.unflatten_tree(started.params, got[0], started.layout)
        mx.eval(averaged)
        now = dict(tree_flatten(self.model.trainable_parameters()))
        self._outer_step(averaged)
        self._load({k: self._anchor[k] + (now[k] - started.params[k]) for k in self._anchor})
        self.last_bytes = int(self._rounds.last_sent_bytes)
        self.bytes_sent += self.last_bytes
        self.syncs += 1
        self.overlapped += 1

    def _delta(self) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
        """(the model's trainable parameters, the outer gradient anchor - them), evaluated."""
        current = dict(tree_flatten(self.model.trainable_parameters()))
        delta = {k: self._anchor[k] - current[k] for k in self._anchor}
        mx.eval(delta)
        return current, delta

    def _delta_wire(self, delta: dict[str, mx.array]) -> str:
        """How a job's sync sends the delta: qint8 items when compressed (int4: two to an item,
        meshtrain.worker.local_rounds), else the wire dtype resolved for the tree."""
        from meshtrain.mesh import resolve_wire_dtype

        return "qint8" if self.compress in ("int8", "int4") else resolve_wire_dtype(delta, self.wire_dtype)

    def _outer_step(self, averaged: dict[str, mx.array]) -> None:
        """The outer SGD step of the averaged delta on the anchor and its momentum."""
        for k, d in averaged.items():
            self._anchor[k], self._velocity[k] = outer_update(
                self._anchor[k], self._velocity[k], d, self.outer_lr, self.momentum, self.nesterov
            )
        mx.eval(self._anchor, self._velocity)

    def _load(self, params: dict[str, mx.array]) -> None:
        self.model.update(tree_unflatten(list(params.items())))
        mx.eval(self.model.parameters())

    def _restart(self) -> None:
        self._steps_since = 0
        self._samples_since = 0
        self._compute_s = 0.0
        self._gaps = 0
        self._last_tick = self._clock()

    def _timing(self) -> tuple[float, float] | None:
        """This worker's probe medians, sent in the header of the deciding sync (elastic auto H)."""
        if not self.auto or self.measured is not None or self.syncs < AUTO_PROBE_SYNCS or not self._probe:
            return None
        timed = [p for p in self._probe[1:] if p[0] > 0] or self._probe  # the first sync warms up
        return float(np.median([c for c, _ in timed])), float(np.median([m for _, m in timed]))

    def _choose(self) -> None:
        """Agree on H from the mesh-wide mean of the probe timings (same floats on every worker)."""
        timed = [p for p in self._probe[1:] if p[0] > 0] or self._probe  # the first sync warms up
        local = np.array(
            [float(np.median([c for c, _ in timed])), float(np.median([m for _, m in timed]))], np.float32
        )
        mean = np.asarray(self.mesh.allreduce(local, wire_dtype="float32"), np.float64)
        self._decide((float(mean[0]), float(mean[1])))

    def _decide(self, measured: tuple[float, float]) -> None:
        """H (and with overlap="auto" τ) from the agreed (compute s/step, sync s): alike everywhere."""
        self.measured = measured
        if self.overlap_auto:
            self.overlap, self.sync_every = choose_overlap(*measured)
        else:
            self.sync_every = choose_sync_every(*measured, overlap=self.overlap)

    measured: tuple[float, float] | None = None  # (compute s/step, all-reduce s) behind an auto H

    # --- what a worker that joins receives (meshtrain.worker.local_rounds) ----------------------
    def shared_meta(self) -> dict[str, Any]:
        return {"syncs": self.syncs, "sync_every": self.sync_every, "measured": self.measured}

    def adopt(self, velocity: dict[str, mx.array], meta: dict[str, Any]) -> None:
        """Take the job's outer state: the model (already loaded) is the anchor; momentum and H theirs."""
        params = self.model.trainable_parameters()
        self._anchor = dict(tree_flatten(tree_map(mx.array, params)))
        self._velocity = {k: velocity[k] for k in self._anchor}
        mx.eval(self._anchor, self._velocity)
        self.syncs = int(meta["syncs"])
        self.sync_every = int(meta["sync_every"])
        measured = meta.get("measured")
        self.measured = None
        if measured:
            self._decide((float(measured[0]), float(measured[1])))
            self.sync_every = int(meta["sync_every"])  # theirs, as decided (the same, from the same floats)
        self._probe = []
        if self.feedback is not None:
            self.feedback.reset()
        self._restart()

    def describe(self) -> str:
        """One line for the log: the mode and, for auto, what it measured."""
        if not self.active:
            return "local SGD: world size 1, no-op"
        text = f"local SGD: sync every {self.sync_every} steps{' (auto)' if self.auto else ''}"
        if self.compress:
            text += f", {self.compress} deltas with error feedback"
        if self.overlap:
            text += f", each sync overlapped with the next {self._overlap_now()} steps"
            text += " (auto)" if self.overlap_auto else ""
        if self.measured is not None:
            compute, comm = self.measured
            text += f", compute {compute * 1e3:.2f} ms/step, all-reduce {comm * 1e3:.2f} ms"
        return text


def check_overlap(overlap: Any, sync_every: int | str) -> None:
    """`overlap` is an integer 0 <= τ < H (with H = "auto", any τ >= 0: it is capped at H - 1), or
    "auto" with `sync_every="auto"` (the same probes choose both)."""
    if overlap == AUTO:
        if sync_every != AUTO:
            raise UserError('overlap="auto" picks τ from the probes of sync_every="auto": use both')
        return
    if not isinstance(overlap, int) or isinstance(overlap, bool) or overlap < 0:
        raise UserError(f"overlap must be a non-negative integer (got {overlap!r})")
    if overlap and sync_every != AUTO and overlap >= int(sync_every):
        raise UserError(
            f"overlap must be less than sync_every (got overlap={overlap}, sync_every={sync_every}): "
            "a sync is applied that many steps after it starts, before the next one starts"
        )


@dataclass
class _Started:
    """A sync in flight: the parameters it started from (its delta's tree shape too), the layout of
    the flat delta the thread reduces, its samples."""

    params: dict[str, mx.array]
    layout: Any
    samples: int


def params_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two parameter trees (what "replicas are identical" means)."""
    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    return fa.keys() == fb.keys() and all(
        np.array_equal(np.array(fa[k]).view(np.uint8), np.array(fb[k]).view(np.uint8)) for k in fa
    )
