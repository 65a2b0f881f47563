"""The web dashboard: the mesh and its jobs in a browser, live (`meshtrain dashboard`, `join --dashboard`).

`board` folds the agent's snapshots (the ones the terminal views read) into
what the page shows, `auth` decides who may look and act, `source` is where
the snapshots come from (the local agent's control socket, or the agent the
dashboard runs in), `server` is the aiohttp application, and `static/` the
page (plain JavaScript and the vendored uPlot: no CDN, nodes are often
offline). Needs the optional extra: `pip install 'meshtrain[dashboard]'`.
"""

from __future__ import annotations

import argparse
from typing import Any

from meshtrain.errors import UserError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7960
MISSING_EXTRA = "the dashboard needs aiohttp: pip install 'meshtrain[dashboard]'"


def listen_address(text: str) -> tuple[str, int]:
    """`[HOST:]PORT` (HOST defaults to 127.0.0.1: the page stays on this machine unless told)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = DEFAULT_HOST, text
    host = host.strip("[]") or DEFAULT_HOST
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"not [HOST:]PORT: {text!r}")
    return host, int(port)


def require_aiohttp() -> None:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise UserError(MISSING_EXTRA) from None


def login_secret_for(keyring: Any | None) -> str | None:
    from meshtrain.dashboard.auth import login_secret

    return login_secret(keyring.primary) if keyring is not None else None


def banner(url: str, open_: bool, secret: str | None) -> str:
    """The lines the command prints once: where the page is and, off loopback, the login secret."""
    if open_:
        return f"dashboard: {url} (this machine only; `--dashboard 0.0.0.0:PORT` to share it, with a login)"
    return (
        f"dashboard: {url} (on every address of this machine: log in with {secret} -- "
        "derived from the mesh secret, the same on every node; keep it like the secret)"
    )


async def start_in_agent(agent: Any, address: tuple[str, int]) -> Any:
    """`join --dashboard`: serve the page from inside the running agent; returns the Dashboard."""
    require_aiohttp()
    from meshtrain.dashboard.server import Dashboard
    from meshtrain.dashboard.source import InAgentSource

    host, port = address
    dash = Dashboard(InAgentSource(agent), host, port, login_secret=login_secret_for(agent.keyring))
    await dash.start()
    print(banner(dash.url, dash.open, dash.login_secret), flush=True)
    return dash
