"""Leader election: the rule on hand-made views, its properties under hypothesis, and on the
gossip simulator (real Membership state machines, lossy virtual network) for flapping and partitions."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrain.gossip import simulator as gossip_simulator
from meshtrain.gossip.member import ALIVE, DEAD, LEFT, SUSPECT, Member
from meshtrain.gossip.profiles import LAN
from meshtrain.gossip.simulator import Simulator
from meshtrain.leader.election import (
    FOLLOW_META_KEY,
    LEADER_META_KEY,
    Claim,
    Election,
    Follow,
    LeaderChanged,
    Leadership,
    Resign,
    claimed_term,
    is_agent,
    priority_key,
)


def member(
    node: str,
    *,
    state: str = ALIVE,
    mem: float = 16,
    plugged: bool | None = None,
    term: int | None = None,
    follows: str | None = None,
) -> Member:
    battery = None if plugged is None else {"percent": 50.0, "plugged": plugged}
    meta: dict[str, Any] = {"control": 1, "memory_gb": mem, "battery": battery}
    if term is not None:
        meta[LEADER_META_KEY] = term
    if follows is not None:
        meta[FOLLOW_META_KEY] = follows
    return Member(node, node, ("10.0.0.1", 7946), state, 1, meta)


def meta_of(actions: list[Any]) -> dict[str, Any]:
    """The gossip metadata a node publishes for its Claim/Resign/Follow actions."""
    meta: dict[str, Any] = {}
    for a in actions:
        if isinstance(a, Claim):
            meta[LEADER_META_KEY] = a.term
        elif isinstance(a, Resign):
            meta[LEADER_META_KEY] = None
        elif isinstance(a, Follow):
            meta[FOLLOW_META_KEY] = a.leader
    return meta


def publish(view: list[Member], node: str, actions: list[Any]) -> list[Member]:
    """What gossip would carry: the node's meta after its Claim/Resign/Follow."""
    meta = meta_of(actions)
    return [
        Member(m.id, m.name, m.addr, m.state, m.incarnation + 1, {**m.meta, **meta})
        if m.id == node and meta
        else m
        for m in view
    ]


def settle(view: list[Member], elections: dict[str, Election], rounds: int = 6) -> tuple[list[Member], int]:
    """Every node observes the shared view and publishes, until nothing changes; returns (view, rounds)."""
    for r in range(rounds):
        changed = False
        for node, election in elections.items():
            actions = election.observe(view)
            if any(isinstance(a, (Claim, Resign, Follow)) for a in actions):
                changed = True
                view = publish(view, node, actions)
        if not changed:
            return view, r
    raise AssertionError("no fixed point")


# ------------------------------------------------------------------ the rule


def test_priority_ac_power_then_memory_then_id() -> None:
    ranked = sorted(
        [
            member("a", mem=64, plugged=False),  # on battery: last, whatever its memory
            member("b", mem=8),
            member("c", mem=32, plugged=True),
            member("d", mem=32),
            member("e", mem=8),
        ],
        key=priority_key,
    )
    assert [m.id for m in ranked] == ["c", "d", "b", "e", "a"]
    assert not is_agent(Member("x", "x", ("h", 1), ALIVE, 1, {}))


def test_best_node_claims_and_the_others_follow() -> None:
    view = [member("a"), member("b", mem=64), member("c")]
    elections = {m.id: Election(m.id) for m in view}
    first = elections["a"].observe(view)
    assert first == [LeaderChanged(first[0].previous, first[0].current)]  # type: ignore[union-attr]
    assert elections["a"].current.leader == "b" and not elections["a"].current.settled
    view, _ = settle(view, elections)
    assert [claimed_term(m) for m in view] == [None, 1, None]
    assert {(e.current.leader, e.current.term, e.current.settled) for e in elections.values()} == {
        ("b", 1, True)
    }


def test_sticky_when_a_better_node_joins_reelected_when_the_leader_goes() -> None:
    view = [member("a"), member("b")]
    elections = {m.id: Election(m.id) for m in view}
    view, _ = settle(view, elections)
    assert elections["b"].current.leader == "a"  # equal priority: lowest id
    view.append(member("z", mem=128))
    elections["z"] = Election("z")
    view, _ = settle(view, elections)
    assert {e.current.leader for e in elections.values()} == {"a"}  # no flap to the better node
    view = [m if m.id != "a" else member("a", state=SUSPECT, term=1) for m in view]
    view, _ = settle(view, elections)
    assert {e.current.leader for e in elections.values()} == {"a"}  # suspicion alone keeps it
    view = [m if m.id != "a" else member("a", state=DEAD, term=1) for m in view]
    del elections["a"]
    view, _ = settle(view, elections)
    assert {(e.current.leader, e.current.term) for e in elections.values()} == {
        ("z", 2)
    }  # term above the dead one's


