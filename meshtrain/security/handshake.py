"""Mutual authentication of a TCP connection (ring neighbours, and any other stream), pure.

Two messages, so it fits the ring's connect-right-then-accept-left order
without a third round trip that would deadlock it:

1. the dialer's hello carries its fields, the key id, a fresh 16-byte nonce,
   its wall-clock time and ``proof = HMAC(K, "dial" | hello)``;
2. the acceptor checks the proof, that the time is within `max_skew` and
   that it never saw that nonce (`NonceMemory`), then answers with its own
   fresh nonce and ``proof = HMAC(K, "accept" | hello | answer)``; the
   dialer checks it.

Both sides then derive the connection's session key
``HMAC(K, "session" | dial nonce | accept nonce)``: fresh on every
connection, so a recorded connection replayed later authenticates no frame
(its frame tags were made under a key that no longer exists), and a replayed
hello alone is refused by the nonce memory. A stranger without the secret
fails at step 2 on either side, with a clear reason.

Frames after the handshake carry ``HMAC(session key, seq | frame bytes)``
with an implicit per-connection sequence number (as TLS records do), so a
frame dropped, reordered, repeated or altered in the stream fails its tag.
(The ring tags its frames the same way with a cheaper 16-byte GMAC,
meshtrain.security.aead.FrameGmac; control channels use `FrameMac`.)

With `--encrypt` (the keyring's `encrypt` flag) hello and answer carry
``enc: True`` inside what the proofs cover, and each side refuses a peer
whose setting differs (`mode_mismatch`): an encrypting node never streams
plaintext to, or accepts it from, anyone. Frames are then AES-GCM sealed
under keys derived from the session key (meshtrain.security.aead).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections import OrderedDict
from typing import Any

import msgpack

from meshtrain.security import drops
from meshtrain.security.secret import Keyring

NONCE_BYTES = 16
TAG_BYTES = 32
_SEQ = struct.Struct(">Q")
AUTH_FIELDS = ("kid", "nonce", "ts", "proof")
_UNSIGNED = frozenset({"proof", "kind", "nbytes"})


class HandshakeError(Exception):
    """The other side failed authentication; the message says why in words for the user.

    `reason` is the drop-counter reason (meshtrain.security.drops) it counts as.
    """

    def __init__(self, message: str, reason: str = drops.BAD_TAG) -> None:
        super().__init__(message)
        self.reason = reason


def _transcript(*parts: dict[str, Any]) -> bytes:
    """Canonical bytes of handshake messages: sorted fields, without the proof itself and the
    framing fields (kind, nbytes) that the frame layer adds; the labels "dial"/"accept" stand for kind.
    """
    return b"".join(
        msgpack.packb(sorted((k, v) for k, v in p.items() if k not in _UNSIGNED), use_bin_type=True)
        for p in parts
    )


def _mac(key: bytes, label: bytes, data: bytes) -> bytes:
    return hmac.new(key, label + data, hashlib.sha256).digest()


class NonceMemory:
    """Dial nonces an acceptor has seen within the time window: bounded, oldest forgotten first."""

    def __init__(self, max_skew: float = 60.0, capacity: int = 8192) -> None:
        self.max_skew = max_skew
        self.capacity = capacity
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def admit(self, nonce: bytes, timestamp: float, now: float) -> str | None:
        """None if fresh and first seen (then remembered), else why not."""
        if not abs(timestamp - now) <= self.max_skew:
            return f"hello timestamp {timestamp - now:+.0f}s from this clock (limit {self.max_skew:g}s)"
        while self._seen and next(iter(self._seen.values())) < now - 2 * self.max_skew:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return "replayed hello"
        self._seen[nonce] = now
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return None


ENCRYPT_FIELD = "enc"
MODE_MISMATCH_TEXT = "the peer's --encrypt setting differs from this mesh's"


def _mode(message: dict[str, Any]) -> bool:
    return message.get(ENCRYPT_FIELD, False) is True


def dial_hello(keyring: Keyring, fields: dict[str, Any], now: float) -> dict[str, Any]:
    """The dialer's hello: `fields` plus key id, nonce, time, the encrypt mode (when on) and proof."""
    hello = {**fields, "kid": keyring.primary_id, "nonce": secrets.token_bytes(NONCE_BYTES), "ts": now}
    if keyring.encrypt:
        hello[ENCRYPT_FIELD] = True
    hello["proof"] = _mac(keyring.primary, b"dial", _transcript(hello))
    return hello


