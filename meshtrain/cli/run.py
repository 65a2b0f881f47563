"""`meshtrain run SCRIPT`: train SCRIPT on the mesh, alone, or on a `--local N` mesh, shown live.

The script (and its directory) travels as a bundle to this machine's agent,
which places the job on the mesh's nodes. With no agent here (or with
`--local N`) the run borrows an embedded mesh (meshtrain.launcher). The first
Ctrl-C cancels the job everywhere; a second one quits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshtrain.blas import WARNED_MARKER
from meshtrain.cli.agent_link import agent_alive, slow_blas_warning, use_uvloop
from meshtrain.cli.parser import positive
from meshtrain.errors import UserError
from meshtrain.jobspec import JobOptions, JobSpec
from meshtrain.train.share_modes import DEFAULT_SHARE_MODE, SHARE_MODES

if TYPE_CHECKING:  # the agent pulls in MLX: imported when the command runs, not to build the parser
    from meshtrain.agent.jobs import JobRequest, JobResult

DEFAULT_WAIT_S = 30.0  # seconds `run --nodes` waits for its nodes unless --wait says otherwise
# The script's arguments travel in the job request's header (64 KiB at most, see meshtrain.wire) and
# again in each worker's: this leaves room for everything else those headers carry.
MAX_ARGS_BYTES = 32 * 1024
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def add_parser(sub: Any) -> None:
    run = sub.add_parser(
        "run", allow_abbrev=False, help="train SCRIPT on the mesh (or alone, or on a --local mesh)"
    )
    run.add_argument("script", metavar="SCRIPT", help="the training script; meshtrain's options go before it")
    run.add_argument(
        "script_args",
        nargs="*",
        metavar="ARGS",
        help="the script's arguments: everything after SCRIPT is passed to it untouched",
    )
    run.add_argument("--nodes", help="how many nodes (N) or which (name,name); default: all that are up")
    run.add_argument(
        "--min-nodes", type=positive, help="start with this many if --nodes are not all up in time"
    )
    run.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"how long to wait for nodes (default {DEFAULT_WAIT_S:.0f}s with --nodes, else 0)",
    )
    run.add_argument(
        "--local", type=positive, metavar="N", help="an embedded mesh of N local nodes, just for this run"
    )
    run.add_argument(
        "--data",
        metavar="PATH",
        help="a file or directory every worker gets at the same relative path (mesh.data_path): "
        "hashed, fetched once per node, cached in $MESHTRAIN_HOME/data",
    )
    run.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt the traffic (AES-GCM) of the mesh this run starts (--local N, or training alone)",
    )
    run.add_argument(
        "--checkpoint-every",
        metavar="STEPS|PERIOD",
        help="take a coordinated checkpoint every STEPS steps (200) or every PERIOD (30s, 5m, 1h)",
    )
    run.add_argument(
        "--checkpoint-replicas",
        type=int,
        default=2,
        metavar="K",
        help="whole copies of each checkpoint besides the first, on other nodes (default 2)",
    )
    run.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="where the mesh this run starts (alone or --local N) keeps checkpoints "
        "(default $MESHTRAIN_HOME/checkpoints)",
    )
    run.add_argument(
        "--keep",
        type=positive,
        default=3,
        metavar="N",
        help="complete checkpoints each node keeps (default 3)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run's newest complete checkpoint, wherever in the mesh it is",
    )
    run.add_argument(
        "--name", metavar="RUN", help="the run's name for its checkpoints (default: the script's stem)"
    )
    run.add_argument(
        "--shares",
        choices=SHARE_MODES,
        default=DEFAULT_SHARE_MODE,
        help="each node's share of the global batch: by measured speed (default) or equal",
    )
    run.add_argument(
        "--shard-replicas",
        type=positive,
        metavar="R",
        help="sharded training: nodes holding each shard of the optimizer state, so a lost node's "
        "shards are taken over without a roll-back (default 2 at stage 1 on 3 or more nodes, else 1)",
    )
    run.add_argument(
        "--ledger",
        metavar="DIR",
        help="debug: every worker logs the sample indices of each committed step to DIR on its node",
    )
    run.add_argument(
        "--notify",
        action="append",
        default=[],
        metavar="TARGET",
        help="tell TARGET when the job ends, fails, pauses or loses a node (repeatable): "
        "https://... webhook, slack:URL, mailto:ADDRESS, exec:COMMAND",
    )
    run.add_argument(
        "--notify-when",
        action="append",
        default=[],
        metavar="CONDITION",
        help="also tell the --notify targets once when a reported metric first meets CONDITION "
        "(repeatable): 'val_loss<1.6', 'test_accuracy>=0.98'; operators < <= > >= ==",
    )
    run.add_argument(
        "--detach", action="store_true", help="print the job's id once it runs and return (see `attach`)"
    )
    run.add_argument(  # experiment tracking (meshtrain.tracking.reporters)
        "--report-to",
        action="append",
        default=[],
        metavar="LIB",
        help="also log the metrics with tensorboard, mlflow, wandb or trackio (local/offline; repeatable)",
    )
    run.add_argument(
        "--report-dir", metavar="DIR", help="where --report-to writes (default $MESHTRAIN_HOME/reports)"
    )
    run.set_defaults(handler=main)


class Renderer:
    """The submitter's JobSink: the live job view, plus every output line when not on a terminal."""

    def __init__(self) -> None:
        from meshtrain.ui import LiveJob, is_interactive

        probe = LiveJob()
        self.interactive = is_interactive(probe.console)
        self.view = LiveJob(include_log=self.interactive)
        self.last: dict[str, Any] | None = None
        self.checkpointed = False  # a checkpoint of this job was committed somewhere in the mesh
        self.aborted = 0  # checkpoint rounds of this job that were aborted (a writer lost, a failed write)
        self.stopped_by: int | None = None  # the signal (SIGTERM, SIGHUP; SIGINT alone) that cancelled it

    async def log(self, node: str, rank: int, stream: str, line: str) -> None:
        if not self.interactive:
            self.view.console.print(
                f"[{node}] {line}", markup=False, highlight=False, emoji=False, soft_wrap=True
            )

    async def snapshot(self, snap: dict[str, Any]) -> None:
        self.last = snap
        events = snap.get("events") or ()
        rounds = [e for e in events if isinstance(e, dict) and e.get("kind") == "checkpoint"]
        self.checkpointed = self.checkpointed or any("committed" in str(e.get("detail", "")) for e in rounds)
        aborted = [str(e.get("detail", "")) for e in rounds if " aborted" in str(e.get("detail", ""))]
        self.aborted = max(self.aborted, sum("job ended" not in d for d in aborted))  # not the last one
        self.view.update(snap)


