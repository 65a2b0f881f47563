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

With an encrypting keyring (`--encrypt`) the envelope is version 2 and its
body is AES-256-GCM ciphertext (meshtrain.security.aead), the 16-byte GCM
tag in place of the HMAC, the header before it the associated data:

    envelope = magic "MTd" | 2 | key id | session | seq | time ms | AES-GCM(body) | tag (16)

under HKDF(key, "gossip") with nonce = session | u32 seq (a sender takes a new
session before seq reaches 2^32). A node's mode must be the mesh's: an
envelope of the other version is dropped as `mode_mismatch` before any
crypto, so an encrypted mesh never accepts plaintext and a plain node never
half-understands an encrypted one.

Pure: the caller passes `now` (seconds since the epoch, wall clock, as the
timestamp window compares clocks of different machines).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshtrain.security import drops
from meshtrain.security.aead import AEAD_TAG_BYTES, GOSSIP, MAX_DATAGRAM_SEQ, datagram_nonce, derive_key
from meshtrain.security.drops import DropCounters
from meshtrain.security.replay import ReplayGuard
from meshtrain.security.secret import Keyring

MAGIC = b"MTd"
VERSION = 1  # HMAC-SHA256 tag, body in the clear
VERSION_ENCRYPTED = 2  # AES-256-GCM body and tag
ENVELOPE = struct.Struct(">3sB4s8sQQ")
TAG_BYTES = 32
OVERHEAD = ENVELOPE.size + TAG_BYTES  # the larger of the two modes' overheads
OVERHEAD_ENCRYPTED = ENVELOPE.size + AEAD_TAG_BYTES
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
        self._aead = AESGCM(derive_key(keyring.primary, GOSSIP)) if keyring.encrypt else None

    def seal(self, body: bytes, now: float) -> bytes:
        if self._aead is not None and self.seq > MAX_DATAGRAM_SEQ:
            self.session, self.seq = secrets.token_bytes(8), 0  # a new nonce space before the u32 wraps
        version = VERSION if self._aead is None else VERSION_ENCRYPTED
        head = ENVELOPE.pack(MAGIC, version, self.keyring.primary_id, self.session, self.seq, int(now * 1000))
        seq = self.seq
        self.seq += 1
        if self._aead is not None:
            return head + self._aead.encrypt(datagram_nonce(self.session, seq), body, head)
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
        self._version = VERSION_ENCRYPTED if keyring.encrypt else VERSION
        self._aeads: dict[bytes, AESGCM] = {}  # per key, derived on first use

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
        if len(data) < ENVELOPE.size:
            raise Dropped(drops.MALFORMED)
        magic, version, kid, session, seq, millis = ENVELOPE.unpack_from(data)
        if magic != MAGIC or version not in (VERSION, VERSION_ENCRYPTED):
            raise Dropped(drops.MALFORMED)
        key = self.keyring.lookup(kid)
        if key is None:
            raise Dropped(drops.UNKNOWN_MESH)
        if version != self._version:
            raise Dropped(drops.MODE_MISMATCH)  # one side runs with --encrypt, the other without
        view = memoryview(data)
        if version == VERSION_ENCRYPTED:
            body = self._decrypt(key, view, session, seq)
        else:
            if len(data) < OVERHEAD:
                raise Dropped(drops.MALFORMED)
            expected = hmac.new(key, view[:-TAG_BYTES], hashlib.sha256).digest()
            if not hmac.compare_digest(expected, view[-TAG_BYTES:]):
                raise Dropped(drops.BAD_TAG)
            body = bytes(view[ENVELOPE.size : -TAG_BYTES])
        if self.guard.check(session, seq, millis / 1000.0, now) is not None:
            raise Dropped(drops.REPLAY)  # a replay, or stale (outside the timestamp window)
        return body

    def _decrypt(self, key: bytes, view: memoryview, session: bytes, seq: int) -> bytes:
        if view.nbytes < OVERHEAD_ENCRYPTED or seq > MAX_DATAGRAM_SEQ:
            raise Dropped(drops.MALFORMED)
        aead = self._aeads.get(key)
        if aead is None:
            aead = self._aeads[key] = AESGCM(derive_key(key, GOSSIP))
        head = bytes(view[: ENVELOPE.size])
        try:
            return aead.decrypt(datagram_nonce(session, seq), bytes(view[ENVELOPE.size :]), head)
        except InvalidTag:
            raise Dropped(drops.BAD_TAG) from None
