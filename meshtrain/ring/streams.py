"""The I/O of one all-reduce on blocking sockets: a receiver and a sender running in parallel.

Why threads and not the event loop: in CPython a blocking `recv_into` /
`sendmsg` releases the GIL for the whole kernel copy, and so do numpy's
reductions and casts, so a sender thread and a receiving caller thread move
and reduce bytes on two cores at once; a single event-loop thread does the
same copies one after the other. The logic stays out of here: the schedule
and `RingReduction` decide what every byte means, this only moves them.

Failure model: each blocking call has the ring's timeout (silence longer
than that is a stall); any failure shuts both sockets down, which wakes the
other thread at once and shows the neighbours end of stream, so the abort
runs around the ring in milliseconds.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

from meshtrain import wire
from meshtrain.errors import WireError
from meshtrain.ring.reduction import RingReduction

_STAGING = 64 * 1024


class LinkFailed(Exception):
    """A neighbour's socket failed; `side` is "left" or "right", `reason` says how."""

    def __init__(self, side: str, reason: str) -> None:
        super().__init__(f"{side}: {reason}")
        self.side = side
        self.reason = reason


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
        self._lo += 4
        self._fill(length)
        header = wire.decode_header(self._view[self._lo : self._lo + length], max_payload=max_payload)
        self._lo += length
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


def send_frame(sock: socket.socket, head: bytes, payload: memoryview) -> None:
    """Header and payload in one gathered write where the kernel takes it all (no joining copy)."""
    sent = sock.sendmsg([head, payload]) if payload.nbytes else sock.send(head)
    if sent < len(head):
        sock.sendall(memoryview(head)[sent:])
        sent = len(head)
    if sent - len(head) < payload.nbytes:
        sock.sendall(payload[sent - len(head) :])


class FirstFailure:
    """The failure that ended the ring first; later ones are its echoes (our own shutdown).

    Recording happens before the sockets are shut down, so the echo of a
    shutdown can never take the place of its cause.
    """

    def __init__(self, shutdown: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._shutdown = shutdown
        self.first: LinkFailed | None = None

    def record(self, exc: LinkFailed) -> None:
        with self._lock:
            if self.first is None:
                self.first = exc
        self._shutdown()


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


class Sender:
    """The persistent thread that writes one all-reduce's chunks to the right neighbour."""

    def __init__(self, sock: socket.socket, failure: FirstFailure) -> None:
        self.sock = sock
        self.failure = failure
        self._jobs: list[Callable[[], None]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="meshtrain-ring-send", daemon=True)
        self._thread.start()

    def start(self, job: Callable[[], None]) -> None:
        self._done.clear()
        with self._cond:
            self._jobs.append(job)
            self._cond.notify()

    def wait(self) -> None:
        self._done.wait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._jobs.pop(0)
            try:
                job()
            except LinkFailed as exc:
                self.failure.record(exc)
            except BaseException as exc:  # noqa: BLE001 - every failure ends the ring, none is lost
                self.failure.record(LinkFailed("right", _describe(exc)))
            finally:
                self._done.set()


def run_allreduce(
    reduction: RingReduction,
    reader: FrameReader,
    sender: Sender,
    header_base: dict[str, Any],
    progress: _Progress | None = None,
) -> None:
    """Stream one all-reduce: the calling thread receives and reduces while `sender` sends.

    Raises LinkFailed naming the side that failed first.
    """
    progress = progress or _Progress()
    sched = reduction.schedule
    step, generation = header_base["step"], header_base["gen"]

    def send_all() -> None:
        for i, t in enumerate(sched.sends):
            if t.after >= 0 and not progress.wait_for(t.after + 1):
                return
            payload = reduction.send_payload(i)
            header = dict(header_base)
            header.update(
                phase=t.phase, seg=t.segment, chunk=t.chunk, w=reduction.send_weight(i), nbytes=payload.nbytes
            )
            try:
                send_frame(sender.sock, wire.encode_header(header), payload)
            except OSError as exc:
                raise LinkFailed("right", _describe(exc)) from None

    sender.start(send_all)
    try:
        for i, t in enumerate(sched.recvs):
            nbytes = reduction.recv_nbytes(i)
            header = reader.read_header(max_payload=nbytes)
            if header["kind"] == wire.FrameKind.ABORT:
                raise LinkFailed("left", f"aborted upstream: {header.get('reason', '')}")
            got = (header["kind"], header.get("gen"), header.get("step"), header.get("phase"))
            got += (header.get("chunk"), header["nbytes"])
            expected = (wire.FrameKind.CHUNK, generation, step, t.phase, t.chunk, nbytes)
            if got != expected:
                raise WireError(f"expected chunk {expected}, got {got}")
            reader.read_into(reduction.recv_buffer(i))
            reduction.received(i, float(header.get("w", 0.0)))
            progress.advance(i + 1)
    except LinkFailed as exc:
        sender.failure.record(exc)
    except (OSError, WireError, ValueError) as exc:
        sender.failure.record(LinkFailed("left", _describe(exc)))
    if sender.failure.first is not None:
        progress.fail()
    sender.wait()
    if sender.failure.first is not None:
        raise sender.failure.first
