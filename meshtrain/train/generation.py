"""Generation agreement (pure): who is in ring g+1, in which order, and who is behind.

Every member runs the same functions on the same view and reaches the same
answer without a coordinator:

1. `next_roster` -- from the membership view (the job's live workers), the
   roster of generation g+1: the number, the rank order, the batch shares.
2. Once that ring is connected, members swap (step, digest, pending step)
   with `gather_states` (an all-gather folded into one small all-reduce).
3. `plan_state` -- from those states: the target (step, digest), the members
   behind and which up-to-date member streams its state to each, and whether
   the interrupted step's reduction is redone (nobody committed it) or
   dropped (someone did: the others are behind and just take its state).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = [
    "Candidate",
    "Roster",
    "MemberState",
    "StatePlan",
    "next_roster",
    "plan_state",
    "encode_state_vector",
    "decode_state_vector",
    "gather_states",
    "STATE_SLOTS",
]


@dataclass(frozen=True)
class Candidate:
    """One live worker of the job, as the membership view shows it."""

    member: str  # stable id across generations (node name)
    addr: tuple[str, int]  # its ring listener
    generation: int = -1  # the newest generation whose ring it formed; -1 for a fresh joiner
    weight: float = 1.0  # its share of the global batch (measured speed)


@dataclass(frozen=True)
class Roster:
    """Generation g's members in rank order, with their ring addresses and shares."""

    generation: int
    members: tuple[str, ...]
    addrs: tuple[tuple[str, int], ...]
    weights: tuple[float, ...]

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def shares(self) -> dict[str, float]:
        """member -> weight in rank order (what GlobalSampler.assignment takes)."""
        return dict(zip(self.members, self.weights, strict=True))

    def rank_of(self, member: str) -> int:
        return self.members.index(member)

    @property
    def fingerprint(self) -> int:
        """64-bit hash of everything in the roster; members compare it to prove they formed the same one.

        The ring handshake checks generation, rank and size, not shares: two
        members whose views differed only in weights would connect, then slice
        the batch differently. Swapping fingerprints catches that.
        """
        text = repr((self.generation, self.members, self.addrs, self.weights)).encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def next_roster(current_generation: int, live: Iterable[Candidate]) -> Roster:
    """The roster of the next generation: number max(formed)+1, ranks in member-id order.

    The number depends on the view only (the generations members *formed*, not
    attempted), so members that retry after a failed handshake with the same
    view try the same number again instead of chasing each other.

    Sorting by id (not by arrival) means two members that saw the same view
    never disagree about ranks; a member with a different view connects with a
    different generation or neighbour and the ring handshake refuses it.
    """
    members = sorted({c.member: c for c in live}.values(), key=lambda c: c.member)
    if not members:
        raise ValueError("no live members to form a generation from")
    generation = max([current_generation, *(c.generation for c in members)]) + 1
    return Roster(
        generation,
        tuple(c.member for c in members),
        tuple(c.addr for c in members),
        tuple(float(c.weight) for c in members),
    )


@dataclass(frozen=True)
class MemberState:
    """What a member reports on joining a generation."""

    member: str
    step: int  # steps committed (optimizer updates applied)
    digest: str  # state_digest(params + optimizer state, step), 32 hex chars
    pending: tuple[int, int] | None = None  # (step, generation) whose gradients it holds, not committed
    roster: int = 0  # the fingerprint of the roster this member formed


@dataclass(frozen=True)
class StatePlan:
    """What generation g does before training on: transfers first, then redo or the next step."""

    generation: int
    target_step: int
    target_digest: str
    up_to_date: tuple[str, ...]
    behind: tuple[str, ...]
    sources: Mapping[str, str] = field(default_factory=dict)  # behind member -> member sending to it
    redo: tuple[int, int] | None = None  # (step, generation) of the interrupted reduction to redo
    redo_members: tuple[str, ...] = ()  # contribute their held gradients; the others weigh 0
    agreed: bool = True  # False: members formed different rosters (views differed); form again

    def source_of(self, member: str) -> str | None:
        return self.sources.get(member)

    def receivers_of(self, member: str) -> list[str]:
        return [m for m, src in self.sources.items() if src == member]


