"""The I/O of one all-reduce on blocking sockets: a receiver and a sender running in parallel.

Why threads and not the event loop: in CPython a blocking `recv_into` /
`sendmsg` releases the GIL for the whole kernel copy, and so do numpy's
reductions and casts, so a sender thread and a receiving caller thread move
and reduce bytes on two cores at once; a single event-loop thread does the
same copies one after the other. The logic stays out of here: the schedule
and `RingReduction` decide what every byte means, this only moves them.

Failure model: each blocking call has the ring's timeout (silence longer
than that is a stall). The member that sees a failure first records it and
passes an abort frame naming the lost peer to its right (after the frame in
flight, if any); each member forwards it, so every survivor raises PeerLost
naming the same peer within a few chunk times; the member left of the lost
one sees its sends fail and gets the abort from its left neighbour as well.

Authentication (when the handshake gave session keys): every frame is
followed by a 16-byte GCM tag over (implicit sequence number, header bytes,
payload) (`FrameGmac`: GHASH is several times cheaper per byte than
HMAC-SHA256, which decides busbw when cores are scarce), made in the sender
thread and checked in the receiving thread before the chunk is reduced, so a
forged, altered, replayed or reordered chunk or abort is a protocol error
(PeerLost), never a wrong sum. A bare `bytes` session key (callers that
build a RingLink themselves) gets the 32-byte HMAC-SHA256 `FrameMac`.

Encryption (`--encrypt`, a StreamKey with `encrypt`): the payload goes out as
AES-256-GCM ciphertext of the same length followed by the 16-byte GCM tag,
the header bytes (segment numbers, weights: no gradient values) in the clear
as associated data, nonce = the implicit frame number under a key of this
connection alone (meshtrain.security.aead). The sender encrypts into a
buffer it reuses; the receiver reads ciphertext into a scratch buffer and
decrypts straight into the reduction's receive buffer, so a frame costs one
pass of AES-GCM on each side and no allocation.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from meshtrain import wire
from meshtrain.errors import WireError
from meshtrain.ring.reduction import RingReduction
from meshtrain.security.aead import (
    AEAD_TAG_BYTES,
    RING,
    RING_MAC,
    FrameCipher,
    FrameGmac,
    StreamKey,
    derive_key,
    stream_cipher,
)
from meshtrain.security.handshake import FrameMac

_STAGING = 64 * 1024


class LinkFailed(Exception):
    """A neighbour's socket failed; `side` is "left" or "right", `reason` says how.

    `origin` is set when the failure was reported by an abort frame: the
    (peer, rank) that the member which first saw the failure blamed.
    """

    def __init__(self, side: str, reason: str, origin: tuple[str, int] | None = None) -> None:
        super().__init__(f"{side}: {reason}")
        self.side = side
        self.reason = reason
        self.origin = origin


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "stalled"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return f"connection reset ({exc.__class__.__name__})"
    if isinstance(exc, WireError):
        return f"protocol error: {exc}"
    return f"{exc.__class__.__name__}: {exc}"


class FrameReader:
    """Frames from a blocking socket: headers through a small staging buffer, payloads in place."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._staging = bytearray(_STAGING)
        self._view = memoryview(self._staging)
        self._lo = 0
        self._hi = 0
        self.head = b""  # the raw bytes (length prefix and header) of the last header read

    def _recv_some(self, into: memoryview) -> int:
        n = self.sock.recv_into(into)
        if n == 0:
            raise LinkFailed("left", "connection closed")
        return n

    def _fill(self, need: int) -> None:
        if self._hi - self._lo >= need:
            return
        if self._lo:
            pending = self._hi - self._lo
            self._staging[:pending] = self._staging[self._lo : self._hi]
            self._lo, self._hi = 0, pending
        while self._hi < need:
            self._hi += self._recv_some(self._view[self._hi :])

    def read_header(self, max_payload: int) -> dict[str, Any]:
        self._fill(wire.LENGTH_PREFIX.size)
        length = wire.header_length(self._view[self._lo : self._lo + 4], max_header=_STAGING - 4)
        self._fill(4 + length)
        start = self._lo
        self._lo += 4
        header = wire.decode_header(self._view[self._lo : self._lo + length], max_payload=max_payload)
        self._lo += length
        self.head = bytes(self._view[start : self._lo])
        return header

    def read_into(self, target: memoryview) -> None:
        """Fill `target` exactly: first from what the header read over-fetched, then from the socket."""
        n = target.nbytes
        staged = min(n, self._hi - self._lo)
        if staged:
            target[:staged] = self._view[self._lo : self._lo + staged]
            self._lo += staged
        while staged < n:
            staged += self._recv_some(target[staged:])


