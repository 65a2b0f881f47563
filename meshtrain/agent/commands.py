"""What the CLI verbs do: `join` runs an agent, `run`/`status`/`leave` talk to one.

The CLI reaches this machine's agent through the unix socket in the state
directory. `run` with no agent there (or with `--local N`) borrows an
embedded mesh for the run (meshtrain.launcher). Everything that can go
wrong because of what the user typed or how the machine is set up becomes a
`UserError`: one line, non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshtrain.agent.bundle import snapshot as bundle_snapshot
from meshtrain.agent.control import call, check_reply, open_request, socket_path, state_dir
from meshtrain.agent.jobs import JobRequest, JobResult, JobRunner
from meshtrain.errors import UserError, WireError
from meshtrain.wire import StreamClosed

NO_AGENT = "no agent is running on this machine: start one with `meshtrain join`"
DETACH_START_S = 15.0
DEFAULT_WAIT = 30.0  # seconds `run --nodes` waits for its nodes unless --wait says otherwise


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def agent_alive(path: Path) -> dict[str, Any] | None:
    """The local agent's ping reply, or None when none is listening."""
    if not path.exists():
        return None
    try:
        return await asyncio.wait_for(call(path, "ping"), 5.0)
    except (OSError, asyncio.TimeoutError, WireError):
        return None


# join


def resolve_keyring(args: argparse.Namespace) -> tuple[Any, bool]:
    """(keyring, created) for `join`: --token, else --secret-file, MESHTRAIN_SECRET or the config file.

    With --token the token's secret becomes this machine's primary key (stored,
    older keys kept for rotation) and its seed is joined through; nothing
    unrelated is created first. Without any secret, the first `join` creates one.
    `--encrypt` (or a token of an encrypted mesh) turns encryption on; kept in
    the config file's secret, so the agent encrypts at every later start too.
    """
    from meshtrain.cli import seed as parse_seed
    from meshtrain.security import Keyring, load_keyring, parse_token
    from meshtrain.security.secret import default_secret_path, store_joined_secret, write_secret_file

    token_text = getattr(args, "token", None)
    secret_file = getattr(args, "secret_file", None)
    encrypt = bool(getattr(args, "encrypt", False))
    own_file = secret_file is None and not os.environ.get("MESHTRAIN_SECRET")
    if token_text is None:
        try:
            keyring, created = load_keyring(secret_file, create=not args.seed)
        except UserError as exc:
            if str(exc).startswith("no mesh secret"):  # --seed names a mesh whose secret we lack
                host, port = args.seed[0]
                raise UserError(
                    f"this machine does not hold the secret of the mesh at {host}:{port}: join it with "
                    "the `meshtrain join --token ...` command that mesh's first `join` printed "
                    "(or pass --secret-file)"
                ) from None
            raise
        if encrypt and not keyring.encrypt:
            keyring = keyring.with_encrypt(True)
            if own_file:
                write_secret_file(default_secret_path(), keyring)
        return keyring, created
    token = parse_token(token_text)
    encrypt = encrypt or token.encrypt  # the mesh's setting comes with its token
    try:
        keyring, _ = load_keyring(secret_file, create=False)
    except UserError:
        keyring = Keyring([token.secret])
    if own_file:
        keyring = store_joined_secret(keyring, token.secret, encrypt=encrypt)
    else:
        keyring = Keyring([token.secret, *keyring.keys], encrypt=encrypt)
    if token.seed:
        try:
            address = parse_seed(token.seed)
        except argparse.ArgumentTypeError:
            raise UserError("the join token names a bad seed address; copy it again") from None
        if address not in args.seed:
            args.seed.append(address)
    return keyring, False


def join_hint(keyring: Any, host: str, port: int) -> str:
    """The line that tells the user how another machine joins this mesh."""
    from meshtrain.security.secret import join_command

    return f"to add another machine, run there:  {join_command(keyring, seed=f'{host}:{port}')}"


def join(args: argparse.Namespace) -> int:
    if args.detach:
        return _join_detached(args)
    _use_uvloop()
    return asyncio.run(_join(args))


