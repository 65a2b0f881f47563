"""Authenticated asyncio TCP streams (control requests between agents, job submission, state transfer).

The asyncio twin of the ring's handshake: the side that connects sends the
dial hello, the side that accepts checks it and answers, and both derive one
`FrameMac` per direction from the session key. After that every frame goes
through ``wire.write_frame(..., mac=channel.send)`` and
``wire.read_frame(..., mac=channel.recv)``, so a stranger, a replayed
connection or a replayed/altered frame is a WireError on the reading side.

    channel = await dial_channel(reader, writer, keyring, {"role": "submit"})
    await wire.write_frame(writer, {"kind": "request", "op": "run"}, payload, mac=channel.send)

    channel = await accept_channel(reader, writer, keyring, nonces)   # in the server's handler
    header, payload = await wire.read_frame(reader, mac=channel.recv)

Or, the same in both modes, `await channel.write(writer, header, payload)` and
`await channel.read(reader)`. With an encrypting keyring (`--encrypt`) the
channel seals whole frames, header included (a control request's header is
its content: op, job arguments): on the wire each is one outer frame
``{kind: "sealed", nbytes}`` whose payload is AES-256-GCM of the inner frame
bytes plus the 16-byte tag, the outer header bytes the associated data, one
key per direction (meshtrain.security.aead). `send`/`recv` are then None and
`wire.write_frame(mac=...)` must not be used on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from typing import Any

from meshtrain import wire
from meshtrain.errors import WireError
from meshtrain.security import handshake
from meshtrain.security.aead import AEAD_TAG_BYTES, CONTROL, FrameCipher, stream_cipher
from meshtrain.security.drops import DropCounters
from meshtrain.security.handshake import FrameMac, HandshakeError, NonceMemory
from meshtrain.security.secret import Keyring

AUTH_FAILED = "authentication failed"
SEALED = "sealed"  # the frame kind of an encrypted channel's frames
wire.register_kind(SEALED)
_D2A, _A2D = b"dialer->acceptor", b"acceptor->dialer"


@dataclass
class Channel:
    """The per-direction frame protection of one connection, and the peer's hello fields.

    HMAC mode: `send`/`recv` tag frames. Encrypted mode: `seal`/`unseal` encrypt them.
    """

    send: FrameMac | None
    recv: FrameMac | None
    peer: dict[str, Any] = field(default_factory=dict)
    seal: FrameCipher | None = None
    unseal: FrameCipher | None = None

    @property
    def encrypted(self) -> bool:
        return self.seal is not None

    async def write(
        self,
        writer: asyncio.StreamWriter,
        header: dict[str, Any],
        payload: bytes | bytearray | memoryview = b"",
    ) -> None:
        """One frame, tagged or sealed as this channel does."""
        if self.seal is None:
            await wire.write_frame(writer, header, payload, mac=self.send)
            return
        inner = {**header, "nbytes": memoryview(payload).nbytes}
        plain = wire.encode_header(inner) + bytes(payload)
        head = wire.encode_header({"kind": SEALED, "nbytes": len(plain) + AEAD_TAG_BYTES})
        writer.writelines([head, self.seal.seal(head, plain)])
        await writer.drain()

    async def read(
        self,
        reader: asyncio.StreamReader,
        *,
        max_header: int = wire.DEFAULT_MAX_HEADER,
        max_payload: int = wire.DEFAULT_MAX_PAYLOAD,
    ) -> tuple[dict[str, Any], bytes]:
        """One frame: (header, payload); StreamClosed at a clean end, WireError if forged or malformed."""
        if self.unseal is None:
            return await wire.read_frame(
                reader, max_header=max_header, max_payload=max_payload, mac=self.recv
            )
        limit = wire.LENGTH_PREFIX.size + max_header + max_payload + AEAD_TAG_BYTES
        outer, sealed = await wire.read_frame(reader, max_header=256, max_payload=limit)
        if outer["kind"] != SEALED or len(outer) != 2:
            raise WireError("frame authentication failed (an unsealed frame on an encrypted channel)")
        head = wire.encode_header({"kind": SEALED, "nbytes": len(sealed)})
        plain = self.unseal.open(head, sealed)
        if plain is None:
            raise WireError("frame authentication failed (forged, altered or replayed frame)")
        return _inner_frame(plain, max_header, max_payload)


def _inner_frame(plain: bytes, max_header: int, max_payload: int) -> tuple[dict[str, Any], bytes]:
    """The frame inside a decrypted sealed frame (authentic: a mismatch is a bug, still only a WireError)."""
    if len(plain) < wire.LENGTH_PREFIX.size:
        raise WireError("sealed frame too short")
    length = wire.header_length(plain[: wire.LENGTH_PREFIX.size], max_header=max_header)
    end = wire.LENGTH_PREFIX.size + length
    header = wire.decode_header(plain[wire.LENGTH_PREFIX.size : end], max_payload=max_payload)
    if len(plain) - end != header["nbytes"]:
        raise WireError("sealed frame length does not match its header")
    return header, plain[end:]


def _directions(session: bytes, dialer: bool) -> tuple[FrameMac, FrameMac]:
    """(send, recv): a key per direction, so a frame cannot be reflected back to its sender."""
    d2a = FrameMac(hmac.new(session, _D2A, hashlib.sha256).digest())
    a2d = FrameMac(hmac.new(session, _A2D, hashlib.sha256).digest())
    return (d2a, a2d) if dialer else (a2d, d2a)


def _channel(session: bytes, dialer: bool, encrypt: bool, peer: dict[str, Any]) -> Channel:
    if not encrypt:
        send, recv = _directions(session, dialer)
        return Channel(send, recv, peer)
    d2a, a2d = stream_cipher(session, CONTROL, _D2A), stream_cipher(session, CONTROL, _A2D)
    seal, unseal = (d2a, a2d) if dialer else (a2d, d2a)
    return Channel(None, None, peer, seal=seal, unseal=unseal)


async def dial_channel(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    keyring: Keyring,
    fields: dict[str, Any] | None = None,
    timeout: float = 10.0,
) -> Channel:
    """Authenticate a connection we opened; WireError("authentication failed: ...") if the peer can't."""
    hello = handshake.dial_hello(keyring, dict(fields or {}), time.time())
    await wire.write_frame(writer, {**hello, "kind": wire.FrameKind.HELLO})
    reply, _ = await asyncio.wait_for(wire.read_frame(reader, max_header=4096, max_payload=0), timeout)
    try:
        if reply.get("error") == AUTH_FAILED:
            raise HandshakeError(str(reply.get("reason", "the peer refused our proof")))
        key = handshake.check_accept(keyring, hello, reply)
    except HandshakeError as exc:
        raise WireError(f"{AUTH_FAILED}: {exc}") from None
    return _channel(handshake.session_key(key, hello, reply), True, keyring.encrypt, reply)


async def accept_channel(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    keyring: Keyring,
    nonces: NonceMemory,
    fields: dict[str, Any] | None = None,
    timeout: float = 10.0,
    counters: DropCounters | None = None,
) -> Channel:
    """Authenticate a connection we accepted; the refusal is sent to the peer, then WireError raised.

    `nonces` is one NonceMemory per listening socket (shared by its connections);
    a refused hello is counted in `counters` by reason.
    """
    hello, _ = await asyncio.wait_for(wire.read_frame(reader, max_header=4096, max_payload=0), timeout)
    try:
        key = handshake.check_dial(keyring, hello, nonces, time.time())
    except HandshakeError as exc:
        if counters is not None:
            counters.count(exc.reason)
        await wire.write_frame(
            writer, {"kind": wire.FrameKind.HELLO, "error": AUTH_FAILED, "reason": str(exc)}
        )
        raise WireError(f"{AUTH_FAILED}: {exc}") from None
    reply = handshake.accept_reply(key, hello, {**(fields or {}), "ok": True}, encrypt=keyring.encrypt)
    await wire.write_frame(writer, {**reply, "kind": wire.FrameKind.HELLO})
    return _channel(handshake.session_key(key, hello, reply), False, keyring.encrypt, hello)
