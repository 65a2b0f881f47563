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

The ring port is open to the network, so the listener never lets a stranger
hold up a real neighbour. An acceptor thread takes every connection off the
backlog at once and reads all hellos concurrently (one poll loop, non-blocking
sockets), each with its own deadline (`HELLO_DEADLINE_S`) and at most
`MAX_PENDING_PER_SOURCE` unfinished handshakes per source address (the oldest
is dropped for a newer one). Only a hello that proves the secret (on an open
mesh: any well-formed hello) is parked for `Ring.connect` to claim, one per
(job, generation, rank): a newer one replaces an older, and a parked
connection whose dialer closed it is dropped, so a hello left over from an
earlier attempt is never taken for a live neighbour. Each dial carries a
fresh `attempt` nonce that the acceptor's answer echoes. Everything refused
is counted in `drops` (status shows it): a bad or missing proof by its
reason, garbage and silence past the deadline as `malformed`, connections
over the per-source cap as `rate_limited`.

A connect attempt can be cancelled (a `threading.Event`): a newer membership
view makes the attempt for the old one give up within a poll slice instead
of waiting out its timeout for a member that is gone.
"""

from __future__ import annotations

import contextlib
import errno
import secrets
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from meshtrain import wire
from meshtrain.errors import PeerLost, WireError
from meshtrain.security import handshake
from meshtrain.security.aead import StreamKey
from meshtrain.security.drops import MALFORMED, RATE_LIMITED, DropCounters
from meshtrain.security.handshake import HandshakeError, NonceMemory
from meshtrain.security.secret import Keyring

PROTOCOL_VERSION = 1
HELLO_DEADLINE_S = 2.0  # an accepted connection has this long to send its whole hello
MAX_HELLO_BYTES = 4096
MAX_PENDING_PER_SOURCE = 8  # unfinished handshakes per source address (the oldest goes for a newer)
MAX_PENDING = 256  # unfinished handshakes in all
MAX_PARKED_PER_SOURCE = 16  # checked hellos per source waiting to be claimed
PARKED_TTL_S = 120.0  # a checked hello nobody claimed within this is dropped
POLL_SLICE_S = 0.05  # how often a blocked connect looks at its cancel event
ATTEMPT_BYTES = 8


class RingPeerLost(PeerLost):
    """PeerLost raised by a ring: also says which rank the lost peer had in this generation."""

    def __init__(self, peer: str, rank: int, generation: int, reason: str = "") -> None:
        super().__init__(peer, generation, reason)
        self.rank = rank


class ConnectCancelled(PeerLost):
    """A ring connect attempt given up because a newer membership view arrived."""

    def __init__(self, generation: int) -> None:
        super().__init__("self", generation, "a newer membership view cancelled the connect")


def peer_lost(peer: str, rank: int, generation: int, reason: str) -> RingPeerLost:
    return RingPeerLost(peer, rank, generation, reason)


def tune(sock: socket.socket, sockbuf: int | None) -> None:
    """No Nagle delay (headers are tiny); optionally fixed kernel buffers (default: autotuning)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if sockbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sockbuf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sockbuf)


@dataclass(eq=False)
class _Pending:
    """An accepted connection whose hello is still coming."""

    sock: socket.socket
    source: str
    deadline: float
    buf: bytearray = field(default_factory=bytearray)


