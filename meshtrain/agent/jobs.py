"""The coordinator's side of a job: place it, start a worker per node, follow it to the end.

The agent the user submitted to coordinates: it waits until placement says
ready (or `--wait` runs out), sends `job.prepare` with the bundle to every
chosen node (itself included, over the same TCP path), hands everyone the
roster of ring addresses (`job.start`), then folds the workers' logs and
metrics into a `JobState` and streams it to the submitter's sink.

Ending a job is where users get hurt, so the rules are explicit:
- the first failure cancels every other worker;
- the failure shown is a worker's own exception (a "primary" crash) in
  preference to the `PeerLost` echoes it causes elsewhere, and it is shown
  once, with one traceback;
- workers we killed ourselves are not failures;
- the submitter going away (Ctrl-C, closed socket) cancels the job everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshtrain import PROTOCOL_VERSION
from meshtrain.agent.control import Conn, open_request
from meshtrain.agent.jobstate import JobState
from meshtrain.agent.placement import Candidate, Decision, Request, place
from meshtrain.errors import WireError
from meshtrain.wire import StreamClosed

SNAPSHOT_INTERVAL_S = 0.5
PREPARE_TIMEOUT_S = 120.0
EXIT_WAIT_S = 10.0
MAX_INCARNATIONS = 4  # workers started on one node for one job (the first and three replacements)


def new_job_id() -> str:
    return "j" + secrets.token_hex(3)


@dataclass(frozen=True)
class JobRequest:
    """What `meshtrain run` asked for; `bundle` is the packed script directory."""

    script: str
    args: list[str]
    bundle: bytes
    nodes: str | None = None
    min_nodes: int | None = None
    wait: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)  # run options for the workers (checkpoints, ledger)


@dataclass
class JobResult:
    """How a job ended; `traceback` is the one to show (the primary failure's)."""

    state: str  # done | failed | cancelled
    message: str | None = None
    traceback: str | None = None

    @property
    def exit_code(self) -> int:
        return {"done": 0, "cancelled": 130}.get(self.state, 1)


class JobSink(Protocol):
    """Where a running job's output goes (the CLI's renderer, or a control stream to it)."""

    async def log(self, node: str, rank: int, stream: str, line: str) -> None: ...

    async def snapshot(self, snap: dict[str, Any]) -> None: ...


class MembershipView(Protocol):
    """What the coordinator needs from the agent's membership."""

    def candidates(self) -> list[Candidate]: ...

    def endpoint(self, name: str) -> tuple[str, int] | None:
        """(host, control port) of a member."""
        ...

    async def changed(self, timeout: float) -> None:
        """Return when membership changes, or after `timeout` seconds."""
        ...


@dataclass
class _Participant:
    name: str
    rank: int  # a stable index for the live view (never reused), not the ring rank
    host: str
    control_port: int
    member: str = ""  # the worker's id in membership views: the node name, "~k" once re-admitted
    in_view: bool = False
    lost: bool = False
    conn: Conn | None = None
    ring_port: int | None = None
    exit_code: int | None = None
    killed: bool = False
    crash: dict[str, Any] | None = None
    stderr: str = ""


@dataclass
class _Failure:
    order: int
    primary: bool
    message: str
    traceback: str | None


@dataclass
class JobRunner:
    """Runs one job to its end; `cancel()` may be called from anywhere on the loop."""

    request: JobRequest
    membership: MembershipView
    job: str = field(default_factory=new_job_id)
    protocol: int = PROTOCOL_VERSION
    clock: Callable[[], float] = time.time
    # experiment tracking (meshtrain.tracking): called with (member, t, metrics) for every report
    on_metrics: Callable[[str, float, dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        self.state = JobState(job=self.job, script=self.request.script, started=self.clock())
        self._cancel = asyncio.Event()
        self._cancel_reason = "cancelled by the user"
        self._parts: list[_Participant] = []
        self._failures: list[_Failure] = []
        self._view_version = 0
        self._view_dirty = False
        self._joining: set[str] = set()
        self._pumps: list[asyncio.Task[None]] = []

    def cancel(self, reason: str = "cancelled by the user") -> None:
        self._cancel_reason = reason
        self._cancel.set()

    def add_event(self, event: dict[str, Any]) -> None:
        self.state.add_event(event)

    async def run(self, sink: JobSink) -> JobResult:
        try:
            return await self._run(sink)
        finally:
            for p in self._parts:
                if p.conn is not None:
                    await p.conn.close()

    async def _run(self, sink: JobSink) -> JobResult:
        decision = await self._place(sink)
        if decision.kind != "ready":
            if self._cancel.is_set():
                return await self._end(sink, JobResult("cancelled", self._cancel_reason))
            return await self._end(sink, JobResult("failed", decision.message))
        self.state.assign(list(decision.nodes))
        self.state.set_state("starting", f"starting on {', '.join(decision.nodes)}", self.clock())
        await sink.snapshot(self.state.snapshot(self.clock()))
        error = await self._prepare(list(decision.nodes))
        if error is not None:
            return await self._end(sink, JobResult("failed", error))
        for p in self._parts:
            p.in_view = True
        await self._send_view()
        self.state.set_state("running", None, self.clock())
        await sink.snapshot(self.state.snapshot(self.clock()))
        return await self._end(sink, await self._follow(sink))

    async def _end(self, sink: JobSink, result: JobResult) -> JobResult:
        self.state.set_state(result.state, result.message, self.clock())
        await sink.snapshot(self.state.snapshot(self.clock()))
        return result

    async def _place(self, sink: JobSink) -> Decision:
        req = Request.parse(self.request.nodes, self.request.min_nodes)
        deadline = self.clock() + max(0.0, self.request.wait)
        while True:
            timed_out = self.clock() >= deadline
            decision = place(self.membership.candidates(), req, self.protocol, timed_out=timed_out)
            if decision.kind != "wait" or self._cancel.is_set():
                return decision
            if self.state.message != decision.message:
                self.state.set_state("waiting", decision.message, self.clock())
                await sink.snapshot(self.state.snapshot(self.clock()))
            step = min(SNAPSHOT_INTERVAL_S, max(0.0, deadline - self.clock()))
            cancelled = asyncio.create_task(self._cancel.wait())
            change = asyncio.create_task(self.membership.changed(step))
            await asyncio.wait({cancelled, change}, return_when=asyncio.FIRST_COMPLETED)
            cancelled.cancel()
            change.cancel()
            if self._cancel.is_set():
                return Decision("error", message=self._cancel_reason)

    async def _prepare(self, nodes: Sequence[str]) -> str | None:
        """Start a worker on every node; the first error's one line, or None."""
        for rank, name in enumerate(nodes):
            endpoint = self.membership.endpoint(name)
            if endpoint is None:
                return f"node {name} left the mesh before the job started"
            self._parts.append(
                _Participant(name=name, rank=rank, host=endpoint[0], control_port=endpoint[1], member=name)
            )
        results = await asyncio.gather(*(self._prepare_one(p) for p in self._parts))
        return next((r for r in results if r is not None), None)

    async def _prepare_one(self, p: _Participant, joiner: bool = False) -> str | None:
        options = {**self.request.options, "joiner": joiner}
        try:
            p.conn = await open_request(
                (p.host, p.control_port),
                "job.prepare",
                self.request.bundle,
                protocol=self.protocol,
                keyring=getattr(self.membership, "keyring", None),  # the agent's mesh secret
                job=self.job,
                rank=p.rank,
                size=len(self._parts),
                args=self.request.args,
                script=self.request.script,
                generation=0,
                member=p.member,
                options=options,
            )
            header, _ = await asyncio.wait_for(p.conn.recv(), PREPARE_TIMEOUT_S)
        except (OSError, WireError, asyncio.TimeoutError) as exc:
            return f"cannot start the worker on {p.name}: {exc.__class__.__name__} {exc}".strip()
        if not header.get("ok"):
            if header.get("error") == "protocol":
                theirs = header.get("proto")
                return f"{p.name} runs meshtrain protocol {theirs} (this is {self.protocol}): upgrade it"
            return str(header.get("message") or f"{p.name} refused the job")
        p.ring_port = header.get("ring_port")
        return None

    async def _follow(self, sink: JobSink) -> JobResult:
        """Relay output until every worker has exited; keep the job's membership view current.

        A worker lost (its process killed, its node dead in gossip) leaves the
        view and the others go on (elastic training); a node that joins the mesh
        gets a worker, which enters the view once it can train. A worker's own
        exception ends the job: every worker would hit it.
        """
        self._queue: asyncio.Queue[tuple[_Participant, dict[str, Any] | None]] = asyncio.Queue()
        self._pumps = [asyncio.create_task(self._pump(p)) for p in self._parts]
        cancelling = False
        next_snapshot = self.clock() + SNAPSHOT_INTERVAL_S
        cancel_wait = asyncio.create_task(self._cancel.wait())
        change = asyncio.create_task(self.membership.changed(SNAPSHOT_INTERVAL_S))
        try:
            while any(p.exit_code is None and not p.lost for p in self._parts):
                timeout = max(0.0, next_snapshot - self.clock())
                getter = asyncio.create_task(self._queue.get())
                waiters = {getter, change} if cancelling else {getter, cancel_wait, change}
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    p, header = getter.result()
                    logs: list[tuple[str, int, str, str]] = []
                    self._handle(p, header, logs)
                    for node, rank, stream, line in logs:
                        await sink.log(node, rank, stream, line)
                else:
                    getter.cancel()
                if change.done():
                    change = asyncio.create_task(self.membership.changed(SNAPSHOT_INTERVAL_S))
                    if not cancelling:
                        await self._watch_membership()
                if not cancelling:
                    await self._update_view()
                if not cancelling and (self._failures or self._cancel.is_set()):
                    cancelling = True
                    await self._cancel_all()
                if self.clock() >= next_snapshot:
                    next_snapshot = self.clock() + SNAPSHOT_INTERVAL_S
                    await sink.snapshot(self.state.snapshot(self.clock()))
        finally:
            cancel_wait.cancel()
            change.cancel()
            for task in self._pumps:
                task.cancel()
        return self._verdict()

    async def _pump(self, p: _Participant) -> None:
        assert p.conn is not None
        while True:
            try:
                header, _ = await p.conn.recv()
            except (StreamClosed, WireError, ConnectionError):
                await self._queue.put((p, None))
                return
            await self._queue.put((p, header))

    def _finished_any(self) -> bool:
        return any(p.exit_code == 0 for p in self._parts)

    async def _send_view(self) -> None:
        """Number the current workers as the next view and send it to each of them."""
        self._view_version += 1
        members = sorted((p for p in self._parts if p.in_view and not p.lost), key=lambda p: p.rank)
        view = {
            "version": self._view_version,
            "members": [[p.member, p.host, p.ring_port or 0] for p in members],
            "min_nodes": self.request.min_nodes or 1,
        }
        self.state.generation = self._view_version
        for p in members:
            if p.conn is not None and p.exit_code is None:
                with contextlib.suppress(ConnectionError, WireError):
                    await p.conn.send("request", {"op": "job.view", "view": view})
        self._view_dirty = False

    async def _update_view(self) -> None:
        if self._view_dirty and not self._finished_any():
            await self._send_view()

    def _lose(self, p: _Participant, why: str) -> None:
        """An elastic loss: the worker leaves the view; the job goes on without it."""
        if p.lost:
            return
        p.lost = True
        if p.in_view:
            self._view_dirty = True
        self.state.remove_worker(p.rank)
        self.add_event({"t": self.clock(), "kind": "lost", "node": p.name, "detail": why})
        if p.conn is not None:
            asyncio.ensure_future(p.conn.close())
        if not any(not q.lost and q.exit_code is None for q in self._parts) and not self._finished_any():
            self._fail(False, f"every worker was lost; the last, {p.name} (rank {p.rank}): {why}", None)

    async def _watch_membership(self) -> None:
        """Drop workers whose node gossip declares gone; start a worker on each node that joined."""
        alive = {c.name for c in self.membership.candidates() if c.state in ("alive", "suspect")}
        for p in self._parts:
            if not p.lost and p.exit_code is None and p.name not in alive:
                self._lose(p, "its node left the mesh")
        if self._finished_any():
            return
        busy = {p.name for p in self._parts if not p.lost and p.exit_code is None}
        usable = {
            c.name for c in self.membership.candidates() if c.state == "alive" and c.protocol == self.protocol
        }
        for name in sorted(usable - busy):
            if name in self._joining or not self._admits(name):
                continue
            self._joining.add(name)
            asyncio.ensure_future(self._admit(name))

    def _admits(self, name: str) -> bool:
        """A node joining mid-job gets a worker when the user asked for all nodes (no --nodes); a node
        of the job whose worker was lost gets a new one -- at most MAX_INCARNATIONS, so a node whose
        worker keeps dying does not restart it forever."""
        incarnations = sum(1 for p in self._parts if p.name == name)
        if incarnations >= MAX_INCARNATIONS:
            return False
        return self.request.nodes is None or incarnations > 0

    async def _admit(self, name: str) -> None:
        try:
            endpoint = self.membership.endpoint(name)
            if endpoint is None:
                return
            incarnations = sum(1 for p in self._parts if p.name == name)
            member = name if incarnations == 0 else f"{name}~{incarnations}"
            index = max((p.rank for p in self._parts), default=-1) + 1
            p = _Participant(name=name, rank=index, host=endpoint[0], control_port=endpoint[1], member=member)
            error = await self._prepare_one(p, joiner=True)
            if error is not None or self._finished_any():
                if p.conn is not None:
                    await p.conn.close()
                return
            self._parts.append(p)
            self.state.add_worker(p.rank, name)
            self.add_event({"t": self.clock(), "kind": "joined", "node": name, "detail": f"worker {member}"})
            self._pumps.append(asyncio.create_task(self._pump(p)))
        finally:
            self._joining.discard(name)

    def _handle(
        self, p: _Participant, header: dict[str, Any] | None, logs: list[tuple[str, int, str, str]]
    ) -> bool:
        """Apply one frame from participant `p`; True once that worker is over."""
        if header is None:
            if p.exit_code is None and not p.killed:
                self._lose(p, "lost contact with its agent")
            return True
        kind = header.get("kind")
        if kind == "event" and header.get("type") == "joinable":
            if not p.in_view and not p.lost:
                p.in_view = True
                self._view_dirty = True
            return False
        if kind == "log":
            line = str(header.get("line", ""))
            self.state.add_log(p.name, line)
            logs.append((p.name, p.rank, str(header.get("stream", "stdout")), line))
        elif kind == "event" and header.get("type") == "metrics":
            for item in header.get("batch") or []:
                if isinstance(item, list) and len(item) == 2 and isinstance(item[1], dict):
                    self.state.report(p.rank, float(item[0]), item[1])
                    if self.on_metrics is not None:
                        self.on_metrics(p.member, float(item[0]), item[1])
        elif kind == "event" and header.get("type") == "crash":
            p.crash = header
            primary = not header.get("secondary")
            if not primary and not p.killed:
                self._lose(p, str(header.get("summary") or "lost its ring"))
            elif primary:  # a worker's own exception counts even while we cancel
                summary = str(header.get("summary") or "crashed")
                self._fail(
                    primary,
                    f"{p.name} (rank {p.rank}) failed: {summary}",
                    str(header.get("traceback") or "") or None,
                )
        elif kind == "event" and header.get("type") == "exit":
            p.exit_code = int(header.get("code", 1))
            p.stderr = str(header.get("stderr") or "")
            if p.exit_code < 0 and not p.killed:  # killed by a signal: an elastic loss
                self._lose(p, f"its worker was killed (signal {-p.exit_code})")
            elif p.exit_code != 0 and p.crash is None and not p.killed:
                tail = p.stderr.strip().splitlines()[-1:] if p.stderr.strip() else []
                detail = f": {tail[0]}" if tail else ""
                self._fail(
                    True, f"{p.name} (rank {p.rank}) exited with code {p.exit_code}{detail}", p.stderr or None
                )
            return True
        return False

    def _fail(self, primary: bool, message: str, traceback: str | None) -> None:
        self._failures.append(_Failure(len(self._failures), primary, message, traceback))

    async def _cancel_all(self) -> None:
        for p in self._parts:
            if p.exit_code is None and p.conn is not None:
                p.killed = True
                with contextlib.suppress(ConnectionError, WireError):
                    await p.conn.send("request", {"op": "job.cancel"})

    def _verdict(self) -> JobResult:
        if self._failures:
            best = min(self._failures, key=lambda f: (not f.primary, f.order))
            return JobResult("failed", best.message, best.traceback)
        if self._cancel.is_set():
            return JobResult("cancelled", self._cancel_reason)
        return JobResult("done", None)
