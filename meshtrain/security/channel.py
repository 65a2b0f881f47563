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
from meshtrain.security.drops import DropCounters
from meshtrain.security.handshake import FrameMac, HandshakeError, NonceMemory
from meshtrain.security.secret import Keyring

AUTH_FAILED = "authentication failed"


@dataclass
class Channel:
    """The per-direction frame authenticators of one connection, and the peer's hello fields."""

    send: FrameMac
    recv: FrameMac
    peer: dict[str, Any] = field(default_factory=dict)


def _directions(session: bytes, dialer: bool) -> tuple[FrameMac, FrameMac]:
    """(send, recv): a key per direction, so a frame cannot be reflected back to its sender."""
    d2a = FrameMac(hmac.new(session, b"dialer->acceptor", hashlib.sha256).digest())
    a2d = FrameMac(hmac.new(session, b"acceptor->dialer", hashlib.sha256).digest())
    return (d2a, a2d) if dialer else (a2d, d2a)


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
    send, recv = _directions(handshake.session_key(key, hello, reply), dialer=True)
    return Channel(send, recv, reply)


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
    reply = handshake.accept_reply(key, hello, {**(fields or {}), "ok": True})
    await wire.write_frame(writer, {**reply, "kind": wire.FrameKind.HELLO})
    send, recv = _directions(handshake.session_key(key, hello, reply), dialer=False)
    return Channel(send, recv, hello)
