"""Many membership state machines in one process, on a virtual clock, over a lossy network.

The very `Membership` class the UDP shell drives runs here N times. Datagrams go
through the real codec (encoded, counted, optionally lost, decoded at the receiver
after a random latency); push-pull exchanges are reliable, like TCP, and their
encoded size is counted too. Nothing sleeps: an event heap jumps the clock from one
due timer or delivery to the next, so ten simulated minutes of 1,000 nodes take
seconds to minutes of CPU.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any

from meshtrain.gossip.codec import decode_packet, encode_packet, encode_state
from meshtrain.gossip.member import Addr, MemberEvent
from meshtrain.gossip.membership import Action, Membership, Notify, PushPull, Send, TcpPing
from meshtrain.gossip.messages import Ack, Alive, Packet
from meshtrain.gossip.profiles import Profile

_TIMER, _DELIVER, _PUSH_PULL = 0, 1, 2

Listener = Callable[[float, int, MemberEvent], None]
"""Called as listener(now, observer_index, event) for every membership event of every node."""


def sim_meta(i: int) -> dict[str, Any]:
    """Metadata of the size real nodes carry (platform, device, ports, speed, job), for honest byte counts."""
    return {
        "platform": "darwin-arm64",
        "device": "gpu",
        "cores": 10,
        "mem_gb": 32,
        "speed": 1.0 + (i % 7) / 10,
        "ring": 7950 + i % 100,
        "control": 7948,
        "job": None,
        "role": "idle",
    }


class Simulator:
    def __init__(
        self,
        profile: Profile,
        *,
        loss: float = 0.0,
        latency: tuple[float, float] = (0.0002, 0.002),
        seed: int = 0,
        decode: bool = True,
    ) -> None:
        self.profile = profile
        self.loss = loss
        self.latency = latency
        self.decode = decode
        self.rng = random.Random(seed)
        self.now = 0.0
        self.nodes: list[Membership] = []
        self.addr_of: list[Addr] = []
        self.index_of: dict[Addr, int] = {}
        self.crashed: set[int] = set()
        self.udp_bytes: list[int] = []
        self.tcp_bytes: list[int] = []
        self.datagrams = 0
        self.listeners: list[Listener] = []
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._scheduled: list[float] = []
        self._seq = 0

    # ------------------------------------------------------------ building the mesh

    def _new_node(self, i: int) -> Alive:
        addr = (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 7946)
        return Alive(f"n{i}", f"node-{i}", addr, 1, sim_meta(i))

    def populate(self, n: int) -> None:
        """Add n nodes that already know each other (a converged mesh), without any traffic."""
        base = len(self.nodes)
        alives = [self._new_node(base + k) for k in range(n)]
        for a in alives:
            self._add(a)
        for k in range(n):
            self.nodes[base + k].preload(alives, self.now)

    def join(self, seed_index: int) -> int:
        """Start one new node that joins through a push-pull with `seed_index`, as a real one does."""
        i = len(self.nodes)
        self._add(self._new_node(i))
        self._schedule(self.now + self._latency(), _PUSH_PULL, i, self.addr_of[seed_index])
        return i

    def _add(self, a: Alive) -> None:
        i = len(self.nodes)
        node = Membership(a, self.profile, random.Random(self.rng.getrandbits(64)), self.now)
        self.nodes.append(node)
        self.addr_of.append(a.addr)
        self.index_of[a.addr] = i
        self.udp_bytes.append(0)
        self.tcp_bytes.append(0)
        self._scheduled.append(float("inf"))
        self._reschedule(i)

    def crash(self, i: int) -> None:
        """Stop node i dead: no more timers, datagrams to it vanish."""
        self.crashed.add(i)

    # ------------------------------------------------------------ running

    def run_until(self, t: float, stop: Callable[[], bool] | None = None) -> bool:
        """Advance to virtual time t (or until `stop()` is true; then return True)."""
        heap, nodes, crashed = self._heap, self.nodes, self.crashed
        while heap and heap[0][0] <= t:
            when, _, kind, i, payload = heapq.heappop(heap)
            self.now = when
            if i in crashed:
                continue
            if kind == _TIMER:
                if when != self._scheduled[i]:
                    continue
                self._scheduled[i] = float("inf")
                self._apply(i, nodes[i].poll(when))
            elif kind == _DELIVER:
                src, data = payload
                packet = decode_packet(data, self.profile.max_datagram) if self.decode else data
                self._apply(i, nodes[i].receive(when, src, packet))
            else:
                self._push_pull(i, payload)
            if stop is not None and stop():
                return True
        self.now = max(self.now, t)
        return False

    def _apply(self, i: int, actions: list[Action]) -> None:
        for a in actions:
            if type(a) is Send:
                self._send(i, a.addr, a.packet)
            elif type(a) is Notify:
                for listener in self.listeners:
                    listener(self.now, i, a.event)
            elif type(a) is PushPull:
                self._schedule(self.now + self._latency(), _PUSH_PULL, i, a.addr)
            elif type(a) is TcpPing:
                self._tcp_ping(i, a)
        self._reschedule(i)

    def _send(self, i: int, addr: Addr, packet: Packet) -> None:
        data = encode_packet(packet)
        self.udp_bytes[i] += len(data)
        self.datagrams += 1
        j = self.index_of.get(addr)
        if j is None or j in self.crashed or (self.loss and self.rng.random() < self.loss):
            return
        lo, hi = self.latency
        self._schedule(
            self.now + lo + (hi - lo) * self.rng.random(),
            _DELIVER,
            j,
            (self.addr_of[i], data if self.decode else packet),
        )

    def _tcp_ping(self, i: int, a: TcpPing) -> None:
        """A TCP ping succeeds unless the target is down or the handshake or reply is lost twice
        (SYN retransmission takes ~1 s, longer than a probe period, so one loss each way is fatal)."""
        j = self.index_of.get(a.addr)
        self.tcp_bytes[i] += 64
        if j is None or j in self.crashed or self.nodes[j].id != a.target:
            return
        if self.loss and self.rng.random() < 1 - (1 - self.loss) ** 2:
            return
        ack = Packet(a.target, (Ack(a.seq),))
        self._schedule(
            self.now + 2 * self._latency(), _DELIVER, i, (a.addr, encode_packet(ack) if self.decode else ack)
        )

    def _push_pull(self, i: int, addr: Addr) -> None:
        j = self.index_of.get(addr)
        if j is None or j in self.crashed:
            return
        mine, theirs = self.nodes[i].state_rows(), self.nodes[j].state_rows()
        self.tcp_bytes[i] += len(encode_state(mine, False))
        self.tcp_bytes[j] += len(encode_state(theirs, False))
        self._apply(j, self.nodes[j].merge(self.now, mine))
        self._apply(i, self.nodes[i].merge(self.now, theirs))

    def _latency(self) -> float:
        lo, hi = self.latency
        return lo + (hi - lo) * self.rng.random()

    def _schedule(self, when: float, kind: int, i: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, i, payload))

    def _reschedule(self, i: int) -> None:
        d = max(self.nodes[i].next_deadline(), self.now)  # a dormant gossip grid may lie in the past
        if d < self._scheduled[i]:
            self._scheduled[i] = d
            self._seq += 1
            heapq.heappush(self._heap, (d, self._seq, _TIMER, i, None))


class Watch:
    """Listener recording when each node first saw `kind` about `subject` (e.g. dead about n7)."""

    def __init__(self, kind: str, subject: str) -> None:
        self.kind = kind
        self.subject = subject
        self.times: dict[int, float] = {}

    def __call__(self, now: float, i: int, ev: MemberEvent) -> None:
        if ev.kind == self.kind and ev.member.id == self.subject and i not in self.times:
            self.times[i] = now
