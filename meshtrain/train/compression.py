"""Compressed outer deltas for local SGD: int8 on a grid the members agree on, with error feedback (pure).

Why: a DiLoCo sync all-reduces the whole parameter delta; over a 100 Mbit/s
link a 100M-parameter model's bf16 delta is 16 s of wire. int8 halves that
again. Quantising inside the ring would round every partial sum at every hop
(N roundings, none of them visible to the member that could feed the error
back), so the rounding happens once, before the ring, on a grid every member
shares, and the ring itself is lossless:

1. Each member i puts u_i = delta_i + e_i (its residual, see 3) and the
   samples w_i it trained on into a small float32 *header* all-reduce, with
   w_i * max|u_i| per chunk of `CHUNK` elements. Every member gets the same
   sums: W = sum w_i and B_c = sum_i w_i max_c |u_i|, so the grid step of
   chunk c, LSB_c = B_c / W / L with L = `levels(N)`, is the same on all.
2. Member i sends q_i = rint(w_i / W * u_i / LSB_c), integers. Any partial
   sum of the q_i is at most L + N/2 <= 126 in magnitude (the rounding adds
   at most 1/2 per member), so the `qint8` codec (ring/codecs.py) carries
   every hop's partial sum exactly, the owner's division by the total weight
   (1 up to float64 rounding) changes nothing, and every member ends with
   the same integers sum_i q_i; times LSB_c that is the weighted mean.
3. What member i meant to send and did not, e_i = u_i - q_i * LSB_c * W / w_i,
   stays with it and is added to its next delta (error feedback, as in
   1-bit SGD / EF-SGD): over syncs no update is lost, only delayed.

Bytes: one byte an element plus 4 bytes per `CHUNK` elements and a few
header words, a quarter of float32 and half of bf16. The delta's averaging
is the only thing compressed: gradients (per-step mode) keep their wire.

int4 (`compress="int4"`): the same grid with L = 7 - ceil(N/2) levels, so
every partial sum of one element's integers stays within +-7, and two
elements travel in one qint8 item as v = a + 16 b: the sum of such items is
(sum a) + 16 (sum b), within +-119, and since |sum a| <= 7 < 8 the owner
reads both back exactly (a = ((v + 8) mod 16) - 8, b = (v - a) / 16). Half
a byte an element, on the same lossless ring; coarser steps, which error
feedback carries into later syncs. Past 12 members L would be < 1: such a
sync goes as int8 (every member decides alike from the ring's size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CHUNK",
    "COMPRESS_MODES",
    "HEADER_FIXED",
    "Grid",
    "ErrorFeedback",
    "chunk_bounds",
    "levels",
    "parse_compress",
]

CHUNK = 2048  # elements sharing one grid step (a 4-byte bound each: 0.2% of the int8 bytes)
HEADER_FIXED = 7  # header words before the bounds: count, samples, timed, compute, comm, and a checkpoint
#   step some members are to write at (how many, the sum of its offsets from the interval's start)
COMPRESS_MODES = ("none", "int8", "int4")


def parse_compress(value: str | None) -> str | None:
    """`compress=` / `--compress` values: None or "none" (off), "int8", "int4"; ValueError otherwise."""
    if value is None or value == "none":
        return None
    if value not in COMPRESS_MODES:
        raise ValueError(f"compress must be one of {', '.join(COMPRESS_MODES)} (got {value!r})")
    return value


def levels(members: int, bits: int = 8) -> int:
    """Grid levels each side of zero for a ring of `members`: partial sums stay within +-126 (8 bits)
    or +-7 (4 bits, where the result may be < 1: no 4-bit grid for that many members)."""
    if bits == 4:
        return 7 - math.ceil(members / 2)
    return max(1, 126 - math.ceil(members / 2))


def sync_bits(compress: str | None, members: int) -> int:
    """The integers' width for one sync: 4 for int4 where a 4-bit grid exists for `members`, else 8."""
    return 4 if compress == "int4" and levels(members, 4) >= 1 else 8


def pack4(q: np.ndarray) -> np.ndarray:
    """Pairs of 4-bit grid integers as one qint8 item each, v = q[2j] + 16 q[2j+1] (float32)."""
    if q.size % 2:
        q = np.concatenate([q, np.zeros(1, np.float32)])
    return (q[0::2] + np.float32(16.0) * q[1::2]).astype(np.float32)


def unpack4(v: np.ndarray, count: int) -> np.ndarray:
    """The `count` integers a sum of `pack4` items stands for (each digit's sum within +-7)."""
    low = np.mod(v + np.float32(8.0), np.float32(16.0)) - np.float32(8.0)
    out = np.empty(2 * v.size, np.float32)
    out[0::2] = low
    out[1::2] = (v - low) / np.float32(16.0)
    return out[:count]


def n_chunks(count: int) -> int:
    return max(1, math.ceil(count / CHUNK))


def chunk_bounds(u: np.ndarray) -> np.ndarray:
    """max |u| per chunk of CHUNK elements (float32; a short last chunk too)."""
    count = u.size
    chunks = n_chunks(count)
    padded = np.zeros(chunks * CHUNK, np.float32)
    np.abs(u, out=padded[:count])
    return padded.reshape(chunks, CHUNK).max(axis=1)


