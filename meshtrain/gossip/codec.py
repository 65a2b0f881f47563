"""Bytes <-> gossip messages: msgpack arrays, size-bounded, every field validated.

A datagram is `[VERSION, sender, [[kind, field...], ...]]`. Anything that is not
exactly that (truncated, oversized, wrong types, unknown kind, other version) raises
`DatagramDropped` with a short `reason` the node counts in `drops`; nothing else
escapes `decode_packet`.
"""

from __future__ import annotations

from typing import Any

import msgpack

from meshtrain.errors import WireError
from meshtrain.gossip.member import STATES
from meshtrain.gossip.messages import (
    Ack,
    Alive,
    Beacon,
    Dead,
    IndirectPing,
    Message,
    Nack,
    Packet,
    Ping,
    StateRow,
    Suspect,
)

VERSION = 1
MAX_ID = 128  # ids and names: long enough for "hostname-pid-random", short enough to bound datagrams
MAX_HOST = 255
MAX_MESSAGES = 128
META_MAX_BYTES = 512  # like memberlist's MetaMaxSize: meta rides in every Alive, so it must stay small
MAX_SEQ = (1 << 63) - 1
MAX_INCARNATION = (1 << 63) - 1
MAX_STATE_BYTES = 16 << 20  # a push-pull of 10,000 members with full meta fits comfortably

PING, INDIRECT, ACK, NACK, ALIVE, SUSPECT, DEAD = range(7)
BEACON = "b"


class DatagramDropped(WireError):
    """A datagram or frame that cannot be used; `reason` names the counter it goes to."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


def _bad(detail: str) -> DatagramDropped:
    return DatagramDropped("malformed", detail)


# ---------------------------------------------------------------- encoding


def message_to_wire(m: Message) -> list[Any]:
    t = type(m)
    if t is Ping:
        return [PING, m.seq, m.target]  # type: ignore[union-attr]
    if t is Ack:
        return [ACK, m.seq]  # type: ignore[union-attr]
    if t is Alive:
        a: Alive = m  # type: ignore[assignment]
        return [ALIVE, a.node, a.name, a.addr[0], a.addr[1], a.incarnation, a.meta]
    if t is Suspect:
        s: Suspect = m  # type: ignore[assignment]
        return [SUSPECT, s.node, s.incarnation, s.by]
    if t is Dead:
        d: Dead = m  # type: ignore[assignment]
        return [DEAD, d.node, d.incarnation, d.by]
    if t is IndirectPing:
        i: IndirectPing = m  # type: ignore[assignment]
        return [INDIRECT, i.seq, i.target, i.addr[0], i.addr[1], i.nack]
    if t is Nack:
        return [NACK, m.seq]  # type: ignore[union-attr]
    raise TypeError(f"not a gossip message: {m!r}")


_packb = msgpack.Packer(use_bin_type=True).pack


def message_size(m: Message) -> int:
    """Encoded size of one message inside a packet's list, for piggy-back budgeting."""
    return len(_packb(message_to_wire(m)))


PACKET_OVERHEAD = 8  # version, array headers; the sender id's length is added on top


def encode_packet(p: Packet) -> bytes:
    return _packb([VERSION, p.sender, [message_to_wire(m) for m in p.messages]])


def encode_meta(meta: dict[str, Any]) -> bytes:
    return _packb(meta)


def encode_beacon(b: Beacon) -> bytes:
    return _packb([VERSION, BEACON, b.node, b.port, b.auth])


def encode_state(rows: list[StateRow], join: bool) -> bytes:
    return _packb(
        [
            VERSION,
            join,
            [[r.node, r.name, r.addr[0], r.addr[1], r.incarnation, r.state, r.meta] for r in rows],
        ]
    )


# ---------------------------------------------------------------- decoding


def _unpack(data: bytes, max_size: int) -> Any:
    if len(data) > max_size:
        raise DatagramDropped("oversized", f"{len(data)} > {max_size} bytes")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=max_size,
            max_bin_len=max_size,
            max_array_len=max_size,
            max_map_len=max_size,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of ValueError/TypeError/StackError subclasses
        raise _bad(f"not msgpack ({type(exc).__name__})") from None


def _str(v: Any, limit: int = MAX_ID) -> str:
    if type(v) is not str or not v or len(v) > limit:
        raise _bad("bad string")
    return v


def _int(v: Any, hi: int) -> int:
    if type(v) is not int or v < 0 or v > hi:
        raise _bad("bad integer")
    return v


def _port(v: Any) -> int:
    return _int(v, 65535)


def is_plain(v: Any, depth: int = 0) -> bool:
    """JSON-like values only (what meta is documented to hold), nested at most 8 deep."""
    if v is None or type(v) in (bool, int, float, str, bytes):
        return True
    if depth >= 8:
        return False
    if type(v) is list:
        return all(is_plain(x, depth + 1) for x in v)
    if type(v) is dict:
        return all(type(k) is str and is_plain(x, depth + 1) for k, x in v.items())
    return False


