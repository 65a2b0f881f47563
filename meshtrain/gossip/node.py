"""GossipNode: the asyncio shell around `Membership` (UDP gossip, TCP push-pull, LAN beacons).

It owns sockets and the clock and nothing else: every datagram, timer and TCP
reply is handed to the state machine, and the actions it returns are carried out.
Malformed, oversized or unknown datagrams are dropped and counted in `drops`;
no exception from the network reaches the event loop.

With a keyring (the mesh secret) every datagram, beacon and push-pull/TCP-ping
body is sealed (meshtrain.security.auth) and opened before any parsing: another
mesh's packets, forged, stale or replayed ones are counted in `security_drops`
by reason and never reach the codec or the state machine. A keyring with
`encrypt` (`meshtrain join --encrypt`) makes the sealing AES-GCM: bodies are
ciphertext, and a node with the other setting is dropped as `mode_mismatch`.

Identity: the protocol keys on `id` (the agent passes one stored in its state
directory; bare nodes default it to `name`), never on the display `name`. When
another live member holds our name, meshtrain.gossip.names decides who keeps
it: with ``on_clash="suffix"`` we take ``NAME-2`` (a `renamed` event), with
``"refuse"`` subscribers get a `name_taken` event naming the holder. A node's
first incarnation is its start time in milliseconds, so a restarted node keeps
its id and is always newer than anything its previous life said: the mesh
accepts it back (`alive` event) without waiting for tombstones.

Joining through seeds says how it went (`join_problem`): a seed that cannot
open our push-pull (another mesh's key, the other --encrypt setting, a clock
out of the window) answers with a fixed refusal frame that carries nothing
about its mesh (`REFUSED`); silence, a closed connection or a connect error
are told apart too, so `meshtrain join` can say at once why it is alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from meshtrain.errors import UserError
from meshtrain.gossip.codec import (
    MAX_STATE_BYTES,
    META_MAX_BYTES,
    TCP_ACK,
    DatagramDropped,
    decode_packet,
    decode_state,
    decode_tcp_ping,
    encode_meta,
    encode_packet,
    encode_state,
    encode_tcp_ack,
    encode_tcp_ping,
    is_plain,
)
from meshtrain.gossip.config import GossipConfig
from meshtrain.gossip.discovery import DISCOVERY_PORT, Discovery, local_address
from meshtrain.gossip.member import ALIVE, SUSPECT, Addr, Member, MemberEvent
from meshtrain.gossip.membership import Action, Membership, Notify, PushPull, Send, TcpPing
from meshtrain.gossip.messages import Ack, Alive, Packet
from meshtrain.gossip.names import NAMED_KEY, free_name, must_yield
from meshtrain.gossip.profiles import PROFILES, Profile
from meshtrain.gossip.pushpull import frame, read_frame, request
from meshtrain.security import DatagramOpener, DatagramSealer, DropCounters, Dropped, Keyring
from meshtrain.security.auth import OVERHEAD
from meshtrain.security.drops import BAD_TAG, MODE_MISMATCH, REPLAY, UNKNOWN_MESH

log = logging.getLogger(__name__)
Subscriber = Callable[[MemberEvent], None]

REFUSED = b"meshtrain refused "
"""A seed's answer to a push-pull it cannot open: this prefix and one reason word, unsealed (the
asker holds no key we accept). It says only why, never anything about the mesh: `key` (a key id we do
not hold, or a wrong tag), `mode` (our key, the other --encrypt setting) or `clock` (authentic but
stale or replayed: only a holder of the key can get that far)."""
_REFUSAL_REASON = {UNKNOWN_MESH: b"key", BAD_TAG: b"key", MODE_MISMATCH: b"mode", REPLAY: b"clock"}
JOINED = "ok"

_OUTCOMES = {
    "refused:key": "refused this node: it holds another mesh's secret (a wrong MESHTRAIN_SECRET or "
    "--secret-file, or the token of an older mesh)",
    "refused:mode": "refused this node: its --encrypt setting differs from the mesh's (join with the "
    "mesh's token)",
    "refused:clock": "refused this node's messages as stale: the two machines' clocks differ by more "
    "than 30 s (turn on NTP)",
    "closed": "closed the connection without answering (another mesh's secret, or not a meshtrain agent)",
    "garbled": "answered with something this node cannot read (another mesh's secret?)",
}


def describe_outcome(seed: Addr, outcome: str) -> str:
    """One line on how a join through `seed` went (JOINED, a refusal, silence, an error)."""
    where = f"the seed {seed[0]}:{seed[1]}"
    if outcome in _OUTCOMES:
        return f"{where} {_OUTCOMES[outcome]}"
    if outcome.startswith("timeout:"):
        return f"{where} did not answer within {outcome.split(':', 1)[1]}s (is it up, and the port open?)"
    if outcome.startswith("unreachable:"):
        return f"{where} is unreachable ({outcome.split(':', 1)[1].strip()})"
    return f"{where}: {outcome}"


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run on uvloop when it is installed (it halves per-datagram overhead)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _check_meta(meta: dict[str, Any]) -> dict[str, Any]:
    if not is_plain(meta) or not all(isinstance(k, str) for k in meta):
        raise UserError(
            "node metadata must be a dict of str keys to plain values (str, numbers, lists, dicts)"
        )
    size = len(encode_meta(meta))
    if size > META_MAX_BYTES:
        raise UserError(f"node metadata is {size} bytes encoded; the limit is {META_MAX_BYTES}")
    return meta


def _route_address(seed: Addr) -> str:
    """The local address the kernel would use to reach `seed` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(seed)
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, node: GossipNode) -> None:
        self.node = node

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.node._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.node._drop("socket")


