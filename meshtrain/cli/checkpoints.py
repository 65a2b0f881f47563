"""`meshtrain checkpoints [RUN]` and `meshtrain export RUN[@STEP] PATH`: model versions on this node.

Both read this node's store only (no agent needed): what is listed is what
could be resumed or exported here. Mistakes are `UserError` one-liners.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshtrain.errors import UserError

# The store pulls in MLX: it is imported only when a handler runs, so `meshtrain --help` stays fast.
if TYPE_CHECKING:
    from meshtrain.checkpoints.store import CheckpointInfo, CheckpointStore

__all__ = ["add_parser", "checkpoints_command", "export_command"]


def add_parser(sub: Any) -> None:
    """Register both subcommands on the CLI's subparsers object (`build_parser`'s ``sub``)."""
    ck = sub.add_parser("checkpoints", help="list runs, or the complete checkpoints of RUN, on this node")
    ck.add_argument("run", nargs="?", metavar="RUN")
    ck.add_argument("--keep", type=int, metavar="N", help="with RUN: delete all but the N newest checkpoints")
    ck.add_argument("--json", action="store_true", help="print the listing as JSON")
    ck.set_defaults(handler=checkpoints_command)
    ex = sub.add_parser("export", help="write a checkpoint's model parameters as one safetensors file")
    ex.add_argument("target", metavar="RUN[@STEP]", help="a run (its newest checkpoint), RUN@STEP or a tag")
    ex.add_argument("path", metavar="PATH", help="output file (.safetensors is added if missing)")
    ex.set_defaults(handler=export_command)


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _entry(info: CheckpointInfo) -> dict[str, Any]:
    return {
        "run": info.run,
        "step": info.step,
        "time": info.time,
        "loss": info.loss,
        "accuracy": info.accuracy,
        "bytes": info.bytes,
        "replicas": info.replicas,
        "path": str(info.path),
    }


def checkpoints_command(args: argparse.Namespace, store: CheckpointStore | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from meshtrain.checkpoints.store import CheckpointStore
    from meshtrain.ui import format as fmt

    store = store or CheckpointStore()
    run = getattr(args, "run", None)
    keep = getattr(args, "keep", None)
    as_json = bool(getattr(args, "json", False))
    console = Console(file=sys.stdout, highlight=False)
    if run is None:
        if keep is not None:
            raise UserError("--keep needs a RUN")
        rows = [(name, store.checkpoints(name)) for name in store.runs()]
        rows = [(name, found) for name, found in rows if found]
        if as_json:
            print(json.dumps([{"run": n, "checkpoints": [_entry(i) for i in f]} for n, f in rows], indent=1))
            return 0
        if not rows:
            console.print(f"no checkpoints in {store.root}")
            return 0
        table = Table(title=f"runs in {store.root}", title_justify="left")
        for column in ("run", "checkpoints", "newest step", "saved", "loss", "accuracy", "size"):
            table.add_column(column, justify="left" if column == "run" else "right")
        for name, found in rows:
            newest = found[-1]
            table.add_row(
                name,
                str(len(found)),
                str(newest.step),
                fmt.clock(newest.time),
                fmt.loss(newest.loss),
                fmt.accuracy(newest.accuracy),
                _size(sum(i.bytes for i in found)),
            )
        console.print(table)
        return 0
    store.run_dir(run)  # validates the name
    pruned = store.prune(run, keep) if keep is not None else []
    found = store.checkpoints(run)
    if as_json:
        print(json.dumps({"run": run, "pruned": pruned, "checkpoints": [_entry(i) for i in found]}, indent=1))
        return 0
    if not found:
        console.print(f"no complete checkpoint of run {run!r} on this node")
        return 0
    table = Table(title=f"checkpoints of {run}", title_justify="left")
    for column in ("step", "saved", "loss", "accuracy", "size", "replicas"):
        table.add_column(column, justify="left" if column == "replicas" else "right")
    for info in found:
        table.add_row(
            str(info.step),
            fmt.clock(info.time),
            fmt.loss(info.loss),
            fmt.accuracy(info.accuracy),
            _size(info.bytes),
            ", ".join(info.replicas) or "this node",
        )
    console.print(table)
    if pruned:
        console.print(f"pruned steps {', '.join(map(str, pruned))} (kept the newest {keep})")
    return 0


def export_command(args: argparse.Namespace, store: CheckpointStore | None = None) -> int:
    from meshtrain.checkpoints.store import CheckpointStore, parse_target

    store = store or CheckpointStore()
    from meshtrain.tracking.tags import find_tag  # a model version's name (meshtrain tag) is RUN@STEP

    target = str(args.target)
    tagged = find_tag(store, target) if "@" not in target and target not in store.runs() else None
    run, step = tagged or parse_target(target)
    from meshtrain.shard.saving import export_sharded  # a sharded checkpoint: assembled from its parts

    info, path = export_sharded(store, run, step, Path(args.path)) or store.export(run, step, Path(args.path))
    print(f"wrote {path} ({_size(path.stat().st_size)}): run {run}, step {info.step}")
    return 0
