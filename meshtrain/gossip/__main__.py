"""`python -m meshtrain.gossip`: run one bare gossip node and print its view as JSON lines.

A debugging and test tool (the real entry point is `meshtrain join`): one line when
started, then one per membership event with this node's count of live members.
SIGTERM/SIGINT make it leave gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence

from meshtrain.errors import UserError
from meshtrain.gossip.discovery import DISCOVERY_PORT
from meshtrain.gossip.member import MemberEvent
from meshtrain.gossip.meta import local_meta
from meshtrain.gossip.node import GossipNode, run
from meshtrain.gossip.profiles import PROFILES


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host, int(port)


def _say(**fields: object) -> None:
    print(json.dumps({"t": round(time.monotonic(), 3), **fields}), flush=True)


async def _main(args: argparse.Namespace) -> None:
    node = GossipNode(
        args.name,
        meta={**local_meta(), "pid": os.getpid()},
        profile=PROFILES[args.profile],
        host=args.host,
        port=args.port,
        seeds=args.seed,
        interface=args.interface,
        discovery=not args.no_discovery,
        discovery_port=args.discovery_port,
    )

    def on_event(ev: MemberEvent) -> None:
        m = ev.member
        live = sum(1 for x in node.members() if x.state in ("alive", "suspect"))
        _say(event=ev.kind, member=m.id, addr=list(m.addr), incarnation=m.incarnation, live=live)

    node.subscribe(on_event)
    await node.start()
    _say(event="started", member=node.id, addr=[node.host, node.port], incarnation=node.incarnation, live=1)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await node.leave()
    _say(event="closed", member=node.id, drops=node.drops)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m meshtrain.gossip", description=__doc__)
    ap.add_argument("--name", required=True)
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=7946)
    ap.add_argument("--seed", type=_addr, action="append", default=[], help="host:port (repeatable)")
    ap.add_argument("--profile", default="lan", choices=sorted(PROFILES))
    ap.add_argument("--interface")
    ap.add_argument("--no-discovery", action="store_true")
    ap.add_argument("--discovery-port", type=int, default=DISCOVERY_PORT)
    args = ap.parse_args(argv)
    try:
        run(_main(args))
    except UserError as exc:
        print(f"meshtrain: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
