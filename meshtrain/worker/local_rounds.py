"""Local SGD inside an elastic job: the interval between two outer syncs is the unit of commit.

`OuterOptimizer` (meshtrain.train.local_sgd) attaches one `LocalRounds` to
the job's `WorkerMesh`; from then on the mesh's step boundaries and its
recovery follow the rules here instead of the per-step ones, because local
SGD's members only meet at the outer sync:

- a step boundary inside an interval talks to nobody: it records this
  worker's slice (and everybody's, by the shares the interval was handed out
  with) and moves the sampler on; no ring, no recovery, no ledger row yet;
- the sync is where lost and joining workers are dealt with: a broken ring
  or a newer view makes the members form the new ring there and follow
  meshtrain.train.outer_recovery's plan (the survivors redo the sync among
  themselves, everyone else adds zeros and then receives the state);
- a sync that completes commits the interval: the ledger rows of its steps
  name the members whose deltas were in it, and the slices of members that
  are gone (or took no part) are carried to the next steps, so every sample
  is still trained on exactly once, at the cost of the lost member's unsynced
  steps only;
- the sync is forced at the step that ends an epoch, so an interval never
  spans two epochs and a carried slice stays in its epoch;
- shares are re-planned and checkpoints offered only where an interval
  starts (every member holds the same model there); a checkpoint's step is
  made one: a member that is to write a part at step s says so in a sync's
  header, and every member ends the interval that reaches s at s - 1;
- with `overlap=` the sync may run on a thread while the next steps compute
  (meshtrain.worker.overlapped_sync): `start_sync` begins it, `join_sync` commits
  its interval when it returned, or merges the interval into the open one
  when the ring broke (the next sync, in the foreground, recovers).

The step bookkeeping -- recording a step's slices, committing an interval
and carrying its orphans, dropping and adopting the state -- goes through
the mesh's `Stepper` (meshtrain.train.stepper), whose fields only it writes;
this module keeps the interval (its first step, its generation, the steps
recorded so far) and carries out the ring's part.

The sync itself is two reductions with the step label of the interval's
first step: a small float32 header (samples, the auto-H probe timings and,
compressed, the per-chunk bounds; meshtrain.train.compression) and the delta
(bf16/fp32, or qint8 integers on the agreed grid; int4 packs two to an item).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from meshtrain.errors import PeerLost, UserError, WireError
from meshtrain.train import compression
from meshtrain.train.digest import state_digest
from meshtrain.train.outer_recovery import OuterPlan, plan_outer_sync
from meshtrain.train.recovery import MemberStatus, Unrecoverable, decode_statuses, encode_status
from meshtrain.train.ring_broadcast import broadcast_bytes, broadcast_tree
from meshtrain.train.stepper import LocalStep, Stepper
from meshtrain.worker.overlapped_sync import InFlight

STATUS_STEP = -1  # the step label of the status swap (as in meshtrain.worker.mesh)
CUT = compression.HEADER_FIXED - 2  # header words: members with a checkpoint step due, sum of its offsets
OUTER_STATE = "meshtrain_outer"  # a local-SGD checkpoint's outer momentum, beside the inner optimizer's
REPLAN_SYNCS = 4  # with overlap=, a due share re-plan makes every 4th sync run in the foreground
RING_FAILURES = (PeerLost, WireError, OSError, ConnectionError)  # as meshtrain.worker.mesh's


@dataclass
class Pending:
    """What `WorkerMesh._recover` hands to `follow_plan`: this worker is inside a sync."""

    wire: str


class LocalRounds:
    """The local-SGD rules of one worker's mesh (see the module docstring)."""

    def __init__(self, mesh: Any, outer: Any) -> None:
        self.mesh = mesh  # the WorkerMesh (its ring and state are this module's to drive)
        self.outer = outer  # the OuterOptimizer: anchor, velocity, what a joiner must receive
        self.stepper: Stepper = mesh._steps  # the step bookkeeping, through its methods only
        self.start = self.stepper.committed  # the interval's first step
        self.interval_gen = self.stepper.gen
        self.steps: list[LocalStep] = []  # the interval's steps closed so far
        self.plan: OuterPlan | None = None  # the plan of the sync in progress, if it needed one
        self.checked = False  # the first sync compares the outer states
        self.recoveries = 0
        self.last_sent_bytes = 0  # what this worker sent in the last sync (header + delta)
        self.inflight: InFlight | None = None  # a sync running on a thread (overlap=)
        self.merges = 0  # background syncs the ring broke under (their intervals merged into the next)
        self.cut_at: int | None = None  # a checkpoint's step: the interval before it ends there (header)

    # --- the step boundary (WorkerMesh._boundary delegates here) -------------------------------
    def boundary(self) -> None:
        m, steps = self.mesh, self.stepper
        step = steps.local_step()
        if step is not None:  # a local step: recorded for the interval's sync, committed without a row
            if not self.steps and steps.open is not None:
                self.interval_gen = steps.open.generation
            self.steps.append(step)
        closed = steps.close_step()
        if closed is not None and m._timer is not None:
            if closed.had_reduction:
                m._timer.boundary()
            else:
                m._timer.local_step_done()
        while not steps.has_state:
            m._recover(None)  # a joiner: it enters at the holders' next sync (follow_plan)
        m._report_ring_drops()
        if self.steps or self.inflight is not None:
            return  # inside an interval (or its sync still in flight): nobody to meet
        if steps.rebalance_due and m._ring is not None and not m._stale_view():
            m._rebalance()
        if m._checkpoints is not None and steps.sampler is not None:
            m._checkpoints.at_boundary(steps.committed, self._checkpoint_tree, self._checkpoint_meta())

    def _checkpoint_tree(self) -> dict[str, Any]:
        """The state a checkpoint stores: the mesh's (model = anchor here, inner optimizer) and the
        outer momentum, under `OUTER_STATE` in the optimizer tree (a resume takes it out again)."""
        tree = self.mesh._state_tree()
        return {**tree, "opt": {**tree["opt"], OUTER_STATE: {"velocity": dict(self.outer._velocity)}}}

    def _checkpoint_meta(self) -> dict[str, Any]:
        return {**self.mesh._meta(), "outer": self.outer.shared_meta()}

    def epoch_ends(self) -> bool:
        """Whether the open step is its epoch's last (the sync must come now)."""
        return self.stepper.epoch_ends()

    # --- the sync --------------------------------------------------------------------------------
    def sync(
        self,
        delta: np.ndarray,
        samples: float,
        wire: str,
        feedback: compression.ErrorFeedback | None,
        timing: tuple[float, float] | None,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(the weighted mean of the holders' deltas, the header sums), the interval committed; None
        when this worker was not a holder and took the holders' state instead (nothing to apply)."""
        m = self.mesh
        self.plan = None
        m.wire_dtype = wire
        if m._timer is not None:
            m._timer.gradients_ready()
        need_plan = m._ring is None or m._stale_view()
        if not self.checked and not need_plan:
            try:  # the first sync compares the outer states on the ring it has
                self.follow_plan(Pending(wire))
            except RING_FAILURES:
                m._mark_broken()
                need_plan = True
        while True:
            if need_plan:
                self.recoveries += 1
                m._recover(Pending(wire))
                need_plan = False
            plan = self.plan
            if plan is not None and m.member not in plan.holders:
                self.checked = True
                return None  # follow_plan took part with zeros and adopted the holders' state
            if plan is not None and plan.diverged and not self.checked:
                raise UserError(
                    f"the replicas' models differ at the first outer sync ({', '.join(plan.diverged)} "
                    "unlike the others): create OuterOptimizer after mesh.register(model, optimizer), "
                    "and change the model alike on every worker"
                )
            self.checked = True
            try:
                out = self._reduce(delta, samples, wire, feedback, timing, cut=self._checkpoint_due())
            except RING_FAILURES:
                m._mark_broken()
                need_plan = True
                continue
            break
        contributors = self.plan.holders if self.plan is not None else self.stepper.roster
        self._read_cut(out[1], self.start)
        self._commit_interval(set(contributors))
        m._note_stats()
        if m._timer is not None:
            m._timer.reduced()
        return out

    # --- the sync in the background (overlap=) ---------------------------------------------------
    def can_overlap(self) -> bool:
        """Whether the open step's sync may run in the background. Every member must answer alike
        (an interval start after a foreground sync is where the shares are re-planned, over the
        ring), so only replicated facts count: the first sync (it compares the replicas) is done, the
        last sync's header did not ask for this one in the foreground (a member with a checkpoint
        due: only an interval's start after a foreground sync writes one), and no share re-plan is
        due at a re-plan sync (every `REPLAN_SYNCS`-th; the drift checks between wait). A ring that
        a new view closed is no reason: the sync fails on its thread and the members meet at once."""
        steps = self.stepper
        replan = steps.rebalance_due and self.outer.syncs % REPLAN_SYNCS == 0
        return self.inflight is None and self.checked and not self.cut_now() and not replan

    def ring_unusable(self) -> bool:
        """After a sync in the background: the ring is gone or broken (the sync failed, or a new view
        closed the ring after it returned), so the members meet in a foreground sync now."""
        ring = self.mesh._ring
        return ring is None or getattr(ring, "_broken", None) is not None

    def cut_now(self) -> bool:
        """Whether the open step must end the interval: the next one starts at a checkpoint's step,
        which only an interval's start (after a foreground sync) writes. A step every member knows
        alike, from the last sync's header (`_checkpoint_due`), so they all cut at it."""
        return self.cut_at is not None and self.stepper.committed + 1 == self.cut_at

    def _checkpoint_due(self) -> tuple[float, float]:
        """(1, its offset from the interval's start) when this member is to write a checkpoint part at a
        step past the next interval's start; (0, 0) otherwise. The members that know of it (a Prepare
        goes to the writers only) send the same offset, so the mean of the header sums is the step."""
        ck = self.mesh._checkpoints
        if ck is None:
            return 0.0, 0.0
        ahead = [s for s in ck.pending_steps() if s > self.stepper.committed + 1]
        return (1.0, float(min(ahead) - self.start)) if ahead else (0.0, 0.0)

    def _read_cut(self, sums: np.ndarray, label: int) -> None:
        """The checkpoint step the header sums name, if any (the same on every member)."""
        count = float(np.rint(sums[CUT]))
        if count > 0:
            self.cut_at = label + int(np.rint(sums[CUT + 1] / count))

    def start_sync(self, delta: np.ndarray, samples: float, wire: str, feedback: Any) -> None:
        """Begin the open step's interval's sync on a thread (meshtrain.worker.overlapped_sync): the
        sampler moves past the step now, the next interval opens, the ledger rows wait for the result."""
        m, steps = self.mesh, self.stepper
        m.wire_dtype = wire
        opened = steps.local_step()
        done = [*self.steps, opened] if opened is not None else list(self.steps)
        cut = self._checkpoint_due()  # on this thread, before the step is committed (as in `sync`)
        steps.advance(np.empty(0, np.int64))  # the interval's last step: committed in the sampler
        flight = InFlight(done, self.start, self.interval_gen)
        label = self.start
        flight.run(lambda: self._reduce(delta, samples, wire, feedback, None, label, cut))
        self.inflight = flight
        self.steps, self.start, self.interval_gen = [], steps.committed, steps.gen
        if m._timer is not None:  # the step's compute goes on to its boundary; the sync is not in it
            m._timer.gradients_ready()
            m._timer.reduced()

    def join_sync(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Wait for the sync in flight: (mean, header sums) with its interval committed; None when
        there was none, or the ring broke (its steps are merged into the open interval, which the next
        foreground sync commits with the delta of both)."""
        flight, self.inflight = self.inflight, None
        if flight is None:
            return None
        flight.join()
        if flight.error is not None:
            if not isinstance(flight.error, RING_FAILURES):
                raise flight.error
            self.mesh._mark_broken()
            self.merges += 1
            self.steps = [*flight.steps, *self.steps]
            self.start, self.interval_gen = flight.start, flight.generation
            return None
        self._write_rows(self.stepper.commit_closed(flight.steps, set(self.stepper.roster)))
        self.mesh._note_stats()
        self._read_cut(flight.result[1], flight.start)
        return flight.result

    def finish(self) -> None:
        """After the outer step: the members the plan left out receive the state now."""
        plan, self.plan = self.plan, None
        if plan is None or plan.state_now or not plan.zero or self.mesh._ring is None:
            return
        try:
            self._hand_over(plan)
        except RING_FAILURES:
            self.mesh._mark_broken()  # they stay without state and enter at the next sync

    def _header(
        self,
        samples: float,
        timing: tuple[float, float] | None,
        bounds: Any,
        cut: tuple[float, float] = (0.0, 0.0),
    ) -> np.ndarray:
        fixed = [1.0, float(samples), 1.0 if timing else 0.0, *(timing or (0.0, 0.0)), *cut]
        return np.concatenate([np.array(fixed, np.float32), np.asarray(bounds, np.float32)])

    def _reduce(
        self,
        delta: np.ndarray,
        samples: float,
        wire: str,
        feedback: compression.ErrorFeedback | None,
        timing: tuple[float, float] | None,
        label: int | None = None,
        cut: tuple[float, float] = (0.0, 0.0),
    ) -> tuple[np.ndarray, np.ndarray]:
        """The two reductions of one sync (on the training thread, or on a sync's own: `label`)."""
        m = self.mesh
        ring, size = m._ring, len(self.stepper.roster)
        label = self.start if label is None else label
        if ring is None:
            raise PeerLost(m.member, self.stepper.gen, "the ring broke before the outer sync")
        quantized = wire == "qint8"
        u = feedback.corrected(delta) if (quantized and feedback is not None) else delta
        bounds = np.float32(samples) * compression.chunk_bounds(u) if quantized else ()
        header = self._header(samples, timing, bounds, cut)
        sums = ring.allreduce(header, step=label, weight=1.0, wire_dtype="float32") * np.float32(size)
        sent = _sent(size, header.nbytes)
        total = float(np.rint(sums[1]))
        if not total > 0:  # nobody trained on a sample this interval: nothing moved
            self.last_sent_bytes = sent
            return np.zeros(delta.size, np.float32), sums
        if quantized:
            bits = compression.sync_bits(self.outer.compress, size)
            grid = compression.Grid.from_sums(sums[compression.HEADER_FIXED :], total, size, bits)
            q = grid.quantize(u, samples)
            items = q if bits == 8 else compression.pack4(q)
            summed = np.empty_like(items)
            ring.reduce_into(items, summed, step=label, weight=samples / total, wire_dtype="qint8")
            q_sum = summed if bits == 8 else compression.unpack4(summed, q.size)
            mean = grid.mean(q_sum)
            if feedback is not None:
                feedback.keep(u, grid.sent(q, samples), contributed=samples > 0)
            sent += _sent(size, items.size)
        else:
            mean = ring.allreduce(delta, step=label, weight=float(samples), wire_dtype=wire)
            sent += _sent(size, delta.size * np.dtype(_storage(wire)).itemsize)
        self.last_sent_bytes = sent
        return mean, sums

    def _reduce_zeros(self, plan: OuterPlan) -> None:
        """The holders' two reductions with zeros at weight 0 (this worker's delta is not in them)."""
        m = self.mesh
        ring, size, label = m._ring, len(self.stepper.roster), plan.target
        count = self.outer.param_count
        quantized = plan.wire == "qint8"
        header = self._header(0.0, None, np.zeros(compression.n_chunks(count) if quantized else 0))
        header[0] = 0.0
        sums = ring.allreduce(header, step=label, weight=1.0, wire_dtype="float32") * np.float32(size)
        self._read_cut(sums, label)  # as the holders read it from these sums
        if not float(np.rint(sums[1])) > 0:
            return
        if quantized and compression.sync_bits(self.outer.compress, size) == 4:
            count = (count + 1) // 2  # the holders' items: two 4-bit integers each
        zeros = np.zeros(count, np.float32)
        if quantized:
            ring.reduce_into(zeros, np.empty_like(zeros), step=label, weight=0.0, wire_dtype="qint8")
        else:
            ring.allreduce(zeros, step=label, weight=0.0, wire_dtype=plan.wire or "float32")

    def _commit_interval(self, contributors: set[str]) -> None:
        """The interval's steps are done: ledger rows of the contributors, orphans carried."""
        steps = self.stepper
        self._write_rows(steps.commit_interval(self.steps, contributors))
        self.steps = []
        self.start = steps.committed
        self.interval_gen = steps.gen

    def _write_rows(self, rows: list[Any]) -> None:
        ledger = self.mesh._ledger
        if ledger is not None and rows:
            now = time.time()
            with ledger.open("a") as f:
                for done in rows:
                    f.write(_json(done.row(now)) + "\n")

    # --- recovery (WorkerMesh._recover calls this on every new ring) ---------------------------
    def digest(self) -> str:
        """The shared outer state -- the anchor and the momentum at the interval's first step -- and
        the slices every member of the interval was handed (by the shares it was handed out with):
        a member whose shares differ (a re-plan of shares that completed on some members only) is
        outvoted, and the holders' ledger rows agree."""
        import hashlib

        outer = state_digest({"anchor": self.outer._anchor, "velocity": self.outer._velocity}, self.start)
        h = hashlib.blake2b(bytes.fromhex(outer), digest_size=16)
        opened = self.stepper.local_step()
        for step in [*self.steps, opened] if opened is not None else self.steps:
            h.update(np.array([step.step, step.epoch], np.int64).tobytes())
            for member, indices in step.slices.items():
                h.update(member.encode() + b"\0" + np.asarray(indices, np.int64).tobytes())
        return h.hexdigest()

    def follow_plan(self, held: Any) -> None:
        m, steps = self.mesh, self.stepper
        has = steps.has_state
        pending = isinstance(held, Pending) and has
        status = MemberStatus(
            member=m.member,
            committed=self.start if has else 0,
            digest=self.digest() if has else "",
            pending=pending,
            slice_gen=self.interval_gen if pending else -1,
            wire=held.wire if pending else "",
        )
        roster = steps.roster
        size = len(roster)
        vec = encode_status(size, roster.index(m.member), status)
        summed = m._ring.allreduce(vec, step=STATUS_STEP, weight=1.0, wire_dtype="float32") * size
        try:
            plan = plan_outer_sync(decode_statuses(roster, summed))
        except Unrecoverable as exc:
            raise PeerLost(m.member, steps.gen, f"cannot rejoin the job's state: {exc}") from exc
        self.plan = plan
        if plan.state_now:
            self.plan = None
            if plan.zero:
                self._hand_over(plan)
            return
        if m.member in plan.holders:
            return
        steps.drop_state()  # what this worker holds is not the job's state any more
        self._reduce_zeros(plan)
        self._hand_over(plan)

    def _hand_over(self, plan: OuterPlan) -> None:
        """The source's state after the outer step (model, inner optimizer, sampler, outer momentum and
        settings) to the plan's `zero` members; every member of the ring takes part."""
        m = self.mesh
        source = m.member == plan.source
        tree, meta = m._broadcast_state(source)
        velocity = broadcast_tree(m._ring, dict(self.outer._velocity), source)
        shared = {**self.outer.shared_meta(), "cut_at": self.cut_at}  # what decides when to sync
        blob = broadcast_bytes(m._ring, msgpack.packb(shared) if source else None, source)
        if m.member not in plan.zero:
            return
        m._adopt(tree, meta, joined=True)
        shared = msgpack.unpackb(blob, strict_map_key=False)
        self.outer.adopt(velocity, shared)
        self.cut_at = shared.get("cut_at")
        self.stepper.open_adopted()  # its step is in the state just taken
        self.checked = True  # the holders compared outer states already; its first sync is theirs
        self.steps = []
        self.start = self.stepper.committed
        self.interval_gen = self.stepper.gen


def _sent(size: int, nbytes: int) -> int:
    """Bytes one member sends in a ring all-reduce of `nbytes` (reduce-scatter and all-gather)."""
    return 0 if size < 2 else int(2 * (size - 1) / size * nbytes)


def _storage(wire: str) -> Any:
    from meshtrain.ring import codecs

    return codecs.codec(wire).storage


def _json(row: dict[str, Any]) -> str:
    import json

    return json.dumps(row)
