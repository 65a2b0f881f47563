"""The agent's control protocol: requests, replies and streamed events in wire frames.

One TCP listener (its port published in gossip metadata) serves other agents;
one unix socket in the state directory, mode 0600, serves the CLI of the
same user on this machine. Both speak the same thing: the client's first frame
is a `request` naming an `op` and the client's protocol version; the server
answers with a `reply`, possibly after streaming `event` and `log` frames (a
running job). A request from another protocol version gets one clear error
reply instead of being half understood.

With a keyring (the mesh secret), every TCP connection is first authenticated
(meshtrain.security.channel) and each of its frames carries a session tag: a
stranger cannot ask anything, and is counted in `drops`. The unix socket needs
no secret: its 0600 mode already limits it to the user who owns the agent.
On a mesh with `--encrypt` the TCP channel also encrypts every frame, header
and payload (meshtrain.security.channel), so job submissions and state are
not readable on the network.

The TCP listener is reachable by anyone on the network, so before any byte is
read each connection passes a `ConnectionLimiter`: a token bucket per source
address and a cap on open connections (per source and in all). A flood of
connections is closed at once and counted as `rate_limited`, and cannot
exhaust the agent's memory or file descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from meshtrain import PROTOCOL_VERSION
from meshtrain.errors import UserError, WireError
from meshtrain.security import DropCounters, Keyring
from meshtrain.security.channel import AUTH_FAILED, Channel, accept_channel, dial_channel
from meshtrain.security.drops import BAD_TAG, MALFORMED, RATE_LIMITED
from meshtrain.security.handshake import MODE_MISMATCH_TEXT, FrameMac, NonceMemory
from meshtrain.wire import StreamClosed, read_frame, write_frame

MAX_BUNDLE_BYTES = 64 * 1024 * 1024
SOCKET_NAME = "agent.sock"
HANDSHAKE_TIMEOUT_S = 10.0
NO_SECRET = (
    "this machine does not hold the mesh's secret: run `meshtrain join --token ...` "
    "(the command the mesh's first `join` printed) first"
)
MODE_MISMATCH = (
    "this machine's --encrypt setting differs from the mesh's: join with the mesh's current "
    "`meshtrain join --token ...` command (it carries the setting)"
)


log = logging.getLogger(__name__)

CONNECTIONS_PER_SECOND = 20.0  # sustained new connections per source address
CONNECTION_BURST = 40  # new connections a source may open at once
MAX_OPEN_PER_SOURCE = 32
MAX_OPEN = 128
MAX_SOURCES = 4096  # rate table entries kept (oldest forgotten first): a bounded table


ControlDrops = DropCounters  # kept as a name for callers; `rate_limited` is one of the mesh's drop reasons


class ConnectionLimiter:
    """Admission of TCP connections: a token bucket per source and caps on open ones. Pure.

    `admit(source, now)` says whether a new connection from `source` may be
    served; every admitted one must be `release`d when it ends. `now` is a
    monotonic clock in seconds, injected so tests need no sleeps.
    """

    def __init__(
        self,
        rate: float = CONNECTIONS_PER_SECOND,
        burst: int = CONNECTION_BURST,
        max_open_per_source: int = MAX_OPEN_PER_SOURCE,
        max_open: int = MAX_OPEN,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_open_per_source = max_open_per_source
        self.max_open = max_open
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (tokens, at)
        self._open: dict[str, int] = {}
        self.open_total = 0

    def admit(self, source: str, now: float) -> bool:
        tokens, at = self._buckets.pop(source, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.rate)
        ok = (
            tokens >= 1.0
            and self.open_total < self.max_open
            and self._open.get(source, 0) < self.max_open_per_source
        )
        if ok:
            tokens -= 1.0
            self._open[source] = self._open.get(source, 0) + 1
            self.open_total += 1
        self._buckets[source] = (tokens, now)  # most recently seen last
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return ok

    def release(self, source: str) -> None:
        left = self._open.get(source, 0) - 1
        if left > 0:
            self._open[source] = left
        else:
            self._open.pop(source, None)
        self.open_total = max(0, self.open_total - 1)


def state_dir() -> Path:
    """Where the agent keeps its socket and job directories: $MESHTRAIN_HOME or ~/.local/state/meshtrain."""
    from meshtrain.paths import state_home

    return state_home()


def socket_path(base: Path | None = None) -> Path:
    return (base or state_dir()) / SOCKET_NAME


class Conn:
    """One framed control stream (TCP or unix)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        mac_send: FrameMac | None = None,
        mac_recv: FrameMac | None = None,
        channel: Channel | None = None,
    ) -> None:
        """`channel` (an authenticated, possibly encrypted, connection) or the bare `mac_*` tags."""
        self.reader = reader
        self.writer = writer
        self.channel = channel
        self.mac_send = channel.send if channel is not None else mac_send
        self.mac_recv = channel.recv if channel is not None else mac_recv
        self._send_lock = asyncio.Lock()

    @property
    def authenticated(self) -> bool:
        return self.mac_recv is not None or (self.channel is not None and self.channel.encrypted)

    async def send(self, kind: str, header: dict[str, Any], payload: bytes = b"") -> None:
        if self.writer.is_closing():  # the peer went away: a ConnectionError, not uvloop's RuntimeError
            raise ConnectionResetError("the other end closed the connection")
        async with self._send_lock:
            if self.channel is not None:
                await self.channel.write(self.writer, {**header, "kind": kind}, payload)
            else:
                await write_frame(self.writer, {**header, "kind": kind}, payload, mac=self.mac_send)

    async def recv(self) -> tuple[dict[str, Any], bytes]:
        """The next frame; StreamClosed at a clean end of stream, WireError on a forged one."""
        if self.channel is not None:
            return await self.channel.read(self.reader, max_payload=MAX_BUNDLE_BYTES)
        return await read_frame(self.reader, max_payload=MAX_BUNDLE_BYTES, mac=self.mac_recv)

    async def reply(self, ok: bool, **fields: Any) -> None:
        await self.send("reply", {"ok": ok, **fields})

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


