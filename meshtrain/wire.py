"""The frame format every meshtrain TCP stream speaks.

A frame is ``[u32 big-endian header length][msgpack header][raw payload]``.
The header is a small msgpack map that always carries ``kind`` and
``nbytes`` (the payload length); bulk bytes never pass through msgpack, so a
gradient chunk goes to the socket as a memoryview and lands in a preallocated
buffer. Everything a reader gets from the network is bounded and validated
before any allocation: oversized, unknown, malformed or truncated frames are a
`WireError`, never a crash or a huge buffer.

Authentication, two ways. With ``key`` set, the writer adds a ``tag`` field,
HMAC-SHA256 over the header (without the tag) and the payload, and the reader
rejects frames whose tag is missing or wrong (no replay protection: the same
frame verifies again). With ``mac`` (a `meshtrain.security.handshake.FrameMac`
holding a per-connection session key from the handshake,
`meshtrain.security.channel`) a 32-byte tag follows the payload, over an
implicit sequence number, the header bytes and the payload: a frame
replayed, reordered, dropped or altered within the stream, or taken from
another connection, fails. The ring and every mesh TCP stream use ``mac``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import struct
from typing import TYPE_CHECKING, Any

import msgpack

from meshtrain.errors import WireError

if TYPE_CHECKING:
    from meshtrain.security.handshake import FrameMac

MAC_BYTES = 32

__all__ = [
    "FrameKind",
    "StreamClosed",
    "WireError",
    "DEFAULT_MAX_HEADER",
    "DEFAULT_MAX_PAYLOAD",
    "LENGTH_PREFIX",
    "known_kinds",
    "register_kind",
    "encode_header",
    "decode_header",
    "header_length",
    "payload_tag",
    "check_tag",
    "write_frame",
    "read_frame",
]

LENGTH_PREFIX = struct.Struct(">I")
DEFAULT_MAX_HEADER = 64 * 1024
DEFAULT_MAX_PAYLOAD = 256 * 1024 * 1024


class FrameKind:
    """Names of the frame kinds meshtrain itself uses (plain strings on the wire)."""

    HELLO = "hello"  # first frame on a connection: who I am, which job and ring generation
    CHUNK = "chunk"  # one sub-chunk of a ring all-reduce segment
    ABORT = "abort"  # the sender is abandoning this ring generation
    REQUEST = "request"  # control protocol: a command to the agent
    REPLY = "reply"  # control protocol: the answer to one request
    EVENT = "event"  # control protocol: something happened (member joined, step done)
    LOG = "log"  # a line of a worker's output
    STATE = "state"  # parameters / optimizer state handed to a member that is behind


_KNOWN_KINDS: set[str] = {
    value for name, value in vars(FrameKind).items() if not name.startswith("_") and isinstance(value, str)
}


class StreamClosed(WireError):
    """The peer closed the stream cleanly, at a frame boundary (not a malformed frame)."""


def register_kind(kind: str) -> None:
    """Allow another frame kind (for a layer that adds its own messages)."""
    if not isinstance(kind, str) or not kind:
        raise ValueError("a frame kind is a non-empty string")
    _KNOWN_KINDS.add(kind)


def known_kinds() -> frozenset[str]:
    return frozenset(_KNOWN_KINDS)


def payload_tag(key: bytes, header: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> bytes:
    """HMAC-SHA256 of the header (without its tag) and the payload."""
    body = {k: v for k, v in header.items() if k != "tag"}
    mac = hmac.new(key, msgpack.packb(body, use_bin_type=True), hashlib.sha256)
    mac.update(payload)
    return mac.digest()


def check_tag(key: bytes, header: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> None:
    """Raise WireError unless the header's tag authenticates header and payload under `key`."""
    tag = header.get("tag")
    if not isinstance(tag, bytes) or not hmac.compare_digest(tag, payload_tag(key, header, payload)):
        raise WireError("frame authentication failed")


