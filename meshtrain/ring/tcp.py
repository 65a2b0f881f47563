"""Sockets of a ring: the listener and the neighbour handshake.

Each member connects to its right neighbour and accepts from its left, and
both ends check job, generation and rank in a hello frame before a byte of
data flows, so a connection left over from an older generation, another
job or a stray client is dropped instead of corrupting a reduction.

With a keyring, the hello is also a challenge-response
(meshtrain.security.handshake): both ends prove they hold the mesh secret,
a replayed hello is refused, and each connection gets a fresh session key
with which every later frame is tagged, or, on a mesh with `--encrypt`, whose
payload is AES-GCM encrypted (a neighbour with the other setting is refused
as `mode_mismatch`).
"""

from __future__ import annotations

import socket
import time
from typing import Any

from meshtrain import wire
from meshtrain.errors import PeerLost, WireError
from meshtrain.security import handshake
from meshtrain.security.aead import StreamKey
from meshtrain.security.drops import DropCounters
from meshtrain.security.handshake import HandshakeError, NonceMemory
from meshtrain.security.secret import Keyring

PROTOCOL_VERSION = 1


class RingPeerLost(PeerLost):
    """PeerLost raised by a ring: also says which rank the lost peer had in this generation."""

    def __init__(self, peer: str, rank: int, generation: int, reason: str = "") -> None:
        super().__init__(peer, generation, reason)
        self.rank = rank


def peer_lost(peer: str, rank: int, generation: int, reason: str) -> RingPeerLost:
    return RingPeerLost(peer, rank, generation, reason)


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
        self.nonces = NonceMemory()  # dial nonces seen: a captured hello replayed later is refused
        self.rejected: str | None = None  # why the last connection failed authentication
        self.drops = DropCounters()  # hellos refused, by reason (for status and the live view)

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


class Neighbours:
    """The two checked sockets of a ring member and, when authenticated, their session keys.

    A key is the session's bytes (HMAC tags) or a StreamKey (which says whether frames are encrypted).
    """

    def __init__(
        self,
        left: socket.socket,
        right: socket.socket,
        left_key: bytes | StreamKey | None = None,
        right_key: bytes | StreamKey | None = None,
    ) -> None:
        self.left, self.right = left, right
        self.left_key, self.right_key = left_key, right_key


AUTH_FAILED = "authentication failed"


def connect_neighbours(
    listener: RingListener,
    rank: int,
    addrs: list[tuple[str, int]],
    job: str,
    generation: int,
    timeout: float,
    sockbuf: int | None = None,
    keyring: Keyring | None = None,
) -> Neighbours:
    """Connected and checked neighbour sockets, or PeerLost naming the neighbour that failed.

    Connect to the right first (the listen backlog completes it even before the
    right member calls accept), then accept the left, then wait for the
    right's acknowledgement; so no order of arrival deadlocks. With a
    keyring, a right neighbour that fails authentication is PeerLost at once
    (reason starting "authentication failed"), without retrying.
    """
    size = len(addrs)
    right_rank, left_rank = (rank + 1) % size, (rank - 1) % size
    deadline = time.monotonic() + timeout
    hello = {"job": job, "gen": generation, "rank": rank, "size": size, "version": PROTOCOL_VERSION}

    def right_lost(reason: str) -> PeerLost:
        host, port = addrs[right_rank]
        return peer_lost(f"{host}:{port}", right_rank, generation, reason)

    def dial() -> tuple[socket.socket, dict[str, Any]]:
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
            sent = hello if keyring is None else handshake.dial_hello(keyring, hello, time.time())
            send_hello(sock, sent)
            return sock, sent

    right, sent = dial()
    try:
        left, left_key = _accept_left(listener, left_rank, addrs, hello, deadline, timeout, sockbuf, keyring)
    except BaseException:
        right.close()  # the right neighbour sees end of stream now, not when this socket is collected
        raise
    right_key: StreamKey | None = None
    while True:
        remaining = deadline - time.monotonic()
        try:
            right.settimeout(max(remaining, 0.001))
            ack = recv_hello(right)
            if ack.get("error") == AUTH_FAILED:
                raise HandshakeError(str(ack.get("reason", "the neighbour refused our proof")))
            if ack.get("ok") is True and ack.get("gen") == generation:
                if keyring is not None:
                    session = handshake.session_key(handshake.check_accept(keyring, sent, ack), sent, ack)
                    right_key = StreamKey(session, keyring.encrypt)
                break
        except HandshakeError as exc:
            right.close()
            left.close()
            raise right_lost(f"{AUTH_FAILED}: {exc}") from None
        except (OSError, WireError, ConnectionError):
            pass
        right.close()
        if deadline - time.monotonic() <= 0:
            left.close()
            raise right_lost(f"no handshake acknowledgement within {timeout:g}s")
        right, sent = dial()
    for sock in (left, right):
        sock.settimeout(None)
        sock.setblocking(False)
    return Neighbours(left, right, left_key, right_key)


def _accept_left(
    listener: RingListener,
    left_rank: int,
    addrs: list[tuple[str, int]],
    hello: dict[str, Any],
    deadline: float,
    timeout: float,
    sockbuf: int | None,
    keyring: Keyring | None,
) -> tuple[socket.socket, StreamKey | None]:
    """Accept until the expected left neighbour of this job and generation says hello (and proves the key)."""
    rejected: str | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            host, port = addrs[left_rank]
            why = f" (refused a connection: {AUTH_FAILED}: {rejected})" if rejected else ""
            raise peer_lost(
                f"{host}:{port}", left_rank, hello["gen"], f"did not connect within {timeout:g}s{why}"
            )
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
                if keyring is None:
                    tune(conn, sockbuf)
                    send_hello(conn, {**hello, "ok": True})
                    return conn, None
                try:
                    key = handshake.check_dial(keyring, theirs, listener.nonces, time.time())
                except HandshakeError as exc:
                    rejected = listener.rejected = str(exc)
                    listener.drops.count(exc.reason)
                    send_hello(conn, {"error": AUTH_FAILED, "reason": str(exc)})
                else:
                    ok = {**hello, "ok": True}
                    reply = handshake.accept_reply(key, theirs, ok, encrypt=keyring.encrypt)
                    tune(conn, sockbuf)
                    send_hello(conn, reply)
                    return conn, StreamKey(handshake.session_key(key, theirs, reply), keyring.encrypt)
        except (OSError, WireError, ConnectionError):
            pass
        conn.close()  # another job, an old generation, a stranger, or garbage: not our neighbour