def main(args: argparse.Namespace) -> int:
    from meshtrain.agent.bundle import snapshot as bundle_snapshot
    from meshtrain.agent.jobs import JobRequest

    # the job's options (meshtrain.jobspec), typed; checkpoint flag mistakes first, before the script is read
    options = JobOptions.from_wire(checkpoint_options(args))
    _check_node_counts(args)
    _check_script_args(args.script_args)
    from meshtrain.tracking.options import tracking_options  # the run's record: git commit, --report-to

    options = options.replace(
        shares=getattr(args, "shares", DEFAULT_SHARE_MODE),
        shard_replicas=getattr(args, "shard_replicas", None),
        tracking=tracking_options(args.script, args.report_to, args.report_dir),
    )
    if getattr(args, "notify", None):
        from meshtrain.notify.targets import parse_targets

        targets = tuple(t.to_text() for t in parse_targets(args.notify))  # bad ones: one line, here
        options = options.replace(notify=targets)
    if getattr(args, "notify_when", None):
        from meshtrain.notify.condition import parse_conditions

        conditions = tuple(c.text for c in parse_conditions(args.notify_when))  # bad ones: one line, here
        options = options.replace(notify_when=conditions)
    if getattr(args, "ledger", None):
        options = options.replace(ledger=os.path.abspath(args.ledger))
        try:
            Path(str(options.ledger)).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--ledger {args.ledger}: cannot create it: {exc.strerror or exc}") from None
    checkpoint_dir = _checkpoint_dir(getattr(args, "checkpoint_dir", None))
    if args.local is not None and args.nodes is not None:
        raise UserError("--local N makes its own mesh of N nodes: drop --nodes")
    if os.path.isdir(args.script):
        example = os.path.join(args.script, "train.py")
        raise UserError(
            f"{args.script} is a directory: name the script in it to run (meshtrain run {example})"
        )
    bundle = bundle_snapshot(args.script)
    if getattr(args, "data", None) is not None:  # run --data PATH: hashed here, fetched by the nodes
        from meshtrain.agent.data_transfer import prepare_submission
        from meshtrain.paths import state_home

        options = options.replace(data=prepare_submission(args.data, state_home()))
    wait = args.wait if args.wait is not None else (DEFAULT_WAIT_S if (args.nodes or args.min_nodes) else 0.0)
    if wait < 0:
        raise UserError("--wait must be zero or more seconds")
    spec = JobSpec(
        script=os.path.basename(args.script),
        args=tuple(args.script_args),
        nodes=args.nodes,
        min_nodes=args.min_nodes,
        wait=float(wait),
        options=options,
    )
    request = JobRequest.of(spec, bundle.pack())
    use_uvloop()
    if getattr(args, "detach", False):  # the job's id, once it runs; `meshtrain attach` watches it
        from meshtrain.cli.job_stream import run_detached

        return run_detached(request, args.local)
    slow = slow_blas_warning()
    if slow is not None:
        print(slow, file=sys.stderr, flush=True)
        os.environ[WARNED_MARKER] = "1"  # this run's own workers (alone, --local) need not say it again
    renderer = Renderer()
    encrypt = bool(getattr(args, "encrypt", False))
    result = asyncio.run(_run(request, args.local, renderer, checkpoint_dir, encrypt))
    last = renderer.last or {}
    stopped = renderer.stopped_by
    if stopped in (signal.SIGTERM, signal.SIGHUP) and result.state == "cancelled":
        name = signal.Signals(stopped).name
        print(f"meshtrain: terminated ({name}): the job was cancelled on every node", file=sys.stderr)
        return 128 + stopped
    if result.state == "done" and (last.get("train_s") or 0) >= 0.5:
        print(
            f"throughput: {last.get('avg_samples_per_s', 0):,.0f} samples/s on {last.get('size')} "
            f"node{'s' if last.get('size') != 1 else ''}, averaged over {last['train_s']:.1f}s of training"
        )
    if options.checkpoint_every and result.state != "done":
        run_name = str(options.run)
        if _has_checkpoint(run_name, checkpoint_dir):
            print(f"continue from its last checkpoint: the same command with --resume (run {run_name})")
        else:
            print(f"no checkpoint of run {run_name} was committed on this machine: nothing to --resume here")
    if result.state == "failed":
        if result.traceback:
            print(result.traceback.rstrip(), file=sys.stderr)
        print(f"meshtrain: job failed: {result.message}", file=sys.stderr)
    elif result.state == "cancelled":
        print(f"meshtrain: job cancelled: {result.message}", file=sys.stderr)
    if result.state == "done" and slow is not None:
        print(slow, file=sys.stderr)  # again: the first one has scrolled away with the live view
    if result.state == "done" and options.checkpoint_every and not renderer.checkpointed:
        why = (
            f"{renderer.aborted} round{'s were' if renderer.aborted != 1 else ' was'} aborted (see the "
            "events above) and the job ended before the next one"
            if renderer.aborted
            else "the job ended before its first checkpoint was due"
        )
        print(
            f"meshtrain: warning: no checkpoint was written: {why} (--checkpoint-every "
            f"{options.checkpoint_every})",
            file=sys.stderr,
        )
    return result.exit_code


