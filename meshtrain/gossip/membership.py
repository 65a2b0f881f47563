"""SWIM membership with Lifeguard, as a pure state machine: events in, actions out.

Nothing here touches sockets, asyncio or the wall clock. The shell (node.py) or the
simulator (simulator.py) calls `receive(now, addr, packet)` for each datagram,
`poll(now)` when `next_deadline()` has passed, and `merge(now, rows)` with a
push-pull peer's state; each returns the actions to carry out: `Send` a packet,
`Notify` subscribers, start a `PushPull` or a fallback `TcpPing` over TCP. Randomness comes from the
injected `random.Random`, so a seeded run is reproducible.

Protocol (SWIM + Lifeguard, as in HashiCorp memberlist):
- every probe period, ping the next member of a shuffled round-robin list;
  no ack within the probe timeout -> ask `indirect_checks` members to ping it
  and try a TCP ping;
  still nothing at the end of the period -> suspect it;
- a suspicion turns into a death after a timeout that shrinks with independent
  confirmations (suspicion.py); the suspect refutes by gossiping a higher incarnation;
- updates are piggy-backed on pings/acks and gossiped to a few random members per
  gossip round, each retransmitted O(log N) times (broadcast.py);
- our own timeouts stretch while we miss acks ourselves (awareness.py);
- periodic full-state push-pull over TCP repairs whatever gossip missed, and is how a
  node joins.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from meshtrain.gossip.awareness import Awareness
from meshtrain.gossip.broadcast import BroadcastQueue
from meshtrain.gossip.codec import PACKET_OVERHEAD, message_size
from meshtrain.gossip.member import ALIVE, DEAD, LEFT, SUSPECT, Addr, Member, MemberEvent
from meshtrain.gossip.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Message,
    Nack,
    Packet,
    Ping,
    StateRow,
    Suspect,
    Update,
)
from meshtrain.gossip.profiles import Profile
from meshtrain.gossip.suspicion import Suspicion


@dataclass(slots=True)
class Send:
    addr: Addr
    packet: Packet


@dataclass(slots=True)
class Notify:
    event: MemberEvent


@dataclass(slots=True)
class PushPull:
    """Open a TCP state exchange with `addr`; give its reply to `merge`."""

    addr: Addr


@dataclass(slots=True)
class TcpPing:
    """Fallback probe over TCP (memberlist does the same): when it connects and `target` answers,
    feed `Ack(seq)` back through `receive`. TCP's own retransmissions get it through UDP loss."""

    addr: Addr
    target: str
    seq: int


Action = Send | Notify | PushPull | TcpPing


class _Entry:
    __slots__ = ("id", "name", "addr", "incarnation", "state", "meta", "since")

    def __init__(self, a: Alive, now: float) -> None:
        self.id = a.node
        self.name = a.name
        self.addr: Addr = a.addr
        self.incarnation = a.incarnation
        self.state = ALIVE
        self.meta = a.meta
        self.since = now

    def snapshot(self) -> Member:
        return Member(self.id, self.name, self.addr, self.state, self.incarnation, dict(self.meta))

    def alive_message(self) -> Alive:
        return Alive(self.id, self.name, self.addr, self.incarnation, self.meta)


class _Probe:
    __slots__ = ("target", "seq", "timeout_at", "end_at", "acked", "indirect_sent", "expected_nacks", "nacks")

    def __init__(self, target: str, seq: int, timeout_at: float, end_at: float) -> None:
        self.target = target
        self.seq = seq
        self.timeout_at = timeout_at
        self.end_at = end_at
        self.acked = False
        self.indirect_sent = False
        self.expected_nacks = 0
        self.nacks = 0


class _Relay:
    __slots__ = ("requester", "seq", "deadline", "nack")

    def __init__(self, requester: Addr, seq: int, deadline: float, nack: bool) -> None:
        self.requester = requester
        self.seq = seq
        self.deadline = deadline
        self.nack = nack


_NEVER = float("inf")


