"""`meshtrain join`: run this machine's agent, in the foreground (live view) or detached.

The secret comes from --token, --secret-file, MESHTRAIN_SECRET or the config
file (`resolve_keyring`); the first `join` of a mesh creates one and prints
the command other machines join with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from meshtrain import env as env_names
from meshtrain.cli.agent_link import agent_alive, fetch_status, slow_blas_warning, use_uvloop
from meshtrain.cli.parser import DEFAULT_PORT, seed
from meshtrain.cli.parser import port as port_number
from meshtrain.errors import UserError, WireError
from meshtrain.gossip.config import GossipConfig

DETACH_START_S = 15.0


def add_parser(sub: Any) -> None:
    join = sub.add_parser("join", help="run this machine's agent: join (or start) the mesh and show it live")
    join.add_argument("--name", help="this node's name in the mesh (default: the host name)")
    join.add_argument(
        "--seed",
        action="append",
        type=seed,
        default=[],
        metavar="HOST:PORT",
        help="a member to join through (repeatable); LAN peers are found without one",
    )
    join.add_argument("--token", help="join the mesh this token names (the first `join` prints the command)")
    join.add_argument(
        "--secret-file",
        metavar="FILE",
        help="read the mesh secret from FILE (mode 0600); MESHTRAIN_SECRET is honoured too",
    )
    join.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt all mesh traffic (AES-GCM), not only authenticate it; the printed token carries it",
    )
    join.add_argument("--interface", help="network interface to use for discovery and traffic")
    join.add_argument(
        "--profile",
        choices=("lan", "wifi", "local"),
        default="lan",
        help="failure-detection timing for the network (default: lan)",
    )
    join.add_argument(
        "--port",
        type=port_number,
        default=DEFAULT_PORT,
        help=f"gossip UDP and TCP port (default {DEFAULT_PORT}; 0: any free one); LAN discovery "
        "beacons use the next one (7947)",
    )
    join.add_argument("--host", default="0.0.0.0", help="address to bind (default: all)")
    join.add_argument("--no-discovery", action="store_true", help="do not broadcast LAN beacons")
    join.add_argument(
        "--detach", action="store_true", help="run in the background (stop with `meshtrain leave`)"
    )
    join.add_argument("--log", metavar="FILE", help="with --detach: where the agent writes its log")
    join.add_argument(
        "--on-battery",
        choices=("continue", "reduce", "leave"),
        default="reduce",
        help="on battery or hot: keep this node's share, halve it (default), or take none",
    )
    join.add_argument(
        "--dashboard",
        type=_dashboard_address,
        metavar="[HOST:]PORT",
        help="also serve the web dashboard (HOST defaults to 127.0.0.1; another HOST needs a login)",
    )
    join.set_defaults(handler=main)


def _dashboard_address(text: str) -> tuple[str, int]:
    from meshtrain.dashboard import listen_address

    return listen_address(text)


def resolve_keyring(args: argparse.Namespace) -> tuple[Any, bool]:
    """(keyring, created) for `join`: --token, else --secret-file, MESHTRAIN_SECRET or the config file.

    With --token the token's secret becomes this machine's primary key (stored,
    older keys kept for rotation) and its seed is joined through; nothing
    unrelated is created first. Without any secret, the first `join` creates one.
    `--encrypt` (or a token of an encrypted mesh) turns encryption on; kept in
    the config file's secret, so the agent encrypts at every later start too.
    """
    from meshtrain.security import Keyring, load_keyring, parse_token
    from meshtrain.security.secret import default_secret_path, store_joined_secret, write_secret_file

    token_text = getattr(args, "token", None)
    secret_file = getattr(args, "secret_file", None)
    encrypt = bool(getattr(args, "encrypt", False))
    own_file = secret_file is None and not os.environ.get(env_names.SECRET)
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
            address = seed(token.seed)
        except argparse.ArgumentTypeError:
            raise UserError("the join token names a bad seed address; copy it again") from None
        if address not in args.seed:
            args.seed.append(address)
    return keyring, False


def join_hint(keyring: Any, host: str, port: int) -> str:
    """The line that tells the user how another machine joins this mesh."""
    from meshtrain.security.secret import join_command

    return f"to add another machine, run there:  {join_command(keyring, seed=f'{host}:{port}')}"


def main(args: argparse.Namespace) -> int:
    if args.log and not args.detach:
        raise UserError("--log FILE is for --detach (a foreground agent shows its log in the terminal)")
    slow = slow_blas_warning()
    if slow is not None:  # this node's workers will train slowly: say it where the node starts
        print(slow, file=sys.stderr, flush=True)
    if args.detach:
        return _join_detached(args)
    use_uvloop()
    return asyncio.run(_join(args))


def gossip_config(args: argparse.Namespace) -> GossipConfig:
    """`join`'s gossip flags as the one value the agent and its gossip node read."""
    return GossipConfig(
        profile=args.profile,
        host=args.host,
        port=args.port,
        seeds=tuple(args.seed),
        interface=args.interface,
        discovery=not args.no_discovery,
    )


