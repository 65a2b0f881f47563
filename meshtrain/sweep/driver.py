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

A trial whose node was lost is run again on another node, from its newest
checkpoint (``--checkpoint-every``: the trial's checkpoints are filed under
its run name ``NAME-tK``, so a retry's ``--resume`` finds them wherever the
mesh replicated them), at most twice; a trial the script ended is a failed
trial (outcome.py draws that line, unit-tested). A trial given up because
every node of it left the mesh has its job cancelled through the mesh (the
``mesh.cancel`` that ``meshtrain cancel JOB`` sends; its coordinator would
otherwise keep it paused for ever), best effort. The study is an in-memory
Optuna study: ``sweep --resume`` rebuilds it from the sweep's recorded runs
(resume.py says why that, and not an Optuna storage file), and the live table
goes to ``$MESHTRAIN_HOME/sweeps/NAME.json`` on every event.
Launchers (launch.py) hide whether the jobs go to an in-process ``--local``
mesh or to this machine's agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from meshtrain.errors import UserError
from meshtrain.sweep.outcome import LOST, MAX_RETRIES, PRUNED_REASON, STOPPED_REASON, decide
from meshtrain.sweep.resume import Prior, SweepSpec, table_data, trial_run_name, write_sweep_file
from meshtrain.sweep.space import Param, trial_args

POLL_S = 0.25
LIVENESS_S = 1.0  # how often running trials' nodes are looked up
LOST_GRACE_S = 5.0  # a trial none of whose nodes has been alive this long is lost (see _watch_nodes)
SWEEP_EXTRA = "pip install 'meshtrain[sweep]'"
MESH_CANCEL_S = 10.0  # how long one abandoned job's mesh-wide cancel may take (it runs beside the sweep)
ABANDONED_REASON = "its nodes left the mesh"  # the job's record: "cancelled: ... (by the sweep)"

log = logging.getLogger("meshtrain.sweep")


def new_sweep_name() -> str:
    return "s" + secrets.token_hex(3)


class TrialJob(Protocol):
    """A running trial as a launcher hands it back."""

    @property
    def run_id(self) -> str | None: ...

    def cancel(self, reason: str) -> None: ...

    def abandon(self) -> None:
        """Stop following the job (its nodes are gone: the coordinator keeps it waiting for them)."""
        ...

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

    async def live_nodes(self) -> list[str]:
        """The nodes alive in the mesh now (a trial's group with a node gone gets no more trials)."""
        ...