class Membership:
    """One node's view of the mesh and the SWIM/Lifeguard rules that keep it current."""

    def __init__(self, me: Alive, profile: Profile, rng: random.Random, now: float) -> None:
        self.profile = profile
        self.rng = rng
        self.id = me.node
        self._me = _Entry(me, now)
        self._members: dict[str, _Entry] = {me.node: self._me}
        self._others: list[str] = []  # ids except ours, for O(1) random picks
        self._live = 1  # alive + suspect, ourselves included: the N that timeouts scale with
        self._probe_order: list[str] = []
        self._probe_index = 0
        self._seq = rng.randrange(1 << 30)
        self._queue = BroadcastQueue()
        self.awareness = Awareness(profile.awareness_max)
        self._suspicions: dict[str, Suspicion] = {}
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._next_probe = now + rng.random() * profile.probe_interval
        self._next_gossip = now + rng.random() * profile.gossip_interval
        self._clock = now  # time of the step being processed
        self._next_push_pull = now + profile.push_pull_interval * (0.5 + rng.random())
        self._next_reap = now + profile.dead_retention
        self.leaving = False
        self._out: list[Action] = []
        self._broadcast(me.node, me)  # announce ourselves once we know anyone (memberlist does the same)
        self._handlers: dict[type, Any] = {
            Ping: self._on_ping,
            IndirectPing: self._on_indirect,
            Ack: self._on_ack,
            Nack: self._on_nack,
            Alive: self._on_alive,
            Suspect: self._on_suspect,
            Dead: self._on_dead,
        }

    # ------------------------------------------------------------ queries

    @property
    def incarnation(self) -> int:
        return self._me.incarnation

    @property
    def live_count(self) -> int:
        return self._live

    @property
    def pending_updates(self) -> int:
        return len(self._queue)

    def members(self) -> list[Member]:
        return [e.snapshot() for e in self._members.values()]

    def member(self, node: str) -> Member | None:
        e = self._members.get(node)
        return e.snapshot() if e else None

    def state_of(self, node: str) -> str | None:
        e = self._members.get(node)
        return e.state if e else None

    def state_rows(self) -> list[StateRow]:
        return [
            StateRow(e.id, e.name, e.addr, e.incarnation, e.state, e.meta) for e in self._members.values()
        ]

    def next_deadline(self) -> float:
        t = self._next_probe
        if self._next_push_pull < t:
            t = self._next_push_pull
        if self._next_reap < t:
            t = self._next_reap
        p = self._probe
        if p is not None and not p.acked and not p.indirect_sent and p.timeout_at < t:
            t = p.timeout_at
        if self._queue and self._next_gossip < t:
            t = self._next_gossip
        for r in self._relays.values():
            if r.deadline < t:
                t = r.deadline
        for s in self._suspicions.values():
            if s.deadline < t:
                t = s.deadline
        return t

    # ------------------------------------------------------------ inputs

    def preload(self, alives: list[Alive], now: float) -> None:
        """Start from a converged view (simulations and tests): no events, no gossip."""
        for a in alives:
            if a.node != self.id and a.node not in self._members:
                self._members[a.node] = _Entry(a, now)
                self._others.append(a.node)
                self._live += 1
        self._next_push_pull = now + self.profile.push_pull_period(self._live) * self.rng.random()
        self._probe_order = self._others[:]
        self.rng.shuffle(self._probe_order)
        self._probe_index = 0

    def receive(self, now: float, addr: Addr, packet: Packet) -> list[Action]:
        self._clock = now
        handlers = self._handlers
        for m in packet.messages:
            handlers[type(m)](now, addr, m)
        return self._flush()

    def poll(self, now: float) -> list[Action]:
        """Run every timer that is due at `now`."""
        self._clock = now
        p = self._probe
        if p is not None:
            if not p.acked and not p.indirect_sent and now >= p.timeout_at:
                self._send_indirect(now, p)
            if now >= p.end_at:
                self._finish_probe(now, p)
        if now >= self._next_probe:
            self._start_probe(now)
        if self._relays:
            for seq in [s for s, r in self._relays.items() if r.deadline <= now]:
                r = self._relays.pop(seq)
                if r.nack:
                    self._send(r.requester, Nack(r.seq))
        if self._suspicions:
            for node in [n for n, s in self._suspicions.items() if s.deadline <= now]:
                del self._suspicions[node]
                e = self._members[node]
                if e.state == SUSPECT:
                    self._on_dead(now, None, Dead(node, e.incarnation, self.id))
        if now >= self._next_gossip:
            gi = self.profile.gossip_interval
            steps = int((now - self._next_gossip) / gi) + 1
            self._next_gossip += steps * gi
            if self._queue:
                self._gossip(now)
        if now >= self._next_push_pull:
            self._next_push_pull = now + self.profile.push_pull_period(self._live)
            target = self._random_member(exclude=None)
            if target is not None:
                self._out.append(PushPull(target.addr))
        if now >= self._next_reap:
            self._reap(now)
        return self._flush()

    def merge(self, now: float, rows: list[StateRow]) -> list[Action]:
        """Fold in a push-pull peer's full state (a join or a periodic sync)."""
        self._clock = now
        for r in rows:
            if r.state == ALIVE:
                self._on_alive(now, None, Alive(r.node, r.name, r.addr, r.incarnation, r.meta))
            elif r.state == LEFT:
                self._on_dead(now, None, Dead(r.node, r.incarnation, r.node))
            elif r.node in self._members:
                # Someone else's death verdict becomes our suspicion: we give it a chance to refute.
                self._on_suspect(now, None, Suspect(r.node, r.incarnation, self.id))
        return self._flush()

    def update_meta(self, now: float, meta: dict[str, Any]) -> list[Action]:
        self._clock = now
        me = self._me
        me.meta = meta
        if self.leaving:
            return []  # a node that left never gossips itself alive again (peers saw it return, then die)
        me.incarnation += 1
        self._broadcast(me.id, me.alive_message())
        self._notify("updated", me)
        return self._flush()

    def rename(self, now: float, name: str, meta: dict[str, Any]) -> list[Action]:
        """Take another display name (the id, which the protocol keys on, stays): a new incarnation."""
        self._clock = now
        me = self._me
        if self.leaving or (name == me.name and meta == me.meta):
            return []
        me.name, me.meta = name, meta
        me.incarnation += 1
        self._broadcast(me.id, me.alive_message())
        self._notify("updated", me)
        return self._flush()

    def leave(self, now: float) -> list[Action]:
        """Gossip our own Dead (by ourselves = left); keep answering until the shell closes us."""
        self._clock = now
        self.leaving = True
        me = self._me
        me.state = LEFT
        self._broadcast(me.id, Dead(me.id, me.incarnation, me.id))
        self._gossip(now)
        return self._flush()

    # ------------------------------------------------------------ probing

    def _start_probe(self, now: float) -> None:
        target = self._next_probe_target()
        interval = self.awareness.scale(self.profile.probe_interval)
        self._next_probe = now + interval
        if target is None:
            return
        self._seq += 1
        self._probe = _Probe(
            target.id, self._seq, now + self.awareness.scale(self.profile.probe_timeout), now + interval
        )
        self._send(target.addr, Ping(self._seq, target.id))

    def _next_probe_target(self) -> _Entry | None:
        for _ in range(2):
            order, members = self._probe_order, self._members
            while self._probe_index < len(order):
                e = members.get(order[self._probe_index])
                self._probe_index += 1
                if e is not None and (e.state == ALIVE or e.state == SUSPECT):
                    return e
            self._probe_order = self._others[:]
            self.rng.shuffle(self._probe_order)
            self._probe_index = 0
        return None

    def _send_indirect(self, now: float, p: _Probe) -> None:
        p.indirect_sent = True
        target = self._members.get(p.target)
        if target is None:
            return
        relays = self._random_members(self.profile.indirect_checks, exclude=p.target)
        p.expected_nacks = len(relays)
        msg = IndirectPing(p.seq, target.id, target.addr, True)
        for r in relays:
            self._send(r.addr, msg)
        self._out.append(TcpPing(target.addr, target.id, p.seq))

    def _finish_probe(self, now: float, p: _Probe) -> None:
        self._probe = None
        if p.acked:
            self.awareness.apply(-1)
            return
        missed = p.expected_nacks - p.nacks if p.expected_nacks else 1
        self.awareness.apply(missed)
        e = self._members.get(p.target)
        if e is not None and (e.state == ALIVE or e.state == SUSPECT):  # a suspect: we confirm it
            self._on_suspect(now, None, Suspect(e.id, e.incarnation, self.id))

    def _on_ping(self, now: float, addr: Addr | None, m: Ping) -> None:
        if m.target == self.id and addr is not None:
            self._send(addr, Ack(m.seq))

    def _on_indirect(self, now: float, addr: Addr | None, m: IndirectPing) -> None:
        if addr is None or len(self._relays) > 256:
            return
        self._seq += 1
        self._relays[self._seq] = _Relay(addr, m.seq, now + self.profile.probe_timeout, m.nack)
        self._send(m.addr, Ping(self._seq, m.target))

    def _on_ack(self, now: float, addr: Addr | None, m: Ack) -> None:
        p = self._probe
        if p is not None and p.seq == m.seq:
            p.acked = True
            return
        r = self._relays.pop(m.seq, None)
        if r is not None:
            self._send(r.requester, Ack(r.seq))

    def _on_nack(self, now: float, addr: Addr | None, m: Nack) -> None:
        p = self._probe
        if p is not None and p.seq == m.seq:
            p.nacks += 1

    # ------------------------------------------------------------ updates

    def _on_alive(self, now: float, addr: Addr | None, m: Alive) -> None:
        e = self._members.get(m.node)
        if e is self._me:
            if self.leaving:
                return
            if m.incarnation > e.incarnation or (
                m.incarnation == e.incarnation and (m.addr != e.addr or m.meta != e.meta or m.name != e.name)
            ):
                self._refute(m.incarnation)
            return
        if e is None:
            e = _Entry(m, now)
            self._members[m.node] = e
            self._others.append(m.node)
            self._live += 1
            n = len(self._probe_order)
            self._probe_order.insert(self.rng.randint(min(self._probe_index, n), n), m.node)
            self._broadcast(m.node, m)
            self._notify("joined", e)
            return
        if m.incarnation <= e.incarnation:
            return
        old_state = e.state
        changed = m.addr != e.addr or m.meta != e.meta or m.name != e.name
        e.incarnation, e.addr, e.meta, e.name = m.incarnation, m.addr, m.meta, m.name
        self._suspicions.pop(m.node, None)
        if old_state != ALIVE:
            self._set_state(e, ALIVE, now)
        self._broadcast(m.node, m)
        if old_state != ALIVE:
            self._notify("alive", e)
        if changed:
            self._notify("updated", e)

    def _on_suspect(self, now: float, addr: Addr | None, m: Suspect) -> None:
        e = self._members.get(m.node)
        if e is None or m.incarnation < e.incarnation:
            return
        if e is self._me:
            if not self.leaving:
                self._refute(m.incarnation)
                self.awareness.apply(1)
            return
        if e.state == SUSPECT:
            s = self._suspicions.get(m.node)
            if s is not None and s.confirm(m.by):
                self._broadcast(m.node, m)
            return
        if e.state != ALIVE:
            return
        e.incarnation = m.incarnation
        self._set_state(e, SUSPECT, now)
        n, prof = self._live, self.profile
        expected = prof.suspicion_confirmations
        if n - 2 < expected:  # not enough other members to ever confirm: wait the minimum... max
            expected = max(0, n - 2)
        self._suspicions[m.node] = Suspicion(
            now, prof.suspicion_min(n), prof.suspicion_max(n), expected, m.by
        )
        if m.by != self.id and self.rng.random() * max(1, n - 2) < prof.suspicion_probes:
            self._probe_order.insert(self._probe_index, m.node)  # probe it next: confirm or clear it fast
        self._broadcast(m.node, m)
        self._notify("suspect", e)

    def _on_dead(self, now: float, addr: Addr | None, m: Dead) -> None:
        e = self._members.get(m.node)
        if e is None or m.incarnation < e.incarnation:
            return
        if e is self._me:
            if not self.leaving:
                self._refute(m.incarnation)
            return
        if e.state == DEAD or e.state == LEFT:
            return
        e.incarnation = m.incarnation
        self._suspicions.pop(m.node, None)
        state = LEFT if m.by == m.node else DEAD
        self._set_state(e, state, now)
        self._broadcast(m.node, m)
        self._notify(state, e)

    def _refute(self, incarnation: int) -> None:
        me = self._me
        me.incarnation = max(me.incarnation, incarnation) + 1
        self._broadcast(me.id, me.alive_message())

    # ------------------------------------------------------------ dissemination

    def _broadcast(self, key: str, m: Update) -> None:
        self._queue.push(key, m, message_size(m))
        if self._next_gossip < self._clock:
            # The gossip ticker idles while there is nothing to say; wake it on its grid, not at once,
            # so dissemination proceeds in rounds as SWIM's analysis (and the bench's "rounds") assume.
            gi = self.profile.gossip_interval
            self._next_gossip += (int((self._clock - self._next_gossip) / gi) + 1) * gi

    def _gossip(self, now: float) -> None:
        limit = self.profile.retransmit_limit(self._live)
        budget = self.profile.max_datagram - PACKET_OVERHEAD - len(self.id)
        dead_cutoff = now - self.profile.gossip_to_dead
        for target in self._random_members(self.profile.gossip_nodes, exclude=None, dead_since=dead_cutoff):
            updates = self._queue.take(budget, limit)
            if not updates:
                return
            self._out.append(Send(target.addr, Packet(self.id, tuple(updates))))

    def _send(self, addr: Addr, m: Message) -> None:
        """Send one probe message, with as many pending updates piggy-backed as fit."""
        extra: list[Update] = []
        if self._queue:
            budget = self.profile.max_datagram - PACKET_OVERHEAD - len(self.id) - message_size(m)
            extra = self._queue.take(budget, self.profile.retransmit_limit(self._live))
        self._out.append(Send(addr, Packet(self.id, (m, *extra))))

    def _notify(self, kind: str, e: _Entry) -> None:
        self._out.append(Notify(MemberEvent(kind, e.snapshot())))

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    # ------------------------------------------------------------ table upkeep

    def _set_state(self, e: _Entry, state: str, now: float) -> None:
        was_live = e.state == ALIVE or e.state == SUSPECT
        is_live = state == ALIVE or state == SUSPECT
        self._live += is_live - was_live
        e.state = state
        e.since = now

    def _random_member(self, exclude: str | None) -> _Entry | None:
        picked = self._random_members(1, exclude)
        return picked[0] if picked else None

    def _random_members(self, k: int, exclude: str | None, dead_since: float | None = None) -> list[_Entry]:
        """Up to k distinct random live members (plus recently dead ones when `dead_since` is given)."""
        others, members = self._others, self._members

        def usable(e: _Entry) -> bool:
            if e.id == exclude:
                return False
            if e.state == ALIVE or e.state == SUSPECT:
                return True
            return dead_since is not None and e.since >= dead_since

        picked: dict[str, _Entry] = {}
        n = len(others)
        if n == 0:
            return []
        if n > 4 * k:
            rand = self.rng.random
            for _ in range(4 * k):
                e = members[others[int(rand() * n)]]
                if e.id not in picked and usable(e):
                    picked[e.id] = e
                    if len(picked) == k:
                        return list(picked.values())
        pool = [members[i] for i in others if i not in picked and usable(members[i])]
        need = min(k - len(picked), len(pool))
        return [*picked.values(), *self.rng.sample(pool, need)]

    def _reap(self, now: float) -> None:
        self._next_reap = now + self.profile.dead_retention / 4
        cutoff = now - self.profile.dead_retention
        gone = [
            i
            for i in self._others
            if self._members[i].state in (DEAD, LEFT) and self._members[i].since < cutoff
        ]
        if gone:
            for i in gone:
                del self._members[i]
            drop = set(gone)
            self._others = [i for i in self._others if i not in drop]
