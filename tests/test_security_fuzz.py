"""Hypothesis on every decoder a stranger can reach: random bytes and mutations of valid input.

Decoders covered: the sealed datagram envelope (DatagramOpener), the gossip
codec (packets, beacons, push-pull state, TCP pings), the frame header
(`header_length`, `decode_header`, `read_frame`), the control server (bytes
before the handshake, and forged, mutated or well-authenticated but hostile
request frames after a valid one) and join-token parsing. Each may only
refuse in its documented way (a drop, a WireError, a UserError); nothing else
escapes, and length prefixes are refused before anything is allocated.

Default example counts keep this file fast; MESHTRAIN_FUZZ_EXAMPLES=100000
(the name tests/test_security_pure.py uses) runs every test at that count:

    flock /tmp/meshtrain-bench.lock env MESHTRAIN_FUZZ_EXAMPLES=100000 \
        .venv/bin/python -m pytest tests/test_security_fuzz.py -q -s
"""

from __future__ import annotations

import asyncio
import os
import resource
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from fuzzing import mutate, plain
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshtrain.agent.control import Conn, ConnectionLimiter, ControlServer, call
from meshtrain.errors import UserError, WireError
from meshtrain.gossip.codec import (
    DatagramDropped,
    decode_beacon,
    decode_packet,
    decode_state,
    decode_tcp_ping,
    encode_beacon,
    encode_packet,
    encode_state,
)
from meshtrain.gossip.messages import Alive, Beacon, Packet, Ping, StateRow
from meshtrain.security import DatagramOpener, DatagramSealer, Keyring
from meshtrain.security.channel import dial_channel
from meshtrain.security.secret import make_token, parse_token
from meshtrain.wire import (
    LENGTH_PREFIX,
    decode_header,
    encode_header,
    header_length,
    known_kinds,
    read_frame,
)

_ENV = os.environ.get("MESHTRAIN_FUZZ_EXAMPLES")
BIG = int(_ENV) if _ENV else 0


def examples(default: int) -> int:
    """`default` cases normally; MESHTRAIN_FUZZ_EXAMPLES for the must-show run."""
    return BIG or default


NOW = 1_800_000_000.0
KEY = bytes(range(32))
RING = Keyring([KEY])
ENCRYPTED = Keyring([KEY], encrypt=True)  # `--encrypt`: AES-GCM envelopes and sealed control frames
MODES = pytest.mark.parametrize("ring", [RING, ENCRYPTED], ids=["auth", "encrypted"])
MAX = 1400
FUZZ_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "database": None,
}

edits = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6
)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module", autouse=True)
def report_peak_rss() -> Iterator[None]:
    """The big run must not grow without bound: the peak resident size may rise by 512 MiB at most.

    Measured as growth of the process's high-water mark, since in a full test
    run other modules (MLX training) set it before this one starts.
    """
    before = peak_rss_mib()
    yield
    peak = peak_rss_mib()
    print(f"\n[fuzz] examples per test: {BIG or 'default'}, peak RSS {peak:.0f} MiB (was {before:.0f})")
    assert peak - before < 512, f"peak RSS rose from {before:.0f} to {peak:.0f} MiB"


# --- sealed datagrams (every UDP datagram and beacon passes here first) -----------------

VALID_PACKET = encode_packet(
    Packet("node-a", (Ping(7, "node-b"), Alive("node-a", "a", ("127.0.0.1", 7946), 3, {"ctl": 1234})))
)


@MODES
@settings(max_examples=examples(500), **FUZZ_SETTINGS)
@given(
    st.binary(max_size=300)
    | st.binary(min_size=60, max_size=70000)
    | st.tuples(st.sampled_from([b"\x01", b"\x02"]), st.binary(max_size=300)).map(
        lambda vb: b"MTd" + vb[0] + RING.primary_id + vb[1]  # this mesh's key id: the crypto runs
    )
)
def test_opener_random_bytes_are_counted_drops(ring: Keyring, data: bytes) -> None:
    opener = DatagramOpener(ring)
    assert opener.open_or_none(data, NOW) is None
    assert opener.counters.total == 1


