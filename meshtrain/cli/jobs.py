"""`meshtrain jobs`: every job of the mesh, running and finished, as any node sees it (or --json)."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any


def add_parser(sub: Any) -> None:
    jobs = sub.add_parser("jobs", help="the mesh's jobs, running and finished, from any node")
    jobs.add_argument("--json", action="store_true", help="print them as JSON")
    jobs.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from meshtrain.cli.job_stream import ask

    rows = asyncio.run(ask("mesh.jobs")).get("jobs") or []
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no jobs yet: start one with `meshtrain run SCRIPT`")
        return 0
    print(table(rows))
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    from meshtrain.ui.format import clock

    head = ("JOB", "SCRIPT", "STATE", "NODES", "STEP", "STARTED", "FINISHED", "EXIT")
    lines = [head]
    for r in rows:
        epoch, epochs = r.get("epoch") or 0, r.get("epochs") or 0
        step = f"{r.get('step') or 0}" + (f" (epoch {epoch}/{epochs})" if epochs else "")
        reason = r.get("exit") or r.get("message") or ("ok" if r.get("state") == "done" else "")
        lines.append(
            (
                str(r.get("job")),
                str(r.get("script") or ""),
                str(r.get("state") or "?"),
                ",".join(r.get("nodes") or []) or "-",
                step,
                clock(r.get("started")) if r.get("started") else "-",
                clock(r.get("finished")) if r.get("finished") else "-",
                str(reason)[:60],
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines
    )
