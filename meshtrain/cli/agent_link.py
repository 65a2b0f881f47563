"""How a command reaches this machine's agent: its unix socket in the state directory.

The agent side of the socket is meshtrain.agent.control; this module only
asks (ping, status) and turns "nobody there" into the one line users see.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from meshtrain.errors import UserError, WireError

NO_AGENT = "no agent is running on this machine: start one with `meshtrain join`"


def use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def agent_alive(path: Path) -> dict[str, Any] | None:
    """The local agent's ping reply, or None when none is listening."""
    from meshtrain.agent.control import call

    if not path.exists():
        return None
    try:
        return await asyncio.wait_for(call(path, "ping"), 5.0)
    except (OSError, asyncio.TimeoutError, WireError):
        return None


async def fetch_status(path: Path) -> dict[str, Any]:
    from meshtrain.agent.control import call

    try:
        reply = await call(path, "status", who="the agent on this machine")
    except (OSError, WireError):
        raise UserError(NO_AGENT) from None
    snap = reply.get("snapshot")
    if not isinstance(snap, dict):
        raise UserError("the agent on this machine sent no snapshot")
    return snap


def slow_blas_warning() -> str | None:
    """The line `doctor` gives when MLX would train on its slow reference BLAS here (else None);
    `join` and `run` say it before training starts (meshtrain.blas.slow_warning)."""
    from meshtrain import blas

    return blas.slow_warning()
