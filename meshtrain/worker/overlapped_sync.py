"""An outer sync that runs on a thread while the next local steps compute (`overlap=` of local SGD).

Why a thread: the ring is synchronous (meshtrain.ring.ring: the caller's
thread receives and reduces, a sender thread writes), and MLX releases the
GIL while it evaluates, so the delta's reduction can move bytes while the
training thread computes the next steps. On a link where a sync takes as
long as a few steps of compute (100 Mbit/s, a large model), those seconds
were the whole difference between local SGD and the ceiling.

Why this is safe with elastic training: the background sync never
recovers. Its reduction either returns the full weighted mean on this
member, or raises (a lost member, a newer view that closed the ring); in the
second case the interval is *merged* into the one after it -- its steps go
back into the open interval, the anchor stays, and the next sync (run in
the foreground, where the recovery rules of meshtrain.worker.local_rounds
apply) carries the delta of both intervals. Members on which the reduction
completed are then a sync ahead, and the recovery plan makes the members
that merged receive their state (meshtrain.train.outer_recovery: "a member
still inside an older sync"), so every sample is still trained once.

Nothing else touches the ring while a sync is in flight: checkpoints, share
re-plans, recoveries and evaluations first settle it (join the thread).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshtrain.train.stepper import LocalStep

__all__ = ["InFlight"]


@dataclass
class InFlight:
    """One outer sync started on a thread: the interval it commits and, once joined, its outcome."""

    steps: list[LocalStep]  # the interval's steps (their ledger rows are written when it completes)
    start: int  # the interval's first step: the reductions' step label
    generation: int  # the generation whose shares sliced the interval
    result: Any = None  # (mean, header sums) once the reduction returned
    error: BaseException | None = None
    _thread: threading.Thread | None = field(default=None, repr=False)

    def run(self, reduce: Callable[[], Any]) -> None:
        """Start `reduce` on a daemon thread (a worker that exits mid-sync is not held up by it)."""

        def body() -> None:
            try:
                self.result = reduce()
            except BaseException as exc:  # re-raised or handled in the training thread (settle)
                self.error = exc

        self._thread = threading.Thread(target=body, name="meshtrain-outer-sync", daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
