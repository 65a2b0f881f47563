"""Hypothesis feeds random, structured and mutated datagrams to the codec and to a live node shell.

The codec may only ever raise DatagramDropped; the node must count drops, never
raise, and keep working (it still answers a real peer afterwards).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
from fuzzing import mutate, plain
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshtrain.gossip import PROFILES, GossipNode
from meshtrain.gossip.codec import (
    DatagramDropped,
    decode_beacon,
    decode_packet,
    decode_state,
    encode_beacon,
    encode_packet,
)
from meshtrain.gossip.messages import Ack, Alive, Beacon, Dead, IndirectPing, Nack, Packet, Ping, Suspect

MAX = 1400
ids = st.text(min_size=1, max_size=12)
ints = st.integers(min_value=0, max_value=2**40)
addrs = st.tuples(st.sampled_from(["127.0.0.1", "10.0.0.2", "::1", "x"]), st.integers(0, 65535))
metas = st.dictionaries(
    st.text(max_size=5), st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=5)), max_size=3
)
messages = st.one_of(
    st.builds(Ping, ints, ids),
    st.builds(IndirectPing, ints, ids, addrs, st.booleans()),
    st.builds(Ack, ints),
    st.builds(Nack, ints),
    st.builds(Alive, ids, ids, addrs, ints, metas),
    st.builds(Suspect, ids, ints, ids),
    st.builds(Dead, ids, ints, ids),
)
packets = st.builds(Packet, ids, st.lists(messages, min_size=1, max_size=6).map(tuple))


edits = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4
)


def only_drops(data: bytes) -> None:
    for decode in (lambda d: decode_packet(d, MAX), lambda d: decode_beacon(d, MAX), decode_state):
        try:
            decode(data)
        except DatagramDropped:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_only_drop(data: bytes) -> None:
    only_drops(data)


@settings(max_examples=200, deadline=None)
@given(plain)
def test_random_msgpack_only_drops(obj: Any) -> None:
    only_drops(msgpack.packb(obj, use_bin_type=True))
    only_drops(msgpack.packb([1, "sender", [obj]], use_bin_type=True))
    only_drops(msgpack.packb([1, "b", obj, obj, None], use_bin_type=True))


@settings(max_examples=200, deadline=None)
@given(packets, edits)
def test_valid_packets_roundtrip_and_mutations_only_drop(
    packet: Packet, ed: list[tuple[int, int, int]]
) -> None:
    data = encode_packet(packet)
    if len(data) <= MAX:
        assert decode_packet(data, MAX) == packet
    only_drops(mutate(data, ed))
    only_drops(mutate(encode_beacon(Beacon("n", 7946)), ed))


def test_oversized_and_wrong_version_are_counted_by_reason() -> None:
    for data, reason in [
        (b"\x00" * (MAX + 1), "oversized"),
        (msgpack.packb([2, "s", [[2, 1]]]), "version"),
        (msgpack.packb([1, "s", [[99, 1]]]), "unknown"),
        (b"\xc1", "malformed"),
    ]:
        try:
            decode_packet(data, MAX)
        except DatagramDropped as exc:
            assert exc.reason == reason
        else:
            raise AssertionError(f"accepted {data!r}")


def test_node_shell_survives_fuzzed_datagrams() -> None:
    async def main() -> None:
        profile = PROFILES["local"]
        node = GossipNode("target", profile=profile, host="127.0.0.1", port=0, discovery=False)
        peer = GossipNode("peer", profile=profile, host="127.0.0.1", port=0, discovery=False)
        await node.start()
        await peer.start()
        src = ("127.0.0.1", peer.port)

        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            st.one_of(
                st.binary(max_size=1600),
                packets.map(encode_packet),
                st.tuples(packets, edits).map(lambda pe: mutate(encode_packet(pe[0]), pe[1])),
            )
        )
        def feed(data: bytes) -> None:
            node._on_datagram(data, src)

        feed()
        # Real garbage over a real socket too.
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=("127.0.0.1", node.port)
        )
        for junk in (b"", b"\xff" * 10, b"\x93\x01\xa1x\x90", b"x" * 1500):
            transport.sendto(junk)
        transport.close()
        assert "error" not in node.drops, node.drops
        assert node.drops.get("malformed", 0) > 0
        # Still a working member: a real peer joins it and both see each other alive.
        assert await peer._join(("127.0.0.1", node.port))
        for _ in range(200):
            if {m.id: m.state for m in node.members()}.get("peer") == "alive":
                break
            await asyncio.sleep(0.01)
        assert {m.id: m.state for m in node.members()}.get("peer") == "alive"
        await node.close()
        await peer.close()

    asyncio.run(main())