@MODES
@settings(max_examples=examples(500), **FUZZ_SETTINGS)
@given(edits)
def test_opener_mutated_sealed_datagrams_never_pass_altered(
    ring: Keyring, changes: list[tuple[int, int, int]]
) -> None:
    sealed = DatagramSealer(ring).seal(VALID_PACKET, NOW)
    bad = mutate(sealed, changes)
    opener = DatagramOpener(ring)
    body = opener.open_or_none(bad, NOW)
    if body is None:
        assert opener.counters.total == 1
    else:
        assert bad == sealed and body == VALID_PACKET  # only an edit that cancelled itself passes


# --- gossip codec (what an authenticated peer, or a mesh without a secret, can send) -----


def _codec_decoders(data: bytes) -> None:
    for decode in (
        lambda d: decode_packet(d, MAX),
        lambda d: decode_beacon(d, MAX),
        decode_state,
    ):
        try:
            decode(data)
        except DatagramDropped:
            pass
    try:
        decode_tcp_ping(data)
    except DatagramDropped:
        pass


VALID_BEACON = encode_beacon(Beacon("node-a", 7946))
VALID_STATE = encode_state([StateRow("node-a", "a", ("127.0.0.1", 7946), 3, "alive", {"ctl": 1})], join=True)


@settings(max_examples=examples(500), **FUZZ_SETTINGS)
@given(st.binary(max_size=400))
def test_codec_random_bytes_only_drop(data: bytes) -> None:
    _codec_decoders(data)


@settings(max_examples=examples(500), **FUZZ_SETTINGS)
@given(st.sampled_from([VALID_PACKET, VALID_BEACON, VALID_STATE]), edits)
def test_codec_mutated_valid_datagrams_only_drop(valid: bytes, changes: list[tuple[int, int, int]]) -> None:
    _codec_decoders(mutate(valid, changes))


@settings(max_examples=examples(300), **FUZZ_SETTINGS)
@given(plain)
def test_codec_well_formed_msgpack_of_any_shape_only_drops(value: Any) -> None:
    _codec_decoders(msgpack.packb(value, use_bin_type=True))


def test_codec_refuses_oversized_before_parsing() -> None:
    with pytest.raises(DatagramDropped) as info:
        decode_packet(b"\x00" * (MAX + 1), MAX)
    assert info.value.reason == "oversized"
    # a msgpack array claiming 2**32-1 elements in a few bytes: refused by the length limits
    with pytest.raises(DatagramDropped):
        decode_packet(b"\xdd\xff\xff\xff\xff", MAX)


# --- frame header -------------------------------------------------------------------------


VALID_FRAME = encode_header({"kind": "request", "op": "status", "proto": 1, "nbytes": 3}) + b"abc"


def _read_all(data: bytes) -> list[dict[str, Any]]:
    """Every frame read_frame takes out of `data`, until it refuses or the stream ends."""

    async def run() -> list[dict[str, Any]]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        frames: list[dict[str, Any]] = []
        while True:
            try:
                header, payload = await read_frame(reader, max_header=4096, max_payload=1 << 20)
            except WireError:  # StreamClosed included
                return frames
            assert len(payload) == header.get("nbytes", 0) <= 1 << 20
            frames.append(header)

    return READ_LOOP.run_until_complete(run())


READ_LOOP = asyncio.new_event_loop()  # one loop for all examples: asyncio.run per example is slow


@settings(max_examples=examples(500), **FUZZ_SETTINGS)
@given(st.binary(max_size=300))
def test_frame_header_random_bytes(data: bytes) -> None:
    try:
        decode_header(data, max_payload=1 << 20)
    except WireError:
        pass
    if len(data) >= 4:
        try:
            assert header_length(data[:4], max_header=4096) <= 4096
        except WireError:
            pass


@settings(max_examples=examples(500), **FUZZ_SETTINGS)
@given(st.binary(max_size=300) | st.builds(mutate, st.just(VALID_FRAME * 2), edits))
def test_read_frame_random_and_mutated_streams(data: bytes) -> None:
    for header in _read_all(data):
        assert header["kind"] in known_kinds()