def test_restart_floor_and_settle_time() -> None:
    e = Election("a", term_floor=5, started=100.0, settle=2.0)
    assert [type(a) for a in e.observe([member("a")], now=101.0)] == [LeaderChanged]  # alone, too early
    assert not e.is_leader and e.current == Leadership("a", 5, False)
    assert e.observe([member("a")], now=102.0)[0] == Claim(6)  # above anything it saw before the restart


def test_a_leaving_leader_resigns() -> None:
    e = Election("a")
    assert isinstance(e.observe([member("a")])[0], Claim)
    actions = e.observe([member("a", state=LEFT, term=1), member("b")])
    assert Resign(1) in actions and not e.is_leader and e.current.leader == "b"


def test_a_per_job_election_keeps_to_its_nodes_and_its_key() -> None:
    job = {"control": 1, "job": "j1"}
    view = [
        Member(
            "a", "a", ("h", 1), ALIVE, 1, {"control": 1, LEADER_META_KEY: 3}
        ),  # mesh leader, not in the job
        Member("b", "b", ("h", 1), ALIVE, 1, {**job, "memory_gb": 8}),
        Member("c", "c", ("h", 1), ALIVE, 1, {**job, "memory_gb": 64}),
    ]
    e = Election("c", eligible=lambda m: m.meta.get("job") == "j1", meta_key="job_leader_term")
    assert e.observe(view)[0] == Claim(1)  # the mesh's term 3 under the other key is not its business
    assert e.current.leader == "c"


def test_healed_split_brain_keeps_the_claim_with_more_support() -> None:
    """Two claims meet (a healed partition): the one more members follow wins, whatever the terms."""
    view = [
        member("a", term=3, follows="a"),
        member("b", follows="a"),
        member("c", mem=99, term=4, follows="c"),
        member("d", follows="a"),
    ]
    elections = {m.id: Election(m.id) for m in view}
    elections["a"].claim, elections["c"].claim = 3, 4
    view, _ = settle(view, elections)
    assert [claimed_term(m) for m in view] == [3, None, None, None]
    assert {(e.current.leader, e.current.term) for e in elections.values()} == {("a", 3)}
    assert {m.meta[FOLLOW_META_KEY] for m in view} == {"a"}


def test_a_healed_lone_node_does_not_take_the_leadership() -> None:
    """Issue 16: cut off, a node claims a term above the incumbent's; on heal it resigns (one supporter
    against the incumbent's four) and the incumbent's term, which its workers know, stays."""
    view = [member("n0", term=1, follows="n0"), *(member(f"n{i}", follows="n0") for i in (1, 2, 3))]
    lone = member("n4", mem=512, term=2, follows="n4")  # the best machine, and a higher term
    elections = {m.id: Election(m.id) for m in [*view, lone]}
    elections["n0"].claim, elections["n4"].claim = 1, 2
    for m in view:
        elections[m.id].observe(view)  # the settled majority before the heal
    before = {m.id: elections[m.id].current for m in view}
    view, _ = settle([*view, lone], elections)
    assert {(e.current.leader, e.current.term) for e in elections.values()} == {("n0", 1)}
    assert {m.id: elections[m.id].current for m in view[:4]} == before  # no LeaderChanged: no abort
    assert [m.id for m in view if claimed_term(m) is not None] == ["n0"]


def test_equal_sides_keep_the_older_claim_and_two_startup_claims_merge() -> None:
    view = [
        member("a", term=2, follows="a"),
        member("b", follows="a"),
        member("c", term=1, follows="c"),
        member("d", follows="c"),
    ]
    elections = {m.id: Election(m.id) for m in view}
    elections["a"].claim, elections["c"].claim = 2, 1
    view, _ = settle(view, elections)
    assert {(e.current.leader, e.current.term) for e in elections.values()} == {("c", 1)}
    # two nodes that started apart both claimed term 1 alone: one leader, the better by priority
    view = [member("x", term=1, follows="x"), member("w", term=1, follows="w"), member("v")]
    elections = {m.id: Election(m.id) for m in view}
    elections["x"].claim, elections["w"].claim = 1, 1
    view, _ = settle(view, elections)
    assert {(e.current.leader, e.current.term) for e in elections.values()} == {("w", 1)}
    assert [m.id for m in view if claimed_term(m) is not None] == ["w"]


