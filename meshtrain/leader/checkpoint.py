"""Two-phase checkpoints, as pure state machines: the leader's coordinator and each worker's participant.

Round of term T for step S (messages are the dataclasses below, sent by the shells)::

    leader  --Prepare(T, S, writers)-->  writers        when the policy says a checkpoint is due
    writer: when step S is done, snapshot and write its part (temp names, fsync) -> WritePart
    writer  --Written(T, S)-->  leader                   or Failed(T, S, reason)
    leader: all writers acked  --Commit(T, S, manifest)-->  writers, each writes manifest.json
    anything else (timeout, a writer lost, a Failed, leadership lost): Abort(T, S) -> Discard part

Why it cannot leave a torn checkpoint: a checkpoint counts only once a manifest
exists (store.py), and a manifest is written only after the leader saw every
writer's part durable on disk. A new leader (term T+1) starts by broadcasting
Abort(T+1, None): every participant discards the uncommitted parts of older
terms, and ignores any later message of an older term. Writers are several
whole copies (data-parallel replicas hold identical state), so each writer's
disk is one replica; extra replicas are pushed to idle nodes after the commit.

Time comes in as ``now`` (monotonic seconds) and, for the manifest, ``wall``
(epoch seconds); nothing here reads a clock, touches a file or a socket.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from meshtrain.errors import UserError

__all__ = [
    "Abort",
    "Aborted",
    "CheckpointCoordinator",
    "CheckpointParticipant",
    "CheckpointPolicy",
    "Commit",
    "CommitPart",
    "Committed",
    "Discard",
    "Failed",
    "Prepare",
    "Replicate",
    "Send",
    "WritePart",
    "Written",
    "message_from_wire",
]


# ------------------------------------------------------------------ policy


@dataclass(frozen=True)
class CheckpointPolicy:
    """`--checkpoint-every STEPS|SECONDS`: ``500`` means every 500 steps, ``90s``/``5m``/``1h`` a period."""

    every_steps: int | None = None
    every_seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> CheckpointPolicy:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text or "")
        if not match or float(match.group(1)) <= 0:
            raise UserError(
                f"bad --checkpoint-every {text!r}: a number of steps (500) or a period (90s, 5m, 1h)"
            )
        value, unit = float(match.group(1)), match.group(2)
        if not unit:
            if not value.is_integer():
                raise UserError(f"bad --checkpoint-every {text!r}: a whole number of steps")
            return cls(every_steps=int(value))
        return cls(every_seconds=value * {"s": 1, "m": 60, "h": 3600}[unit])

    def due(self, step: int, now: float, last_step: int, last_time: float) -> bool:
        if self.every_steps is not None and step - last_step >= self.every_steps:
            return True
        return self.every_seconds is not None and now - last_time >= self.every_seconds


# ------------------------------------------------------------------ messages (msgpack-able via to_wire)


@dataclass(frozen=True)
class Prepare:
    """Snapshot once step `step` is done, write your part, then ack to `leader`."""

    run: str
    term: int
    leader: str
    step: int
    writers: tuple[str, ...]


@dataclass(frozen=True)
class Written:
    run: str
    term: int
    step: int
    node: str
    bytes: int = 0


@dataclass(frozen=True)
class Failed:
    run: str
    term: int
    step: int
    node: str
    reason: str


@dataclass(frozen=True)
class Commit:
    run: str
    term: int
    step: int
    manifest: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Abort:
    """Abandon checkpoint `step` of `term`; with step None, everything uncommitted of older terms."""

    run: str
    term: int
    step: int | None
    reason: str


Message = Prepare | Written | Failed | Commit | Abort
TOO_LATE = "already past that step"
"""Failed reason of a worker the Prepare reached after it had run past the named step."""
MAX_LEAD_STEPS = 1024
_MESSAGES: dict[str, type[Any]] = {c.__name__.lower(): c for c in (Prepare, Written, Failed, Commit, Abort)}


def to_wire(message: Message) -> dict[str, Any]:
    """A plain dict (``type`` plus fields) for a control frame."""
    body = asdict(message)
    if isinstance(message, Prepare):
        body["writers"] = list(message.writers)
    return {"type": type(message).__name__.lower(), **body}


def message_from_wire(data: dict[str, Any]) -> Message:
    cls = _MESSAGES.get(str(data.get("type")))
    if cls is None:
        raise ValueError(f"unknown checkpoint message {data.get('type')!r}")
    fields = {k: v for k, v in data.items() if k != "type"}
    if cls is Prepare:
        fields["writers"] = tuple(fields.get("writers", ()))
    message: Message = cls(**fields)
    return message


# ------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Send:
    """Deliver `message` to each node in `to` (the shell routes it, to itself included)."""

    to: tuple[str, ...]
    message: Message


@dataclass(frozen=True)
class Committed:
    """The leader committed: a complete checkpoint now exists (log it; prune by --keep)."""

    run: str
    step: int
    manifest: dict[str, Any]


@dataclass(frozen=True)
class Aborted:
    run: str
    step: int
    reason: str


@dataclass(frozen=True)
class Replicate:
    """Push the complete checkpoint from `source` to `target` (transfer.replicate_checkpoint)."""

    run: str
    step: int
    source: str
    target: str


@dataclass(frozen=True)
class WritePart:
    """Worker: step `step` is done; snapshot now and write the part (store.write_part)."""

    run: str
    term: int
    step: int


@dataclass(frozen=True)
class CommitPart:
    """Worker: write the manifest (store.commit)."""

    run: str
    step: int
    manifest: dict[str, Any]


@dataclass(frozen=True)
class Discard:
    """Worker: remove the uncommitted part (store.discard); harmless if there is none."""

    run: str
    step: int


CoordinatorAction = Send | Committed | Aborted | Replicate
ParticipantAction = Send | WritePart | CommitPart | Discard


# ------------------------------------------------------------------ the leader's side


@dataclass
class _Round:
    step: int
    writers: tuple[str, ...]
    deadline: float
    acked: dict[str, int] = field(default_factory=dict)


class CheckpointCoordinator:
    """Run by the leader of term `term` for one run. Feed it the job's progress and the
    protocol messages addressed to the leader; carry out the actions it returns."""

    def __init__(
        self,
        run: str,
        term: int,
        leader: str,
        policy: CheckpointPolicy,
        *,
        now: float,
        replicas: int = 2,
        ack_timeout: float = 120.0,
        lead_steps: int = 1,
        last_step: int = 0,
    ) -> None:
        self.run = run
        self.term = term
        self.leader = leader
        self.policy = policy
        self.replicas = replicas
        self.ack_timeout = ack_timeout
        self.lead_steps = lead_steps
        self.horizon_steps = 0
        self.last_step = last_step
        self.last_time = now
        self.round: _Round | None = None
        self.committed: list[int] = []
        self.all_writers = False  # a sharded job: every participant writes its shard (meshtrain.shard)

    def start(self, nodes: Iterable[str]) -> list[CoordinatorAction]:
        """A new leader's first act: every node drops what older terms left uncommitted."""
        return [Send(tuple(sorted(set(nodes))), Abort(self.run, self.term, None, "new leader"))]

    def progress(self, now: float, step: int, participants: Iterable[str]) -> list[CoordinatorAction]:
        """The job finished step `step` with these workers; maybe start a checkpoint a little ahead
        (workers run on while the Prepare travels, so it names step + lead_steps, or with a step
        policy the due multiple when that is later: `every 20` then means steps 20, 40, ...).
        `horizon_steps` (set by the shell: how far the job gets between two progress reports) lets
        the Prepare go out one report early, so the multiple is not already passed at the next one."""
        target = step + self.lead_steps
        if self.round is not None or not self.policy.due(
            target + self.horizon_steps, now, self.last_step, self.last_time
        ):
            return []
        nodes = sorted(set(participants))
        if not nodes:
            return []
        writers = tuple(nodes) if self.all_writers else tuple(nodes[: self.replicas + 1])
        if self.policy.every_steps is not None:  # the Prepare is ahead anyway: aim at the exact multiple
            target = max(target, self.last_step + self.policy.every_steps)
        self.round = _Round(target, writers, now + self.ack_timeout)
        return [Send(writers, Prepare(self.run, self.term, self.leader, target, writers))]

    def on_message(
        self, now: float, message: Message, *, mesh: Iterable[str] = (), wall: float = 0.0
    ) -> list[CoordinatorAction]:
        r = self.round
        if getattr(message, "run", None) != self.run or getattr(message, "term", None) != self.term:
            return []
        if r is None or getattr(message, "step", None) != r.step:
            if isinstance(message, Written) and message.step not in self.committed:
                # a part for a round we already aborted (its Abort was overtaken): drop it too
                return [Send((message.node,), Abort(self.run, self.term, message.step, "no such round"))]
            return []
        if isinstance(message, Failed):
            if message.reason == TOO_LATE:  # our Prepares travel slower than the steps run: aim further
                self.lead_steps = min(2 * self.lead_steps, MAX_LEAD_STEPS)
            return self._abort(f"{message.node}: {message.reason}")
        if isinstance(message, Written) and message.node in r.writers:
            r.acked[message.node] = message.bytes
            if len(r.acked) == len(r.writers):
                return self._commit(now, mesh, wall)
        return []

    def member_lost(self, now: float, node: str) -> list[CoordinatorAction]:
        if self.round is not None and node in self.round.writers:
            return self._abort(f"writer {node} lost")
        return []

    def poll(self, now: float) -> list[CoordinatorAction]:
        if self.round is not None and now >= self.round.deadline:
            return self._abort("timed out waiting for acks")
        return []

    def next_deadline(self) -> float:
        return self.round.deadline if self.round is not None else float("inf")

    def stop(self, reason: str) -> list[CoordinatorAction]:
        """Leadership lost: forget the round (the next leader's Abort cleans the workers up)."""
        if self.round is None:
            return []
        step, self.round = self.round.step, None
        return [Aborted(self.run, step, reason)]

    def _abort(self, reason: str) -> list[CoordinatorAction]:
        assert self.round is not None
        r, self.round = self.round, None
        return [
            Send(r.writers, Abort(self.run, self.term, r.step, reason)),
            Aborted(self.run, r.step, reason),
        ]

    def _commit(self, now: float, mesh: Iterable[str], wall: float) -> list[CoordinatorAction]:
        assert self.round is not None
        r, self.round = self.round, None
        extra = [n for n in sorted(set(mesh)) if n not in r.writers][
            : max(0, self.replicas + 1 - len(r.writers))
        ]
        if self.all_writers:  # a part is one shard: the writers pull each other's instead (node.py)
            extra = []
        manifest = {
            "term": self.term,
            "leader": self.leader,
            "time": wall,
            "writers": list(r.writers),
            "replicas": [*r.writers, *extra],
            **({"sharded": True} if self.all_writers else {}),
        }
        self.last_step, self.last_time = r.step, now
        self.committed.append(r.step)
        actions: list[CoordinatorAction] = [
            Send(r.writers, Commit(self.run, self.term, r.step, manifest)),
            Committed(self.run, r.step, manifest),
        ]
        actions += [Replicate(self.run, r.step, r.writers[0], target) for target in extra]
        return actions


