"""`Ring`: the synchronous all-reduce a worker calls, over the asyncio TCP shell.

One call streams the schedule (meshtrain.ring.schedule) with two tasks on the
background loop: a receiver that reads chunk frames from the left into the
reduction's buffers, and a sender that writes each chunk to the right as soon
as the receive it depends on has been reduced. A watchdog turns silence longer
than `timeout` into PeerLost. Any failure shuts both sockets down, which the
neighbours see at once as end of stream, so the abort travels around the ring
and every survivor raises PeerLost within milliseconds; the ring is then dead
(its generation is over) and every later call raises the same error.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from meshtrain import wire
from meshtrain.errors import PeerLost, WireError
from meshtrain.ring import loop as ring_loop
from meshtrain.ring import tensors
from meshtrain.ring.reduction import RingReduction
from meshtrain.ring.schedule import RingSchedule
from meshtrain.ring.tcp import Channel, ChannelClosed, RingListener, connect_neighbours, peer_lost

DEFAULT_CHUNK_BYTES = 1 << 20


class Ring:
    """A connected ring of `size` members in which this process is `rank`."""

    def __init__(
        self,
        rank: int,
        addrs: list[tuple[str, int]],
        job: str,
        generation: int,
        timeout: float,
        channels: tuple[Channel, Channel] | None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.rank = rank
        self.size = len(addrs)
        self.addrs = addrs
        self.job = job
        self.generation = generation
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._channels = channels
        self._broken: PeerLost | None = None
        self.last_stats: dict[str, float] = {}

    @classmethod
    def connect(
        cls,
        listener: RingListener,
        rank: int,
        addrs: list[tuple[str, int]],
        job: str,
        generation: int,
        timeout: float = 10.0,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        sockbuf: int | None = None,
    ) -> Ring:
        """Form the ring (blocking): connect right, accept left, both checked for job and generation."""
        addrs = [(str(h), int(p)) for h, p in addrs]
        if not 0 <= rank < len(addrs):
            raise ValueError(f"rank {rank} outside a ring of {len(addrs)}")
        if len(addrs) == 1:
            return cls(rank, addrs, job, generation, timeout, None, chunk_bytes)
        left, right = connect_neighbours(listener, rank, addrs, job, generation, timeout, sockbuf)
        loop = ring_loop.background_loop()
        return cls(
            rank, addrs, job, generation, timeout, (Channel(left, loop), Channel(right, loop)), chunk_bytes
        )

    # --- public all-reduce -----------------------------------------------------------
    def allreduce(
        self, buf: np.ndarray, step: int = 0, weight: float = 1.0, wire_dtype: str | None = None
    ) -> np.ndarray:
        """sum(w_i * x_i) / sum(w_i) over the ring, identical on every member; `buf` is not modified."""
        name = tensors.wire_dtype_name(wire_dtype)
        x = np.asarray(buf)
        if x.ndim != 1 or x.dtype != np.float32:
            raise ValueError("allreduce takes a 1-D float32 numpy array")
        if self.size == 1:
            self._check_alive()
            return x
        acc = np.multiply(x, np.float32(weight)) if weight != 1.0 else x.copy()
        return self.allreduce_inplace(acc, step=step, weight=weight, wire_dtype=name)

    def allreduce_tree(
        self, tree: Any, step: int = 0, weight: float = 1.0, wire_dtype: str | None = None
    ) -> Any:
        """Weighted mean of an MLX array tree, fused into one buffer; same structure back."""
        name = tensors.wire_dtype_name(wire_dtype)
        if self.size == 1:
            self._check_alive()
            return tree
        flat, layout = tensors.flatten_tree(tree)
        if weight != 1.0:
            flat *= np.float32(weight)
        self.allreduce_inplace(flat, step=step, weight=weight, wire_dtype=name)
        return tensors.unflatten_tree(tree, flat, layout)

    def allreduce_inplace(
        self, acc: np.ndarray, step: int = 0, weight: float = 1.0, wire_dtype: str = "float32"
    ) -> np.ndarray:
        """All-reduce `acc` (float32, already multiplied by `weight`) in place; returns it."""
        self._check_alive()
        if self.size == 1:
            if weight != 1.0:
                acc /= np.float32(weight)
            return acc
        if not weight >= 0:
            raise ValueError(f"all-reduce weight must be >= 0 (got {weight})")
        name = tensors.wire_dtype_name(wire_dtype)
        itemsize = tensors.wire_numpy_dtype(name).itemsize
        schedule = RingSchedule(self.size, self.rank, acc.size, max(1, self.chunk_bytes // itemsize))
        reduction = RingReduction(schedule, acc, weight, name)
        started = time.perf_counter()
        ring_loop.run_sync(self._run(reduction, step))
        seconds = time.perf_counter() - started
        nbytes = acc.nbytes
        self.last_stats = {
            "bytes": float(nbytes),
            "wire_bytes": float(acc.size * itemsize),
            "seconds": seconds,
            "busbw": 2 * (self.size - 1) / self.size * nbytes / seconds if seconds > 0 else 0.0,
            "step": float(step),
        }
        return acc

    def close(self) -> None:
        """Leave the ring: the neighbours see end of stream (PeerLost if they are mid all-reduce)."""
        if self._channels is not None:
            for channel in self._channels:
                channel.close()
            self._channels = None
        if self._broken is None:
            self._broken = PeerLost("self", self.generation, "ring closed")

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the I/O of one all-reduce --------------------------------------------------------
    def _check_alive(self) -> None:
        if self._broken is not None:
            raise self._broken

    def _peer(self, rank: int, reason: str) -> PeerLost:
        host, port = self.addrs[rank]
        return peer_lost(f"{host}:{port}", rank, self.generation, reason)

    async def _run(self, reduction: RingReduction, step: int) -> None:
        assert self._channels is not None
        left, right = self._channels
        left_rank, right_rank = (self.rank - 1) % self.size, (self.rank + 1) % self.size
        progress = _Progress()
        loop = asyncio.get_running_loop()
        left.last_progress = right.last_progress = loop.time()
        tasks = [
            asyncio.ensure_future(self._receive(left, reduction, step, progress)),
            asyncio.ensure_future(self._send(right, reduction, step, progress)),
        ]
        error: PeerLost | None = None
        try:
            pending = set(tasks)
            while pending and error is None:
                done, pending = await asyncio.wait(
                    pending, timeout=min(self.timeout / 4, 0.5), return_when=asyncio.FIRST_EXCEPTION
                )
                for task in done:
                    exc = task.exception()
                    if exc is not None:
                        error = self._as_peer_lost(exc, task is tasks[0], left_rank, right_rank)
                        break
                if error is None and pending:
                    now = loop.time()
                    if tasks[0] in pending and now - left.last_progress > self.timeout:
                        error = self._peer(left_rank, f"stalled for more than {self.timeout:g}s")
                    elif right.blocked and now - right.last_progress > self.timeout:
                        error = self._peer(right_rank, f"stalled for more than {self.timeout:g}s")
        except asyncio.CancelledError:
            error = PeerLost("self", self.generation, "all-reduce interrupted")
        if error is not None:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            left.shutdown()
            right.shutdown()
            self._broken = error
            raise error

    def _as_peer_lost(self, exc: BaseException, receiving: bool, left_rank: int, right_rank: int) -> PeerLost:
        if isinstance(exc, PeerLost):
            return exc
        rank = left_rank if receiving else right_rank
        if isinstance(exc, ChannelClosed):
            return self._peer(rank, exc.reason)
        if isinstance(exc, WireError):
            return self._peer(rank, f"protocol error: {exc}")
        return self._peer(rank, f"{exc.__class__.__name__}: {exc}")

    async def _receive(self, left: Channel, reduction: RingReduction, step: int, progress: _Progress) -> None:
        left_rank = (self.rank - 1) % self.size
        for i, t in enumerate(reduction.schedule.recvs):
            header = await left.read_header(max_payload=reduction.recv_nbytes(i))
            kind = header["kind"]
            if kind == wire.FrameKind.ABORT:
                raise self._peer(left_rank, f"aborted upstream: {header.get('reason', '')}")
            expected = (
                wire.FrameKind.CHUNK,
                self.generation,
                step,
                t.phase,
                t.chunk,
                reduction.recv_nbytes(i),
            )
            got = (kind, header.get("gen"), header.get("step"), header.get("phase"), header.get("chunk"))
            if got + (header["nbytes"],) != expected:
                raise WireError(f"expected chunk {expected}, got {got + (header['nbytes'],)}")
            await left.read_into(reduction.recv_buffer(i))
            reduction.received(i, float(header.get("w", 0.0)))
            progress.advance(i + 1)

    async def _send(self, right: Channel, reduction: RingReduction, step: int, progress: _Progress) -> None:
        dtype = reduction.wire_dtype
        for i, t in enumerate(reduction.schedule.sends):
            if t.after >= 0:
                await progress.wait_for(t.after + 1)
            payload = reduction.send_payload(i)
            head = wire.encode_header(
                {
                    "kind": wire.FrameKind.CHUNK,
                    "job": self.job,
                    "gen": self.generation,
                    "step": step,
                    "phase": t.phase,
                    "seg": t.segment,
                    "chunk": t.chunk,
                    "dtype": dtype,
                    "w": reduction.send_weight(i),
                    "nbytes": payload.nbytes,
                }
            )
            await right.write(head, payload)


class _Progress:
    """How many receives are complete; the sender awaits the one it depends on."""

    def __init__(self) -> None:
        self.done = 0
        self._waiter: asyncio.Future[None] | None = None
        self._target = 0

    def advance(self, done: int) -> None:
        self.done = done
        if self._waiter is not None and done >= self._target and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait_for(self, count: int) -> None:
        if self.done >= count:
            return
        self._target = count
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
