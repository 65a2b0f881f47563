"""`meshtrain leave`: ask this machine's agent to leave the mesh gracefully, and wait until it has."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from meshtrain.cli.agent_link import NO_AGENT, agent_alive
from meshtrain.errors import UserError

LEAVE_WAIT_S = 10.0


def add_parser(sub: Any) -> None:
    leave = sub.add_parser("leave", help="stop this machine's agent; it leaves the mesh gracefully")
    leave.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from meshtrain.agent.control import call, socket_path

    path = socket_path()

    async def go() -> dict[str, Any] | None:
        if await agent_alive(path) is None:
            return None
        return await call(path, "leave")

    if asyncio.run(go()) is None:
        raise UserError(NO_AGENT)
    deadline = time.monotonic() + LEAVE_WAIT_S
    while path.exists() and time.monotonic() < deadline:  # its control socket goes when it has left
        time.sleep(0.05)
    print("the agent on this machine left the mesh")
    return 0
