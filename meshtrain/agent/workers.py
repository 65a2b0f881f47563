"""The participant's side of a job: one worker subprocess, tied to one control stream.

The coordinator opens a control connection with `job.prepare` (member id,
options, bundle). This node unpacks the bundle, starts `python -m
meshtrain.worker`, waits for its ring port and answers with it. The same
connection then carries `job.view` (the job's membership views, each a ring
generation) and `job.cancel` one way, and the worker's output lines, metric
batches, "joinable" (a joiner is ready to train), crash report and exit
code the other way. The
connection is the job's lifeline: if the coordinator goes away, the worker
is killed, so no orphan keeps a GPU or a core busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from meshtrain import env as env_names
from meshtrain.agent.bundle import Bundle
from meshtrain.agent.control import Conn
from meshtrain.agent.hang import CHECK_S, HangWatch, floor_s, is_stopped
from meshtrain.errors import WireError
from meshtrain.jobspec import JobOptions, JobSpecError, WorkerSpec
from meshtrain.sysinfo import oom_kills
from meshtrain.wire import StreamClosed

KILL_GRACE_S = 3.0
STDERR_TAIL = 20


def worker_env(base: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """The environment of a worker: fast BLAS for MLX on Linux, unbuffered output, agent extras."""
    env = dict(base)
    try:
        from meshtrain import blas
    except ImportError:  # pragma: no cover - blas.py lands separately
        pass
    else:
        env = dict(blas.child_env(env))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class _ReportProtocol(asyncio.Protocol):
    """Decodes the worker's msgpack report stream into a queue (None marks its end)."""

    def __init__(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._queue = queue
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=16 * 1024 * 1024)

    def data_received(self, data: bytes) -> None:
        self._unpacker.feed(data)
        for message in self._unpacker:
            if isinstance(message, dict):
                self._queue.put_nowait(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._queue.put_nowait(None)


@dataclass
class HostedWorker:
    """What the agent shows about a worker it hosts (for the mesh snapshot)."""

    job: str
    rank: int
    script: str
    metrics: dict[str, Any]
    ring_drops: dict[str, int] = field(default_factory=dict)  # ring hellos its listener refused
    ring_authenticated: bool | None = None  # None until the ring formed
    member: str = ""  # its id in the job's membership views
    stdin: Any = None  # the worker's stdin (views and checkpoint messages are JSON lines on it)

    def send_line(self, obj: dict[str, Any]) -> bool:
        """Write one JSON line to the worker; False when it is gone."""
        if self.stdin is None or self.stdin.is_closing():
            return False
        self.stdin.write((json.dumps(obj) + "\n").encode())
        return True


async def host_worker(
    header: dict[str, Any],
    payload: bytes,
    conn: Conn,
    *,
    node: str,
    bind: str,
    jobs_dir: Path,
    extra_env: dict[str, str],
    on_change: Callable[[HostedWorker, bool], None],
    on_report: Callable[[HostedWorker, dict[str, Any]], None] | None = None,
    before_start: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None,
    prepare_data: Callable[[dict[str, Any], Callable[[str], Awaitable[None]]], Awaitable[Path | None]]
    | None = None,
) -> None:
    """Serve one `job.prepare` connection until the worker has exited and been reported.

    `on_report` gets the worker's reports this module does not handle itself
    (checkpoint messages); `before_start(job, options)` runs before the worker
    starts (fetching a checkpoint to resume from, say); `prepare_data(options, log)`
    brings a `run --data` job's data to this node (meshtrain.agent.data_transfer),
    which then appears at its relative path in the worker's directory.
    """
    job, rank = str(header["job"]), int(header["rank"])
    member = str(header.get("member") or node)
    try:
        job_options = JobOptions.from_wire(header.get("options"))
    except JobSpecError as exc:
        await conn.reply(False, error="spec", message=f"{node} cannot take job {job}: {exc}")
        return
    options = job_options.to_wire()  # the hooks below (checkpoints, data) read the wire's dict
    try:
        bundle = Bundle.unpack(payload)
        workdir = jobs_dir / f"{job}-{member}"
        script = bundle.extract(workdir)
    except (ValueError, OSError, msgpack.UnpackException) as exc:
        await conn.reply(False, error="bundle", message=f"cannot unpack the job's files on {node}: {exc}")
        return
    spec = WorkerSpec(
        job=job,
        rank=rank,
        size=int(header["size"]),
        node=node,
        script=str(script),
        args=tuple(str(a) for a in header.get("args", [])),
        generation=int(header.get("generation", 0)),
        bind=bind,
        member=member,
        options=job_options,
    )
    if before_start is not None:
        try:
            await before_start(job, options)
        except Exception as exc:  # noqa: BLE001 - one line to the coordinator, never a dead agent
            await conn.reply(False, error="prepare", message=f"cannot prepare the job on {node}: {exc}")
            return
    data_env: dict[str, str] = {}
    data_link: Path | None = None
    if prepare_data is not None and isinstance(options.get("data"), dict):

        async def say(line: str) -> None:
            await conn.send("log", {"node": node, "rank": rank, "stream": "stdout", "line": line})

        try:
            where = await prepare_data(options, say)
            if where is not None:
                from meshtrain.agent.data_transfer import link_into

                data_link = link_into(workdir, str(options["data"].get("path") or where.name), where)
                data_env[env_names.DATA_PATH] = str(data_link)
        except Exception as exc:  # noqa: BLE001 - one line to the coordinator, never a dead agent
            await conn.reply(False, error="data", message=str(exc))
            shutil.rmtree(workdir, ignore_errors=True)
            return
    read_fd, write_fd = os.pipe()
    spec = dataclasses.replace(spec, report_fd=write_fd)
    ooms_before = oom_kills()
    env = worker_env(dict(os.environ), {**extra_env, **data_env, **spec.to_env()})
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meshtrain.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=(write_fd,),
            env=env,
            cwd=str(script.parent),
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
    hosted = HostedWorker(
        job=job, rank=rank, script=str(header.get("script", bundle.script)), metrics={}, member=member
    )
    hosted.stdin = proc.stdin
    on_change(hosted, True)
    reports: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(lambda: _ReportProtocol(reports), os.fdopen(read_fd, "rb", 0))
    try:
        await _serve(proc, conn, reports, hosted, node, on_report, ooms_before)
    finally:
        transport.close()
        await _kill(proc)
        on_change(hosted, False)
        if data_link is not None:
            with contextlib.suppress(OSError):
                data_link.unlink()  # the data is not the script's output: it stays in the cache only
        keep_outputs(workdir, set(bundle.files), job, member)
        shutil.rmtree(workdir, ignore_errors=True)


def keep_outputs(workdir: Path, shipped: set[str], job: str, member: str) -> Path | None:
    """Move what the script wrote into its (temporary) directory to the job's output directory on
    this node (meshtrain.paths.outputs_dir) before that directory is deleted: a script that saves
    `model.safetensors` with a relative path must not lose it. Returns where they went, if anywhere."""
    from meshtrain.paths import outputs_dir

    written = [
        p
        for p in sorted(workdir.rglob("*"))
        if p.is_file()
        and p.relative_to(workdir).as_posix() not in shipped
        and "__pycache__" not in p.relative_to(workdir).parts
    ]
    if not written:
        return None
    target = outputs_dir(job, member)
    for path in written:
        dest = target / path.relative_to(workdir)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(dest))
        except OSError as exc:
            print(f"job {job}: could not keep {path.name} in {target}: {exc}", file=sys.stderr, flush=True)
    print(f"job {job}: {len(written)} file(s) the script wrote are kept in {target}", flush=True)
    return target