def check_dial(keyring: Keyring, hello: dict[str, Any], memory: NonceMemory, now: float) -> bytes:
    """The key the dialer's hello proves knowledge of; HandshakeError if it proves none.

    Any hostile shape (keys that are not strings, huge numbers) is a HandshakeError too.
    """
    if not all(isinstance(k, str) for k in hello):
        raise HandshakeError("malformed hello", drops.MALFORMED)
    try:
        return _check_dial(keyring, hello, memory, now)
    except (TypeError, ValueError, OverflowError):
        raise HandshakeError("malformed hello", drops.MALFORMED) from None


def _check_dial(keyring: Keyring, hello: dict[str, Any], memory: NonceMemory, now: float) -> bytes:
    kid, nonce, ts, proof = (hello.get(k) for k in AUTH_FIELDS)
    if not isinstance(kid, bytes) or not isinstance(nonce, bytes) or not isinstance(proof, bytes):
        raise HandshakeError("unauthenticated hello (the peer has no mesh secret)")
    if len(nonce) != NONCE_BYTES or not isinstance(ts, int | float) or isinstance(ts, bool):
        raise HandshakeError("malformed hello", drops.MALFORMED)
    key = keyring.lookup(kid)
    if key is None:
        raise HandshakeError("the peer belongs to another mesh (unknown key)", drops.UNKNOWN_MESH)
    if not hmac.compare_digest(proof, _mac(key, b"dial", _transcript(hello))):
        raise HandshakeError("bad hello proof (the peer does not hold this mesh's secret)")
    if _mode(hello) != keyring.encrypt:
        raise HandshakeError(MODE_MISMATCH_TEXT, drops.MODE_MISMATCH)
    refused = memory.admit(nonce, float(ts), now)
    if refused is not None:
        raise HandshakeError(refused, drops.REPLAY)
    return key


def accept_reply(
    key: bytes, hello: dict[str, Any], fields: dict[str, Any], encrypt: bool = False
) -> dict[str, Any]:
    """The acceptor's answer to a checked hello: `fields` plus its nonce, mode (when on) and proof."""
    reply = {**fields, "nonce": secrets.token_bytes(NONCE_BYTES)}
    if encrypt:
        reply[ENCRYPT_FIELD] = True
    reply["proof"] = _mac(key, b"accept", _transcript(hello, reply))
    return reply


def check_accept(keyring: Keyring, hello: dict[str, Any], reply: dict[str, Any]) -> bytes:
    """The dialer's check of the answer; returns the key that was used (the primary)."""
    if not all(isinstance(k, str) for k in reply):
        raise HandshakeError("malformed answer", drops.MALFORMED)
    nonce, proof = reply.get("nonce"), reply.get("proof")
    if not isinstance(nonce, bytes) or not isinstance(proof, bytes) or len(nonce) != NONCE_BYTES:
        raise HandshakeError("unauthenticated answer (the peer has no mesh secret)")
    key = keyring.primary
    if not hmac.compare_digest(proof, _mac(key, b"accept", _transcript(hello, reply))):
        raise HandshakeError("bad answer proof (the peer does not hold this mesh's secret)")
    if _mode(reply) != keyring.encrypt:
        raise HandshakeError(MODE_MISMATCH_TEXT, drops.MODE_MISMATCH)
    return key


def session_key(key: bytes, hello: dict[str, Any], reply: dict[str, Any]) -> bytes:
    return _mac(key, b"session", bytes(hello["nonce"]) + bytes(reply["nonce"]))


class FrameMac:
    """Tags of one direction of one connection: HMAC(session key, seq | header bytes | payload).

    The sequence number is implicit and counts every frame, so both ends
    must tag/check every frame in order. hashlib releases the GIL while it
    hashes a large buffer, so tagging runs beside the other thread's I/O.
    """

    tag_bytes = TAG_BYTES

    def __init__(self, session: bytes) -> None:
        self._session = session
        self.seq = 0

    def tag(
        self, head: bytes | bytearray | memoryview, payload: bytes | bytearray | memoryview = b""
    ) -> bytes:
        mac = hmac.new(self._session, _SEQ.pack(self.seq), hashlib.sha256)
        mac.update(head)
        if memoryview(payload).nbytes:
            mac.update(payload)
        self.seq += 1
        return mac.digest()

    def check(
        self,
        head: bytes | bytearray | memoryview,
        payload: bytes | bytearray | memoryview,
        tag: bytes | bytearray | memoryview,
    ) -> bool:
        return hmac.compare_digest(self.tag(head, payload), bytes(tag))
