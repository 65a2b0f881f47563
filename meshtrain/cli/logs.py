"""`meshtrain logs JOB [--follow]`: a job's workers' output, from any node (kept: its last 2000 lines)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any


def add_parser(sub: Any) -> None:
    logs = sub.add_parser("logs", help="a job's output lines, from any node")
    logs.add_argument("job", metavar="JOB", help="the job's id (`meshtrain jobs` lists them)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(handler=main)


class _Printer:
    async def log(self, node: str, rank: int, stream: str, line: str) -> None:
        print(f"[{node}] {line}", flush=True)

    async def snapshot(self, snap: dict[str, Any]) -> None:
        return None


def main(args: argparse.Namespace) -> int:
    from meshtrain.cli.job_stream import follow, open_local

    async def go() -> dict[str, Any]:
        conn = await open_local("logs", job=args.job, follow=bool(args.follow))
        return await follow(conn, _Printer(), job=args.job, on_interrupt="detach")

    asyncio.run(go())
    return 0
