"""A worker's checkpoint duties for one run: the participant state machine wired to the store.

The worker calls `step_done(step, params=..., optimizer=..., ...)` at every step
boundary (cheap unless a checkpoint is due at that step) and hands it every
checkpoint message the leader sends (`on_message`), also at step boundaries,
from the training thread; acks go out through the `send` callable it was given.
MLX arrays are immutable, so the references passed at the boundary *are* the
snapshot: the next step makes new arrays (the session keeps the last ones, for
a Prepare that names the step just finished).
`resume` and `restore` put the newest complete checkpoint back into a model
and optimizer, RNG included, so training continues bit-for-bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from meshtrain.checkpoints.store import Checkpoint, CheckpointStore, restore_rng
from meshtrain.errors import UserError
from meshtrain.leader.checkpoint import (
    Abort,
    CheckpointParticipant,
    CommitPart,
    Discard,
    ParticipantAction,
    Send,
    WritePart,
    message_from_wire,
    to_wire,
)

__all__ = ["CheckpointSession", "restore"]

Sender = Callable[[str, dict[str, Any]], None]
"""send(to_node, wire_message): deliver a protocol message (a plain dict) to the leader's agent."""


class CheckpointSession:
    def __init__(
        self,
        node: str,
        run: str,
        send: Sender,
        store: CheckpointStore | None = None,
        *,
        step: int = 0,
        keep: int | None = None,
    ) -> None:
        """`keep`: after each commit, prune this node's copies of the run to the `keep` newest."""
        self.store = store or CheckpointStore()
        self.keep = keep
        self.participant = CheckpointParticipant(node, run, step=step)
        self.send = send
        self.run = run
        self.written: list[int] = []
        self.committed: list[int] = []
        self._state: dict[str, Any] = {}  # the last boundary's results, for a Prepare naming that very step

    def on_message(self, data: Mapping[str, Any]) -> None:
        message = message_from_wire(dict(data))
        self._execute(self.participant.on_message(message))
        newest = message.term >= self.participant.highest_term
        if isinstance(message, Abort) and message.step is None and newest:
            # a new leader: also sweep parts an earlier process of ours left behind (it crashed, we restarted)
            self.store.clean(self.run, keep_steps=list(self.participant.parts), incoming=False)

    def leader_changed(self, term: int) -> None:
        self._execute(self.participant.leader_changed(term))

    def step_done(
        self,
        step: int,
        *,
        params: Any,
        optimizer: Any = None,
        cursor: Any = None,
        hyperparameters: Mapping[str, Any] | None = None,
        generation: int = 0,
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        """Step `step` is complete and these are its results; write a part if the leader asked for one."""
        self._state = {
            "params": params,
            "optimizer": optimizer,
            "cursor": cursor,
            "hyperparameters": hyperparameters,
            "generation": generation,
            "metrics": metrics,
        }
        self._execute(self.participant.step_done(step))

    def resume(self, step: int | None = None) -> Checkpoint | None:
        """The newest complete local checkpoint of this run (or `step`), or None to start fresh."""
        if step is None and self.store.latest(self.run) is None:
            return None
        checkpoint = self.store.load(self.run, step)
        self.participant.step = checkpoint.step
        return checkpoint

    def _execute(self, actions: list[ParticipantAction]) -> None:
        for a in actions:
            if isinstance(a, Send):
                for to in a.to:
                    self.send(to, to_wire(a.message))
            elif isinstance(a, WritePart):
                self._write(a)
            elif isinstance(a, CommitPart):
                self.store.commit(self.run, a.step, a.manifest)
                self.committed.append(a.step)
                if self.keep is not None:
                    self.store.prune(self.run, self.keep)
            elif isinstance(a, Discard):
                self.store.discard(self.run, a.step)

    def _write(self, a: WritePart) -> None:
        s = self._state
        try:
            record = self.store.write_part(
                self.run,
                a.step,
                s["params"],
                s["optimizer"],
                cursor=s["cursor"],
                hyperparameters=s["hyperparameters"],
                generation=s["generation"],
                metrics=s["metrics"],
                extra={"term": a.term},
            )
        except (OSError, ValueError, KeyError, UserError) as exc:  # a full disk fails the round, not training
            self._execute(self.participant.part_failed(a.term, a.step, f"{exc.__class__.__name__}: {exc}"))
            return
        self.written.append(a.step)
        self._execute(self.participant.part_written(a.term, a.step, int(record["bytes"])))


def restore(checkpoint: Checkpoint, model: Any, optimizer: Any = None) -> int:
    """Load a checkpoint into an `mlx.nn.Module` and optimizer, restore MLX's RNG; returns its step."""
    model.update(checkpoint.params_tree())
    if optimizer is not None and checkpoint.optimizer:
        optimizer.state = checkpoint.optimizer_tree()
    if checkpoint.state.get("rng"):
        restore_rng(checkpoint.state["rng"])
    return checkpoint.step
