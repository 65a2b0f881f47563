"""`meshtrain attach [JOB]`: the live view of a job of the mesh, from any node, its history so far first.

Ctrl-C detaches (the job goes on); a finished job prints its summary. With no
JOB, the one running job (or the newest one).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from meshtrain.cli.agent_link import use_uvloop


def add_parser(sub: Any) -> None:
    attach = sub.add_parser("attach", help="watch a job of the mesh live, from any node (Ctrl-C detaches)")
    attach.add_argument("job", nargs="?", metavar="JOB", help="the job's id (default: the running one)")
    attach.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from meshtrain.cli.job_stream import follow, note, open_local, report_end
    from meshtrain.cli.run import Renderer

    use_uvloop()
    renderer = Renderer()

    async def go() -> dict[str, Any]:
        conn = await open_local("attach", job=args.job)
        with renderer.view:
            return await follow(conn, renderer, job=args.job, on_interrupt="detach")

    reply = asyncio.run(go())
    job = reply.get("job") or args.job or "the job"
    if reply.get("detached"):
        note(f"detached from {job}; it goes on (meshtrain attach {job} to watch it again)")
        return 0
    return report_end(reply, str(job))
