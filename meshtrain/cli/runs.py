"""`meshtrain runs [show|compare|export|rm]`: the runs recorded on this node (meshtrain.tracking).

Reads this node's run store directly (``$MESHTRAIN_HOME/runs.sqlite``), so it works with or
without an agent running; the agent writes the same file while jobs run (SQLite WAL lets both).
"""

from __future__ import annotations

import argparse
import json
import operator
import re
import sys
from typing import Any

from meshtrain.errors import UserError

__all__ = ["add_parser", "parse_metric_filter"]

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "=": operator.eq}
_FILTER = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s*(<=|>=|<|>|=)\s*([-+0-9.eE]+|nan|inf)\s*$")


def parse_metric_filter(text: str) -> tuple[str, str, float]:
    """``loss<0.5`` -> ("loss", "<", 0.5); UserError for anything else."""
    match = _FILTER.match(text)
    if not match:
        raise UserError(f"--metric {text!r}: write it as NAME<VALUE (or <=, >, >=, =), e.g. loss<0.5")
    return match.group(1), match.group(2), float(match.group(3))


def add_parser(sub: Any) -> None:
    runs = sub.add_parser("runs", help="the recorded runs: list, show, compare, export, rm")
    runs.add_argument("--name", metavar="GLOB", help="only runs whose name matches (mnist*)")
    runs.add_argument("--state", choices=("running", "done", "failed", "cancelled", "waiting", "starting"))
    runs.add_argument("--sweep", metavar="SWEEP", help="only the trials of this sweep")
    runs.add_argument(
        "--metric", action="append", default=[], metavar="NAME<VALUE", help="final metric filter (repeatable)"
    )
    runs.add_argument("--json", action="store_true", help="print the runs as JSON")
    runs.set_defaults(handler=list_command)
    verbs = runs.add_subparsers(dest="runs_command", parser_class=type(runs))
    show = verbs.add_parser("show", help="one run: settings, final metrics, a chart of its loss")
    show.add_argument("run", metavar="RUN", help="run id (or a unique prefix) or name (its newest run)")
    show.add_argument(
        "--metric", action="append", default=[], metavar="NAME", help="chart these metrics (default: loss)"
    )
    show.add_argument("--json", action="store_true", help="print the record as JSON")
    show.set_defaults(handler=show_command)
    cmp_ = verbs.add_parser("compare", help="runs side by side: the settings that differ, final metrics")
    cmp_.add_argument("runs", nargs="+", metavar="RUN")
    cmp_.set_defaults(handler=compare_command)
    ex = verbs.add_parser("export", help="a run's metrics as csv, jsonl or a tensorboard event file")
    ex.add_argument("run", metavar="RUN")
    ex.add_argument("--format", default="csv", choices=("csv", "jsonl", "tensorboard"))
    ex.add_argument("-o", "--output", metavar="PATH", help="file (csv/jsonl; default stdout) or log dir")
    ex.set_defaults(handler=export_command)
    rm = verbs.add_parser("rm", help="delete runs' records from this node")
    rm.add_argument("runs", nargs="+", metavar="RUN")
    rm.add_argument("--force", action="store_true", help="also a run still recorded as running")
    rm.set_defaults(handler=rm_command)


def _store(create: bool = False) -> Any:
    from meshtrain.tracking.store import RunStore, runs_db_path

    path = runs_db_path()
    if not path.exists() and not create:
        return None
    return RunStore(path)


def _console() -> Any:
    from rich.console import Console

    return Console()


def list_command(args: argparse.Namespace) -> int:
    filters = [parse_metric_filter(text) for text in args.metric]
    store = _store()
    if store is None:
        if args.json:
            print("[]")
        else:
            print("no runs recorded on this node yet (they are, from the first `meshtrain run`)")
        return 0
    runs = store.runs(name=args.name, state=args.state, sweep=args.sweep)
    finals = [store.final_metrics(r.id) for r in runs]
    keep = [
        (r, f)
        for r, f in zip(runs, finals, strict=True)
        if all(key in f and _OPS[op](f[key], value) for key, op, value in filters)
    ]
    if args.json:
        json.dump([{**r.__dict__, "final": f} for r, f in keep], sys.stdout, indent=1, default=str)
        print()
        return 0
    if not keep:
        print("no runs match" if (runs or filters) else "no runs recorded on this node yet")
        return 0
    from meshtrain.tracking.views import run_table

    _console().print(run_table([r for r, _ in keep], [f for _, f in keep]))
    return 0


def _need_store() -> Any:
    store = _store()
    if store is None:
        raise UserError("no runs recorded on this node yet")
    return store


def _tags_of(store: Any, run_id: str) -> list[str]:
    return [f"{name} ({ckpt}@{step})" for name, run, ckpt, step, _ in store.tags() if run == run_id]


def show_command(args: argparse.Namespace) -> int:
    store = _need_store()
    run = store.resolve(args.run)
    finals = store.final_metrics(run.id)
    if args.json:
        record = {**run.__dict__, "final": finals, "tags": _tags_of(store, run.id)}
        json.dump(record, sys.stdout, indent=1, default=str)
        print()
        return 0
    keys = args.metric or [k for k in ("loss", "val_loss") if k in finals][:1]
    unknown = [k for k in keys if k not in finals]
    if args.metric and unknown:
        have = ", ".join(store.metric_keys(run.id)) or "none"
        raise UserError(f"run {run.id} has no metric {unknown[0]!r} (it has: {have})")
    from meshtrain.tracking.views import show

    _console().print(show(run, finals, {k: store.series(run.id, k) for k in keys}, _tags_of(store, run.id)))
    return 0


def compare_command(args: argparse.Namespace) -> int:
    store = _need_store()
    runs = [store.resolve(text) for text in args.runs]
    if len({r.id for r in runs}) < 2:
        raise UserError("compare needs at least two different runs")
    from meshtrain.tracking.views import compare

    finals = [store.final_metrics(r.id) for r in runs]
    _console().print(compare(runs, finals, [_tags_of(store, r.id) for r in runs]))
    return 0


def export_command(args: argparse.Namespace) -> int:
    store = _need_store()
    run = store.resolve(args.run)
    from meshtrain.tracking.export import export

    message = export(store, run, args.format, args.output)
    if message:
        print(message, file=sys.stderr)
    return 0


def rm_command(args: argparse.Namespace) -> int:
    store = _need_store()
    runs = [store.resolve(text) for text in args.runs]
    for run in runs:
        if run.state == "running" and not args.force:
            raise UserError(f"run {run.id} is recorded as running: add --force to delete its record")
    for run in runs:
        store.remove(run.id)
        print(f"deleted the record of run {run.id} ({run.name}) on this node")
    return 0