def send_frame(sock: socket.socket, head: bytes, payload: memoryview, tag: bytes = b"") -> None:
    """Header, payload and tag in one gathered write where the kernel takes it all (no joining copy)."""
    sent = sock.sendmsg([head, payload, tag]) if payload.nbytes else sock.send(head + tag)
    if sent < len(head):
        sock.sendall(memoryview(head)[sent:])
        sent = len(head)
    if sent - len(head) < payload.nbytes:
        sock.sendall(payload[sent - len(head) :])
        sent = len(head) + payload.nbytes
    if tag and sent - len(head) - payload.nbytes < len(tag):
        sock.sendall(tag[sent - len(head) - payload.nbytes :])


SessionKey = bytes | StreamKey
FrameTag = FrameMac | FrameGmac


def _protection(key: SessionKey | None) -> tuple[FrameTag | None, FrameCipher | None]:
    """(tagger, AES-GCM cipher) of one connection direction: at most one of them is set."""
    if key is None:
        return None, None
    if isinstance(key, StreamKey):
        if key.encrypt:
            return None, stream_cipher(key.session, RING)
        return FrameGmac(derive_key(key.session, RING_MAC)), None
    return FrameMac(key), None


class _Growing:
    """A reusable byte buffer that grows to the largest frame seen (no allocation per frame)."""

    def __init__(self) -> None:
        self._buf = bytearray(0)

    def view(self, n: int) -> memoryview:
        if len(self._buf) < n:
            self._buf = bytearray(n)
        return memoryview(self._buf)[:n]


class _Progress:
    """Receives completed so far, shared by the receiving and the sending thread."""

    def __init__(self) -> None:
        self.done = 0
        self.failed = False
        self._cond = threading.Condition()

    def advance(self, done: int) -> None:
        with self._cond:
            self.done = done
            self._cond.notify()

    def fail(self) -> None:
        with self._cond:
            self.failed = True
            self._cond.notify()

    def wait_for(self, count: int) -> bool:
        """Block until `count` receives are done; False if the all-reduce failed meanwhile."""
        with self._cond:
            while self.done < count and not self.failed:
                self._cond.wait()
            return not self.failed