def plan_state(roster: Roster, states: Sequence[MemberState]) -> StatePlan:
    """Decide the target state, who is behind, who sends to whom, and whether to redo a reduction.

    The target is the highest step; among members there, the digest held by
    the most (ties: the one the lowest member id holds). Anyone else is behind
    -- a joiner, a member that missed a commit, or one whose state diverged.
    Behind members are spread round-robin over the up-to-date ones. When a
    reduction is redone, only its contributors count as up to date: everyone
    else receives state and the interrupted generation's shares from one.
    """
    by_member = {s.member: s for s in states}
    if set(by_member) != set(roster.members):
        raise ValueError(f"states of {sorted(by_member)} do not match roster {list(roster.members)}")
    if any(s.roster != roster.fingerprint for s in states):
        return StatePlan(roster.generation, -1, "", (), tuple(roster.members), agreed=False)
    target_step = max(s.step for s in states)
    at_target = sorted((s for s in states if s.step == target_step), key=lambda s: s.member)
    counts: dict[str, int] = {}
    for s in at_target:
        counts[s.digest] = counts.get(s.digest, 0) + 1
    best = max(counts.values())
    target_digest = next(s.digest for s in at_target if counts[s.digest] == best)
    up_to_date = tuple(m for m in roster.members if _fresh(by_member[m], target_step, target_digest))
    held = [by_member[m].pending for m in up_to_date if by_member[m].pending is not None]
    redo = None
    redo_members: tuple[str, ...] = ()
    candidates = [p for p in held if p is not None and p[0] == target_step]
    if candidates:
        redo = max(candidates, key=lambda p: p[1])
        redo_members = tuple(m for m in up_to_date if by_member[m].pending == redo)
        # members that did not compute the interrupted step may not know its shares (a joiner
        # whose initial state happens to match): they take state *and shares* from a contributor
        up_to_date = redo_members
    behind = tuple(m for m in roster.members if m not in up_to_date)
    sources = {m: up_to_date[i % len(up_to_date)] for i, m in enumerate(behind)}
    return StatePlan(
        roster.generation, target_step, target_digest, up_to_date, behind, sources, redo, redo_members
    )


def _fresh(state: MemberState, step: int, digest: str) -> bool:
    return state.step == step and state.digest == digest


# --- swapping states over the new ring -------------------------------------------------------------------

# per member, 16-bit words: step 4, digest 8, pending step+1 2, pending generation+1 2, roster fingerprint 4
STATE_SLOTS = 20


class _AllReduce(Protocol):
    def allreduce(
        self, buf: np.ndarray, step: int = 0, weight: float = 1.0, wire_dtype: str | None = None
    ) -> Any: ...


def _words(value: int, count: int) -> list[int]:
    return [(value >> (16 * i)) & 0xFFFF for i in range(count)]


def _unwords(words: Sequence[int]) -> int:
    return sum(int(w) << (16 * i) for i, w in enumerate(words))


def encode_state_vector(size: int, rank: int, state: MemberState) -> np.ndarray:
    """A float32 vector, zero except this member's slots; summing all members' vectors gathers them.

    Every slot holds a 16-bit integer, exactly representable in float32, so a
    float32 all-reduce (mean times size, rounded) recovers the values exactly.
    """
    digest = bytes.fromhex(state.digest)
    if len(digest) != 16:
        raise ValueError("digest must be 16 bytes (32 hex characters)")
    pstep, pgen = (state.pending[0] + 1, state.pending[1] + 1) if state.pending is not None else (0, 0)
    words = _words(state.step, 4) + [int.from_bytes(digest[i : i + 2], "big") for i in range(0, 16, 2)]
    words += _words(pstep, 2) + _words(pgen, 2) + _words(state.roster, 4)
    vec = np.zeros(size * STATE_SLOTS, np.float32)
    vec[rank * STATE_SLOTS : (rank + 1) * STATE_SLOTS] = words
    return vec


def decode_state_vector(roster: Roster, summed: np.ndarray) -> list[MemberState]:
    """The members' states from the element-wise sum of their vectors."""
    ints = np.rint(summed).astype(np.int64).reshape(roster.size, STATE_SLOTS)
    out = []
    for member, row in zip(roster.members, ints, strict=True):
        digest = b"".join(int(w).to_bytes(2, "big") for w in row[4:12]).hex()
        pstep, pgen = _unwords(row[12:14]), _unwords(row[14:16])
        pending = (pstep - 1, pgen - 1) if pstep else None
        out.append(MemberState(member, _unwords(row[0:4]), digest, pending, _unwords(row[16:20])))
    return out


def gather_states(ring: _AllReduce, roster: Roster, mine: MemberState) -> list[MemberState]:
    """Every member's state, on every member, through one all-reduce on the freshly formed ring."""
    vec = encode_state_vector(roster.size, roster.rank_of(mine.member), mine)
    mean = np.asarray(ring.allreduce(vec, step=-1, weight=1.0, wire_dtype="float32"), np.float64)
    return decode_state_vector(roster, mean * roster.size)
