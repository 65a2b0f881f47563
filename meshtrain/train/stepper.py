"""The step bookkeeping of one elastic worker, as a pure state machine: events in, typed actions out.

`WorkerMesh` (meshtrain.worker.mesh) is the shell around this: it owns the
ring, the model and optimizer (MLX), the clock and the files, and tells the
`Stepper` what happened -- a ring was formed, a batch is handed out, a step's
reduction completed, a recovery plan was computed, the state was adopted.
The stepper answers with what to do, as data: the slice to train on
(`HandOut`), the ledger row of a committed step (`Committed`), the
broadcasts a recovery plan asks of this member (`ShareResult`,
`SendState`), the zeros a joiner adds to a pinned reduction (`AddZeros`),
and the reduction a member behind takes instead of redoing (`Take`).

Local SGD (meshtrain.worker.local_rounds) commits whole intervals instead
of steps: its step boundaries record each step's slices (`LocalStep`) and
close the step without a ledger row, and the interval's sync commits its
steps at once (`commit_interval`), carrying the slices of the members whose
deltas are not in it into the next steps (`advance`).

What it holds is what every member must agree on, step by step:

- `committed`: the global step (steps whose update every member applied);
- the exactly-once sampler (meshtrain.train.step_sampler) and which members'
  slices made it into each committed step (lost ones are carried);
- the generations seen, their members and their shares (equal until measured
  speeds re-plan them at the boundaries the global step decides);
- the step handed out last (`OpenStep`), the step a recovery pinned to an
  earlier generation's shares, the state hand-over owed at a later boundary,
  and the newest committed reduction (kept for members behind).

Nothing here touches sockets, MLX arrays or the clock, so a whole job --
steps, a member lost mid-step, a joiner, a re-plan -- is simulated in
tests/test_stepper.py by driving several steppers with the same events.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshtrain.errors import UserError
from meshtrain.train.recovery import MemberStatus, RecoveryPlan, plan_recovery
from meshtrain.train.share_modes import DEFAULT_SHARE_MODE, PERF
from meshtrain.train.step_sampler import StepSampler

__all__ = [
    "AddZeros",
    "Committed",
    "HandOut",
    "LastResult",
    "LocalStep",
    "OpenStep",
    "RecoveryAction",
    "SendState",
    "ShareResult",
    "StepClosed",
    "Stepper",
    "Take",
    "share_vector",
]


@dataclass
class OpenStep:
    """The batch handed out last: its step, the generation whose shares sliced it, and those members."""

    step: int
    generation: int
    members: tuple[str, ...]
    epoch: int
    weights: dict[str, float]  # the members' shares of this step's global batch, in rank order
    samples: int = 0  # this worker's slice
    reduced: bool = False


@dataclass
class LastResult:
    """The newest committed step reduction: members behind take it instead of redoing it.

    Its fields (in this order, `result` blanked) are the metadata sent with it."""

    step: int
    result: Any  # the reduced tree, opaque here
    contributors: tuple[str, ...]
    sampler: dict[str, Any]


# --- actions -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HandOut:
    """Train on `indices`: this worker's slice of step `step`'s global batch."""

    step: int
    indices: np.ndarray


@dataclass(frozen=True)
class Committed:
    """Step `step` is committed: its ledger row (the slices of the members whose gradients are in it)."""

    step: int
    epoch: int
    generation: int
    slices: dict[str, np.ndarray]

    def row(self, t: float) -> dict[str, Any]:
        """The ledger line (`run --ledger`); `t` is the wall clock, which the shell owns."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "gen": self.generation,
            "t": t,
            "slices": {m: v.tolist() for m, v in self.slices.items()},
        }


@dataclass(frozen=True)
class ShareResult:
    """Broadcast the kept reduction of step `step` to the members behind; every member takes part."""

    step: int
    source: bool  # this member sends its kept result (and its metadata)
    take: bool  # this member is behind: what it receives is its all-reduce's result (`Take`)


@dataclass(frozen=True)
class SendState:
    """Broadcast the full training state from the plan's source; every member takes part."""

    source: bool  # this member sends
    adopt: bool  # this member adopts what it receives


@dataclass(frozen=True)
class AddZeros:
    """Add zeros at weight 0 to the pinned reduction of step `step` (this worker had no slice in it)."""

    step: int
    wire: str


RecoveryAction = ShareResult | SendState


@dataclass(frozen=True)
class LocalStep:
    """A step of a local-SGD interval as it was handed out: every member's slice of it (by the shares
    of the generation that sliced it), whether or not that member's delta reaches the sync."""

    step: int
    epoch: int
    slices: dict[str, np.ndarray]


@dataclass(frozen=True)
class StepClosed:
    """A step boundary closed the open step."""

    had_reduction: bool  # False: a step without an all-reduce (committed by the boundary: `committed`)
    committed: Committed | None


@dataclass(frozen=True)
class Take:
    """A member behind returns another member's completed reduction instead of redoing it."""

    result: Any
    contributors: tuple[str, ...]
    sampler: dict[str, Any]

    @classmethod
    def of(cls, result: Any, meta: Mapping[str, Any]) -> Take:
        """From the received tree and `LastResult` metadata."""
        return cls(result, tuple(meta["contributors"]), meta["sampler"])


def share_vector(size: int, rank: int, rate: float | None, factor: float, cap: int) -> np.ndarray:
    """This member's (speed, power factor, memory cap) for the share swap: zero but its 3 slots, so
    the sum over members gathers all (+1 on factor and cap: zero reads as "unknown")."""
    vec = np.zeros(size * 3, np.float32)
    vec[3 * rank : 3 * rank + 3] = [rate or 0.0, factor + 1.0, cap + 1.0]
    return vec


