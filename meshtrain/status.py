"""The status snapshot: one schema for the agent that produces it and every view that reads it.

The agent (meshtrain.agent.snapshot, the job state) builds these dicts; the
terminal views (meshtrain.ui), the web dashboard (meshtrain.dashboard) and
`meshtrain status --json` read them. Snapshots are plain msgpack/JSON-able
dicts (schemas below). This module imports nothing of either side.

A view must survive any optional field being absent, `None`, or of an
unexpected type — an older or newer agent must never crash a terminal — so the
views read fields only through these helpers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict


class Event(TypedDict, total=False):
    t: float
    kind: str  # joined | left | suspect | dead | alive | leader
    node: str
    detail: str


class Node(TypedDict, total=False):
    id: str
    name: str
    addr: str
    state: str  # alive | suspect | dead | left
    incarnation: int
    platform: str
    device: str
    cores: int
    memory_gb: float
    load: float | None
    battery: dict[str, Any] | None  # {"percent": float, "plugged": bool}
    job: str | None
    role: str | None


class MeshSnapshot(TypedDict, total=False):
    version: str
    self: str
    leader: str | None
    nodes: list[Node]
    events: list[Event]
    jobs: list[dict[str, Any]]
    drops: dict[str, int]


class Worker(TypedDict, total=False):
    node: str
    rank: int  # its rank in the current ring: 0..size-1
    slot: int  # its placement slot (stable for the job; a rejoined worker gets a new, higher one)
    samples_per_s: float
    step: int
    loss: float | None
    share: float


class JobSnapshot(TypedDict, total=False):
    job: str
    script: str
    state: str  # waiting | starting | running | paused | done | failed | cancelled
    message: str | None
    size: int
    epoch: int  # 1-based epoch in progress (0 before the first)
    epochs: int
    step: int  # steps done in the current epoch
    steps_per_epoch: int
    loss: float | None
    test_accuracy: float | None  # fraction 0..1
    samples_per_s: float
    ring_mb_s: float | None
    eta_s: float | None
    started: float
    elapsed_s: float
    workers: list[Worker]
    events: list[Event]
    log: list[str]
    loss_history: list[float]  # optional; the live helper keeps one when absent
    metrics: dict[str, float | None]  # any other named scalar `mesh.report` got: the latest values
    metric_history: dict[str, list[float | None]]  # their recent values, oldest first
    evaluated: dict[str, float | None]  # the latest report without a step (an evaluation)
    evaluations: int  # how many such reports so far (the plain log writes a line for each)
    evaluated_epoch: int  # the 1-based epoch that evaluation named (0: none)
    recent_evaluations: list[dict[str, Any]]  # the last few: {n, epoch, values}, so a view writes each


FINISHED_JOB_STATES = frozenset({"done", "failed", "cancelled"})


def text(d: Mapping[str, Any] | None, key: str, default: str = "") -> str:
    """A string field; anything else (missing, None, a number) becomes a string or the default."""
    if not isinstance(d, Mapping):
        return default
    value = d.get(key)
    if value is None:
        return default
    return value if isinstance(value, str) else str(value)


def number(d: Mapping[str, Any] | None, key: str) -> float | None:
    """A finite numeric field, or None."""
    if not isinstance(d, Mapping):
        return None
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def scalars(d: Mapping[str, Any] | None, key: str) -> dict[str, float | None]:
    """A {name: number} field, in its order; a value that is not a finite number reads None."""
    if not isinstance(d, Mapping):
        return {}
    value = d.get(key)
    if not isinstance(value, Mapping):
        return {}
    return {str(k): number(value, k) for k in value}


def integer(d: Mapping[str, Any] | None, key: str, default: int = 0) -> int:
    value = number(d, key)
    return default if value is None else int(value)


def items(d: Mapping[str, Any] | None, key: str) -> list[Mapping[str, Any]]:
    """A list-of-dicts field, skipping entries that are not dicts."""
    if not isinstance(d, Mapping):
        return []
    value = d.get(key)
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        return []
    return [v for v in value if isinstance(v, Mapping)]


def strings(d: Mapping[str, Any] | None, key: str) -> list[str]:
    if not isinstance(d, Mapping):
        return []
    value = d.get(key)
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        return []
    return [v if isinstance(v, str) else str(v) for v in value]


def node_label(node: Mapping[str, Any]) -> str:
    """What a person calls a node: its name, else its id."""
    return text(node, "name") or text(node, "id") or "?"


def leader_label(mesh: Mapping[str, Any]) -> str | None:
    """The leader's name (the snapshot gives its id)."""
    leader = text(mesh, "leader")
    if not leader:
        return None
    for node in items(mesh, "nodes"):
        if text(node, "id") == leader or text(node, "name") == leader:
            return node_label(node)
    return leader


def is_leader(mesh: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    leader = text(mesh, "leader")
    return bool(leader) and leader in (text(node, "id"), text(node, "name"))


def is_self(mesh: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    me = text(mesh, "self")
    return bool(me) and me in (text(node, "id"), text(node, "name"))


def epoch_fraction(job: Mapping[str, Any]) -> float:
    """How far through the current epoch (0..1)."""
    if text(job, "state") == "done":
        return 1.0
    steps = integer(job, "steps_per_epoch")
    if steps <= 0:
        return 0.0
    step = integer(job, "step")
    if step > steps:  # a global step counter: take the position inside the epoch
        step %= steps
    return min(max(step / steps, 0.0), 1.0)


def overall_fraction(job: Mapping[str, Any]) -> float:
    """How far through the whole job (0..1), counting finished epochs."""
    if text(job, "state") == "done":
        return 1.0
    epochs = integer(job, "epochs")
    if epochs <= 0:
        return epoch_fraction(job)
    done_epochs = max(integer(job, "epoch") - 1, 0)
    return min((done_epochs + epoch_fraction(job)) / epochs, 1.0)


def shown_epoch(job: Mapping[str, Any]) -> int:
    """The epoch to display, 1-based; clamped so `epoch 0/3` is never shown once running."""
    epoch = integer(job, "epoch")
    epochs = integer(job, "epochs")
    if text(job, "state") in ("running", "paused", "done", "failed", "cancelled") and epoch < 1 and epochs:
        epoch = 1
    return min(epoch, epochs) if epochs else epoch
