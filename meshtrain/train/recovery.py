"""What the members of a freshly formed ring do before training on: the recovery plan (pure).

A ring generation is formed whenever the job's membership view changes (a
worker lost, a node joining) or the old ring broke. Its members are at
most one reduction apart, because the ring moves in lock step: each is either

- *pending* at step C: inside `mesh.allreduce` of step C, holding the
  gradients of its slice (computed with the shares of generation `slice_gen`);
- *idle* at step C: between steps, every update up to C applied;
- *behind*: pending at C-1 while others completed that reduction (the ring
  broke after some members had received every chunk);
- *stale*: idle at a step < C, or without the others' state: a joining
  worker, or one whose digest disagrees with the majority.

They swap a `MemberStatus` over the new ring (one small all-reduce) and every
member computes the same `RecoveryPlan` from the same statuses:

- behind members take the completed reduction R(C-1) from a member that
  kept it (one broadcast over the ring) and return it from their all-reduce:
  nothing is recomputed, every member applies the same update;
- if anyone is pending at C, step C stays *pinned* to the shares of the
  generation it was handed out in: the holders redo the reduction with the
  gradients they hold, idle members compute their pinned slices, members that
  had no slice in it (joiners) add zeros with weight 0; slices of members that
  are gone are *carried* into the next step, so no sample is lost or repeated;
  the full state then goes to the members that need it at the next boundary;
- otherwise step C is handed out with the new generation's shares, and stale
  members receive the full state first (one broadcast over the ring).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshtrain.ring import codecs

SLOTS = 18  # 16-bit words per member: committed 4, digest 8, flags 1, slice gen 2, joined gen 2, wire 1

PENDING, HAS_LAST, HAS_STATE = 1, 2, 4


@dataclass(frozen=True)
class MemberStatus:
    """One member's position, as it enters a new generation."""

    member: str
    committed: int  # steps whose update this member has applied
    digest: str  # 32 hex chars: state_digest of its state after `committed` steps ("" without state)
    pending: bool = False  # inside the all-reduce of step `committed`
    has_last: bool = False  # keeps the reduced result of step committed - 1
    slice_gen: int = -1  # the generation whose shares its pending (or next) step was handed out with
    joined_gen: int = -1  # the generation in which it got its state (-1: from the start)
    wire: str = ""  # the wire dtype of its pending reduction

    @property
    def has_state(self) -> bool:
        return bool(self.digest)


def encode_status(size: int, rank: int, status: MemberStatus) -> np.ndarray:
    """A float32 vector, zero but this member's slots: the sum over members gathers all (exactly)."""
    digest = bytes.fromhex(status.digest) if status.digest else bytes(16)
    if len(digest) != 16:
        raise ValueError("digest must be 16 bytes (32 hex characters)")
    flags = (PENDING if status.pending else 0) | (HAS_LAST if status.has_last else 0)
    flags |= HAS_STATE if status.digest else 0
    words = _words(status.committed, 4) + [int.from_bytes(digest[i : i + 2], "big") for i in range(0, 16, 2)]
    words += [flags] + _words(status.slice_gen + 1, 2) + _words(status.joined_gen + 1, 2)
    words += [codecs.codec(status.wire).code if status.wire else 0]
    vec = np.zeros(size * SLOTS, np.float32)
    vec[rank * SLOTS : (rank + 1) * SLOTS] = words
    return vec


def decode_statuses(members: Sequence[str], summed: np.ndarray) -> list[MemberStatus]:
    """The members' statuses from the element-wise sum of their vectors."""
    ints = np.rint(np.asarray(summed, np.float64)).astype(np.int64).reshape(len(members), SLOTS)
    out = []
    for member, row in zip(members, ints, strict=True):
        flags = int(row[12])
        digest = b"".join(int(w).to_bytes(2, "big") for w in row[4:12]).hex() if flags & HAS_STATE else ""
        out.append(
            MemberStatus(
                member=member,
                committed=_unwords(row[0:4]),
                digest=digest,
                pending=bool(flags & PENDING),
                has_last=bool(flags & HAS_LAST),
                slice_gen=_unwords(row[13:15]) - 1,
                joined_gen=_unwords(row[15:17]) - 1,
                wire=_wire_name(int(row[17])),
            )
        )
    return out


