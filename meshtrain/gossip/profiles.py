"""Timing profiles, like memberlist's LAN/WAN/local configs, each field saying why.

Timeouts that must grow with the mesh (suspicion, retransmits, push-pull) are
derived from these through the helpers below, so one profile serves 3 or 1,000 nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    probe_interval: float
    """Seconds between probes of one (round-robin) member; detection speed vs. probe traffic."""
    probe_timeout: float
    """Seconds to wait for a direct ack before asking others: a few RTTs plus scheduling slack."""
    indirect_checks: int
    """Members asked to probe on our behalf; k independent paths make one lossy link harmless."""
    gossip_interval: float
    """Seconds between gossip rounds; only rounds with something to say send anything."""
    gossip_nodes: int
    """Random members each round's updates go to (fan-out): log_{fanout+1}(N) rounds reach everyone."""
    gossip_to_dead: float
    """Keep gossiping to members declared dead this long, so a falsely dead one hears it and refutes."""
    retransmit_mult: int
    """Each update is sent retransmit_mult * ceil(log10(N+1)) times by every node that holds it."""
    suspicion_mult: float
    """Minimum suspicion timeout = suspicion_mult * max(1, log10 N) * probe_interval (memberlist)."""
    suspicion_max_mult: float
    """An unconfirmed suspicion waits this many times the minimum (Lifeguard); confirmations shrink it."""
    suspicion_confirmations: int
    """Independent suspectors that bring the timeout down to the minimum (Lifeguard's k)."""
    suspicion_probes: float
    """Expected members that, on hearing a suspicion, probe the suspect next instead of at its
    round-robin turn: a crash gets its confirmations within ~one probe period, a live suspect just
    acks (our extension of Lifeguard; 0 turns it off)."""
    awareness_max: int
    """Local health multiplier cap: a node that misses its own acks slows its timeouts up to this factor."""
    push_pull_interval: float
    """Seconds between full-state TCP syncs with one random member (anti-entropy, heals partitions)."""
    push_pull_scale_nodes: int
    """Above this many members the push-pull interval grows linearly, so its bytes per node stay flat."""
    dead_retention: float
    """Seconds a dead/left member stays in the table (visible, and shielding against stale Alives)."""
    max_datagram: int
    """Largest datagram sent or accepted: below a 1500-byte Ethernet MTU after IP/UDP headers."""
    beacon_interval: float
    """First LAN discovery beacon period while alone; doubles up to beacon_max_interval."""
    beacon_max_interval: float
    """Beacon period once in a mesh (still beaconing, so two meshes on one LAN merge)."""
    tcp_timeout: float
    """Seconds a push-pull connection may take before it is abandoned."""
    leave_timeout: float
    """How long a graceful leave waits for its Dead-by-self update to be gossiped before closing."""

    def node_scale(self, n: int) -> float:
        return max(1.0, math.log10(max(1, n)))

    def suspicion_min(self, n: int) -> float:
        return self.suspicion_mult * self.node_scale(n) * self.probe_interval

    def suspicion_max(self, n: int) -> float:
        return self.suspicion_max_mult * self.suspicion_min(n)

    def retransmit_limit(self, n: int) -> int:
        """Sends per update per holder; at least two full gossip rounds so tiny meshes never miss one."""
        return max(int(self.retransmit_mult * math.ceil(math.log10(n + 1))), 2 * self.gossip_nodes)

    def push_pull_period(self, n: int) -> float:
        return self.push_pull_interval * max(1.0, n / self.push_pull_scale_nodes)

    def detection_bound(self, n: int) -> float:
        """Worst case seconds from a crash until every healthy node declares it dead.

        One full round-robin probe round (every member probes everyone once per
        round), the unconfirmed (maximum) suspicion timeout, and a dissemination
        allowance of one full retransmit schedule of gossip rounds.
        """
        probe_round = self.probe_interval * max(1, n - 1)
        spread = self.gossip_interval * self.retransmit_limit(n)
        return probe_round + self.probe_interval + self.suspicion_max(n) + spread


