"""`meshtrain dashboard [[HOST:]PORT]`: the mesh and its jobs in a web browser, live.

A client of this machine's agent (its 0600 control socket): it reads the
same snapshots `meshtrain status --json` and the live job view read, keeps
their history for the charts, and serves the page (meshtrain.dashboard).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

from meshtrain.errors import UserError


def add_parser(sub: Any) -> None:
    from meshtrain.dashboard import DEFAULT_HOST, DEFAULT_PORT, listen_address

    dash = sub.add_parser("dashboard", help="serve a live web page of the mesh and its jobs")
    dash.add_argument(
        "address",
        nargs="?",
        type=listen_address,
        default=(DEFAULT_HOST, DEFAULT_PORT),
        metavar="[HOST:]PORT",
        help=f"where to listen (default {DEFAULT_HOST}:{DEFAULT_PORT}; any non-loopback HOST needs a login)",
    )
    dash.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from meshtrain.cli.agent_link import use_uvloop
    from meshtrain.dashboard import require_aiohttp

    require_aiohttp()
    use_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_serve(args.address))
    return 0


async def _serve(address: tuple[str, int]) -> int:
    from meshtrain.agent.control import socket_path
    from meshtrain.cli.agent_link import NO_AGENT, agent_alive
    from meshtrain.dashboard import banner, login_secret_for
    from meshtrain.dashboard.auth import is_loopback
    from meshtrain.dashboard.server import Dashboard
    from meshtrain.dashboard.source import AgentSource

    path = socket_path()
    if await agent_alive(path) is None:
        raise UserError(NO_AGENT)
    host, port = address
    keyring = None
    if not is_loopback(host):
        from meshtrain.security import load_keyring

        keyring, _ = load_keyring(create=False)  # the login secret is derived from the mesh's
    dash = Dashboard(AgentSource(path), host, port, login_secret=login_secret_for(keyring))
    await dash.start()
    print(banner(dash.url, dash.open, dash.login_secret), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await dash.close()
    return 0
