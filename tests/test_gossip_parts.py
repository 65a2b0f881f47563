"""The small parts: beacon backoff, profiles' scaling, TCP frames, state and beacon encoding, the queue."""

from __future__ import annotations

import asyncio

import pytest

from meshtrain.gossip.broadcast import BroadcastQueue
from meshtrain.gossip.codec import (
    DatagramDropped,
    decode_beacon,
    decode_state,
    encode_beacon,
    encode_state,
    message_size,
)
from meshtrain.gossip.discovery import BeaconSchedule, broadcast_addresses
from meshtrain.gossip.messages import Beacon, Dead, StateRow
from meshtrain.gossip.profiles import PROFILES
from meshtrain.gossip.pushpull import frame, read_frame


def test_beacon_backoff_while_alone_and_reset() -> None:
    s = BeaconSchedule(1.0, 8.0)
    assert [s.next_delay(alone=True) for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    assert s.next_delay(alone=False) == 8.0
    assert [s.next_delay(alone=True) for _ in range(3)] == [1, 2, 4]  # alone again: find the mesh fast


def test_beacon_has_reserved_auth_slot() -> None:
    b = Beacon("mac-mini", 7946)
    assert decode_beacon(encode_beacon(b), 1400) == b
    tagged = Beacon("mac-mini", 7946, auth=b"\x01" * 32)
    assert decode_beacon(encode_beacon(tagged), 1400) == tagged


def test_profiles_scale_with_mesh_size() -> None:
    lan = PROFILES["lan"]
    assert lan.retransmit_limit(10) < lan.retransmit_limit(1000)
    assert lan.suspicion_min(10) < lan.suspicion_min(1000) < lan.suspicion_max(1000)
    # Push-pull moves O(N) bytes, so its period grows O(N): bytes/s per node stay flat.
    assert lan.push_pull_period(1000) / lan.push_pull_period(100) == pytest.approx(10)
    for p in PROFILES.values():
        assert p.probe_timeout < p.probe_interval and p.max_datagram <= 1472


def test_state_roundtrip_and_bad_rows() -> None:
    rows = [
        StateRow("a", "A", ("10.0.0.1", 7946), 3, "alive", {"job": None}),
        StateRow("b", "B", ("h", 1), 0, "left", {}),
    ]
    assert decode_state(encode_state(rows, True)) == (rows, True)
    bad = encode_state([StateRow("a", "A", ("10.0.0.1", 7946), 3, "zombie", {})], False)
    with pytest.raises(DatagramDropped):
        decode_state(bad)


def test_tcp_frames_are_bounded() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(frame(b"hello") + (10**9).to_bytes(4, "big"))
        assert await read_frame(reader) == b"hello"
        with pytest.raises(DatagramDropped):
            await read_frame(reader)

    asyncio.run(main())


def test_queue_sends_each_update_a_bounded_number_of_times_newest_first() -> None:
    q = BroadcastQueue()
    old, new = Dead("a", 1, "x"), Dead("b", 1, "x")
    q.push("a", old, message_size(old))
    q.push("b", new, message_size(new))
    assert q.take(1000, limit=2) == [new, old]
    assert q.take(1000, limit=2) == [new, old]
    assert q.take(1000, limit=2) == [] and len(q) == 0
    q.push("a", old, message_size(old))
    q.push("a", Dead("a", 2, "x"), 10)  # a newer update about the same member replaces the old one
    assert q.take(1000, limit=5) == [Dead("a", 2, "x")]
    assert q.take(5, limit=5) == []  # does not fit


def test_broadcast_addresses_skip_loopback() -> None:
    assert all(not a.startswith("127.") for a in broadcast_addresses())


def test_local_meta_fits_in_a_datagram_and_is_accepted() -> None:
    from meshtrain.gossip import GossipNode
    from meshtrain.gossip.codec import META_MAX_BYTES, encode_meta
    from meshtrain.gossip.meta import local_meta

    meta = local_meta(control_port=7948, ring_port=7950, device="cpu", speed=1.5)
    assert len(encode_meta(meta)) < META_MAX_BYTES / 2
    assert GossipNode("x", meta=meta).meta["cores"] >= 1
