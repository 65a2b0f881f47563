"""The pure step core (meshtrain.train.stepper), simulated: a whole job's steppers driven by events.

`Job` plays the part of the workers' shells and their ring, in lock step, the
way meshtrain.worker.mesh drives a `Stepper`: step boundaries, hand-outs,
reductions that complete or break when a member is lost (before its
all-reduce, or midway with some members already done), joiners admitted at a
boundary or mid-step, and share re-plans from measured speeds. The recovery
plans' broadcasts are carried out between the simulated members (the "model"
is the list of reductions a member applied; the metadata goes through msgpack
as over the ring). The checks are the job's invariants: every sample exactly
once per epoch (the production ledger check), committed steps monotone,
replicas bit-identical, a step interrupted by a loss redone with the shares it
was handed out with and the lost slice carried into the next step.

`LocalJob` drives the same steppers the way meshtrain.worker.local_rounds does
for local SGD: step boundaries that record each step's slices and commit it
with nobody, an outer sync every H steps (and at the step that ends an epoch)
that commits the interval, members lost mid-interval (their unsynced slices
carried), and joiners entering at the next sync with the holders' state.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshtrain.errors import UserError
from meshtrain.train.outer_recovery import plan_outer_sync
from meshtrain.train.recovery import MemberStatus, Unrecoverable
from meshtrain.train.share_modes import PERF
from meshtrain.train.step_sampler import ledger_problem
from meshtrain.train.stepper import (
    AddZeros,
    Committed,
    LocalStep,
    SendState,
    ShareResult,
    Stepper,
    Take,
    share_vector,
)


def _wire(obj: Any) -> Any:
    """What the ring's broadcast_bytes delivers: the msgpack round trip."""
    return msgpack.unpackb(msgpack.packb(obj), strict_map_key=False)


@dataclass
class Fault:
    """A member lost during a step: before its all-reduce ("forward") or midway ("allreduce", after
    `completed` of the others had received every chunk); `join`: a node joins in the same view."""

    where: str
    victim: int
    completed: int = 0
    join: bool = False


