"""Sockets of a ring: the listener, the neighbour handshake, and a framed channel.

Each member connects to its right neighbour and accepts from its left. The
handshake is plain blocking code (it runs once per ring generation); the
data path is a `Channel` on the background asyncio loop that reads frame
headers through a small staging buffer and payloads straight into the
caller's memoryview, and writes payload memoryviews straight to the kernel.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from meshtrain import wire
from meshtrain.errors import PeerLost, WireError

PROTOCOL_VERSION = 1
_STAGING = 64 * 1024


def peer_lost(peer: str, rank: int, generation: int, reason: str) -> PeerLost:
    """A PeerLost that also says which rank the peer had (`exc.rank`)."""
    exc = PeerLost(peer, generation, reason)
    exc.rank = rank  # type: ignore[attr-defined]
    return exc


def tune(sock: socket.socket, sockbuf: int | None) -> None:
    """No Nagle delay (headers are tiny); optionally fixed kernel buffers (default: autotuning)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if sockbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sockbuf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sockbuf)


class RingListener:
    """The socket a worker's left neighbour connects to; bound before the ring forms.

    It outlives ring generations: each `Ring.connect` accepts from it again and
    drops connections that belong to another job or generation.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def bind(cls, host: str = "0.0.0.0", port: int = 0, backlog: int = 64) -> RingListener:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        return cls(sock)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RingListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- blocking handshake -----------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        got = sock.recv(n - len(data))
        if not got:
            raise ConnectionError("closed during handshake")
        data += got
    return bytes(data)


def send_hello(sock: socket.socket, header: dict[str, Any]) -> None:
    sock.sendall(wire.encode_header({"kind": wire.FrameKind.HELLO, "nbytes": 0, **header}))


def recv_hello(sock: socket.socket) -> dict[str, Any]:
    length = wire.header_length(_recv_exact(sock, wire.LENGTH_PREFIX.size), max_header=4096)
    header = wire.decode_header(_recv_exact(sock, length), max_payload=0)
    if header["kind"] != wire.FrameKind.HELLO:
        raise WireError(f"expected hello, got {header['kind']!r}")
    return header


def connect_neighbours(
    listener: RingListener,
    rank: int,
    addrs: list[tuple[str, int]],
    job: str,
    generation: int,
    timeout: float,
    sockbuf: int | None = None,
) -> tuple[socket.socket, socket.socket]:
    """(left, right) connected and checked sockets, or PeerLost naming the neighbour that failed.

    Connect to the right first (the listen backlog completes it even before the
    right member calls accept), then accept the left, then wait for the
    right's acknowledgement; so no order of arrival deadlocks.
    """
    size = len(addrs)
    right_rank, left_rank = (rank + 1) % size, (rank - 1) % size
    deadline = time.monotonic() + timeout
    hello = {"job": job, "gen": generation, "rank": rank, "size": size, "version": PROTOCOL_VERSION}

    def right_lost(reason: str) -> PeerLost:
        host, port = addrs[right_rank]
        return peer_lost(f"{host}:{port}", right_rank, generation, reason)

    def dial() -> socket.socket:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise right_lost(f"could not connect within {timeout:g}s")
            try:
                sock = socket.create_connection(addrs[right_rank], timeout=min(remaining, 2.0))
            except OSError:
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                continue
            tune(sock, sockbuf)
            send_hello(sock, hello)
            return sock

    right = dial()
    left = _accept_left(listener, left_rank, addrs, hello, deadline, timeout, sockbuf)
    while True:
        remaining = deadline - time.monotonic()
        try:
            right.settimeout(max(remaining, 0.001))
            ack = recv_hello(right)
            if ack.get("ok") is True and ack.get("gen") == generation:
                break
        except (OSError, WireError, ConnectionError):
            pass
        right.close()
        if deadline - time.monotonic() <= 0:
            left.close()
            raise right_lost(f"no handshake acknowledgement within {timeout:g}s")
        right = dial()
    for sock in (left, right):
        sock.settimeout(None)
        sock.setblocking(False)
    return left, right


def _accept_left(
    listener: RingListener,
    left_rank: int,
    addrs: list[tuple[str, int]],
    hello: dict[str, Any],
    deadline: float,
    timeout: float,
    sockbuf: int | None,
) -> socket.socket:
    """Accept until the expected left neighbour of this job and generation says hello."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            host, port = addrs[left_rank]
            raise peer_lost(f"{host}:{port}", left_rank, hello["gen"], f"did not connect within {timeout:g}s")
        listener.sock.settimeout(remaining)
        try:
            conn, _ = listener.sock.accept()
        except OSError:
            continue
        try:
            conn.settimeout(min(max(deadline - time.monotonic(), 0.001), 2.0))
            theirs = recv_hello(conn)
            expected = {**hello, "rank": left_rank}
            if all(theirs.get(k) == v for k, v in expected.items()):
                tune(conn, sockbuf)
                send_hello(conn, {**hello, "ok": True})
                return conn
        except (OSError, WireError, ConnectionError):
            pass
        conn.close()  # another job, an old generation, or garbage: not our neighbour