# ------------------------------------------------------------------ properties


states = st.sampled_from([ALIVE, ALIVE, ALIVE, SUSPECT, DEAD, LEFT])
views = st.lists(
    st.tuples(
        states,
        st.sampled_from([8, 16, 32]),
        st.sampled_from([None, True, False]),
        st.one_of(st.none(), st.integers(1, 6)),
        st.one_of(st.none(), st.integers(0, 6)),  # whom it followed before (stale, dead, or nobody)
    ),
    min_size=1,
    max_size=7,
)

Spec = list[tuple[str, int, bool | None, int | None, int | None]]


def build(spec: Spec) -> tuple[list[Member], dict[str, Election]]:
    view = [
        member(f"n{i}", state=s, mem=mem, plugged=p, term=t, follows=None if f is None else f"n{f}")
        for i, (s, mem, p, t, f) in enumerate(spec)
    ]
    elections = {}
    for m in view:
        if m.state in (ALIVE, SUSPECT):
            e = Election(m.id)
            e.claim = claimed_term(m)  # whatever it believed before (split views, restarts)
            elections[m.id] = e
    return view, elections


@settings(max_examples=300, deadline=None)
@given(views)
def test_any_shared_view_settles_on_one_live_leader(spec: Spec) -> None:
    view, elections = build(spec)
    before = {m.id: claimed_term(m) or 0 for m in view}
    view, rounds = settle(view, elections)
    assert rounds <= 2
    live = [m for m in view if m.state in (ALIVE, SUSPECT)]
    claimants = [m for m in live if claimed_term(m) is not None]
    if not live:
        return
    assert len(claimants) == 1
    leader = claimants[0]
    answers = {(e.current.leader, e.current.term, e.current.settled) for e in elections.values()}
    assert answers == {(leader.id, claimed_term(leader), True)}
    assert claimed_term(leader) is not None and claimed_term(leader) >= 1  # type: ignore[operator]
    if all(t is None for _, _, _, t, _ in spec):
        assert leader.id == min(live, key=priority_key).id  # a fresh mesh: the best node
    assert all(m.meta.get(FOLLOW_META_KEY) == leader.id for m in live)  # everyone follows it
    # stickiness: a new node of the best possible priority changes nothing
    view.append(member("a-best", mem=1024))
    elections["a-best"] = Election("a-best")
    view, _ = settle(view, elections)
    assert {e.current.leader for e in elections.values()} == {leader.id}
    # the winner may hold a lower term than a claim that resigned; every node's next claim is still
    # above the winner's term and above its own past claims
    assert all(e.highest_term >= claimed_term(leader) for e in elections.values())  # type: ignore[operator]
    assert all(elections[n].highest_term >= t for n, t in before.items() if n in elections)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 5), states, st.one_of(st.none(), st.integers(1, 9))), max_size=6),
        min_size=1,
        max_size=8,
    )
)
def test_own_claims_are_above_every_term_seen(history: list[list[tuple[int, str, int | None]]]) -> None:
    e = Election("n0")
    seen = 0
    for rows in history:
        view = [member("n0")] + [member(f"n{i + 1}", state=s, term=t) for i, s, t in rows]
        view = list({m.id: m for m in view}.values())
        seen = max([seen] + [claimed_term(m) or 0 for m in view])
        for a in e.observe(view):
            if isinstance(a, Claim):
                assert a.term > seen
                seen = a.term


# ------------------------------------------------------------------ on the gossip simulator


class PartitionedSimulator(Simulator):
    """The project's simulator with a switchable partition: traffic between groups vanishes."""

    group: dict[int, int] = {}

    def _cut(self, i: int, j: int | None) -> bool:
        return j is not None and self.group.get(i, 0) != self.group.get(j, 0)

    def _send(self, i: int, addr: Any, packet: Any) -> None:
        if not self._cut(i, self.index_of.get(addr)):
            super()._send(i, addr, packet)

    def _tcp_ping(self, i: int, a: Any) -> None:
        if not self._cut(i, self.index_of.get(a.addr)):
            super()._tcp_ping(i, a)

    def _push_pull(self, i: int, addr: Any) -> None:
        if not self._cut(i, self.index_of.get(addr)):
            super()._push_pull(i, addr)


