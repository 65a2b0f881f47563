"""Which piece of the buffer a ring member sends and receives, and when (pure).

A ring all-reduce over N members splits the buffer into N segments and runs
2(N-1) phases: N-1 of reduce-scatter (receive a segment's partial sum from the
left, add your own, pass it right) then N-1 of all-gather (pass the finished
segments around). At phase p member r sends segment (r - p) mod N and
receives segment (r - p - 1) mod N, so what it sends at phase p+1 is exactly
what it received at phase p. After the reduce-scatter member r owns the
finished segment (r + 1) mod N.

Each segment is cut into sub-chunks. Send k of phase p+1 only needs receive k
of phase p, so chunks stream: while chunk k goes out, chunk k+1 is being
received and reduced. `Transfer.after` records that dependency; the schedule
knows nothing of sockets or clocks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Transfer:
    """One sub-chunk moving between neighbours: elements [start, stop) of the buffer."""

    phase: int
    segment: int
    chunk: int
    start: int
    stop: int
    reduce: bool  # reduce-scatter phase: the receiver adds it; all-gather: the receiver stores it
    after: int = -1  # sends only: index of the receive that must be complete first (-1: none)

    @property
    def count(self) -> int:
        return self.stop - self.start


def segment_bounds(count: int, size: int) -> list[tuple[int, int]]:
    """N near-equal contiguous segments (the first `count % N` one element longer)."""
    base, extra = divmod(count, size)
    bounds, start = [], 0
    for i in range(size):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def chunk_bounds(start: int, stop: int, chunk_elems: int) -> list[tuple[int, int]]:
    """Sub-chunks of at most `chunk_elems`; an empty segment still gets one (empty) chunk.

    The empty chunk keeps every phase non-empty, so per-phase metadata (the
    running sum of weights) always travels even when the buffer is tiny.
    """
    if stop <= start:
        return [(start, start)]
    return [(lo, min(lo + chunk_elems, stop)) for lo in range(start, stop, chunk_elems)]


class RingSchedule:
    """The ordered sends and receives of member `rank` in a ring of `size` over `count` elements."""

    def __init__(self, size: int, rank: int, count: int, chunk_elems: int) -> None:
        if size < 2:
            raise ValueError("a ring schedule needs at least 2 members")
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} outside a ring of {size}")
        if count < 0 or chunk_elems < 1:
            raise ValueError("count must be >= 0 and chunk_elems >= 1")
        self.size, self.rank, self.count, self.chunk_elems = size, rank, count, chunk_elems
        self.segments = segment_bounds(count, size)
        self.phases = 2 * (size - 1)
        self.owned_segment = (rank + 1) % size
        self.recvs: list[Transfer] = []
        self.sends: list[Transfer] = []
        recv_index: dict[tuple[int, int], int] = {}
        for phase in range(self.phases):
            segment = self.recv_segment(phase)
            for k, (lo, hi) in enumerate(chunk_bounds(*self.segments[segment], chunk_elems)):
                recv_index[(phase, k)] = len(self.recvs)
                self.recvs.append(Transfer(phase, segment, k, lo, hi, reduce=phase < size - 1))
        for phase in range(self.phases):
            segment = self.send_segment(phase)
            for k, (lo, hi) in enumerate(chunk_bounds(*self.segments[segment], chunk_elems)):
                after = recv_index[(phase - 1, k)] if phase > 0 else -1
                self.sends.append(Transfer(phase, segment, k, lo, hi, reduce=phase < size - 1, after=after))

    def send_segment(self, phase: int) -> int:
        return (self.rank - phase) % self.size

    def recv_segment(self, phase: int) -> int:
        return (self.rank - phase - 1) % self.size

    @property
    def first_gather_phase(self) -> int:
        """The phase at which this member sends its finished segment for the first time."""
        return self.size - 1