def encode_header(header: dict[str, Any]) -> bytes:
    """The length prefix and msgpack header of a frame (the payload follows it separately).

    The header must name a known ``kind`` and carry ``nbytes``, the payload length.
    """
    kind = header.get("kind")
    if not isinstance(kind, str) or kind not in _KNOWN_KINDS:
        raise WireError(f"unknown frame kind {kind!r}")
    nbytes = header.get("nbytes", 0)
    if not isinstance(nbytes, int) or nbytes < 0:
        raise WireError(f"bad payload length {nbytes!r}")
    packed = msgpack.packb(header, use_bin_type=True)
    return LENGTH_PREFIX.pack(len(packed)) + packed


def header_length(prefix: bytes | bytearray | memoryview, *, max_header: int = DEFAULT_MAX_HEADER) -> int:
    """Decode and bound-check the 4-byte length prefix."""
    (length,) = LENGTH_PREFIX.unpack(prefix)
    if length == 0 or length > max_header:
        raise WireError(f"frame header of {length} bytes (limit {max_header})")
    return int(length)


def decode_header(
    data: bytes | bytearray | memoryview, *, max_payload: int = DEFAULT_MAX_PAYLOAD
) -> dict[str, Any]:
    """Parse and validate a msgpack header: a map with a known kind and a bounded payload length."""
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise WireError(f"malformed frame header: {exc.__class__.__name__}") from None
    if not isinstance(header, dict):
        raise WireError("frame header is not a map")
    kind = header.get("kind")
    if not isinstance(kind, str) or kind not in _KNOWN_KINDS:
        raise WireError(f"unknown frame kind {kind!r}")
    nbytes = header.get("nbytes", 0)
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise WireError(f"bad payload length {nbytes!r}")
    if nbytes > max_payload:
        raise WireError(f"frame payload of {nbytes} bytes (limit {max_payload})")
    return header


async def write_frame(
    writer: asyncio.StreamWriter,
    header: dict[str, Any],
    payload: bytes | bytearray | memoryview = b"",
    *,
    key: bytes | None = None,
    mac: FrameMac | None = None,
) -> None:
    """Write one frame; the payload goes out as-is (no copy through msgpack).

    ``nbytes`` is filled in from the payload; with ``key`` a ``tag`` is added;
    with ``mac`` the session tag follows the payload.
    """
    header = dict(header)
    header["nbytes"] = memoryview(payload).nbytes
    if key is not None:
        header["tag"] = payload_tag(key, header, payload)
    head = encode_header(header)
    parts: list[bytes | bytearray | memoryview] = [head, payload] if header["nbytes"] else [head]
    if mac is not None:
        parts.append(mac.tag(head, payload))
    writer.writelines(parts)
    await writer.drain()


async def read_frame(
    reader: asyncio.StreamReader,
    *,
    max_header: int = DEFAULT_MAX_HEADER,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    key: bytes | None = None,
    mac: FrameMac | None = None,
) -> tuple[dict[str, Any], bytes]:
    """Read one frame: (header, payload). Raises StreamClosed at a clean end of stream.

    Lengths are checked before anything is allocated, so a hostile peer cannot
    make the reader buffer more than ``max_header + max_payload`` bytes.
    """
    try:
        prefix = await reader.readexactly(LENGTH_PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise StreamClosed("stream closed") from None
        raise WireError("stream ended inside a frame length") from None
    length = header_length(prefix, max_header=max_header)
    try:
        raw = await reader.readexactly(length)
        header = decode_header(raw, max_payload=max_payload)
        payload = await reader.readexactly(header["nbytes"]) if header.get("nbytes") else b""
        tag = await reader.readexactly(MAC_BYTES) if mac is not None else b""
    except asyncio.IncompleteReadError:
        raise WireError("stream ended inside a frame") from None
    if mac is not None and not mac.check(prefix + raw, payload, tag):
        raise WireError("frame authentication failed (forged, altered or replayed frame)")
    if key is not None:
        check_tag(key, header, payload)
    return header, payload
