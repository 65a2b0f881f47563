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

from meshtrain.ring import tensors
from meshtrain.ring.schedule import RingSchedule


class RingReduction:
    """Buffers and chunk semantics of one all-reduce at one member.

    `acc` is float32, already multiplied by `weight`; it is reduced in place
    and becomes the result.
    """

    def __init__(self, schedule: RingSchedule, acc: np.ndarray, weight: float, wire_dtype: str) -> None:
        if acc.dtype != np.float32 or acc.ndim != 1 or acc.size != schedule.count:
            raise ValueError("acc must be a 1-D float32 buffer of the schedule's length")
        self.schedule = schedule
        self.acc = acc
        self.weight = float(weight)
        self.wire_dtype = wire_dtype
        if wire_dtype == "float32":
            self.wire = acc  # sends go straight from the accumulator
        else:
            self.wire = np.empty(acc.size, tensors.wire_numpy_dtype(wire_dtype))
        self.scratch = np.empty(acc.size, np.float32) if schedule.size > 1 else acc
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
        acc, lo, hi = self.acc, t.start, t.stop
        first_gather = t.phase == self.schedule.first_gather_phase
        if first_gather:
            total = self._total()
            if total != 1.0:
                np.multiply(acc[lo:hi], np.float32(1.0 / total), out=acc[lo:hi])
        if self.wire is not acc and (t.reduce or first_gather):
            tensors.encode(acc[lo:hi], self.wire[lo:hi], self.wire_dtype)
            if first_gather:
                tensors.decode(self.wire[lo:hi], acc[lo:hi], self.wire_dtype)
        return self.wire[lo:hi].data.cast("B")

    # --- what to do with what arrives --------------------------------------------
    def recv_buffer(self, i: int) -> memoryview:
        """Where the payload of receive i is written."""
        t = self.schedule.recvs[i]
        target = self.scratch if (t.reduce and self.wire is self.acc) else self.wire
        return target[t.start : t.stop].data.cast("B")

    def recv_nbytes(self, i: int) -> int:
        t = self.schedule.recvs[i]
        return t.count * self.wire.itemsize

    def received(self, i: int, weight: float) -> None:
        """Receive i has fully landed in `recv_buffer(i)`: reduce or store it."""
        t = self.schedule.recvs[i]
        lo, hi = t.start, t.stop
        if t.chunk == 0 or t.phase not in self.recv_weight:
            self.recv_weight[t.phase] = float(weight)
        if t.reduce:
            if self.wire is self.acc:
                incoming = self.scratch[lo:hi]
            else:
                incoming = self.scratch[lo:hi]
                tensors.decode(self.wire[lo:hi], incoming, self.wire_dtype)
            np.add(self.acc[lo:hi], incoming, out=self.acc[lo:hi])
        elif self.wire is not self.acc:
            tensors.decode(self.wire[lo:hi], self.acc[lo:hi], self.wire_dtype)

    def _total(self) -> float:
        if self.total_weight is None:
            self.total_weight = self.weight + self.recv_weight[self.schedule.size - 2]
            if not self.total_weight > 0.0:
                raise ValueError(f"sum of all-reduce weights is {self.total_weight}, must be > 0")
        return self.total_weight
