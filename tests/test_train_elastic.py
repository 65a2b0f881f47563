"""The elastic controller: unit behaviour, and a lockstep world of controllers with random kills and joins.

The world plays the runtime: it carries out the controllers' actions with
real GlobalSamplers and SampleLedgers and a toy model whose update is the sum
of the consumed indices, so the final model equals an undisturbed run's only
if every index was consumed exactly once, whatever was killed when.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrain.train.elastic import (
    ElasticController,
    FormRing,
    GatherStates,
    MembershipChanged,
    Pause,
    Phase,
    ReceiveState,
    RedoStep,
    RingFormed,
    RingLost,
    RunStep,
    SendState,
    StateReceived,
    StateSent,
    StatesGathered,
    StepCommitted,
)
from meshtrain.train.generation import Candidate, MemberState
from meshtrain.train.sampler import GlobalSampler, SampleLedger

DATASET, BATCH, SEED = 97, 10, 5
MOD = (1 << 61) - 1


def cand(name: str, ctl: ElasticController | None = None) -> Candidate:
    return Candidate(name, ("127.0.0.1", 1000 + int(name[1:])), ctl.generation if ctl else -1, 1.0)


def formed(actions: list[Any]) -> FormRing:
    (action,) = actions
    assert isinstance(action, FormRing)
    return action


def test_pauses_below_min_nodes_and_resumes_when_enough_return() -> None:
    ctl = ElasticController("n1", min_nodes=2)
    assert ctl.handle(MembershipChanged((cand("n1"),))) == [Pause(1, 2)]
    assert ctl.phase is Phase.PAUSED
    form = formed(ctl.handle(MembershipChanged((cand("n1"), cand("n2")))))
    assert form.roster.members == ("n1", "n2") and form.rank == 0
    assert form.roster.generation == 0 and ctl.phase is Phase.FORMING


def test_a_healed_flap_changes_nothing_and_stale_events_are_ignored() -> None:
    ctl = ElasticController("n1")
    view = (cand("n1"), cand("n2"))
    form = formed(ctl.handle(MembershipChanged(view)))
    assert ctl.handle(MembershipChanged(view)) == []  # same view again: no new generation
    assert ctl.handle(RingLost(form.roster.generation - 1)) == []  # an echo of an older generation
    (gather,) = ctl.handle(RingFormed(form.roster.generation))
    assert isinstance(gather, GatherStates) and gather.pending is None


def test_loss_mid_step_redoes_the_reduction_with_orphans_reassigned() -> None:
    ctl = ElasticController("n1")
    form = formed(ctl.handle(MembershipChanged((cand("n1"), cand("n2"), cand("n3")))))
    g = form.roster.generation
    ctl.handle(RingFormed(g))
    fp = form.roster.fingerprint
    (run,) = ctl.handle(
        StatesGathered(g, tuple(MemberState(m, 0, "a" * 32, None, fp) for m in ("n1", "n2", "n3")))
    )
    assert isinstance(run, RunStep) and run.step == 0
    # n3 dies in the all-reduce; gossip has not noticed yet: the ring's PeerLost comes first
    assert ctl.handle(MembershipChanged((cand("n1", ctl), cand("n2", ctl)))) == []
    form2 = formed(ctl.handle(RingLost(g, "n3 reset")))
    assert form2.roster.members == ("n1", "n2") and form2.roster.generation == g + 1
    ctl.handle(RingFormed(g + 1))
    fp2 = form2.roster.fingerprint
    states = tuple(MemberState(m, 0, "a" * 32, (0, g), fp2) for m in ("n1", "n2"))
    (redo,) = ctl.handle(StatesGathered(g + 1, states))
    assert isinstance(redo, RedoStep) and redo.contribute and redo.step == 0
    assert dict(redo.old_shares) == {"n1": 1.0, "n2": 1.0, "n3": 1.0} and set(redo.survivors) == {"n1", "n2"}
    (nxt,) = ctl.handle(StepCommitted(g + 1, 0))
    assert isinstance(nxt, RunStep) and nxt.step == 1 and ctl.step == 1


# --- a lockstep world of controllers -------------------------------------------------------------------


@dataclass
class Node:
    name: str
    ctl: ElasticController
    sampler: GlobalSampler
    value: int = 0
    ledger: SampleLedger = field(default_factory=SampleLedger)
    waiting: Any = None  # the collective action it is blocked in
    inbox: list[Any] = field(default_factory=list)


def digest(node: Node) -> str:
    return hashlib.blake2b(repr((node.ctl.step, node.value)).encode(), digest_size=16).hexdigest()


def undisturbed(steps: int) -> int:
    sampler, value = GlobalSampler(DATASET, BATCH, SEED), 0
    for _ in range(steps):
        value = (value * 31 + int(sampler.global_batch_indices().sum())) % MOD
        sampler.advance()
    return value


class World:
    def __init__(self, n: int, rng: random.Random, min_nodes: int = 1, mid_step_kills: bool = True) -> None:
        self.rng, self.min_nodes, self.mid_step_kills = rng, min_nodes, mid_step_kills
        self.nodes: dict[str, Node] = {}
        self.next_id = 0
        self.broken: set[int] = set()  # generations whose ring a death broke
        for _ in range(n):
            self.add()
        self.gossip()

    def add(self) -> Node:
        name = f"n{self.next_id}"
        self.next_id += 1
        node = Node(
            name, ElasticController(name, min_nodes=self.min_nodes), GlobalSampler(DATASET, BATCH, SEED)
        )
        self.nodes[name] = node
        return node

    def gossip(self) -> None:
        live = tuple(cand(n.name, n.ctl) for n in self.nodes.values())
        for node in list(self.nodes.values()):
            self.deliver(node, node.ctl.handle(MembershipChanged(live)))

    def kill(self) -> None:
        victim = self.rng.choice(sorted(self.nodes))
        gen = self.nodes[victim].ctl.generation
        del self.nodes[victim]
        self.broken.add(gen)

    def deliver(self, node: Node, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Pause):
                node.waiting = None
            else:
                node.waiting = action if not isinstance(action, SendState) else node.waiting
                node.inbox.append(action)

    def tell(self, node: Node, event: Any) -> None:
        if node.name in self.nodes:
            node.inbox = [a for a in node.inbox if not _done_by(a, event)]
            self.deliver(node, node.ctl.handle(event))

    def settle(self) -> bool:
        """Carry out one round of collective actions; False when nothing could progress."""
        progressed = False
        by_gen: dict[int, list[Node]] = {}
        for node in self.nodes.values():
            if node.ctl.roster is not None and node.inbox:
                by_gen.setdefault(node.ctl.roster.generation, []).append(node)
        for gen, nodes in by_gen.items():
            roster = nodes[0].ctl.roster
            assert roster is not None
            members = [self.nodes.get(m) for m in roster.members]
            alive = all(m is not None for m in members)
            together = alive and all(m is not None and m.ctl.roster == roster for m in members)
            if not together:  # a member is dead or formed another roster: the handshake fails for the others
                if any(m is None for m in members) or any(
                    m is not None and m.ctl.roster != roster for m in members
                ):
                    for node in nodes:
                        self.tell(node, RingLost(gen, "handshake failed"))
                    progressed = True
                    if self.rng.random() < 0.5:
                        self.gossip()  # the membership view catches up (after a few failed handshakes)
                continue
            progressed |= self.collective(gen, [m for m in members if m is not None])
        return progressed

    def collective(self, gen: int, members: list[Node]) -> bool:
        heads = [m.inbox[0] if m.inbox else None for m in members]
        if all(isinstance(h, FormRing) for h in heads):
            for m in members:
                self.tell(m, RingFormed(gen))
            return True
        if all(isinstance(h, GatherStates) for h in heads):
            fp = members[0].ctl.roster.fingerprint  # type: ignore[union-attr]
            states = tuple(MemberState(m.name, m.ctl.step, digest(m), m.ctl.pending, fp) for m in members)
            for m in members:
                self.tell(m, StatesGathered(gen, states))
            return True
        for m in members:  # point-to-point transfers
            for a in list(m.inbox):
                if isinstance(a, ReceiveState):
                    src = self.nodes[a.source]
                    if any(isinstance(b, SendState) and b.to == m.name for b in src.inbox):
                        m.value, m.sampler = src.value, GlobalSampler.from_state(src.sampler.state)
                        m.ledger = SampleLedger.from_rows(
                            src.ledger.to_rows()
                        )  # the debug ledger travels in meta
                        step = src.ctl.step
                        self.tell(src, StateSent(gen, m.name))
                        m.ctl.step = m.ctl.step  # the controller learns the step from the event
                        shares = src.ctl.redo_shares()
                        self.tell(m, StateReceived(gen, step, digest_as(step, m.value), shares))
                        return True
        if all(isinstance(h, (RunStep, RedoStep)) for h in heads):
            return self.step(gen, members, heads)
        return False

    def step(self, gen: int, members: list[Node], heads: list[Any]) -> bool:
        if gen in self.broken:
            for m in members:
                self.tell(m, RingLost(gen, "peer died"))
            return True
        ref = members[0].sampler

        def assignment_of(action: Any) -> dict[str, np.ndarray]:
            """What this member believes the step consumed (each member works it out on its own)."""
            if isinstance(action, RunStep):
                return ref.assignment(action.shares)
            held = ref.assignment(action.old_shares)
            extra = ref.reassign_orphans(action.old_shares, action.survivors)
            return {m: np.concatenate([held[m], extra[m]]) for m in action.survivors}

        views = [assignment_of(h) for h in heads]
        assignment = views[0]
        for view in views[1:]:
            assert {k: v.tolist() for k, v in view.items()} == {k: v.tolist() for k, v in assignment.items()}
        total = sum(int(i) for idx in assignment.values() for i in idx)
        step, before = members[0].ctl.step, ref.state
        # sometimes a kill lands mid all-gather: some members finish (commit), the others see the loss
        dies_mid = self.mid_step_kills and self.rng.random() < 0.15 and len(members) > 1
        finishers = members if not dies_mid else members[: self.rng.randint(1, len(members) - 1)]
        for m in finishers:
            assert m.ctl.step == step and m.sampler.state == before
            m.ledger.record(m.sampler.epoch, step, gen, views[members.index(m)])
            m.value = (m.value * 31 + total) % MOD
            m.sampler.advance()
            self.tell(m, StepCommitted(gen, step))
        if dies_mid:
            self.kill_one_of([m for m in members if m not in finishers], gen)
        return True

    def kill_one_of(self, candidates: list[Node], gen: int) -> None:
        victim = self.rng.choice(candidates)
        del self.nodes[victim.name]
        self.broken.add(gen)
        for m in candidates:
            if m is not victim:
                self.tell(m, RingLost(gen, "peer died mid all-gather"))


def digest_as(step: int, value: int) -> str:
    return hashlib.blake2b(repr((step, value)).encode(), digest_size=16).hexdigest()


def _done_by(action: Any, event: Any) -> bool:
    pairs: dict[type, Any] = {
        RingFormed: FormRing,
        StatesGathered: GatherStates,
        StepCommitted: (RunStep, RedoStep),
    }
    if isinstance(event, StateSent):
        return isinstance(action, SendState) and action.to == event.to
    if isinstance(event, StateReceived):
        return isinstance(action, ReceiveState)
    if isinstance(event, RingLost):
        return True
    kinds = pairs.get(type(event))
    return kinds is not None and isinstance(action, kinds)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), plan=st.lists(st.sampled_from(["kill", "join", "run"]), max_size=12))
def test_kills_and_joins_at_random_points_still_train_exactly_once(seed: int, plan: list[str]) -> None:
    rng = random.Random(seed)
    world = World(3, rng)
    target = 3 * -(-DATASET // BATCH)  # three epochs
    rounds = 0
    while max((n.ctl.step for n in world.nodes.values()), default=0) < target:
        rounds += 1
        assert rounds < 5000, "the world stopped making progress"
        if plan and rng.random() < 0.1:
            what = plan.pop()
            if what == "kill" and len(world.nodes) > 1:
                world.kill()
                world.gossip()
            elif what == "join":
                world.add()
                world.gossip()
        if not world.settle():
            world.gossip()  # a stalled round: the membership view catches up (gossip converges)
            assert world.settle() or rounds < 4000, "deadlock"
    final = {n.ctl.step: n.value for n in world.nodes.values()}
    assert final.get(target) == undisturbed(target)
    # the lineage of the final state: work a member committed and took to its grave is not part of it
    # (a joiner still catching up holds no lineage yet)
    finished = [n for n in world.nodes.values() if n.ctl.step == target]
    assert finished
    for node in finished:
        for epoch in range(3):
            node.ledger.check_epoch(epoch, DATASET)


def test_joiner_is_admitted_at_a_step_boundary_and_catches_up() -> None:
    world = World(2, random.Random(1), mid_step_kills=False)
    for _ in range(30):
        world.settle()
    joiner = world.add()
    world.gossip()
    for _ in range(200):
        world.settle()
        if joiner.ctl.step >= 20:
            break
    assert joiner.ctl.step >= 20
    assert len({(n.ctl.step, n.value) for n in world.nodes.values()}) == 1


@pytest.mark.parametrize("min_nodes", [2])
def test_world_pauses_below_min_nodes(min_nodes: int) -> None:
    world = World(2, random.Random(2), min_nodes=min_nodes, mid_step_kills=False)
    for _ in range(10):
        world.settle()
    world.kill()
    world.gossip()
    (survivor,) = world.nodes.values()
    assert survivor.ctl.phase is Phase.TRAINING  # in its step: the ring's PeerLost decides, not gossip
    world.settle()
    assert survivor.ctl.phase is Phase.PAUSED
    step = survivor.ctl.step
    assert not world.settle() and survivor.ctl.step == step
    world.add()
    world.gossip()
    for _ in range(50):
        world.settle()
    assert all(n.ctl.step > step for n in world.nodes.values())