async def _serve(
    proc: asyncio.subprocess.Process,
    conn: Conn,
    reports: asyncio.Queue[dict[str, Any] | None],
    hosted: HostedWorker,
    node: str,
    on_report: Callable[[HostedWorker, dict[str, Any]], None] | None = None,
    ooms_before: int | None = None,
) -> None:
    assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
    stderr_tail: list[str] = []
    hang = HangWatch(floor_s())  # a stopped worker is removed from the job (meshtrain.agent.hang)
    first = await reports.get()
    if first is None or first.get("k") != "ready":
        code = await proc.wait()
        err = (await proc.stderr.read()).decode(errors="replace").strip().splitlines()[-STDERR_TAIL:]
        await conn.reply(
            False,
            error="worker",
            message=f"the worker on {node} exited ({code}) before it was ready"
            + (f": {err[-1]}" if err else ""),
            stderr="\n".join(err),
        )
        return
    await conn.reply(True, ring_port=first.get("ring_port"))

    async def lines(stream: asyncio.StreamReader, name: str) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip("\n")
            if name == "stderr":
                stderr_tail.append(text)
                del stderr_tail[:-STDERR_TAIL]
            await conn.send("log", {"node": node, "rank": hosted.rank, "stream": name, "line": text})

    async def metrics() -> None:
        while (message := await reports.get()) is not None:
            if message.get("k") == "m":
                hang.reported(time.monotonic())
                batch = message.get("batch") or []
                for entry in batch:  # every report: a metric reported once (val_loss) is not lost
                    if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], dict):
                        hosted.metrics.update(entry[1])
                await conn.send("event", {"type": "metrics", "rank": hosted.rank, "batch": batch})
            elif message.get("k") == "ring":
                drops = message.get("drops")
                if isinstance(drops, dict):
                    hosted.ring_drops = {str(k): int(v) for k, v in drops.items() if isinstance(v, int)}
                if "authenticated" in message:
                    hosted.ring_authenticated = bool(message["authenticated"])
            elif message.get("k") == "formed":  # the ring of a view formed: the job's quorum counts it
                formed = {k: message.get(k) for k in ("generation", "members")}
                await conn.send("event", {"type": "formed", **formed})
            elif message.get("k") == "joinable":
                await conn.send("event", {"type": "joinable", "rank": hosted.rank, "member": hosted.member})
            elif message.get("k") == "adopted":  # a joiner holds the training state now
                await conn.send("event", {"type": "adopted", "rank": hosted.rank, "member": hosted.member})
            elif message.get("k") == "ckpt" and on_report is not None:
                on_report(hosted, message)
            elif message.get("k") == "crash":
                await conn.send(
                    "event",
                    {
                        "type": "crash",
                        "rank": hosted.rank,
                        "node": node,
                        **{k: message.get(k) for k in ("summary", "traceback", "secondary", "rollback")},
                    },
                )

    async def commands() -> None:
        while True:
            try:
                header, _ = await conn.recv()
            except (StreamClosed, WireError, ConnectionError):
                await _kill(proc)  # the coordinator is gone: so is the job
                return
            if header.get("op") == "job.view" and isinstance(header.get("view"), dict):
                stdin.write((json.dumps({"view": header["view"]}) + "\n").encode())
                with contextlib.suppress(ConnectionError):
                    await stdin.drain()
            elif header.get("op") == "job.cancel":
                await _kill(proc)
                return  # done: back in recv, a cancel that wait_for swallowed (py3.11) would hang _serve

    async def watch_hang() -> None:
        while proc.returncode is None:
            await asyncio.sleep(CHECK_S)
            held = hang.observe(time.monotonic(), is_stopped(proc.pid))
            if held is not None:
                line = f"meshtrain: this worker was stopped for {held:.0f}s (hung): it leaves the job"
                with contextlib.suppress(ConnectionError, WireError):
                    await conn.send(
                        "log", {"node": node, "rank": hosted.rank, "stream": "stderr", "line": line}
                    )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # a lost worker now; the node rejoins as a new one
                return

    stdin = proc.stdin
    command_task = asyncio.create_task(commands())
    hang_task = asyncio.create_task(watch_hang())
    try:
        await asyncio.gather(lines(proc.stdout, "stdout"), lines(proc.stderr, "stderr"), metrics())
        code = await proc.wait()
        ooms_now = oom_kills() if code == -signal.SIGKILL else None
        await conn.send(
            "event",
            {
                "type": "exit",
                "rank": hosted.rank,
                "node": node,
                "code": code,
                "stderr": "\n".join(stderr_tail),
                "oom": ooms_now is not None and ooms_before is not None and ooms_now > ooms_before,
            },
        )
    finally:
        command_task.cancel()
        hang_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await command_task


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the worker's process group, SIGKILL it if it lingers."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), KILL_GRACE_S)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