@dataclass
class Job:
    n_samples: int
    batch: int
    epochs: int
    share_mode: str = "equal"
    rates: dict[str, float] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        self.s: dict[str, Stepper] = {}
        self.params: dict[str, list[Any]] = {}  # the "model": the reductions a member applied
        self.ep: dict[str, int] = {}  # the script's epoch loop, per member
        self.yielded: dict[str, bool] = {}
        self.roster: list[str] = []
        self.version = 0
        self.rows: dict[str, list[Committed]] = {}
        self.owed: dict[str, SendState] = {}  # a zero member's share of the hand-over due later
        self.plans: list[Any] = []
        self.joins = 0
        self.steps_done = 0

    # --- members ---------------------------------------------------------------------------------
    def add(self, name: str, joiner: bool) -> None:
        self.s[name] = Stepper(name, joiner=joiner, share_mode=self.share_mode)
        self.params[name], self.rows[name], self.ep[name], self.yielded[name] = [], [], 0, False
        self.s[name].start_epoch(self.n_samples, self.batch, self.seed, 0)  # the script's first loop

    def start(self, members: Sequence[str]) -> None:
        for m in members:
            self.add(m, joiner=False)
        self.form(list(members), {})

    def joiner(self) -> str:
        self.joins += 1
        name = f"j{self.joins}"
        self.add(name, joiner=True)
        return name

    def digest(self, m: str) -> str:
        st = self.s[m]
        if not st.has_state:
            return ""
        return hashlib.blake2b(repr((st.committed, self.params[m])).encode(), digest_size=16).hexdigest()

    def record(self, m: str, done: Committed | None) -> None:
        if done is not None:
            self.rows[m].append(done)

    # --- the ring's collectives ------------------------------------------------------------------
    def hand_over(self, sends: dict[str, SendState]) -> None:
        """One state broadcast: every member of the ring takes part, one sends, some adopt."""
        assert set(sends) == set(self.roster), (sends, self.roster)
        (source,) = [m for m, a in sends.items() if a.source]
        meta = _wire(self.s[source].meta({}, None))
        for m, action in sends.items():
            if action.adopt:
                self.s[m].adopt(meta, joined=True)
                self.params[m] = list(self.params[source])

    def form(self, members: list[str], pending: dict[str, str]) -> dict[str, Take]:
        """A new generation of `members`; `pending` (member -> wire) are inside the step reduction.
        Runs the plan on every member and returns the reductions the members behind take."""
        self.version += 1
        self.roster = members
        self.owed = {}  # a hand-over due on the old ring is void (the new plan decides again)
        for m in members:
            self.s[m].formed(self.version, tuple(members))
        statuses = _wire_statuses(
            [self.s[m].status(self.digest(m), m in pending, pending.get(m, "")) for m in members]
        )
        plans = {m: self.s[m].plan(statuses) for m in members}
        plan = plans[members[0]][0]
        assert all(p == plan for p, _ in plans.values())  # every member computes the same plan
        self.plans.append(plan)
        kinds = {tuple(type(a) for a in acts) for _, acts in plans.values()}
        assert len(kinds) == 1  # the same collectives in the same order on every member
        takes: dict[str, Take] = {}
        for i, kind in enumerate(kinds.pop()):
            acts = {m: plans[m][1][i] for m in members}
            if kind is ShareResult:
                (source,) = [m for m, a in acts.items() if a.source]
                last = self.s[source].last
                assert last is not None
                meta = _wire(self.s[source].last_meta())
                takes.update(
                    {
                        m: Take.of(last.result, meta)
                        for m, a in acts.items()
                        if isinstance(a, ShareResult) and a.take
                    }
                )
            else:
                self.hand_over({m: a for m, a in acts.items() if isinstance(a, SendState)})
        for m in members:
            self.s[m].followed(plans[m][0])
            zeros = self.s[m].zero_due()
            if zeros is not None:  # a joiner adds zeros to the pinned reduction, takes the state later
                assert isinstance(zeros[0], AddZeros) and zeros[0].step == plan.target
                self.owed[m] = zeros[1]
        return takes

    # --- one step --------------------------------------------------------------------------------
    def boundary(self) -> None:
        for m in self.roster:
            closed = self.s[m].close_step()
            if closed is not None:
                assert closed.had_reduction
        dues: dict[str, SendState] = dict(self.owed)
        self.owed = {}
        for m in self.roster:
            due = self.s[m].due_state()
            if due is not None:
                dues[m] = due
        if dues:
            self.hand_over(dues)

    def rebalance(self) -> None:
        due = {self.s[m].rebalance_due for m in self.roster if self.s[m].has_state}
        assert len(due) <= 1  # the global step decides: every member alike
        if not due or not due.pop():
            return
        for m in self.roster:
            self.s[m].begin_rebalance()
        if len(self.roster) < 2:
            return
        size = len(self.roster)
        summed = sum(share_vector(size, r, self.rates.get(m), 1.0, -1) for r, m in enumerate(self.roster))
        for m in self.roster:
            self.s[m].replan(np.asarray(summed), "")
        shares = {repr(self.s[m].weights_of(self.s[m].gen, self.s[m].roster)) for m in self.roster}
        assert len(shares) == 1

    def epochs_left(self) -> bool:
        """Each member's script loop (`for epoch in range(E): for idx in mesh.batches(..., epoch=epoch)`)."""
        left = set()
        for m in self.roster:
            st = self.s[m]
            if not st.has_state:
                continue  # it recovers until it has the state (WorkerMesh._boundary)
            while self.ep[m] < self.epochs and st.epoch_done(self.ep[m], self.yielded[m]):
                self.ep[m] += 1
                self.yielded[m] = False
                if self.ep[m] < self.epochs:
                    st.start_epoch(self.n_samples, self.batch, self.seed, self.ep[m])
            left.add(self.ep[m] < self.epochs)
        assert len(left) == 1  # every member's loop ends at the same step
        return left.pop()

    def step(self, faults: Sequence[Fault] = (), join_at_boundary: bool = False) -> bool:
        """One global step with `faults` in it; False when the job is over."""
        self.boundary()
        if join_at_boundary:
            self.form(self.roster + [self.joiner()], {})
        self.rebalance()
        if not self.epochs_left():
            return False
        assert all(self.s[m].has_state for m in self.roster)  # a joiner got it at the boundary
        queue = list(faults)
        late: list[str] = []  # still at the boundary when a joiner's view arrives (the others handed out)
        if queue and queue[0].where == "straddle":
            late = self.roster[: queue.pop(0).completed]
        self.hand_out([m for m in self.roster if m not in late])
        pending = {m for m in self.roster if self.s[m].in_step_reduction()}
        if late:
            self.form(self.roster + [self.joiner()], {m: "bfloat16" for m in pending})
            self.epochs_left()  # a joiner given the state now runs its loop up to the job's epoch
            idle = [m for m in self.roster if self.s[m].has_state and not self.s[m].in_step_reduction()]
            self.hand_out(idle)  # by the shares the step is pinned to, if it is
            pending = {m for m in self.roster if self.s[m].in_step_reduction()}
        while pending:
            fault = queue.pop(0) if queue else None
            if fault is None or fault.where == "straddle":
                self.complete(sorted(pending), pending)
                break
            holders = [m for m in self.roster if self.s[m].has_state]
            candidates = [m for m in self.roster if holders != [m]]  # the job's state must survive
            if not candidates:
                continue
            victim = candidates[fault.victim % len(candidates)]
            if fault.where == "allreduce":  # these received every chunk before the ring broke
                done = sorted(pending - {victim})[: fault.completed]
                self.complete(done, pending)
                pending -= set(done)
            pending.discard(victim)
            survivors = [m for m in self.roster if m != victim] + ([self.joiner()] if fault.join else [])
            del self.s[victim]
            takes = self.form(survivors, {m: "bfloat16" for m in pending})
            for m, taken in takes.items():
                self.record(m, self.s[m].take(taken))
                self.params[m].append(taken.result)
                pending.discard(m)
        self.steps_done += 1
        return True

    def hand_out(self, members: Sequence[str]) -> None:
        for m in members:
            out = self.s[m].hand_out(self.ep[m])
            self.yielded[m] = True
            opened = self.s[m].open
            assert opened is not None and out.step == self.s[m].committed == opened.step
            assert len(out.indices) == opened.samples

    def complete(self, members: Sequence[str], inside: set[str]) -> None:
        """The step reduction completes on `members`: the same result on each, with the gradients of
        the members `inside` it (its ledger rows must name exactly those)."""
        if not members:
            return
        result = ("R", self.s[members[0]].committed, self.version)
        for m in members:
            done = self.s[m].reduced(result)
            assert set(done.slices) == inside, (done.slices, inside)
            self.record(m, done)
            self.params[m].append(result)

    def run(self, plan: Sequence[tuple[Sequence[Fault], bool]], limit: int = 200) -> None:
        for faults, join in plan:
            if not self.step(faults, join):
                return
        for _ in range(limit):
            if not self.step():
                return
        raise AssertionError("the job did not finish")

    # --- the invariants ----------------------------------------------------------------------------
    def check(self) -> None:
        for m in self.roster:
            steps = [r.step for r in self.rows[m]]
            assert steps == list(range(steps[0], steps[0] + len(steps))) if steps else True, (m, steps)
        with tempfile.TemporaryDirectory() as tmp:
            for m, rows in self.rows.items():
                lines = [_json(r.row(0.0)) for r in rows]
                (Path(tmp) / f"ledger-{m}.jsonl").write_text("".join(line + "\n" for line in lines))
            assert ledger_problem(Path(tmp), self.n_samples) is None
            epochs = {r.epoch for rows in self.rows.values() for r in rows}
            assert epochs == set(range(self.epochs))
        alive = [m for m in self.roster if self.s[m].has_state]
        assert len({self.digest(m) for m in alive}) == 1  # the replicas agree
        assert len({self.s[m].committed for m in alive}) == 1


