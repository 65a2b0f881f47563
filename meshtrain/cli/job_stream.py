"""How a command follows a job through its agent: `run` (foreground or `--detach`), `attach`, `logs`.

The agent streams `log` frames (workers' output lines) and `event` frames
(job snapshots: the history so far first, then what follows) and ends with a
`reply` carrying the job's result. The job lives on the mesh, not in this
process: in `run` the first Ctrl-C asks the mesh to cancel the job (and says
so), in `attach` and `logs --follow` Ctrl-C only stops watching. If this
machine's agent dies the job goes on elsewhere, and this says so in one line.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any, Protocol

from meshtrain.errors import UserError, WireError

LOST_AGENT = "lost this machine's agent; the job goes on: meshtrain attach {job} on another node"


class Sink(Protocol):
    async def log(self, node: str, rank: int, stream: str, line: str) -> None: ...

    async def snapshot(self, snap: dict[str, Any]) -> None: ...


def note(text: str) -> None:
    print(f"meshtrain: {text}", file=sys.stderr, flush=True)


async def follow(conn: Any, sink: Sink, *, job: str | None, on_interrupt: str) -> dict[str, Any]:
    """Render the agent's stream into `sink` until its reply (returned); `on_interrupt`: cancel | detach."""
    from meshtrain.agent.control import check_reply
    from meshtrain.wire import StreamClosed

    loop = asyncio.get_running_loop()
    known = {"job": job}
    done: asyncio.Future[dict[str, Any]] = loop.create_future()
    hits = {"n": 0}

    def interrupted() -> None:
        hits["n"] += 1
        name = known["job"] or "the job"
        if on_interrupt == "cancel" and hits["n"] == 1:
            note(f"Ctrl-C: cancelling {name} on every node (Ctrl-C again quits this view at once)")
            asyncio.ensure_future(conn.send("request", {"op": "cancel"}))
            return
        if on_interrupt == "cancel":
            os._exit(130)
        if not done.done():
            done.set_result({"kind": "reply", "ok": True, "detached": True, "job": known["job"]})

    loop.add_signal_handler(signal.SIGINT, interrupted)

    async def read() -> dict[str, Any]:
        while True:
            try:
                header, _ = await conn.recv()
            except (StreamClosed, WireError, ConnectionError, OSError):
                raise UserError(LOST_AGENT.format(job=known["job"] or "JOB")) from None
            kind = header.get("kind")
            if kind == "log":
                await sink.log(
                    str(header.get("node")),
                    int(header.get("rank", 0)),
                    str(header.get("stream")),
                    str(header.get("line", "")),
                )
            elif kind == "event" and isinstance(header.get("snapshot"), dict):
                known["job"] = known["job"] or header["snapshot"].get("job")
                await sink.snapshot(header["snapshot"])
            elif kind == "reply":
                check_reply(header, "the agent on this machine")
                return header

    reader = asyncio.ensure_future(read())
    try:
        await asyncio.wait({reader, done}, return_when=asyncio.FIRST_COMPLETED)
        if done.done():
            return done.result()
        return reader.result()
    finally:
        reader.cancel()
        loop.remove_signal_handler(signal.SIGINT)
        await conn.close()


async def open_local(op: str, payload: bytes = b"", **fields: Any) -> Any:
    """The first request of a stream to this machine's agent; NO_AGENT when there is none."""
    from meshtrain.agent.control import open_request, socket_path
    from meshtrain.cli.agent_link import NO_AGENT

    path: Path = socket_path()
    if not path.exists():
        raise UserError(NO_AGENT)
    try:
        return await open_request(path, op, payload, **fields)
    except OSError:
        raise UserError(NO_AGENT) from None


async def ask(op: str, **fields: Any) -> dict[str, Any]:
    """One request, one reply, to this machine's agent."""
    from meshtrain.agent.control import check_reply
    from meshtrain.wire import StreamClosed

    conn = await open_local(op, **fields)
    try:
        header, _ = await conn.recv()
    except (StreamClosed, WireError, ConnectionError):
        raise UserError("the agent on this machine closed the connection without answering") from None
    finally:
        await conn.close()
    return check_reply(header, "the agent on this machine")


def run_detached(request: Any, local: int | None) -> int:
    """`run --detach`: submit to this machine's agent, print the job's id once it runs, return."""
    if local is not None:
        raise UserError("--detach needs this machine's agent (`meshtrain join`): drop --local")

    async def go() -> dict[str, Any]:
        from meshtrain.agent.control import check_reply
        from meshtrain.wire import StreamClosed

        conn = await open_local("run", request.bundle, **request.job_spec.to_wire(), detach=True)
        try:
            while True:
                try:
                    header, _ = await conn.recv()
                except (StreamClosed, WireError, ConnectionError):
                    raise UserError("the agent on this machine closed the connection") from None
                if header.get("kind") == "reply":
                    return check_reply(header, "the agent on this machine")
        finally:
            await conn.close()

    reply = asyncio.run(go())
    job = reply.get("job")
    if reply.get("detached"):
        print(job)
        note(f"job {job} runs on the mesh: meshtrain attach {job} (any node), meshtrain cancel {job}")
        return 0
    return report_end(reply, str(job))


def report_end(reply: dict[str, Any], job: str) -> int:
    """The job's ending, as `run` prints it: the traceback once, then one line; the job's exit code."""
    state, message = reply.get("state"), reply.get("message")
    if state == "failed":
        if reply.get("traceback"):
            print(str(reply["traceback"]).rstrip(), file=sys.stderr)
        print(f"meshtrain: job {job} failed: {message}", file=sys.stderr)
    elif state == "cancelled":
        print(f"meshtrain: job {job} cancelled: {message}", file=sys.stderr)
    else:
        print(f"job {job} {state or 'ended'}")
    code = reply.get("exit_code")
    return int(code) if isinstance(code, int) else {"done": 0, "cancelled": 130}.get(str(state), 1)
