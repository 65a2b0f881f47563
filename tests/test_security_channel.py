"""Authenticated asyncio streams on real loopback sockets (the control / job-submission channel)."""

from __future__ import annotations

import asyncio

import pytest

from meshtrain import wire
from meshtrain.errors import WireError
from meshtrain.security import DropCounters, Keyring, generate_secret
from meshtrain.security.channel import accept_channel, dial_channel
from meshtrain.security.handshake import NonceMemory

MESH = Keyring([generate_secret()])


async def serve_once(
    keyring: Keyring, outcome: asyncio.Future[object], replayed: asyncio.Future[object] | None = None
) -> tuple[asyncio.Server, int]:
    replayed = replayed if replayed is not None else asyncio.get_running_loop().create_future()
    nonces = NonceMemory()
    counters = DropCounters()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            channel = await accept_channel(reader, writer, keyring, nonces, {"node": "b"}, counters=counters)
            header, payload = await wire.read_frame(reader, mac=channel.recv)
            await wire.write_frame(
                writer, {"kind": "reply", "op": header["op"]}, payload[::-1], mac=channel.send
            )
            outcome.set_result(await wire.read_frame(reader, mac=channel.recv))
            replayed.set_result(await wire.read_frame(reader, mac=channel.recv))
        except WireError as exc:
            exc.args = (*exc.args, counters.snapshot())
            (replayed if outcome.done() else outcome).set_result(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_request_and_reply_over_an_authenticated_channel() -> None:
    async def main() -> None:
        outcome: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        replayed: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        server, port = await serve_once(MESH, outcome, replayed)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        channel = await dial_channel(reader, writer, MESH, {"node": "a"})
        assert channel.peer["node"] == "b"
        await wire.write_frame(writer, {"kind": "request", "op": "run"}, b"abc", mac=channel.send)
        header, payload = await wire.read_frame(reader, mac=channel.recv)
        assert header["op"] == "run" and payload == b"cba"
        # the exact bytes of a frame, sent a second time in the stream, do not verify
        head = wire.encode_header({"kind": "request", "op": "stop", "nbytes": 0})
        assert channel.send is not None  # an HMAC channel (no --encrypt)
        frame = head + channel.send.tag(head)
        writer.write(frame + frame)
        await writer.drain()
        first = await outcome
        assert not isinstance(first, WireError) and first[0]["op"] == "stop"  # type: ignore[index]
        assert isinstance(await replayed, WireError)
        writer.close()
        server.close()

    asyncio.run(main())


@pytest.mark.parametrize("who", ["dialer", "acceptor"])
def test_a_stranger_gets_a_clear_refusal(who: str) -> None:
    stranger = Keyring([generate_secret()])

    async def main() -> None:
        outcome: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        server, port = await serve_once(MESH if who == "dialer" else stranger, outcome)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(WireError, match="authentication failed"):
            await dial_channel(reader, writer, stranger if who == "dialer" else MESH)
        if who == "dialer":
            refusal = await outcome
            assert "another mesh" in str(refusal) and "'unknown_mesh': 1" in str(refusal)
        writer.close()
        server.close()

    asyncio.run(main())
