"""Node identity apart from display names: who keeps a name two machines both claim.

A node's *id* is what the membership protocol keys on (incarnations,
refutation, suspicion all follow the id), and the agent stores it in its
state directory, so it survives restarts and never depends on the hostname
being unique. The *name* is what people and jobs use (`--nodes mac1,mac2`,
the live view): many machines are called `ubuntu` or `raspberrypi`, so two
live members may claim one name. Every node applies the same rule to the
same two claims and only the one that must yield acts, so no coordination is
needed:

- the claim taken earlier keeps the name: each node publishes, in its
  metadata under `NAMED_KEY`, when it took its current name (ms since the
  epoch), ties broken by the lower id;
- only a live (`alive`) holder counts: a suspect or dead one may be the very
  machine now restarting under a new id, and is gone soon anyway;
- the one that yields takes the first free ``NAME-2``, ``NAME-3``, ... (an
  agent whose name was given explicitly refuses to start instead, naming the
  holder's address).

Pure: members in, a decision out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from meshtrain.gossip.member import ALIVE, SUSPECT, Member

NAMED_KEY = "named"
"""Metadata key: when this node took its current name, in ms since the epoch (the older claim keeps it)."""

MAX_NAME = 128


def named_at(meta: dict[str, Any] | None) -> int:
    value = (meta or {}).get(NAMED_KEY)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 1 << 62  # a node that does not say (an older version) counts as the newest claim


def must_yield(me: Member, other: Member) -> bool:
    """True when `other` holds `me`'s name and keeps it: `me` must take another name (or refuse)."""
    if other.id == me.id or other.name != me.name or other.state != ALIVE:
        return False
    return (named_at(other.meta), other.id) < (named_at(me.meta), me.id)


def holder_of(me: Member, members: Iterable[Member]) -> Member | None:
    """The live member that keeps `me`'s name against us, if any."""
    for m in members:
        if must_yield(me, m):
            return m
    return None


def free_name(base: str, members: Iterable[Member]) -> str:
    """`base-2`, `base-3`, ...: the first that no live or suspect member holds."""
    taken = {m.name for m in members if m.state in (ALIVE, SUSPECT)}
    k = 2
    while True:
        suffix = f"-{k}"
        name = base[: MAX_NAME - len(suffix)] + suffix
        if name not in taken:
            return name
        k += 1