def _wire_name(code: int) -> str:
    found = codecs.by_code(code)
    return found.name if found is not None else ""


def _words(value: int, count: int) -> list[int]:
    if value < 0 or value >= 1 << (16 * count):
        raise ValueError(f"{value} does not fit {count} 16-bit words")
    return [(value >> (16 * i)) & 0xFFFF for i in range(count)]


def _unwords(words: Any) -> int:
    return sum(int(w) << (16 * i) for i, w in enumerate(words))


class Unrecoverable(Exception):
    """The statuses cannot be reconciled (a member more than one step behind while pending, or
    diverged replicas while pending): the member concerned must leave and rejoin afresh."""


@dataclass(frozen=True)
class RecoveryPlan:
    target: int  # C: the step every member trains next (after behind members take R(C-1))
    behind: tuple[str, ...]  # take R(C-1) from r_source
    r_source: str | None
    holders: tuple[str, ...]  # pending at C: redo with the gradients they hold
    pinned_gen: int | None  # step C's shares come from this generation (None: the new one's)
    stale: tuple[str, ...]  # need the full state
    zero: tuple[str, ...]  # add zeros with weight 0 to the pinned reduction (no slice in it)
    state_source: str | None  # who broadcasts the state to `stale` (unpinned) or `zero` (pinned)
    state_now: bool  # True: during this recovery; False: at the boundary after step C
    wire: str  # the wire dtype of the pinned reduction ("" when nothing is pinned)


def plan_recovery(statuses: Sequence[MemberStatus]) -> RecoveryPlan:
    """The plan every member of the new generation computes from the same statuses (rank order)."""
    with_state = [s for s in statuses if s.has_state]
    if not with_state:
        raise Unrecoverable("no member of the new generation holds a training state")
    target = max(s.committed for s in with_state)
    at_target = [s for s in with_state if s.committed == target]
    behind = [s for s in with_state if s.committed == target - 1 and s.pending]
    holders = [s for s in at_target if s.pending]
    majority = _majority_digest(at_target)
    for s in holders + behind:
        if s in holders and s.digest != majority:
            raise Unrecoverable(f"{s.member} diverged from the other replicas at step {target}")
    if behind and len({s.digest for s in behind}) > 1:
        raise Unrecoverable(f"members behind at step {target - 1} diverged")
    if any(s.pending and s.committed < target - 1 for s in with_state):
        raise Unrecoverable("a member is more than one step behind inside a reduction")
    stale = tuple(
        s.member
        for s in statuses
        if not s.has_state
        or (s.committed < target and not (s.pending and s.committed == target - 1))
        or (s.committed == target and s.digest != majority)
    )
    r_source = None
    if behind:
        keepers = [s for s in at_target if s.has_last and s.digest == majority]
        if not keepers:
            raise Unrecoverable(f"nobody kept the result of step {target - 1} for the members behind")
        r_source = keepers[0].member
    pinned_gen = None
    wire = ""
    zero: tuple[str, ...] = ()
    if holders:
        gens = {s.slice_gen for s in holders}
        if len(gens) != 1:
            raise Unrecoverable(f"step {target} was handed out in generations {sorted(gens)}")
        pinned_gen = gens.pop()
        wire = holders[0].wire
        zero = tuple(s.member for s in statuses if s.member in stale or s.joined_gen > pinned_gen)
        state_source = holders[0].member if zero else None
    else:
        idle = [s for s in at_target if not s.pending and s.digest == majority]
        state_source = idle[0].member if stale and idle else None
        if stale and state_source is None:
            raise Unrecoverable("no idle member holds the newest state")
    return RecoveryPlan(
        target=target,
        behind=tuple(s.member for s in behind),
        r_source=r_source,
        holders=tuple(s.member for s in holders),
        pinned_gen=pinned_gen,
        stale=stale,
        zero=zero,
        state_source=state_source,
        state_now=not holders,
        wire=wire,
    )


def _majority_digest(states: Sequence[MemberStatus]) -> str:
    """The digest most members at the target hold (ties: the first in rank order)."""
    counts: dict[str, int] = {}
    for s in states:
        counts[s.digest] = counts.get(s.digest, 0) + 1
    best = max(counts.values())
    return next(s.digest for s in states if counts[s.digest] == best)
