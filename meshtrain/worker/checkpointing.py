"""A worker's checkpoint duties: the protocol participant wired to this node's store.

The mesh calls these, from the training thread except `on_message`:

- `on_message(msg)`: a protocol message from the leader (the agent wrote ``{"ckpt": msg}`` to our
  stdin; the mesh's stdin thread hands it over). It is only queued (deque appends are atomic).
- `at_boundary(step, state, meta)`: after every step. It first tells the participant the step is
  done (a Prepare already waiting for this step writes now), then applies the queued messages (a
  Prepare naming this very step also writes now; one naming a step we passed is answered "too
  late", and the leader aims further ahead next time). `state()` is called only when a part is
  written, so a boundary with nothing due costs a deque check.
- `resume()`: the newest complete checkpoint in this node's store (the agent fetched the mesh's
  newest here before starting us), as (state tree, meta, step).
- `close()`: the job is over. A write in flight is finished and acknowledged, then the leader's
  verdict (Commit or Abort) is awaited a few seconds so the job's last checkpoint can complete.

Writes are asynchronous. At the boundary a Prepare named, the training thread only freezes the
state (snapshot.py: new array objects sharing the arrays' memory, the RNG key, a copy of the meta;
no copy of the arrays and no wait on the disk) and returns to training; a `BackgroundWriter`
thread writes the part (background_writer.py: safetensors, state.json, part.json, fsync; no MLX
call) and acknowledges to the leader as soon as it is durable, even while the training thread is
inside a long step or a local-SGD interval. The protocol is unchanged: the leader commits only a
checkpoint whose every part was acknowledged. A write that fails (a full disk: MLX would raise
RuntimeError, our writer OSError ENOSPC) fails that round only, as before.

At most one write is in flight, so memory holds at most one extra copy of the state (the frozen
one, as training replaces the live arrays). A second WritePart while one is writing can only follow
an aborted round (a leader runs one round at a time and needs our ack before its next Prepare), and
the abort cancelled that write, which stops within one 8 MiB block. The new one then waits for it
at its own boundary, queued, rather than being refused "too late": the wait is that short, while a
refusal would fail a healthy round and make the leader double its lead for the rest of the job.

Threads: `_lock` guards the participant, the store's parts and `_in_flight`; the training thread
holds it while applying messages, the writer thread while turning its outcome into acks. Reports
may come from either thread (the worker's Reporter is thread-safe). A Discard for the part being
written cancels the write instead of deleting under it; the writer removes its own files.

What a part holds besides params and optimizer state: ``state.json`` keeps ``meta`` as given (epoch,
cursor, carry, generation, members, metrics), MLX's RNG key at the boundary (``rng``), and the term.
`resume` returns that meta with ``"rng"`` added (a list of ints for `arrays.restore_rng`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from meshtrain import env as env_names
from meshtrain.checkpoints.options import CheckpointOptions
from meshtrain.checkpoints.store import CheckpointStore
from meshtrain.errors import UserError
from meshtrain.leader.checkpoint import (
    Abort,
    CheckpointParticipant,
    CommitPart,
    Discard,
    Message,
    ParticipantAction,
    Send,
    WritePart,
    message_from_wire,
    to_wire,
)
from meshtrain.worker.background_writer import BackgroundWriter, WriteCancelled, write_part
from meshtrain.worker.snapshot import Snapshot, freeze

__all__ = ["ENV_CHECKPOINTS", "WorkerCheckpoints"]

ENV_CHECKPOINTS = env_names.CHECKPOINTS
"""The agent tells its workers where its checkpoint store is (each node of a --local mesh has its own)."""

PROGRESS_PERIOD_S = 0.5
LOW_SPACE_BYTES = 4 * 1024 * 1024  # a write that failed with less free than this failed for want of space
CLOSE_VERDICT_S = 5.0  # at job end, how long an acknowledged part waits for its Commit (or Abort)
JOB_ENDED = "the job ended before that step"
Report = Callable[[dict[str, Any]], None]
State = Callable[[], dict[str, Any]]


class WorkerCheckpoints:
    def __init__(
        self,
        options: CheckpointOptions,
        *,
        node: str,
        member: str,
        report: Report,
        store: CheckpointStore,
        joiner: bool = False,
    ) -> None:
        self.options = options
        self.joiner = joiner
        self.node = node
        self.member = member
        self.report = report
        self.store = store
        self.run = options.run
        self.participant = CheckpointParticipant(node, options.run)
        self.inbox: deque[dict[str, Any]] = deque()
        self.written: list[int] = []
        self.committed: list[int] = []
        self.failures: list[str] = []
        self.pauses: list[float] = []  # seconds each part held the training thread (freeze + hand-off)
        self._progress_sent = -PROGRESS_PERIOD_S
        self._lock = threading.RLock()
        self._writer = BackgroundWriter(f"meshtrain-checkpoint-{member}")
        self._in_flight: tuple[int, int] | None = None  # (term, step) of the part being written
        self.sharded: Any = None  # a ShardedOptimizer (meshtrain.shard.saving.attach): parts are shards
        self.resumed_opt: Any = None  # its resume source, for meshtrain.shard.saving.restore
        self.resumed_params: Any = None  # stage 3: the owned layers' source, for the same
        self.resumed_step: int | None = None

    @classmethod
    def create(
        cls, options: dict[str, Any], *, node: str, member: str, report: Report
    ) -> WorkerCheckpoints | None:
        """None when the job has no checkpointing (options lack "checkpoint_every" and "resume")."""
        parsed = CheckpointOptions.from_dict(options)
        if parsed is None:
            return None
        root = os.environ.get(ENV_CHECKPOINTS)
        store = CheckpointStore(Path(root)) if root else CheckpointStore()
        joiner = bool(options.get("joiner"))
        return cls(parsed, node=node, member=member, report=report, store=store, joiner=joiner)

    # ------------------------------------------------------------ the stdin thread

    def on_message(self, msg: dict[str, Any]) -> None:
        """Queue a protocol message from the leader; `at_boundary` handles it (deque appends are atomic)."""
        if isinstance(msg, dict):
            self.inbox.append(msg)

    # ------------------------------------------------------------ the training thread

    def at_boundary(self, step: int, state: State, meta: dict[str, Any]) -> None:
        """After `step` steps: start writing this member's part if a Prepare names this step."""
        self._maybe_report_progress(step, meta)
        with self._lock:
            if not self.inbox and not self.participant.parts:
                self.participant.step = step  # nothing owed, nothing asked: the common, cheap case
                return
            due = self._execute(self.participant.step_done(step))
            due += self._apply_inbox()
        for a in due:
            self._start_write(a, state, meta)

    def pending_steps(self) -> set[int]:
        """The steps this member is to write a part at and has not reached: Prepares read, and those
        still queued (local SGD's overlap= asks: meshtrain.worker.local_rounds runs the sync before
        such a step in the foreground, so that the step starts an interval, where parts are written)."""
        with self._lock:
            steps = {s for s, part in self.participant.parts.items() if part.state == "pending"}
            queued = list(self.inbox)
        for raw in queued:
            if raw.get("type") == "prepare" and raw.get("run") == self.options.run:
                if self.participant.node in (raw.get("writers") or ()):
                    steps.add(int(raw.get("step", -1)))
        return steps

    def resume(self) -> tuple[dict[str, Any], dict[str, Any], int] | None:
        """(state tree {"params", "opt"}, meta with "rng", step) of the newest complete checkpoint here.

        Only with ``--resume``: a run started without it starts fresh even if its name has checkpoints
        (explicit beats surprising), and a worker joining a running job gets the state from its peers.
        """
        if not self.options.resume or self.joiner or self.store.latest(self.run) is None:
            return None
        from meshtrain.shard.saving import resume_part

        sharded = resume_part(self)  # a sharded checkpoint, or a sharded job (meshtrain/shard/saving.py)
        if sharded is not None:
            return sharded
        checkpoint = self.store.load(self.run)
        saved = checkpoint.state
        meta = dict(saved.get("meta") or {})
        meta.setdefault("cursor", saved.get("cursor"))
        meta.setdefault("generation", saved.get("generation", 0))
        meta.setdefault("metrics", saved.get("metrics") or {})
        if saved.get("rng"):
            meta["rng"] = [int(x) for x in saved["rng"]]
        # flat {path: array}: the worker assigns them leaf by leaf into its own trees (an unflattened
        # tree would lack a parameter-free submodule's empty dict, which the optimizer still needs)
        tree = {"params": dict(checkpoint.params), "opt": dict(checkpoint.optimizer)}
        self.participant.step = checkpoint.step
        return tree, meta, checkpoint.step

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no part is being written (tests, benches); True when none is."""
        return self._writer.wait(timeout)

    @property
    def writing(self) -> int | None:
        """The step whose part is being written in the background, if any."""
        in_flight = self._in_flight
        return in_flight[1] if in_flight is not None else None

    def close(self, verdict_s: float = CLOSE_VERDICT_S) -> None:
        """The job is over: finish the write in flight (it acknowledges itself), then give the leader
        up to `verdict_s` seconds to commit or abort the parts we acknowledged, applying its answer,
        so the job's last checkpoint can complete. Nothing is left half-written either way."""
        self._writer.wait()
        deadline = time.monotonic() + verdict_s
        while True:
            with self._lock:
                self._apply_inbox()
                for step, part in list(self.participant.parts.items()):
                    if part.state != "written":  # owed, never to be written: the leader aborts at once
                        self._execute(self.participant.part_failed(part.term, step, JOB_ENDED))
                awaiting = any(p.state == "written" for p in self.participant.parts.values())
            if not awaiting or time.monotonic() >= deadline:
                return
            time.sleep(0.02)

    def _maybe_report_progress(self, step: int, meta: Mapping[str, Any]) -> None:
        """Twice a second, one member (the lowest id) tells the leader how far the job is: the exact
        committed step and who takes part, straight from the training loop (via our agent)."""
        if self.options.policy is None:
            return
        now = time.monotonic()
        if now - self._progress_sent < PROGRESS_PERIOD_S:
            return
        members = [str(m) for m in meta.get("members") or []] or [self.member]
        if min(members) != self.member:
            return
        self._progress_sent = now
        sharded = {"sharded": True} if self.sharded is not None else {}  # every member writes a part
        self.report({"k": "ckpt", "progress": step, "members": members, **sharded})

    # ------------------------------------------------------------ carrying out the participant's actions

    def _apply_inbox(self) -> list[WritePart]:
        """Hand the queued messages to the participant (lock held); the parts now due to be written."""
        due: list[WritePart] = []
        while self.inbox:
            raw = self.inbox.popleft()
            try:
                message = message_from_wire(dict(raw))
            except (TypeError, ValueError):
                continue  # a malformed line is the sender's bug, not a reason to stop training
            due += self._execute(self.participant.on_message(message))
            self._sweep_if_new_leader(message)
        return due

    def _execute(self, actions: list[ParticipantAction]) -> list[WritePart]:
        """Carry out `actions` (lock held) but the writes, which are returned: they need the training
        thread's state and may wait for the writer, which must not happen under the lock."""
        due: list[WritePart] = []
        for a in actions:
            if isinstance(a, Send):
                for to in a.to:
                    self.report({"k": "ckpt", "to": to, "msg": to_wire(a.message)})
            elif isinstance(a, WritePart):
                due.append(a)
            elif isinstance(a, CommitPart):
                self._commit(a)
            elif isinstance(a, Discard):
                if self._in_flight is not None and self._in_flight[1] == a.step:
                    self._writer.cancel()  # not under its feet: the writer removes its files as it stops
                else:
                    self.store.discard(self.run, a.step)
        return due

    def _start_write(self, a: WritePart, state: State, meta: Mapping[str, Any]) -> None:
        """Freeze the state as of this boundary and have the writer thread write and ack it."""
        start = time.perf_counter()
        self._writer.wait()  # at most one in flight: an older, aborted (so cancelled) write ends first
        with self._lock:
            part = self.participant.parts.get(a.step)
            if part is None or part.term != a.term or part.state != "writing":
                return  # aborted before it began (a newer term's Prepare for the same step, say)
            try:
                if self.sharded is not None:  # this member's shard (meshtrain/shard/saving.py)
                    from meshtrain.shard.saving import part_record, part_state

                    snapshot = freeze(part_state(self.sharded, self.member, state()), meta, a.step)
                    snapshot.meta["shard"] = part_record(self.sharded, self.member, snapshot)
                else:
                    snapshot = freeze(state(), meta, a.step)
            except (RuntimeError, ValueError, KeyError, TypeError, UserError) as exc:
                self._execute(self._part_failed(a, self._write_failed(a.step, exc)))
                return
            self._in_flight = (a.term, a.step)
            held = [snapshot]  # the writer takes it out, so its memory goes back as soon as it is written
            del snapshot
            self._writer.start(lambda cancel: self._write_in_background(a, held, cancel))
        self.pauses.append(time.perf_counter() - start)

    def _write_in_background(self, a: WritePart, held: list[Snapshot], cancel: threading.Event) -> None:
        """The writer thread: write the part, then (lock held) turn the outcome into the ack."""
        snapshot = held.pop()
        record: dict[str, Any] | None = None
        error: BaseException | None = None
        try:
            record = write_part(
                self.store,
                self.run,
                snapshot,
                extra={"term": a.term, "meta": snapshot.meta, "member": self.member, **_shard_of(snapshot)},
                cancel=cancel,
            )
        except WriteCancelled:
            pass
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, it fails this round only
            error = exc
        del snapshot  # the frozen arrays' memory goes back now, before the ack
        with self._lock:
            self._in_flight = None
            if record is not None:
                self.written.append(a.step)
                actions = self.participant.part_written(a.term, a.step, int(record["bytes"]))
            elif error is not None:
                actions = self._part_failed(a, self._write_failed(a.step, error))
            else:  # cancelled: its round was aborted and the participant dropped the part already
                actions = [Discard(self.run, a.step)]
            self._execute(actions)

    def _part_failed(self, a: WritePart, reason: str) -> list[ParticipantAction]:
        part = self.participant.parts.get(a.step)
        if part is None or part.term != a.term:  # aborted meanwhile: no round of ours to fail
            return [Discard(self.run, a.step)]
        return self.participant.part_failed(a.term, a.step, reason)

    def _write_failed(self, step: int, exc: BaseException) -> str:
        """Remove the partial part, count the failure, say it in one line on stderr; the reason.

        A full disk fails this round only: MLX reports a failed write as RuntimeError ("[write]
        Unable to write N bytes to file."), our writer as OSError ENOSPC; older checkpoints stay."""
        directory = self.store.step_dir(self.run, step)
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full:  # before the partial files are removed: they filled the disk
            with contextlib.suppress(OSError):
                full = shutil.disk_usage(self.store.root).free < LOW_SPACE_BYTES
        with contextlib.suppress(OSError, UserError):
            self.store.discard(self.run, step)  # its files, temporary ones included; never a committed one
        if full:
            reason = f"no space left on the device of {directory}"
        else:
            reason = f"{exc.__class__.__name__}: {exc}".strip()
        self.failures.append(reason)
        print(
            f"meshtrain: checkpoint {self.run}@{step} not written ({reason}); training goes on, "
            "earlier checkpoints are kept",
            file=sys.stderr,
            flush=True,
        )
        return reason

    def _commit(self, a: CommitPart) -> None:
        try:
            self.store.commit(self.run, a.step, a.manifest)
        except UserError as exc:
            self.failures.append(str(exc))
            return
        self.committed.append(a.step)
        self.store.prune(self.run, self.options.keep)

    def _sweep_if_new_leader(self, message: Message) -> None:
        """A new leader's Abort: also remove parts an earlier process of ours left (it crashed)."""
        if (
            isinstance(message, Abort)
            and message.step is None
            and message.term >= self.participant.highest_term
        ):
            keep = [*self.participant.parts, *([self._in_flight[1]] if self._in_flight else [])]
            self.store.clean(self.run, keep_steps=keep, incoming=False)


def _shard_of(snapshot: Snapshot) -> dict[str, Any]:
    """A sharded part's record for state.json (meshtrain.shard.checkpoint), taken out of the meta."""
    record = snapshot.meta.pop("shard", None)
    return {"shard": record} if record is not None else {}
