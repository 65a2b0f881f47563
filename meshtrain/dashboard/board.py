"""What the page shows, folded from the agent's snapshots over time. Pure.

The agent's snapshots are the ones the terminal views read (the mesh
snapshot of `meshtrain status --json`, the job snapshot of the live job
view); they say how things are *now*. A page also wants how they got here,
so `Board` keeps, per job, a series of points (global step, time, every
reported metric), the ring generations it went through, and its workers'
output, and keeps finished jobs after the agent forgets them.

`view(cursor)` is what one page is sent: everything on first contact, then
only points and output lines newer than that page's cursor, so a live page
costs a few hundred bytes per update however long the job has run (the
checkpoint and recorded-run lists, too, are sent only when they change, and
so are the sweeps' live tables, on a version of their own: a running sweep
rewrites its table on every trial event, which need not resend the lists).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from meshtrain.status import FINISHED_JOB_STATES

POINTS_KEPT = 20000
LOG_KEPT = 500
JOBS_KEPT = 50  # finished jobs remembered (running ones are never dropped)
# reported values that are positions or bookkeeping, not metrics to chart
NOT_METRICS = frozenset(
    {"epoch", "epochs", "step", "steps_per_epoch", "samples", "generation", "share", "paused", "workers"}
)
SERIES = ("loss", "test_accuracy", "samples_per_s", "ring_mb_s")
DROPPED_FIELDS = ("loss_history", "log")  # kept here as series and output instead


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any) -> int:
    return int(value) if _finite(value) else 0


def global_step(snap: dict[str, Any]) -> int:
    """Steps done since the job began (the snapshot counts steps within the current epoch)."""
    epoch, step, per_epoch = (
        _int(snap.get("epoch")),
        _int(snap.get("step")),
        _int(snap.get("steps_per_epoch")),
    )
    if epoch >= 1 and per_epoch > 0 and step <= per_epoch:
        return (epoch - 1) * per_epoch + step
    return step


def metrics_of(snap: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in SERIES:
        if _finite(snap.get(key)):
            out[key] = float(snap[key])
    extra = snap.get("metrics")
    if isinstance(extra, dict):
        for key, value in extra.items():
            if isinstance(key, str) and key not in NOT_METRICS and key not in out and _finite(value):
                out[key] = float(value)
    return out


@dataclass
class JobRecord:
    job: str
    snap: dict[str, Any]
    first_seen: float
    last_seen: float
    detailed: bool = False  # a full job snapshot (this node coordinates it), not the mesh's summary
    stale: bool = False  # no longer reported by the agent before it was seen to finish
    points: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=POINTS_KEPT))
    point_seq: int = 0
    log: deque[tuple[int, str]] = field(default_factory=lambda: deque(maxlen=LOG_KEPT))
    log_seq: int = 0
    generations: list[dict[str, Any]] = field(default_factory=list)
    _epoch: int = 0
    _epoch_base: int = 0  # steps of the epochs before, when the script reports no steps_per_epoch

    def x_step(self, snap: dict[str, Any]) -> int:
        """A step axis that only grows: scripts that count steps per epoch without saying how many."""
        step = global_step(snap)
        epoch = _int(snap.get("epoch"))
        if _int(snap.get("steps_per_epoch")) <= 0:
            if epoch > self._epoch and self.points:
                self._epoch_base = int(self.points[-1]["step"])
            step += self._epoch_base
        self._epoch = max(self._epoch, epoch)
        return step

    @property
    def finished(self) -> bool:
        return self.snap.get("state") in FINISHED_JOB_STATES

    def fold(self, snap: dict[str, Any], now: float, detailed: bool) -> bool:
        """Take a newer snapshot; True when anything the page shows changed."""
        changed = snap != self.snap or self.stale
        self.snap, self.last_seen, self.stale = snap, now, False
        self.detailed = self.detailed or detailed
        step = self.x_step(snap)
        metrics = metrics_of(snap)
        if metrics and (not self.points or step > self.points[-1]["step"]):  # x only grows
            self.point_seq += 1
            t = snap.get("t") if _finite(snap.get("t")) else now
            self.points.append({"seq": self.point_seq, "step": step, "t": t, "m": metrics})
            changed = True
        generation = snap.get("generation")
        if _finite(generation) and (not self.generations or self.generations[-1]["generation"] != generation):
            self.generations.append({"t": now, "step": step, "generation": _int(generation)})
            changed = True
        lines = [str(x) for x in snap.get("log") or []] if isinstance(snap.get("log"), list) else []
        if lines:
            changed = self._merge_log(lines) or changed
        return changed

    def _merge_log(self, lines: list[str]) -> bool:
        """Append the lines of a snapshot's short tail that follow what is already kept."""
        kept = [line for _, line in self.log]
        overlap = 0
        for k in range(min(len(kept), len(lines)), 0, -1):
            if kept[-k:] == lines[:k]:
                overlap = k
                break
        new = lines[overlap:]
        for line in new:
            self.log_seq += 1
            self.log.append((self.log_seq, line))
        return bool(new)

    def view(self, cursor: tuple[int, int]) -> tuple[dict[str, Any], tuple[int, int]]:
        points_after, log_after = cursor
        snap = {k: v for k, v in self.snap.items() if k not in DROPPED_FIELDS}
        view = {
            "job": self.job,
            "snap": snap,
            "detailed": self.detailed,
            "stale": self.stale,
            "first_seen": self.first_seen,
            "generations": list(self.generations),
            "points": [p for p in self.points if p["seq"] > points_after],
            "log": [line for seq, line in self.log if seq > log_after],
            "reset": points_after == 0 and log_after == 0,
        }
        return view, (self.point_seq, self.log_seq)


