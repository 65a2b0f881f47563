"""Authenticated datagrams (gossip messages and LAN beacons): an envelope with an HMAC over all of it.

    envelope = magic "MTd" | version | key id (4) | session (8) | seq (u64) | time ms (u64) | body | tag (32)

The tag is HMAC-SHA256 under the key the key id names, over every byte before
it, so nothing in the envelope can be changed. The key id lets a receiver
with several keys (rotation) run one HMAC, not one per key; a key id it does
not hold means another mesh. Session, sequence and time feed the replay
guard (meshtrain.security.replay), checked only after the tag verified, so
strangers cannot fill its table. A beacon sealed this way says only that a
node of *this* mesh exists and where (its body); other meshes' nodes drop it
as `unknown_mesh` without parsing anything.

Pure: the caller passes `now` (seconds since the epoch, wall clock, as the
timestamp window compares clocks of different machines).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

from meshtrain.security import drops
from meshtrain.security.drops import DropCounters
from meshtrain.security.replay import ReplayGuard
from meshtrain.security.secret import Keyring

MAGIC = b"MTd"
VERSION = 1
ENVELOPE = struct.Struct(">3sB4s8sQQ")
TAG_BYTES = 32
OVERHEAD = ENVELOPE.size + TAG_BYTES
MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4


class Dropped(Exception):
    """A datagram was refused; `reason` is one of meshtrain.security.drops.DROP_REASONS."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DatagramSealer:
    """Seals outgoing datagrams of one process: its session nonce and sequence counter."""

    def __init__(self, keyring: Keyring, session: bytes | None = None) -> None:
        self.keyring = keyring
        self.session = session if session is not None else secrets.token_bytes(8)
        if len(self.session) != 8:
            raise ValueError("a session nonce is 8 bytes")
        self.seq = 0

    def seal(self, body: bytes, now: float) -> bytes:
        head = ENVELOPE.pack(MAGIC, VERSION, self.keyring.primary_id, self.session, self.seq, int(now * 1000))
        self.seq += 1
        data = head + body
        return data + hmac.new(self.keyring.primary, data, hashlib.sha256).digest()


class DatagramOpener:
    """Verifies incoming datagrams of one socket; counts every drop by reason."""

    def __init__(
        self,
        keyring: Keyring,
        guard: ReplayGuard | None = None,
        counters: DropCounters | None = None,
        max_size: int = MAX_DATAGRAM,
    ) -> None:
        self.keyring = keyring
        self.guard = guard if guard is not None else ReplayGuard()
        self.counters = counters if counters is not None else DropCounters()
        self.max_size = max_size

    def open(self, data: bytes, now: float) -> bytes:
        """The body of an authentic, fresh, first-seen datagram; else Dropped(reason), counted."""
        try:
            return self._open(data, now)
        except Dropped as exc:
            self.counters.count(exc.reason)
            raise

    def open_or_none(self, data: bytes, now: float) -> bytes | None:
        """As `open`, but None for a drop: what a socket shell's datagram_received wants."""
        try:
            return self.open(data, now)
        except Dropped:
            return None

    def _open(self, data: bytes, now: float) -> bytes:
        if len(data) > self.max_size:
            raise Dropped(drops.OVERSIZED)
        if len(data) < OVERHEAD:
            raise Dropped(drops.MALFORMED)
        magic, version, kid, session, seq, millis = ENVELOPE.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            raise Dropped(drops.MALFORMED)
        key = self.keyring.lookup(kid)
        if key is None:
            raise Dropped(drops.UNKNOWN_MESH)
        view = memoryview(data)
        expected = hmac.new(key, view[:-TAG_BYTES], hashlib.sha256).digest()
        if not hmac.compare_digest(expected, view[-TAG_BYTES:]):
            raise Dropped(drops.BAD_TAG)
        if self.guard.check(session, seq, millis / 1000.0, now) is not None:
            raise Dropped(drops.REPLAY)  # a replay, or stale (outside the timestamp window)
        return bytes(view[ENVELOPE.size : -TAG_BYTES])