class RingLink:
    """A member's two neighbour sockets, the sender thread, and the first failure of the ring.

    The caller's thread receives; a persistent daemon thread sends, running
    queued jobs (one per all-reduce, then possibly one that forwards an abort).
    """

    def __init__(
        self,
        left: socket.socket,
        right: socket.socket,
        timeout: float,
        left_key: SessionKey | None = None,
        right_key: SessionKey | None = None,
    ) -> None:
        self.left, self.right = left, right
        self.recv_mac, self.recv_cipher = _protection(left_key)
        self.send_mac, self.send_cipher = _protection(right_key)
        self.encrypted = self.send_cipher is not None
        self._tag = memoryview(bytearray(self.recv_mac.tag_bytes if self.recv_mac is not None else 0))
        self._sealed_out = _Growing()  # the sender thread's ciphertext buffer
        self._sealed_in = _Growing()  # the receiving thread's ciphertext buffer
        for sock in (left, right):
            sock.setblocking(True)
            sock.settimeout(timeout)  # a neighbour silent for longer than this has stalled
        self.reader = FrameReader(left)
        self.first: LinkFailed | None = None
        self._lock = threading.Lock()
        self._progress = _Progress()
        self._jobs: list[Callable[[], None]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._idle = threading.Event()
        self._idle.set()
        threading.Thread(target=self._serve, name="meshtrain-ring-send", daemon=True).start()

    # --- failures -------------------------------------------------------------------
    def fail(self, exc: LinkFailed, abort_header: dict[str, Any]) -> None:
        """Record `exc` if it is the first failure and start the abort it calls for.

        Recording comes before any shutdown, so the echo of our own shutdown on
        the other socket can never take the place of its cause.
        """
        with self._lock:
            if self.first is not None:
                return
            self.first = exc
        self._progress.fail()
        if exc.side == "left":  # tell the members on the right, after the frame in flight
            self._queue(lambda: self._forward_abort(abort_header))
        # A lost right neighbour needs nothing more: the receiver soon reads the abort that the
        # lost member's right neighbour starts, which comes around the ring from the left.
        # (Shutting our left socket instead would reset the left neighbour's sends, and it would
        # blame us.)

    def _forward_abort(self, header: dict[str, Any]) -> None:
        try:
            self.right.settimeout(min(self.right.gettimeout() or 1.0, 1.0))
            head = wire.encode_header({**header, "kind": wire.FrameKind.ABORT, "nbytes": 0})
            if self.send_cipher is not None:
                trailer = self.send_cipher.seal(head)
            else:
                trailer = self.send_mac.tag(head) if self.send_mac is not None else b""
            self.right.sendall(head + trailer)
        except OSError:
            pass
        _shutdown(self.right, socket.SHUT_WR)

    def close(self, linger: float = 1.0) -> None:
        """Shut both sockets (FIN, no reset of unread data), stop the sender and release the sockets.

        An abort still being forwarded gets up to `linger` seconds to reach the right neighbour.
        """
        if self.first is not None:
            deadline = time.monotonic() + linger
            self._idle.wait(linger)
            if self.first.side == "right":
                self._drain_left(deadline)
        with self._cond:
            self._closed = True
            self._cond.notify()
        for sock in (self.left, self.right):
            _shutdown(sock, socket.SHUT_RDWR)
            sock.close()

    def _drain_left(self, deadline: float) -> None:
        """Read and drop what the left neighbour still sends until it forwards the abort and closes.

        A member whose right neighbour died knows the culprit, but its left
        neighbour may not have heard yet and still be sending: closing on it
        now would reset its sends and make it blame us instead of the lost peer.
        """
        scratch = memoryview(bytearray(_STAGING))
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.left.settimeout(left)
                if self.left.recv_into(scratch) == 0:
                    return
            except OSError:
                return

    # --- the sender thread -------------------------------------------------------------
    def _queue(self, job: Callable[[], None]) -> None:
        with self._cond:
            self._idle.clear()
            self._jobs.append(job)
            self._cond.notify()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._idle.set()
                    self._cond.wait()
                if self._closed:
                    self._idle.set()
                    return
                job = self._jobs.pop(0)
            try:
                job()
            except LinkFailed as exc:
                self.fail(exc, {})
            except BaseException as exc:  # noqa: BLE001 - every failure ends the ring, none is lost
                self.fail(LinkFailed("right", _describe(exc)), {})

    def _read_payload(self, target: memoryview) -> None:
        """The payload of the frame whose header was just read, checked, into `target`.

        Encrypted ring: ciphertext and tag into the scratch buffer, decrypted into `target`.
        """
        if self.recv_cipher is None:
            self.reader.read_into(target)
            self._check_tag(target)
            return
        sealed = self._sealed_in.view(target.nbytes + AEAD_TAG_BYTES)
        self.reader.read_into(sealed)
        if not self.recv_cipher.open_into(self.reader.head, sealed, target):
            raise WireError("frame authentication failed (forged, altered or replayed frame)")

    def _check_tag(self, payload: memoryview | bytes) -> None:
        """Read the tag after a frame and check it (nothing to do on an unauthenticated ring)."""
        if self.recv_cipher is not None:
            self._read_payload(memoryview(bytearray(0)))
            return
        if self.recv_mac is None:
            return
        self.reader.read_into(self._tag)
        if not self.recv_mac.check(self.reader.head, payload, self._tag):
            raise WireError("frame authentication failed (forged, altered or replayed frame)")

    # --- one all-reduce -----------------------------------------------------------------
    def run_allreduce(self, reduction: RingReduction, header_base: dict[str, Any], lost: Any) -> None:
        """Stream one all-reduce: this thread receives and reduces while the sender thread sends.

        Raises the first LinkFailed. `lost(exc)` gives the (peer, rank) a
        failure blames, for the abort frame passed on to the right.
        """
        if self.first is not None:
            raise self.first
        self._progress = progress = _Progress()
        sched = reduction.schedule
        step, generation = header_base["step"], header_base["gen"]
        sock = self.right
        send_mac, send_cipher, sealed_out = self.send_mac, self.send_cipher, self._sealed_out

        def send_all() -> None:
            for i, t in enumerate(sched.sends):
                if progress.failed or (t.after >= 0 and not progress.wait_for(t.after + 1)):
                    return
                payload = reduction.send_payload(i)
                header = dict(header_base)
                header.update(
                    phase=t.phase,
                    seg=t.segment,
                    chunk=t.chunk,
                    w=reduction.send_weight(i),
                    nbytes=payload.nbytes,
                )
                head = wire.encode_header(header)
                tag = b""
                if send_cipher is not None:
                    sealed = sealed_out.view(payload.nbytes + AEAD_TAG_BYTES)
                    send_cipher.seal_into(head, payload, sealed)
                    payload, tag = sealed[: payload.nbytes], bytes(sealed[payload.nbytes :])
                elif send_mac is not None:
                    tag = send_mac.tag(head, payload)
                try:
                    send_frame(sock, head, payload, tag)
                except OSError as exc:
                    raise LinkFailed("right", _describe(exc)) from None

        self._queue(send_all)
        failure: LinkFailed | None = None
        try:
            for i, t in enumerate(sched.recvs):
                nbytes = reduction.recv_nbytes(i)
                header = self.reader.read_header(max_payload=nbytes)
                if header["kind"] == wire.FrameKind.ABORT:
                    self._check_tag(b"")
                    origin = (str(header.get("peer", "?")), int(header.get("rank", -1)))
                    raise LinkFailed("left", str(header.get("reason", "aborted upstream")), origin)
                fields = ("kind", "gen", "step", "phase", "chunk", "nbytes")
                got = tuple(header.get(k) for k in fields)
                expected = (wire.FrameKind.CHUNK, generation, step, t.phase, t.chunk, nbytes)
                if got != expected:
                    raise WireError(f"expected chunk {expected}, got {got}")
                self._read_payload(reduction.recv_buffer(i))
                reduction.received(i, float(header.get("w", 0.0)))
                progress.advance(i + 1)
        except LinkFailed as exc:
            failure = exc
        except (OSError, WireError, ValueError) as exc:
            failure = LinkFailed("left", _describe(exc))
        if failure is not None:
            peer, rank = failure.origin or lost(failure)
            self.fail(failure, {"gen": generation, "peer": peer, "rank": rank, "reason": failure.reason})
            assert self.first is not None
            raise self.first  # at once: the abort is forwarded by the sender thread meanwhile
        self._idle.wait()  # the sends of this all-reduce are done (or failed)
        if self.first is not None:
            raise self.first


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass
