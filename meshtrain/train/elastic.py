"""The elastic step loop as a pure state machine: events in, actions out.

The worker runtime owns the ring, the model and the sockets; it feeds this
controller what happened and does what it is told:

    ctl = ElasticController("node-a", min_nodes=2)
    actions = ctl.handle(MembershipChanged(live))       # from gossip, at any time
    for action in actions: ...                            # FormRing, GatherStates, SendState, ...

A generation's life: FormRing -> (RingFormed) -> GatherStates ->
(StatesGathered) -> SendState/ReceiveState for members behind ->
(StateSent/StateReceived) -> RedoStep for an interrupted reduction nobody
committed, or RunStep -> (StepCommitted) -> RunStep ... A RingLost at any
point (PeerLost, a failed handshake, members that formed different rosters)
forms the next generation from the newest membership view; fewer live
workers than `min_nodes` pauses until enough return. Membership changes that
arrive while a step is in flight wait for its end (or for the ring to
break): membership changes never move the cursor, only step boundaries do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from meshtrain.train.generation import Candidate, MemberState, Roster, StatePlan, next_roster, plan_state

__all__ = [
    "Phase",
    "ElasticController",
    # events
    "MembershipChanged",
    "RingFormed",
    "RingLost",
    "StatesGathered",
    "StateSent",
    "StateReceived",
    "StepCommitted",
    # actions
    "FormRing",
    "GatherStates",
    "SendState",
    "ReceiveState",
    "RedoStep",
    "RunStep",
    "Pause",
]


class Phase(Enum):
    PAUSED = "paused"  # fewer live workers than min_nodes
    FORMING = "forming"  # connecting the ring of a new generation
    SYNCING = "syncing"  # swapping (step, digest), transferring state
    TRAINING = "training"  # a step (or a redo) is in flight
    IDLE = "idle"  # between steps (only visible from outside between handle calls)


# --- events ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MembershipChanged:
    live: tuple[Candidate, ...]  # the job's live workers, this one included


@dataclass(frozen=True)
class RingFormed:
    generation: int


@dataclass(frozen=True)
class RingLost:
    generation: int
    reason: str = ""


@dataclass(frozen=True)
class StatesGathered:
    generation: int
    states: tuple[MemberState, ...]


@dataclass(frozen=True)
class StateSent:
    generation: int
    to: str


@dataclass(frozen=True)
class StateReceived:
    generation: int
    step: int
    digest: str  # state_digest of what arrived, computed by the receiver
    redo_shares: Mapping[str, float] | None = None  # the sender's ctl.redo_shares() (put them in the meta)


@dataclass(frozen=True)
class StepCommitted:
    generation: int
    step: int  # the step whose update was applied (the controller's step becomes step + 1)


Event = MembershipChanged | RingFormed | RingLost | StatesGathered | StateSent | StateReceived | StepCommitted

# --- actions ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FormRing:
    """Close the old ring; Ring.connect(listener, rank, roster.addrs, job, roster.generation)."""

    roster: Roster
    rank: int


@dataclass(frozen=True)
class GatherStates:
    """gather_states(ring, roster, MemberState(me, step, state_digest(state, step), pending, fingerprint))."""

    roster: Roster
    step: int
    pending: tuple[int, int] | None


@dataclass(frozen=True)
class SendState:
    """send_state to `to` (params, optimizer state, meta: step and sampler state)."""

    generation: int
    to: str


@dataclass(frozen=True)
class ReceiveState:
    """recv_state from `source`; adopt tree, step and sampler state; report StateReceived."""

    generation: int
    source: str


@dataclass(frozen=True)
class RedoStep:
    """Redo the interrupted reduction of `step`.

    Contributing members keep the gradients of their old slice and also compute
    the slice `sampler.reassign_orphans(old_shares, survivors)[me]` (the lost
    members' indices); they all-reduce the combined gradient with weight = the
    number of samples. Non-contributing members (joined since) all-reduce zeros
    with weight 0. Then every member applies the update and reports StepCommitted.
    The step's whole assignment (for the ledger) is, for each survivor m,
    `assignment(old_shares)[m]` + `reassign_orphans(old_shares, survivors)[m]`;
    `old_shares` is empty only for a member that neither formed the interrupted
    generation nor was handed its shares (StateReceived.redo_shares).
    """

    generation: int
    step: int
    contribute: bool
    old_shares: Mapping[str, float]
    survivors: Mapping[str, float]


@dataclass(frozen=True)
class RunStep:
    """Compute gradients on `sampler.slice_for(me, shares)`, all-reduce, apply, advance the sampler."""

    generation: int
    step: int
    shares: Mapping[str, float]


@dataclass(frozen=True)
class Pause:
    """Stop training (the live view says why) until enough workers are live again."""

    live: int
    needed: int


Action = FormRing | GatherStates | SendState | ReceiveState | RedoStep | RunStep | Pause


@dataclass
class _Sync:
    """Transfers this member still waits for in the current generation."""

    plan: StatePlan
    sends: set[str] = field(default_factory=set)
    receive_from: str | None = None


class ElasticController:
    """One member's view of its job's generations and steps (no I/O, no clock)."""

    def __init__(self, member: str, *, min_nodes: int = 1, step: int = 0, generation: int = -1) -> None:
        if min_nodes < 1:
            raise ValueError("min_nodes must be at least 1")
        self.member = member
        self.min_nodes = min_nodes
        self.step = step  # steps committed
        # the newest generation whose ring this member *formed*: publish it in gossip (Candidate.generation).
        # Attempts do not count, so every member computes the next number from the view alone and
        # retries after a failed handshake do not chase each other upwards.
        self.generation = generation
        self.roster: Roster | None = None
        self.phase = Phase.PAUSED
        self.pending: tuple[int, int] | None = None  # (step, generation) of gradients held, not committed
        self._shares_by_generation: dict[int, dict[str, float]] = {}  # rosters formed or heard of, newest few
        self.plan: StatePlan | None = None
        self._live: tuple[Candidate, ...] = ()
        self._sync: _Sync | None = None
        self._in_flight = False
        self._view_changed = False

    # --- the one entry point ------------------------------------------------------------------
    def handle(self, event: Event) -> list[Action]:
        if isinstance(event, MembershipChanged):
            return self._membership(event)
        if getattr(event, "generation", None) != (self.roster.generation if self.roster else None):
            return []  # an echo from a generation this member has left behind
        if isinstance(event, RingLost):
            return self._reform()
        if isinstance(event, RingFormed) and self.phase is Phase.FORMING:
            assert self.roster is not None
            self.generation = self.roster.generation
            self.phase = Phase.SYNCING
            return [GatherStates(self.roster, self.step, self.pending)]
        if isinstance(event, StatesGathered) and self.phase is Phase.SYNCING:
            return self._plan(event.states)
        if isinstance(event, StateSent) and self._sync is not None:
            self._sync.sends.discard(event.to)
            return self._after_sync()
        if isinstance(event, StateReceived) and self._sync is not None:
            return self._received(event)
        if isinstance(event, StepCommitted) and self._in_flight and event.step == self.step:
            return self._committed()
        return []

    @property
    def pending_shares(self) -> dict[str, float]:
        """The shares of the generation whose step this member holds gradients of."""
        return dict(self._shares_by_generation.get(self.pending[1], {})) if self.pending else {}

    def redo_shares(self) -> dict[str, float] | None:
        """For SendState's meta: the shares of the interrupted generation this plan redoes, if known.

        A receiver that was not in that generation needs them to log (and check)
        the redo's slices; pass them on as StateReceived.redo_shares.
        """
        if self.plan is None or self.plan.redo is None:
            return None
        shares = self._shares_by_generation.get(self.plan.redo[1])
        return dict(shares) if shares is not None else None

    # --- membership ---------------------------------------------------------------------------
    def _membership(self, event: MembershipChanged) -> list[Action]:
        if self.member not in {c.member for c in event.live}:
            raise ValueError(f"the membership view given to {self.member} does not include it")
        self._live = tuple(event.live)
        if self.roster is not None and self._wanted() == self._current_key():
            return []  # a flap that healed, or nothing that concerns the ring
        if self._in_flight or self.phase is Phase.SYNCING or self.phase is Phase.FORMING:
            self._view_changed = True  # at the step boundary, or when the ring breaks / the plan fails
            return []
        return self._reform()

    def _wanted(self) -> tuple[tuple[str, tuple[str, int], float], ...]:
        return tuple(sorted((c.member, c.addr, c.weight) for c in self._live))

    def _current_key(self) -> tuple[tuple[str, tuple[str, int], float], ...]:
        assert self.roster is not None
        return tuple(sorted(zip(self.roster.members, self.roster.addrs, self.roster.weights, strict=True)))

    def _reform(self) -> list[Action]:
        """Form the next generation from the newest view (or pause below min_nodes)."""
        self._in_flight = False
        self._sync = None
        self._view_changed = False
        self.plan = None
        if len(self._live) < self.min_nodes:
            self.phase = Phase.PAUSED
            self.roster = None
            return [Pause(len(self._live), self.min_nodes)]
        self.roster = next_roster(self.generation, self._live)
        self._shares_by_generation[self.roster.generation] = self.roster.shares
        for old in sorted(self._shares_by_generation)[:-16]:
            del self._shares_by_generation[old]
        self.phase = Phase.FORMING
        return [FormRing(self.roster, self.roster.rank_of(self.member))]

    # --- agreeing on state --------------------------------------------------------------------
    def _plan(self, states: Sequence[MemberState]) -> list[Action]:
        assert self.roster is not None
        plan = plan_state(self.roster, states)
        if not plan.agreed:
            return self._reform()  # views differed; the next view decides (the runtime backs off a little)
        self.plan = plan
        if self.pending is not None and plan.redo != self.pending:
            self.pending = None  # someone committed that step (we are behind) or nobody can redo it
        sync = _Sync(plan, set(plan.receivers_of(self.member)), plan.source_of(self.member))
        self._sync = sync
        actions: list[Action] = [SendState(plan.generation, to) for to in sorted(sync.sends)]
        if sync.receive_from is not None:
            actions.append(ReceiveState(plan.generation, sync.receive_from))
        return actions + self._after_sync()

    def _received(self, event: StateReceived) -> list[Action]:
        assert self._sync is not None
        plan = self._sync.plan
        if (event.step, event.digest) != (plan.target_step, plan.target_digest):
            return self._reform()  # the source moved on or the bytes were wrong: agree again
        self.step = event.step
        self.pending = None
        if plan.redo is not None and event.redo_shares:
            self._shares_by_generation[plan.redo[1]] = dict(event.redo_shares)  # to know the redo's slices
        self._sync.receive_from = None
        return self._after_sync()

    def _after_sync(self) -> list[Action]:
        assert self._sync is not None and self.roster is not None
        if self._sync.sends or self._sync.receive_from is not None:
            return []
        plan = self._sync.plan
        self._sync = None
        if self._view_changed:
            return self._reform()
        self._in_flight = True
        self.phase = Phase.TRAINING
        if plan.redo is not None:
            redo_step, redo_generation = plan.redo
            old = dict(self._shares_by_generation.get(redo_generation, {}))
            survivors = {m: old.get(m, 1.0) for m in plan.redo_members}
            contribute = self.member in plan.redo_members  # the others add zeros with weight 0
            return [RedoStep(plan.generation, redo_step, contribute, old, survivors)]
        return self._run_step()

    # --- steps --------------------------------------------------------------------------------
    def _run_step(self) -> list[Action]:
        assert self.roster is not None
        self._in_flight = True
        self.phase = Phase.TRAINING
        self.pending = (self.step, self.roster.generation)
        return [RunStep(self.roster.generation, self.step, self.roster.shares)]

    def _committed(self) -> list[Action]:
        self.step += 1
        self.pending = None
        self._in_flight = False
        self.phase = Phase.IDLE
        if self._view_changed or (self._live and self._wanted() != self._current_key()):
            return self._reform()  # admit joiners / drop leavers / re-balance at the step boundary
        return self._run_step()
