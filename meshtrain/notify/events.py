"""What is worth telling the user about a job: its snapshots and its result in, `Notice`s out. Pure.

The coordinator already streams a job snapshot every half second (the live
view's food); `JobWatcher.observe` compares each with the one before and
says what happened in between: the job paused below `--min-nodes`, a node
was lost (a `lost` event of the job) or joined it (a `joined` event whose
detail names the worker: the coordinator admitted it; the mesh's own
`joined` events, which the agent copies into its jobs, name an address),
a checkpoint of the job failed (a `checkpoint` event "RUN@STEP aborted:
REASON" of the job's run, the checkpoint leader's verdict), or a
`--notify-when` condition first held. `JobWatcher.ended` turns the job's
result into the final notice: finished (final metrics, duration), failed
(the traceback's last line) or cancelled.

Each notice has a key, unique within its job and derived from the job's
record alone (the event's node and time, the worker's member name, the
condition's text, the pause's number, ``end``), so that a successor
coordinator that rebuilds a watcher from the record (`restore`) derives the
same keys and can skip what its predecessor already sent. Checkpoint
failures come one notice per streak: a failed round after a failed round
says nothing new until a checkpoint of the run commits again (a full disk
fails every round), and a round given up as "too late" (the leader aims
further ahead and tries again) is no failure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshtrain.notify.condition import Condition

KINDS = (
    "finished",
    "failed",
    "cancelled",
    "paused",
    "node_lost",
    "node_joined",
    "checkpoint_failed",
    "metric",
)
FINAL_METRICS = ("loss", "test_accuracy", "avg_samples_per_s")
END_KEY = "end"  # the key of the job's final notice (finished, failed or cancelled)
TOO_LATE = "already past that step"  # meshtrain.leader.checkpoint.TOO_LATE: retried further ahead
_CHECKPOINT_ABORT = re.compile(r"^(?P<run>.+)@(?P<step>\d+) aborted: (?P<reason>.*)$", re.S)
_CHECKPOINT_COMMIT = re.compile(r"^(?P<run>.+)@(?P<step>\d+) committed\b")


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
    node: str | None = None  # the node lost or joined
    nodes: tuple[str, ...] = ()
    key: str = ""  # unique within the job, the same on every coordinator (see the module's docstring)

    @property
    def id(self) -> str:
        """`JOB/KEY`: the same for one event whoever sends it (receivers may deduplicate on it)."""
        return f"{self.job}/{self.key}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Notice:
        """`to_dict`'s inverse (a notice a lost coordinator had not delivered, from the job's record)."""
        job = str(data.get("job") or "")
        ident = str(data.get("id") or "")
        key = ident[len(job) + 1 :] if ident.startswith(job + "/") else ""
        metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
        return cls(
            kind=str(data.get("event") or ""),
            job=job,
            name=str(data.get("name") or ""),
            script=str(data.get("script") or ""),
            t=float(data["time"]) if _finite(data.get("time")) else 0.0,
            summary=str(data.get("text") or ""),
            metrics={str(k): float(v) for k, v in (metrics or {}).items() if _finite(v)},
            duration_s=float(data["duration_s"]) if _finite(data.get("duration_s")) else None,
            detail=None if data.get("detail") is None else str(data["detail"]),
            node=None if data.get("node") is None else str(data["node"]),
            nodes=tuple(str(n) for n in data.get("nodes") or ()),
            key=key,
        )


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


def metric_values(snap: Mapping[str, Any], name: str) -> list[float]:
    """Every value of metric `name` the snapshot still holds, oldest first (its history, then the last)."""
    history = snap.get("metric_history")
    values: list[Any] = []
    if isinstance(history, dict) and isinstance(history.get(name), list):
        values += history[name]
    elif name == "loss" and isinstance(snap.get("loss_history"), list):
        values += snap["loss_history"]
    extra = snap.get("metrics")
    if isinstance(extra, dict) and name in extra:
        values.append(extra[name])
    if name in FINAL_METRICS or name in ("step", "epoch", "samples_per_s"):
        values.append(snap.get(name))
    return [float(v) for v in values if _finite(v)]


class JobWatcher:
    """Follows one job's snapshots; `observe` and `ended` return the notices due.

    `known` holds the keys of every notice given so far (seeded by `restore`
    on a successor), so each event yields one notice however often it is seen.
    """

    def __init__(
        self,
        job: str,
        name: str,
        script: str,
        conditions: Sequence[Condition] = (),
        checkpoint_run: str | None = None,
    ) -> None:
        self.job = job
        self.name = name
        self.script = script
        self.conditions = tuple(conditions)
        self.checkpoint_run = checkpoint_run or name  # the run its checkpoints are filed under
        self.state: str | None = None
        self.last: dict[str, Any] = {}
        self.known: set[str] = set()
        self.pauses = 0  # pauses seen so far: the next one's key is paused:N+1
        self._ckpt_t = -math.inf  # the newest checkpoint event already judged
        self._ckpt_failing = False  # a failure was told and no checkpoint committed since

    # what a successor needs besides the keys (the job's record carries it: see meshtrain.notify.ledger)

    def saved(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pauses": self.pauses,
            "ckpt_t": None if self._ckpt_t == -math.inf else self._ckpt_t,
            "ckpt_failing": self._ckpt_failing,
        }

    def restore(self, known: Iterable[str], saved: Mapping[str, Any] | None) -> None:
        """Continue a predecessor's watch: its keys are not given again, its pause count goes on."""
        self.known.update(str(k) for k in known)
        saved = saved or {}
        if isinstance(saved.get("state"), str):
            self.state = saved["state"]
        if isinstance(saved.get("pauses"), int) and not isinstance(saved.get("pauses"), bool):
            self.pauses = max(self.pauses, int(saved["pauses"]))
        if _finite(saved.get("ckpt_t")):
            self._ckpt_t = max(self._ckpt_t, float(saved["ckpt_t"]))
        self._ckpt_failing = self._ckpt_failing or bool(saved.get("ckpt_failing"))

    def _notice(self, kind: str, key: str, t: float, summary: str, **fields: Any) -> Notice | None:
        if key in self.known:
            return None
        self.known.add(key)
        nodes = tuple(str(n) for n in self.last.get("nodes") or [] if isinstance(n, str))
        if not nodes:
            nodes = tuple(str(w.get("node")) for w in self.last.get("workers") or [] if isinstance(w, dict))
        return Notice(kind, self.job, self.name, self.script, t, summary, nodes=nodes, key=key, **fields)

    def observe(self, snap: dict[str, Any], now: float) -> list[Notice]:
        """A new snapshot of the job: notices for a pause, nodes lost or joined, checkpoints failed,
        conditions met since the last."""
        out: list[Notice | None] = []
        state = snap.get("state")
        self.last = snap
        head = f"job {self.job} ({self.name})"
        if state == "paused" and self.state != "paused":
            self.pauses += 1
            why = snap.get("message") or "below --min-nodes"
            out.append(self._notice("paused", f"paused:{self.pauses}", now, f"{head} {why}", detail=str(why)))
        self.state = state if isinstance(state, str) else self.state
        started = float(snap["started"]) if _finite(snap.get("started")) else -math.inf
        for event in snap.get("events") or []:
            if not isinstance(event, dict):
                continue
            kind = event.get("kind")
            node = str(event.get("node") or "?")
            detail = str(event.get("detail") or "")
            t = float(event["t"]) if _finite(event.get("t")) else now
            if kind == "lost":
                summary = f"{head} lost node {node}" + (f": {detail}" if detail else "")
                key = f"node_lost:{node}:{event.get('t')!r}"
                out.append(self._notice("node_lost", key, t, summary, node=node, detail=detail or None))
            elif kind == "joined" and detail.startswith("worker ") and t >= started:
                member = detail[len("worker ") :]  # the coordinator admitted it (agent.jobs: _admit)
                summary = f"{head}: node {node} joined the job"
                out.append(self._notice("node_joined", f"node_joined:{member}", t, summary, node=node))
            elif kind == "checkpoint" and t >= started:
                out.append(self._checkpoint(head, t, detail))
        for condition in self.conditions:
            key = f"metric:{condition.text}"
            if key in self.known:
                continue
            hit = next((v for v in metric_values(snap, condition.metric) if condition.holds(v)), None)
            if hit is not None:
                summary = f"{head}: {condition.metric} {hit:.6g} ({condition.text})"
                out.append(
                    self._notice(
                        "metric", key, now, summary, metrics={condition.metric: hit}, detail=condition.text
                    )
                )
        return [n for n in out if n is not None]

    def _checkpoint(self, head: str, t: float, detail: str) -> Notice | None:
        """A checkpoint event of this agent: a failure of this job's run, told once per streak."""
        if t <= self._ckpt_t:
            return None
        aborted, committed = _CHECKPOINT_ABORT.match(detail), _CHECKPOINT_COMMIT.match(detail)
        match = aborted or committed
        if match is None or match.group("run") != self.checkpoint_run:
            return None  # another job's run, or a resume's fetch
        self._ckpt_t = t
        if committed is not None:
            self._ckpt_failing = False
            return None
        assert aborted is not None
        reason = aborted.group("reason")
        if reason.endswith(TOO_LATE) or self._ckpt_failing:
            return None
        self._ckpt_failing = True
        step = aborted.group("step")
        summary = f"{head}: checkpoint {self.checkpoint_run}@{step} failed: {reason}"
        return self._notice("checkpoint_failed", f"checkpoint_failed:{step}:{t!r}", t, summary, detail=reason)

    def ended(
        self, state: str, message: str | None, traceback: str | None, snap: dict[str, Any] | None, now: float
    ) -> Notice | None:
        """The job's result: one finished, failed or cancelled notice (None when already given)."""
        if END_KEY in self.known:
            return None
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
            return self._notice("finished", END_KEY, now, summary, metrics=metrics, duration_s=elapsed)
        if state == "failed":
            detail = last_line(traceback) or message or "failed"
            summary = f"{head} failed{took}: {detail}"
            return self._notice(
                "failed", END_KEY, now, summary, metrics=metrics, duration_s=elapsed, detail=detail
            )
        reason = message or "cancelled"
        summary = f"{head} cancelled{took}: {reason}"
        return self._notice(
            "cancelled", END_KEY, now, summary, metrics=metrics, duration_s=elapsed, detail=reason
        )
