"""Which of a job's notices were given and to which targets each got through: what a successor needs. Pure.

Once per event by the mesh, also when the sender is lost: the coordinator
keeps a `Ledger` per job and the job's record carries it (``record["notices"]``,
published with the record to every node of the job, see
meshtrain.agent.mesh_jobs). It holds the targets (so a successor tells the
same ones), the keys of every notice given so far and the watcher's own state
(meshtrain.notify.events.JobWatcher.saved), and, in full, each notice not yet
through to every target, with the targets it did reach. A successor restores
its watcher from it, so an event already told is not told again, and sends
the notices still pending to the targets still owed. A delivery given up
after its retries counts as done: a dead webhook is not retried by every
successor in turn.

What this cannot rule out: a notice delivered in the instant between its
delivery and the next record reaching another node (a coordinator SIGKILLed
then) is sent again by the successor; receivers can deduplicate on the
notice's ``id``, the same whoever sends it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshtrain.notify.events import END_KEY, Notice

VERSION = 1
MAX_PENDING = 200  # notices kept in full in the record (a dead target, a flapping node); then the oldest go


@dataclass
class Pending:
    notice: Notice
    done: set[str] = field(default_factory=set)  # target texts it reached (or gave up on)


@dataclass
class Ledger:
    targets: tuple[str, ...]  # meshtrain.notify.targets' text form
    known: set[str] = field(default_factory=set)  # every key given so far (the watcher's)
    watch: dict[str, Any] = field(default_factory=dict)  # JobWatcher.saved()
    pending: dict[str, Pending] = field(default_factory=dict)  # key -> not yet through everywhere

    def given(self, notice: Notice) -> None:
        """`notice` is queued for every target."""
        self.known.add(notice.key)
        self.pending[notice.key] = Pending(notice)
        while len(self.pending) > MAX_PENDING:
            del self.pending[next(iter(self.pending))]

    def delivered(self, key: str, target: str) -> bool:
        """One target is done with notice `key`; True when that was its last target."""
        entry = self.pending.get(key)
        if entry is None:
            return False
        entry.done.add(target)
        if all(t in entry.done for t in self.targets):
            del self.pending[key]
            return True
        return False

    def owed(self) -> list[tuple[Notice, list[str]]]:
        """The notices not yet through, each with the targets it still owes, oldest first."""
        return [(p.notice, [t for t in self.targets if t not in p.done]) for p in self.pending.values()]

    @property
    def ended(self) -> bool:
        """The job's final notice went to every target."""
        return END_KEY in self.known and END_KEY not in self.pending

    def to_record(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "targets": list(self.targets),
            "known": sorted(self.known),
            "watch": dict(self.watch),
            "pending": [
                {"notice": p.notice.to_dict(), "done": sorted(p.done)} for p in self.pending.values()
            ],
        }

    @classmethod
    def from_record(cls, raw: Any, targets: Iterable[str] = ()) -> Ledger:
        """The record's ledger (an empty one with `targets` for anything unreadable or missing)."""
        readable = isinstance(raw, Mapping) and raw.get("v") == VERSION
        if not readable or not isinstance(raw.get("targets"), list):
            return cls(tuple(targets))
        ledger = cls(tuple(str(t) for t in raw["targets"]))
        ledger.known = {str(k) for k in raw.get("known") or ()}
        ledger.watch = dict(raw["watch"]) if isinstance(raw.get("watch"), Mapping) else {}
        for item in raw.get("pending") or ():
            if isinstance(item, Mapping) and isinstance(item.get("notice"), Mapping):
                notice = Notice.from_dict(item["notice"])
                if notice.key:
                    ledger.known.add(notice.key)
                    ledger.pending[notice.key] = Pending(notice, {str(t) for t in item.get("done") or ()})
        return ledger