@dataclass(frozen=True)
class Grid:
    """The grid all members agreed on for one sync: the step of each chunk, from the header sums."""

    lsb: np.ndarray  # float32, one per chunk (0 where every member's chunk is zero)
    total_weight: float  # W, the samples behind the sync
    bits: int = 8  # the integers' width: 8, or 4 (two to a qint8 item, `pack4`)

    @classmethod
    def from_sums(cls, bounds_sum: np.ndarray, total_weight: float, members: int, bits: int = 8) -> Grid:
        if not total_weight > 0:
            return cls(np.zeros_like(bounds_sum, np.float32), 0.0, bits)
        steps = levels(members, bits)
        lsb = (np.asarray(bounds_sum, np.float64) / total_weight / steps).astype(np.float32)
        return cls(lsb, float(total_weight), bits)

    def per_element(self, count: int) -> np.ndarray:
        return np.repeat(self.lsb, CHUNK)[:count]

    def quantize(self, u: np.ndarray, weight: float) -> np.ndarray:
        """This member's integers q = rint(weight / W * u / LSB), as float32 (0 where LSB is 0)."""
        if not (self.total_weight > 0 and weight > 0):
            return np.zeros(u.size, np.float32)
        lsb = self.per_element(u.size)
        scale = np.float32(weight / self.total_weight)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(lsb > 0, np.rint(u * scale / lsb), 0.0)
        limit = 7.0 if self.bits == 4 else 127.0
        return np.clip(q, -limit, limit).astype(np.float32)

    def sent(self, q: np.ndarray, weight: float) -> np.ndarray:
        """What q stands for in this member's delta units (q * LSB * W / weight)."""
        if not (self.total_weight > 0 and weight > 0):
            return np.zeros(q.size, np.float32)
        return (q * self.per_element(q.size) * np.float32(self.total_weight / weight)).astype(np.float32)

    def mean(self, q_sum: np.ndarray) -> np.ndarray:
        """The weighted mean of the deltas from the ring's integer sum (identical bytes on every member)."""
        return (q_sum * self.per_element(q_sum.size)).astype(np.float32)


class ErrorFeedback:
    """The residual one member keeps between syncs: what its compressed deltas have not yet carried."""

    def __init__(self) -> None:
        self.residual: np.ndarray | None = None

    def corrected(self, delta: np.ndarray) -> np.ndarray:
        """u = delta + residual (the residual starts at zero; a model of a new size resets it)."""
        if self.residual is None or self.residual.size != delta.size:
            self.residual = np.zeros(delta.size, np.float32)
        return (delta + self.residual).astype(np.float32)

    def keep(self, u: np.ndarray, sent: np.ndarray, contributed: bool) -> None:
        """After a sync: the residual is what was meant minus what went out (all of u if nothing did)."""
        self.residual = (u - sent).astype(np.float32) if contributed else u.astype(np.float32)

    def reset(self) -> None:
        self.residual = None


def simulate_sync(
    deltas: list[np.ndarray], weights: list[float], feedback: list[ErrorFeedback], bits: int = 8
) -> tuple[np.ndarray, int]:
    """The compressed sync of N members in one process, the ring's arithmetic included: the header
    sums, each member's integers, the hop-by-hop partial sums through the qint8 codec (asserted
    lossless; with `bits=4` packed two to an item, every digit's partial sum checked within +-7),
    the mean. Returns (the mean every member gets, payload bytes one member sends)."""
    from meshtrain.ring import codecs

    members = len(deltas)
    us = [fb.corrected(d) for fb, d in zip(feedback, deltas, strict=True)]
    bounds = sum(
        (np.float32(w) * chunk_bounds(u) for u, w in zip(us, weights, strict=True)),
        np.zeros(n_chunks(us[0].size), np.float32),
    )
    count = us[0].size
    grid = Grid.from_sums(bounds, float(sum(weights)), members, bits)
    qs = [grid.quantize(u, w) for u, w in zip(us, weights, strict=True)]
    codec = codecs.codec("qint8")
    digits = np.zeros(count, np.float32)
    partial = np.zeros(count if bits == 8 else (count + 1) // 2, np.float32)
    wire = np.empty(partial.size, np.int8)
    for q in qs:  # a ring's reduce-scatter: each hop adds one member and re-encodes the partial sum
        partial = partial + (q if bits == 8 else pack4(q))
        codec.encode(partial, wire)
        back = np.empty(partial.size, np.float32)
        codec.decode(wire, back)
        assert np.array_equal(back, partial), "a partial sum left the qint8 range"
        if bits == 4:
            digits = digits + q
            assert np.abs(digits).max(initial=0.0) <= 7, "a 4-bit digit's partial sum left +-7"
            assert np.array_equal(unpack4(partial, count), digits), "a packed sum did not unpack"
    for fb, u, q, w in zip(feedback, us, qs, weights, strict=True):
        fb.keep(u, grid.sent(q, w), contributed=w > 0)
    per_member = 2 * (members - 1) / members * (partial.size + 4 * (HEADER_FIXED + bounds.size))
    q_sum = partial if bits == 8 else unpack4(partial, count)
    return grid.mean(q_sum), int(per_member)