class Mesh:
    """N simulated nodes, each running an Election over its own gossip view, claims published as meta."""

    def __init__(self, n: int, loss: float = 0.0, seed: int = 1) -> None:
        self.sim = PartitionedSimulator(LAN, loss=loss, seed=seed)
        self.sim.group = {}
        self.sim.populate(n)
        self.elections: list[Election] = []
        self.changes: list[list[tuple[float, str | None, int]]] = []
        for i in range(n):
            self._add(i)

    def _add(self, i: int, settle: float = 0.0) -> None:
        election = Election(self.sim.nodes[i].id, eligible=is_agent, started=self.sim.now, settle=settle)
        self.elections.append(election)
        self.changes.append([])

    def join(self, seed: int, mem_gb: float, settle: float = 0.0) -> int:
        """A new agent starts and runs its election at once, before its join push-pull has landed."""
        i = self.sim.join(seed)
        node = self.sim.nodes[i]
        me = node.member(node.id)
        assert me is not None
        self.sim._apply(i, node.update_meta(self.sim.now, {**me.meta, "mem_gb": mem_gb}))
        self._add(i, settle)
        self.observe(i)
        return i

    def observe(self, i: int) -> None:
        node = self.sim.nodes[i]
        actions = self.elections[i].observe(node.members(), self.sim.now)
        meta = meta_of(actions)
        if meta:
            me = node.member(node.id)
            assert me is not None
            self.sim._apply(i, node.update_meta(self.sim.now, {**me.meta, **meta}))
        for a in actions:
            if isinstance(a, LeaderChanged) and a.current.settled:
                self.changes[i].append((self.sim.now, a.current.leader, a.current.term))

    def beacons(self) -> None:
        """One LAN discovery round, as GossipNode._on_beacon does it: a node hearing the beacon of a
        member it holds dead (or does not know) joins it by push-pull. This is how healed halves merge."""
        sim = self.sim
        for i in self.live():
            for j in self.live():
                if sim.nodes[j].state_of(sim.nodes[i].id) not in (ALIVE, SUSPECT):
                    sim._schedule(sim.now + 0.001, gossip_simulator._PUSH_PULL, j, sim.addr_of[i])

    def live(self) -> list[int]:
        return [i for i in range(len(self.sim.nodes)) if i not in self.sim.crashed]

    def run(self, seconds: float, tick: float = 0.05) -> None:
        end = self.sim.now + seconds
        while self.sim.now < end - 1e-9:
            self.sim.run_until(self.sim.now + tick)
            for i in self.live():
                self.observe(i)

    def agreed(self, group: list[int] | None = None) -> tuple[str | None, int] | None:
        answers = {
            (
                self.elections[i].current.leader,
                self.elections[i].current.term,
                self.elections[i].current.settled,
            )
            for i in (group if group is not None else self.live())
        }
        if len(answers) == 1:
            leader, term, settled = answers.pop()
            return (leader, term) if settled else None
        return None

    def claimants(self, group: list[int]) -> list[int]:
        return [i for i in group if self.elections[i].is_leader]


def test_simulator_no_flapping_under_loss_and_sticky_on_join() -> None:
    mesh = Mesh(8, loss=0.05)
    mesh.run(3.0)
    first = mesh.agreed()
    assert first is not None and first[0] == "n0" and first[1] == 1  # mem equal in sim_meta: lowest id
    marks = [len(c) for c in mesh.changes]
    mesh.join(3, mem_gb=512, settle=LAN.beacon_interval)  # a much better machine arrives
    mesh.run(30.0)
    assert mesh.agreed() == first  # same leader, same term, everywhere
    assert [len(c) for c in mesh.changes[:8]] == marks  # no node saw a single change in 30 s at 5% loss
    assert mesh.claimants(mesh.live()) == [0]


def test_simulator_even_without_a_settle_time_a_better_newcomer_cannot_steal() -> None:
    """Alone for its first instant, a newcomer without a settle time claims term 1, tying the incumbent's
    term 1 with a better priority (the old rule then moved the leader); it has one supporter against the
    incumbent's four, so it resigns."""
    mesh = Mesh(4)
    mesh.run(3.0)
    assert mesh.agreed() == ("n0", 1)
    mesh.join(1, mem_gb=512, settle=0.0)
    mesh.run(5.0)
    assert mesh.agreed() == ("n0", 1) and mesh.claimants(mesh.live()) == [0]