def _meta(v: Any) -> dict[str, Any]:
    if type(v) is not dict or not is_plain(v):
        raise _bad("bad meta")
    return v


def _fields(raw: list[Any], n: int) -> list[Any]:
    if len(raw) != n:
        raise _bad("wrong field count")
    return raw


def _message(raw: Any) -> Message:
    if type(raw) is not list or not raw:
        raise _bad("message is not a list")
    kind = raw[0]
    if kind == PING and type(kind) is int:
        f = _fields(raw, 3)
        return Ping(_int(f[1], MAX_SEQ), _str(f[2]))
    if kind == ACK and type(kind) is int:
        f = _fields(raw, 2)
        return Ack(_int(f[1], MAX_SEQ))
    if kind == ALIVE and type(kind) is int:
        f = _fields(raw, 7)
        meta = _meta(f[6])
        return Alive(
            _str(f[1]), _str(f[2]), (_str(f[3], MAX_HOST), _port(f[4])), _int(f[5], MAX_INCARNATION), meta
        )
    if kind == SUSPECT and type(kind) is int:
        f = _fields(raw, 4)
        return Suspect(_str(f[1]), _int(f[2], MAX_INCARNATION), _str(f[3]))
    if kind == DEAD and type(kind) is int:
        f = _fields(raw, 4)
        return Dead(_str(f[1]), _int(f[2], MAX_INCARNATION), _str(f[3]))
    if kind == INDIRECT and type(kind) is int:
        f = _fields(raw, 6)
        if type(f[5]) is not bool:
            raise _bad("bad nack flag")
        return IndirectPing(_int(f[1], MAX_SEQ), _str(f[2]), (_str(f[3], MAX_HOST), _port(f[4])), f[5])
    if kind == NACK and type(kind) is int:
        f = _fields(raw, 2)
        return Nack(_int(f[1], MAX_SEQ))
    raise DatagramDropped("unknown", f"message kind {kind!r}")


def _version(raw: Any, n: int) -> list[Any]:
    if type(raw) is not list or len(raw) != n:
        raise _bad("not a datagram")
    if raw[0] != VERSION or type(raw[0]) is not int:
        raise DatagramDropped("version", f"version {raw[0]!r}")
    return raw


def decode_packet(data: bytes, max_size: int) -> Packet:
    raw = _version(_unpack(data, max_size), 3)
    msgs = raw[2]
    if type(msgs) is not list or not msgs or len(msgs) > MAX_MESSAGES:
        raise _bad("bad message list")
    return Packet(_str(raw[1]), tuple(_message(m) for m in msgs))


def decode_beacon(data: bytes, max_size: int) -> Beacon:
    raw = _unpack(data, max_size)
    if type(raw) is list and len(raw) == 5 and raw[1] != BEACON:
        raise DatagramDropped("unknown", "not a beacon")
    raw = _version(raw, 5)
    if raw[4] is not None and type(raw[4]) is not bytes:
        raise _bad("bad auth slot")
    return Beacon(_str(raw[2]), _port(raw[3]), raw[4])


def decode_state(data: bytes) -> tuple[list[StateRow], bool]:
    raw = _version(_unpack(data, MAX_STATE_BYTES), 3)
    join, rows = raw[1], raw[2]
    if type(join) is not bool or type(rows) is not list:
        raise _bad("bad state")
    out = []
    for r in rows:
        if type(r) is not list or len(r) != 7 or r[5] not in STATES:
            raise _bad("bad state row")
        out.append(
            StateRow(
                _str(r[0]),
                _str(r[1]),
                (_str(r[2], MAX_HOST), _port(r[3])),
                _int(r[4], MAX_INCARNATION),
                r[5],
                _meta(r[6]),
            )
        )
    return out, join


# ---------------------------------------------------------------- TCP requests (push-pull, fallback ping)

TCP_PING, TCP_ACK = "ping", "ack"


def encode_tcp_ping(target: str) -> bytes:
    return _packb([VERSION, TCP_PING, target])


def encode_tcp_ack(node: str) -> bytes:
    return _packb([VERSION, TCP_ACK, node])


def decode_tcp_ping(data: bytes, kind: str = TCP_PING) -> str | None:
    """The target id of a TCP ping (or the answering id of an ack); None when `data` is something else."""
    try:
        raw = msgpack.unpackb(data, raw=False, max_str_len=4096, max_array_len=16, max_map_len=16)
    except Exception:
        return None
    if type(raw) is list and len(raw) == 3 and raw[0] == VERSION and raw[1] == kind:
        return _str(raw[2])
    return None