# --- asyncio data channel ---------------------------------------------------------


class ChannelClosed(Exception):
    """The neighbour's side of the stream is gone (EOF or reset); `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Channel:
    """A non-blocking socket on the ring loop that reads and writes frames without payload copies."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self._staging = bytearray(_STAGING)
        self._view = memoryview(self._staging)
        self._lo = 0
        self._hi = 0
        self.last_progress = loop.time()
        self.blocked = False  # inside a send or receive that is waiting on the peer

    async def _recv_some(self, into: memoryview) -> int:
        self.blocked = True
        try:
            n = await self.loop.sock_recv_into(self.sock, into)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise ChannelClosed(f"connection reset ({exc.__class__.__name__})") from None
        except OSError as exc:
            raise ChannelClosed(f"socket error ({exc})") from None
        finally:
            self.blocked = False
        if n == 0:
            raise ChannelClosed("connection closed")
        self.last_progress = self.loop.time()
        return n

    async def _fill(self, need: int) -> None:
        """Make at least `need` bytes available in the staging buffer."""
        if self._hi - self._lo >= need:
            return
        if self._lo:
            pending = self._hi - self._lo
            self._staging[:pending] = self._staging[self._lo : self._hi]
            self._lo, self._hi = 0, pending
        while self._hi < need:
            self._hi += await self._recv_some(self._view[self._hi :])

    async def read_header(self, max_payload: int) -> dict[str, Any]:
        await self._fill(wire.LENGTH_PREFIX.size)
        length = wire.header_length(self._view[self._lo : self._lo + 4], max_header=_STAGING - 4)
        self._lo += 4
        await self._fill(length)
        header = wire.decode_header(self._view[self._lo : self._lo + length], max_payload=max_payload)
        self._lo += length
        return header

    async def read_into(self, target: memoryview) -> None:
        """Fill `target` exactly: first from what the header read over-fetched, then from the socket."""
        n = target.nbytes
        staged = min(n, self._hi - self._lo)
        if staged:
            target[:staged] = self._view[self._lo : self._lo + staged]
            self._lo += staged
        while staged < n:
            staged += await self._recv_some(target[staged:])

    async def write(self, head: bytes, payload: memoryview | None = None) -> None:
        self.blocked = True
        try:
            await self.loop.sock_sendall(self.sock, head)
            if payload is not None and payload.nbytes:
                await self.loop.sock_sendall(self.sock, payload)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise ChannelClosed(f"connection reset ({exc.__class__.__name__})") from None
        except OSError as exc:
            raise ChannelClosed(f"socket error ({exc})") from None
        finally:
            self.blocked = False
        self.last_progress = self.loop.time()

    def shutdown(self) -> None:
        """Tell the neighbour at once (FIN) without risking a reset of data it has not read."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown()
        self.sock.close()
