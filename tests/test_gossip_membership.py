"""The membership state machine, driven directly and through the simulator (no sockets, no sleeps)."""

from __future__ import annotations

import random

from meshtrain.gossip.codec import encode_packet
from meshtrain.gossip.member import ALIVE, DEAD, LEFT, SUSPECT, MemberEvent
from meshtrain.gossip.membership import Membership, Notify, Send
from meshtrain.gossip.messages import Ack, Alive, Dead, Ping, Suspect
from meshtrain.gossip.profiles import PROFILES
from meshtrain.gossip.simulator import Simulator, Watch
from meshtrain.gossip.suspicion import Suspicion

LAN = PROFILES["lan"]


def _machine(node: str = "a", others: int = 3) -> Membership:
    m = Membership(Alive(node, node, ("10.0.0.1", 1), 5, {}), LAN, random.Random(1), 0.0)
    m.preload([Alive(f"o{i}", f"o{i}", ("10.0.1.1", 100 + i), 1, {}) for i in range(others)], 0.0)
    return m


def _events(actions: list) -> list[tuple[str, str]]:
    return [(a.event.kind, a.event.member.id) for a in actions if isinstance(a, Notify)]


def test_suspicion_about_self_is_refuted_with_higher_incarnation() -> None:
    m = _machine()
    from meshtrain.gossip.messages import Packet

    actions = m.receive(1.0, ("10.0.1.1", 100), Packet("o0", (Suspect("a", 5, "o0"),)))
    assert m.incarnation == 6
    m.poll(1.0 + LAN.gossip_interval)
    assert m.member("a").state == ALIVE  # type: ignore[union-attr]
    assert m.awareness.score == 1
    assert actions == [] or all(not isinstance(a, Notify) for a in actions)


def test_ping_for_someone_else_is_not_acked_and_ack_carries_updates() -> None:
    m = _machine()
    from meshtrain.gossip.messages import Packet

    assert m.receive(0.1, ("10.9.9.9", 9), Packet("x", (Ping(7, "not-me"),))) == []
    m.receive(0.2, ("10.0.1.1", 100), Packet("o0", (Dead("o1", 1, "o0"),)))
    out = m.receive(0.3, ("10.0.1.1", 100), Packet("o0", (Ping(8, "a"),)))
    sends = [a for a in out if isinstance(a, Send)]
    assert sends[0].packet.messages[0] == Ack(8)
    assert Dead("o1", 1, "o0") in sends[0].packet.messages  # piggy-backed
    assert len(encode_packet(sends[0].packet)) <= LAN.max_datagram


def test_stale_updates_are_ignored_and_newer_alive_revives() -> None:
    m = _machine()
    from meshtrain.gossip.messages import Packet

    src = ("10.0.1.1", 100)
    assert _events(m.receive(1, src, Packet("o0", (Dead("o2", 1, "o0"),)))) == [(DEAD, "o2")]
    assert _events(m.receive(2, src, Packet("o0", (Alive("o2", "o2", ("10.0.1.1", 102), 1, {}),)))) == []
    ev = _events(m.receive(3, src, Packet("o0", (Alive("o2", "o2", ("10.0.1.9", 102), 2, {"job": "x"}),))))
    assert ev == [(ALIVE, "o2"), ("updated", "o2")]
    assert m.member("o2").addr == ("10.0.1.9", 102)  # type: ignore[union-attr]


def test_leave_is_left_not_dead() -> None:
    m = _machine()
    from meshtrain.gossip.messages import Packet

    ev = _events(m.receive(1, ("10.0.1.1", 100), Packet("o1", (Dead("o1", 1, "o1"),))))
    assert ev == [(LEFT, "o1")]


def test_suspicion_timeout_shrinks_with_confirmations() -> None:
    s = Suspicion(0.0, minimum=2.0, maximum=12.0, expected=2, by="p")
    assert s.deadline == 12.0
    assert s.confirm("p") is False
    assert s.confirm("q") is True and 2.0 < s.deadline < 12.0
    assert s.confirm("r") is True and s.deadline == 2.0


def test_unanswered_probe_leads_to_suspect_then_dead() -> None:
    m = _machine(others=1)
    seen: list[tuple[str, str]] = []
    t = 0.0
    while t < 60 and (DEAD, "o0") not in seen:
        t = m.next_deadline()
        seen += _events(m.poll(t))  # o0 never answers anything
    assert seen[:2] == [(SUSPECT, "o0"), (DEAD, "o0")]
    assert t <= LAN.detection_bound(2)


def _converged_sim(
    n: int, loss: float = 0.0, seed: int = 3
) -> tuple[Simulator, list[tuple[float, int, MemberEvent]]]:
    sim = Simulator(LAN, loss=loss, seed=seed)
    log: list[tuple[float, int, MemberEvent]] = []
    sim.listeners.append(lambda now, i, ev: log.append((now, i, ev)))
    sim.populate(n)
    return sim, log


def test_simulated_crash_is_known_to_all_within_bound() -> None:
    sim, log = _converged_sim(50)
    sim.run_until(5.0)
    sim.crash(7)
    dead = Watch(DEAD, "n7")
    sim.listeners.append(dead)
    assert sim.run_until(5.0 + LAN.detection_bound(50), stop=lambda: len(dead.times) == 49)
    assert not [ev for _, _, ev in log if ev.kind == DEAD and ev.member.id != "n7"]


def test_simulated_join_reaches_everyone() -> None:
    sim, log = _converged_sim(50)
    sim.run_until(2.0)
    joined = Watch("joined", "n50")
    sim.listeners.append(joined)
    j = sim.join(seed_index=3)
    assert sim.run_until(10.0, stop=lambda: len(joined.times) == 50)
    assert sim.nodes[j].live_count == 51


def test_no_false_deaths_at_ten_percent_loss_and_suspicions_are_refuted() -> None:
    sim, log = _converged_sim(40, loss=0.10, seed=11)
    sim.run_until(120.0)
    kinds = {ev.kind for _, _, ev in log}
    assert DEAD not in kinds
    assert SUSPECT in kinds  # the loss was real: suspicions happened and were refuted
    assert all(n.live_count == 40 for n in sim.nodes)


def test_metadata_update_propagates() -> None:
    sim, log = _converged_sim(30)
    sim.run_until(1.0)
    sim._apply(4, sim.nodes[4].update_meta(sim.now, {"job": "abc", "role": "worker"}))
    sim.run_until(4.0)
    assert all(n.member("n4").meta["job"] == "abc" for n in sim.nodes)  # type: ignore[union-attr]