@settings(max_examples=examples(150), **FUZZ_SETTINGS)
@given(st.dictionaries(st.sampled_from(["kind", "nbytes", "op"]) | st.text(max_size=4), plain, max_size=5))
def test_decode_header_of_any_msgpack_map(header: dict[str, Any]) -> None:
    try:
        out = decode_header(msgpack.packb(header, use_bin_type=True), max_payload=1 << 20)
    except WireError:
        return
    assert out["kind"] in known_kinds() and 0 <= out.get("nbytes", 0) <= 1 << 20


def test_decode_header_with_an_unhashable_kind_is_a_wire_error() -> None:
    with pytest.raises(WireError):
        decode_header(msgpack.packb({"kind": []}), max_payload=1 << 20)


def test_oversized_lengths_are_refused_before_reading_or_allocating() -> None:
    """A 4 GiB header claim or payload claim: refused with the rest of the stream still unread."""

    async def refused_with_unread(data: bytes) -> int:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        with pytest.raises(WireError):
            await read_frame(reader, max_header=4096, max_payload=1 << 20)
        return len(reader._buffer)  # type: ignore[attr-defined]  # what read_frame left: it never asked for the claimed size

    tail = b"x" * 100
    assert asyncio.run(refused_with_unread(struct.pack(">I", 0xFFFFFFFF) + tail)) == len(tail)
    huge_payload = encode_header({"kind": "chunk", "nbytes": (1 << 20) + 1})
    assert asyncio.run(refused_with_unread(huge_payload + tail)) == len(tail)
    assert LENGTH_PREFIX.size == 4


# --- control server -------------------------------------------------------------------------


