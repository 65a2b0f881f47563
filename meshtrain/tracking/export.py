"""`meshtrain runs export RUN --format csv|jsonl|tensorboard`: a run's metrics for other tools.

csv and jsonl carry every stored row (run, step, time, worker, metric, value): what was
reported, per worker, nothing averaged away. The tensorboard export writes one event file
of scalars (per step, the mean over the workers, as `runs show` charts them) plus the run's
settings as text, through tensorboardX (the `meshtrain[track]` extra), so `tensorboard
--logdir` and tensorboard's own event reader see it like any other run.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import IO, Any

from meshtrain.errors import UserError
from meshtrain.tracking.store import Run, RunStore

FORMATS = ("csv", "jsonl", "tensorboard")
FIELDS = ("run", "step", "time", "member", "metric", "value")
TRACK_EXTRA = "pip install 'meshtrain[track]'"


def rows(store: RunStore, run: Run) -> list[dict[str, Any]]:
    return [
        {"run": run.id, "step": r.step, "time": r.t, "member": r.member, "metric": r.key, "value": r.value}
        for r in store.metrics(run.id)
    ]


def write_csv(store: RunStore, run: Run, out: IO[str]) -> int:
    writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    data = rows(store, run)
    writer.writerows(data)
    return len(data)


def write_jsonl(store: RunStore, run: Run, out: IO[str]) -> int:
    data = rows(store, run)
    for row in data:
        out.write(json.dumps(row) + "\n")
    return len(data)


def write_tensorboard(store: RunStore, run: Run, logdir: Path) -> Path:
    """One event file under `logdir`; the file's path."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise UserError(f"the tensorboard export needs tensorboardX: {TRACK_EXTRA}") from None
    logdir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(logdir=str(logdir), filename_suffix=f".{run.id}")
    try:
        settings = {"script": run.script, "args": run.args, "params": run.params, "options": run.options}
        writer.add_text("run", f"{run.id} {run.name}: " + json.dumps(settings, sort_keys=True), 0)
        for key in store.metric_keys(run.id):
            for step, t, value in store.series(run.id, key):
                writer.add_scalar(key, value, global_step=step, walltime=t)
    finally:
        writer.close()
    files = sorted(logdir.glob(f"events.out.tfevents.*.{run.id}"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else logdir


def export(store: RunStore, run: Run, fmt: str, output: str | None) -> str:
    """Write the export; a one-line description of what was written where."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "tensorboard":
        logdir = Path(output or f"tb-{run.name}-{run.id}")
        path = write_tensorboard(store, run, logdir)
        return f"wrote {path} (view it: tensorboard --logdir {logdir})"
    writer = write_csv if fmt == "csv" else write_jsonl
    if output in (None, "-"):
        writer(store, run, sys.stdout)
        return ""
    try:
        with open(output, "w", newline="") as fh:
            n = writer(store, run, fh)
    except OSError as exc:
        raise UserError(f"cannot write {output}: {exc.strerror or exc}") from None
    return f"wrote {n} metric rows of run {run.id} to {output}"