def _check_node_counts(args: argparse.Namespace) -> None:
    """Refuse what no mesh can meet: `--nodes 0`, or a --min-nodes above the nodes asked for."""
    nodes = None if args.nodes is None else str(args.nodes).strip()
    asked: int | None = None
    what = "--nodes asks for"
    if nodes is not None and nodes.isdigit():
        asked = int(nodes)
        if asked == 0:
            raise UserError("--nodes 0: a job needs at least one node")
    elif nodes is not None:
        names = {n.strip() for n in nodes.split(",") if n.strip()}
        if not names:
            raise UserError(f"--nodes {args.nodes!r}: name at least one node (or give a count)")
        asked = len(names)
    elif args.local is not None:
        asked, what = args.local, "--local makes"
    if asked is not None and args.min_nodes is not None and args.min_nodes > asked:
        raise UserError(f"--min-nodes {args.min_nodes} is more than the {asked} nodes {what}")


def _check_script_args(script_args: list[str]) -> None:
    """Script arguments travel as UTF-8 text in a bounded header: say so rather than fail later."""
    size = 0
    for number, arg in enumerate(script_args, 1):
        try:
            size += len(arg.encode("utf-8"))
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            raise UserError(
                f"argument {number} for the script is not valid UTF-8 ({shown!r}): "
                "meshtrain passes the script's arguments as text"
            ) from None
    if size > MAX_ARGS_BYTES:
        raise UserError(
            f"the script's arguments are {size:,} bytes; at most {MAX_ARGS_BYTES:,} fit in a job request "
            "(pass a file instead)"
        )


def checkpoint_options(args: argparse.Namespace) -> dict[str, Any]:
    """`run`'s checkpoint flags as the job's options dict (empty without --checkpoint-every/--resume)."""
    from meshtrain.checkpoints.options import CheckpointOptions

    return CheckpointOptions.build(
        args.script,
        every=getattr(args, "checkpoint_every", None),
        replicas=getattr(args, "checkpoint_replicas", 2),
        keep=getattr(args, "keep", 3),
        resume=bool(getattr(args, "resume", False)),
        name=getattr(args, "name", None),
    ).to_dict()


