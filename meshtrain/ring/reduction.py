"""One member's side of one all-reduce: buffers and what each chunk does to them (pure).

The TCP shell asks `send_payload(i)` for the bytes of send i and
`recv_buffer(i)` for where receive i lands, then calls `received(i, ...)`;
everything else (casting to the wire dtype, adding in float32, scaling by
the total weight, forwarding finished segments unchanged) happens here, with
no sockets, so an in-memory simulation of N members exercises the exact code
the real ring runs.

Weights: each member's buffer is pre-multiplied by its weight, and the
running sum of weights rides in the chunk headers along the reduce-scatter
(exactly, as a float64), so the owner of a finished segment divides it by the
total before passing it around. Every member ends with the owner's bytes of
each segment, so all members hold bit-identical results. With a 16-bit wire,
the owner also rounds its own segment through the wire dtype for the same
reason.
"""

from __future__ import annotations

import numpy as np

from meshtrain.ring import codecs
from meshtrain.ring.schedule import RingSchedule


class RingReduction:
    """Buffers and chunk semantics of one all-reduce at one member.

    `src` is this member's contribution, float32, already multiplied by
    `weight`; it is only read. `acc` (float32, same length, a different
    buffer) receives the result. Received partial sums land directly in
    `acc` (or in the 16-bit `wire` buffer), so no scratch copy of the buffer
    is ever made; pass `wire` to reuse a buffer across calls.
    """

    def __init__(
        self,
        schedule: RingSchedule,
        src: np.ndarray,
        acc: np.ndarray,
        weight: float,
        wire_dtype: str,
        wire: np.ndarray | None = None,
    ) -> None:
        for name, a in (("src", src), ("acc", acc)):
            if a.dtype != np.float32 or a.ndim != 1 or a.size != schedule.count or not a.flags.c_contiguous:
                raise ValueError(f"{name} must be a contiguous 1-D float32 buffer of the schedule's length")
        if np.shares_memory(src, acc):
            raise ValueError("src and acc must be different buffers")
        self.schedule = schedule
        self.src = src
        self.acc = acc
        self.weight = float(weight)
        self.codec = codecs.codec(wire_dtype)
        self.wire_dtype = self.codec.name
        self.wide = self.codec.exact
        if self.wide:
            self.wire = acc  # sends go straight from the accumulator, receives land in it
        elif wire is not None and wire.size == acc.size and wire.dtype == self.codec.storage:
            self.wire = wire
        else:
            self.wire = np.empty(acc.size, self.codec.storage)
        self.recv_weight: dict[int, float] = {}
        self.total_weight: float | None = None

    # --- what to send -------------------------------------------------------------
    def send_weight(self, i: int) -> float:
        """The running weight sum carried in the header of send i."""
        phase = self.schedule.sends[i].phase
        if phase == 0:
            return self.weight
        if phase < self.schedule.size - 1:
            return self.weight + self.recv_weight[phase - 1]
        return self._total()

    def send_payload(self, i: int) -> memoryview:
        """The bytes of send i, cast for the wire (its `after` receive must be complete)."""
        t = self.schedule.sends[i]
        lo, hi = t.start, t.stop
        own = self.src if t.phase == 0 else self.acc  # phase 0 sends this member's own contribution
        if t.phase == self.schedule.first_gather_phase:
            total = self._total()
            if total != 1.0:
                np.multiply(self.acc[lo:hi], np.float32(1.0 / total), out=self.acc[lo:hi])
            if not self.wide:  # the owner keeps exactly what the others will receive
                self.codec.encode(self.acc[lo:hi], self.wire[lo:hi])
                self.codec.decode(self.wire[lo:hi], self.acc[lo:hi])
        elif t.reduce:
            if self.wide:
                return own[lo:hi].data.cast("B")
            self.codec.encode(own[lo:hi], self.wire[lo:hi])
        return self.wire[lo:hi].data.cast("B")

    # --- what to do with what arrives --------------------------------------------
    def recv_buffer(self, i: int) -> memoryview:
        """Where the payload of receive i is written."""
        t = self.schedule.recvs[i]
        return self.wire[t.start : t.stop].data.cast("B")

    def recv_nbytes(self, i: int) -> int:
        t = self.schedule.recvs[i]
        return t.count * self.wire.itemsize

    def received(self, i: int, weight: float) -> None:
        """Receive i has fully landed in `recv_buffer(i)`: reduce or store it."""
        t = self.schedule.recvs[i]
        lo, hi = t.start, t.stop
        if t.phase not in self.recv_weight:
            self.recv_weight[t.phase] = float(weight)
        if not self.wide:
            self.codec.decode(self.wire[lo:hi], self.acc[lo:hi])
        if t.reduce:
            np.add(self.acc[lo:hi], self.src[lo:hi], out=self.acc[lo:hi])

    def _total(self) -> float:
        if self.total_weight is None:
            self.total_weight = self.weight + self.recv_weight[self.schedule.size - 2]
            if not self.total_weight > 0.0:
                raise ValueError(f"sum of all-reduce weights is {self.total_weight}, must be > 0")
        return self.total_weight