LAN = Profile(
    name="lan",
    probe_interval=0.25,  # 4 probes/s/node is ~150 B/s; a crash is first probed within ~0.25 s at any N
    probe_timeout=0.1,  # 100x a wired LAN RTT; the agent's loop never runs training code, so it stays prompt
    indirect_checks=5,  # at 10% loss a relay path (4 datagrams) fails 34%; all 5 fail 0.5% (3 would: 4%)
    gossip_interval=0.1,  # 10 rounds/s: a death reaches 1,000 nodes in ~6 rounds, under a second
    gossip_nodes=3,  # fan-out 3: log4(1000) = 5 rounds; more only adds bytes
    gossip_to_dead=30.0,  # a falsely dead node keeps hearing about itself for 30 s and can refute
    retransmit_mult=5,  # 20 sends per holder at 1,000 nodes: a node misses one w.p. ~e^-18 at 10% loss
    suspicion_mult=1,  # min log10(N)*0.25 s (0.75 s at 1,000): only reached with k confirmations
    suspicion_max_mult=10,  # a lone suspector waits 7.5 s at 1,000 nodes: ~8x a refutation's trip
    suspicion_confirmations=2,  # two more witnesses: a false one needs 2 independent failed probes
    suspicion_probes=3,  # 3 eager probes give those witnesses within ~0.5 s of a real crash
    awareness_max=8,  # memberlist's cap; an overloaded node backs off to 8x timeouts, not forever
    push_pull_interval=30.0,  # memberlist's LAN value: repairs anything gossip missed within a minute
    push_pull_scale_nodes=32,  # linear growth beyond 32 keeps full-state bytes/s per node constant
    dead_retention=60.0,  # a minute of tombstone: longer than any in-flight gossip about the node
    max_datagram=1400,  # 1500 MTU - IP/UDP headers - room for a future auth tag
    beacon_interval=1.0,  # a new machine finds the mesh in about a second
    beacon_max_interval=30.0,  # alone or not, settle to one small broadcast per 30 s
    tcp_timeout=5.0,  # a push-pull of 1,000 members is ~100 KB: milliseconds on a LAN
    leave_timeout=1.0,  # ~10 gossip rounds: the leave reaches everyone before the sockets close
)

WIFI = Profile(
    name="wifi",
    probe_interval=1.0,  # Wi-Fi power save can delay packets by 100s of ms; probe half as often
    probe_timeout=0.5,  # covers Wi-Fi RTT spikes (power-save beacons, retries)
    indirect_checks=6,  # lossier air: one more independent path than lan before suspecting
    gossip_interval=0.2,  # memberlist's default; fewer wakeups for laptops on battery
    gossip_nodes=3,  # same fan-out; rounds, not fan-out, absorb the extra latency
    gossip_to_dead=60.0,  # a laptop that slept through its suspicion gets a minute to refute
    retransmit_mult=6,  # loss up to 10-20%: one more retransmission per log10 step than lan
    suspicion_mult=2,  # slower, lossier links: a refutation may need a few seconds
    suspicion_max_mult=10,  # a lone suspector waits 20 s at 10 nodes: laptops waking up can refute
    suspicion_confirmations=3,  # one more independent witness than lan before the fast path
    suspicion_probes=4,  # one eager probe more than lan for the extra witness
    awareness_max=8,  # as lan
    push_pull_interval=30.0,  # as lan
    push_pull_scale_nodes=32,  # as lan
    dead_retention=120.0,  # laptops come and go; keep tombstones longer
    max_datagram=1400,  # same MTU reasoning as lan
    beacon_interval=1.0,  # as lan
    beacon_max_interval=30.0,  # as lan
    tcp_timeout=10.0,  # Wi-Fi throughput varies widely
    leave_timeout=2.0,  # ~10 gossip rounds
)

LOCAL = Profile(
    name="local",
    probe_interval=0.2,  # loopback: probing is nearly free, detect within a second or two for tests/--local
    probe_timeout=0.1,  # loopback RTT is microseconds; 100 ms covers a loaded 2-core box
    indirect_checks=2,  # few nodes, no real network paths to diversify
    gossip_interval=0.05,  # updates spread in a few ms of wall time
    gossip_nodes=3,  # as lan
    gossip_to_dead=10.0,  # short-lived local meshes
    retransmit_mult=3,  # loopback does not lose packets
    suspicion_mult=3,  # min 0.6 s: a GC pause or busy loop still gets a chance to refute
    suspicion_max_mult=3,  # keeps a SIGKILL detected within ~2-3 s even with a single suspector
    suspicion_confirmations=1,  # a handful of nodes: one other witness is all there can be
    suspicion_probes=1,  # the one witness probes at once
    awareness_max=4,  # a loaded test machine slows down at most 4x
    push_pull_interval=5.0,  # cheap on loopback; repairs fast
    push_pull_scale_nodes=32,  # as lan
    dead_retention=30.0,  # short-lived local meshes
    max_datagram=1400,  # same as lan so behaviour matches the real thing
    beacon_interval=0.5,  # local nodes find each other quickly
    beacon_max_interval=5.0,  # quick re-discovery after a restart
    tcp_timeout=2.0,  # loopback
    leave_timeout=0.3,  # ~6 gossip rounds
)

PROFILES: dict[str, Profile] = {p.name: p for p in (LAN, WIFI, LOCAL)}
