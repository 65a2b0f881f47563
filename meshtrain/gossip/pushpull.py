"""TCP side of gossip: length-prefixed msgpack frames for push-pull state sync and fallback pings.

A push-pull is one request and one reply on a fresh connection: each side sends its
full member table, each merges the other's. It is how a node joins (with a seed or a
node found by a beacon) and, periodically, how the mesh repairs what gossip missed.
The same listener answers fallback pings, which get through UDP loss thanks to TCP's
retransmissions.
"""

from __future__ import annotations

import asyncio
import struct

from meshtrain.gossip.codec import MAX_STATE_BYTES, DatagramDropped
from meshtrain.gossip.member import Addr
from meshtrain.security.auth import OVERHEAD

MAX_FRAME_BYTES = MAX_STATE_BYTES + OVERHEAD  # a full state table in its authentication envelope

_LEN = struct.Struct(">I")


def frame(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME_BYTES) -> bytes:
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > limit:
        raise DatagramDropped("oversized", f"frame of {n} bytes")
    return await reader.readexactly(n)


async def request(addr: Addr, body: bytes, timeout: float) -> bytes:
    """Send one frame to `addr` and return the single frame it answers with."""

    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection(addr[0], addr[1])
        try:
            writer.write(frame(body))
            await writer.drain()
            return await read_frame(reader)
        finally:
            writer.close()

    return await asyncio.wait_for(exchange(), timeout)
