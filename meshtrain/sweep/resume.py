"""A sweep that outlives its submitter: its spec and live table on disk, its trials from the run store.

Why the study is rebuilt from the recorded runs rather than kept in an Optuna
storage file: the run store is what the mesh already keeps. Every trial is a
recorded run tagged with the sweep (``runs.sweep``) and named ``NAME-tK``,
with its arguments, parameters, state, exit reason and every reported value,
and the recorders copy each record to the trial's nodes and its origin while
it runs (meshtrain.tracking). An Optuna SQLite or journal file would be one
more file on the submitting node only -- gone with it -- unless something
copied it around, which the run store already does. So ``sweep --resume
NAME`` reads the runs of the sweep from this node's store, tells a fresh
in-memory Optuna study the finished ones (values and intermediate values, so
TPE and the pruner see them as before), and runs again the trials that were
cut short, with their own values, from their newest checkpoints.

What the records lack is the sweep's own definition (the search space, the
objective, how many trials): that is the command line, kept here in
``$MESHTRAIN_HOME/sweeps/NAME.json`` with the live table (the dashboard's
data). On the node that submitted the sweep ``--resume NAME`` alone finds it;
elsewhere give the same command again with ``--resume NAME`` added (the
sweep's first line prints it).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from meshtrain.errors import UserError
from meshtrain.sweep.outcome import Recorded, recorded
from meshtrain.sweep.space import Param

SWEEPS_DIR = "sweeps"


def sweeps_dir(home: Path) -> Path:
    return home / SWEEPS_DIR


def sweep_file(home: Path, name: str) -> Path:
    return sweeps_dir(home) / f"{name}.json"


def trial_run_name(sweep: str, number: int) -> str:
    """A trial's run name, which is also the name its checkpoints are filed under."""
    return f"{sweep}-t{number}"


@dataclass
class SweepSpec:
    """What the user asked for: enough to run the sweep again from its records."""

    script: str
    params: list[str]  # the --param texts
    objective: str
    trials: int
    nodes_per_trial: int = 1
    script_args: list[str] = field(default_factory=list)
    seed: int | None = 0
    config_only: bool = False
    checkpoint_every: str | None = None
    local: int | None = None

    def command(self, name: str) -> str:
        """The `meshtrain sweep` line that resumes this sweep on any node."""
        import shlex

        parts = ["meshtrain", "sweep", self.script]
        for p in self.params:
            parts += ["--param", p]
        parts += ["--trials", str(self.trials), "--objective", self.objective]
        if self.nodes_per_trial != 1:
            parts += ["--nodes-per-trial", str(self.nodes_per_trial)]
        if self.script_args:
            parts += ["--args", shlex.join(self.script_args)]
        if self.checkpoint_every:
            parts += ["--checkpoint-every", self.checkpoint_every]
        if self.config_only:
            parts.append("--config-only")
        if self.local is not None:
            parts += ["--local", str(self.local)]
        if self.seed != 0:
            parts += ["--seed", str(self.seed)]
        return shlex.join(parts + ["--resume", name])

    @staticmethod
    def from_dict(data: dict[str, Any]) -> SweepSpec:
        known = set(SweepSpec.__dataclass_fields__)
        return SweepSpec(**{k: v for k, v in data.items() if k in known})


def write_sweep_file(path: Path, data: dict[str, Any]) -> None:
    """Atomically: the dashboard may read it while the sweep writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_sweep_file(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_spec(home: Path, name: str) -> SweepSpec | None:
    data = read_sweep_file(sweep_file(home, name))
    spec = (data or {}).get("spec")
    return SweepSpec.from_dict(spec) if isinstance(spec, dict) else None


def sweep_tables(home: Path) -> list[dict[str, Any]]:
    """Every sweep's live table on this node, newest first: what the dashboard shows."""
    found = []
    directory = sweeps_dir(home)
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        data = read_sweep_file(path)
        if data is not None and isinstance(data.get("trials"), list):
            found.append(data)
    return sorted(found, key=lambda d: -float(d.get("updated") or 0))


@dataclass
class Prior:
    """A trial of the sweep as its records have it."""

    number: int
    params: dict[str, Any]
    verdict: Recorded
    value: float | None
    intermediate: dict[int, float]
    run_ids: list[str]
    state: str
    reason: str | None
    nodes: list[str] = field(default_factory=list)  # where its newest run was pinned


_TRIAL = re.compile(r"-t(\d+)$")


def prior_trials(stores: Iterable[Any], sweep: str, params: Sequence[Param], metric: str) -> list[Prior]:
    """The sweep's trials from the run stores given (each run once; a trial's newest run decides)."""
    names = [p.name for p in params]
    runs: dict[str, Any] = {}
    series: dict[str, list[tuple[int, float, float]]] = {}
    for store in stores:
        for run in store.runs(sweep=sweep):
            held = runs.get(run.id)
            if held is None or run.updated > held.updated:
                runs[run.id] = run
            got = store.series(run.id, metric)
            if len(got) > len(series.get(run.id, [])):
                series[run.id] = got
    by_number: dict[int, list[Any]] = {}
    for run in runs.values():
        m = _TRIAL.search(run.name)
        if m is None or run.name != trial_run_name(sweep, int(m.group(1))):
            continue
        by_number.setdefault(int(m.group(1)), []).append(run)
    out = []
    for number, attempts in sorted(by_number.items()):
        attempts.sort(key=lambda r: (r.started, r.id))
        newest = attempts[-1]
        values = {n: newest.params[n] for n in names if n in newest.params}
        if len(values) != len(names):
            continue  # a record without the trial's values: nothing to tell Optuna (asked afresh)
        intermediate: dict[int, float] = {}
        for run in attempts:
            for step, _, value in series.get(run.id, []):
                if math.isfinite(value):
                    intermediate[step] = value
        last = series.get(newest.id) or []
        final = last[-1][2] if last and math.isfinite(last[-1][2]) else None
        verdict = recorded(newest.state, newest.reason, final)
        out.append(
            Prior(
                number=number,
                params=values,
                verdict=verdict,
                value=final,
                intermediate=intermediate,
                run_ids=[r.id for r in attempts],
                state=newest.state,
                reason=newest.reason,
                nodes=[n for n in str(newest.options.get("nodes") or "").split(",") if n],
            )
        )
    return out


def table_data(
    name: str, spec: SweepSpec | None, state: str, rows: list[Any], **extra: Any
) -> dict[str, Any]:
    """The sweep's file: its spec (for --resume) and its live table (for the dashboard)."""
    return {
        "name": name,
        "state": state,  # running | done | stopped
        "updated": time.time(),
        "spec": asdict(spec) if spec is not None else None,
        "trials": rows,
        **extra,
    }


def check_prior_space(priors: list[Prior], params: Sequence[Param]) -> None:
    """A recorded value outside the space given now: the command is not the sweep's (one line)."""
    for prior in priors:
        for p in params:
            value = prior.params.get(p.name)
            if p.kind == "choice":
                ok = value in p.choices
            else:
                ok = isinstance(value, (int, float)) and p.low <= float(value) <= p.high
            if not ok:
                raise UserError(
                    f"--resume: trial {prior.number} has {p.name}={value!r}, outside {p.describe()}: "
                    "give the sweep's own --param values"
                )
