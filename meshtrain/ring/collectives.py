"""Reduce-scatter and all-gather on their own: schedules and per-member buffers (pure).

Sharded training (meshtrain.shard) needs the two halves of the ring
all-reduce separately: a reduce-scatter leaves member r with only its shard
of the weighted mean of the gradients (no member ever holds the whole sum),
and an all-gather hands every member the shards the others updated. Each is
N-1 phases of the same ring pattern as the all-reduce (meshtrain.ring.schedule),
cut into sub-chunks so sending chunk k overlaps receiving chunk k+1, and each
travels over the same authenticated (or encrypted) neighbour sockets and the
same streaming shell (meshtrain.ring.streams), which only asks an operation
for payloads and receive buffers.

Shards may be uneven (a node with more free memory holds more): `bounds` is
one contiguous [start, stop) per member, in rank order, covering the buffer.

Reduce-scatter, phase p: member r sends shard (r - p - 1) mod N and receives
shard (r - p - 2) mod N, adding its own contribution to it; after N-1 phases
the last shard it received is its own, r, complete. A received partial sum
plus the member's own contribution lands in an accumulator, which may be the
member's own (weighted) buffer when the caller no longer needs it: a shard is
received at one phase, sent at the next and never received again, so the sum
can overwrite the contribution it was made from. Apart from its result the
operation then needs only two chunk-sized scratch buffers. Weights ride in the chunk headers exactly as in the
all-reduce (the running sum), so the owner divides by the total.

All-gather, phase p: member r sends shard (r - p) mod N (its own at phase 0)
and receives shard (r - p - 1) mod N into the full output buffer. With a
16-bit wire a received shard is forwarded re-encoded from its float32
widening, which reproduces the wire bits exactly, and the owner rounds its own
shard through the wire dtype too, so every member holds bit-identical output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from meshtrain.ring import tensors
from meshtrain.ring.schedule import Transfer, chunk_bounds

REDUCE_SCATTER = "reduce_scatter"
ALL_GATHER = "all_gather"


def shard_bounds(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous [start, stop) of each member's shard, from the shard sizes in rank order."""
    bounds, start = [], 0
    for size in sizes:
        if int(size) < 0:
            raise ValueError(f"shard sizes must be >= 0 (got {list(sizes)})")
        bounds.append((start, start + int(size)))
        start += int(size)
    return bounds


class CollectiveSchedule:
    """The ordered sends and receives of member `rank` in a reduce-scatter or all-gather."""

    def __init__(
        self, kind: str, size: int, rank: int, bounds: Sequence[tuple[int, int]], chunk_elems: int
    ) -> None:
        if kind not in (REDUCE_SCATTER, ALL_GATHER):
            raise ValueError(f"unknown collective {kind!r}")
        if size < 2:
            raise ValueError("a ring collective needs at least 2 members")
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} outside a ring of {size}")
        if len(bounds) != size or chunk_elems < 1:
            raise ValueError("one shard per member and chunk_elems >= 1")
        if any(lo > hi for lo, hi in bounds) or any(
            bounds[i][1] != bounds[i + 1][0] for i in range(size - 1)
        ):
            raise ValueError(f"shards must be contiguous and in rank order (got {list(bounds)})")
        self.kind, self.size, self.rank, self.chunk_elems = kind, size, rank, chunk_elems
        self.bounds = [(int(lo), int(hi)) for lo, hi in bounds]
        self.count = self.bounds[-1][1] - self.bounds[0][0]
        self.phases = size - 1
        self.reduce = kind == REDUCE_SCATTER
        self.recvs: list[Transfer] = []
        self.sends: list[Transfer] = []
        recv_index: dict[tuple[int, int], int] = {}
        for phase in range(self.phases):
            shard = self.recv_shard(phase)
            for k, (lo, hi) in enumerate(chunk_bounds(*self.bounds[shard], chunk_elems)):
                recv_index[(phase, k)] = len(self.recvs)
                self.recvs.append(Transfer(phase, shard, k, lo, hi, reduce=self.reduce))
        for phase in range(self.phases):
            shard = self.send_shard(phase)
            for k, (lo, hi) in enumerate(chunk_bounds(*self.bounds[shard], chunk_elems)):
                after = recv_index[(phase - 1, k)] if phase > 0 else -1
                self.sends.append(Transfer(phase, shard, k, lo, hi, reduce=self.reduce, after=after))

    def send_shard(self, phase: int) -> int:
        offset = 1 if self.reduce else 0
        return (self.rank - phase - offset) % self.size

    def recv_shard(self, phase: int) -> int:
        offset = 2 if self.reduce else 1
        return (self.rank - phase - offset) % self.size

    @property
    def own(self) -> tuple[int, int]:
        """[start, stop) of this member's shard."""
        return self.bounds[self.rank]


class _Scratch:
    """Chunk-sized buffers: one the receiving thread lands payloads in, one the sender encodes into.

    The shell sends one frame at a time and receives one frame at a time, so
    one of each is enough whatever the length of the buffer.
    """

    def __init__(self, schedule: CollectiveSchedule, wire_dtype: str) -> None:
        biggest = max((t.count for t in schedule.recvs + schedule.sends), default=0)
        self.wire_type = tensors.wire_numpy_dtype(wire_dtype)
        self.recv = np.empty(biggest, self.wire_type)
        self.send = np.empty(biggest, self.wire_type)
        self.widened = np.empty(biggest, np.float32) if wire_dtype != "float32" else None


def _check(name: str, a: np.ndarray, size: int) -> None:
    if a.dtype != np.float32 or a.ndim != 1 or a.size != size or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a contiguous 1-D float32 buffer of {size} elements")


