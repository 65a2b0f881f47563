"""Live helpers: show a stream of snapshots, redrawn in place on a terminal, as log lines elsewhere.

    with LiveJob() as view:            # or LiveMesh()
        view.update(snapshot)          # from any thread, as often as you like
    # the last frame stays on screen (a TTY) or the final line was written (a log)

or, from asyncio, let the helper poll:

    last = await LiveJob().follow(fetch_job_snapshot, interval=0.25, done=job_finished)

On a terminal the screen is redrawn at most `refresh_per_second` times by
rich's Live, always at the terminal's height minus one line, so the frame
never scrolls or jumps. When stdout is not a terminal (a pipe, a log file, CI)
nothing is redrawn: `MeshLog`/`JobLog` decide which lines to append.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import threading
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, TextIO

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live

from meshtrain.status import FINISHED_JOB_STATES, integer, number, text
from meshtrain.ui.job_view import JobView
from meshtrain.ui.mesh_view import MeshView
from meshtrain.ui.plain import JobLog, MeshLog, final_line, render_job_text, render_mesh_text
from meshtrain.ui.terminal import quiet_input

Snapshot = Mapping[str, Any]
Fetch = Callable[[], "Snapshot | None | Awaitable[Snapshot | None]"]
LOSS_HISTORY = 64


def is_interactive(console: Console) -> bool:
    """True when redrawing in place makes sense: a real terminal that is not `TERM=dumb`."""
    return console.is_terminal and not console.is_dumb_terminal


SCREEN_RESERVE = 3  # lines left for a banner printed just before the view and the cursor line


class _FitToScreen:
    """Builds the view at render time with the terminal's current height, so a resize just works.

    The frame stays SCREEN_RESERVE lines short of the screen: a frame whose top
    has scrolled off cannot be redrawn in place (the cursor cannot go above the
    screen), which would leave a stale copy of its first line behind."""

    def __init__(self, build: Callable[[int | None], RenderableType]) -> None:
        self.build = build

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.build(max(console.size.height - SCREEN_RESERVE, 12))


class _LiveView:
    """Common part of LiveMesh and LiveJob: snapshot in, Live frame or log lines out."""

    def __init__(
        self,
        *,
        console: Console | None = None,
        refresh_per_second: float = 4.0,
        plain: bool | None = None,
        file: TextIO | None = None,
    ) -> None:
        self.console = console or Console(file=file)
        self.plain = not is_interactive(self.console) if plain is None else plain
        self.refresh_per_second = refresh_per_second
        self.snapshot: Snapshot | None = None
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._quiet: contextlib.ExitStack | None = None

    # what subclasses provide
    def _view(self, snapshot: Snapshot | None, height: int | None) -> RenderableType:
        raise NotImplementedError

    def _log_lines(self, snapshot: Snapshot) -> list[str]:
        raise NotImplementedError

    def _remember(self, snapshot: Snapshot) -> None:
        """Hook for state kept across snapshots (the loss history)."""

    def __enter__(self) -> _LiveView:
        if not self.plain:
            self._quiet = contextlib.ExitStack()
            self._quiet.enter_context(quiet_input())
            self._live = Live(
                _FitToScreen(self._render),
                console=self.console,
                refresh_per_second=self.refresh_per_second,
                transient=False,
                redirect_stdout=True,
                redirect_stderr=True,
            )
            self._live.start(refresh=self.snapshot is not None)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop redrawing; the last frame stays on the terminal, compacted (no padding lines) so
        that it all stays on screen when the shell prompt comes back."""
        if self._live is not None:
            live, self._live = self._live, None
            with self._lock:
                snapshot = self.snapshot
            live.update(self._view(snapshot, None), refresh=True)
            live.stop()
            if snapshot is not None:
                self._after(snapshot)
        if self._quiet is not None:
            self._quiet.close()
            self._quiet = None

    def _after(self, snapshot: Snapshot) -> None:
        """Hook: what to print under the final frame."""

    def _render(self, height: int | None) -> RenderableType:
        with self._lock:
            snapshot = self.snapshot
        return self._view(snapshot, height)

    def update(self, snapshot: Snapshot | None) -> None:
        """Show this snapshot (copied, so the caller may keep mutating its dict). Thread-safe."""
        if not isinstance(snapshot, Mapping):
            return
        snapshot = copy.deepcopy(dict(snapshot))
        with self._lock:
            self.snapshot = snapshot
            self._remember(snapshot)
        if self.plain:
            for line in self._log_lines(snapshot):
                self.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
        # on a terminal, Live's own thread redraws the latest snapshot refresh_per_second times a second

    def print_once(self, snapshot: Snapshot | None) -> None:
        """One frame (terminal) or the plain rendering (pipe), no live redraw: `status` without --watch."""
        if self.plain:
            self.console.print(
                self._plain_text(snapshot), markup=False, highlight=False, emoji=False, soft_wrap=True
            )
        else:
            self.console.print(self._view(snapshot, None))

    def _plain_text(self, snapshot: Snapshot | None) -> str:
        raise NotImplementedError

    async def follow(
        self,
        fetch: Fetch,
        *,
        interval: float = 0.25,
        done: Callable[[Snapshot], bool] | None = None,
    ) -> Snapshot | None:
        """Poll `fetch` (sync or async) every `interval` s and show each snapshot until `done(snapshot)`.

        Returns the last snapshot. Cancel the task (Ctrl-C) to stop earlier; the view is closed either way.
        """
        last: Snapshot | None = None
        with self:
            while True:
                result = fetch()
                snapshot = await result if inspect.isawaitable(result) else result
                if isinstance(snapshot, Mapping):
                    last = snapshot
                    self.update(snapshot)
                    if done is not None and done(snapshot):
                        return last
                await asyncio.sleep(interval)


