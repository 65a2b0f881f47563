"""The leader's asyncio shell around `CheckpointCoordinator`: clock, ack timer, replication, pruning.

The agent that leads creates one per running job when it becomes leader
(`LeaderChanged` with itself as the settled leader) and calls `close` when it
stops leading. It feeds job progress, protocol replies and member losses in;
the coordinator's `Send`s go out through `send(node, wire_dict)` (the agent's
control connection to that node's agent, which hands them to its worker),
`Replicate`s through `replicate(run, step, source, target)` and commits are
announced through `on_commit(run, step, manifest)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from meshtrain.leader.checkpoint import (
    Aborted,
    CheckpointCoordinator,
    CheckpointPolicy,
    Committed,
    CoordinatorAction,
    Replicate,
    Send,
    message_from_wire,
    to_wire,
)

__all__ = ["CheckpointLeader"]

Sender = Callable[[str, dict[str, Any]], Awaitable[None]]
Replicator = Callable[[str, int, str, str], Awaitable[None]]
CommitHook = Callable[[str, int, dict[str, Any]], Any]


class CheckpointLeader:
    def __init__(
        self,
        run: str,
        term: int,
        leader: str,
        policy: CheckpointPolicy,
        *,
        send: Sender,
        replicate: Replicator | None = None,
        on_commit: CommitHook | None = None,
        on_abort: Callable[[str, int, str], Any] | None = None,
        nodes: Iterable[str] = (),
        replicas: int = 2,
        ack_timeout: float = 120.0,
        last_step: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.send = send
        self.replicate = replicate
        self.on_commit = on_commit
        self.on_abort = on_abort
        self.mesh: list[str] = list(nodes)
        self.coordinator = CheckpointCoordinator(
            run,
            term,
            leader,
            policy,
            now=clock(),
            replicas=replicas,
            ack_timeout=ack_timeout,
            last_step=last_step,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._apply(self.coordinator.start(self.mesh))

    def progress(self, step: int, participants: Iterable[str]) -> None:
        self._apply(self.coordinator.progress(self.clock(), step, participants))

    def on_message(self, data: Mapping[str, Any]) -> None:
        message = message_from_wire(dict(data))
        self._apply(self.coordinator.on_message(self.clock(), message, mesh=self.mesh, wall=time.time()))

    def member_lost(self, node: str) -> None:
        self.mesh = [n for n in self.mesh if n != node]
        self._apply(self.coordinator.member_lost(self.clock(), node))

    def member_joined(self, node: str) -> None:
        if node not in self.mesh:
            self.mesh.append(node)

    async def close(self, reason: str = "leadership lost") -> None:
        self._apply(self.coordinator.stop(reason))
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _apply(self, actions: list[CoordinatorAction]) -> None:
        for a in actions:
            if isinstance(a, Send):
                wire = to_wire(a.message)
                for node in a.to:
                    self._spawn(self.send(node, wire))
            elif isinstance(a, Replicate) and self.replicate is not None:
                self._spawn(self.replicate(a.run, a.step, a.source, a.target))
            elif isinstance(a, Committed) and self.on_commit is not None:
                self.on_commit(a.run, a.step, a.manifest)
            elif isinstance(a, Aborted) and self.on_abort is not None:
                self.on_abort(a.run, a.step, a.reason)
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.coordinator.next_deadline()
        if deadline != float("inf"):
            loop = asyncio.get_running_loop()
            delay = max(0.0, deadline - self.clock())
            self._timer = loop.call_later(delay, lambda: self._apply(self.coordinator.poll(self.clock())))

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def guarded() -> None:
            with contextlib.suppress(Exception):  # an unreachable node shows up as a timeout or a loss
                await coro

        task = asyncio.ensure_future(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
