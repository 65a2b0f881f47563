"""`meshtrain cancel JOB`: end a job on every node, from any node (a second cancel is a no-op with a note)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any


def add_parser(sub: Any) -> None:
    cancel = sub.add_parser("cancel", help="cancel a job of the mesh, from any node")
    cancel.add_argument("job", metavar="JOB", help="the job's id (`meshtrain jobs` lists them)")
    cancel.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from meshtrain.cli.job_stream import ask

    reply = asyncio.run(ask("mesh.cancel", job=args.job))
    print(reply.get("message") or f"cancelling job {args.job}")
    return 0