Handler = Callable[[dict[str, Any], bytes, Conn], Awaitable[None]]


class ControlServer:
    """Accepts control connections and hands each first request to `handler`."""

    def __init__(
        self,
        handler: Handler,
        protocol: int = PROTOCOL_VERSION,
        keyring: Keyring | None = None,
        limiter: ConnectionLimiter | None = None,
    ) -> None:
        self._handler = handler
        self._protocol = protocol
        self.keyring = keyring
        self.limiter = limiter if limiter is not None else ConnectionLimiter()
        self.drops = ControlDrops()  # refused TCP connections and frames, by reason
        self._nonces = NonceMemory()
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: set[asyncio.Task[None]] = set()
        self.unix_path: Path | None = None

    async def start_tcp(self, host: str, port: int = 0) -> int:
        server = await asyncio.start_server(self._serve_tcp, host, port)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def start_unix(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._serve, str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._servers.append(server)
        self.unix_path = path

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Another agent: rate-limit, then authenticate the connection first when the mesh has a secret."""
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self.limiter.admit(source, time.monotonic()):
            self.drops.count(RATE_LIMITED)
            writer.close()  # no byte read, nothing allocated: the flood ends here
            return
        try:
            await self._serve(reader, writer, authenticate=self.keyring is not None)
        finally:
            self.limiter.release(source)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authenticate: bool = False
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        conn = Conn(reader, writer)
        handling = False
        header: dict[str, Any] = {}
        try:
            if authenticate:
                assert self.keyring is not None
                try:
                    channel = await accept_channel(
                        reader,
                        writer,
                        self.keyring,
                        self._nonces,
                        timeout=HANDSHAKE_TIMEOUT_S,
                        counters=self.drops,  # a refused proof, counted by its reason
                    )
                except WireError as exc:
                    if AUTH_FAILED not in str(exc):
                        self.drops.count(MALFORMED)  # not even a hello
                    return
                except asyncio.TimeoutError:
                    return
                conn = Conn(reader, writer, channel=channel)
            try:
                header, payload = await conn.recv()
            except WireError as exc:
                if conn.authenticated:
                    self.drops.count(BAD_TAG if "authentication" in str(exc) else MALFORMED)
                raise
            if header.get("kind") != "request":
                return
            if header.get("proto") != self._protocol:
                await conn.reply(
                    False,
                    error="protocol",
                    proto=self._protocol,
                    message=f"this agent speaks meshtrain protocol {self._protocol}, "
                    f"the request protocol {header.get('proto')}",
                )
                return
            handling = True
            await self._handler(header, payload, conn)
        except (WireError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a broken or hostile client ends only its own connection
        except asyncio.CancelledError:
            pass  # close() ends the connection: quietly (asyncio logs a cancelled client task as an error)
        except Exception:
            if handling:
                log.exception("control request %r failed", header.get("op"))
            else:  # a decoder bug on hostile input: counted, and still only this connection ends
                self.drops.count(MALFORMED)
        finally:
            self._conns.discard(task)
            await conn.close()

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.unix_path.unlink()


async def open_request(
    target: Path | tuple[str, int],
    op: str,
    payload: bytes = b"",
    *,
    protocol: int = PROTOCOL_VERSION,
    keyring: Keyring | None = None,
    **fields: Any,
) -> Conn:
    """Connect (unix path or (host, port)) and send the first request; the caller reads the answer.

    A TCP target is another agent: with `keyring` the connection is authenticated
    first (WireError "authentication failed: ..." when either side lacks the secret).
    """
    if isinstance(target, Path):
        reader, writer = await asyncio.open_unix_connection(str(target))
        conn = Conn(reader, writer)
    else:
        reader, writer = await asyncio.open_connection(target[0], target[1])
        conn = Conn(reader, writer)
        if keyring is not None:
            try:
                channel = await dial_channel(reader, writer, keyring, timeout=HANDSHAKE_TIMEOUT_S)
            except BaseException:
                await conn.close()
                raise
            conn = Conn(reader, writer, channel=channel)
    await conn.send("request", {"op": op, "proto": protocol, **fields}, payload)
    return conn


def check_reply(header: dict[str, Any], who: str) -> dict[str, Any]:
    """Raise UserError for an error reply, with the one line the user needs."""
    if header.get("kind") == "reply" and not header.get("ok"):
        if header.get("error") == "protocol":
            raise UserError(
                f"{who} speaks meshtrain protocol {header.get('proto')}, this meshtrain speaks "
                f"{PROTOCOL_VERSION}: run the same meshtrain version everywhere"
            )
        raise UserError(f"{who}: {header.get('message') or header.get('error')}")
    return header


async def call(
    target: Path | tuple[str, int],
    op: str,
    *,
    who: str = "the agent",
    keyring: Keyring | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """One request, one reply; a refused authentication is the one-line NO_SECRET UserError."""
    try:
        conn = await open_request(target, op, keyring=keyring, **fields)
    except WireError as exc:
        if AUTH_FAILED in str(exc):
            why = MODE_MISMATCH if MODE_MISMATCH_TEXT in str(exc) else NO_SECRET
            raise UserError(f"{who}: {why}") from None
        raise
    try:
        header, _ = await conn.recv()
    except StreamClosed:
        if not isinstance(target, Path) and keyring is None:
            raise UserError(f"{who}: {NO_SECRET}") from None
        raise UserError(f"{who} closed the connection without answering") from None
    finally:
        await conn.close()
    if header.get("error") == AUTH_FAILED:
        mismatch = MODE_MISMATCH_TEXT in str(header.get("reason", ""))
        raise UserError(f"{who}: {MODE_MISMATCH if mismatch else NO_SECRET}")
    return check_reply(header, who)