def test_simulator_leader_crash_gives_one_new_leader_within_the_gossip_bound() -> None:
    mesh = Mesh(8)
    mesh.run(3.0)
    assert mesh.agreed() == ("n0", 1)
    mesh.sim.crash(0)
    crashed_at = mesh.sim.now
    bound = LAN.detection_bound(8) + LAN.gossip_interval * LAN.retransmit_limit(8) + 0.5
    mesh.run(bound)
    assert mesh.agreed() == ("n1", 2)
    took = max(c[-1][0] for c in (mesh.changes[i] for i in mesh.live())) - crashed_at
    assert 0 < took <= bound
    assert mesh.claimants(mesh.live()) == [1]
    mesh.run(10.0)
    assert mesh.agreed() == ("n1", 2)  # and it stays


def test_simulator_partition_elects_per_side_then_converges_to_one() -> None:
    mesh = Mesh(6, seed=3)
    mesh.run(3.0)
    assert mesh.agreed() == ("n0", 1)
    side_a, side_b = [0, 1, 2], [3, 4, 5]
    mesh.sim.group = {i: (0 if i in side_a else 1) for i in range(6)}
    mesh.run(LAN.detection_bound(6) + 2.0)
    assert mesh.agreed(side_a) == ("n0", 1)  # the incumbent keeps its side
    assert mesh.agreed(side_b) == ("n3", 2)  # the other side elects its own, with a higher term
    marks = [len(mesh.changes[i]) for i in side_a]
    mesh.sim.group = {}  # heal; the next discovery beacons merge the halves
    mesh.beacons()
    healed_at = mesh.sim.now
    mesh.run(2.0)
    assert mesh.agreed() == ("n0", 1)  # equal sides: the older claim, the incumbent, stays; n3 resigned
    assert mesh.claimants(mesh.live()) == [0]
    assert [len(mesh.changes[i]) for i in side_a] == marks  # the incumbent's side never saw a change
    assert max(c[-1][0] for c in mesh.changes) - healed_at < 1.0
    mesh.run(20.0)
    assert mesh.agreed() == ("n0", 1) and mesh.claimants(mesh.live()) == [0]


def test_simulator_a_partitioned_node_rejoins_without_taking_the_leadership() -> None:
    """Issue 16 on real gossip: one node cut off claims term 2 alone; when it heals, the incumbent
    (term 1, the majority side) stays leader and no majority node sees the leadership move."""
    mesh = Mesh(5, seed=5)
    mesh.run(3.0)
    assert mesh.agreed() == ("n0", 1)
    majority = [0, 1, 2, 3]
    mesh.sim.group = {4: 1}
    for _ in range(40):  # alone, it probes the others one by one: it takes a while to see them all dead
        mesh.run(0.5)
        if mesh.agreed([4]) == ("n4", 2):
            break
    assert mesh.agreed([4]) == ("n4", 2)  # alone, it leads itself with a higher term
    assert mesh.agreed(majority) == ("n0", 1)
    marks = [len(mesh.changes[i]) for i in majority]
    mesh.sim.group = {}
    mesh.beacons()
    mesh.run(3.0)
    assert mesh.agreed() == ("n0", 1) and mesh.claimants(mesh.live()) == [0]
    assert [len(mesh.changes[i]) for i in majority] == marks  # no "leadership moved" on the majority


def test_simulator_the_majority_keeps_its_new_leader_when_the_old_one_heals() -> None:
    mesh = Mesh(5, seed=7)
    mesh.run(3.0)
    assert mesh.agreed() == ("n0", 1)
    mesh.sim.group = {0: 1}  # the leader is the one cut off
    majority = [1, 2, 3, 4]
    mesh.run(LAN.detection_bound(5) + 2.0)
    assert mesh.agreed(majority) == ("n1", 2) and mesh.agreed([0]) == ("n0", 1)
    mesh.sim.group = {}
    mesh.beacons()
    mesh.run(3.0)
    assert mesh.agreed() == ("n1", 2)  # the lower term of the old leader does not win it back
    assert mesh.claimants(mesh.live()) == [1]