class LiveControl:
    """A real ControlServer on loopback, on one event loop kept across hypothesis examples."""

    def __init__(self, keyring: Keyring = RING) -> None:
        self.keyring = keyring
        self.loop = asyncio.new_event_loop()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.errors.append(ctx))
        self.requests = 0
        unlimited = ConnectionLimiter(rate=1e9, burst=10**9)  # fuzzing the decoders, not the limiter
        self.server = ControlServer(self._handle, protocol=1, keyring=keyring, limiter=unlimited)
        self.port = self.loop.run_until_complete(self.server.start_tcp("127.0.0.1", 0))

    async def _handle(self, header: dict[str, Any], payload: bytes, conn: Conn) -> None:
        self.requests += 1
        await conn.reply(True, op=str(header.get("op"))[:40], size=len(payload))

    def exchange(self, before: bytes | None, frame: bytes | None, header: dict[str, Any] | None) -> None:
        """Send `before` raw, or handshake then a raw `frame` or an authenticated `header` frame."""
        self.loop.run_until_complete(asyncio.wait_for(self._exchange(before, frame, header), 15))

    async def _exchange(
        self, before: bytes | None, frame: bytes | None, header: dict[str, Any] | None
    ) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            if before is not None:
                writer.write(before)
                writer.write_eof()
            else:
                channel = await dial_channel(reader, writer, self.keyring)
                if frame is not None:
                    writer.write(frame)
                    writer.write_eof()
                else:
                    assert header is not None
                    payload = header.pop("_payload", b"")
                    await channel.write(writer, header, payload)
                while True:  # whatever the server answers, until it closes
                    await channel.read(reader)
        except (WireError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    def still_serves(self) -> dict[str, Any]:
        return self.loop.run_until_complete(call(("127.0.0.1", self.port), "status", keyring=self.keyring))

    def close(self) -> None:
        self.loop.run_until_complete(self.server.close())
        self.loop.close()


@pytest.fixture(scope="module")
def control() -> Iterator[LiveControl]:
    live = LiveControl()
    try:
        yield live
    finally:
        live.close()


def _hello_frame() -> bytes:
    from meshtrain.security import handshake

    hello = handshake.dial_hello(RING, {}, NOW)
    return encode_header({**hello, "kind": "hello", "nbytes": 0})


VALID_REQUEST = encode_header({"kind": "request", "op": "status", "proto": 1, "nbytes": 0}) + b"\x00" * 32

request_headers = st.fixed_dictionaries(
    {"kind": st.sampled_from(sorted(known_kinds()))},
    optional={
        "op": st.sampled_from(["status", "ping", "run", "leave", "job.prepare"]) | plain,
        "proto": st.sampled_from([1]) | plain,
        "_payload": st.binary(max_size=64),
        "x": plain,
    },
)


@settings(max_examples=examples(150), **FUZZ_SETTINGS)
@given(st.binary(max_size=200) | st.builds(mutate, st.just(_hello_frame()), edits))
def test_control_bytes_before_the_handshake(control: LiveControl, data: bytes) -> None:
    control.exchange(data, None, None)
    assert not control.errors


@settings(max_examples=examples(150), **FUZZ_SETTINGS)
@given(st.binary(max_size=200) | st.builds(mutate, st.just(VALID_REQUEST), edits))
def test_control_forged_frames_after_a_valid_handshake(control: LiveControl, data: bytes) -> None:
    before = control.requests
    control.exchange(None, data, None)
    assert control.requests == before  # no untagged or altered frame reaches the handler
    assert not control.errors


@settings(max_examples=examples(150), **FUZZ_SETTINGS)
@given(request_headers)
def test_control_authenticated_hostile_requests(control: LiveControl, header: dict[str, Any]) -> None:
    control.exchange(None, None, header)
    assert not control.errors


@pytest.fixture(scope="module")
def encrypted_control() -> Iterator[LiveControl]:
    live = LiveControl(ENCRYPTED)
    try:
        yield live
    finally:
        live.close()


VALID_SEALED = (
    encode_header({"kind": "sealed", "nbytes": len(VALID_REQUEST) + 16}) + VALID_REQUEST + bytes(16)
)


@settings(max_examples=examples(150), **FUZZ_SETTINGS)
@given(st.binary(max_size=200) | st.builds(mutate, st.just(VALID_SEALED), edits))
def test_encrypted_control_forged_frames_after_a_valid_handshake(
    encrypted_control: LiveControl, data: bytes
) -> None:
    before = encrypted_control.requests
    encrypted_control.exchange(None, data, None)
    assert encrypted_control.requests == before  # nothing unsealed or altered reaches the handler
    assert not encrypted_control.errors


@settings(max_examples=examples(150), **FUZZ_SETTINGS)
@given(request_headers)
def test_encrypted_control_sealed_hostile_requests(
    encrypted_control: LiveControl, header: dict[str, Any]
) -> None:
    encrypted_control.exchange(None, None, header)
    assert not encrypted_control.errors


def test_encrypted_control_still_serves(encrypted_control: LiveControl) -> None:
    assert encrypted_control.still_serves()["ok"] is True
    assert encrypted_control.requests >= 1


def test_control_survives_a_header_that_breaks_decode_header(control: LiveControl) -> None:
    """{"kind": []} makes wire.decode_header raise TypeError (see the xfail above): one connection ends."""
    packed = msgpack.packb({"kind": [], "nbytes": 0})
    before = control.server.drops.snapshot()["malformed"]
    control.exchange(LENGTH_PREFIX.pack(len(packed)) + packed, None, None)  # as the hello
    control.exchange(None, LENGTH_PREFIX.pack(len(packed)) + packed, None)  # after a valid handshake
    assert control.server.drops.snapshot()["malformed"] == before + 2
    assert not control.errors


def test_control_server_still_serves_and_counted_drops(control: LiveControl) -> None:
    control.exchange(b"\x00\x00\x00\x05garbage", None, None)  # whatever ran before: one more stranger
    assert control.still_serves()["ok"] is True
    assert control.server.drops.total > 0  # the garbage was counted, by reason
    assert not control.errors


# --- join tokens ------------------------------------------------------------------------------

VALID_TOKEN = make_token(KEY, "10.0.0.1:7946")


@settings(max_examples=examples(500), **FUZZ_SETTINGS)
@given(st.text(max_size=120) | st.text(max_size=80).map(lambda t: "mt1." + t))
def test_parse_token_random_text_is_a_user_error(text: str) -> None:
    try:
        token = parse_token(text)
    except UserError as exc:
        assert "\n" not in str(exc)
    else:
        assert len(token.secret) == 32


@settings(max_examples=examples(500), **FUZZ_SETTINGS)
@given(edits)
def test_parse_token_mutated_is_refused_or_unchanged(changes: list[tuple[int, int, int]]) -> None:
    text = mutate(VALID_TOKEN.encode(), changes).decode("latin-1")
    try:
        token = parse_token(text)
    except UserError:
        return
    assert token.secret == KEY  # the checksum lets no altered secret through