# ------------------------------------------------------------------ each worker's side


@dataclass
class _Part:
    term: int
    step: int
    leader: str
    state: str  # "pending" (step not reached), "writing", "written"


class CheckpointParticipant:
    """One worker's side of the protocol for one run: knows which parts it owes and to whom."""

    def __init__(self, node: str, run: str, *, step: int = 0) -> None:
        self.node = node
        self.run = run
        self.step = step
        self.highest_term = 0
        self.parts: dict[int, _Part] = {}
        self.aborted: set[tuple[int, int]] = set()

    def on_message(self, message: Message) -> list[ParticipantAction]:
        if getattr(message, "run", None) != self.run:
            return []
        if message.term < self.highest_term:
            return []  # a dead leader's late message
        actions = self._advance_term(message.term)
        if isinstance(message, Prepare):
            actions += self._on_prepare(message)
        elif isinstance(message, Commit):
            part = self.parts.pop(message.step, None)
            if part is not None and part.term == message.term and part.state == "written":
                actions.append(CommitPart(self.run, message.step, dict(message.manifest)))
        elif isinstance(message, Abort):
            if message.step is None:  # a new leader: everything of older terms (its own are newer)
                doomed = [s for s, p in self.parts.items() if p.term < message.term]
            else:
                doomed = [s for s, p in self.parts.items() if s == message.step and p.term == message.term]
                self.aborted.add((message.term, message.step))  # in case its Prepare is still on the way
            for s in doomed:
                del self.parts[s]
                actions.append(Discard(self.run, s))
        return actions

    def leader_changed(self, term: int) -> list[ParticipantAction]:
        """The election settled on a new term: whatever older terms had in flight is dead."""
        return self._advance_term(term)

    def step_done(self, step: int) -> list[ParticipantAction]:
        """The training loop finished `step`. Returns WritePart for a prepared checkpoint at it."""
        self.step = step
        self.aborted = {(t, s) for t, s in self.aborted if s >= step}  # older Prepares fail anyway
        actions: list[ParticipantAction] = []
        for s, part in list(self.parts.items()):
            if part.state != "pending":
                continue
            if s == step:
                part.state = "writing"
                actions.append(WritePart(self.run, part.term, s))
            elif s < step:  # we ran past it (the Prepare came late): this round cannot complete
                del self.parts[s]
                actions.append(Send((part.leader,), Failed(self.run, part.term, s, self.node, TOO_LATE)))
        return actions

    def part_written(self, term: int, step: int, nbytes: int = 0) -> list[ParticipantAction]:
        part = self.parts.get(step)
        if part is None or part.term != term or part.state != "writing":
            return [Discard(self.run, step)]  # aborted while we were writing
        part.state = "written"
        return [Send((part.leader,), Written(self.run, term, step, self.node, nbytes))]

    def part_failed(self, term: int, step: int, reason: str) -> list[ParticipantAction]:
        part = self.parts.pop(step, None)
        actions: list[ParticipantAction] = [Discard(self.run, step)]
        if part is not None and part.term == term:
            actions.append(Send((part.leader,), Failed(self.run, term, step, self.node, reason)))
        return actions

    def _on_prepare(self, p: Prepare) -> list[ParticipantAction]:
        if self.node not in p.writers or (p.term, p.step) in self.aborted:
            return []
        # A leader runs one round at a time: its Prepare for another step ends any older round of it.
        actions: list[ParticipantAction] = []
        for s in [s for s, part in self.parts.items() if part.term == p.term and s != p.step]:
            del self.parts[s]
            actions.append(Discard(self.run, s))
        if p.step < self.step:
            return [
                *actions,
                Send((p.leader,), Failed(self.run, p.term, p.step, self.node, TOO_LATE)),
            ]
        self.parts[p.step] = _Part(p.term, p.step, p.leader, "pending")
        if p.step == self.step:
            actions += self.step_done(self.step)
        return actions

    def _advance_term(self, term: int) -> list[ParticipantAction]:
        if term <= self.highest_term:
            return []
        self.highest_term = term
        self.aborted = {(t, s) for t, s in self.aborted if t >= term}
        doomed = [s for s, p in self.parts.items() if p.term < term]
        for s in doomed:
            del self.parts[s]
        return [Discard(self.run, s) for s in doomed]
