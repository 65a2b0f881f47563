"""One job's progress, folded from its workers' reports into the job snapshot.

Pure: the coordinator feeds it reports, log lines and events with their
timestamps and asks for `snapshot(now)`; nothing here reads a clock or a
socket, so rates, shares and the ETA are testable on plain numbers.

A job belongs to the mesh, not to the node that coordinates it right now, so
the whole state round-trips through `to_record()`/`from_record()` (plain
msgpack-able data): the coordinator replicates it on every node of the job,
and whichever node takes over coordination carries on from the same numbers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from meshtrain.metrics import MAX_NAMES, extras

LOG_LINES = 10
EVENTS_KEPT = 50
RATE_WINDOW_S = 5.0
LOSS_HISTORY = 200


@dataclass
class WorkerProgress:
    """What one rank has reported so far."""

    node: str
    rank: int
    step: int = 0
    loss: float | None = None
    samples_total: float = 0.0
    samples_seen: deque[tuple[float, float]] = field(default_factory=deque)  # (t, cumulative samples)
    first: tuple[float, float] | None = None  # (t, cumulative samples) of the first report
    last_t: float = 0.0
    share: float | None = None  # its share of the global batch, as the worker reports it
    share_why: str = ""  # why the share is what it is ("2.0x faster", "on battery: halved")

    def add_samples(self, t: float, samples: float) -> None:
        self.samples_total += samples
        if self.first is None:
            self.first = (t, self.samples_total)
        self.last_t = t
        self.samples_seen.append((t, self.samples_total))
        while len(self.samples_seen) > 2 and t - self.samples_seen[0][0] > RATE_WINDOW_S:
            self.samples_seen.popleft()

    def to_record(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "rank": self.rank,
            "step": self.step,
            "loss": self.loss,
            "samples_total": self.samples_total,
            "samples_seen": [list(x) for x in self.samples_seen],
            "first": list(self.first) if self.first is not None else None,
            "last_t": self.last_t,
            "share": self.share,
            "share_why": self.share_why,
        }

    @staticmethod
    def from_record(data: dict[str, Any]) -> WorkerProgress:
        first = data.get("first")
        return WorkerProgress(
            node=str(data["node"]),
            rank=int(data["rank"]),
            step=int(data.get("step") or 0),
            loss=data.get("loss"),
            samples_total=float(data.get("samples_total") or 0.0),
            samples_seen=deque((float(t), float(s)) for t, s in data.get("samples_seen") or []),
            first=(float(first[0]), float(first[1])) if first else None,
            last_t=float(data.get("last_t") or 0.0),
            share=data.get("share"),
            share_why=str(data.get("share_why") or ""),
        )

    def rate(self, now: float) -> float:
        """Samples per second over the recent window; 0 once reports stop for a whole window."""
        if len(self.samples_seen) < 2 or now - self.samples_seen[-1][0] > RATE_WINDOW_S:
            return 0.0
        (t0, s0), (t1, s1) = self.samples_seen[0], self.samples_seen[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0


@dataclass
class JobState:
    """The aggregate of one job, in the job-snapshot schema shared with meshtrain.ui."""

    job: str
    script: str
    started: float
    state: str = "waiting"
    message: str | None = None
    nodes: list[str] = field(default_factory=list)
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps_per_epoch: int = 0
    loss: float | None = None
    test_accuracy: float | None = None
    ring_mb_s: float | None = None
    finished: float | None = None
    workers: dict[int, WorkerProgress] = field(default_factory=dict)
    main: int = 0  # the worker whose reports carry job-wide progress (the lowest live one)
    generation: int = 0  # the job's membership view (a ring generation), for the live view
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    log: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    loss_history: deque[float] = field(default_factory=lambda: deque(maxlen=LOSS_HISTORY))
    # any other named scalar (val_loss, lr, ...): latest value, recent values, and the evaluations
    # (reports without a step, like mnist.py's test accuracy) that the plain log writes a line for
    metrics: dict[str, float | None] = field(default_factory=dict)
    metric_history: dict[str, deque[float | None]] = field(default_factory=dict)
    evaluated: dict[str, float | None] = field(default_factory=dict)
    evaluations: int = 0
    evaluated_epoch: int = 0  # the 1-based epoch the latest evaluation reported (0: it named none)
    # the last few evaluations, numbered: a view that polls less often than they come writes each one
    recent_evaluations: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=8))
    _metric_rank: dict[str, int] = field(default_factory=dict)  # whose value each name shows
    _global_steps: deque[tuple[float, int]] = field(default_factory=deque)

    def assign(self, nodes: list[str]) -> None:
        """The placement is known: rank i runs on nodes[i]."""
        self.nodes = list(nodes)
        self.workers = {rank: WorkerProgress(node=name, rank=rank) for rank, name in enumerate(nodes)}

    def add_worker(self, index: int, node: str) -> None:
        """An elastic job admitted a worker (a node that joined, or came back)."""
        self.workers[index] = WorkerProgress(node=node, rank=index)
        if node not in self.nodes:
            self.nodes.append(node)
        self.main = min(self.workers)

    def remove_worker(self, index: int) -> None:
        """An elastic job lost a worker: the others go on; progress now comes from the lowest left."""
        gone = self.workers.pop(index, None)
        if gone is not None and all(w.node != gone.node for w in self.workers.values()):
            self.nodes = [n for n in self.nodes if n != gone.node]
        if self.workers:
            self.main = min(self.workers)

    def set_state(self, state: str, message: str | None, now: float) -> None:
        self.state = state
        self.message = message
        if state in ("done", "failed", "cancelled") and self.finished is None:
            self.finished = now

    def add_log(self, node: str, line: str) -> None:
        self.log.append(f"[{node}] {line}")

    def add_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def report(self, rank: int, t: float, metrics: dict[str, Any]) -> None:
        """One `mesh.report(...)` call of worker `rank`, stamped `t` by that worker."""
        w = self.workers.get(rank)
        if w is None:
            return
        samples = metrics.get("samples")
        if isinstance(samples, (int, float)):
            w.add_samples(t, float(samples))
        loss = metrics.get("loss")
        if isinstance(loss, (int, float)):
            w.loss = float(loss)
        if isinstance(metrics.get("step"), int):
            w.step = int(metrics["step"]) + 1
        if isinstance(metrics.get("ring_mb_s"), (int, float)):
            self.ring_mb_s = float(metrics["ring_mb_s"])
        if isinstance(metrics.get("share"), (int, float)):
            w.share = float(metrics["share"])
        if isinstance(metrics.get("share_why"), str):
            w.share_why = metrics["share_why"][:40]
        paused = metrics.get("paused")
        if isinstance(paused, int) and not isinstance(paused, bool):
            if paused > 0 and self.state == "running":
                workers = metrics.get("workers")
                self.state, self.message = (
                    "paused",
                    f"paused: {workers} of the {paused} nodes --min-nodes asks for",
                )
            elif paused == 0 and self.state == "paused":
                self.state, self.message = "running", None
        self._fold_metrics(rank, metrics)
        if rank != self.main:
            return  # job-wide progress comes from one worker: the lowest live one
        # scripts report loop indices (epoch and step from 0); the snapshot shows counts (epoch in
        # progress from 1, steps done in the epoch), as the views expect
        for key, offset in (("epoch", 1), ("epochs", 0), ("step", 1), ("steps_per_epoch", 0)):
            value = metrics.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, key, value + offset)
        if isinstance(loss, (int, float)):
            self.loss = float(loss)
            self.loss_history.append(float(loss))
        acc = metrics.get("test_accuracy")
        if isinstance(acc, (int, float)):
            self.test_accuracy = float(acc)
        if "step" in metrics:
            self._global_steps.append((t, self._global_step()))
            while len(self._global_steps) > 2 and t - self._global_steps[0][0] > RATE_WINDOW_S:
                self._global_steps.popleft()

    def _fold_metrics(self, rank: int, metrics: dict[str, Any]) -> None:
        """Named scalars beyond the first-class ones: each from the lowest live rank that reports it
        (the main worker's validation loss, but also a metric only another rank reports)."""
        named = extras(metrics)
        for key, value in named.items():
            source = self._metric_rank.get(key)
            if source is not None and source < rank and source in self.workers:
                continue
            if key not in self.metrics and len(self.metrics) >= 2 * MAX_NAMES:
                continue  # workers refuse more names than this; a bound for any other sender
            self._metric_rank[key] = rank
            self.metrics[key] = value
            self.metric_history.setdefault(key, deque(maxlen=LOSS_HISTORY)).append(value)
        if "step" not in metrics and rank == self.main:
            evaluation = dict(named)
            acc = metrics.get("test_accuracy")
            if isinstance(acc, (int, float)) and not isinstance(acc, bool):
                evaluation["test_accuracy"] = float(acc)
            if evaluation:
                self.evaluated, self.evaluations = evaluation, self.evaluations + 1
                epoch = metrics.get("epoch")  # its own epoch: the job may have moved on by the time a
                # view reads the snapshot, and then labelled epoch 4's evaluation "(epoch 5/5)"
                if isinstance(epoch, int) and not isinstance(epoch, bool):
                    self.evaluated_epoch = epoch + 1
                self.recent_evaluations.append(
                    {"n": self.evaluations, "epoch": self.evaluated_epoch, "values": dict(evaluation)}
                )

    def _global_step(self) -> int:
        return max(0, self.epoch - 1) * self.steps_per_epoch + self.step if self.epoch else self.step

    def eta(self) -> float | None:
        """Seconds left at the recent step rate, when the script reports epochs and steps."""
        if not (self.epochs and self.steps_per_epoch) or len(self._global_steps) < 2:
            return None
        (t0, s0), (t1, s1) = self._global_steps[0], self._global_steps[-1]
        if t1 <= t0 or s1 <= s0:
            return None
        left = self.epochs * self.steps_per_epoch - self._global_step()
        return max(0.0, left * (t1 - t0) / (s1 - s0))

    def average_rate(self) -> tuple[float, float]:
        """(samples/s, seconds) over the whole run: every worker's samples after its first report,
        over the longest span between a worker's first and last report (each on its own clock)."""
        spans = [
            (w.samples_total - w.first[1], w.last_t - w.first[0]) for w in self.workers.values() if w.first
        ]
        seconds = max((span for _, span in spans), default=0.0)
        samples = sum(n for n, _ in spans)
        return (samples / seconds if seconds > 0 else 0.0), seconds

    _PLAIN = (
        "job",
        "script",
        "started",
        "state",
        "message",
        "nodes",
        "epoch",
        "epochs",
        "step",
        "steps_per_epoch",
        "loss",
        "test_accuracy",
        "ring_mb_s",
        "finished",
        "main",
        "generation",
        "evaluated_epoch",
        "metrics",  # every named scalar too: a node that carries the job on (or mirrors it) shows them
        "evaluated",
        "evaluations",
    )

    def to_record(self) -> dict[str, Any]:
        """Everything, as plain data: what a node taking over coordination restores from."""
        record: dict[str, Any] = {key: getattr(self, key) for key in self._PLAIN}
        record["nodes"] = list(self.nodes)
        record["workers"] = [w.to_record() for _, w in sorted(self.workers.items())]
        record["events"] = list(self.events)
        record["log"] = list(self.log)
        record["loss_history"] = list(self.loss_history)
        record["global_steps"] = [list(x) for x in self._global_steps]
        record["metric_history"] = {k: list(v) for k, v in self.metric_history.items()}
        record["recent_evaluations"] = [dict(e) for e in self.recent_evaluations]
        return record

    @staticmethod
    def from_record(data: dict[str, Any]) -> JobState:
        state = JobState(job=str(data["job"]), script=str(data["script"]), started=float(data["started"]))
        for key in JobState._PLAIN[3:]:
            if key in data:
                setattr(state, key, data[key])
        state.nodes = [str(n) for n in data.get("nodes") or []]
        state.workers = {int(w["rank"]): WorkerProgress.from_record(w) for w in data.get("workers") or []}
        state.events.extend(e for e in data.get("events") or [] if isinstance(e, dict))
        state.log.extend(str(line) for line in data.get("log") or [])
        state.loss_history.extend(float(x) for x in data.get("loss_history") or [])
        state._global_steps.extend((float(t), int(s)) for t, s in data.get("global_steps") or [])
        state.metrics = dict(state.metrics or {})
        state.evaluated = dict(state.evaluated or {})
        for key, values in (data.get("metric_history") or {}).items():
            state.metric_history[str(key)] = deque(values, maxlen=LOSS_HISTORY)
        state.recent_evaluations.extend(
            e for e in data.get("recent_evaluations") or [] if isinstance(e, dict)
        )
        return state

    def summary(self) -> dict[str, Any]:
        """The short form listed in the mesh snapshot's `jobs`."""
        return {
            "job": self.job,
            "script": self.script,
            "state": self.state,
            "nodes": list(self.nodes),
            "epoch": self.epoch,
            "epochs": self.epochs,
            "step": self.step,
            "loss": self.loss,
            "test_accuracy": self.test_accuracy,
            "metrics": dict(self.metrics),
        }

    def snapshot(self, now: float) -> dict[str, Any]:
        rates = {rank: w.rate(now) for rank, w in self.workers.items()}
        total = sum(rates.values())
        seen = sum(w.samples_total for w in self.workers.values())
        workers = [
            {
                "node": w.node,
                # its rank in the ring now: the position among the live workers (placement slots are
                # never reused, so a rejoined worker's slot can exceed the job's size)
                "rank": position,
                "slot": rank,
                "samples_per_s": rates[rank],
                "step": w.step,
                "loss": w.loss,
                "share": w.share
                if w.share is not None
                else ((w.samples_total / seen) if seen else (1.0 / len(self.workers))),
                "why": w.share_why,
            }
            for position, (rank, w) in enumerate(sorted(self.workers.items()))
        ]
        end = self.finished if self.finished is not None else now
        average, train_s = self.average_rate()
        return {
            "job": self.job,
            "script": self.script,
            "state": self.state,
            "message": self.message,
            "size": len(self.nodes),
            "epoch": self.epoch,
            "epochs": self.epochs,
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "loss": self.loss,
            "test_accuracy": self.test_accuracy,
            "samples_per_s": total,
            "ring_mb_s": self.ring_mb_s,
            "generation": self.generation,
            "eta_s": self.eta() if self.state == "running" else None,
            "started": self.started,
            "elapsed_s": max(0.0, end - self.started),
            "workers": workers,
            "events": list(self.events),
            "log": list(self.log),
            "loss_history": list(self.loss_history),
            "metrics": dict(self.metrics),
            "metric_history": {k: list(v) for k, v in self.metric_history.items()},
            "evaluated": dict(self.evaluated),
            "evaluations": self.evaluations,
            "evaluated_epoch": self.evaluated_epoch,
            "recent_evaluations": [dict(e) for e in self.recent_evaluations],
            "avg_samples_per_s": average,
            "train_s": train_s,
        }
