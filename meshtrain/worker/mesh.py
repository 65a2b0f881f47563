"""The `Mesh` a training script gets inside a job: an elastic ring behind the plain-loop API.

    mesh.register(model, optimizer)                 # the state joiners receive
    for idx in mesh.batches(n, batch, epoch=e):     # this worker's slice of each global batch
        loss, grads = loss_and_grad(x[idx], y[idx])
        grads = mesh.allreduce(grads, weight=len(idx))
        optimizer.update(model, grads)

Behind those calls (see meshtrain.train.recovery for the rules):

- the ring is formed lazily, at the first `batches`/`allreduce`, from the
  newest membership view; its generation is the view's number;
- a lost peer (the ring raises, or a new view aborts the ring) makes the
  survivors form the next generation, swap (step, digest), and either redo
  the interrupted reduction with the gradients they hold -- the lost
  member's slice is carried into the next step -- or, where some member had
  already completed it, take that result; `allreduce` then returns as if
  nothing had happened;
- a joining worker is admitted at a step boundary and receives the full state
  (parameters, optimizer state, sampler) over the ring itself;
- below `--min-nodes` workers, training pauses until enough return.

The step reduction is the first `allreduce` after a batch is handed out; any
other all-reduce (metrics, a local-SGD flush) is not redone: a failure there
raises PeerLost, and the next step boundary recovers the ring.

This module is the shell: the ring, the model and optimizer, the clock, the
ledger file and fault injection. The step bookkeeping -- the global step,
the sampler's hand-out, which step is committed, what a recovery plan asks
of this member, the shares -- is meshtrain.train.stepper's pure `Stepper`,
whose typed actions the methods here carry out.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from meshtrain import env as env_names
from meshtrain.errors import PeerLost, UserError, WireError
from meshtrain.mesh import Mesh, resolve_wire_dtype
from meshtrain.train.recovery import MemberStatus, Unrecoverable, decode_statuses, encode_status
from meshtrain.train.ring_broadcast import broadcast_bytes, broadcast_tree
from meshtrain.train.share_modes import DEFAULT_SHARE_MODE, PERF
from meshtrain.train.stepper import AddZeros, Committed, SendState, ShareResult, Stepper, Take, share_vector
from meshtrain.worker.reporter import Reporter
from meshtrain.worker.step_timer import StepTimer, free_memory, mlx_peak_probe
from meshtrain.worker.views import View, ViewBoard

RING_FAILURES = (PeerLost, WireError, OSError, ConnectionError)
CONNECT_TIMEOUT_S = 30.0
PAUSE_POLL_S = 1.0
DROPS_REPORT_S = 2.0  # how often the ring listener's refusals reach the agent while training
RETRY_SAME_VIEW_S = 5.0  # a ring that broke with no member lost (a stall) forms again with the same view
STATUS_STEP = -1
EVAL_STEP = -3  # the step label of mesh.evaluate's reduction (-2 is the state broadcast's)


def _sums(values: Any) -> dict[str, float]:
    if not hasattr(values, "items"):
        raise UserError("mesh.evaluate: fn(indices) must return a dict of sums, e.g. {'correct': 93}")
    return {str(k): float(v) for k, v in values.items()}


FAULT_ENV = env_names.FAULT  # test hook: "MEMBER:STEP:forward|allreduce[,...]" SIGKILLs that worker there


def _inject_fault(member: str, step: int, where: str) -> None:
    """Fault injection for tests and bench/faults.py: SIGKILL this worker 2 ms into the step's
    all-reduce (mid-stream) or 2 ms after its batch is handed out (mid-forward)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        parts = item.split(":")
        if len(parts) == 3 and parts[0] == member and parts[1] == str(step) and parts[2] == where:
            threading.Timer(0.002, os.kill, (os.getpid(), signal.SIGKILL)).start()


@dataclass
class _Held:
    """The gradients of an interrupted step reduction, kept to redo it."""

    tree: Any
    weight: float
    wire: str


def _on_steps(name: str) -> Any:
    """The Stepper's attribute `name`, read through the mesh (only the Stepper's methods change it)."""
    return property(lambda self: getattr(self._steps, name))