class GossipNode:
    def __init__(
        self,
        name: str,
        meta: dict[str, Any] | None = None,
        profile: Profile = PROFILES["lan"],
        host: str = "0.0.0.0",
        port: int = 7946,
        seeds: Sequence[Addr] = (),
        interface: str | None = None,
        discovery: bool = True,
        *,
        node_id: str | None = None,
        advertise: str | None = None,
        discovery_port: int | None = None,
        incarnation: int | None = None,
        keyring: Keyring | None = None,
        on_clash: str = "suffix",
    ) -> None:
        if not name or len(name) > 128:
            raise UserError("node name must be 1 to 128 characters")
        if on_clash not in ("suffix", "refuse"):
            raise ValueError(f"on_clash must be 'suffix' or 'refuse', not {on_clash!r}")
        self.name = name
        self.base_name = name  # what we asked for; a clash makes `name` base-2, base-3, ...
        self.on_clash = on_clash
        self.name_taken_by: Member | None = None  # the holder, once a clash made us refuse
        self.join_outcomes: dict[Addr, str] = {}  # seed -> JOINED or why not, from the latest attempt
        self.id = node_id or name
        self.profile = profile
        self.host = host
        self.port = port
        self.seeds = [(str(h), int(p)) for h, p in seeds]
        self.interface = interface
        self.discovery_enabled = discovery
        # beacons follow the gossip port (7946 -> 7947), so `--port 7947` does not collide with them
        default = port + 1 if 0 < port < 65535 else DISCOVERY_PORT
        self.discovery_port = discovery_port if discovery_port is not None else default
        self.drops: dict[str, int] = {}
        self.keyring = keyring
        self.security_drops = DropCounters()
        # One session (sealer, sequence) for UDP gossip and beacons, another for TCP bodies:
        # a push-pull that takes a while must not fall behind the receiver's replay window
        # while fast UDP gossip of the same sender moves it on.
        self._sealer = DatagramSealer(keyring) if keyring is not None else None
        self._tcp_sealer = DatagramSealer(keyring) if keyring is not None else None
        self._opener: DatagramOpener | None = None
        self._tcp_opener: DatagramOpener | None = None
        if keyring is not None:
            self._opener = DatagramOpener(
                keyring, counters=self.security_drops, max_size=profile.max_datagram + OVERHEAD
            )
            self._tcp_opener = DatagramOpener(
                keyring, counters=self.security_drops, max_size=MAX_STATE_BYTES + OVERHEAD
            )
        self._meta = _check_meta(dict(meta or {}))
        self._advertise = advertise
        self._incarnation = incarnation
        self._subscribers: list[Subscriber] = []
        self._sm: Membership | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._discovery: Discovery | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = float("inf")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._joining: dict[str, float] = {}
        self._closed = False

    @classmethod
    def from_config(
        cls,
        name: str,
        config: GossipConfig,
        meta: dict[str, Any] | None = None,
        *,
        node_id: str | None = None,
        incarnation: int | None = None,
        keyring: Keyring | None = None,
        on_clash: str = "suffix",
    ) -> GossipNode:
        """A node that gossips as `config` says (meshtrain.gossip.config), with its identity and secret."""
        return cls(
            name,
            meta,
            config.timing,
            config.host,
            config.port,
            config.seeds,
            config.interface,
            config.discovery,
            node_id=node_id,
            advertise=config.advertise,
            discovery_port=config.discovery_port,
            incarnation=incarnation,
            keyring=keyring,
            on_clash=on_clash,
        )

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind UDP and TCP on `port` (0 picks a free one), then join seeds and start beaconing."""
        loop = asyncio.get_running_loop()
        await self._bind(loop)
        self._meta = {**self._meta, NAMED_KEY: time.time_ns() // 1_000_000}
        host = self._advertise or self._advertised_host()
        me = Alive(
            self.id,
            self.name,
            (host, self.port),
            self._incarnation or time.time_ns() // 1_000_000,
            self._meta,
        )
        self._sm = Membership(me, self.profile, random.Random(), loop.time())
        self._arm()
        if self.discovery_enabled:
            self._discovery = Discovery(
                self.id,
                self.port,
                self.profile,
                self._on_beacon,
                lambda: self._sm is not None and self._sm.live_count <= 1,
                self.drops,
                interface=self.interface,
                port=self.discovery_port,
                seal=self.seal if self._sealer is not None else None,
                unseal=self.unseal if self._opener is not None else None,
            )
            await self._discovery.start()
        if self.seeds:
            await asyncio.gather(*(self._join(s) for s in self.seeds))
            self._spawn(self._rejoin_while_alone())

    async def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        for attempt in range(20):
            try:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=(self.host, self.port)
                )
            except OSError as exc:
                cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc  # uvloop wraps it
                if cause.errno == errno.EADDRINUSE:
                    raise UserError(
                        f"cannot bind gossip UDP {self.host}:{self.port}: the port is in use "
                        "(another agent or program); choose another with --port"
                    ) from None
                raise UserError(f"cannot bind gossip UDP {self.host}:{self.port}: {exc}") from None
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port, reuse_address=True)
            except OSError as exc:
                udp.close()
                if self.port == 0 and attempt < 19:
                    continue  # the ephemeral UDP port was taken on TCP; pick another
                if exc.errno == errno.EADDRINUSE:
                    raise UserError(
                        f"cannot bind gossip TCP {self.host}:{port}: the port is in use; "
                        "choose another with --port"
                    ) from None
                raise UserError(f"cannot bind gossip TCP {self.host}:{port}: {exc}") from None
            self._udp, self.port = udp, port
            return

    def _advertised_host(self) -> str:
        if self.host not in ("0.0.0.0", ""):
            return self.host
        if self.interface is not None:
            return local_address(self.interface)
        if self.seeds:
            return _route_address(self.seeds[0])
        return local_address(None)

    async def leave(self) -> None:
        """Tell the mesh we are leaving (state `left`, not `dead`), give it a moment to spread, close."""
        await self.announce_leave()
        await self.close()

    async def announce_leave(self) -> None:
        """Gossip `left` and wait (up to the profile's leave_timeout) for it to spread; stay open, so an
        agent can wind its work down while the mesh already knows it is going, then `close()`."""
        if self._sm is not None and not self._closed and not self._sm.leaving:
            loop = asyncio.get_running_loop()
            self._apply(self._sm.leave(loop.time()))
            deadline = loop.time() + self.profile.leave_timeout
            while self._sm.pending_updates and loop.time() < deadline:
                await asyncio.sleep(self.profile.gossip_interval)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._discovery is not None:
            await self._discovery.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._tcp.wait_closed(), 1.0)

    # ------------------------------------------------------------ public API

    @property
    def incarnation(self) -> int:
        return self._machine().incarnation

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._meta)

    @property
    def joined(self) -> bool:
        """No seeds, at least one answered our latest join, or we found the mesh another way (beacons)."""
        if not self.seeds or any(o == JOINED for o in self.join_outcomes.values()):
            return True
        return self._sm is not None and self._sm.live_count > 1

    @property
    def join_refused(self) -> bool:
        """Every seed that answered refused us (a wrong secret, mode or clock): retrying cannot help."""
        return not self.joined and any(o.startswith("refused:") for o in self.join_outcomes.values())

    @property
    def join_problem(self) -> str | None:
        """Why joining through the seeds failed (one line per seed, refusals first), or None."""
        if self.joined or not self.join_outcomes:
            return None
        rows = sorted(self.join_outcomes.items(), key=lambda kv: (not kv[1].startswith("refused"), kv[0]))
        return "; ".join(describe_outcome(seed, outcome) for seed, outcome in rows)

    def members(self) -> list[Member]:
        """Everyone this node knows of, itself included, dead and left ones until they are reaped."""
        return self._machine().members()

    def alive_members(self) -> list[Member]:
        return [m for m in self.members() if m.state in (ALIVE, SUSPECT)]

    def update_meta(self, **kv: Any) -> None:
        """Merge `kv` into this node's metadata and gossip it (a higher incarnation)."""
        self._meta = _check_meta({**self._meta, **kv})
        if self._sm is not None:
            self._apply(self._sm.update_meta(asyncio.get_running_loop().time(), self._meta))

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(event)` on every membership change; returns a function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    # ------------------------------------------------------------ driving the state machine

    def _machine(self) -> Membership:
        if self._sm is None:
            raise UserError("gossip node is not started (await node.start() first)")
        return self._sm

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def seal(self, body: bytes) -> bytes:
        """What goes on the wire for `body` (itself on an unauthenticated mesh)."""
        return self._sealer.seal(body, time.time()) if self._sealer is not None else body

    def _seal_tcp(self, body: bytes) -> bytes:
        """As `seal`, for a push-pull or TCP-ping body (their own session and sequence)."""
        return self._tcp_sealer.seal(body, time.time()) if self._tcp_sealer is not None else body

    def unseal(self, data: bytes) -> bytes | None:
        """The body of an authentic, fresh datagram, else None (counted in `security_drops`)."""
        return self._opener.open_or_none(data, time.time()) if self._opener is not None else data

    def _unseal_tcp(self, data: bytes) -> bytes:
        """As `unseal`, for a push-pull or TCP-ping body; a refused one (counted) raises
        DatagramDropped("refused", <the opener's reason>)."""
        if self._tcp_opener is None:
            return data
        try:
            return self._tcp_opener.open(data, time.time())
        except Dropped as exc:
            raise DatagramDropped("refused", exc.reason) from None

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._sm is None or self._closed:
            return
        body = self.unseal(data)
        if body is None:
            return  # another mesh, forged, stale or replayed: counted by reason
        data = body
        try:
            packet = decode_packet(data, self.profile.max_datagram)
        except DatagramDropped as exc:
            self._drop(exc.reason)
            return
        except Exception:  # the codec is fuzzed; this is the last line of defence
            log.exception("gossip codec failed")
            self._drop("error")
            return
        self._guarded(lambda now: self._machine().receive(now, (addr[0], addr[1]), packet))

    def _guarded(self, step: Callable[[float], list[Action]]) -> None:
        """Run one state-machine step; a bug there is logged and counted, never kills the loop."""
        try:
            actions = step(asyncio.get_running_loop().time())
            self._apply(actions)
        except Exception:
            log.exception("gossip state machine failed")
            self._drop("error")

    def _apply(self, actions: list[Action]) -> None:
        for a in actions:
            if type(a) is Send:
                if self._udp is not None and not self._udp.is_closing():
                    try:
                        self._udp.sendto(self.seal(encode_packet(a.packet)), a.addr)
                    except (OSError, ValueError):
                        self._drop("send")
            elif type(a) is Notify:
                self._deliver(a.event)
                if a.event.member.id != self.id and a.event.kind in ("joined", "alive", "updated"):
                    self._check_name(a.event.member)
            elif type(a) is PushPull:
                self._spawn(self._push_pull(a.addr, join=False))
            elif type(a) is TcpPing:
                self._spawn(self._tcp_ping(a))
        self._arm()

    def _deliver(self, event: MemberEvent) -> None:
        for cb in list(self._subscribers):
            try:
                cb(event)
            except Exception:
                log.exception("gossip subscriber failed on %s", event.kind)

    def _check_name(self, other: Member) -> None:
        """`other` (alive, joined or updated) may hold our name: yield as names.must_yield says."""
        sm = self._sm
        me = sm.member(self.id) if sm is not None else None
        if (
            sm is None
            or me is None
            or sm.leaving
            or self.name_taken_by is not None
            or not must_yield(me, other)
        ):
            return
        if self.on_clash == "refuse":
            self.name_taken_by = other
            self._deliver(MemberEvent("name_taken", other))
            return
        self.name = free_name(self.base_name, sm.members())
        self._meta = {**self._meta, NAMED_KEY: time.time_ns() // 1_000_000}
        self._apply(sm.rename(asyncio.get_running_loop().time(), self.name, self._meta))
        renamed = sm.member(self.id)
        if renamed is not None:
            log.warning(
                "the name %s is taken by %s at %s: this node is %s",
                other.name,
                other.id,
                other.addr,
                self.name,
            )
            self._deliver(MemberEvent("renamed", renamed))

    def _arm(self) -> None:
        if self._sm is None or self._closed:
            return
        loop = asyncio.get_running_loop()
        when = max(self._sm.next_deadline(), loop.time())
        if self._timer is not None:
            if self._timer_when <= when:
                return  # the armed timer fires first; poll() then re-arms
            self._timer.cancel()
        self._timer_when = when
        self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_when = None, float("inf")
        self._guarded(lambda now: self._machine().poll(now))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ TCP: push-pull and fallback ping

    async def _push_pull(self, addr: Addr, join: bool) -> bool:
        outcome = await self._exchange(addr, join)
        if join and addr in self.seeds:
            self.join_outcomes[addr] = outcome
        return outcome == JOINED

    async def _exchange(self, addr: Addr, join: bool) -> str:
        """One push-pull with `addr`: JOINED, ``refused:<why>``, ``closed``, ``garbled``, ``timeout:<s>``
        or ``unreachable:<error>``."""
        sm = self._machine()
        timeout = self.profile.tcp_timeout
        try:
            reply = await request(addr, self._seal_tcp(encode_state(sm.state_rows(), join)), timeout)
        except asyncio.TimeoutError:
            return f"timeout:{timeout:g}"
        except asyncio.IncompleteReadError:
            return "closed"
        except (OSError, DatagramDropped) as exc:
            return f"unreachable:{getattr(exc, 'strerror', None) or exc}"
        if reply.startswith(REFUSED):
            return "refused:" + reply[len(REFUSED) :].decode("ascii", "replace")[:16]
        try:
            rows, _ = decode_state(self._unseal_tcp(reply))
        except DatagramDropped as exc:
            log.debug("push-pull with %s: unreadable answer: %s", addr, exc)
            return "garbled"
        self._guarded(lambda now: sm.merge(now, rows))
        return JOINED

    async def join(self, seeds: Sequence[Addr]) -> int:
        """Push-pull with each of `seeds` (e.g. `--seed host:port` given later); returns how many answered."""
        results = await asyncio.gather(*(self._join((str(h), int(p))) for h, p in seeds))
        return sum(results)

    async def _join(self, seed: Addr) -> bool:
        return await self._push_pull(seed, join=True)

    async def _rejoin_while_alone(self) -> None:
        """Seeds may start after us: retry them with backoff for as long as we know nobody."""
        delay = self.profile.beacon_interval
        while True:
            await asyncio.sleep(delay)
            if self._machine().live_count <= 1:
                await asyncio.gather(*(self._join(s) for s in self.seeds))
                delay = min(delay * 2, self.profile.beacon_max_interval)
            else:
                delay = self.profile.beacon_interval

    def _on_beacon(self, host: str, port: int, node: str) -> None:
        state = self._machine().state_of(node)
        if state in (ALIVE, SUSPECT):
            return
        now = time.monotonic()
        if now - self._joining.get(node, -1e9) < self.profile.beacon_interval:
            return
        self._joining[node] = now
        self._spawn(self._push_pull((host, port), join=True))

    async def _tcp_ping(self, a: TcpPing) -> None:
        try:
            reply = await request(
                a.addr, self._seal_tcp(encode_tcp_ping(a.target)), self.profile.probe_interval
            )
            target = decode_tcp_ping(self._unseal_tcp(reply), TCP_ACK)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, DatagramDropped):
            return
        if target == a.target:
            self._guarded(lambda now: self._machine().receive(now, a.addr, Packet(a.target, (Ack(a.seq),))))

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            body = self._unseal_tcp(await asyncio.wait_for(read_frame(reader), self.profile.tcp_timeout))
            sm = self._machine()
            target = decode_tcp_ping(body)
            if target is not None:
                if target == self.id:
                    writer.write(frame(self._seal_tcp(encode_tcp_ack(self.id))))
            else:
                rows, _ = decode_state(body)
                writer.write(frame(self._seal_tcp(encode_state(sm.state_rows(), False))))
                self._guarded(lambda now: sm.merge(now, rows))
            await writer.drain()
        except DatagramDropped as exc:
            if exc.reason != "refused":  # refused bodies are already counted in security_drops
                self._drop(exc.reason)
            else:
                why = _REFUSAL_REASON.get(str(exc).partition(": ")[2])
                if why is not None:  # a well-formed envelope we cannot accept: say why, nothing more
                    self._drop("join_refused")
                    with contextlib.suppress(OSError, RuntimeError):
                        writer.write(frame(REFUSED + why))
                        await asyncio.wait_for(writer.drain(), 1.0)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, UserError):
            self._drop("tcp")
        finally:
            writer.close()