Cursor = dict[str, tuple[int, int]]
LISTS = ""  # the cursor's entry for the checkpoint and run lists (no job is called "")
SWEEPS = "\x00sweeps"  # the cursor's entry for the sweeps' tables (job ids are printable)


class Board:
    """The dashboard's model: the newest mesh snapshot and a record per job seen."""

    def __init__(self, jobs_kept: int = JOBS_KEPT) -> None:
        self.jobs_kept = jobs_kept
        self.mesh: dict[str, Any] = {}
        self.jobs: OrderedDict[str, JobRecord] = OrderedDict()
        self.checkpoints: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []  # recorded runs (meshtrain.dashboard.history), newest first
        self._lists_version = 0  # bumped when the checkpoints or the runs change: sent only then
        self.sweeps: list[dict[str, Any]] = []  # the sweeps' tables (meshtrain.sweep.resume), newest first
        self._sweeps_version = 0
        self.agent_error: str | None = None
        self.version = 0  # bumped on every change a page would show

    def _bump(self, changed: bool) -> bool:
        if changed:
            self.version += 1
        return changed

    def agent_unreachable(self, error: str) -> bool:
        changed = self.agent_error != error
        self.agent_error = error
        return self._bump(changed)

    def update(self, mesh: dict[str, Any], jobs: list[dict[str, Any]], now: float) -> bool:
        """One poll of the agent: its mesh snapshot and the full snapshots of the jobs it coordinates."""
        changed = mesh != self.mesh or self.agent_error is not None
        self.mesh, self.agent_error = mesh, None
        seen: set[str] = set()
        for snap in jobs:
            changed = self._fold(snap, now, detailed=True) or changed
            seen.add(str(snap.get("job")))
        for summary in mesh.get("jobs") or []:
            if isinstance(summary, dict) and str(summary.get("job")) not in seen:
                record = self.jobs.get(str(summary.get("job")))
                if record is not None and record.detailed:
                    continue  # a summary of a job whose full snapshot we had: keep the full one
                changed = self._fold(summary, now, detailed=False) or changed
                seen.add(str(summary.get("job")))
        for job, record in self.jobs.items():
            if job not in seen and not record.finished and not record.stale:
                record.stale = True
                changed = True
        self._forget_old()
        return self._bump(changed)

    def _fold(self, snap: dict[str, Any], now: float, detailed: bool) -> bool:
        job = snap.get("job")
        if not isinstance(job, str) or not job:
            return False
        record = self.jobs.get(job)
        if record is None:
            record = self.jobs[job] = JobRecord(job, {}, first_seen=now, last_seen=now)
        return record.fold(snap, now, detailed)

    def _forget_old(self) -> None:
        done = [job for job, r in self.jobs.items() if r.finished or r.stale]
        for job in done[: max(0, len(done) - self.jobs_kept)]:
            del self.jobs[job]

    def set_checkpoints(self, runs: list[dict[str, Any]]) -> bool:
        changed = runs != self.checkpoints
        self.checkpoints = runs
        self._lists_version += changed
        return self._bump(changed)

    def set_runs(self, runs: list[dict[str, Any]]) -> bool:
        changed = runs != self.runs
        self.runs = runs
        self._lists_version += changed
        return self._bump(changed)

    def set_sweeps(self, sweeps: list[dict[str, Any]]) -> bool:
        changed = sweeps != self.sweeps
        self.sweeps = sweeps
        self._sweeps_version += changed
        return self._bump(changed)

    def touch(self) -> None:
        """Something shown beside the snapshots changed (an export): the pages are due an update."""
        self._bump(True)

    def job(self, job: str) -> JobRecord | None:
        return self.jobs.get(job)

    def view(self, cursor: Cursor | None = None, extra: dict[str, Any] | None = None) -> tuple[dict, Cursor]:
        """(what to send one page, its new cursor); `cursor` None or empty sends everything."""
        cursor = dict(cursor or {})
        lists_sent = cursor.get(LISTS) != (self._lists_version, 0)
        cursor[LISTS] = (self._lists_version, 0)
        sweeps_sent = cursor.get(SWEEPS) != (self._sweeps_version, 0)
        cursor[SWEEPS] = (self._sweeps_version, 0)
        jobs = []
        for job, record in self.jobs.items():  # _fold takes no job called "": LISTS is free
            view, cursor[job] = record.view(cursor.get(job, (0, 0)))
            jobs.append(view)
        jobs.sort(key=lambda j: (j["snap"].get("state") in FINISHED_JOB_STATES, -j["first_seen"]))
        body = {
            "version": self.version,
            "agent_error": self.agent_error,
            "mesh": {k: v for k, v in self.mesh.items() if k != "jobs"},
            "jobs": jobs,
            **({"checkpoints": self.checkpoints, "runs": self.runs} if lists_sent else {}),
            **({"sweeps": self.sweeps} if sweeps_sent else {}),
            **(extra or {}),
        }
        return body, cursor