class Stepper:
    """One worker's step bookkeeping (see the module docstring)."""

    def __init__(self, member: str, *, joiner: bool = False, share_mode: str = DEFAULT_SHARE_MODE) -> None:
        self.member = member
        self.share_mode = share_mode
        self.committed = 0
        self.gen = -1  # the current ring's generation (-1: none formed yet)
        self.roster: tuple[str, ...] = ()  # its members, in rank order
        self.history: dict[int, tuple[str, ...]] = {}
        self.weights: dict[int, dict[str, float]] = {}  # per generation: the shares its steps use
        self.sampler: StepSampler | None = None
        self.has_state = not joiner
        self.joined_gen = -1
        self.last: LastResult | None = None
        self.open: OpenStep | None = None
        self.pinned: tuple[int, int] | None = None  # (step, generation) whose shares slice that step
        self.state_due: RecoveryPlan | None = None  # a state broadcast owed at a later boundary
        self.rebalance_due = False
        self.share_reason = ""
        self.missed_epoch = False  # the last `batches` call's epoch ended before this worker took part
        self.verify_gen: int | None = None  # the generation whose first step reduction checks digests

    # --- generations ---------------------------------------------------------------------------
    def formed(self, generation: int, members: tuple[str, ...]) -> None:
        """A ring of `members` (rank order) formed as `generation`."""
        self.gen, self.roster = generation, members
        self.history[generation] = members

    def weights_of(self, generation: int, members: tuple[str, ...]) -> dict[str, float]:
        """The shares of a generation's steps: equal until measured speeds re-balance them."""
        weights = self.weights.get(generation)
        if weights is None or tuple(weights) != members:
            weights = self.weights[generation] = {m: 1.0 / len(members) for m in members}
        return weights

    def my_share(self) -> float:
        return self.weights_of(self.gen, self.roster).get(self.member, 0.0)

    # --- the data ------------------------------------------------------------------------------
    def start_epoch(self, n_samples: int, batch_size: int, seed: int, epoch: int) -> None:
        """`mesh.batches(n_samples, batch_size, epoch=, seed=)` was called."""
        if self.sampler is None:
            self.sampler = StepSampler(n_samples, batch_size, seed)
        elif (self.sampler.dataset_size, self.sampler.global_batch, self.sampler.seed) != (
            n_samples,
            batch_size,
            seed,
        ):
            raise UserError(
                "mesh.batches: the data set size, batch size and seed must not change between epochs"
            )
        sampler = self.sampler
        if epoch > sampler.epoch and sampler.cursor == 0 and len(sampler.carry) == 0:
            sampler.epoch = epoch  # the script skipped epochs (a resumed loop, say)

    def epoch_done(self, epoch: int, yielded: bool) -> bool:
        """Whether `epoch` is over (or was, before this worker joined: then its evaluation is not ours)."""
        assert self.sampler is not None
        if self.sampler.epoch == epoch:
            return False
        self.missed_epoch = not yielded and epoch < self.sampler.epoch
        return True

    def registered(self, check: bool) -> None:
        """`mesh.register` ran; `check`: this member starts on a ring with the state, so the first
        step reduction of this generation compares the replicas' digests first (`verify_now`)."""
        self.verify_gen = self.gen if check else None

    def verify_now(self) -> bool:
        """Whether the replicas' digests are to be compared now: once, in the generation `register`
        named (a generation change first means a recovery plan compared them instead)."""
        if self.verify_gen is not None and self.verify_gen == self.gen:
            self.verify_gen = None
            return True
        return False

    def step_generation(self) -> int:
        """Whose shares slice the next step: the generation it is pinned to (an interrupted step being
        finished), else the current ring's. A pin for an earlier step is stale and ignored."""
        if self.pinned is not None and self.pinned[0] == self.committed:
            return self.pinned[1]
        return self.gen

    def hand_out(self, epoch: int) -> HandOut:
        """Open step `committed`: this worker's slice of its global batch, by the shares of its generation."""
        assert self.sampler is not None
        generation = self.step_generation()
        shares = self.history[generation] if generation != self.gen else self.roster
        weights = self.weights_of(generation, shares)
        self.pinned = None
        mine = self.sampler.assignment(weights).get(self.member)
        count = len(mine) if mine is not None else 0
        self.open = OpenStep(self.committed, generation, shares, epoch, weights, count)
        self.missed_epoch = False
        return HandOut(self.committed, mine if mine is not None else np.empty(0, np.int64))

    def in_step_reduction(self) -> bool:
        """Whether the next all-reduce is the open step's (the first after its batch was handed out)."""
        return self.open is not None and not self.open.reduced

    # --- commits -------------------------------------------------------------------------------
    def commit(
        self, result: Any, contributors: tuple[str, ...], sampler_state: dict[str, Any] | None = None
    ) -> Committed:
        """Step `committed` is done with the gradients of `contributors` (the slices of the others are
        carried into the next step), or, with `sampler_state`, taken from a member that completed it."""
        assert self.open is not None and self.sampler is not None
        step, epoch = self.committed, self.sampler.epoch
        assignment = self.sampler.assignment(self.open.weights)
        used = {m: assignment[m] for m in self.open.members if m in contributors}
        if sampler_state is not None:
            self.sampler.load(sampler_state)
            if self.sampler.epoch != epoch:
                self.rebalance_due = True  # the step taken from another member ended the epoch
            self._counted()
        else:
            lost = [assignment[m] for m in self.open.members if m not in contributors]
            self._advance(np.concatenate(lost) if lost else ())
        if result is not None:
            self.last = LastResult(step, result, contributors, self.sampler.to_dict())
        return Committed(step, epoch, self.gen, used)

    def _advance(self, carried: Any) -> None:
        """The sampler moves past the open step, carrying `carried` into the next one; count it."""
        assert self.sampler is not None
        if self.sampler.commit(carried):
            self.rebalance_due = True  # an epoch ended: every member re-balances at this boundary
        self._counted()

    def _counted(self) -> None:
        """The open step is committed: the global step moves on."""
        assert self.open is not None
        self.committed += 1
        self.open.reduced = True
        if self.share_mode == PERF:
            from meshtrain.train.shares import rebalance_due

            # every CHECK_EVERY steps too (the flag travels in the state a joiner receives)
            self.rebalance_due = rebalance_due(self.committed, self.rebalance_due)

    def reduced(self, result: Any) -> Committed:
        """The open step's reduction completed on the current ring: its members still here contributed."""
        assert self.open is not None
        return self.commit(result, tuple(m for m in self.open.members if m in self.roster))

    def take(self, taken: Take) -> Committed:
        """This member was behind and took `taken` (another member's completed reduction)."""
        return self.commit(taken.result, taken.contributors, taken.sampler)

    def close_step(self) -> StepClosed | None:
        """A step boundary: the open step is closed; one that had no reduction (a local step, nothing
        to reduce) is committed now. None when no step was open."""
        opened = self.open
        if opened is None:
            return None
        had_reduction = opened.reduced
        done = None if had_reduction else self.commit(None, opened.members)
        self.open = None
        return StepClosed(had_reduction, done)

    def due_state(self) -> SendState | None:
        """The pinned step's hand-over, owed at the boundary after it (a member behind first takes the
        step before it and finishes the pinned one: it gets here one boundary later)."""
        plan = self.state_due
        if plan is not None and self.committed == plan.target + 1:
            self.state_due = None
            return self._hand_over(plan)
        return None

    def zero_due(self) -> tuple[AddZeros, SendState] | None:
        """A worker that had no slice in the pinned step (a joiner, just formed into the ring) adds
        zeros to its reduction, then takes part in the hand-over of the state."""
        plan = self.state_due
        if plan is not None and self.member in plan.zero:
            self.state_due = None
            return AddZeros(plan.target, plan.wire or "float32"), self._hand_over(plan)
        return None

    def _hand_over(self, plan: RecoveryPlan) -> SendState:
        return SendState(source=self.member == plan.state_source, adopt=self.member in plan.zero)

    # --- local SGD (meshtrain.worker.local_rounds) ------------------------------------------------
    def local_step(self) -> LocalStep | None:
        """The open step, not committed yet, with every member's slice (None: none open)."""
        opened, sampler = self.open, self.sampler
        if opened is None or sampler is None or opened.reduced:
            return None
        assignment = sampler.assignment(opened.weights)
        return LocalStep(self.committed, sampler.epoch, {m: assignment[m] for m in opened.members})

    def epoch_ends(self) -> bool:
        """Whether the open step, not committed yet, is its epoch's last (local SGD syncs there)."""
        s, opened = self.sampler, self.open
        if s is None or opened is None or opened.reduced:
            return False
        take, fresh = s._parts()
        return s.cursor + fresh >= s.dataset_size and len(s.carry) - take == 0

    def advance(self, orphans: np.ndarray) -> bool:
        """Commit the open step in the sampler without a reduction of its own, carrying `orphans` (the
        slices of an interval's members whose deltas are not in its sync) into the next step. With no
        step open, or it committed already (a sync after the boundary closed it), the orphans are
        only carried. Whether a step was committed."""
        if self.open is None or self.open.reduced:
            if self.sampler is not None and len(orphans):
                self.sampler.carry = np.concatenate([self.sampler.carry, np.asarray(orphans, np.int64)])
            return False
        self._advance(orphans)
        return True

    def commit_interval(self, steps: Sequence[LocalStep], contributors: Collection[str]) -> list[Committed]:
        """A local-SGD interval's sync completed with the deltas of `contributors`: `steps` (the
        interval's steps closed so far) and the open one, its last, are committed. Their ledger rows
        name the contributors' slices; every other member's slices of every step are carried into
        the next steps, so each sample is still trained on exactly once per epoch."""
        last = self.local_step()
        done = [*steps, last] if last is not None else list(steps)
        self.advance(_orphans(done, contributors))
        return self._interval_rows(done, contributors)

    def commit_closed(self, steps: Sequence[LocalStep], contributors: Collection[str]) -> list[Committed]:
        """An interval whose steps are all closed already (its sync ran in the background while the
        next steps were handed out) is committed: rows as `commit_interval`'s, and the orphans go to
        the sampler's carry, handed out first by the next steps (no open step is committed here)."""
        orphans = _orphans(steps, contributors)
        if self.sampler is not None and len(orphans):
            self.sampler.carry = np.concatenate([self.sampler.carry, orphans])
        return self._interval_rows(steps, contributors)

    def _interval_rows(self, steps: Sequence[LocalStep], contributors: Collection[str]) -> list[Committed]:
        return [
            Committed(s.step, s.epoch, self.gen, {m: v for m, v in s.slices.items() if m in contributors})
            for s in steps
        ]

    def drop_state(self) -> None:
        """What this worker holds is not the job's state any more (a local-SGD plan left it out of the
        sync): it takes no batch until it adopts the state again."""
        self.has_state = False

    def open_adopted(self) -> None:
        """The state just adopted already holds the open step's update: it is not committed again."""
        if self.open is not None:
            self.open.reduced = True

    # --- recovery ------------------------------------------------------------------------------
    def status(self, digest: str, pending: bool, wire: str) -> MemberStatus:
        """This member's position as it enters a new generation (`pending`: inside the step reduction)."""
        return MemberStatus(
            member=self.member,
            committed=self.committed,
            digest=digest,
            pending=pending,
            has_last=self.last is not None and self.last.step == self.committed - 1,
            slice_gen=self.open.generation if (pending and self.open is not None) else -1,
            joined_gen=self.joined_gen,
            wire=wire,
        )

    def plan(self, statuses: Sequence[MemberStatus]) -> tuple[RecoveryPlan, list[RecoveryAction]]:
        """The plan every member computes from the swapped statuses and this member's part in it, in
        order; raises Unrecoverable. Call `followed` once the actions are carried out."""
        plan = plan_recovery(statuses)
        actions: list[RecoveryAction] = []
        if plan.behind:
            actions.append(
                ShareResult(plan.target - 1, self.member == plan.r_source, self.member in plan.behind)
            )
        if plan.state_now and plan.stale:
            actions.append(SendState(self.member == plan.state_source, self.member in plan.stale))
        return plan, actions

    def last_meta(self) -> dict[str, Any] | None:
        """The metadata sent with the kept reduction (its `LastResult`, result blanked)."""
        return self.last.__dict__ | {"result": None} if self.last is not None else None

    def followed(self, plan: RecoveryPlan) -> None:
        """The plan's broadcasts are done: pin its step to the shares it was handed out with, and owe
        the state to the members without it at the boundary after that step."""
        if plan.pinned_gen is not None and plan.pinned_gen in self.history:
            self.pinned = (plan.target, plan.pinned_gen)
        self.state_due = plan if plan.zero else None  # sent when `committed` reaches plan.target + 1

    # --- state ---------------------------------------------------------------------------------
    def meta(self, metrics: Mapping[str, float], resumed_from: int | None) -> dict[str, Any]:
        """What travels with the model state (to a joiner, into a checkpoint)."""
        return {
            "committed": self.committed,
            **({"sampler": self.sampler.to_dict()} if self.sampler is not None else {}),
            "generation": self.gen,
            "members": list(self.roster),
            "history": {str(g): list(m) for g, m in self.history.items()},
            "weights": {str(g): w for g, w in self.weights.items()},
            "rebalance_due": self.rebalance_due,
            "metrics": dict(metrics),
            "resumed_from": resumed_from,
        }

    def adopt(self, meta: Mapping[str, Any], *, joined: bool = False) -> None:
        """Another member's (or a checkpoint's) `meta` with its state; `joined`: from the ring, now."""
        self.committed = int(meta["committed"])
        if self.sampler is not None and "sampler" in meta:
            self.sampler.load(meta["sampler"])
        elif "sampler" in meta:
            s = meta["sampler"]
            self.sampler = StepSampler(s["dataset_size"], s["global_batch"], s["seed"])
            self.sampler.load(s)
        for g, members in (meta.get("history") or {}).items():
            self.history.setdefault(int(g), tuple(members))
        for g, weights in (meta.get("weights") or {}).items():
            self.weights[int(g)] = {str(m): float(w) for m, w in weights.items()}
        self.rebalance_due = bool(meta.get("rebalance_due"))
        self.has_state = True
        self.last = None
        if joined:
            self.joined_gen = self.gen

    # --- shares --------------------------------------------------------------------------------
    def begin_rebalance(self) -> None:
        """This boundary re-plans the shares (`replan` follows, unless there is nothing to re-plan:
        equal shares, a ring of one, a broken ring): the flag is spent either way."""
        self.rebalance_due = False

    def replan(self, summed: np.ndarray, reason: str) -> None:
        """The members' summed `share_vector`s are here: every member applies the same new shares to
        this generation from the next step on (`reason`: this member's power note)."""
        from meshtrain.train.shares import drift_band, plan_shares

        roster = self.roster
        rows = np.asarray(summed).reshape(len(roster), 3)
        caps = {m: (int(round(r[2])) - 1 if r[2] >= 1 else None) for m, r in zip(roster, rows, strict=True)}
        rates = {m: (float(r[0]) if r[0] > 0 else None) for m, r in zip(roster, rows, strict=True)}
        factors = {
            m: (max(0.0, float(r[1]) - 1.0), reason if m == self.member else "")
            for m, r in zip(roster, rows, strict=True)
        }
        current = self.weights_of(self.gen, roster)
        batch = self.sampler.global_batch if self.sampler is not None else None
        epoch_ended = self.sampler is not None and self.sampler.cursor == 0  # the same on every member
        band = drift_band(self.committed, epoch_ended)
        try:
            decision = plan_shares(rates, current, factors=factors, caps=caps, global_batch=batch, drift=band)
        except ValueError as exc:  # the caps cannot hold the batch: keep the shares, say why
            self.share_reason = str(exc)[:40]
            return
        if decision.changed:
            self.weights[self.gen] = dict(decision.shares)
        self.share_reason = decision.reasons.get(self.member, "")


def _orphans(steps: Sequence[LocalStep], contributors: Collection[str]) -> np.ndarray:
    """The slices of `steps` whose members' deltas are not in the sync (trained again)."""
    lost = [v for s in steps for m, v in s.slices.items() if m not in contributors]
    return np.concatenate(lost).astype(np.int64) if lost else np.empty(0, np.int64)
