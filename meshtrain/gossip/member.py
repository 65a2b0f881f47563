"""What the rest of meshtrain sees of membership: members and events about them.

Kept apart from the state machine so the agent, the UI and the elastic layer can
import these small value types without pulling in protocol logic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Addr = tuple[str, int]
"""(host, port) a member is reached at; for gossip the UDP port, push-pull uses the same port on TCP."""

ALIVE = "alive"
SUSPECT = "suspect"
DEAD = "dead"
LEFT = "left"
STATES = (ALIVE, SUSPECT, DEAD, LEFT)

EVENT_KINDS = ("joined", "alive", "suspect", "dead", "left", "updated", "renamed", "name_taken")
"""`joined`: first heard of; `alive`: back from suspect/dead/left (a refutation or a restart);
`updated`: its address, name or meta changed; `renamed`: this node took another name because a live
member holds its own (`member` is this node, renamed); `name_taken`: the same, for a node that must not
rename (`member` is the holder); the others name the state it entered."""


@dataclass(frozen=True, slots=True)
class Member:
    """A snapshot of one member as this node currently believes it to be."""

    id: str
    name: str
    addr: Addr
    state: str
    incarnation: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A change in this node's view; `member` is the snapshot after the change."""

    kind: str
    member: Member