def _json(row: dict[str, Any]) -> str:
    import json

    return json.dumps(row)


def _wire_statuses(statuses: list[MemberStatus]) -> list[MemberStatus]:
    """What the status swap delivers (meshtrain.train.recovery's encoding over a float32 all-reduce)."""
    from meshtrain.train.recovery import decode_statuses, encode_status

    size = len(statuses)
    summed = sum(encode_status(size, r, s) for r, s in enumerate(statuses))
    return decode_statuses([s.member for s in statuses], np.asarray(summed, np.float32))


# --- unit tests ------------------------------------------------------------------------------------
def test_steps_without_faults_train_every_sample_once_per_epoch() -> None:
    job = Job(n_samples=23, batch=6, epochs=3)
    job.start(["a", "b", "c"])
    job.run([])
    job.check()
    assert job.steps_done == 3 * 4  # ceil(23 / 6) steps per epoch
    assert [r.step for r in job.rows["a"]] == list(range(12))
    assert job.s["a"].committed == 12


def test_hand_out_slices_the_global_batch_by_share_in_rank_order() -> None:
    s = Stepper("b")
    s.formed(0, ("a", "b"))
    s.start_epoch(10, 4, 0, 0)
    out = s.hand_out(0)
    batch = s.sampler.batch()  # type: ignore[union-attr]
    assert out.step == 0 and list(out.indices) == list(batch[2:4])
    assert s.in_step_reduction()
    done = s.reduced("R")
    assert done.step == 0 and set(done.slices) == {"a", "b"} and s.committed == 1
    assert not s.in_step_reduction() and s.last is not None and s.last.step == 0


