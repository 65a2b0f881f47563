"""Plain-text views for logs, pipes and CI: no escape codes, no redraws.

`render_mesh_text` / `render_job_text` print a whole snapshot once (what
`meshtrain status` prints when stdout is not a terminal). `MeshLog` and
`JobLog` are sans-I/O: fed successive snapshots, they return only the lines
worth appending to a log — one per new event, job state change, evaluated
epoch and new worker output line — so a log reads as a story, not as a
stream of repeated frames.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from meshtrain.status import (
    FINISHED_JOB_STATES,
    epoch_fraction,
    integer,
    is_leader,
    is_self,
    items,
    leader_label,
    node_label,
    number,
    overall_fraction,
    scalars,
    shown_epoch,
    strings,
    text,
)
from meshtrain.ui import format as fmt
from meshtrain.ui.mesh_view import state_counts

PLAIN_LEADER_MARK = "*"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def mesh_summary(mesh: Mapping[str, Any]) -> str:
    counts = state_counts(mesh)
    states = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no nodes yet"
    leader = leader_label(mesh) or "none yet"
    me = next((node_label(n) for n in items(mesh, "nodes") if is_self(mesh, n)), text(mesh, "self"))
    version = text(mesh, "version")
    head = f"meshtrain mesh{' v' + version if version else ''}: {states}; leader {leader}"
    return head + (f"; you: {me}" if me else "")


def event_text(event: Mapping[str, Any]) -> str:
    detail = text(event, "detail")
    line = f"{fmt.clock(number(event, 't'))} {text(event, 'kind', '?'):<7} {text(event, 'node', '?')}"
    return line + (f"  {detail}" if detail else "")


def job_line(job: Mapping[str, Any]) -> str:
    """`job j7f3a examples/mnist.py running on mac1, mac2 - epoch 2/3 - loss 0.0812 - acc 97.84%`"""
    parts = [
        f"job {text(job, 'job', '?')} {text(job, 'script')} {text(job, 'state', '?')}".replace("  ", " ")
    ]
    nodes = strings(job, "nodes")
    if nodes:
        parts[0] += f" on {', '.join(nodes)}"
    if integer(job, "epochs"):
        parts.append(f"epoch {integer(job, 'epoch')}/{integer(job, 'epochs')}")
    if number(job, "loss") is not None:
        parts.append(f"loss {fmt.loss(number(job, 'loss'))}")
    if number(job, "test_accuracy") is not None:
        parts.append(f"acc {fmt.accuracy(number(job, 'test_accuracy'))}")
    parts += named_metrics(scalars(job, "metrics"))
    return " - ".join(parts)


def named_metrics(named: Mapping[str, float | None]) -> list[str]:
    """`["val_loss 1.523", "lr 3.00e-04"]`: every other metric the script reports, in its order."""
    return [f"{name} {fmt.metric(value)}" for name, value in named.items()]


def render_mesh_text(snapshot: Mapping[str, Any] | None) -> str:
    """The whole mesh as plain text: summary, node table, jobs, recent events, drops."""
    mesh: Mapping[str, Any] = snapshot if isinstance(snapshot, Mapping) else {}
    lines = [mesh_summary(mesh)]
    nodes = items(mesh, "nodes")
    if nodes:
        rows = [["STATE", "NODE", "ADDRESS", "DEVICE", "CORES", "MEM", "LOAD", "BATTERY", "JOB"]]
        for node in nodes:
            name = node_label(node)
            if is_leader(mesh, node):
                name = f"{PLAIN_LEADER_MARK}{name}"
            if is_self(mesh, node):
                name += " (you)"
            battery = node.get("battery")
            if isinstance(battery, Mapping):
                pct = number(battery, "percent")
                batt = (f"{pct:.0f}%" if pct is not None else "?") + (
                    " plugged" if battery.get("plugged") else ""
                )
            else:
                batt = "mains"
            device = " ".join(p for p in (text(node, "platform"), text(node, "device")) if p) or fmt.MISSING
            cores = integer(node, "cores")
            rows.append(
                [
                    text(node, "state", "?"),
                    name,
                    text(node, "addr", fmt.MISSING),
                    device,
                    str(cores) if cores else fmt.MISSING,
                    fmt.size_gb(number(node, "memory_gb")),
                    fmt.percent(number(node, "load")),
                    batt,
                    text(node, "job") or "idle",
                ]
            )
        lines += _table(rows)
        lines.append(f"  ({PLAIN_LEADER_MARK} = leader)")
    for job in items(mesh, "jobs"):
        lines.append(job_line(job))
    events = items(mesh, "events")
    if events:
        lines.append("events:")
        lines += ["  " + event_text(e) for e in events[-8:]]
    drops = mesh.get("drops")
    if isinstance(drops, Mapping):
        nonzero = {k: v for k, v in drops.items() if isinstance(v, int) and v}
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(nonzero.items())) or "none"
        lines.append(f"dropped packets: {dropped}")
    return "\n".join(lines)


def progress_line(job: Mapping[str, Any]) -> str:
    epochs = integer(job, "epochs")
    steps = integer(job, "steps_per_epoch")
    step = integer(job, "step")
    if steps and step > steps:
        step %= steps
    frac = epoch_fraction(job)
    line = f"epoch {shown_epoch(job)}/{epochs or '?'} {fmt.ascii_bar(frac, 20)} {fmt.percent(frac)}"
    line += f" step {step}/{steps or '?'} | overall {fmt.percent(overall_fraction(job))}"
    if text(job, "state") not in FINISHED_JOB_STATES:
        line += f" | ETA {fmt.duration(number(job, 'eta_s'))}"
    return line + f" | elapsed {fmt.duration(number(job, 'elapsed_s'))}"


def metrics_line(job: Mapping[str, Any]) -> str:
    size = integer(job, "size") or len(items(job, "workers"))
    return (
        f"loss {fmt.loss(number(job, 'loss'))} | test accuracy {fmt.accuracy(number(job, 'test_accuracy'))}"
        f" | {fmt.count(number(job, 'samples_per_s'))} samples/s on {size} node{'s' if size != 1 else ''}"
        f" | ring {fmt.mb_per_s(number(job, 'ring_mb_s'))}"
    )


def render_job_text(snapshot: Mapping[str, Any] | None) -> str:
    """One job as plain text: state, progress, metrics, workers, message, recent log."""
    job: Mapping[str, Any] = snapshot if isinstance(snapshot, Mapping) else {}
    lines = [f"job {text(job, 'job', '?')} {text(job, 'script', '?')}: {text(job, 'state', '?')}"]
    message = text(job, "message")
    if message:
        lines.append(("error: " if text(job, "state") == "failed" else "note: ") + message)
    lines += [progress_line(job), metrics_line(job)]
    named = named_metrics(scalars(job, "metrics"))
    if named:
        lines.append("metrics: " + " | ".join(named))
    workers = sorted(items(job, "workers"), key=lambda w: integer(w, "rank"))
    if workers:
        rows = [["NODE", "RANK", "SHARE", "SAMPLES/S", "STEP", "LOSS"]]
        rows += [
            [
                text(w, "node", "?"),
                str(integer(w, "rank")),
                fmt.percent(number(w, "share")),
                fmt.count(number(w, "samples_per_s")),
                str(integer(w, "step")),
                fmt.loss(number(w, "loss")),
            ]
            for w in workers
        ]
        lines += _table(rows)
    log = strings(job, "log")
    if log:
        lines.append("log:")
        lines += ["  " + line for line in log[-10:]]
    return "\n".join(lines)


def new_tail(previous: list[str], current: list[str]) -> list[str]:
    """Lines of a sliding window `current` that were not in `previous` (the longest overlap wins)."""
    for k in range(min(len(previous), len(current)), 0, -1):
        if previous[-k:] == current[:k]:
            return current[k:]
    return current


class _EventTracker:
    """Remembers which events were already written (events carry no id; their content is the key)."""

    def __init__(self) -> None:
        self.seen: set[tuple[Any, ...]] = set()

    def new(self, events: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        fresh = []
        for event in events:
            key = (number(event, "t"), text(event, "kind"), text(event, "node"), text(event, "detail"))
            if key not in self.seen:
                self.seen.add(key)
                fresh.append(event)
        if len(self.seen) > 4096:  # events are kept ~50 deep upstream; forget the oldest history
            self.seen = {
                (number(e, "t"), text(e, "kind"), text(e, "node"), text(e, "detail")) for e in events
            }
        return fresh


class MeshLog:
    """Snapshots in, log lines out: the mesh summary once, then one line per event or job change."""

    def __init__(self) -> None:
        self._events = _EventTracker()
        self._jobs: dict[str, str] = {}
        self._started = False

    def feed(self, snapshot: Mapping[str, Any] | None) -> list[str]:
        mesh: Mapping[str, Any] = snapshot if isinstance(snapshot, Mapping) else {}
        lines: list[str] = []
        if not self._started:
            self._started = True
            lines.append(render_mesh_text(mesh))
            self._events.new(items(mesh, "events"))
            self._jobs = {text(j, "job"): text(j, "state") for j in items(mesh, "jobs")}
            return lines
        lines += [event_text(e) for e in self._events.new(items(mesh, "events"))]
        for job in items(mesh, "jobs"):
            key, state = text(job, "job"), text(job, "state")
            if self._jobs.get(key) != state:
                self._jobs[key] = state
                lines.append(job_line(job))
        return lines


class JobLog:
    """Snapshots in, log lines out: state changes, messages, events, each evaluation, new output."""

    def __init__(self, *, include_log: bool = True) -> None:
        self.include_log = include_log
        self._events = _EventTracker()
        self._state = ""
        self._message = ""
        self._epoch = 0
        self._accuracy: float | None = None
        self._evaluations = 0
        self._log: list[str] = []
        self._finished = False
        self._shares: dict[str, str] = {}

    def feed(self, snapshot: Mapping[str, Any] | None) -> list[str]:
        job: Mapping[str, Any] = snapshot if isinstance(snapshot, Mapping) else {}
        lines: list[str] = []
        state = text(job, "state", "?")
        job_id = text(job, "job", "?")
        if state != self._state:
            self._state = state
            size = integer(job, "size") or len(items(job, "workers"))
            where = f" on {size} node{'s' if size != 1 else ''}" if size else ""
            if state not in FINISHED_JOB_STATES:
                lines.append(f"job {job_id} {text(job, 'script')}: {state}{where}")
        message = text(job, "message")
        if message and message != self._message and state != "failed":
            lines.append(f"note: {message}")
        lines += [event_text(e) for e in self._events.new(items(job, "events"))]
        if self.include_log:
            log = strings(job, "log")
            lines += new_tail(self._log, log)
            self._log = log
        for w in items(job, "workers"):
            why, node, share = text(w, "why"), text(w, "node", "?"), fmt.percent(number(w, "share"))
            if why and self._shares.get(node) != share:  # a new share, not every new wording of the same
                self._shares[node] = share
                lines.append(f"share: {node} {share} of each batch ({why})")
        epoch = shown_epoch(job)
        if state == "running" and epoch > self._epoch:
            self._epoch = epoch
            lines.append(f"epoch {epoch}/{integer(job, 'epochs') or '?'} started")
        accuracy = number(job, "test_accuracy")
        evaluations = integer(job, "evaluations", -1)  # -1: an agent that does not count them
        if evaluations > self._evaluations:
            recent = [e for e in items(job, "recent_evaluations") if integer(e, "n") > self._evaluations]
            if not recent:  # an agent that keeps no list: the latest one
                own_epoch = integer(job, "evaluated_epoch") or epoch  # the evaluation's, not the job's now
                recent = [{"epoch": own_epoch, "values": job.get("evaluated")}]
            for e in recent:  # each evaluation since the last snapshot, with its own epoch
                values = e.get("values") if isinstance(e.get("values"), Mapping) else {}
                lines.append(evaluated_line(job, integer(e, "epoch") or epoch, scalars({"v": values}, "v")))
            self._evaluations, self._accuracy = evaluations, accuracy
        elif evaluations < 0 and accuracy is not None and accuracy != self._accuracy:
            self._accuracy = accuracy
            lines.append(evaluated_line(job, epoch, {"test_accuracy": accuracy}))
        if state in FINISHED_JOB_STATES and not self._finished:
            self._finished = True
            lines.append(final_line(job))
        self._message = message
        return lines


def evaluated_line(job: Mapping[str, Any], epoch: int, evaluated: Mapping[str, float | None]) -> str:
    """`evaluated (epoch 2/3): test accuracy 97.84% | val_loss 1.52 | loss 0.0812 | 9,330 samples/s`"""
    named = dict(evaluated)
    parts = []
    if "test_accuracy" in named:
        parts.append(f"test accuracy {fmt.accuracy(named.pop('test_accuracy'))}")
    parts += named_metrics(named)
    # an evaluation long enough to stall the recent rate reads as the run's average, not as 0
    speed = number(job, "samples_per_s") or number(job, "avg_samples_per_s")
    parts += [f"loss {fmt.loss(number(job, 'loss'))}", f"{fmt.count(speed)} samples/s"]
    return f"evaluated (epoch {epoch}/{integer(job, 'epochs') or '?'}): " + " | ".join(parts)


def final_line(job: Mapping[str, Any]) -> str:
    """The line a finished job ends on: its result, or its one-line failure."""
    state = text(job, "state", "?")
    job_id = text(job, "job", "?")
    elapsed = fmt.duration(number(job, "elapsed_s"))
    if state == "done":
        named = named_metrics(scalars(job, "metrics"))
        accuracy = number(job, "test_accuracy")
        parts = [] if accuracy is None and named else [f"test accuracy {fmt.accuracy(accuracy)}"]
        parts += [f"loss {fmt.loss(number(job, 'loss'))}", *named]
        return f"job {job_id} done in {elapsed}: " + ", ".join(parts)
    message = text(job, "message")
    return f"job {job_id} {state} after {elapsed}" + (f": {message}" if message else "")