class LiveMesh(_LiveView):
    """The mesh view for `meshtrain join` and `meshtrain status --watch`."""

    def __init__(self, *, note: str | None = None, **kwargs: Any) -> None:
        """`note`: a line kept visible in the frame (e.g. the command that lets another machine
        join), where a line printed before the live view would scroll away; printed once in a log."""
        super().__init__(**kwargs)
        self.note = note
        self._log = MeshLog()
        if note and self.plain:
            self.console.print(note, markup=False, highlight=False, emoji=False, soft_wrap=True)

    def __enter__(self) -> LiveMesh:
        super().__enter__()
        return self

    def _view(self, snapshot: Snapshot | None, height: int | None) -> RenderableType:
        return MeshView(snapshot, height=height, note=self.note)

    def _log_lines(self, snapshot: Snapshot) -> list[str]:
        return self._log.feed(snapshot)

    def _plain_text(self, snapshot: Snapshot | None) -> str:
        return render_mesh_text(snapshot)


class LiveJob(_LiveView):
    """The training view for `meshtrain run`; keeps a loss history for the sparkline."""

    def __init__(self, *, include_log: bool = True, **kwargs: Any) -> None:
        """`include_log=False` when the caller already prints the workers' output lines itself."""
        super().__init__(**kwargs)
        self._log = JobLog(include_log=include_log)
        self.loss_history: list[float] = []
        self._last_point: tuple[int, int] | None = None

    def __enter__(self) -> LiveJob:
        super().__enter__()
        return self

    def _remember(self, snapshot: Snapshot) -> None:
        loss = number(snapshot, "loss")
        point = (integer(snapshot, "epoch"), integer(snapshot, "step"))
        if loss is not None and point != self._last_point:
            self._last_point = point
            self.loss_history = (self.loss_history + [loss])[-LOSS_HISTORY:]

    def _view(self, snapshot: Snapshot | None, height: int | None) -> RenderableType:
        return JobView(snapshot, loss_history=self.loss_history, height=height)

    def _after(self, snapshot: Snapshot) -> None:
        """Under the final frame of a finished job, its one-line result (it stays in scrollback)."""
        if text(snapshot, "state") == "done":
            self.console.print(final_line(snapshot), markup=False, highlight=False, emoji=False)

    def _log_lines(self, snapshot: Snapshot) -> list[str]:
        return self._log.feed(snapshot)

    def _plain_text(self, snapshot: Snapshot | None) -> str:
        return render_job_text(snapshot)


def job_finished(snapshot: Snapshot) -> bool:
    """A `done` predicate for `LiveJob.follow`."""
    return text(snapshot, "state") in FINISHED_JOB_STATES
