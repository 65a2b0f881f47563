"""A hosted worker that has hung: its process stopped while its agent lives.

A worker whose process is stopped (SIGSTOP, SIGTSTP, a debugger's stop)
makes no progress, yet its agent goes on answering gossip, so the mesh still
counts the node alive, and the worker's ring sockets stay open: the other
workers would wait in their all-reduce, and re-form the same view, forever.
Its own agent is the one that can tell: it sees the process state. Once the
worker has been stopped for longer than a bound -- a few times its recent
step time (the interval between its metric reports), at least `FLOOR_S` --
the agent kills it, and the job treats it like any lost worker: the others
go on without it from the interrupted step, and the node comes back as a
joiner (a new worker that receives the training state). A worker busy for a
long time in user code (an evaluation, a slow step) runs and is never removed.

`HangWatch` is pure (the clock is passed in); `is_stopped` asks the OS;
`floor_s` reads the floor ($MESHTRAIN_HANG_FLOOR_S, for tests; default FLOOR_S).
"""

from __future__ import annotations

import os

FLOOR_S = 15.0  # never less than this: a short stop (a debugger, a suspended laptop lid) is forgiven
STEPS = 4.0  # ... nor less than this many recent step times
CHECK_S = 1.0  # how often the agent looks at its worker's process state


def floor_s() -> float:
    """The floor this agent uses: $MESHTRAIN_HANG_FLOOR_S when it is a positive number, else FLOOR_S."""
    from meshtrain.env import HANG_FLOOR

    try:
        value = float(os.environ.get(HANG_FLOOR, ""))
    except ValueError:
        return FLOOR_S
    return value if value > 0 else FLOOR_S


def is_stopped(pid: int) -> bool:
    """True while the process is stopped by a signal or a tracer (False if it is gone or unknown)."""
    try:
        import psutil

        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    except Exception:  # noqa: BLE001 - gone, or not ours to inspect: not a hang we can act on
        return False


class HangWatch:
    """Decides when a stopped worker has hung: stopped for longer than `limit` without a break."""

    def __init__(self, floor: float = FLOOR_S, steps: float = STEPS) -> None:
        self.floor = floor
        self.steps = steps
        self.step_s: float | None = None  # a moving average of the interval between metric reports
        self._last_report: float | None = None
        self._stopped_since: float | None = None

    def reported(self, now: float) -> None:
        """The worker sent metrics (about once a step, at most every flush interval)."""
        if self._last_report is not None:
            interval = max(0.0, now - self._last_report)
            self.step_s = interval if self.step_s is None else 0.8 * self.step_s + 0.2 * interval
        self._last_report = now

    @property
    def limit(self) -> float:
        return max(self.floor, self.steps * (self.step_s or 0.0))

    def observe(self, now: float, stopped: bool) -> float | None:
        """Seconds the worker has been stopped once that exceeds `limit` (it has hung), else None."""
        if not stopped:
            self._stopped_since = None
            return None
        if self._stopped_since is None:
            self._stopped_since = now
        held = now - self._stopped_since
        return held if held > self.limit else None
