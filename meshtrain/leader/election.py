"""Who coordinates checkpoints: a sticky, term-numbered leader computed from the membership view.

Pure: `Election.observe(members)` takes this node's current view (the gossip
`Member` snapshots, ourselves included) and returns what to do: `Claim(term)`
or `Resign()` (publish or clear ``leader_term`` in our gossip metadata),
`Follow(leader)` (publish ``follows``: the leader we follow) and
`LeaderChanged` (tell the checkpoint layer). No sockets, no clock.

The rule every node applies to the same view, so equal views give equal answers:

1. Eligible members are those alive *or suspect* (a suspected leader is kept
   until SWIM declares it dead or it refutes: suspicion alone must not flap
   the leader), that pass the `eligible` filter (agents only, by default
   those that publish a control port).
2. If any eligible member claims leadership (``leader_term`` in its meta), the
   leader is the claimant with the most *support* -- itself plus the eligible
   members whose ``follows`` names it -- then the lowest term (the older
   claim), then priority. An incumbent therefore stays leader while it lives,
   even when a better machine joins (the newcomer follows it before it could
   claim), and also when a partitioned node comes back: alone, that node
   claimed a higher term, but on heal it has one supporter against the
   incumbent's whole side, so it resigns. Moving the leader costs an aborted
   checkpoint and buys nothing, so we never do it on purpose.
3. With no claimant, the best eligible member by priority -- on AC power
   first, then most memory, then lowest id -- becomes leader: that node alone
   claims, with a term one above every term it has ever seen (in anyone's
   metadata, dead members' included), and publishes it.
4. A claimant that sees a winning claimant other than itself resigns; every
   node publishes the settled leader it follows.

Split views: each side of a partition elects its own leader (both are right
for the members they can reach). Once gossip converges every node sees the
same claims and the same ``follows``, rule 2 picks the same winner everywhere
-- the leader of the larger side; for equal sides the older claim, then
priority -- and the loser resigns on its own rule 4. Support only grows for
the winner as nodes switch to it, so the choice does not oscillate. Terms a
node claims only grow (above every term it saw, across restarts); a healed
loser's higher term is not used, so a leader keeps the term its workers know
and nothing of its checkpoint in flight is aborted.

Startup: a node claims only after `settle` (its join must land first); nodes
that started apart and claimed alone merge by rule 2, so the mesh converges
to one leader, which is the best by priority among the claimants that met.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshtrain.gossip.member import ALIVE, SUSPECT, Member

__all__ = [
    "LEADER_META_KEY",
    "Claim",
    "Election",
    "ElectionAction",
    "FOLLOW_META_KEY",
    "Follow",
    "LeaderChanged",
    "Leadership",
    "Resign",
    "claimed_term",
    "is_agent",
    "on_ac_power",
    "priority_key",
]

LEADER_META_KEY = "leader_term"
"""Gossip metadata key under which the leader publishes its term (absent or None: not leading)."""

FOLLOW_META_KEY = "follows"
"""Gossip metadata key under which every node publishes the id of the settled leader it follows:
the support a claim has when two of them meet (a healed partition, nodes that started apart)."""


@dataclass(frozen=True, slots=True)
class Leadership:
    """The leader as this node sees it. `settled`: the leader has published its term, so
    every node that sees the same view agrees on both leader and term."""

    leader: str | None
    term: int
    settled: bool


@dataclass(frozen=True, slots=True)
class Claim:
    """We lead now: publish ``{election.meta_key: term}`` in our gossip metadata."""

    term: int


@dataclass(frozen=True, slots=True)
class Resign:
    """We no longer lead: publish ``{election.meta_key: None}``."""

    term: int


@dataclass(frozen=True, slots=True)
class LeaderChanged:
    """The (leader, term) pair changed; the checkpoint layer aborts what the old term had in flight."""

    previous: Leadership
    current: Leadership


@dataclass(frozen=True, slots=True)
class Follow:
    """Publish ``{election.follow_key: leader}``: the settled leader we follow (None: none settled)."""

    leader: str | None


ElectionAction = Claim | Resign | Follow | LeaderChanged


def on_ac_power(meta: Mapping[str, Any]) -> bool:
    """No battery (a desktop) or a plugged-in one: a laptop on battery may sleep or be carried away."""
    battery = meta.get("battery")
    if not isinstance(battery, Mapping):
        return True
    return bool(battery.get("plugged"))


def _memory_gb(meta: Mapping[str, Any]) -> float:
    for key in ("memory_gb", "mem_gb"):
        value = meta.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


def priority_key(member: Member) -> tuple[int, float, str]:
    """Smaller is better: on AC power, then most memory, then lowest id (a total order)."""
    meta = member.meta or {}
    return (0 if on_ac_power(meta) else 1, -_memory_gb(meta), member.id)


def claimed_term(member: Member, key: str = LEADER_META_KEY) -> int | None:
    term = (member.meta or {}).get(key)
    if isinstance(term, int) and not isinstance(term, bool) and term > 0:
        return term
    return None


def followed(member: Member, key: str = FOLLOW_META_KEY) -> str | None:
    value = (member.meta or {}).get(key)
    return value if isinstance(value, str) and value else None


def is_agent(member: Member) -> bool:
    """Only agents (which publish a control port) can coordinate; a bare gossip node cannot."""
    return "control" in (member.meta or {})


def _any_member(member: Member) -> bool:
    return True


class Election:
    """One node's leader election; call `observe` whenever its membership view changes
    (and on a slow timer, so a view that stops changing still settles)."""

    def __init__(
        self,
        self_id: str,
        *,
        eligible: Callable[[Member], bool] | None = None,
        meta_key: str = LEADER_META_KEY,
        follow_key: str | None = None,
        term_floor: int = 0,
        started: float = 0.0,
        settle: float = 0.0,
    ) -> None:
        """`eligible` narrows the candidates (e.g. to one job's nodes for a per-job leader, which then
        publishes under its own `meta_key` so it never collides with the mesh-wide one; its `follow_key`
        defaults to ``<meta_key>_follows`` for the same reason).

        `term_floor`: the highest term this node saw before a restart (the shell persists it), so a
        restarted leader never claims a term lower than one the workers already know.
        `started`/`settle`: no claim before ``started + settle`` (pass ``now`` to `observe`). A node
        that has just started sees only itself until its join lands; claiming then would let a better
        newcomer tie the incumbent's term and win on priority, a flap. A beacon interval or two is enough.
        """
        self.self_id = self_id
        self.eligible = eligible or _any_member
        self.meta_key = meta_key
        if follow_key is None:
            follow_key = FOLLOW_META_KEY if meta_key == LEADER_META_KEY else f"{meta_key}_follows"
        self.follow_key = follow_key
        self.follows: str | None = None  # what we last published under follow_key
        self.claim: int | None = None
        self.highest_term = term_floor
        self.claim_from = started + settle
        self.current = Leadership(None, term_floor, False)

    @property
    def is_leader(self) -> bool:
        return self.claim is not None

    def observe(self, members: Iterable[Member], now: float = float("inf")) -> list[ElectionAction]:
        members = list(members)
        for m in members:
            term = claimed_term(m, self.meta_key)
            if term is not None and term > self.highest_term:
                self.highest_term = term
        me = next((m for m in members if m.id == self.self_id), None)
        live = [m for m in members if m.state in (ALIVE, SUSPECT) and self.eligible(m)]
        i_am_live = any(m.id == self.self_id for m in live)
        actions: list[ElectionAction] = []
        if self.claim is not None and not i_am_live:
            actions.append(Resign(self.claim))  # leaving, or no longer eligible
            self.claim = None

        claimants = [
            (term, m)
            for m in live
            if m.id != self.self_id and (term := claimed_term(m, self.meta_key)) is not None
        ]
        if self.claim is not None and me is not None:
            claimants.append((self.claim, me))
        if claimants:
            claiming = {m.id for _, m in claimants}
            term, winner = min(claimants, key=lambda c: self._rank(c[0], c[1], live, claiming))
            if self.claim is not None and winner.id != self.self_id:
                actions.append(Resign(self.claim))
                self.claim = None
            view = Leadership(winner.id, term, True)
        elif live:
            best = min(live, key=priority_key)
            if best.id == self.self_id and now >= self.claim_from:
                self.highest_term += 1
                self.claim = self.highest_term
                actions.append(Claim(self.claim))
                view = Leadership(self.self_id, self.claim, True)
            else:
                view = Leadership(best.id, self.highest_term, False)
        else:
            view = Leadership(None, self.highest_term, False)

        follows = view.leader if view.settled and i_am_live else None
        if follows != self.follows:
            self.follows = follows
            actions.append(Follow(follows))
        if view != self.current:
            previous, self.current = self.current, view
            actions.append(LeaderChanged(previous, view))
        return actions

    def _rank(
        self, term: int, claimant: Member, live: list[Member], claiming: set[str]
    ) -> tuple[int, int, tuple[int, float, str]]:
        """Smaller wins: most support (the claimant itself and the live non-claimants following it),
        then the older claim (lower term), then priority -- the same total order on every node."""
        support = 1 + sum(
            1 for m in live if m.id not in claiming and followed(m, self.follow_key) == claimant.id
        )
        return (-support, term, priority_key(claimant))
