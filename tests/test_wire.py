"""The frame codec: round trips, and every malformed input is a WireError, never a crash."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrain import wire
from meshtrain.errors import WireError

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
fields = st.dictionaries(
    st.text(min_size=1, max_size=10).filter(lambda k: k not in ("kind", "nbytes", "tag")), scalars, max_size=8
)


async def _feed(data: bytes, **kwargs: Any) -> list[tuple[dict[str, Any], bytes]]:
    """Every frame a reader gets out of `data`, until the stream ends."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    while True:
        try:
            frames.append(await wire.read_frame(reader, **kwargs))
        except wire.StreamClosed:
            return frames


def read_all(data: bytes, **kwargs: Any) -> list[tuple[dict[str, Any], bytes]]:
    return asyncio.run(_feed(data, **kwargs))


class _Sink:
    """The StreamWriter surface write_frame uses, collecting bytes (and checking no payload copy)."""

    def __init__(self) -> None:
        self.parts: list[Any] = []

    def write(self, data: Any) -> None:
        self.parts.append(data)

    def writelines(self, parts: list[Any]) -> None:
        self.parts.extend(parts)

    async def drain(self) -> None:
        pass

    def data(self) -> bytes:
        return b"".join(bytes(p) for p in self.parts)


def written(header: dict[str, Any], payload: bytes | memoryview = b"", key: bytes | None = None) -> bytes:
    sink = _Sink()
    asyncio.run(wire.write_frame(sink, header, payload, key=key))  # type: ignore[arg-type]
    return sink.data()


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(sorted(wire.known_kinds())), extra=fields, payload=st.binary(max_size=3000))
def test_frames_round_trip(kind: str, extra: dict[str, Any], payload: bytes) -> None:
    data = written({"kind": kind, **extra}, payload) * 2
    frames = read_all(data)
    assert len(frames) == 2
    for header, got in frames:
        assert header == {"kind": kind, **extra, "nbytes": len(payload)}
        assert got == payload


def test_payload_memoryview_goes_to_the_writer_uncopied() -> None:
    sink = _Sink()
    payload = memoryview(bytearray(b"x" * 1000))
    asyncio.run(wire.write_frame(sink, {"kind": "chunk"}, payload))  # type: ignore[arg-type]
    assert sink.parts[-1] is payload


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_is_a_wire_error_never_a_crash(data: bytes) -> None:
    try:
        read_all(data)
    except WireError:
        pass


@given(payload=st.binary(min_size=1, max_size=500), cut=st.integers(1, 10_000))
def test_truncated_stream_is_a_wire_error(payload: bytes, cut: int) -> None:
    data = written({"kind": "chunk", "step": 3}, payload)
    cut = cut % len(data) or 1
    with pytest.raises(WireError, match="ended inside"):
        read_all(data[:cut])


def test_clean_end_of_stream_is_stream_closed() -> None:
    with pytest.raises(wire.StreamClosed):
        asyncio.run(_first(b""))


async def _first(data: bytes, **kwargs: Any) -> tuple[dict[str, Any], bytes]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await wire.read_frame(reader, **kwargs)


def test_unknown_kind_is_rejected_on_both_sides() -> None:
    with pytest.raises(WireError, match="unknown frame kind"):
        wire.encode_header({"kind": "teleport"})
    raw = msgpack.packb({"kind": "teleport", "nbytes": 0})
    with pytest.raises(WireError, match="unknown frame kind"):
        read_all(struct.pack(">I", len(raw)) + raw)


def test_registered_kind_is_accepted() -> None:
    wire.register_kind("test-probe")
    assert read_all(written({"kind": "test-probe"}))[0][0]["kind"] == "test-probe"


@pytest.mark.parametrize(
    "header",
    [
        [1, 2, 3],
        {"nbytes": 0},
        {"kind": "chunk", "nbytes": -1},
        {"kind": "chunk", "nbytes": "9"},
        {"kind": "chunk", "nbytes": True},
    ],
)
def test_bad_headers_are_rejected(header: Any) -> None:
    raw = msgpack.packb(header)
    with pytest.raises(WireError):
        read_all(struct.pack(">I", len(raw)) + raw)


def test_oversized_frames_are_rejected_before_allocation() -> None:
    with pytest.raises(WireError, match="header of"):
        read_all(struct.pack(">I", 2**31) + b"x" * 10)
    with pytest.raises(WireError, match="header of"):
        read_all(struct.pack(">I", 0))
    huge = msgpack.packb({"kind": "chunk", "nbytes": 2**40})
    with pytest.raises(WireError, match="payload of"):
        read_all(struct.pack(">I", len(huge)) + huge)
    data = written({"kind": "chunk"}, b"y" * 100)
    with pytest.raises(WireError, match="payload of"):
        read_all(data, max_payload=99)
    assert read_all(data, max_payload=100)[0][1] == b"y" * 100


def test_authentication_tag() -> None:
    key = b"k" * 32
    data = written({"kind": "request", "op": "status"}, b"payload", key=key)
    header, payload = read_all(data, key=key)[0]
    assert header["op"] == "status" and payload == b"payload" and len(header["tag"]) == 32
    with pytest.raises(WireError, match="authentication"):
        read_all(data, key=b"x" * 32)
    with pytest.raises(WireError, match="authentication"):
        read_all(written({"kind": "request"}, b"payload"), key=key)
    tampered = data[:-1] + b"X"
    with pytest.raises(WireError, match="authentication"):
        read_all(tampered, key=key)