@dataclass(eq=False)
class _Parked:
    """A checked hello waiting for `Ring.connect` to claim it."""

    sock: socket.socket
    source: str
    hello: dict[str, Any]
    key: bytes | None
    arrived: float
    quiet: bool = True  # False once bytes arrived after the hello (not EOF: left for the ring to judge)

    @property
    def slot(self) -> tuple[Any, Any, Any]:
        return self.hello.get("job"), self.hello.get("gen"), self.hello.get("rank")


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    """True when the other end has closed (or reset) a connection that should be quiet."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class RingListener:
    """The socket a worker's left neighbour connects to; bound before the ring forms.

    It outlives ring generations: its acceptor thread (started by the first
    `Ring.connect`) keeps taking connections and checking hellos, and each
    connect claims the one of its job, generation and left rank.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.nonces = NonceMemory()  # dial nonces seen: a captured hello replayed later is refused
        self.rejected: str | None = None  # why the last connection failed authentication
        self.rejected_at = 0.0
        self.drops = DropCounters()  # hellos refused, by reason (for status and the live view)
        self.keyring: Keyring | None = None  # the mesh secret hellos must prove (set by connect)
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._parked: list[_Parked] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    @classmethod
    def bind(cls, host: str = "0.0.0.0", port: int = 0, backlog: int = 512) -> RingListener:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        return cls(sock)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        with self._cond:
            self._closed = True
            conns = [p.sock for p in self._pending] + [p.sock for p in self._parked]
            self._pending, self._parked = [], []
            self._cond.notify_all()
        for sock in conns:
            _close(sock)
        if self._thread is None:
            self.sock.close()
        elif self._thread is not threading.current_thread():
            self._thread.join(1.0)  # it closes the listening socket as it stops: the port is free now

    def __enter__(self) -> RingListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what Ring.connect calls -------------------------------------------------------------
    def start(self, keyring: Keyring | None) -> None:
        """Start accepting (once); hellos are checked against `keyring` from now on."""
        with self._cond:
            self.keyring = keyring
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._serve, name="meshtrain-ring-accept", daemon=True)
            self._thread.start()

    def claim(
        self, job: str, generation: int, rank: int, deadline: float, cancel: threading.Event | None
    ) -> _Parked | None:
        """The newest live checked hello of (job, generation, rank), waiting until `deadline`.

        None at the deadline; ConnectCancelled once `cancel` is set. Parked
        hellos of this job for older generations are dropped: their dialers
        have moved on.
        """
        with self._cond:
            while True:
                if cancel is not None and cancel.is_set():
                    raise ConnectCancelled(generation)
                stale = [
                    p
                    for p in self._parked
                    if p.hello.get("job") == job
                    and isinstance(p.hello.get("gen"), int)
                    and p.hello["gen"] < generation
                ]
                for p in stale:
                    self._parked.remove(p)
                    _close(p.sock)
                mine = [p for p in self._parked if p.slot == (job, generation, rank)]
                for p in sorted(mine, key=lambda p: p.arrived, reverse=True):
                    self._parked.remove(p)
                    if p.quiet and _closed_by_peer(p.sock):
                        _close(p.sock)  # its dialer gave up (an earlier attempt): never a neighbour
                        continue
                    return p
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return None
                self._cond.wait(min(remaining, POLL_SLICE_S))

    # --- the acceptor thread --------------------------------------------------------------------
    def _serve(self) -> None:
        self.sock.setblocking(False)
        try:
            while True:
                with self._cond:
                    if self._closed:
                        return
                    watched: dict[int, Any] = {self.sock.fileno(): self}
                    for p in self._pending:
                        watched[p.sock.fileno()] = p
                    for q in self._parked:
                        if q.quiet:
                            watched[q.sock.fileno()] = q
                    deadlines = [p.deadline for p in self._pending]
                poller = select.poll()
                for fd in watched:
                    poller.register(fd, select.POLLIN)
                now = time.monotonic()
                wait = min([0.25, *(d - now for d in deadlines)])
                try:
                    events = poller.poll(max(0.0, wait) * 1000)
                except OSError:
                    events = []
                for fd, _ in events:
                    target = watched.get(fd)
                    if target is self:
                        self._accept_all()
                    elif isinstance(target, _Pending):
                        self._read(target)
                    elif isinstance(target, _Parked):
                        self._watch_parked(target)
                self._expire(time.monotonic())
        finally:
            _close(self.sock)

    def _accept_all(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            conn.setblocking(False)
            source = str(addr[0]) if isinstance(addr, tuple) and addr else "?"
            with self._cond:
                if self._closed:
                    _close(conn)
                    return
                evicted: list[_Pending] = []
                same = [p for p in self._pending if p.source == source]
                if len(same) >= MAX_PENDING_PER_SOURCE:
                    evicted.append(same[0])  # the oldest unfinished handshake of this source
                elif len(self._pending) >= MAX_PENDING:
                    evicted.append(self._pending[0])
                for p in evicted:
                    self._pending.remove(p)
                    _close(p.sock)
                    self.drops.count(RATE_LIMITED)
                self._pending.append(_Pending(conn, source, time.monotonic() + HELLO_DEADLINE_S))

    def _drop_pending(self, p: _Pending, reason: str | None) -> None:
        with self._cond:
            if p in self._pending:
                self._pending.remove(p)
        _close(p.sock)
        if reason is not None:
            self.drops.count(reason)

    def _read(self, p: _Pending) -> None:
        """Read what the hello still needs (exactly: later bytes stay in the socket for the ring)."""
        need = wire.LENGTH_PREFIX.size
        if len(p.buf) >= need:
            try:
                need += wire.header_length(p.buf[:need], max_header=MAX_HELLO_BYTES)
            except WireError:
                self._drop_pending(p, MALFORMED)
                return
        try:
            data = p.sock.recv(need - len(p.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop_pending(p, MALFORMED if p.buf else None)
            return
        if not data:  # closed before a whole hello: a scanner, or a dialer that gave up
            self._drop_pending(p, MALFORMED if p.buf else None)
            return
        p.buf += data
        if len(p.buf) < wire.LENGTH_PREFIX.size:
            return
        try:
            total = wire.LENGTH_PREFIX.size + wire.header_length(
                p.buf[: wire.LENGTH_PREFIX.size], max_header=MAX_HELLO_BYTES
            )
        except WireError:
            self._drop_pending(p, MALFORMED)
            return
        if len(p.buf) < total:
            return
        try:
            hello = wire.decode_header(p.buf[wire.LENGTH_PREFIX.size : total], max_payload=0)
        except WireError:
            self._drop_pending(p, MALFORMED)
            return
        self._check(p, hello)

    def _check(self, p: _Pending, hello: dict[str, Any]) -> None:
        """A whole hello: refuse it (counted) or park it for the connect of its generation."""
        with self._cond:
            if p in self._pending:
                self._pending.remove(p)
            keyring = self.keyring
        slot_ok = (
            hello.get("kind") == wire.FrameKind.HELLO
            and isinstance(hello.get("job"), str)
            and isinstance(hello.get("gen"), int)
            and isinstance(hello.get("rank"), int)
        )
        if not slot_ok:
            _close(p.sock)
            self.drops.count(MALFORMED)
            return
        key: bytes | None = None
        if keyring is not None:
            try:
                key = handshake.check_dial(keyring, hello, self.nonces, time.time())
            except HandshakeError as exc:
                self.rejected, self.rejected_at = str(exc), time.monotonic()
                self.drops.count(exc.reason)
                with contextlib.suppress(OSError, WireError):
                    p.sock.send(
                        wire.encode_header(
                            {
                                "kind": wire.FrameKind.HELLO,
                                "nbytes": 0,
                                "error": AUTH_FAILED,
                                "reason": str(exc),
                            }
                        )
                    )
                _close(p.sock)
                return
        parked = _Parked(p.sock, p.source, hello, key, time.monotonic())
        with self._cond:
            if self._closed:
                _close(p.sock)
                return
            replaced = [q for q in self._parked if q.slot == parked.slot]  # an older attempt of that dialer
            same = [q for q in self._parked if q.source == p.source and q not in replaced]
            if len(same) >= MAX_PARKED_PER_SOURCE:
                replaced.append(same[0])
            for q in replaced:
                self._parked.remove(q)
                _close(q.sock)
            self._parked.append(parked)
            self._cond.notify_all()

    def _watch_parked(self, q: _Parked) -> None:
        """A parked connection became readable: its dialer closed it (drop it) or sent more (keep)."""
        with self._cond:
            if q not in self._parked:
                return  # claimed meanwhile: the connect owns the socket now
            try:
                gone = q.sock.recv(1, socket.MSG_PEEK) == b""
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                gone = True
            if gone:
                self._parked.remove(q)
                _close(q.sock)
            else:
                q.quiet = False  # bytes before our answer: the ring's frame checks will judge them

    def _expire(self, now: float) -> None:
        with self._cond:
            late = [p for p in self._pending if p.deadline <= now]
            old = [q for q in self._parked if now - q.arrived > PARKED_TTL_S]
            for p in late:
                self._pending.remove(p)
            for q in old:
                self._parked.remove(q)
        for p in late:
            _close(p.sock)
            self.drops.count(MALFORMED)  # silent or incomplete past the deadline
        for q in old:
            _close(q.sock)


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
    length = wire.header_length(_recv_exact(sock, wire.LENGTH_PREFIX.size), max_header=MAX_HELLO_BYTES)
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


def _wait(
    sock: socket.socket, *, write: bool, deadline: float, cancel: threading.Event | None, gen: int
) -> bool:
    """Wait until `sock` is readable (writable) in short slices; False at the deadline."""
    while True:
        if cancel is not None and cancel.is_set():
            raise ConnectCancelled(gen)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        slice_s = min(remaining, POLL_SLICE_S) if cancel is not None else remaining
        try:
            if write:
                ready = select.select([], [sock], [], slice_s)[1]
            else:
                ready = select.select([sock], [], [], slice_s)[0]
        except (OSError, ValueError):
            return True  # let the caller's socket call raise the real error
        if ready:
            return True


def _connect(
    addr: tuple[str, int], deadline: float, cancel: threading.Event | None, gen: int
) -> socket.socket | None:
    """A TCP connection to `addr`, or None when it fails or does not complete within 2 s (retry)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        code = sock.connect_ex(addr)
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            raise OSError(code, "connect failed")
        if code != 0:
            if not _wait(
                sock, write=True, deadline=min(deadline, time.monotonic() + 2.0), cancel=cancel, gen=gen
            ):
                raise OSError("connect timed out")
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, "connect failed")
    except OSError:
        sock.close()
        return None
    except BaseException:
        sock.close()
        raise
    sock.setblocking(True)
    return sock


def connect_neighbours(
    listener: RingListener,
    rank: int,
    addrs: list[tuple[str, int]],
    job: str,
    generation: int,
    timeout: float,
    sockbuf: int | None = None,
    keyring: Keyring | None = None,
    cancel: threading.Event | None = None,
) -> Neighbours:
    """Connected and checked neighbour sockets, or PeerLost naming the neighbour that failed.

    Dial the right and send our hello, then claim the left's checked hello
    from the listener and answer it, then wait for the right's answer; the
    listener reads hellos in its own thread, so no order of arrival deadlocks.
    With a keyring, a right neighbour that fails authentication is PeerLost at
    once (reason starting "authentication failed"), without retrying.
    `cancel` set (a newer view) ends the attempt with ConnectCancelled.
    """
    size = len(addrs)
    right_rank, left_rank = (rank + 1) % size, (rank - 1) % size
    started = time.monotonic()
    deadline = started + timeout
    hello = {"job": job, "gen": generation, "rank": rank, "size": size, "version": PROTOCOL_VERSION}
    listener.start(keyring)

    def right_lost(reason: str) -> PeerLost:
        host, port = addrs[right_rank]
        return peer_lost(f"{host}:{port}", right_rank, generation, reason)

    def dial() -> tuple[socket.socket, dict[str, Any]]:
        while True:
            if cancel is not None and cancel.is_set():
                raise ConnectCancelled(generation)
            if deadline - time.monotonic() <= 0:
                raise right_lost(f"could not connect within {timeout:g}s")
            sock = _connect(addrs[right_rank], deadline, cancel, generation)
            if sock is None:
                if cancel is not None and cancel.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                    raise ConnectCancelled(generation)
                if cancel is None:
                    time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                continue
            tune(sock, sockbuf)
            mine = {**hello, "attempt": secrets.token_bytes(ATTEMPT_BYTES)}  # this dial, and no other
            sent = mine if keyring is None else handshake.dial_hello(keyring, mine, time.time())
            try:
                sock.settimeout(max(0.001, min(2.0, deadline - time.monotonic())))
                send_hello(sock, sent)
            except OSError:
                sock.close()
                continue
            return sock, sent

    right, sent = dial()
    try:
        left, left_key = _accept_left(
            listener, left_rank, addrs, hello, deadline, timeout, sockbuf, keyring, started, cancel
        )
    except BaseException:
        right.close()  # the right neighbour sees end of stream now, not when this socket is collected
        raise
    right_key: StreamKey | None = None
    try:
        while True:
            try:
                if not _wait(right, write=False, deadline=deadline, cancel=cancel, gen=generation):
                    raise right_lost(f"no handshake acknowledgement within {timeout:g}s")
                right.settimeout(max(0.001, min(2.0, deadline - time.monotonic())))
                ack = recv_hello(right)
                if ack.get("error") == AUTH_FAILED:
                    raise HandshakeError(str(ack.get("reason", "the neighbour refused our proof")))
                echoed = ack.get("attempt", sent["attempt"]) == sent["attempt"]
                if ack.get("ok") is True and ack.get("gen") == generation and echoed:
                    if keyring is not None:
                        session = handshake.session_key(handshake.check_accept(keyring, sent, ack), sent, ack)
                        right_key = StreamKey(session, keyring.encrypt)
                    break
            except HandshakeError as exc:
                raise right_lost(f"{AUTH_FAILED}: {exc}") from None
            except (OSError, WireError, ConnectionError):
                pass
            right.close()
            if deadline - time.monotonic() <= 0:
                raise right_lost(f"no handshake acknowledgement within {timeout:g}s")
            right, sent = dial()
    except BaseException:
        right.close()
        left.close()
        raise
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
    started: float,
    cancel: threading.Event | None,
) -> tuple[socket.socket, StreamKey | None]:
    """The left neighbour's checked hello of this job and generation, answered; else PeerLost."""
    while True:
        parked = listener.claim(hello["job"], hello["gen"], left_rank, deadline, cancel)
        if parked is None:
            host, port = addrs[left_rank]
            rejected = listener.rejected if listener.rejected_at >= started else None
            why = f" (refused a connection: {AUTH_FAILED}: {rejected})" if rejected else ""
            raise peer_lost(
                f"{host}:{port}", left_rank, hello["gen"], f"did not connect within {timeout:g}s{why}"
            )
        conn, theirs = parked.sock, parked.hello
        if keyring is not None and parked.key is None:  # checked before this listener had the secret
            conn.close()
            continue
        ok = {**hello, "ok": True}
        if "attempt" in theirs:
            ok["attempt"] = theirs["attempt"]
        try:
            conn.setblocking(True)
            conn.settimeout(max(0.001, min(2.0, deadline - time.monotonic())))
            tune(conn, sockbuf)
            if keyring is None or parked.key is None:
                send_hello(conn, ok)
                return conn, None
            reply = handshake.accept_reply(parked.key, theirs, ok, encrypt=keyring.encrypt)
            send_hello(conn, reply)
            return conn, StreamKey(handshake.session_key(parked.key, theirs, reply), keyring.encrypt)
        except (OSError, WireError):
            conn.close()  # gone between the claim and our answer: wait for its next dial