class WorkerMesh(Mesh):
    """One worker of an elastic job: the shell around its `Stepper`."""

    committed = _on_steps("committed")
    _gen = _on_steps("gen")
    _roster = _on_steps("roster")
    _sampler = _on_steps("sampler")
    _open = _on_steps("open")
    _has_state = _on_steps("has_state")
    _rebalance_due = _on_steps("rebalance_due")

    def __init__(
        self,
        *,
        member: str,
        job: str,
        node: str,
        listener: Any,
        views: ViewBoard,
        reporter: Reporter,
        keyring: Any = None,
        joiner: bool = False,
        ledger_dir: str | None = None,
        checkpoints: Any = None,
        share_mode: str = DEFAULT_SHARE_MODE,
        shard_replicas: int | None = None,
        on_battery: str = "reduce",
    ) -> None:
        self.member = member
        self.shard_replicas = shard_replicas  # --shard-replicas (meshtrain.shard.replicas; None: auto)
        # called on a joiner right after it added zeros to the step it joined in (meshtrain.shard)
        self.on_zero_step: Any = None
        self.keep_ring_for_joins = False  # set by a stage-1 sharded optimizer (see _ring_unusable)
        self.job = job
        self.node = node
        self._listener = listener
        self._views = views
        self._reporter = reporter
        self._keyring = keyring
        self._ring: Any = None
        self._ring_lock = threading.Lock()
        self._connecting: tuple[int, threading.Event] | None = None  # the view a connect forms, its cancel
        self._drops_sent: tuple[dict[str, int], float] = ({}, 0.0)  # ring drops last reported, and when
        self._steps = Stepper(member, joiner=joiner, share_mode=share_mode)
        self._share_mode = share_mode
        self._on_battery = on_battery
        # perf shares time each step's compute and probe its memory (meshtrain.worker.step_timer)
        self._timer = StepTimer(free_memory=free_memory) if share_mode == PERF else None
        self._metrics: dict[str, float] = {}  # the last loss / test accuracy reported (checkpoints list them)
        self._model: Any = None
        self._optimizer: Any = None
        self._ring_mb_s: float | None = None
        self._announced = False
        self._ledger = Path(ledger_dir) / f"ledger-{member}.jsonl" if ledger_dir else None
        if self._ledger is not None:
            self._ledger.parent.mkdir(parents=True, exist_ok=True)
        self._checkpoints = checkpoints
        self.wire_dtype: str | None = None
        self.generation_changes = 0
        self._outer: Any = None  # local SGD's rules (meshtrain.worker.local_rounds), once attached
        # a resumed local-SGD checkpoint's outer state (momentum by path, meta), for its OuterOptimizer
        self.resumed_outer: tuple[dict[str, Any], dict[str, Any]] | None = None
        views.on_change(self._abort_if_stale)

    # --- what the script sees -----------------------------------------------------------------
    def _members_now(self) -> tuple[str, ...]:
        if self._roster:
            return self._roster
        view = self._views.latest()
        return view.members if view is not None else ()

    @property
    def rank(self) -> int:  # type: ignore[override]
        """This worker's rank in the current generation (it changes as workers come and go)."""
        roster = self._members_now()
        return roster.index(self.member) if self.member in roster else 0

    @property
    def size(self) -> int:  # type: ignore[override]
        """The number of workers in the current generation."""
        return max(1, len(self._members_now()))

    @property
    def ring_authenticated(self) -> bool | None:
        return bool(getattr(self._ring, "authenticated", False)) if self._ring is not None else None

    @property
    def ring_encrypted(self) -> bool | None:
        """Whether the ring's frames are sealed (AES-GCM): a mesh made with --encrypt."""
        link = getattr(self._ring, "_link", None) if self._ring is not None else None
        return bool(getattr(link, "encrypted", False)) if self._ring is not None else None

    def local_sgd(self, outer: Any) -> Any:
        """Local SGD mode (meshtrain.train.local_sgd's OuterOptimizer calls it): the outer sync, not
        every step, is where workers meet, recover and commit (meshtrain.worker.local_rounds)."""
        from meshtrain.worker.local_rounds import LocalRounds

        self._outer = LocalRounds(self, outer)
        return self._outer

    def register(self, model: Any, optimizer: Any) -> None:
        """The training state: what a joining worker receives and a checkpoint stores.

        Initialises the optimizer's state now (MLX does it lazily at the first
        update), so every worker's state has the same leaves from the start.
        """
        import mlx.core as mx

        self._model, self._optimizer = model, optimizer
        if not getattr(optimizer, "_initialized", True):
            optimizer.init(model.trainable_parameters())
        mx.eval(model.parameters(), optimizer.state)
        resumed = self._checkpoints.resume() if self._checkpoints is not None else None
        if resumed is not None:
            tree, meta, step = resumed
            self.resumed_outer = _split_outer(tree, meta)
            self._adopt(tree, {**meta, "committed": step})
            self._resumed_from = step
            if meta.get("rng") is not None:
                from meshtrain.checkpoints.arrays import restore_rng

                restore_rng(meta["rng"])
        self._agree_on_state()
        # the starting workers' first step reduction checks it held (a generation change first
        # means a recovery plan compared the digests instead, on every member alike)
        self._steps.registered(check=self._ring is not None and self._has_state)

    def _agree_on_state(self) -> None:
        """Make every starting replica's registered state bit-identical before the first step.

        A script that never seeds MLX (README's loop need not) initialises each
        worker's model differently; data parallelism would then train N
        different models and average their gradients. The ring formed at
        `connect` compared empty states, so the members compare (step, digest)
        again now and the ones that differ from the majority (ties: the lowest
        rank) receive its state, exactly as a joiner does. A joiner has no ring
        yet: it gets the state at its first boundary anyway.
        """
        if self._ring is None or len(self._roster) < 2 or not self._has_state:
            return
        try:
            self._follow_plan(None)
        except RING_FAILURES:
            self._mark_broken()  # the next boundary forms a ring, and its plan compares digests again

    def _check_replicas_agree(self) -> None:
        """At the first step reduction after `register`: every member's state digest must be equal.

        After `_agree_on_state` they are, unless the script changed the model or
        optimizer after `register` on some workers and not others (loading
        weights on the main worker only, say): training on would silently average
        different models, so the job stops with the reason instead."""
        size = len(self._roster)
        if self._ring is None or size < 2:
            return
        mine = MemberStatus(member=self.member, committed=self.committed, digest=self._digest())
        vec = encode_status(size, self._roster.index(self.member), mine)
        summed = self._ring.allreduce(vec, step=STATUS_STEP, weight=1.0, wire_dtype="float32") * size
        statuses = decode_statuses(self._roster, summed)
        digests = {s.digest for s in statuses}
        if len(digests) > 1:
            first = statuses[0]
            other = next(s for s in statuses if s.digest != first.digest)
            raise UserError(
                f"the replicas differ at step {self.committed}: {first.member} and {other.member} hold "
                "different model or optimizer state. mesh.register(model, optimizer) makes them equal; "
                "change the model before it, or alike on every worker, not on some after it"
            )

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
        """This worker's slice of every remaining global batch of `epoch` (nothing for an epoch done).

        `drop_last` is not supported by the exactly-once sampler (every index is
        trained on once per epoch); a short last batch is normal. `accumulate=K`
        yields each slice as K micro-batches (meshtrain.train.accumulate).
        """
        if accumulate != 1:
            whole = self.batches(n_samples, batch_size, epoch=epoch, seed=seed, drop_last=drop_last)
            yield from self._micro_batches(whole, accumulate)
            return
        steps = self._steps
        steps.start_epoch(n_samples, batch_size, seed, epoch)
        yielded = False
        while True:
            self._boundary()
            if steps.epoch_done(epoch, yielded):
                return
            if steps.verify_now():  # before any local update: local SGD's first reduction is H later
                try:
                    self._check_replicas_agree()
                except RING_FAILURES:
                    self._mark_broken()  # the step's reduction recovers; its plan compares digests
            batch = steps.hand_out(epoch)
            if self._timer is not None:
                self._timer.handed_out(len(batch.indices))
            _inject_fault(self.member, batch.step, "forward")
            yielded = True
            self.local_batch_size = len(batch.indices)
            yield batch.indices

    def allreduce(self, tree: Any, weight: float = 1.0, *, wire_dtype: str | None = "auto") -> Any:
        """Weighted mean of `tree` over the job's workers (exact with weight = local batch size).

        The first all-reduce after a batch is handed out is the step's: it
        survives lost workers (see the module docstring). `wire_dtype="auto"`
        sends float32 MLX trees as bfloat16 (Mesh.allreduce says why).
        """
        wire = resolve_wire_dtype(tree, wire_dtype)
        self.wire_dtype = wire
        # in local SGD mode the outer sync is the step's unit, not an all-reduce
        if self._outer is not None or not self._steps.in_step_reduction() or isinstance(tree, np.ndarray):
            return self._free_allreduce(tree, weight, wire)
        self._measure(tree)
        _inject_fault(self.member, self.committed, "allreduce")
        held = _Held(tree, float(weight), wire)
        outcome = None
        if self._ring is None or self._stale_view():
            outcome = self._recover(held)
        elif self._steps.verify_now():
            try:
                self._check_replicas_agree()
            except RING_FAILURES:
                outcome = self._recover(held)  # its plan compares the digests itself
        while True:
            if outcome is not None:  # this member was behind: it takes another's completed reduction
                self._ledger_row(self._steps.take(outcome))
                return outcome.result
            try:
                out = self._ring.allreduce_tree(
                    tree, step=self.committed, weight=held.weight, wire_dtype=wire
                )
            except RING_FAILURES:
                outcome = self._recover(held)
                continue
            self._note_stats()
            self._ledger_row(self._steps.reduced(out))
            if self._timer is not None:
                self._timer.reduced()  # the rest of the step, to the next boundary, is compute
            return out

    def report(self, **metrics: Any) -> None:
        """Queue metrics for the live view; batched, never blocks the step.

        Any named scalar is accepted (meshtrain.metrics): a non-scalar value, or a
        name the runtime adds itself, is a UserError here, in the script."""
        from meshtrain.metrics import COUNTERS, FIRST_CLASS, check

        metrics = check(metrics, set(self._metrics) - FIRST_CLASS)
        extra: dict[str, Any] = {"generation": self._gen}
        if self._roster:
            extra["share"] = self._steps.my_share()
            if self._steps.share_reason:
                extra["share_why"] = self._steps.share_reason
        if self._ring_mb_s is not None:
            extra["ring_mb_s"] = self._ring_mb_s
        for key, value in metrics.items():
            if key not in COUNTERS and key != "samples":
                self._metrics[key] = float(value)  # checkpoints list them
        self._reporter.report({**metrics, **extra})

    @property
    def step(self) -> int:  # type: ignore[override]
        """The global step: steps committed so far, the same on every worker (Mesh.step)."""
        return self.committed

    @property
    def output_dir(self) -> Path:  # type: ignore[override]
        """This worker's directory for files that outlive the job (Mesh.output_dir); created on demand."""
        from meshtrain.paths import outputs_dir

        path = outputs_dir(str(self.job), self.member)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def evaluate(self, n_samples: int, fn: Any) -> dict[str, float]:
        """Evaluation spread over the current generation's workers (Mesh.evaluate says the contract).

        Each worker evaluates its contiguous slice and the sums meet in one float32
        all-reduce, labelled with its own step so it can never be mistaken for a
        step's reduction. A new view or a broken ring meanwhile (a worker lost, a
        node joining) makes every worker evaluate the whole set locally instead:
        the same sums, no hang, and the next step boundary forms the new ring.
        """
        self._settle_outer()
        if self._steps.missed_epoch:
            # the script's loop passed an epoch that ended before this worker took part (a joiner, a
            # resumed run): the others evaluated it long ago, so there is nobody to evaluate with and
            # nothing of ours to measure. NaN says so (shown as "—"), at no cost and with no stall.
            return {k: math.nan for k in _sums(fn(np.empty(0, np.int64)))}
        if self._ring is None or self._stale_view() or len(self._roster) < 2 or not self._has_state:
            return _sums(fn(np.arange(n_samples, dtype=np.int64)))
        size, rank = len(self._roster), self._roster.index(self.member)
        mine = np.array_split(np.arange(n_samples, dtype=np.int64), size)[rank]
        local = _sums(fn(mine))
        keys = sorted(local)
        vec = np.array([local[k] for k in keys] + [float(len(keys))], np.float32)
        try:
            summed = self._ring.allreduce(vec, step=EVAL_STEP, weight=1.0, wire_dtype="float32") * size
        except RING_FAILURES:
            self._mark_broken()
            return _sums(fn(np.arange(n_samples, dtype=np.int64)))
        if int(round(float(summed[-1]))) != len(keys) * size:
            raise UserError("mesh.evaluate: the workers' fn returned different keys; return the same sums")
        return {k: float(v) for k, v in zip(keys, summed[:-1], strict=True)}

    def close(self) -> None:
        self._views.on_change(None)
        self._reporter.close()
        with self._ring_lock:
            ring, self._ring = self._ring, None
        if ring is not None:
            ring.close()

    def connect(self, timeout: float) -> None:
        """Form the first ring now (a job's starting workers), so rank and size are known from the
        script's first line; a joiner instead waits for its first step boundary."""
        if self._views.wait_newer(-1, timeout) is None:
            raise PeerLost(self.node, -1, f"no membership view from the agent within {timeout:g}s")
        self._recover(None)

    # --- steps --------------------------------------------------------------------------------
    def _boundary(self) -> None:
        """Between steps: close a step that had no reduction, recover, admit, hand state over."""
        if self._outer is not None:
            self._outer.boundary()  # local SGD: meshtrain.worker.local_rounds
            return
        closed = self._steps.close_step()
        if closed is not None and self._timer is not None:
            if closed.had_reduction:
                self._timer.boundary()
            else:
                self._timer.local_step_done()  # a local step (local SGD) has no all-reduce: timed whole
        if closed is not None and closed.committed is not None:
            self._ledger_row(closed.committed)  # nothing to reduce
        due = self._steps.due_state()
        if due is not None:
            self._send_due_state(due)  # the boundary after the pinned step
        while self._ring is None or self._stale_view() or not self._has_state:
            # a worker without the job's state never takes a batch: it recovers until it has it
            # (a hand-over interrupted by yet another view leaves it stateless: form again)
            self._recover(None)
            zeros = self._steps.zero_due()
            if zeros is not None:
                self._add_zeros(zeros[0])
                if self.on_zero_step is not None and self._ring is not None:
                    try:
                        self.on_zero_step()  # a sharded job's joiner: the others' gather of that step
                    except RING_FAILURES:
                        self._mark_broken()
                self._send_due_state(zeros[1])
        self._report_ring_drops()  # every few seconds: what the ring port refused, for `status`
        if self._rebalance_due:
            self._rebalance()
        if self._checkpoints is not None and self._has_state and self._sampler is not None:
            self._checkpoints.at_boundary(self.committed, self._state_tree, self._meta())

    def _ledger_row(self, done: Committed) -> None:
        """The debug ledger (`run --ledger`): which slices each committed step trained on."""
        if self._ledger is not None:
            row = done.row(time.time())  # wall clock: bench/recovery.py times recoveries from it
            with self._ledger.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def _settle_outer(self) -> None:
        """A local-SGD sync in flight on its thread (overlap=) finishes before the ring is used again."""
        if self._outer is not None:
            self._outer.outer.settle()

    def _free_allreduce(self, tree: Any, weight: float, wire: str) -> Any:
        self._settle_outer()
        if self._ring_unusable():
            self._recover(None)
        try:
            if isinstance(tree, np.ndarray) and tree.ndim == 1 and tree.dtype == np.float32:
                out = self._ring.allreduce(tree, step=self.committed, weight=weight, wire_dtype=wire)
            else:
                out = self._ring.allreduce_tree(tree, step=self.committed, weight=weight, wire_dtype=wire)
        except RING_FAILURES as exc:
            raise PeerLost(getattr(exc, "peer", "?"), self._gen, f"outside a step reduction: {exc}") from exc
        self._note_stats()
        return out

    def _note_stats(self) -> None:
        stats = getattr(self._ring, "last_stats", None) or {}
        busbw = stats.get("busbw")
        if isinstance(busbw, (int, float)):
            self._ring_mb_s = float(busbw) / 1e6

    # --- sharded training (meshtrain.shard) -------------------------------------------------------
    @property
    def roster(self) -> tuple[str, ...]:
        """The members of the current generation in rank order (who holds which shard)."""
        return self._members_now()

    @property
    def owed_state(self) -> tuple[str, ...]:
        """The members that joined in the open step, adding zeros to its reduction, and receive the
        job's state at the next boundary (they take no part in the step's other collectives but the
        ones `on_zero_step` runs on them)."""
        due = self._steps.state_due
        return tuple(due.zero) if due is not None else ()

    @property
    def checkpointing(self) -> bool:
        return self._checkpoints is not None

    def reduce_scatter(
        self,
        buf: np.ndarray,
        shards: Any = None,
        weight: float = 1.0,
        *,
        wire_dtype: str | None = "float32",
        overwrite: bool = False,
    ) -> np.ndarray:
        """This worker's shard of the weighted mean of the 1-D float32 `buf` over the job's workers.

        Not the step reduction: a lost peer raises PeerLost (the sharded
        optimizer's state went with it), and so does a new generation whose
        members differ from the ring's before the call. With `overwrite`,
        `buf` is used as the scratch of the partial sums (no copy of it)."""
        return self._collective("reduce_scatter", buf, shards, weight, wire_dtype, overwrite)

    def all_gather(
        self,
        shard: np.ndarray,
        shards: Any = None,
        *,
        wire_dtype: str | None = "float32",
        out: np.ndarray | None = None,
        step: int | None = None,
    ) -> np.ndarray:
        """Every worker's 1-D float32 shard concatenated in rank order (the same on every worker).

        `step` labels the frames (default the global step; a joiner that has not adopted the state
        yet takes part in the others' gather with theirs)."""
        return self._collective("all_gather", shard, shards, 1.0, wire_dtype, False, out, step)

    def broadcast(self, tree: Any, source: bool) -> Any:
        """The source worker's MLX array tree on every worker of the ring (each passes a tree of the
        same structure: meshtrain.train.ring_broadcast); a sharded job's take-over moves state so.
        Not the step reduction: a lost peer raises PeerLost."""
        return self._broadcast(broadcast_tree, tree, source)

    def broadcast_bytes(self, data: bytes | None, source: bool) -> bytes:
        """The source worker's bytes on every worker of the ring (the others pass None)."""
        return bytes(self._broadcast(broadcast_bytes, data, source))

    def _broadcast(self, how: Any, payload: Any, source: bool) -> Any:
        if self._ring_unusable():
            raise PeerLost(self.member, self._gen, "the job's members changed before a broadcast")
        try:
            return how(self._ring, payload, source)
        except RING_FAILURES as exc:
            self._mark_broken()
            raise PeerLost(str(getattr(exc, "peer", "?")), self._gen, f"in a broadcast: {exc}") from exc

    def _collective(
        self,
        kind: str,
        buf: np.ndarray,
        shards: Any,
        weight: float,
        wire_dtype: str | None,
        overwrite: bool = False,
        out: np.ndarray | None = None,
        step: int | None = None,
    ) -> np.ndarray:
        wire = resolve_wire_dtype(buf, wire_dtype)
        label = self.committed if step is None else step
        before = self._roster
        if self._ring_unusable():
            self._recover(None)
        if before and self._roster != before:
            raise PeerLost(self.member, self._gen, f"the job's members changed before a {kind}")
        try:
            if kind == "reduce_scatter":
                result = self._ring.reduce_scatter(
                    buf, shards, step=self.committed, weight=weight, wire_dtype=wire, overwrite=overwrite
                )
            else:
                result = self._ring.all_gather(buf, shards, step=label, wire_dtype=wire, out=out)
        except RING_FAILURES as exc:
            self._mark_broken()
            rank = getattr(exc, "rank", -1)
            who = self._roster[rank] if 0 <= rank < len(self._roster) else str(getattr(exc, "peer", "?"))
            reason = str(getattr(exc, "reason", "") or exc)
            raise PeerLost(who, self._gen, f"in a {kind}: {reason}") from exc
        self._note_stats()
        return np.asarray(result)

    # --- state ---------------------------------------------------------------------------------
    def _state_tree(self) -> dict[str, Any]:
        if self._model is None:
            raise UserError(
                "a node joined this job, but the script never called mesh.register(model, optimizer): "
                "register them so joiners can receive the training state"
            )
        return {"params": self._model.parameters(), "opt": self._optimizer.state}

    def _digest(self) -> str:
        from meshtrain.train.digest import state_digest

        if not self._has_state:
            return ""
        tree = self._state_tree() if self._model is not None else {}
        return state_digest(tree, self.committed)

    def _meta(self) -> dict[str, Any]:
        return self._steps.meta(self._metrics, self._resumed_from)

    def _adopt(self, tree: dict[str, Any], meta: dict[str, Any], *, joined: bool = False) -> None:
        import mlx.core as mx

        from meshtrain.train.leaves import assign_leaves, flat_leaves

        assert self._model is not None
        # leaf by leaf into this replica's own trees, never whole subtrees: the received state has
        # no empty containers (a parameter-free submodule's), which the optimizer still needs
        params = assign_leaves(self._model.parameters(), flat_leaves(tree["params"]), what="parameters")
        self._model.update(params)
        # in place: compiled update functions captured this very dict (mx.compile(inputs=...))
        assign_leaves(self._optimizer.state, flat_leaves(tree["opt"]), what="optimizer state")
        mx.eval(self._model.parameters(), self._optimizer.state)
        self._steps.adopt(meta, joined=joined)
        if joined:
            self._reporter.send({"k": "adopted"})  # the coordinator counts it among the state's holders
        if meta.get("resumed_from") is not None:
            self._resumed_from = int(meta["resumed_from"])

    def _broadcast_state(self, source: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        tree = broadcast_tree(self._ring, self._state_tree(), source)
        blob = broadcast_bytes(self._ring, msgpack.packb(self._meta()) if source else None, source)
        return tree, msgpack.unpackb(blob, strict_map_key=False)

    def _send_due_state(self, due: SendState) -> None:
        """The boundary after a pinned step: the holders' first hands the state to the zero participants."""
        if self._ring is None:
            return  # the ring broke meanwhile: the next generation's plan finds who still needs state
        try:
            tree, meta = self._broadcast_state(due.source)
        except RING_FAILURES:
            self._mark_broken()
            return  # the next recovery finds who still needs the state
        if due.adopt:
            self._adopt(tree, meta, joined=True)

    def _add_zeros(self, zeros: AddZeros) -> None:
        """Add zeros with weight 0 to the pinned step's reduction (this worker had no slice in it)."""
        import mlx.core as mx
        from mlx.utils import tree_map

        template = self._model.trainable_parameters() if self._model is not None else None
        if template is None:
            raise UserError("call mesh.register(model, optimizer) before training so nodes can join")
        tree = tree_map(mx.zeros_like, template)
        if self._ring is None:
            return
        try:
            self._ring.allreduce_tree(tree, step=zeros.step, weight=0.0, wire_dtype=zeros.wire)
        except RING_FAILURES:
            self._mark_broken()

    # --- shares -------------------------------------------------------------------------------
    def _measure(self, grads: Any) -> None:
        """The step's gradients are here (its reduction is next): evaluate them under MLX's peak
        memory probe (the ring would evaluate them next anyway) and time the compute so far."""
        if self._timer is None or self._open is None:
            return
        start, finish = mlx_peak_probe()
        start()
        self._timer.gradients_ready(finish(grads))

    def _rebalance(self) -> None:
        """At FIRST_CHECK, every CHECK_EVERY steps and at epoch ends, every member swaps (speed, power,
        memory cap) and applies the same new shares from the next step on."""
        self._steps.begin_rebalance()
        if self._share_mode != PERF or self._ring is None or len(self._roster) < 2:
            return
        from meshtrain import power

        factor, reason = power.power_factor(power.probe(), self._on_battery)
        rate = self._timer.rate() if self._timer is not None else None
        cap = self._timer.memory_cap() if self._timer is not None else -1
        size = len(self._roster)
        vec = share_vector(size, self._roster.index(self.member), rate, factor, cap)
        try:
            summed = self._ring.allreduce(vec, step=STATUS_STEP, weight=1.0, wire_dtype="float32") * size
        except RING_FAILURES:
            self._mark_broken()  # the next boundary recovers; the shares stay as they were
            return
        self._steps.replan(summed, reason)

    # --- generations ---------------------------------------------------------------------------
    def _stale_view(self) -> bool:
        view = self._views.latest()
        return view is not None and view.version != self._gen

    def _ring_unusable(self) -> bool:
        """No ring, or one the newest view has moved past -- except, with `keep_ring_for_joins`, a
        view that only adds members: the ring still has every member of the step under way, so the
        step's other collectives end on it (a sharded step must not re-form mid-update); the
        joiners come in at the next boundary or the next step's reduction."""
        if self._ring is None:
            return True
        if not self._stale_view():
            return False
        view = self._views.latest()
        return not (self.keep_ring_for_joins and view is not None and set(self._roster) <= set(view.members))

    def _abort_if_stale(self, view: View) -> None:
        """Reader thread: a newer view cancels a ring connect for an older one at once (it may wait
        for a member that is gone); one whose members differ from the ring's aborts the ring."""
        with self._ring_lock:
            connecting, ring = self._connecting, self._ring
            if connecting is not None and view.version > connecting[0]:
                connecting[1].set()
            if ring is None or view.members == self._roster:
                return
            if self.keep_ring_for_joins and set(self._roster) <= set(view.members):
                return  # only joiners: the ring still works (see _ring_unusable)
        ring.close()

    def _report_ring_drops(self, force: bool = False) -> None:
        """What the ring listener refused (strangers, garbage, replays) to the agent, for `status`:
        after each connect, and every few seconds from the step boundaries (training thread)."""
        drops = getattr(self._listener, "drops", None)
        if drops is None:
            return
        now = time.monotonic()
        last, at = self._drops_sent
        if not force and now - at < DROPS_REPORT_S:
            return
        snapshot = drops.snapshot()
        self._drops_sent = (snapshot, now)
        if snapshot != last:
            self._reporter.send({"k": "ring", "drops": snapshot})

    def _mark_broken(self) -> None:
        with self._ring_lock:
            ring, self._ring = self._ring, None
        if ring is not None:
            ring.close()

    def _usable_view(self, newer_than: int, patience: float) -> View:
        """The view to form next: the first newer than `newer_than` (or, after `patience` seconds, the
        newest there is) that includes this worker and has at least min_nodes members (else pause)."""
        if not self._announced:
            self._reporter.send({"k": "joinable"})  # a joiner is added to the view once it can train
            self._announced = True
        deadline = time.monotonic() + patience
        paused = False
        while True:
            view = self._views.latest()
            fresh = view is not None and (view.version > newer_than or time.monotonic() >= deadline)
            if view is not None and fresh and self.member not in view.members and self._gen >= 0:
                raise PeerLost(self.member, view.version, "this worker was dropped from the job")
            if view is not None and fresh and self.member in view.members:
                if len(view.members) >= view.min_nodes:
                    if paused:
                        self._reporter.report({"paused": 0})
                        self._reporter.flush()
                    return view
                if not paused:
                    paused = True
                    self._reporter.report({"paused": view.min_nodes, "workers": len(view.members)})
                    self._reporter.flush()
                newer_than = view.version
            self._views.wait_newer(view.version if view is not None else -1, PAUSE_POLL_S)

    def _recover(self, held: _Held | None) -> Take | None:
        """Form the newest generation and follow its plan; a `Take` for a member behind."""
        from meshtrain.ring import Ring

        newer_than = self._gen  # -1 before the first ring: any view
        patience = RETRY_SAME_VIEW_S
        while True:
            view = self._usable_view(newer_than, patience)
            self._mark_broken()
            cancel = threading.Event()  # set by the views thread when a newer view arrives
            with self._ring_lock:
                self._connecting = (view.version, cancel)
            latest = self._views.latest()
            if latest is not None and latest.version > view.version:
                cancel.set()  # it came between _usable_view and now
            try:
                ring = Ring.connect(
                    self._listener,
                    rank=view.rank_of(self.member),
                    addrs=list(view.addrs),
                    job=str(self.job),
                    generation=view.version,
                    timeout=CONNECT_TIMEOUT_S,
                    keyring=self._keyring,
                    cancel=cancel,
                )
            except RING_FAILURES:
                newer_than, patience = view.version, RETRY_SAME_VIEW_S
                continue
            finally:
                with self._ring_lock:
                    self._connecting = None
                self._report_ring_drops(force=True)
            with self._ring_lock:  # the views thread reads the roster
                self._ring = ring
                self._steps.formed(view.version, view.members)
            self._reporter.send({"k": "formed", "generation": view.version, "members": list(view.members)})
            self.generation_changes += 1
            try:
                return self._follow_plan(held) if self._outer is None else self._outer.follow_plan(held)
            except RING_FAILURES:
                newer_than, patience = view.version, RETRY_SAME_VIEW_S
                continue

    def _follow_plan(self, held: _Held | None) -> Take | None:
        """Swap statuses over the new ring and carry out this member's part of the recovery plan."""
        steps = self._steps
        status = steps.status(self._digest(), held is not None, held.wire if held is not None else "")
        size = len(self._roster)
        vec = encode_status(size, self._roster.index(self.member), status)
        summed = self._ring.allreduce(vec, step=STATUS_STEP, weight=1.0, wire_dtype="float32") * size
        try:
            plan, actions = steps.plan(decode_statuses(self._roster, summed))
        except Unrecoverable as exc:
            raise PeerLost(self.member, self._gen, f"cannot rejoin the job's state: {exc}") from exc
        taken: Take | None = None
        for action in actions:
            if isinstance(action, ShareResult):
                last = steps.last
                template = held.tree if action.take and held is not None else (last.result if last else None)
                if template is None:
                    template = self._model.trainable_parameters() if self._model is not None else {}
                got = broadcast_tree(self._ring, template, action.source)
                blob = msgpack.packb(steps.last_meta()) if action.source and last else None
                meta = msgpack.unpackb(broadcast_bytes(self._ring, blob, action.source), strict_map_key=False)
                if action.take:
                    taken = Take.of(got, meta)
            else:
                tree, meta = self._broadcast_state(action.source)
                if action.adopt:
                    self._adopt(tree, meta, joined=True)
        steps.followed(plan)
        return taken


def _split_outer(tree: dict[str, Any], meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Take a local-SGD checkpoint's outer momentum out of its (flat) optimizer state: the inner
    optimizer gets the rest; the OuterOptimizer created after `register` takes this."""
    from meshtrain.worker.local_rounds import OUTER_STATE

    prefix = f"{OUTER_STATE}.velocity."
    opt = tree.get("opt") or {}
    outer = {k[len(prefix) :]: v for k, v in opt.items() if k.startswith(prefix)}
    for k in [k for k in opt if k.startswith(f"{OUTER_STATE}.")]:
        del opt[k]
    return (outer, dict(meta.get("outer") or {})) if outer else None