def test_a_step_without_a_reduction_is_committed_by_the_boundary() -> None:
    s = Stepper("a")
    s.formed(0, ("a",))
    s.start_epoch(5, 5, 0, 0)
    s.hand_out(0)
    closed = s.close_step()
    assert closed is not None and not closed.had_reduction and closed.committed is not None
    assert closed.committed.step == 0 and s.committed == 1 and s.open is None
    assert s.close_step() is None  # nothing open


def test_an_epoch_that_ended_before_a_worker_took_part_is_missed() -> None:
    s = Stepper("j", joiner=True)
    s.formed(3, ("a", "j"))
    s.start_epoch(10, 4, 0, 0)
    s.adopt(_wire({"committed": 4, "sampler": {**s.sampler.to_dict(), "epoch": 1, "cursor": 4}}))  # type: ignore[union-attr]
    assert s.has_state and s.committed == 4
    assert s.epoch_done(0, yielded=False) and s.missed_epoch  # its evaluation is not this worker's
    s.start_epoch(10, 4, 0, 1)
    assert not s.epoch_done(1, yielded=False)
    s.hand_out(1)
    assert not s.missed_epoch


def test_the_data_must_not_change_between_epochs() -> None:
    s = Stepper("a")
    s.start_epoch(10, 4, 0, 0)
    with pytest.raises(UserError, match="must not change"):
        s.start_epoch(10, 5, 0, 1)


def test_a_member_lost_mid_forward_makes_the_survivors_redo_the_step_and_carry_its_slice() -> None:
    job = Job(n_samples=24, batch=6, epochs=1)
    job.start(["a", "b", "c"])
    job.step()
    lost_slice = list(job.s["b"].sampler.assignment(job.s["b"].weights_of(1, ("a", "b", "c")))["b"])  # type: ignore[union-attr]
    job.step([Fault("forward", victim=1)])
    plan = job.plans[-1]
    assert plan.holders == ("a", "c") and plan.pinned_gen == 1 and plan.target == 1
    row = job.rows["a"][1]
    assert row.step == 1 and set(row.slices) == {"a", "c"}  # redone with the old shares, b's slice out
    job.step()
    nxt = job.rows["a"][2]
    assert list(np.concatenate(list(nxt.slices.values())))[: len(lost_slice)] == lost_slice  # carried
    job.run([])
    job.check()