async def _join(args: argparse.Namespace) -> int:
    from meshtrain.agent.agent import Agent
    from meshtrain.ui import LiveMesh

    path = socket_path()
    running = await agent_alive(path)
    if running is not None:
        raise UserError(
            f"an agent ({running.get('name')}) is already running on this machine; "
            "see it with `meshtrain status`"
        )
    keyring, _ = resolve_keyring(args)
    agent = Agent(
        name=args.name,
        profile=args.profile,
        host=args.host,
        port=args.port,
        seeds=args.seed,
        interface=args.interface,
        discovery=not args.no_discovery,
        keyring=keyring,
        worker_env={"MESHTRAIN_ON_BATTERY": getattr(args, "on_battery", "reduce")},
    )
    try:
        await agent.start()
    except UserError:
        await agent.leave()  # e.g. the gossip port is taken: no stale control socket left behind
        raise
    except OSError as exc:
        await agent.leave()
        raise UserError(f"cannot start the agent on port {args.port}: {exc.strerror or exc}") from None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(agent.leave()))
    host, port = agent.advertised
    print(
        f"joined the mesh as {agent.name} (gossip port {agent.gossip_port}); on other machines: "
        f"`meshtrain join --token ...` (below)",
        flush=True,
    )
    print(join_hint(keyring, host, port), flush=True)
    view = LiveMesh()
    with view:
        while not agent.closed:
            view.update(agent.mesh_snapshot())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(agent.wait_closed(), 0.5)
    await agent.leave()
    print(f"{agent.name} left the mesh", flush=True)
    return 0


def _join_detached(args: argparse.Namespace) -> int:
    keyring, _ = resolve_keyring(args)  # a token is stored here, so the background agent finds it
    log = Path(args.log) if args.log else state_dir() / "agent.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "meshtrain",
        "join",
        "--profile",
        args.profile,
        "--port",
        str(args.port),
        "--host",
        args.host,
    ]
    for flag, value in (
        ("--name", args.name),
        ("--on-battery", getattr(args, "on_battery", None)),
        ("--interface", args.interface),
        ("--secret-file", args.secret_file),
    ):
        if value:
            argv += [flag, value]
    for host, port in args.seed:
        argv += ["--seed", f"{host}:{port}"]
    if args.no_discovery:
        argv.append("--no-discovery")
    if keyring.encrypt:  # also when the secret comes from --secret-file or MESHTRAIN_SECRET
        argv.append("--encrypt")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + DETACH_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise UserError(f"the agent did not start: {tail[0] if tail else f'exit code {proc.returncode}'}")
        reply = asyncio.run(agent_alive(socket_path()))
        if reply is not None:
            print(
                f"agent {reply.get('name')} running in the background (pid {proc.pid}), log: {log}; "
                "stop it with `meshtrain leave`"
            )
            print(join_hint(keyring, *_reachable(args)))
            return 0
        time.sleep(0.2)
    raise UserError(f"the agent did not answer within {DETACH_START_S:.0f}s; see {log}")


def _reachable(args: argparse.Namespace) -> tuple[str, int]:
    """(host, gossip port) other machines reach the detached agent at, as it advertises itself."""
    with contextlib.suppress(
        OSError, asyncio.TimeoutError, WireError, UserError, StopIteration, KeyError, ValueError
    ):
        snap = asyncio.run(asyncio.wait_for(fetch_status(socket_path()), 5.0))
        me = next(n for n in snap.get("nodes", []) if n.get("id") == snap.get("self"))
        host, _, port = str(me["addr"]).rpartition(":")
        return host, int(port)
    return args.host, args.port


# leave and status


def leave(args: argparse.Namespace) -> int:
    path = socket_path()

    async def go() -> dict[str, Any] | None:
        if await agent_alive(path) is None:
            return None
        return await call(path, "leave")

    if asyncio.run(go()) is None:
        raise UserError(NO_AGENT)
    deadline = time.monotonic() + 10
    while path.exists() and time.monotonic() < deadline:  # its control socket goes when it has left
        time.sleep(0.05)
    print("the agent on this machine left the mesh")
    return 0


async def fetch_status(path: Path) -> dict[str, Any]:
    try:
        reply = await call(path, "status", who="the agent on this machine")
    except (OSError, WireError):
        raise UserError(NO_AGENT) from None
    snap = reply.get("snapshot")
    if not isinstance(snap, dict):
        raise UserError("the agent on this machine sent no snapshot")
    return snap


def status(args: argparse.Namespace) -> int:
    from meshtrain.ui import LiveMesh

    path = socket_path()
    if not path.exists():
        raise UserError(NO_AGENT)
    snap = asyncio.run(fetch_status(path))
    if args.json:
        print(json.dumps(snap, indent=2))
        return 0
    if not args.watch:
        LiveMesh().print_once(snap)
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(LiveMesh().follow(lambda: fetch_status(path), interval=0.5))
    return 0


# run


