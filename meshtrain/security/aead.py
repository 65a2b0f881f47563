"""Confidentiality (`--encrypt`): AES-256-GCM keys per purpose, and nonces that never repeat under a key.

Keys. No key is used for two things: every AES key is HKDF-SHA256 of a
secret and a label naming its purpose, so gossip datagrams, control
connections and ring connections are encrypted under different keys, and the
two directions of a control connection too:

    gossip datagrams   HKDF(mesh key,     "meshtrain gossip")
    control streams    HKDF(session key,  "meshtrain control" | "dialer->acceptor" or "acceptor->dialer")
    ring streams       HKDF(session key,  "meshtrain ring")      (one direction per connection)
    ring tags          HKDF(session key,  "meshtrain ring mac")  (authentication only: `FrameGmac`)

Session keys come from the authenticated handshake (meshtrain.security.handshake)
and are fresh on every connection.

Nonces (96 bits), unique per key by construction:

- a stream (`FrameCipher`) numbers its frames 0, 1, 2, ... under a key that
  exists for this one connection direction: nonce = 4 zero bytes | u64 frame
  number, the same implicit sequence the HMAC mode tags (as TLS 1.3 does);
- a datagram sender draws a random 8-byte session id when it starts and
  numbers its datagrams: nonce = session id | u32 number, and it draws a new
  session id before the number would wrap. Many senders share the gossip
  key, so uniqueness across them rests on the 64-bit random session ids
  (a collision needs about 2^32 sender sessions).

The replay windows are unchanged: they run on the same (session, sequence)
numbers, checked after the AEAD tag verified.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

AEAD_TAG_BYTES = 16
NONCE_BYTES = 12
KEY_BYTES = 32
GOSSIP = b"gossip"
CONTROL = b"control"
RING = b"ring"
RING_MAC = b"ring mac"
_STREAM_NONCE = struct.Struct(">4xQ")
_DATAGRAM_NONCE = struct.Struct(">8sI")
MAX_DATAGRAM_SEQ = (1 << 32) - 1  # a datagram sender takes a new session id before this

Buffer = bytes | bytearray | memoryview


def derive_key(secret: bytes, purpose: bytes, context: bytes = b"") -> bytes:
    """A 256-bit key for one purpose (and direction): HKDF-SHA256, so keys of different uses are unrelated."""
    info = b"meshtrain " + purpose + (b" " + context if context else b"")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def datagram_nonce(session: bytes, seq: int) -> bytes:
    return _DATAGRAM_NONCE.pack(session, seq)


@dataclass(frozen=True)
class StreamKey:
    """A connection's session key and its mode: AES-GCM frames when `encrypt`, else HMAC tags."""

    session: bytes
    encrypt: bool = False


class FrameCipher:
    """AES-256-GCM of one direction of one connection: frame k is sealed under nonce k.

    Both ends must seal/open every frame in order (the frame number is
    implicit), so a frame dropped, repeated, reordered or taken from another
    connection fails to open. The header bytes are the associated data: read
    in the clear, but any change to them fails the tag.
    """

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self.seq = 0

    def _next_nonce(self) -> bytes:
        nonce = _STREAM_NONCE.pack(self.seq)
        self.seq += 1
        return nonce

    def seal(self, head: Buffer, payload: Buffer = b"") -> bytes:
        """Ciphertext of `payload` followed by the 16-byte tag over (head, payload)."""
        return self._aead.encrypt(self._next_nonce(), bytes(payload), bytes(head))

    def seal_into(self, head: Buffer, payload: Buffer, out: memoryview) -> None:
        """As `seal`, written into `out` (exactly len(payload) + 16 bytes): no allocation per frame."""
        self._aead.encrypt_into(self._next_nonce(), payload, bytes(head), out)

    def open_into(self, head: Buffer, sealed: Buffer, out: memoryview) -> bool:
        """Decrypt `sealed` (ciphertext | tag) into `out` (its plaintext length); False if forged.

        On False, `out` may hold garbage: the caller must discard it (the stream is broken anyway).
        """
        try:
            self._aead.decrypt_into(self._next_nonce(), sealed, bytes(head), out)
        except (InvalidTag, ValueError):
            return False
        return True

    def open(self, head: Buffer, sealed: Buffer) -> bytes | None:
        """The plaintext of `sealed` (ciphertext | tag), or None if it does not authenticate."""
        try:
            return self._aead.decrypt(self._next_nonce(), bytes(sealed), bytes(head))
        except (InvalidTag, ValueError):
            return None


class FrameGmac:
    """A 16-byte GCM tag over (header, payload) without encrypting: authentication only, but cheap.

    The ring's tag in HMAC mode's place: GHASH runs at several GB/s per core
    where HMAC-SHA256 manages ~1.4, which matters when a machine hosts several
    ring members or the link is fast. The payload is the associated data and
    the header the (discarded) plaintext, under nonce = implicit frame number
    and a key of this connection direction alone, so as with `FrameMac` a
    frame dropped, repeated, reordered or altered fails its check.
    """

    tag_bytes = AEAD_TAG_BYTES

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self.seq = 0

    def tag(self, head: Buffer, payload: Buffer = b"") -> bytes:
        nonce = _STREAM_NONCE.pack(self.seq)
        self.seq += 1
        return self._aead.encrypt(nonce, bytes(head), payload)[-AEAD_TAG_BYTES:]

    def check(self, head: Buffer, payload: Buffer, tag: Buffer) -> bool:
        return hmac.compare_digest(self.tag(head, payload), bytes(tag))


def stream_cipher(session: bytes, purpose: bytes, context: bytes = b"") -> FrameCipher:
    """The FrameCipher of one connection direction, keyed from its handshake's session key."""
    return FrameCipher(derive_key(session, purpose, context))