def test_a_member_lost_mid_allreduce_after_others_completed_is_behind_and_takes_their_result() -> None:
    job = Job(n_samples=24, batch=6, epochs=1)
    job.start(["a", "b", "c", "d"])
    job.step()
    job.step([Fault("allreduce", victim=3, completed=1)])  # a completed, b and c did not, d lost
    plan = job.plans[-1]
    assert plan.behind == ("b", "c") and plan.r_source == "a" and plan.target == 2
    for m in ("a", "b", "c"):
        assert job.rows[m][1].step == 1 and set(job.rows[m][1].slices) == {"a", "b", "c", "d"}
    assert job.params["b"] == job.params["a"]
    job.run([])
    job.check()


def test_a_joiner_at_a_boundary_receives_the_state_and_trains_the_next_step() -> None:
    job = Job(n_samples=30, batch=5, epochs=2)
    job.start(["a", "b"])
    for _ in range(7):  # past epoch 0
        job.step()
    job.step(join_at_boundary=True)
    plan = job.plans[-1]
    assert plan.stale == ("j1",) and plan.state_now and plan.state_source == "a"
    assert job.s["j1"].joined_gen == job.version and job.ep["j1"] == 1  # its loop passed epoch 0
    assert job.rows["j1"][0].step == job.rows["a"][-1].step
    job.run([])
    job.check()


def test_a_joiner_admitted_mid_step_adds_zeros_and_takes_the_state_at_the_next_boundary() -> None:
    job = Job(n_samples=24, batch=6, epochs=1)
    job.start(["a", "b"])
    job.step()
    job.step([Fault("forward", victim=5, join=True)])  # b lost, j1 joins in the same view
    plan = job.plans[-1]
    assert plan.zero == ("j1",) and plan.holders == ("a",) and not plan.state_now
    assert not job.s["j1"].has_state and "j1" in job.owed
    job.step()  # its boundary hands the state over
    assert job.s["j1"].has_state and job.s["j1"].committed == job.s["a"].committed
    job.run([])
    job.check()


def test_perf_shares_are_replanned_at_the_first_check_and_every_sample_still_trains_once() -> None:
    job = Job(n_samples=200, batch=10, epochs=1, share_mode=PERF, rates={"a": 300.0, "b": 100.0})
    job.start(["a", "b"])
    job.run([])
    job.check()
    shares = job.s["a"].weights_of(job.s["a"].gen, ("a", "b"))
    assert shares["a"] > 0.6  # three times as fast: a bigger share
    late = job.rows["a"][-1].slices
    assert len(late["a"]) > len(late["b"])


def test_an_unrecoverable_plan_raises_and_the_taken_meta_survives_msgpack() -> None:
    s = Stepper("a", joiner=True)
    s.formed(0, ("a",))
    with pytest.raises(Unrecoverable):
        s.plan([s.status("", False, "")])
    t = Take.of("R", _wire({"contributors": ("a", "b"), "sampler": {"epoch": 0}}))
    assert t.contributors == ("a", "b")


# --- simulated sequences (hypothesis) ----------------------------------------------------------------
faults = st.builds(
    Fault,
    where=st.sampled_from(["forward", "allreduce", "straddle"]),
    victim=st.integers(0, 4),
    completed=st.integers(0, 3),
    join=st.booleans(),
)
step_events = st.tuples(st.lists(faults, max_size=2), st.booleans())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    members=st.integers(1, 4),
    n_samples=st.integers(5, 40),
    batch=st.integers(1, 9),
    epochs=st.integers(1, 2),
    perf=st.booleans(),
    events=st.lists(step_events, max_size=12),
)
def test_any_sequence_of_losses_and_joins_keeps_the_invariants(
    members: int, n_samples: int, batch: int, epochs: int, perf: bool, events: list[Any]
) -> None:
    names = [chr(ord("a") + i) for i in range(members)]
    rates = {m: 100.0 * (i + 1) for i, m in enumerate(names)} | {f"j{k}": 150.0 for k in range(1, 40)}
    job = Job(n_samples, batch, epochs, share_mode=PERF if perf else "equal", rates=rates)
    job.start(names)
    job.run(events)
    job.check()