async def _join(args: argparse.Namespace) -> int:
    from meshtrain.agent.agent import Agent
    from meshtrain.agent.control import socket_path
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
        gossip=gossip_config(args),
        keyring=keyring,
        worker_env={env_names.ON_BATTERY: getattr(args, "on_battery", "reduce")},
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
    if agent.join_problem is not None:  # alone for now: say so (the agent keeps retrying the seeds)
        print(f"meshtrain: not joined yet: {agent.join_problem}; retrying", file=sys.stderr, flush=True)
    if getattr(args, "dashboard", None):
        from meshtrain.dashboard import start_in_agent

        try:
            await start_in_agent(agent, args.dashboard)
        except UserError:
            await agent.leave()
            raise
    view = LiveMesh()
    with view:
        while not agent.closed:
            view.update(agent.mesh_snapshot())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(agent.wait_closed(), 0.5)
    await agent.leave()
    if agent.failure is not None:  # it stopped itself (its name is another machine's)
        raise UserError(agent.failure)
    print(f"{agent.name} left the mesh", flush=True)
    return 0


def _join_detached(args: argparse.Namespace) -> int:
    from meshtrain.agent.control import socket_path, state_dir

    running = asyncio.run(agent_alive(socket_path()))
    if running is not None:  # checked first: a second agent would fail, and the first one answer for it
        raise UserError(
            f"an agent ({running.get('name')}) is already running on this machine; "
            "see it with `meshtrain status`"
        )
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
        ("--dashboard", "{}:{}".format(*args.dashboard) if getattr(args, "dashboard", None) else None),
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
        if reply is not None and proc.poll() is None and reply.get("join_problem"):
            asyncio.run(stop_agent(socket_path()))  # alone in the background helps nobody: say why, stop
            raise UserError(f"{reply['join_problem']}; the agent stopped (log: {log})")
        if reply is not None and proc.poll() is None:  # ours answers (not one started meanwhile)
            print(
                f"agent {reply.get('name')} running in the background (pid {proc.pid}), log: {log}; "
                "stop it with `meshtrain leave`"
            )
            print(join_hint(keyring, *_reachable(args)))
            return 0
        time.sleep(0.2)
    raise UserError(f"the agent did not answer within {DETACH_START_S:.0f}s; see {log}")


async def stop_agent(path: Path) -> None:
    """Ask the agent on this machine to leave and wait (briefly) for its control socket to go."""
    from meshtrain.agent.control import call

    with contextlib.suppress(OSError, WireError, UserError, asyncio.TimeoutError):
        await asyncio.wait_for(call(path, "leave"), 5.0)
    for _ in range(100):
        if not path.exists():
            return
        await asyncio.sleep(0.05)


def _reachable(args: argparse.Namespace) -> tuple[str, int]:
    """(host, gossip port) other machines reach the detached agent at, as it advertises itself."""
    from meshtrain.agent.control import socket_path

    with contextlib.suppress(
        OSError, asyncio.TimeoutError, WireError, UserError, StopIteration, KeyError, ValueError
    ):
        snap = asyncio.run(asyncio.wait_for(fetch_status(socket_path()), 5.0))
        me = next(n for n in snap.get("nodes", []) if n.get("id") == snap.get("self"))
        host, _, port = str(me["addr"]).rpartition(":")
        return host, int(port)
    return args.host, args.port