@dataclass
class TrialRecord:
    number: int  # the sweep's own number (``NAME-tK``), kept across retries and resumes
    params: dict[str, Any]
    nodes: list[str]
    run_id: str | None = None
    state: str = "running"  # running | complete | pruned | failed
    value: float | None = None
    message: str | None = None
    started: float = 0.0
    ended: float = 0.0
    reported: int = -1  # the highest step reported to Optuna
    retries: int = 0  # runs again after a lost node
    runs: list[str] = field(default_factory=list)  # every attempt's run id, oldest first
    resume: bool = False  # the next attempt continues from the trial's newest checkpoint
    busy_s: float = 0.0  # node-seconds of its attempts this sweep
    gone_since: float | None = None  # when the sweep last saw none of its nodes alive

    def row(self) -> dict[str, Any]:
        """One row of the sweep's live table (the dashboard's data)."""
        return {
            "trial": self.number,
            "run": self.run_id,
            "runs": list(self.runs),
            "nodes": list(self.nodes),
            "params": dict(self.params),
            "value": self.value,
            "state": self.state,
            "retries": self.retries,
            "message": self.message,
            "step": self.reported if self.reported >= 0 else None,
        }


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
    checkpoint_every: str | None = None  # each trial's --checkpoint-every: what a retry resumes from
    max_retries: int = MAX_RETRIES
    priors: list[Prior] = field(default_factory=list)  # sweep --resume: the trials the records hold
    table_path: Path | None = None  # where the live table goes (resume.py)
    spec: SweepSpec | None = None
    _start: float = 0.0
    _records: list[TrialRecord] = field(default_factory=list)
    _cancels: set[asyncio.Task[None]] = field(default_factory=set)  # abandoned jobs' mesh-wide cancels

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

    def _tell_priors(self, study: Any, dists: dict[str, Any]) -> list[tuple[TrialRecord, dict[int, float]]]:
        """sweep --resume: the finished trials told to Optuna as they ended; the others queued to run."""
        import optuna
        from optuna.trial import TrialState

        unfinished: list[tuple[TrialRecord, dict[int, float]]] = []
        for prior in self.priors:
            rec = TrialRecord(prior.number, dict(prior.params), list(prior.nodes), run_id=prior.run_ids[-1])
            rec.runs = list(prior.run_ids)
            rec.value = prior.value if prior.verdict == "complete" else None
            if prior.intermediate:
                rec.reported = max(prior.intermediate)
            if prior.verdict == "unfinished":
                rec.state, rec.resume = "queued", True
                unfinished.append((rec, dict(prior.intermediate)))
                self._records.append(rec)
                continue
            state = {
                "complete": TrialState.COMPLETE,
                "pruned": TrialState.PRUNED,
                "fail": TrialState.FAIL,
            }[prior.verdict]
            rec.state = {"complete": "complete", "pruned": "pruned", "fail": "failed"}[prior.verdict]
            rec.message = prior.reason if prior.verdict == "fail" else None
            study.add_trial(
                optuna.trial.create_trial(
                    params=rec.params,
                    distributions=dists,
                    value=rec.value,
                    intermediate_values=dict(prior.intermediate),
                    state=state,
                )
            )
            self._records.append(rec)
        return unfinished

    async def run(self, launcher: Launcher) -> SweepResult:
        study = self.study()
        dists = {p.name: p.distribution() for p in self.params}
        groups = _groups(launcher.nodes, self.nodes_per_trial)
        free = list(groups)
        running: dict[asyncio.Task[tuple[str, str | None]], tuple[Any, TrialRecord, TrialJob]] = {}
        queue: list[tuple[Any, TrialRecord]] = []  # trials to run again: retries, a resume's unfinished
        for rec, intermediate in self._tell_priors(study, dists):
            study.enqueue_trial(rec.params, skip_if_exists=False)
            trial = study.ask(dists)
            for step, value in sorted(intermediate.items()):  # what its earlier attempts reported
                trial.report(value, step)
            queue.append((trial, rec))
        records = self._records
        budget = max(0, self.trials - len(records))  # new trials still to ask for
        next_number = max((r.number for r in records), default=-1) + 1
        first_end_checked = any(r.state == "complete" for r in records)
        start = self.clock()
        self._start = start
        done_before = sum(1 for r in records if r.state != "queued")
        self.on_event(
            f"sweep {self.name}: {self.trials} trials of {', '.join(p.describe() for p in self.params)} "
            f"on {len(groups)} group{'s' if len(groups) != 1 else ''} of {self.nodes_per_trial} node"
            f"{'s' if self.nodes_per_trial != 1 else ''}, {self.direction} {self.metric}"
            + (f" (resumed: {done_before} ended, {len(queue)} to run again)" if self.priors else "")
        )
        if self.spec is not None and not self.priors:
            self.on_event(f"resume it with: {self.spec.command(self.name)}")
        self._write_table("running")
        stopped = True
        next_liveness = self.clock() + LIVENESS_S
        try:
            while budget > 0 or queue or running:
                if free and (budget > 0 or queue):
                    live = set(await launcher.live_nodes())
                    gone = [g for g in free if not set(g) <= live]
                    for g in gone:
                        free.remove(g)
                        self._say(f"nodes {','.join(g)} left the mesh: no more trials there")
                if not free and not running and (budget > 0 or queue):
                    raise UserError("no live node is left to run the sweep's trials on")
                while free and (budget > 0 or queue):
                    if queue:
                        trial, rec = queue.pop(0)
                        nodes = _pick(free, avoid=rec.nodes)
                        rec.nodes, rec.state, rec.started = nodes, "running", self.clock()
                    else:
                        trial = study.ask(dists)
                        nodes = _pick(free, avoid=[])
                        rec = TrialRecord(next_number, dict(trial.params), nodes, started=self.clock())
                        next_number += 1
                        budget -= 1
                        records.append(rec)
                    job = await launcher.start(self._args(rec), nodes, self._options(rec))
                    task = asyncio.ensure_future(job.wait())
                    running[task] = (trial, rec, job)
                    again = f" (again, {'from its newest checkpoint' if rec.resume else 'from the start'})"
                    self._say(
                        f"trial {rec.number} on {','.join(nodes)}: {_fmt_params(rec.params)}"
                        + (again if rec.runs else "")
                    )
                done, _ = await asyncio.wait(
                    set(running), timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED
                )
                for trial, rec, job in running.values():  # intermediate values -> the pruner
                    if rec.state == "running" and job.run_id and self._report(launcher, trial, rec, job):
                        rec.state = "pruned"
                        job.cancel(PRUNED_REASON)
                ended = [(task, *task.result()) for task in done]
                if running and self.clock() >= next_liveness:
                    next_liveness = self.clock() + LIVENESS_S
                    ended += await self._watch_nodes(launcher, running, set(done))
                for task, state, message in ended:
                    trial, rec, job = running.pop(task)
                    first_end_checked = await self._ended(
                        launcher, study, trial, rec, job, state, message, queue, first_end_checked
                    )
                    free.append(rec.nodes)
                    self._write_table("running")
            stopped = False
        finally:
            for _trial, rec, job in running.values():
                job.cancel(STOPPED_REASON)
                rec.state = "failed"
                rec.message = STOPPED_REASON
            for task in list(running):
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(task, 30.0)
            await self.cancels_sent()
            if stopped:
                self._write_table("stopped")
        end = self.clock()
        wall = max(1e-9, end - start)
        busy = sum(r.busy_s for r in records) / (wall * max(1, len(groups) * self.nodes_per_trial))
        result = SweepResult(self.name, records, self.best(), wall, busy, self.direction, self.metric)
        self._write_table("done")
        return result

    async def _watch_nodes(
        self,
        launcher: Launcher,
        running: dict[asyncio.Task[tuple[str, str | None]], tuple[Any, TrialRecord, TrialJob]],
        done: set[asyncio.Task[tuple[str, str | None]]],
    ) -> list[tuple[asyncio.Task[tuple[str, str | None]], str, str]]:
        """Trials whose every node has left the mesh, as lost attempts.

        A job whose only nodes are unreachable is not failed by its coordinator: it cannot tell a dead
        node from a partition, so it waits for a quorum to come back, for ever (meshtrain.agent.jobs,
        has_quorum). A sweep has other nodes to use, so after LOST_GRACE_S with none of a trial's
        nodes alive it stops waiting, cancels the job (best effort) and counts the attempt as lost.
        """
        live = set(await launcher.live_nodes())
        now = self.clock()
        lost = []
        for task, (_trial, rec, job) in running.items():
            if task in done or rec.state != "running":
                continue
            if set(rec.nodes) & live:
                rec.gone_since = None
                continue
            rec.gone_since = rec.gone_since if rec.gone_since is not None else now
            if now - rec.gone_since >= LOST_GRACE_S:
                rec.gone_since = None
                job.cancel(ABANDONED_REASON)
                job.abandon()
                task.cancel()
                if job.run_id:
                    cancel = asyncio.ensure_future(self._cancel_abandoned(launcher, rec.number, job.run_id))
                    self._cancels.add(cancel)
                    cancel.add_done_callback(self._cancels.discard)
                names = ",".join(rec.nodes)
                lost.append((task, "failed", f"{LOST}: {names} left the mesh (the sweep stopped waiting)"))
        return lost

    async def _cancel_abandoned(self, launcher: Launcher, number: int, job: str) -> None:
        """Cancel a given-up trial's job wherever the mesh coordinates it; a failure is one log line.

        The job's own stream (``job.cancel`` above) reaches only the agent this sweep talks to, and the
        connection is closed at once; the mesh-wide cancel finds the job's coordinator on any node.
        """
        try:
            why = f"{ABANDONED_REASON} (by the sweep)"
            note = await asyncio.wait_for(mesh_cancel(launcher, job, why), MESH_CANCEL_S)
        except Exception as exc:  # noqa: BLE001 - best effort: the sweep goes on either way
            why = str(exc) or exc.__class__.__name__
            log.warning(
                "sweep %s: could not cancel trial %d's abandoned job %s: %s", self.name, number, job, why
            )
            return
        if note:
            log.info("sweep %s: trial %d's abandoned job: %s", self.name, number, note)

    async def cancels_sent(self, timeout: float = MESH_CANCEL_S) -> None:
        """Wait (bounded) for the abandoned jobs' cancels still on their way (before the sweep returns)."""
        if self._cancels:
            await asyncio.wait(set(self._cancels), timeout=timeout)

    def best(self) -> TrialRecord | None:
        complete = [r for r in self._records if r.state == "complete" and r.value is not None]
        sign = 1.0 if self.direction == "minimize" else -1.0
        return min(complete, key=lambda r: sign * float(r.value or 0.0)) if complete else None

    def _args(self, rec: TrialRecord) -> list[str]:
        return self.script_args + (trial_args(rec.params) if self.pass_args else [])

    def _options(self, rec: TrialRecord) -> dict[str, Any]:
        """The trial's job options: its record's tags, and checkpoints filed under the trial's run name."""
        run = trial_run_name(self.name, rec.number)
        options: dict[str, Any] = {
            **self.base_options,
            "tracking": {
                **(self.base_options.get("tracking") or {}),
                "sweep": self.name,
                "params": rec.params,
                "name": run,
            },
        }
        if self.checkpoint_every:
            options.update(checkpoint_every=self.checkpoint_every, run=run)
            if rec.resume:
                options["resume"] = True
        return options

    async def _ended(
        self,
        launcher: Launcher,
        study: Any,
        trial: Any,
        rec: TrialRecord,
        job: TrialJob,
        state: str,
        message: str | None,
        queue: list[tuple[Any, TrialRecord]],
        first_end_checked: bool,
    ) -> bool:
        """One attempt ended: tell Optuna, queue a retry, or stop the sweep (the first trial's checks)."""
        from optuna.trial import TrialState

        rec.ended = self.clock()
        rec.busy_s += max(0.0, rec.ended - rec.started) * len(rec.nodes)
        rec.run_id = job.run_id or rec.run_id
        if rec.run_id and rec.run_id not in rec.runs:
            rec.runs.append(rec.run_id)
        pruned = rec.state == "pruned"
        if rec.run_id and not pruned:
            await launcher.settled(rec.run_id)
        keys = launcher.metric_keys(rec.run_id) if rec.run_id else []
        final = None if pruned else self._final(launcher, rec)
        decision = decide(
            state, message, pruned=pruned, value=final, retries=rec.retries, max_retries=self.max_retries
        )
        if decision == "retry":
            rec.retries += 1
            rec.state, rec.message = "queued", message
            rec.resume = bool(self.checkpoint_every)
            queue.insert(0, (trial, rec))
            self._say(
                f"trial {rec.number} lost its node ({message}); retry {rec.retries}/{self.max_retries} "
                f"on another node, {'from its newest checkpoint' if rec.resume else 'from the start'}"
            )
            return first_end_checked
        if decision == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
            self._say(f"trial {rec.number} pruned at step {rec.reported} ({rec.run_id})")
            return first_end_checked
        if decision == "complete" and final is not None:
            rec.state, rec.value, rec.message = "complete", final, None
            study.tell(trial, final)
            self._say(f"trial {rec.number} done: {self.metric} {final:.6g} ({rec.run_id})")
        else:
            rec.state = "failed"
            rec.message = message if decision == "fail" else f"it never reported {self.metric}"
            study.tell(trial, state=TrialState.FAIL)
            self._say(f"trial {rec.number} {state}: {rec.message}")
        if not first_end_checked:
            if decision == "unreported" and self.metric not in keys:
                have = ", ".join(k for k in keys) or "none"
                raise UserError(
                    f"the script never reports the objective {self.metric!r} "
                    f"(trial {rec.number} reported: {have}); pass --objective METRIC:min|max"
                )
            if decision == "fail" and state == "failed":
                raise UserError(f"the first trial failed ({rec.message}): fix the script first")
        return True

    def _write_table(self, state: str, **extra: Any) -> None:
        if self.table_path is None:
            return
        best = self.best()
        data = table_data(
            self.name,
            self.spec,
            state,
            [r.row() for r in sorted(self._records, key=lambda r: r.number)],
            metric=self.metric,
            direction=self.direction,
            best=best.number if best else None,
            **extra,
        )
        with contextlib.suppress(OSError):
            write_sweep_file(self.table_path, data)

    def _say(self, line: str) -> None:
        self.on_event(f"  {self.clock() - self._start:6.1f}s  {line}")
        self._write_table("running")

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


async def mesh_cancel(launcher: Launcher, job: str, reason: str) -> str | None:
    """Cancel `job` on every node, as `meshtrain cancel JOB` does; the agent's one-line answer.

    A launcher may do it itself (``mesh_cancel(job, reason)``); one that talks to this machine's agent
    (``socket``) sends the agent's ``mesh.cancel`` control op; an in-process ``--local`` mesh has no
    other coordinator than its runner, which the trial's own cancel already reached (None).
    """
    own = getattr(launcher, "mesh_cancel", None)
    if own is not None:
        return str(await own(job, reason) or "")
    socket = getattr(launcher, "socket", None)
    if socket is None:
        return None
    from meshtrain.agent.control import call

    reply = await call(Path(socket), "mesh.cancel", job=job, reason=reason)
    return str(reply.get("message") or f"cancelling job {job}")


def _pick(free: list[list[str]], avoid: list[str]) -> list[str]:
    """A free group, one without the nodes of the trial's last attempt when there is one."""
    for group in free:
        if not set(group) & set(avoid):
            free.remove(group)
            return group
    return free.pop(0)


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