# --- local SGD (meshtrain.worker.local_rounds) ---------------------------------------------------------
@dataclass
class LocalJob(Job):
    """A local-SGD job of steppers: `every` steps to an outer sync, forced at an epoch's last step.

    `roster` is who is alive (members, then joiners waiting for a sync); each stepper's own roster
    is its ring's, which keeps a lost member until the next sync forms the new ring. `params` is a
    member's outer state: the (first step, contributors) of every interval it synced."""

    every: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        self.interval: dict[str, list[LocalStep]] = {}
        self.first: dict[str, int] = {}  # the interval's first step
        self.interval_gen: dict[str, int] = {}
        self.since: dict[str, int] = {}  # steps since the last sync (OuterOptimizer._steps_since)
        self.stale = False  # a member was lost or a node joined since the ring formed
        self.syncs: list[tuple[int, tuple[str, ...]]] = []  # (first step, contributors) of each

    def add(self, name: str, joiner: bool) -> None:
        super().add(name, joiner)
        self.interval[name], self.first[name], self.interval_gen[name], self.since[name] = [], 0, -1, 0

    def start(self, members: Sequence[str]) -> None:
        for m in members:
            self.add(m, joiner=False)
        self.version += 1
        self.roster = list(members)
        for m in members:
            self.s[m].formed(self.version, tuple(members))
            self.interval_gen[m] = self.version

    def holding(self) -> list[str]:
        return [m for m in self.roster if self.s[m].has_state]

    def digest(self, m: str) -> str:
        """LocalRounds.digest: the outer state and every slice of the interval, open step included."""
        st = self.s[m]
        if not st.has_state:
            return ""
        opened = st.local_step()
        steps = [*self.interval[m], opened] if opened is not None else self.interval[m]
        seen = [(x.step, x.epoch, {k: v.tolist() for k, v in x.slices.items()}) for x in steps]
        return hashlib.blake2b(
            repr((self.first[m], self.params[m], seen)).encode(), digest_size=16
        ).hexdigest()

    def boundary(self) -> None:
        """LocalRounds.boundary: a local step is recorded and committed with nobody (no ledger row);
        the shares are re-planned only where an interval starts, on an intact ring."""
        for m in self.holding():
            st = self.s[m]
            step = st.local_step()
            if step is not None:
                if not self.interval[m]:
                    assert st.open is not None
                    self.interval_gen[m] = st.open.generation
                self.interval[m].append(step)
            closed = st.close_step()
            if closed is not None:
                assert closed.had_reduction == (step is None)
                assert step is None or (closed.committed is not None and closed.committed.step == step.step)
        inside = {bool(self.interval[m]) for m in self.holding()}
        assert len(inside) == 1  # every member is inside an interval, or none
        if not inside.pop() and not self.stale:
            self.rebalance()

    def rebalance(self) -> None:
        due = {self.s[m].rebalance_due for m in self.holding()}
        assert len(due) == 1
        if not due.pop():
            return
        for m in self.holding():
            self.s[m].begin_rebalance()
        if self.share_mode != PERF or len(self.roster) < 2:
            return
        size = len(self.roster)
        summed = sum(share_vector(size, r, self.rates.get(m), 1.0, -1) for r, m in enumerate(self.roster))
        for m in self.roster:
            self.s[m].replan(np.asarray(summed), "")

    def sync(self) -> None:
        """The outer sync: on a changed mesh the new ring forms first and every member follows
        plan_outer_sync (the holders' deltas count; joiners add zeros, then take the state)."""
        holders: list[str] = self.holding()
        zero: list[str] = []
        source = None
        if self.stale:
            self.version += 1
            for m in self.roster:
                self.s[m].formed(self.version, tuple(self.roster))
            statuses = [
                MemberStatus(
                    member=m,
                    committed=self.first[m] if self.s[m].has_state else 0,
                    digest=self.digest(m),
                    pending=self.s[m].has_state,
                    slice_gen=self.interval_gen[m] if self.s[m].has_state else -1,
                    wire="float32" if self.s[m].has_state else "",
                )
                for m in self.roster
            ]
            plan = plan_outer_sync(_wire_statuses(statuses))
            assert not plan.state_now and not plan.diverged and plan.slice_gen >= 0
            holders, zero, source = list(plan.holders), list(plan.zero), plan.source
            assert set(holders) == set(self.holding())  # every survivor is inside this interval's sync
            self.stale = False
        contributors = set(holders) if zero or source else set(self.s[holders[0]].roster)
        firsts = {self.first[m] for m in holders}
        assert len(firsts) == 1
        self.syncs.append((firsts.pop(), tuple(sorted(contributors))))
        for m in holders:
            st = self.s[m]
            recorded = [x.step for x in self.interval[m]]
            rows = st.commit_interval(self.interval[m], contributors)
            assert [r.step for r in rows][: len(recorded)] == recorded and rows
            for r in rows:
                assert set(r.slices) <= contributors and r.generation == st.gen
            self.rows[m].extend(rows)
            self.params[m].append(self.syncs[-1])
            self.interval[m], self.first[m], self.interval_gen[m] = [], st.committed, st.gen
            self.since[m] = 0
        for z in zero:  # after the holders' outer step: the state of the source
            assert source is not None
            st = self.s[z]
            st.drop_state()
            st.adopt(_wire(self.s[source].meta({}, None)), joined=True)
            st.open_adopted()
            self.params[z] = list(self.params[source])
            self.interval[z], self.first[z], self.interval_gen[z] = [], st.committed, st.gen
            self.since[z] = 0

    def step(self, faults: Sequence[Fault] = (), join_at_boundary: bool = False) -> bool:
        """One step; `faults` (after the hand-out): "forward"/"allreduce" lose a member mid-interval,
        `join` brings a node that waits for the next sync; False when the job is over."""
        self.boundary()
        if not self.epochs_left():
            return False
        self.hand_out(self.holding())
        for fault in faults:
            holding = self.holding()
            if len(holding) >= 2:
                victim = holding[fault.victim % len(holding)]
                self.roster.remove(victim)
                del self.s[victim]
                self.stale = True
            if fault.join or join_at_boundary:
                self.roster.append(self.joiner())
                self.stale = True
        dues = set()
        for m in self.holding():
            self.since[m] += 1
            dues.add(self.since[m] >= self.every or self.s[m].epoch_ends())
        assert len(dues) == 1  # every member syncs at the same step
        if dues.pop():
            self.sync()
        self.steps_done += 1
        return True


