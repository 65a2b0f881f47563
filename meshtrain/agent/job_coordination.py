"""Who coordinates a job, and whether it may change the job's membership: rules every member evaluates alike.

A job belongs to the mesh. Its record (spec, participants, the last view,
progress) is replicated on every node that runs it, and coordination of its
membership views (start, lost worker, joiner, pause, end) follows one rule
that every node evaluates on its own copy of the record and its own
gossip view, with no election and no messages:

- **succession**: before the job has started, its origin (the node it was
  submitted to, which places it) coordinates. From then on the coordinator
  is the live participant with the *lowest rank* among the workers not lost:
  ranks are handed out once, in placement order, joiners last, and never
  reused, so a joiner never takes coordination from a node that had it, and
  when the coordinator is lost (gossip declares its node dead) every member
  names the same successor within the gossip detection time.
- **quorum**: a new view may be issued only by a coordinator that can reach
  a strict majority of the *formed* view's workers (the newest view a ring
  was formed for: every member of it connected, so it is the one view all
  of them share), not counting workers known to have ended (their own agent
  reported the exit); exactly half is enough only for the side holding the
  lowest-ranked of them. Counting against the newest *issued* view instead
  lets the minority side of a partition shrink step by step: an isolated
  submitter whose gossip declares its three peers dead one at a time would
  issue 3 of 4, then 2 of 3, then (a tie it holds the lowest rank of) 1 of
  2, and train alone -- views its peers never saw. A view that never forms
  moves nothing: the base stays the last formed view, so the two sides of a
  partition evaluate the rule over the same view, and at most one side can
  form a new ring and commit steps; the other waits, paused, until the
  partition heals and the record that made progress wins.
- **order of records**: `record_key` orders two copies of a record (final
  first, then the newer formed view, then the newer issued view, then the
  coordinator's term, then its sequence), so a node coming back from a
  partition adopts the copy that made progress rather than its own stale
  one, however many views it issued alone.

`Succession` adds the clock: a node that has just taken over waits until it
heard from every live participant (or `settle` seconds passed) before it
issues a view, so it numbers its first view above any view its lost
predecessor may have sent. Pure: no asyncio, no sockets; `now` is injected.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

STARTED_STATES = ("running", "paused", "done", "failed", "cancelled")
FINAL_STATES = ("done", "failed", "cancelled")
SETTLE_S = 1.5


@dataclass(frozen=True)
class Seat:
    """One worker of the job as the rules see it: its node, its rank, whether it was lost."""

    node: str
    rank: int
    member: str = ""
    lost: bool = False
    ended: bool = False  # its agent reported the worker's exit


def seats_of(record: Mapping[str, Any]) -> list[Seat]:
    """The seats in a replicated job record (see meshtrain.agent.jobs)."""
    seats = []
    for part in record.get("parts") or []:
        seats.append(
            Seat(
                node=str(part["name"]),
                rank=int(part["rank"]),
                member=str(part.get("member") or part["name"]),
                lost=bool(part.get("lost")),
                ended=part.get("exit_code") is not None,
            )
        )
    return seats


def coordinator_of(
    seats: Iterable[Seat], live: Collection[str], *, origin: str | None = None, started: bool = True
) -> str | None:
    """The node that coordinates: the origin until the job starts, then the lowest-ranked live seat."""
    if not started:
        return origin if origin is not None and origin in live else None
    best: Seat | None = None
    for seat in seats:
        if seat.lost or seat.node not in live:
            continue
        if best is None or seat.rank < best.rank:
            best = seat
    return best.node if best is not None else None


def record_coordinator(record: Mapping[str, Any], live: Collection[str]) -> str | None:
    """`coordinator_of` over a job record."""
    state = str((record.get("state") or {}).get("state") or "waiting")
    return coordinator_of(
        seats_of(record), live, origin=record.get("origin"), started=state in STARTED_STATES
    )


def has_quorum(previous: Sequence[str], reachable: Collection[str], ended: Collection[str] = ()) -> bool:
    """May a coordinator that reaches `reachable` replace the view `previous` (members in rank order)?

    Workers in `ended` (exited, their agent said so) do not vote. A strict
    majority of the rest must be reachable; exactly half suffices only when
    the lowest-ranked of them is among the reachable; with no voter left, no
    side may.
    """
    voters = [m for m in previous if m not in ended]
    if not voters:
        return False  # nobody left to vote: nothing to continue (the job ends), and no side may restart it
    have = sum(1 for m in voters if m in reachable)
    return 2 * have > len(voters) or (2 * have == len(voters) and voters[0] in reachable)


def record_key(record: Mapping[str, Any]) -> tuple[int, int, int, int, int]:
    """Which of two copies of a job record is newer (the larger key)."""
    final = 1 if record.get("result") else 0
    view = record.get("view") or {}
    formed = record.get("formed") or {}
    return (
        final,
        int(formed.get("version") or 0),
        int(view.get("version") or 0),
        int(record.get("term") or 0),
        int(record.get("seq") or 0),
    )


def superseded(incoming: Mapping[str, Any], local: Mapping[str, Any]) -> bool:
    """Does `local` (this node's copy) show that the coordinator that sent `incoming` was replaced?

    True when the local copy is final, has a later coordinator term, or, at
    the same term, comes from another coordinator and a newer formed view.
    Not the whole `record_key`: a live coordinator's own later publish (a
    newer sequence or view) may overtake a request it sent a moment before,
    and that request is still its own.
    """
    if local.get("result"):
        return True
    term_in, term_local = int(incoming.get("term") or 0), int(local.get("term") or 0)
    if term_in != term_local:
        return term_in < term_local
    if incoming.get("coordinator") == local.get("coordinator"):
        return False
    formed_in = int((incoming.get("formed") or {}).get("version") or 0)
    return formed_in < int((local.get("formed") or {}).get("version") or 0)


def base_members(formed: Mapping[str, Any] | None, issued: Mapping[str, Any] | None) -> list[str] | None:
    """The members (rank order) a new view's quorum counts: the formed view's, else the first issued."""
    view = formed if formed else issued
    if not view:
        return None
    return [str(m[0]) if isinstance(m, (list, tuple)) else str(m) for m in view.get("members") or []]


@dataclass
class Succession:
    """One node's side of the succession rule for one job, over time.

    Feed it `observe(coordinator, now)` with the rule's answer each time the
    record or the membership view changes; it says whether this node
    coordinates, when it took over, and (`may_issue`) whether a node that
    has just taken over has waited long enough to number a new view.
    """

    me: str
    settle: float = SETTLE_S
    coordinating: bool = False
    since: float = 0.0
    took_over: bool = False  # became coordinator from another node (not as the job's origin at start)
    heard: set[str] = field(default_factory=set)

    def observe(self, coordinator: str | None, now: float, *, first: bool = False) -> str | None:
        """'take' when this node becomes the coordinator, 'step down' when it stops, else None."""
        mine = coordinator == self.me
        if mine and not self.coordinating:
            self.coordinating, self.since, self.took_over = True, now, not first
            self.heard = set()
            return "take"
        if not mine and self.coordinating:
            self.coordinating = False
            return "step down"
        return None

    def hear(self, node: str) -> None:
        """A report came from `node`'s agent since this node took over."""
        if self.coordinating:
            self.heard.add(node)

    def may_issue(self, live_participants: Collection[str], now: float) -> bool:
        """A new coordinator numbers views only once it heard from every live participant, or settled."""
        if not self.coordinating:
            return False
        if not self.took_over:
            return True
        return set(live_participants) - {self.me} <= self.heard or now - self.since >= self.settle
