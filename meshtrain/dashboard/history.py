"""Finished jobs' history for the page: read from this node's run store (meshtrain.tracking).

The board only knows what it saw while it ran, and the agent forgets a
finished job's snapshot after a while; the run store (``runs.sqlite``,
written by the coordinator's recorder and copied to its peers) keeps every
job's record and every reported value. So the page lists the recorded runs,
and a job's charts start from the store's points: a dashboard started after
a job ended, or half-way through it, still draws the whole curve.

Read-only and in a thread (SQLite is blocking): a missing store is no runs,
never a file created. Points are folded like the board's: one per global
step, the mean over the workers that reported it, metrics by name, the step
axis made to grow when a script restarts its step count each epoch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from meshtrain.dashboard.board import NOT_METRICS

RUNS_LISTED = 50
POINTS_SENT = 4000  # a long run's history is thinned to about this many points (every k-th step)


def _store(path: Path) -> Any | None:
    if not path.is_file():
        return None
    from meshtrain.tracking.store import RunStore

    return RunStore(path)


def recorded_runs(path: Path, limit: int = RUNS_LISTED) -> list[dict[str, Any]]:
    """The newest `limit` runs of the store at `path`: what the page's history table shows."""
    store = _store(path)
    if store is None:
        return []
    try:
        runs = store.runs()[-limit:]
        out = []
        for run in reversed(runs):
            finals = {k: v for k, v in store.final_metrics(run.id).items() if k not in NOT_METRICS}
            out.append(
                {
                    "job": run.id,
                    "name": run.name,
                    "script": Path(run.script).name if run.script else "",
                    "state": run.state,
                    "reason": run.reason,
                    "started": run.started,
                    "ended": run.ended,
                    "duration_s": run.duration,
                    "coordinator": run.coordinator,
                    "nodes": [str(n) for n in run.mesh.get("nodes") or []],
                    "final": finals,
                    "checkpoints": [c for c in run.checkpoints if isinstance(c, dict)],
                }
            )
        return out
    finally:
        store.close()


def recorded_points(path: Path, run_id: str, limit: int = POINTS_SENT) -> dict[str, Any] | None:
    """{"run": the listing entry, "points": [{step, t, m}]} of one run, or None if not recorded."""
    store = _store(path)
    if store is None:
        return None
    try:
        run = store.get(run_id)
        if run is None:
            return None
        rows = sorted(store.metrics(run_id), key=lambda r: (r.t, r.seq))
    finally:
        store.close()
    points = fold_rows([(r.member, r.step, r.t, r.key, r.value) for r in rows])
    if len(points) > limit:
        stride = math.ceil(len(points) / limit)
        points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    entry = {"job": run.id, "name": run.name, "state": run.state, "started": run.started, "ended": run.ended}
    return {"run": entry, "points": points}


def fold_rows(rows: list[tuple[str, int | None, float, str, float]]) -> list[dict[str, Any]]:
    """(member, step, t, key, value) rows in time order -> one point per global step. Pure.

    A member whose step goes back (a script counting steps within each epoch) has the steps it
    had done added from then on, as the board does for a live job; a row without a step (an
    evaluation) lands on that member's last step."""
    offset: dict[str, int] = {}
    last: dict[str, int] = {}
    sums: dict[int, dict[str, list[float]]] = {}
    first_t: dict[int, float] = {}
    for member, step, t, key, value in rows:
        if key in NOT_METRICS or not math.isfinite(value):
            continue
        if step is None:
            if member not in last:
                continue
            x = last[member]
        else:
            x = step + offset.get(member, 0)
            if member in last and x < last[member]:
                offset[member] = last[member] + 1 - step
                x = last[member] + 1
            last[member] = x
        acc = sums.setdefault(x, {}).setdefault(key, [0.0, 0.0])
        acc[0] += value
        acc[1] += 1
        first_t[x] = min(first_t.get(x, t), t)
    return [
        {"step": x, "t": first_t[x], "m": {k: s / n for k, (s, n) in sums[x].items()}} for x in sorted(sums)
    ]
