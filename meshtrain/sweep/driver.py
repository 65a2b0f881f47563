"""A hyper-parameter sweep: Optuna asks, the mesh runs each trial as an ordinary job, Optuna prunes.

Why the driver is this shape:

- search and early stopping are Optuna's (a TPE sampler and the asynchronous
  successive-halving pruner, through its ask/tell interface), never
  hand-written; ASHA because it judges a trial against whatever others have
  reached the same step, so it prunes from the first wave of concurrent
  trials on and the last trials of a sweep do not hold the mesh alone;
- a trial is an ordinary recorded job (``meshtrain runs --sweep NAME`` lists
  them), pinned to its own group of ``--nodes-per-trial`` nodes, so the
  trials run concurrently and a node that finishes one gets the next at once;
- its intermediate values are the objective metric as the run store has it
  (the recorder writes every report there while the job runs), so pruning
  needs nothing from the script beyond `mesh.report(val_loss=...)`;
- the first trial to end tells whether the objective is ever reported: if
  not, the sweep stops and says which metrics the script does report,
  instead of running the rest blind.

The study lives in ``$MESHTRAIN_HOME/sweeps.sqlite`` (Optuna's RDB storage).
Launchers (launch.py) hide whether the jobs go to an in-process ``--local``
mesh or to this machine's agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshtrain.errors import UserError
from meshtrain.sweep.space import Param, trial_args

POLL_S = 0.25
SWEEP_EXTRA = "pip install 'meshtrain[sweep]'"


def new_sweep_name() -> str:
    return "s" + secrets.token_hex(3)


class TrialJob(Protocol):
    """A running trial as a launcher hands it back."""

    @property
    def run_id(self) -> str | None: ...

    def cancel(self, reason: str) -> None: ...

    async def wait(self) -> tuple[str, str | None]:
        """(state, message) once the job has ended."""
        ...


class Launcher(Protocol):
    nodes: list[str]

    async def start(self, args: list[str], nodes: list[str], options: dict[str, Any]) -> TrialJob: ...

    def metrics(self, run_id: str, key: str) -> list[tuple[int, float, float]]: ...

    def metric_keys(self, run_id: str) -> list[str]: ...

    async def settled(self, run_id: str) -> None:
        """Return once the trial's closed record is readable here (or after a short wait)."""
        ...


@dataclass
class TrialRecord:
    number: int
    params: dict[str, Any]
    nodes: list[str]
    run_id: str | None = None
    state: str = "running"  # running | complete | pruned | failed
    value: float | None = None
    message: str | None = None
    started: float = 0.0
    ended: float = 0.0
    reported: int = -1  # the highest step reported to Optuna


@dataclass
class SweepResult:
    name: str
    trials: list[TrialRecord]
    best: TrialRecord | None
    wall_s: float
    busy: float  # node-seconds with a trial / (nodes x wall)
    direction: str
    metric: str