def test_local_sgd_commits_whole_intervals_and_syncs_at_each_epochs_last_step() -> None:
    job = LocalJob(n_samples=20, batch=4, epochs=2, every=3)
    job.start(["a", "b"])
    job.run([])
    job.check()
    assert [first for first, _ in job.syncs] == [0, 3, 5, 8]  # 5 steps per epoch: H=3, then the end
    assert [r.step for r in job.rows["a"]] == list(range(10))


def test_a_member_lost_mid_interval_costs_its_unsynced_slices_which_are_carried() -> None:
    job = LocalJob(n_samples=36, batch=6, epochs=1, every=3)
    job.start(["a", "b", "c"])
    job.step()
    lost = [list(job.s["a"].local_step().slices["c"])]  # type: ignore[union-attr]
    job.step([Fault("forward", victim=2)])  # c is lost at step 1; nobody notices before the sync
    lost.append(list(job.s["a"].local_step().slices["c"]))  # type: ignore[union-attr]
    assert job.stale and job.s["a"].roster == ("a", "b", "c")
    job.step()  # step 2 ends the interval: the sync forms the ring of a and b
    assert job.syncs[0] == (0, ("a", "b")) and not job.stale
    rows = job.rows["a"][:3]
    assert [r.step for r in rows] == [0, 1, 2] and all(set(r.slices) == {"a", "b"} for r in rows)
    job.step()
    carried = list(np.concatenate(list(job.s["a"].local_step().slices.values())))  # type: ignore[union-attr]
    assert carried[: len(lost[0]) + len(lost[1])] == lost[0] + lost[1]  # step 3 trains c's slices first
    job.run([])
    job.check()
    assert job.steps_done > 36 // 6  # c's three unsynced slices trained again