class ReduceScatter:
    """One member's side of one reduce-scatter.

    `src` (float32, the whole buffer, already multiplied by `weight`) is
    this member's contribution; partial sums land in `acc` (the whole
    length; only the shards passed on are written), which may be `src`
    itself when the caller no longer needs it. `out` (float32, this member's
    shard length) receives the weighted mean of the shard.
    """

    def __init__(
        self,
        schedule: CollectiveSchedule,
        src: np.ndarray,
        out: np.ndarray,
        weight: float,
        wire_dtype: str,
        acc: np.ndarray | None = None,
    ) -> None:
        if schedule.kind != REDUCE_SCATTER:
            raise ValueError("a ReduceScatter needs a reduce-scatter schedule")
        lo, hi = schedule.own
        acc = src if acc is None else acc
        _check("src", src, schedule.count)
        _check("acc", acc, schedule.count)
        _check("out", out, hi - lo)
        if acc is not src and np.shares_memory(acc, src):
            raise ValueError("acc must be src itself or a separate buffer")
        self.schedule, self.src, self.acc, self.out = schedule, src, acc, out
        self.weight = float(weight)
        self.wire_dtype = wire_dtype
        self.wide = wire_dtype == "float32"
        self._scratch = _Scratch(schedule, wire_dtype)
        self.recv_weight: dict[int, float] = {}
        self.total_weight: float | None = None

    def send_weight(self, i: int) -> float:
        phase = self.schedule.sends[i].phase
        return self.weight if phase == 0 else self.weight + self.recv_weight[phase - 1]

    def send_payload(self, i: int) -> memoryview:
        t = self.schedule.sends[i]
        # phase 0: this member's own contribution; later: the partial sum its `after` receive completed
        part = (self.src if t.phase == 0 else self.acc)[t.start : t.stop]
        if self.wide:
            return part.data.cast("B")
        wire = self._scratch.send[: t.count]
        tensors.encode(part, wire, self.wire_dtype)
        return wire.data.cast("B")

    def recv_buffer(self, i: int) -> memoryview:
        return self._scratch.recv[: self.schedule.recvs[i].count].data.cast("B")

    def recv_nbytes(self, i: int) -> int:
        return self.schedule.recvs[i].count * self._scratch.wire_type.itemsize

    def received(self, i: int, weight: float) -> None:
        t = self.schedule.recvs[i]
        if t.phase not in self.recv_weight:
            self.recv_weight[t.phase] = float(weight)
        got = self._scratch.recv[: t.count]
        if not self.wide:
            assert self._scratch.widened is not None
            widened = self._scratch.widened[: t.count]
            tensors.decode(got, widened, self.wire_dtype)
            got = widened
        part = self.acc[t.start : t.stop]
        np.add(self.src[t.start : t.stop], got, out=part)
        if t.phase == self.schedule.phases - 1:  # this member's own shard, now the full sum
            lo = self.schedule.own[0]
            np.multiply(part, np.float32(1.0 / self._total()), out=self.out[t.start - lo : t.stop - lo])

    def _total(self) -> float:
        if self.total_weight is None:
            self.total_weight = self.weight + self.recv_weight[self.schedule.phases - 1]
            if not self.total_weight > 0.0:
                raise ValueError(f"sum of reduce-scatter weights is {self.total_weight}, must be > 0")
        return self.total_weight


class AllGather:
    """One member's side of one all-gather into `out` (float32, the whole buffer).

    The caller has written this member's shard into its place in `out`;
    every other element is written by a receive before anything reads it.
    """

    def __init__(self, schedule: CollectiveSchedule, out: np.ndarray, wire_dtype: str) -> None:
        if schedule.kind != ALL_GATHER:
            raise ValueError("an AllGather needs an all-gather schedule")
        _check("out", out, schedule.count)
        self.schedule, self.out = schedule, out
        self.wire_dtype = wire_dtype
        self.wide = wire_dtype == "float32"
        self._scratch = _Scratch(schedule, wire_dtype)
        if not self.wide:  # the owner keeps exactly what the others receive
            lo, hi = schedule.own
            tensors.decode(tensors_round(out[lo:hi], wire_dtype), out[lo:hi], wire_dtype)

    def send_weight(self, i: int) -> float:
        return 1.0  # unused: nothing is averaged

    def send_payload(self, i: int) -> memoryview:
        t = self.schedule.sends[i]
        part = self.out[t.start : t.stop]
        if self.wide:
            return part.data.cast("B")
        wire = self._scratch.send[: t.count]
        tensors.encode(part, wire, self.wire_dtype)  # exact: `part` is a widened wire value
        return wire.data.cast("B")

    def recv_buffer(self, i: int) -> memoryview:
        t = self.schedule.recvs[i]
        if self.wide:
            return self.out[t.start : t.stop].data.cast("B")
        return self._scratch.recv[: t.count].data.cast("B")

    def recv_nbytes(self, i: int) -> int:
        return self.schedule.recvs[i].count * self._scratch.wire_type.itemsize

    def received(self, i: int, weight: float) -> None:
        if self.wide:
            return
        t = self.schedule.recvs[i]
        tensors.decode(self._scratch.recv[: t.count], self.out[t.start : t.stop], self.wire_dtype)


def tensors_round(x: np.ndarray, wire_dtype: str) -> np.ndarray:
    """`x` encoded to the wire dtype (a new wire-typed array)."""
    wire = np.empty(x.size, tensors.wire_numpy_dtype(wire_dtype))
    tensors.encode(x, wire, wire_dtype)
    return wire