def _has_checkpoint(run: str, checkpoint_dir: str | None) -> bool:
    """Whether a store on this machine (the agents' and the --local nodes') holds a complete one of `run`."""
    from meshtrain.checkpoints.store import CheckpointStore, checkpoints_root

    if checkpoint_dir:  # claim_store's layout: DIR, DIR/nodes/NAME
        root = Path(checkpoint_dir)
        roots = [root, *sorted(root.glob("nodes/*"))]
    else:  # HOME/checkpoints, HOME/nodes/NAME/checkpoints
        root = checkpoints_root()
        roots = [root, *(p / "checkpoints" for p in sorted(root.parent.glob("nodes/*")))]
    try:
        return any(CheckpointStore(r).latest(run) is not None for r in roots)
    except OSError:
        return False


def _checkpoint_dir(path: str | None) -> str | None:
    """`--checkpoint-dir` made absolute and created (one line if it cannot be)."""
    if path is None:
        return None
    full = os.path.abspath(path)
    try:
        Path(full).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--checkpoint-dir {path}: cannot create it: {exc.strerror or exc}") from None
    if not os.access(full, os.W_OK | os.X_OK):
        raise UserError(f"--checkpoint-dir {path}: not writable")
    return full


async def _run(
    request: JobRequest,
    local: int | None,
    renderer: Renderer,
    checkpoint_dir: str | None = None,
    encrypt: bool = False,
) -> JobResult:
    from meshtrain.agent.control import socket_path
    from meshtrain.agent.jobs import JobResult, JobRunner
    from meshtrain.launcher import run_embedded

    path = socket_path()
    loop = asyncio.get_running_loop()
    if local is None and await agent_alive(path) is None:
        print(
            "no agent on this machine: training here alone (start `meshtrain join` on your machines "
            "to train on the mesh)",
            file=sys.stderr,
            flush=True,
        )
        local = 1
    if encrypt and local is None:
        raise UserError(
            "--encrypt is for a mesh this run starts (--local N, or alone): this machine's agent's mesh "
            "is encrypted or not from its creation (`meshtrain join --encrypt`)"
        )
    if checkpoint_dir is not None:
        if local is None:
            raise UserError(
                "--checkpoint-dir is for a mesh this run starts (alone or --local N): the agents of "
                "this mesh keep checkpoints where they were started ($MESHTRAIN_HOME/checkpoints, or "
                "$MESHTRAIN_CHECKPOINT_DIR when `meshtrain join` started)"
            )
        from meshtrain.checkpoints.node import ENV_CHECKPOINT_DIR

        os.environ[ENV_CHECKPOINT_DIR] = checkpoint_dir  # the embedded agents claim their stores there
    with renderer.view:
        if local is not None:
            ready: asyncio.Future[JobRunner] = loop.create_future()
            task = asyncio.ensure_future(run_embedded(request, local, renderer, ready, encrypt=encrypt))
            _on_interrupt(loop, renderer, lambda: ready.result().cancel() if ready.done() else task.cancel())
            try:
                return await task
            except asyncio.CancelledError:
                return JobResult("cancelled", "cancelled by the user")
        return await _run_on_agent(path, request, renderer, loop)


def _on_interrupt(
    loop: asyncio.AbstractEventLoop,
    renderer: Renderer,
    cancel: Callable[[], object],
    signals: tuple[signal.Signals, ...] = STOP_SIGNALS,
) -> None:
    """The first Ctrl-C, SIGTERM or SIGHUP cancels the job everywhere and waits for that; a second quits.

    SIGTERM (a timeout, CI, `kill`) and SIGHUP (the terminal closed) stop the job as
    Ctrl-C does, so no worker trains on for a submitter that is gone.
    """

    def handler(signum: int) -> None:
        if renderer.stopped_by is not None:
            os._exit(128 + signum)
        renderer.stopped_by = signum
        cancel()

    for signum in signals:
        loop.add_signal_handler(signum, handler, signum)


async def _run_on_agent(
    path: Path, request: JobRequest, renderer: Renderer, loop: asyncio.AbstractEventLoop
) -> JobResult:
    from meshtrain.agent.control import open_request
    from meshtrain.agent.jobs import JobResult

    conn = await open_request(path, "run", request.bundle, **request.job_spec.to_wire())

    from meshtrain.cli.job_stream import follow  # Ctrl-C cancels the job on every node, and says so

    def cancel() -> None:
        why = f"the submitting `meshtrain run` got {signal.Signals(renderer.stopped_by or 15).name}"
        asyncio.ensure_future(conn.send("request", {"op": "cancel", "why": why}))

    _on_interrupt(loop, renderer, cancel, (signal.SIGTERM, signal.SIGHUP))  # follow() takes Ctrl-C
    header = await follow(conn, renderer, job=None, on_interrupt="cancel")
    return JobResult(str(header.get("state")), header.get("message"), header.get("traceback"))