def test_a_joiner_mid_interval_enters_at_the_next_sync_with_the_holders_state() -> None:
    job = LocalJob(n_samples=30, batch=5, epochs=2, every=4)
    job.start(["a", "b"])
    job.step()
    job.step([Fault("forward", victim=0, join=True)])  # a lost and j1 joining in one interval
    assert not job.s["j1"].has_state
    job.step()
    job.step()  # the sync: b holds, j1 adds zeros and takes b's state after the outer step
    assert job.syncs[0] == (0, ("b",)) and job.s["j1"].has_state
    assert job.s["j1"].committed == job.s["b"].committed == 4 and job.s["j1"].joined_gen == job.version
    job.run([])
    job.check()
    assert job.rows["j1"][0].step == 4  # its first step is an interval's first


def test_advance_with_the_step_committed_only_carries_the_orphans() -> None:
    s = Stepper("a")
    s.formed(0, ("a", "b"))
    s.start_epoch(12, 4, 0, 0)
    assert s.local_step() is None and not s.epoch_ends()
    s.hand_out(0)
    step = s.local_step()
    assert step is not None and step.step == 0 and set(step.slices) == {"a", "b"}
    s.close_step()  # a local step: committed with nobody
    assert s.committed == 1 and s.local_step() is None
    rows = s.commit_interval([step], {"a"})  # the sync after the boundary (a flush): nothing open
    assert [r.step for r in rows] == [0] and set(rows[0].slices) == {"a"} and s.committed == 1
    assert list(s.sampler.carry) == list(step.slices["b"])  # type: ignore[union-attr]
    assert not s.advance(np.empty(0, np.int64)) and s.committed == 1
    s.hand_out(0)
    assert s.advance(np.array([7], np.int64)) and s.committed == 2
    assert list(s.sampler.carry) == [7]  # type: ignore[union-attr]


def test_a_stepper_left_out_of_a_sync_drops_its_state_and_its_open_step_comes_with_the_new_one() -> None:
    a, b = Stepper("a"), Stepper("b")
    for w in (a, b):
        w.formed(0, ("a", "b"))
        w.start_epoch(8, 4, 0, 0)
        w.hand_out(0)
    a.commit_interval([], {"a", "b"})
    b.drop_state()
    assert not b.has_state and b.in_step_reduction()
    b.adopt(_wire(a.meta({}, None)), joined=True)
    b.open_adopted()
    assert b.has_state and not b.in_step_reduction() and b.committed == a.committed == 1
    closed = b.close_step()
    assert closed is not None and closed.had_reduction and closed.committed is None


local_events = st.tuples(
    st.lists(
        st.builds(Fault, where=st.just("forward"), victim=st.integers(0, 4), join=st.booleans()), max_size=2
    ),
    st.booleans(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    members=st.integers(1, 4),
    n_samples=st.integers(5, 40),
    batch=st.integers(1, 9),
    epochs=st.integers(1, 2),
    every=st.integers(1, 5),
    perf=st.booleans(),
    events=st.lists(local_events, max_size=14),
)
def test_local_sgd_with_members_lost_mid_interval_trains_every_sample_once_per_epoch(
    members: int, n_samples: int, batch: int, epochs: int, every: int, perf: bool, events: list[Any]
) -> None:
    names = [chr(ord("a") + i) for i in range(members)]
    rates = {m: 100.0 * (i + 1) for i, m in enumerate(names)} | {f"j{k}": 150.0 for k in range(1, 40)}
    job = LocalJob(n_samples, batch, epochs, share_mode=PERF if perf else "equal", rates=rates, every=every)
    job.start(names)
    job.run(events, limit=400)
    job.check()  # every sample once per epoch (the ledger check), the replicas agree
    firsts = [first for first, _ in job.syncs]
    assert firsts == sorted(set(firsts))  # every interval is committed once, in order
