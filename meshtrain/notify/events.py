"""What is worth telling the user about a job: its snapshots and its result in, `Notice`s out. Pure.

The coordinator already streams a job snapshot every half second (the live
view's food); `JobWatcher.observe` compares each with the one before and
says what happened in between: the job paused below `--min-nodes`, or a node
was lost (a `lost` event of the job). `JobWatcher.ended` turns the job's
result into the final notice: finished (final metrics, duration), failed
(the traceback's last line) or cancelled. Each event yields one notice; the
watcher remembers what it has already reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

KINDS = ("finished", "failed", "cancelled", "paused", "node_lost")
FINAL_METRICS = ("loss", "test_accuracy", "avg_samples_per_s")


@dataclass(frozen=True)
class Notice:
    """One thing to tell the user about one job."""

    kind: str  # one of KINDS
    job: str
    name: str  # the run's name (its checkpoints' name, else the script's stem)
    script: str
    t: float  # wall-clock time of the event
    summary: str  # one line a person reads
    metrics: dict[str, float] = field(default_factory=dict)
    duration_s: float | None = None
    detail: str | None = None  # the failure's last traceback line, the lost node's reason
    node: str | None = None  # the node lost
    nodes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.kind,
            "job": self.job,
            "name": self.name,
            "script": self.script,
            "time": self.t,
            "text": self.summary,
            "metrics": dict(self.metrics),
            "duration_s": self.duration_s,
            "detail": self.detail,
            "node": self.node,
            "nodes": list(self.nodes),
        }


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def final_metrics(snap: dict[str, Any]) -> dict[str, float]:
    """The job's last reported metrics: loss, accuracy, throughput, and every other number reported."""
    out: dict[str, float] = {}
    extra = snap.get("metrics")
    if isinstance(extra, dict):
        out.update({str(k): float(v) for k, v in extra.items() if _finite(v)})
    for key in FINAL_METRICS:
        if _finite(snap.get(key)):
            out[key] = float(snap[key])
    return out


def last_line(text: str | None) -> str | None:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else None


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def metrics_text(metrics: dict[str, float]) -> str:
    parts = []
    for key, value in metrics.items():
        if key == "avg_samples_per_s":
            parts.append(f"{value:,.0f} samples/s")
        elif key.endswith("accuracy") and 0 <= value <= 1:
            parts.append(f"{key} {value:.2%}")
        else:
            parts.append(f"{key} {value:.4g}")
    return ", ".join(parts)


class JobWatcher:
    """Follows one job's snapshots; `observe` and `ended` return the notices due."""

    def __init__(self, job: str, name: str, script: str) -> None:
        self.job = job
        self.name = name
        self.script = script
        self.state: str | None = None
        self.last: dict[str, Any] = {}
        self._lost_seen: set[tuple[Any, ...]] = set()
        self._ended = False

    def _notice(self, kind: str, t: float, summary: str, **fields: Any) -> Notice:
        nodes = tuple(str(n) for n in self.last.get("nodes") or [] if isinstance(n, str))
        if not nodes:
            nodes = tuple(str(w.get("node")) for w in self.last.get("workers") or [] if isinstance(w, dict))
        return Notice(kind, self.job, self.name, self.script, t, summary, nodes=nodes, **fields)

    def observe(self, snap: dict[str, Any], now: float) -> list[Notice]:
        """A new snapshot of the job: notices for a pause and for each node lost since the last."""
        out: list[Notice] = []
        state = snap.get("state")
        self.last = snap
        if state == "paused" and self.state != "paused":
            why = snap.get("message") or "below --min-nodes"
            out.append(self._notice("paused", now, f"job {self.job} ({self.name}) {why}", detail=str(why)))
        self.state = state if isinstance(state, str) else self.state
        for event in snap.get("events") or []:
            if not isinstance(event, dict) or event.get("kind") != "lost":
                continue
            key = (event.get("t"), event.get("node"), event.get("detail"))
            if key in self._lost_seen:
                continue
            self._lost_seen.add(key)
            node = str(event.get("node") or "?")
            detail = str(event.get("detail") or "")
            t = float(event["t"]) if _finite(event.get("t")) else now
            summary = f"job {self.job} ({self.name}) lost node {node}" + (f": {detail}" if detail else "")
            out.append(self._notice("node_lost", t, summary, node=node, detail=detail or None))
        return out

    def ended(
        self, state: str, message: str | None, traceback: str | None, snap: dict[str, Any] | None, now: float
    ) -> Notice | None:
        """The job's result: one finished, failed or cancelled notice (None when already given)."""
        if self._ended:
            return None
        self._ended = True
        if snap:
            self.last = snap
        snap = self.last
        metrics = final_metrics(snap)
        elapsed = float(snap["elapsed_s"]) if _finite(snap.get("elapsed_s")) else None
        took = f" after {duration(elapsed)}" if elapsed is not None else ""
        head = f"job {self.job} ({self.name})"
        if state == "done":
            shown = metrics_text(metrics)
            summary = f"{head} finished{took}" + (f": {shown}" if shown else "")
            return self._notice("finished", now, summary, metrics=metrics, duration_s=elapsed)
        if state == "failed":
            detail = last_line(traceback) or message or "failed"
            summary = f"{head} failed{took}: {detail}"
            return self._notice("failed", now, summary, metrics=metrics, duration_s=elapsed, detail=detail)
        reason = message or "cancelled"
        summary = f"{head} cancelled{took}: {reason}"
        return self._notice("cancelled", now, summary, metrics=metrics, duration_s=elapsed, detail=reason)
