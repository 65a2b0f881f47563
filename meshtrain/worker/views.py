"""The job's membership views as a worker receives them: one JSON line each on stdin.

The coordinating agent numbers every change of the job's workers (a worker
lost, a node joining) and sends each worker the new view; the view's number
is the ring generation its members form, so members that saw the same view
connect the same ring and a member with an older view is refused by the ring
handshake until its next line arrives. A thread reads the lines:

- `{"view": {"version", "members": [[id, host, ring_port], ...], "min_nodes"}}`
  replaces the view and, when the members changed, aborts the current ring
  so a worker blocked in an all-reduce with a dead peer wakes up at once;
- `{"ckpt": message}` goes to the checkpoint hook;
- end of input means the agent is gone: the worker ends too (no orphans).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

EXIT_ORPHANED = 4


@dataclass(frozen=True)
class View:
    version: int
    members: tuple[str, ...]  # rank order: the coordinator's (placement order, joiners last)
    addrs: tuple[tuple[str, int], ...]
    min_nodes: int = 1

    @staticmethod
    def parse(data: Any) -> View:
        rows = [(str(m), str(h), int(p)) for m, h, p in data["members"]]
        if len({r[0] for r in rows}) != len(rows):
            raise ValueError("a member appears twice in the view")
        return View(
            version=int(data["version"]),
            members=tuple(r[0] for r in rows),
            addrs=tuple((r[1], r[2]) for r in rows),
            min_nodes=max(1, int(data.get("min_nodes") or 1)),
        )

    def rank_of(self, member: str) -> int:
        return self.members.index(member)


class ViewBoard:
    """The newest view, waited on by the training thread; fed by a reader thread."""

    def __init__(self, stream: IO[str], *, on_orphaned: Callable[[], None] | None = None) -> None:
        self._stream = stream
        self._cond = threading.Condition()
        self._view: View | None = None
        self._abort: Callable[[View], None] | None = None
        self.on_message: Callable[[dict[str, Any]], None] | None = None  # checkpoint messages
        self._on_orphaned = on_orphaned or (lambda: os._exit(EXIT_ORPHANED))
        self._thread = threading.Thread(target=self._read, name="meshtrain-views", daemon=True)

    def start(self) -> ViewBoard:
        self._thread.start()
        return self

    def feed(self, line: str) -> None:
        """Apply one line (the reader thread's work; tests call it directly)."""
        try:
            data = json.loads(line)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        if isinstance(data.get("view"), dict):
            try:
                view = View.parse(data["view"])
            except (KeyError, TypeError, ValueError):
                return
            with self._cond:
                if self._view is not None and view.version <= self._view.version:
                    return
                self._view = view
                abort = self._abort
                self._cond.notify_all()
            if abort is not None:
                abort(view)
        elif isinstance(data.get("ckpt"), dict) and self.on_message is not None:
            self.on_message(data["ckpt"])

    def _read(self) -> None:
        for line in self._stream:
            self.feed(line)
        self._on_orphaned()

    def latest(self) -> View | None:
        with self._cond:
            return self._view

    def wait_newer(self, version: int, timeout: float) -> View | None:
        """The first view newer than `version`, or None after `timeout` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: self._view is not None and self._view.version > version, timeout)
            return self._view if self._view is not None and self._view.version > version else None

    def on_change(self, abort: Callable[[View], None] | None) -> None:
        """Call `abort(view)` from the reader thread whenever a newer view arrives."""
        with self._cond:
            self._abort = abort
