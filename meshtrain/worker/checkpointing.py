"""A worker's checkpoint duties: the protocol participant wired to this node's store.

The mesh calls three things, always from the training thread except `on_message`:

- `on_message(msg)`: a protocol message from the leader (the agent wrote ``{"ckpt": msg}`` to our
  stdin; the mesh's stdin thread hands it over). It is only queued: the training thread owns the
  state machine, the store and MLX's arrays, so nothing here needs a lock beyond the deque.
- `at_boundary(step, state, meta)`: after every step. It first tells the participant the step is
  done (a Prepare already waiting for this step writes now), then applies the queued messages (a
  Prepare naming this very step also writes now; one naming a step we passed is answered "too
  late", and the leader aims further ahead next time). `state()` is called only when a part is
  written, so a boundary with nothing due costs a deque check.
- `resume()`: the newest complete checkpoint in this node's store (the agent fetched the mesh's
  newest here before starting us), as (state tree, meta, step).

Acks go to the leader through `report({"k": "ckpt", "to": leader_node, "msg": wire})`; the agent
forwards them. Progress too: twice a second the member with the lowest id reports
``{"k": "ckpt", "progress": step, "members": [...]}``, which the agent hands to the leader.
Writing is synchronous on the training thread: the snapshot is then exactly the state after
`step`, at the cost of pausing training for the write (see bench/checkpoint.py).

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

__all__ = ["ENV_CHECKPOINTS", "WorkerCheckpoints"]

ENV_CHECKPOINTS = env_names.CHECKPOINTS
"""The agent tells its workers where its checkpoint store is (each node of a --local mesh has its own)."""

PROGRESS_PERIOD_S = 0.5
LOW_SPACE_BYTES = 4 * 1024 * 1024  # a write that failed with less free than this failed for want of space
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
        self._progress_sent = -PROGRESS_PERIOD_S

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
        """After `step` steps: write this member's part if a Prepare names this step."""
        self._maybe_report_progress(step, meta)
        if not self.inbox and not self.participant.parts:
            self.participant.step = step  # nothing owed, nothing asked: the common, cheap case
            return
        self._execute(self.participant.step_done(step), state, meta)
        while self.inbox:
            raw = self.inbox.popleft()
            try:
                message = message_from_wire(dict(raw))
            except (TypeError, ValueError):
                continue  # a malformed line is the sender's bug, not a reason to stop training
            self._execute(self.participant.on_message(message), state, meta)
            self._sweep_if_new_leader(message)

    def resume(self) -> tuple[dict[str, Any], dict[str, Any], int] | None:
        """(state tree {"params", "opt"}, meta with "rng", step) of the newest complete checkpoint here.

        Only with ``--resume``: a run started without it starts fresh even if its name has checkpoints
        (explicit beats surprising), and a worker joining a running job gets the state from its peers.
        """
        if not self.options.resume or self.joiner or self.store.latest(self.run) is None:
            return None
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
        self.report({"k": "ckpt", "progress": step, "members": members})

    # ------------------------------------------------------------ carrying out the participant's actions

    def _execute(self, actions: list[ParticipantAction], state: State, meta: Mapping[str, Any]) -> None:
        for a in actions:
            if isinstance(a, Send):
                for to in a.to:
                    self.report({"k": "ckpt", "to": to, "msg": to_wire(a.message)})
            elif isinstance(a, WritePart):
                self._execute(self._write(a, state, meta), state, meta)
            elif isinstance(a, CommitPart):
                self._commit(a)
            elif isinstance(a, Discard):
                self.store.discard(self.run, a.step)

    def _write(self, a: WritePart, state: State, meta: Mapping[str, Any]) -> list[ParticipantAction]:
        try:
            tree = state()
            record = self.store.write_part(
                self.run,
                a.step,
                tree["params"],
                tree.get("opt"),
                cursor=meta.get("cursor"),
                generation=int(meta.get("generation") or 0),
                metrics=dict(meta.get("metrics") or {}),
                extra={"term": a.term, "meta": dict(meta), "member": self.member},
            )
        except (OSError, RuntimeError, ValueError, KeyError, TypeError, UserError) as exc:
            # a full disk fails this round only: MLX reports a failed write as RuntimeError ("[write]
            # Unable to write N bytes to file."), not OSError; older checkpoints stay as they are
            reason = self._write_failed(a.step, exc)
            return self.participant.part_failed(a.term, a.step, reason)
        self.written.append(a.step)
        return self.participant.part_written(a.term, a.step, int(record["bytes"]))

    def _write_failed(self, step: int, exc: BaseException) -> str:
        """Remove the partial part, count the failure, say it in one line on stderr; the reason."""
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
            self.store.clean(self.run, keep_steps=list(self.participant.parts), incoming=False)
