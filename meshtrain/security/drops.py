"""Counters of what a node refused, by reason: one shape for `meshtrain status` and the live view.

A dropped packet never raises past its socket's shell; it lands here. The
shape is a plain {reason: count} dict with every reason always present, so a
view can print a fixed table and the snapshot of several layers (gossip
socket, beacons, control socket, ring) can be summed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

BAD_TAG = "bad_tag"  # authentication tag wrong (a stranger, or a tampered packet)
REPLAY = "replay"  # seen before, behind the window, or outside the timestamp window
MALFORMED = "malformed"  # cannot be parsed (truncated envelope, bad msgpack, wrong types)
OVERSIZED = "oversized"  # longer than the limit of its socket
UNKNOWN_MESH = "unknown_mesh"  # signed with a key this mesh does not hold (another mesh's node)
RATE_LIMITED = "rate_limited"  # a control connection refused by the per-source rate or concurrency limit
MODE_MISMATCH = "mode_mismatch"  # this mesh's key, but the other --encrypt setting

DROP_REASONS: tuple[str, ...] = (
    BAD_TAG,
    REPLAY,
    MALFORMED,
    OVERSIZED,
    UNKNOWN_MESH,
    RATE_LIMITED,
    MODE_MISMATCH,
)


class DropCounters:
    """Thread-safe counts per reason (the ring's receiver thread and the event loop both count)."""

    def __init__(self) -> None:
        self._counts = dict.fromkeys(DROP_REASONS, 0)
        self._lock = threading.Lock()

    def count(self, reason: str, n: int = 1) -> None:
        if reason not in self._counts:
            raise ValueError(f"unknown drop reason {reason!r}")
        with self._lock:
            self._counts[reason] += n

    def snapshot(self) -> dict[str, int]:
        """{reason: count} for every reason, in DROP_REASONS order."""
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    @staticmethod
    def merge(snapshots: Iterable[Mapping[str, int]]) -> dict[str, int]:
        """Sum several snapshots (e.g. gossip + control + ring) into one."""
        total = dict.fromkeys(DROP_REASONS, 0)
        for snap in snapshots:
            for reason, n in snap.items():
                if reason in total:
                    total[reason] += int(n)
        return total
