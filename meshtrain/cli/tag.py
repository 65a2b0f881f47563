"""`meshtrain tag RUN@STEP NAME`: name a checkpoint as a model version (meshtrain.tracking.tags).

A tagged checkpoint is never pruned by `--keep`, and `meshtrain export NAME PATH` takes the tag.
`meshtrain tag` alone lists the tags of this machine; `--rm NAME` drops one here (the
checkpoint becomes prunable again).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from meshtrain.errors import UserError

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    tag = sub.add_parser("tag", help="name a checkpoint (RUN@STEP) as a model version; never pruned")
    tag.add_argument("target", nargs="?", metavar="RUN@STEP", help="a run (id or name) and a checkpoint step")
    tag.add_argument("name", nargs="?", metavar="NAME", help="the version's name (export takes it)")
    tag.add_argument("--rm", metavar="NAME", help="remove tag NAME on this machine")
    tag.set_defaults(handler=tag_command)


def _runs() -> Any:
    from meshtrain.tracking.store import RunStore, runs_db_path

    path = runs_db_path()
    return RunStore(path) if path.exists() else None


def _home() -> Any:
    from meshtrain.tracking.store import runs_db_path

    return runs_db_path().parent


def tag_command(args: argparse.Namespace) -> int:
    from meshtrain.tracking.tags import apply_tag, check_tag, drop_tag, machine_stores, parse_target

    stores = machine_stores(_home())
    runs = _runs()
    if args.rm:
        found = [drop_tag(s, args.rm) for s in stores]
        dropped = runs.remove_tag(args.rm) if runs is not None else False
        if not any(found) and not dropped:
            raise UserError(f"no tag {args.rm!r} on this machine")
        print(f"removed tag {args.rm} on this machine")
        return 0
    if args.target is None:
        return _list(stores, runs)
    if args.name is None:
        raise UserError("usage: meshtrain tag RUN@STEP NAME")
    name = check_tag(args.name)
    run_id, ckpt_run, step = parse_target(args.target, runs)
    step, held = apply_tag(stores, ckpt_run, step, name)
    runs = runs or _open_runs()
    runs.put_tag(name, run_id or "", ckpt_run, step)
    peers = _tell_agent(name, ckpt_run, step, run_id)
    where = f"{held} store{'s' if held != 1 else ''} here" + (f", {peers} on other nodes" if peers else "")
    print(f"tagged {ckpt_run}@{step} as {name} ({where}): never pruned; `meshtrain export {name} PATH`")
    return 0


def _open_runs() -> Any:
    from meshtrain.tracking.store import RunStore

    return RunStore.open(_home())


def _tell_agent(name: str, ckpt_run: str, step: int, run_id: str | None) -> int:
    """Ask this machine's agent (if one runs) to tag the copies on every live peer; how many took it."""
    from meshtrain.agent.control import call, socket_path

    path = socket_path()
    if not path.exists():
        return 0

    async def go() -> dict[str, Any]:
        return await asyncio.wait_for(
            call(path, "runs.tag", name=name, ckpt_run=ckpt_run, step=step, run=run_id, forward=True), 30.0
        )

    try:
        reply = asyncio.run(go())
    except (OSError, asyncio.TimeoutError, UserError, Exception):  # noqa: BLE001 - local tag stands
        return 0
    return int(reply.get("peers") or 0)


def _list(stores: list[Any], runs: Any) -> int:
    rows: dict[str, tuple[str, int, str]] = {}
    for name, run_id, ckpt_run, step, _ in runs.tags() if runs is not None else []:
        rows[name] = (ckpt_run, step, run_id)
    for store in stores:
        for ckpt_run in store.runs():
            for name, step in store.tagged_steps(ckpt_run).items():
                rows.setdefault(name, (ckpt_run, step, ""))
    if not rows:
        print("no tags on this machine (`meshtrain tag RUN@STEP NAME` makes one)")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="model versions", title_justify="left")
    for col in ("tag", "checkpoint", "run"):
        table.add_column(col)
    for name, (ckpt_run, step, run_id) in sorted(rows.items()):
        table.add_row(name, f"{ckpt_run}@{step}", run_id or "—")
    Console().print(table)
    return 0
