"""What the members of a local-SGD job do when they meet at an outer sync after a change (pure).

Local SGD's members do not meet at every step: between two outer syncs each
trains alone, so they are anywhere inside the interval when a worker is lost
or a node joins. The one point every member reaches, in the same order, is
the next sync; that is where they recover (meshtrain.worker.local_rounds):
the survivors form the new ring there, swap a `MemberStatus` (the same
vector as meshtrain.train.recovery's) and every member computes the same
`OuterPlan`:

- *holders*: members inside the sync of the newest interval (`committed` is
  the interval's first step, `digest` that of the shared outer state -- the
  anchor and the outer momentum -- which every member of the interval holds
  alike). They redo the sync among themselves: the weighted mean of their
  deltas, the outer step, and their slices of the interval's steps count.
  Members of the interval that are gone are its *orphans*: their slices of
  every step of the interval go back to the sampler and are trained again,
  so the loss of a node costs its unsynced local steps and no sample.
- *zero*: everyone else -- a joiner (no state), a member still inside an
  older sync (the others completed it: the ring broke after the result was
  out, so its delta is in that result), or one whose outer state differs --
  adds zeros with weight 0 to the holders' reductions and then receives the
  state the holders have after the outer step: a join enters at the next
  sync, never mid-interval.
- with nobody inside a sync (a ring formed at a step boundary, say the job's
  start) the members that lack state receive it now from the first member
  at the newest interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshtrain.train.recovery import MemberStatus, Unrecoverable

__all__ = ["OuterPlan", "plan_outer_sync"]


@dataclass(frozen=True)
class OuterPlan:
    target: int  # the first step of the interval whose sync is completed (its reductions' step label)
    holders: tuple[str, ...]  # reduce their deltas; their slices of the interval count
    zero: tuple[str, ...]  # reduce zeros with weight 0 (if a sync runs), then receive the state
    source: str | None  # the member that sends the state to `zero`
    wire: str  # the holders' delta wire ("" when no sync runs)
    slice_gen: int  # the generation whose shares sliced the interval (-1 when no sync runs)
    state_now: bool  # nobody is inside a sync: `zero` receive the state at once
    diverged: tuple[str, ...]  # inside the newest sync with an outer state unlike the majority's


def plan_outer_sync(statuses: Sequence[MemberStatus]) -> OuterPlan:
    """The plan every member of the new ring computes from the same statuses (rank order)."""
    with_state = [s for s in statuses if s.has_state]
    if not with_state:
        raise Unrecoverable("no member of the new generation holds a training state")
    pending = [s for s in with_state if s.pending]
    if not pending:
        target = max(s.committed for s in with_state)
        at_target = [s for s in with_state if s.committed == target]
        majority = _majority(at_target)
        zero = tuple(s.member for s in statuses if not s.has_state)
        source = next(s.member for s in at_target if s.digest == majority)
        return OuterPlan(target, (), zero, source if zero else None, "", -1, True, ())
    target = max(s.committed for s in pending)
    at_target = [s for s in pending if s.committed == target]
    majority = _majority(at_target)
    holders = [s for s in at_target if s.digest == majority]
    gens = {s.slice_gen for s in holders}
    if len(gens) != 1:
        raise Unrecoverable(f"the interval from step {target} was sliced in generations {sorted(gens)}")
    wires = {s.wire for s in holders}
    if len(wires) != 1:
        raise Unrecoverable(f"the sync from step {target} is sent as {sorted(wires)}: run the same script")
    names = {s.member for s in holders}
    return OuterPlan(
        target=target,
        holders=tuple(s.member for s in holders),
        zero=tuple(s.member for s in statuses if s.member not in names),
        source=holders[0].member,
        wire=holders[0].wire,
        slice_gen=gens.pop(),
        state_now=False,
        diverged=tuple(s.member for s in at_target if s.digest != majority),
    )


def _majority(states: Sequence[MemberStatus]) -> str:
    """The digest most of `states` hold (ties: the first in rank order)."""
    counts: dict[str, int] = {}
    for s in states:
        counts[s.digest] = counts.get(s.digest, 0) + 1
    best = max(counts.values())
    return next(s.digest for s in states if counts[s.digest] == best)
