"""The worker's one-way channel to its agent: a pipe carrying msgpack messages.

Reporting every training step must not slow the step, so `report` only
appends to a list; at most every `interval` seconds the batch is packed and
written to a non-blocking pipe. A full pipe (agent busy) never blocks the
step: the bytes wait in memory for the next flush. `close` flushes blocking,
so the final metrics (test accuracy) are never lost.

A pipe between a parent and its own child needs no framing beyond msgpack's
self-delimiting encoding; network traffic uses meshtrain.wire.

Thread-safe: a checkpoint's writer thread sends its ack while the training
thread reports. `send` and `close` hold the pipe lock; `report` never waits
for it (it skips a flush the other thread is doing).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import msgpack

FLUSH_INTERVAL_S = 0.2


class Reporter:
    """Batches messages for the agent on file descriptor `fd` (None: discard)."""

    def __init__(self, fd: int | None, interval: float = FLUSH_INTERVAL_S) -> None:
        self._fd = fd
        self._interval = interval
        self._batch: list[tuple[float, dict[str, Any]]] = []
        self._pending = bytearray()
        self._last_flush = 0.0
        self._lock = threading.Lock()  # the pipe and _pending
        self._batch_lock = threading.Lock()  # only the batch list: never held across I/O
        if fd is not None:
            os.set_blocking(fd, False)

    def send(self, message: dict[str, Any]) -> None:
        """A control message (ready, crash): written now, in order after pending metrics."""
        with self._lock:
            self._queue_batch()
            self._pending += msgpack.packb(message, use_bin_type=True)
            self._drain(block=True)

    def report(self, metrics: dict[str, Any]) -> None:
        """Queue one step's metrics; cheap unless a flush is due."""
        if self._fd is None:
            return
        now = time.time()
        with self._batch_lock:
            self._batch.append((now, metrics))
        if now - self._last_flush >= self._interval and self._lock.acquire(blocking=False):
            try:
                self._last_flush = now
                self._queue_batch()
                self._drain(block=False)
            finally:
                self._lock.release()

    def flush(self) -> None:
        """Send what is queued now (a paused worker reports no steps that would flush it)."""
        self.close()

    def close(self) -> None:
        """Flush everything, waiting for the agent if it must."""
        if self._fd is None:
            return
        with self._lock:
            self._queue_batch()
            self._drain(block=True)

    def _queue_batch(self) -> None:
        with self._batch_lock:
            batch, self._batch = self._batch, []
        if batch:
            self._pending += msgpack.packb({"k": "m", "batch": batch}, use_bin_type=True)

    def _drain(self, block: bool) -> None:
        if self._fd is None or not self._pending:
            return
        os.set_blocking(self._fd, block)
        try:
            while self._pending:
                try:
                    written = os.write(self._fd, self._pending)
                except BlockingIOError:
                    return
                del self._pending[:written]
        except BrokenPipeError:
            self._pending.clear()  # the agent is gone; the job is being torn down
            self._fd = None
        finally:
            if self._fd is not None:
                os.set_blocking(self._fd, False)
