"""`meshtrain sweep SCRIPT --param lr=loguniform:1e-4:1e-2 --trials 24 --objective val_loss:min`.

Trials run concurrently on the mesh's nodes as ordinary recorded jobs (meshtrain.sweep); the
search and the early stopping are Optuna's (the `meshtrain[sweep]` extra). One line per trial
event while it runs, a summary table at the end; `meshtrain runs --sweep NAME` lists the trials.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from meshtrain.errors import UserError

__all__ = ["add_parser"]


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(text)


def add_parser(sub: Any) -> None:
    sw = sub.add_parser(
        "sweep", help="search hyper-parameters: trials as concurrent jobs on the mesh (Optuna)"
    )
    sw.add_argument("script", metavar="SCRIPT")
    sw.add_argument(
        "--args", default="", metavar="'ARGS'", help="the script's own arguments, quoted: --args '--epochs 5'"
    )
    sw.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=KIND:...",
        help="a searched value: loguniform:LO:HI, uniform:LO:HI, int:LO:HI or choice:A,B,C (repeatable)",
    )
    sw.add_argument("--trials", type=_positive, default=16, metavar="N", help="trials to run (default 16)")
    sw.add_argument("--nodes-per-trial", type=_positive, default=1, metavar="K", help="nodes per trial (1)")
    sw.add_argument("--objective", default="val_loss:min", metavar="METRIC:min|max", help="(val_loss:min)")
    sw.add_argument(
        "--local", type=_positive, metavar="N", help="an embedded mesh of N local nodes for the sweep"
    )
    sw.add_argument("--name", metavar="SWEEP", help="the sweep's name (default: a fresh one)")
    sw.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    sw.add_argument(
        "--config-only",
        action="store_true",
        help="pass values only through mesh.config(...), not as --NAME VALUE arguments",
    )
    sw.set_defaults(handler=sweep_command)


def sweep_command(args: argparse.Namespace) -> int:
    from meshtrain.sweep.driver import SWEEP_EXTRA, Sweep, new_sweep_name, summary_table
    from meshtrain.sweep.space import parse_objective, parse_params

    params = parse_params(args.param)  # every mistake in what was typed first, before anything starts
    metric, direction = parse_objective(args.objective)
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError(f"sweeps need Optuna: {SWEEP_EXTRA}") from None
    from meshtrain.agent.bundle import snapshot
    from meshtrain.checkpoints.store import check_run_name
    from meshtrain.tracking.store import runs_db_path

    name = check_run_name(args.name) if args.name else new_sweep_name()
    bundle = snapshot(args.script)
    home = runs_db_path().parent
    home.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(
        name=name,
        script_args=_split(args.args),
        params=params,
        metric=metric,
        direction=direction,
        trials=args.trials,
        nodes_per_trial=args.nodes_per_trial,
        seed=args.seed,
        storage=f"sqlite:///{home / 'sweeps.sqlite'}",
        base_options={"shares": "perf", "tracking": _tracking_options(args.script)},
        pass_args=not args.config_only,
        on_event=lambda line: print(line, flush=True),
    )
    result = asyncio.run(_run(sweep, args, os.path.basename(args.script), bundle.pack()))
    from rich.console import Console

    Console().print(summary_table(result))
    if result.best is None:
        print("meshtrain: no trial completed", file=sys.stderr)
        return 1
    b = result.best
    values = ", ".join(f"{k}={v}" for k, v in b.params.items())
    print(f"best: trial {b.number} ({b.run_id}) {metric} {b.value:.6g} with {values}")
    return 0


def _split(text: str) -> list[str]:
    import shlex

    try:
        return shlex.split(text)
    except ValueError as exc:
        raise UserError(f"--args {text!r}: {exc}") from None


def _tracking_options(script: str) -> dict[str, Any]:
    from meshtrain.tracking.record import git_info

    git = git_info(script)
    return {"git": git} if git else {}


async def _run(sweep: Any, args: argparse.Namespace, script: str, bundle: bytes) -> Any:
    from meshtrain.agent.control import socket_path
    from meshtrain.sweep.launch import AgentLauncher, LocalLauncher
    from meshtrain.tracking.store import runs_db_path

    launcher: Any
    if args.local is not None:
        launcher = LocalLauncher(args.local, script, bundle)
    else:
        launcher = AgentLauncher(socket_path(), script, bundle, runs_db_path())
    async with launcher:
        return await sweep.run(launcher)