@dataclass
class Sweep:
    name: str
    script_args: list[str]
    params: list[Param]
    metric: str
    direction: str
    trials: int
    nodes_per_trial: int = 1
    seed: int | None = 0
    storage: str | None = None
    base_options: dict[str, Any] = field(default_factory=dict)
    pass_args: bool = True
    on_event: Callable[[str], None] = print
    clock: Callable[[], float] = time.monotonic
    _start: float = 0.0

    def study(self) -> Any:
        try:
            import optuna
        except ImportError:
            raise UserError(f"sweeps need Optuna: {SWEEP_EXTRA}") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        startup = max(2, min(5, self.trials // 3))
        sampler = optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=startup)
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
        return optuna.create_study(
            study_name=self.name,
            storage=self.storage,
            direction=optuna.study.StudyDirection.MINIMIZE
            if self.direction == "minimize"
            else optuna.study.StudyDirection.MAXIMIZE,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )

    async def run(self, launcher: Launcher) -> SweepResult:
        from optuna.trial import TrialState

        study = self.study()
        dists = {p.name: p.distribution() for p in self.params}
        groups = _groups(launcher.nodes, self.nodes_per_trial)
        free = list(groups)
        running: dict[asyncio.Task[tuple[str, str | None]], tuple[Any, TrialRecord, TrialJob]] = {}
        records: list[TrialRecord] = []
        launched = 0
        first_end_checked = False
        start = self.clock()
        self._start = start
        self.on_event(
            f"sweep {self.name}: {self.trials} trials of {', '.join(p.describe() for p in self.params)} "
            f"on {len(groups)} group{'s' if len(groups) != 1 else ''} of {self.nodes_per_trial} node"
            f"{'s' if self.nodes_per_trial != 1 else ''}, {self.direction} {self.metric}"
        )
        try:
            while launched < self.trials or running:
                while free and launched < self.trials:
                    trial = study.ask(dists)
                    nodes = free.pop(0)
                    rec = TrialRecord(trial.number, dict(trial.params), nodes, started=self.clock())
                    options = {
                        **self.base_options,
                        "tracking": {
                            **(self.base_options.get("tracking") or {}),
                            "sweep": self.name,
                            "params": rec.params,
                            "name": f"{self.name}-t{trial.number}",
                        },
                    }
                    args = self.script_args + (trial_args(rec.params) if self.pass_args else [])
                    job = await launcher.start(args, nodes, options)
                    task = asyncio.ensure_future(job.wait())
                    running[task] = (trial, rec, job)
                    records.append(rec)
                    launched += 1
                    self._say(f"trial {rec.number} on {','.join(nodes)}: {_fmt_params(rec.params)}")
                done, _ = await asyncio.wait(
                    set(running), timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED
                )
                for trial, rec, job in running.values():  # intermediate values -> the pruner
                    if rec.state == "running" and job.run_id and self._report(launcher, trial, rec, job):
                        rec.state = "pruned"
                        job.cancel("pruned by the sweep")
                for task in done:
                    trial, rec, job = running.pop(task)
                    state, message = task.result()
                    rec.ended = self.clock()
                    rec.run_id = rec.run_id or job.run_id
                    free.append(rec.nodes)
                    if rec.run_id and rec.state != "pruned":
                        await launcher.settled(rec.run_id)
                    keys = launcher.metric_keys(rec.run_id) if rec.run_id else []
                    if rec.state == "pruned":
                        study.tell(trial, state=TrialState.PRUNED)
                        self._say(f"trial {rec.number} pruned at step {rec.reported} ({rec.run_id})")
                        continue
                    final = self._final(launcher, rec)
                    if state == "done" and final is not None:
                        rec.state, rec.value = "complete", final
                        study.tell(trial, final)
                        self._say(f"trial {rec.number} done: {self.metric} {final:.6g} ({rec.run_id})")
                    else:
                        rec.state = "failed"
                        rec.message = message if state != "done" else f"it never reported {self.metric}"
                        study.tell(trial, state=TrialState.FAIL)
                        self._say(f"trial {rec.number} {state}: {rec.message}")
                    if not first_end_checked:
                        first_end_checked = True
                        if state == "done" and self.metric not in keys:
                            have = ", ".join(k for k in keys) or "none"
                            raise UserError(
                                f"the script never reports the objective {self.metric!r} "
                                f"(trial {rec.number} reported: {have}); pass --objective METRIC:min|max"
                            )
                        if state == "failed":
                            raise UserError(f"the first trial failed ({rec.message}): fix the script first")
        finally:
            for _trial, rec, job in running.values():
                job.cancel("the sweep stopped")
                rec.state = "failed"
                rec.message = "the sweep stopped"
            for task in list(running):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 30.0)
        end = self.clock()
        wall = max(1e-9, end - start)
        busy = sum(max(0.0, r.ended - r.started) * len(r.nodes) for r in records) / (
            wall * max(1, len(groups) * self.nodes_per_trial)
        )
        complete = [r for r in records if r.state == "complete" and r.value is not None]
        sign = 1.0 if self.direction == "minimize" else -1.0
        best = min(complete, key=lambda r: sign * float(r.value or 0.0)) if complete else None
        return SweepResult(self.name, records, best, wall, busy, self.direction, self.metric)

    def _say(self, line: str) -> None:
        self.on_event(f"  {self.clock() - self._start:6.1f}s  {line}")

    def _report(self, launcher: Launcher, trial: Any, rec: TrialRecord, job: TrialJob) -> bool:
        """Give Optuna the trial's new intermediate values; True when it says prune."""
        rec.run_id = job.run_id
        series = launcher.metrics(str(job.run_id), self.metric)
        fresh = [(step, value) for step, _, value in series if step > rec.reported and math.isfinite(value)]
        for step, value in fresh:
            trial.report(value, step)
            rec.reported = step
        return bool(fresh) and bool(trial.should_prune())

    def _final(self, launcher: Launcher, rec: TrialRecord) -> float | None:
        if not rec.run_id:
            return None
        series = launcher.metrics(rec.run_id, self.metric)
        return series[-1][2] if series else None


def _groups(nodes: Sequence[str], per: int) -> list[list[str]]:
    if per < 1:
        raise UserError("--nodes-per-trial must be at least 1")
    if len(nodes) < per:
        raise UserError(f"--nodes-per-trial {per} needs {per} nodes; the mesh has {len(nodes)}")
    return [list(nodes[i : i + per]) for i in range(0, len(nodes) - per + 1, per)]


def _fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def summary_table(result: SweepResult) -> Any:
    from rich.table import Table

    keys = sorted({k for r in result.trials for k in r.params})
    table = Table(
        title=(
            f"sweep {result.name}: {len(result.trials)} trials in {result.wall_s:.1f}s, "
            f"nodes busy {result.busy * 100:.0f}% of the time"
        ),
        title_justify="left",
    )
    for col in ("trial", "run", "nodes", *keys, result.metric, "state"):
        table.add_column(col, justify="right" if col in (*keys, result.metric) else "left", no_wrap=True)
    order = sorted(
        result.trials,
        key=lambda r: (
            r.value is None,
            (r.value if result.direction == "minimize" else -r.value) if r.value is not None else 0.0,
        ),
    )
    for r in order:
        mark = " ★" if result.best is not None and r.number == result.best.number else ""
        table.add_row(
            f"{r.number}{mark}",
            r.run_id or "—",
            ",".join(r.nodes),
            *(_cell(r.params.get(k)) for k in keys),
            _cell(r.value),
            r.state + (f": {r.message}" if r.message and r.state == "failed" else ""),
        )
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
