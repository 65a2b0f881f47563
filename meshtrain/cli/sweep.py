"""`meshtrain sweep SCRIPT --param lr=loguniform:1e-4:1e-2 --trials 24 --objective val_loss:min`.

Trials run concurrently on the mesh's nodes as ordinary recorded jobs (meshtrain.sweep); the
search and the early stopping are Optuna's (the `meshtrain[sweep]` extra). One line per trial
event while it runs, a summary table at the end; `meshtrain runs --sweep NAME` lists the trials.
A trial whose node is lost runs again elsewhere (from its checkpoint with --checkpoint-every);
`--resume NAME` continues a sweep from its recorded trials; the best trial's model is exported
(its path on the last line) and the live table kept in $MESHTRAIN_HOME/sweeps/NAME.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
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
    sw.add_argument("script", metavar="SCRIPT", nargs="?", help="(with --resume NAME: the sweep's own)")
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
    sw.add_argument(
        "--checkpoint-every",
        metavar="STEPS|PERIOD",
        help="checkpoint each trial (a retry after a lost node continues from it; the best is exported)",
    )
    sw.add_argument(
        "--resume",
        metavar="SWEEP",
        help="continue a sweep from its recorded trials: finished ones kept, cut-short ones run again",
    )
    sw.add_argument(
        "--export",
        metavar="PATH",
        help="where the best trial's model goes (default $MESHTRAIN_HOME/sweeps/SWEEP.best.safetensors)",
    )
    sw.set_defaults(handler=sweep_command)


def _spec(args: argparse.Namespace, home: Any) -> Any:
    """What to run: the command line, or with --resume NAME alone the sweep's file on this node."""
    from meshtrain.sweep.resume import SweepSpec, load_spec

    if args.resume is not None and not args.param:
        spec = load_spec(home, args.resume)
        if spec is None:
            raise UserError(
                f"--resume {args.resume}: no sweep of that name was started on this machine; "
                "give its command again with --resume (its first line printed it)"
            )
        return spec
    if args.script is None:
        raise UserError("name the script to sweep: meshtrain sweep SCRIPT --param NAME=KIND:...")
    if args.checkpoint_every is not None:
        from meshtrain.leader.checkpoint import CheckpointPolicy

        CheckpointPolicy.parse(args.checkpoint_every)  # a bad period is one line before anything starts
    return SweepSpec(
        script=args.script,
        params=list(args.param),
        objective=args.objective,
        trials=args.trials,
        nodes_per_trial=args.nodes_per_trial,
        script_args=_split(args.args),
        seed=args.seed,
        config_only=bool(args.config_only),
        checkpoint_every=args.checkpoint_every,
        local=args.local,
    )


def sweep_command(args: argparse.Namespace) -> int:
    from meshtrain.sweep.driver import SWEEP_EXTRA, Sweep, new_sweep_name, summary_table
    from meshtrain.sweep.resume import sweep_file
    from meshtrain.sweep.space import parse_objective, parse_params
    from meshtrain.tracking.store import runs_db_path

    home = runs_db_path().parent
    spec = _spec(args, home)
    params = parse_params(spec.params)  # every mistake in what was typed first, before anything starts
    metric, direction = parse_objective(spec.objective)
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError(f"sweeps need Optuna: {SWEEP_EXTRA}") from None
    from meshtrain.agent.bundle import snapshot
    from meshtrain.checkpoints.store import check_run_name

    if args.resume is not None and args.name is not None and args.name != args.resume:
        raise UserError("--resume names the sweep: leave out --name")
    raw = args.resume or args.name
    name = check_run_name(raw) if raw else new_sweep_name()
    bundle = snapshot(spec.script)
    home.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(
        name=name,
        script_args=list(spec.script_args),
        params=params,
        metric=metric,
        direction=direction,
        trials=spec.trials,
        nodes_per_trial=spec.nodes_per_trial,
        seed=spec.seed,
        base_options={"shares": "perf", "tracking": _tracking_options(spec.script)},
        pass_args=not spec.config_only,
        on_event=lambda line: print(line, flush=True),
        checkpoint_every=spec.checkpoint_every,
        table_path=sweep_file(home, name),
        spec=spec,
    )
    export = Path(args.export) if args.export else home / "sweeps" / f"{name}.best.safetensors"
    result, exported = asyncio.run(
        _run(sweep, spec.local, os.path.basename(spec.script), bundle.pack(), args.resume is not None, export)
    )
    from rich.console import Console

    Console().print(summary_table(result))
    if result.best is None:
        print("meshtrain: no trial completed", file=sys.stderr)
        return 1
    b = result.best
    values = ", ".join(f"{k}={v}" for k, v in b.params.items())
    print(f"best: trial {b.number} ({b.run_id}) {metric} {b.value:.6g} with {values}")
    if exported is not None:
        path, step = exported
        print(f"best model: {path} (trial {b.number}, checkpoint step {step})")
    elif spec.checkpoint_every:
        print(f"best model: not exported: no checkpoint of trial {b.number} on this machine")
    else:
        print("best model: not exported: the trials kept no checkpoints (sweep --checkpoint-every STEPS)")
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


async def _run(
    sweep: Any, local: int | None, script: str, bundle: bytes, resume: bool, export: Path
) -> tuple[Any, tuple[Path, int] | None]:
    from meshtrain.agent.control import socket_path
    from meshtrain.sweep.best import export_best
    from meshtrain.sweep.launch import AgentLauncher, LocalLauncher
    from meshtrain.sweep.resume import check_prior_space, prior_trials, trial_run_name
    from meshtrain.tracking.store import runs_db_path

    launcher: Any
    if local is not None:
        launcher = LocalLauncher(local, script, bundle)
    else:
        launcher = AgentLauncher(socket_path(), script, bundle, runs_db_path())
    async with launcher:
        if resume:
            sweep.priors = prior_trials(launcher.stores(), sweep.name, sweep.params, sweep.metric)
            check_prior_space(sweep.priors, sweep.params)
            if not sweep.priors:
                print(f"sweep {sweep.name}: no trial of it is recorded on this node: it starts afresh")
        result = await sweep.run(launcher)
        exported = None
        if result.best is not None and sweep.checkpoint_every:
            run = trial_run_name(sweep.name, result.best.number)
            exported = await asyncio.to_thread(export_best, launcher.checkpoint_stores(), run, export)
        return result, exported
