"""`meshtrain status`: the mesh and its jobs as this machine's agent sees them (once, live, or JSON)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from typing import Any

from meshtrain.cli.agent_link import NO_AGENT, fetch_status
from meshtrain.errors import UserError


def add_parser(sub: Any) -> None:
    status = sub.add_parser("status", help="the mesh and its jobs, as this machine's agent sees them")
    status.add_argument("--watch", action="store_true", help="keep showing it, live")
    status.add_argument("--json", action="store_true", help="print the mesh snapshot as JSON")
    status.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from meshtrain.agent.control import socket_path
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
