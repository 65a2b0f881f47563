"""LAN discovery: small UDP broadcast beacons on every interface, answered by a push-pull join.

A beacon says only "a meshtrain node gossips on port P" (the address is the
datagram's source): the node field carries a random beacon id drawn once per
process, never the node's name or id, so a listener on the LAN learns nothing
about who the node is. The real id is learned from the push-pull the beacon
triggers, which is authenticated on a mesh with a secret. The price: a
receiver cannot tell a beacon of a member it already knows from a stranger's,
so each beacon heard costs one push-pull (at most one per beacon interval and
id; beacons settle to one per node per `beacon_max_interval`).

On a mesh with a secret a beacon is sealed like every gossip datagram, so a
node drops other meshes' beacons (counted as `unknown_mesh`) before parsing them. Every node binds
the shared discovery port with SO_REUSEADDR/SO_REUSEPORT, so several nodes on one
machine all hear the LAN's beacons. A node that is alone beacons with exponential
backoff (1 s, 2 s, ... up to the profile's max); one in a mesh keeps beaconing at the
max so two meshes on one LAN eventually merge.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
import socket
from collections.abc import Callable

import psutil

from meshtrain.errors import UserError
from meshtrain.gossip.codec import DatagramDropped, decode_beacon, encode_beacon
from meshtrain.gossip.messages import Beacon
from meshtrain.gossip.profiles import Profile

DISCOVERY_PORT = 7947
log = logging.getLogger(__name__)


def _ipv4(interface: str | None) -> dict[str, list[tuple[str, str | None]]]:
    """Interface name -> [(address, broadcast)] for its IPv4 addresses."""
    out: dict[str, list[tuple[str, str | None]]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET:
                out.setdefault(name, []).append((a.address, a.broadcast))
    if interface is not None and interface not in out:
        known = ", ".join(sorted(out)) or "none"
        raise UserError(f"no IPv4 interface named {interface!r} (have: {known})")
    return {interface: out[interface]} if interface is not None else out


def broadcast_addresses(interface: str | None = None) -> list[str]:
    """Each interface's IPv4 broadcast address (loopback has none), or just `interface`'s."""
    return sorted(
        {b for addrs in _ipv4(interface).values() for a, b in addrs if b and not a.startswith("127.")}
    )


def local_address(interface: str | None = None) -> str:
    """The address to advertise: `interface`'s, else the first LAN address, else loopback."""
    for addrs in _ipv4(interface).values():
        for a, b in addrs:
            if interface is not None or (b and not a.startswith("127.")):
                return a
    return "127.0.0.1"


class BeaconSchedule:
    """Pure backoff: delays double while alone, and restart from the minimum when we become alone again."""

    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self._delay = minimum
        self._was_alone = True

    def next_delay(self, alone: bool) -> float:
        if not alone:
            self._was_alone = False
            return self.maximum
        if not self._was_alone:
            self._was_alone = True
            self._delay = self.minimum
        delay = self._delay
        self._delay = min(self._delay * 2, self.maximum)
        return delay


Seal = Callable[[bytes], bytes]
Unseal = Callable[[bytes], "bytes | None"]
Found = Callable[[str, int, str], None]
"""found(host, gossip_port, beacon_id) for each beacon from another node (the id is anonymous)."""


def anonymous_beacon_id() -> str:
    """A random id for one process's beacons: tells receivers apart from their own, names nobody."""
    return "b-" + secrets.token_hex(8)


class _BeaconProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: Discovery) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.owner._received(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.owner.drops["socket"] = self.owner.drops.get("socket", 0) + 1


class Discovery:
    def __init__(
        self,
        node_id: str,
        gossip_port: int,
        profile: Profile,
        found: Found,
        alone: Callable[[], bool],
        drops: dict[str, int],
        *,
        interface: str | None = None,
        port: int = DISCOVERY_PORT,
        seal: Seal | None = None,
        unseal: Unseal | None = None,
    ) -> None:
        """`seal`/`unseal`: the node's authentication envelope (None on a mesh without a secret)."""
        self.node_id = node_id
        self.gossip_port = gossip_port
        self.profile = profile
        self.found = found
        self.alone = alone
        self.drops = drops
        self.interface = interface
        self.port = port
        self.seal = seal
        self.unseal = unseal
        self.beacon_id = anonymous_beacon_id()
        self.beacons_sent = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        broadcast_addresses(self.interface)  # fail early (UserError) on a wrong --interface
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        try:
            sock.bind(("", self.port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise UserError(
                    f"cannot listen for discovery beacons: UDP port {self.port} is in use; choose another "
                    "--port (discovery uses --port + 1) or turn discovery off with --no-discovery"
                ) from None
            raise UserError(f"cannot listen for discovery beacons on UDP port {self.port}: {exc}") from None
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(lambda: _BeaconProtocol(self), sock=sock)
        self._task = loop.create_task(self._beacon_loop())

    async def _beacon_loop(self) -> None:
        schedule = BeaconSchedule(self.profile.beacon_interval, self.profile.beacon_max_interval)
        beacon = encode_beacon(Beacon(self.beacon_id, self.gossip_port))  # never the node id
        while True:
            for target in broadcast_addresses(self.interface):
                with contextlib.suppress(OSError):
                    assert self._transport is not None
                    # sealed at every send: each beacon has its own sequence number and time
                    sealed = self.seal(beacon) if self.seal is not None else beacon
                    self._transport.sendto(sealed, (target, self.port))
                    self.beacons_sent += 1
            await asyncio.sleep(schedule.next_delay(self.alone()))

    def _received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.unseal is not None:
            body = self.unseal(data)
            if body is None:
                return  # another mesh's beacon, or a forged/replayed one: counted by the node
            data = body
        try:
            beacon = decode_beacon(data, self.profile.max_datagram)
        except DatagramDropped as exc:
            self.drops[exc.reason] = self.drops.get(exc.reason, 0) + 1
            return
        if beacon.node != self.beacon_id:  # not our own broadcast, heard back
            try:
                self.found(addr[0], beacon.port, beacon.node)
            except Exception:  # a bug in the join path must not kill the beacon listener
                log.exception("handling a beacon from %s", addr)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._transport is not None:
            self._transport.close()