class Renderer:
    """The submitter's JobSink: the live job view, plus every output line when not on a terminal."""

    def __init__(self) -> None:
        from meshtrain.ui import LiveJob, is_interactive

        probe = LiveJob()
        self.interactive = is_interactive(probe.console)
        self.view = LiveJob(include_log=self.interactive)
        self.last: dict[str, Any] | None = None

    async def log(self, node: str, rank: int, stream: str, line: str) -> None:
        if not self.interactive:
            self.view.console.print(
                f"[{node}] {line}", markup=False, highlight=False, emoji=False, soft_wrap=True
            )

    async def snapshot(self, snap: dict[str, Any]) -> None:
        self.last = snap
        self.view.update(snap)


def run(args: argparse.Namespace) -> int:
    options = _checkpoint_options(args)  # flag mistakes first, before the script is even read
    options["shares"] = getattr(args, "shares", "perf")
    if getattr(args, "ledger", None):
        options["ledger"] = os.path.abspath(args.ledger)
        try:
            Path(options["ledger"]).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--ledger {args.ledger}: cannot create it: {exc.strerror or exc}") from None
    bundle = bundle_snapshot(args.script)
    if args.local is not None and args.nodes is not None:
        raise UserError("--local N makes its own mesh of N nodes: drop --nodes")
    wait = args.wait if args.wait is not None else (DEFAULT_WAIT if (args.nodes or args.min_nodes) else 0.0)
    if wait < 0:
        raise UserError("--wait must be zero or more seconds")
    request = JobRequest(
        script=os.path.basename(args.script),
        args=list(args.script_args),
        bundle=bundle.pack(),
        nodes=args.nodes,
        min_nodes=args.min_nodes,
        wait=wait,
        options=options,
    )
    _use_uvloop()
    renderer = Renderer()
    result = asyncio.run(_run(request, args.local, renderer))
    last = renderer.last or {}
    if result.state == "done" and (last.get("train_s") or 0) >= 0.5:
        print(
            f"throughput: {last.get('avg_samples_per_s', 0):,.0f} samples/s on {last.get('size')} "
            f"node{'s' if last.get('size') != 1 else ''}, averaged over {last['train_s']:.1f}s of training"
        )
    if options.get("checkpoint_every") and result.state != "done":
        print(f"continue from its last checkpoint: the same command with --resume (run {options['run']})")
    if result.state == "failed":
        if result.traceback:
            print(result.traceback.rstrip(), file=sys.stderr)
        print(f"meshtrain: job failed: {result.message}", file=sys.stderr)
    elif result.state == "cancelled":
        print(f"meshtrain: job cancelled: {result.message}", file=sys.stderr)
    return result.exit_code


def _checkpoint_options(args: argparse.Namespace) -> dict[str, Any]:
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


async def _run(request: JobRequest, local: int | None, renderer: Renderer) -> JobResult:
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
    with renderer.view:
        if local is not None:
            ready: asyncio.Future[JobRunner] = loop.create_future()
            task = asyncio.ensure_future(run_embedded(request, local, renderer, ready))
            _on_interrupt(loop, lambda: ready.result().cancel() if ready.done() else task.cancel())
            try:
                return await task
            except asyncio.CancelledError:
                return JobResult("cancelled", "cancelled by the user")
        return await _run_on_agent(path, request, renderer, loop)


def _on_interrupt(loop: asyncio.AbstractEventLoop, cancel: Callable[[], object]) -> None:
    """First Ctrl-C cancels the job everywhere (and waits for that); a second one quits at once."""
    hits = {"n": 0}

    def handler() -> None:
        hits["n"] += 1
        if hits["n"] > 1:
            os._exit(130)
        cancel()

    loop.add_signal_handler(signal.SIGINT, handler)


async def _run_on_agent(
    path: Path, request: JobRequest, renderer: Renderer, loop: asyncio.AbstractEventLoop
) -> JobResult:
    conn = await open_request(
        path,
        "run",
        request.bundle,
        script=request.script,
        args=request.args,
        nodes=request.nodes,
        min_nodes=request.min_nodes,
        wait=request.wait,
        options=request.options,
    )

    def cancel() -> None:
        asyncio.ensure_future(conn.send("request", {"op": "cancel"}))

    _on_interrupt(loop, cancel)
    try:
        while True:
            try:
                header, _ = await conn.recv()
            except (StreamClosed, WireError, ConnectionError):
                raise UserError("the agent on this machine closed the connection during the job") from None
            kind = header.get("kind")
            if kind == "log":
                await renderer.log(
                    str(header.get("node")),
                    int(header.get("rank", 0)),
                    str(header.get("stream")),
                    str(header.get("line", "")),
                )
            elif kind == "event" and isinstance(header.get("snapshot"), dict):
                await renderer.snapshot(header["snapshot"])
            elif kind == "reply":
                check_reply(header, "the agent on this machine")
                return JobResult(str(header.get("state")), header.get("message"), header.get("traceback"))
    finally:
        await conn.close()
