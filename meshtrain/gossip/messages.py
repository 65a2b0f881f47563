"""The messages of the gossip protocol, as plain values (the codec turns them into bytes).

Probe traffic (Ping, IndirectPing, Ack, Nack) is answered at once; updates (Alive,
Suspect, Dead) are what gets piggy-backed and gossiped. A Packet is one UDP datagram:
a sender id and a compound of messages, so one datagram can carry a ping plus
several updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshtrain.gossip.member import Addr


@dataclass(frozen=True, slots=True)
class Ping:
    """Are you alive? `target` is the id that must answer: a new process on an old address stays quiet."""

    seq: int
    target: str


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """Please ping `target` at `addr` for me and forward its ack; send a Nack if it stays silent."""

    seq: int
    target: str
    addr: Addr
    nack: bool


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    """The relay heard nothing from the target: tells the prober its own network path is fine (Lifeguard)."""

    seq: int


@dataclass(frozen=True, slots=True)
class Alive:
    """`node` is alive at this incarnation, reachable at `addr`, with this metadata."""

    node: str
    name: str
    addr: Addr
    incarnation: int
    meta: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Suspect:
    """`by` failed to probe `node` at this incarnation; `node` has until the suspicion timeout to refute."""

    node: str
    incarnation: int
    by: str


@dataclass(frozen=True, slots=True)
class Dead:
    """`node` is gone at this incarnation. When `by == node` it left gracefully."""

    node: str
    incarnation: int
    by: str


Update = Alive | Suspect | Dead
Message = Ping | IndirectPing | Ack | Nack | Alive | Suspect | Dead


@dataclass(frozen=True, slots=True)
class Packet:
    """One datagram: who sent it and what it carries (the primary message first, then updates)."""

    sender: str
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class Beacon:
    """LAN discovery: only that a node exists and the port its gossip listens on.

    The address comes from the datagram's source. `auth` is a reserved slot (None
    today) where an authentication tag over the other fields goes once meshes have
    secrets, so the layout does not change then.
    """

    node: str
    port: int
    auth: bytes | None = None


@dataclass(frozen=True, slots=True)
class StateRow:
    """One member in a push-pull state exchange (TCP)."""

    node: str
    name: str
    addr: Addr
    incarnation: int
    state: str
    meta: dict[str, Any]
