"""`run --report-to tensorboard|mlflow|wandb|trackio`: the run's metrics through the libraries users know.

Written once per run, by the agent that records it (meshtrain.tracking.recorder), from the main
worker's reports (the lowest member's), never once per worker. Local and offline modes only:
tensorboard event files, an MLflow SQLite store, W&B offline runs, Trackio's local store, all
under one directory (``--report-dir``, default ``$MESHTRAIN_HOME/reports``) of that node:

    reports/tensorboard/NAME-ID/     tensorboard --logdir reports/tensorboard
    reports/mlflow.db                mlflow ui --backend-store-uri sqlite:///reports/mlflow.db
    reports/wandb/                   wandb sync reports/wandb/offline-run-*
    (trackio keeps its own local store)

A library that is not installed is skipped with one line saying so (`unavailable`); a failing
library never fails the job.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from meshtrain.errors import UserError
from meshtrain.tracking.store import MetricRow, Run

LIBRARIES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}
PIP = {"tensorboard": "tensorboardX", "mlflow": "mlflow-skinny", "wandb": "wandb", "trackio": "trackio"}


def parse_report_to(values: Iterable[str]) -> list[str]:
    """``--report-to tensorboard,mlflow --report-to wandb`` -> the names; UserError for an unknown one."""
    names: list[str] = []
    for value in values:
        for name in (v.strip().lower() for v in value.split(",")):
            if not name:
                continue
            if name not in LIBRARIES:
                raise UserError(f"--report-to {name!r}: use tensorboard, mlflow, wandb or trackio")
            if name not in names:
                names.append(name)
    return names


def unavailable(names: Sequence[str]) -> list[str]:
    return [n for n in names if importlib.util.find_spec(LIBRARIES[n]) is None]


def unavailable_line(names: Sequence[str]) -> str | None:
    """The one line naming what --report-to cannot use here, or None."""
    missing = unavailable(names)
    if not missing:
        return None
    pip = " ".join(PIP[n] for n in missing)
    return f"--report-to: {', '.join(missing)} not installed here (pip install {pip}); skipping"


class _TensorBoard:
    def __init__(self, run: Run, root: Path) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(root / "tensorboard" / f"{run.name}-{run.id}"))

    def log(self, rows: Sequence[MetricRow]) -> None:
        for r in rows:
            self.writer.add_scalar(r.key, r.value, global_step=r.step, walltime=r.t)

    def params(self, params: dict[str, Any]) -> None:
        self.writer.add_text("params", json.dumps(params, sort_keys=True), 0)

    def close(self, finals: dict[str, float], state: str) -> None:
        self.writer.add_text("state", state, 0)
        self.writer.close()


class _MLflow:
    def __init__(self, run: Run, root: Path) -> None:
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
        found = self.client.get_experiment_by_name(run.name)
        experiment = found.experiment_id if found is not None else self.client.create_experiment(run.name)
        tags = {"meshtrain.run": run.id, "meshtrain.script": run.script}
        self.run_id = self.client.create_run(
            experiment, run_name=f"{run.name}-{run.id}", tags=tags
        ).info.run_id
        self._params: set[str] = set()

    def log(self, rows: Sequence[MetricRow]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(r.key, r.value, int(r.t * 1000), r.step or 0) for r in rows]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        fresh = [Param(k, str(v)[:500]) for k, v in params.items() if k not in self._params]
        self._params.update(p.key for p in fresh)
        if fresh:
            self.client.log_batch(self.run_id, params=fresh)

    def close(self, finals: dict[str, float], state: str) -> None:
        status = {"done": "FINISHED", "cancelled": "KILLED"}.get(state, "FAILED")
        self.client.set_terminated(self.run_id, status)


class _WandB:
    def __init__(self, run: Run, root: Path) -> None:
        import wandb

        (root / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode="offline", dir=str(root), project=run.name, name=f"{run.name}-{run.id}", reinit=True
        )

    def log(self, rows: Sequence[MetricRow]) -> None:
        by_step: dict[int, dict[str, float]] = {}
        for r in rows:
            by_step.setdefault(r.step or 0, {})[r.key] = r.value
        for step, values in sorted(by_step.items()):
            self.run.log(values, step=step)

    def params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def close(self, finals: dict[str, float], state: str) -> None:
        self.run.finish(exit_code=0 if state == "done" else 1)


class _Trackio:
    def __init__(self, run: Run, root: Path) -> None:
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=run.name, name=f"{run.name}-{run.id}")

    def log(self, rows: Sequence[MetricRow]) -> None:
        by_step: dict[int, dict[str, float]] = {}
        for r in rows:
            by_step.setdefault(r.step or 0, {})[r.key] = r.value
        for step, values in sorted(by_step.items()):
            self.trackio.log(values, step=step)

    def params(self, params: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            self.run.config.update(params)

    def close(self, finals: dict[str, float], state: str) -> None:
        self.trackio.finish()


_MAKERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB, "trackio": _Trackio}


class Reporters:
    """The libraries one run logs to; every call is best effort (a failing library is dropped)."""

    def __init__(self, sinks: dict[str, Any]) -> None:
        self.sinks = sinks
        self.failed: dict[str, str] = {}

    def _each(self, call: str, *args: Any) -> None:
        for name, sink in list(self.sinks.items()):
            try:
                getattr(sink, call)(*args)
            except Exception as exc:  # noqa: BLE001 - a library's failure never fails the job
                self.failed[name] = f"{exc.__class__.__name__}: {exc}"
                del self.sinks[name]

    def log(self, rows: Sequence[MetricRow], *, main: bool) -> None:
        if main:  # once per run: the main worker's values, not one copy per worker
            self._each("log", [r for r in rows if r.key not in ("samples",)])

    def params(self, params: dict[str, Any]) -> None:
        self._each("params", params)

    def close(self, finals: dict[str, float], state: str) -> None:
        self._each("close", finals, state)


def open_reporters(names: Sequence[str], run: Run, report_dir: str | Path | None, home: Path) -> Reporters:
    """The available libraries of `names`, writing under `report_dir` (default ``home/reports``)."""
    root = Path(report_dir) if report_dir else home / "reports"
    root.mkdir(parents=True, exist_ok=True)
    sinks: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for name in names:
        if name not in _MAKERS or importlib.util.find_spec(LIBRARIES[name]) is None:
            continue
        try:
            sinks[name] = _MAKERS[name](run, root)
        except Exception as exc:  # noqa: BLE001 - the run goes on without that library
            failed[name] = f"{exc.__class__.__name__}: {exc}"
    reporters = Reporters(sinks)
    reporters.failed.update(failed)
    return reporters
