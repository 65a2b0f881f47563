"""The coordinator's side of a job: place it, start a worker per node, follow it to the end.

Coordination is a role, not a node (meshtrain.agent.job_coordination says who
holds it). The job's origin (the agent it was submitted to) places it: it
waits until placement says ready (or `--wait` runs out), sends `job.prepare`
with the bundle to every chosen node (itself included, over the same TCP
path) and numbers the first membership view. From then on whoever
coordinates folds the workers' reports (each hosting agent sends its
worker's output, metrics and exit to the coordinator, numbered, and resends
what the coordinator has not applied) into a `JobState`, keeps the job's
membership view current (a worker lost, a node joining, a pause below
`--min-nodes`) and publishes the job's record (`record()`) to every node of
the job. A node that takes over builds its `JobRunner` from that record
(`from_record`) and carries on from the same numbers.

Ending a job is where users get hurt, so the rules are explicit:
- the first failure cancels every other worker;
- the failure shown is a worker's own exception (a "primary" crash) in
  preference to the `PeerLost` echoes it causes elsewhere, and it is shown
  once, with one traceback;
- workers we killed ourselves are not failures;
- a cancel (from any node: `meshtrain cancel`, Ctrl-C in `run`) ends the job
  everywhere; the submitter merely going away does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshtrain import PROTOCOL_VERSION
from meshtrain.agent.control import open_request
from meshtrain.agent.job_coordination import FINAL_STATES, Succession, base_members, has_quorum
from meshtrain.agent.jobstate import JobState
from meshtrain.agent.placement import Candidate, Decision, Request, place
from meshtrain.errors import WireError
from meshtrain.jobspec import JobOptions, JobSpec

SNAPSHOT_INTERVAL_S = 0.5
ORPHAN_GRACE_S = 5.0  # joiners left alone: how long an "adopted" may take to arrive (it may be on its way)
OUT_OF_MEMORY = (
    "its worker ran out of memory (the kernel's out-of-memory killer stopped it): the job needs more "
    "than this node has; mesh.shard(..., stage=3) splits the training state across the nodes"
)
PREPARE_TIMEOUT_S = 120.0
EXIT_WAIT_S = 10.0
MAX_INCARNATIONS = 4  # workers started on one node for one job (the first and three replacements)
# automatic roll-backs to the newest checkpoint (a sharded job losing a node): at most MAX_ROLLBACKS
# within ROLLBACK_WINDOW_S, so a job whose every attempt fails stops, one whose laptops sleep at night goes on
MAX_ROLLBACKS = 3
ROLLBACK_WINDOW_S = 600.0
LOG_KEPT = 2000  # output lines of a job kept on every node of it (for `logs` and `attach`)


def new_job_id() -> str:
    return "j" + secrets.token_hex(3)


@dataclass(frozen=True)
class JobRequest:
    """What `meshtrain run` asked for (meshtrain.jobspec.JobSpec's fields) plus `bundle`, the packed
    script directory. `options` is typed (`JobOptions`); a caller that has the wire's dict (a sweep's
    trial options) may pass it, and it is read (and checked) by `JobOptions.from_wire`."""

    script: str
    args: list[str]
    bundle: bytes
    nodes: str | None = None
    min_nodes: int | None = None
    wait: float = 0.0
    options: JobOptions = field(default_factory=JobOptions)  # run options for every worker

    def __post_init__(self) -> None:
        if not isinstance(self.options, JobOptions):
            object.__setattr__(self, "options", JobOptions.from_wire(self.options))

    @property
    def job_spec(self) -> JobSpec:
        """The request without its bundle."""
        return JobSpec(
            script=self.script,
            args=tuple(self.args),
            nodes=self.nodes,
            min_nodes=self.min_nodes,
            wait=self.wait,
            options=self.options,
        )

    def spec(self) -> dict[str, Any]:
        """The request without its bundle, as the replicated record carries it (JobSpec's wire form)."""
        return self.job_spec.to_wire()

    @staticmethod
    def of(spec: JobSpec, bundle: bytes) -> JobRequest:
        return JobRequest(
            script=spec.script,
            args=list(spec.args),
            bundle=bundle,
            nodes=spec.nodes,
            min_nodes=spec.min_nodes,
            wait=spec.wait,
            options=spec.options,
        )

    @staticmethod
    def from_spec(spec: Mapping[str, Any], bundle: bytes) -> JobRequest:
        """From the wire (a record's ``spec``); JobSpecError for one this node cannot take."""
        return JobRequest.of(JobSpec.from_wire(spec), bundle)

    def with_options(self, options: JobOptions) -> JobRequest:
        return dataclasses.replace(self, options=options)


@dataclass
class JobResult:
    """How a job ended; `traceback` is the one to show (the primary failure's)."""

    state: str  # done | failed | cancelled
    message: str | None = None
    traceback: str | None = None

    @property
    def exit_code(self) -> int:
        return {"done": 0, "cancelled": 130}.get(self.state, 1)

    def to_record(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "message": self.message,
            "traceback": self.traceback,
            "exit_code": self.exit_code,
        }

    @staticmethod
    def from_record(data: dict[str, Any]) -> JobResult:
        return JobResult(str(data.get("state")), data.get("message"), data.get("traceback"))


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


class JobLinks(Protocol):
    """How the coordinator reaches the job's nodes (meshtrain.agent.mesh_jobs)."""

    def tell(self, node: str, op: str, **fields: Any) -> None:
        """Send one request to the agent on `node`, in the background (best effort)."""
        ...

    async def publish(self, runner: JobRunner) -> None:
        """Replicate the runner's record on the job's nodes."""
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
    ring_port: int | None = None
    exit_code: int | None = None
    killed: bool = False
    crash: dict[str, Any] | None = None
    stderr: str = ""
    left_mesh: bool = False  # lost because its node left the mesh (not only its worker)
    joiner: bool = False  # admitted into a running attempt: it holds the state once it adopted it
    adopted: bool = False  # a joiner that received the state (its "adopted" event)
    why: str = ""  # why it was lost

    @property
    def holds_state(self) -> bool:
        return not self.joiner or self.adopted

    def to_record(self) -> dict[str, Any]:
        crash = {k: self.crash.get(k) for k in ("summary", "secondary", "rollback")} if self.crash else None
        return {
            "name": self.name,
            "rank": self.rank,
            "host": self.host,
            "control_port": self.control_port,
            "member": self.member or self.name,
            "in_view": self.in_view,
            "lost": self.lost,
            "ring_port": self.ring_port,
            "exit_code": self.exit_code,
            "killed": self.killed,
            "crash": crash,
            "left_mesh": self.left_mesh,
            "joiner": self.joiner,
            "adopted": self.adopted,
            "why": self.why,
        }

    @staticmethod
    def from_record(data: dict[str, Any]) -> _Participant:
        return _Participant(
            name=str(data["name"]),
            rank=int(data["rank"]),
            host=str(data.get("host") or ""),
            control_port=int(data.get("control_port") or 0),
            member=str(data.get("member") or data["name"]),
            in_view=bool(data.get("in_view")),
            lost=bool(data.get("lost")),
            ring_port=data.get("ring_port"),
            exit_code=data.get("exit_code"),
            killed=bool(data.get("killed")),
            crash=data.get("crash") if isinstance(data.get("crash"), dict) else None,
            left_mesh=bool(data.get("left_mesh")),
            joiner=bool(data.get("joiner")),
            adopted=bool(data.get("adopted")),
            why=str(data.get("why") or ""),
        )


@dataclass
class _Failure:
    order: int
    primary: bool
    message: str
    traceback: str | None


@dataclass
class JobRunner:
    """Coordinates one job while this node holds the role; `cancel()` may be called from anywhere on the loop.

    `run()` is the origin's path (place, start, follow); `from_record(...)`
    then `follow()` is a successor's. Either returns the job's result, or
    None when coordination moved to another node (`step_down()`).
    """

    request: JobRequest
    membership: MembershipView
    job: str = field(default_factory=new_job_id)
    protocol: int = PROTOCOL_VERSION
    clock: Callable[[], float] = time.time
    links: JobLinks | None = None
    me: str = ""
    origin: str = ""
    # experiment tracking (meshtrain.tracking): called with (member, t, metrics) for every report
    on_metrics: Callable[[str, float, dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        self.state = JobState(job=self.job, script=self.request.script, started=self.clock())
        self._cancel = asyncio.Event()
        self._cancel_reason = "cancelled by the user"
        self._parts: list[_Participant] = []
        self._failures: list[_Failure] = []
        self._view_version = 0
        self._view: dict[str, Any] | None = None
        self._formed: dict[str, Any] | None = None  # the newest view a ring formed for: the quorum's base
        self._view_dirty = False
        self._joining: set[str] = set()
        self._cursors: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._stepped_down = False
        self._cancelling = False
        self.term = 0
        self.seq = 0
        self.result: JobResult | None = None
        self.log: deque[tuple[int, str, int, str, str]] = deque(
            maxlen=LOG_KEPT
        )  # (seq, node, rank, stream, line)
        self.log_seq = 0
        self.succession = Succession(self.me or self.origin)
        self.succession.observe(self.me or self.origin, time.monotonic(), first=True)
        self._tasks: list[asyncio.Task[Any]] = []
        # a roll-back to the newest checkpoint (a worker's crash asked for one): why, until it is done
        self._rollback: str | None = None
        self._orphaned_at: float | None = None  # when only joiners without the state were left
        self.rollbacks = 0
        self._rollback_times: list[float] = []  # when each roll-back began (self.clock)
        self._retired: list[_Participant] = []  # the workers of the attempts before the last roll-back
        self._issued: dict[str, int] = {}  # member ids handed out per node, admissions in flight included
        self._attempt = 0  # bumped by each roll-back: an admission begun before it is void

    # the replicated record

    def record(self) -> dict[str, Any]:
        """The job as every node of it keeps it (plain data; the bundle travels with job.prepare only)."""
        self.seq += 1
        now = self.clock()
        return {
            "job": self.job,
            "origin": self.origin,
            "coordinator": self.me,
            "term": self.term,
            "seq": self.seq,
            "spec": self.request.spec(),
            "parts": [p.to_record() for p in self._parts],
            "view": self._view,
            "formed": self._formed,
            "cursors": dict(self._cursors),
            "failures": [[f.order, f.primary, f.message, f.traceback] for f in self._failures],
            "cancel": self._cancel_reason if self._cancel.is_set() else None,
            "cancelling": self._cancelling,
            "state": self.state.to_record(),
            "snapshot": self.state.snapshot(now),
            "result": self.result.to_record() if self.result is not None else None,
            "log_seq": self.log_seq,
            "rollbacks": self.rollbacks,
            "rollback_times": list(self._rollback_times),
            "retired": [[p.name, p.member] for p in self._retired],
            "updated": now,
        }

    @staticmethod
    def from_record(
        record: dict[str, Any],
        bundle: bytes,
        membership: MembershipView,
        *,
        me: str,
        links: JobLinks | None,
        log: Sequence[tuple[int, str, int, str, str]] = (),
        protocol: int = PROTOCOL_VERSION,
        clock: Callable[[], float] = time.time,
    ) -> JobRunner:
        """A successor's runner: the same job, from the newest record this node holds."""
        request = JobRequest.from_spec(record.get("spec") or {}, bundle)
        runner = JobRunner(
            request=request,
            membership=membership,
            job=str(record["job"]),
            protocol=protocol,
            clock=clock,
            links=links,
            me=me,
            origin=str(record.get("origin") or ""),
        )
        runner.succession = Succession(me)
        runner.succession.observe(me, time.monotonic())  # took over: settle before numbering a view
        runner.state = JobState.from_record(record["state"])
        runner._parts = [_Participant.from_record(p) for p in record.get("parts") or []]
        view = record.get("view")
        runner._view = view if isinstance(view, dict) else None
        runner._view_version = int((runner._view or {}).get("version") or 0)
        formed = record.get("formed")
        runner._formed = formed if isinstance(formed, dict) else None
        runner._cursors = {str(k): int(v) for k, v in (record.get("cursors") or {}).items()}
        runner._failures = [
            _Failure(int(o), bool(pr), str(m), t) for o, pr, m, t in record.get("failures") or []
        ]
        if record.get("cancel"):
            runner.cancel(str(record["cancel"]))
        runner._cancelling = bool(record.get("cancelling"))
        runner.rollbacks = int(record.get("rollbacks") or 0)
        runner._rollback_times = [float(t) for t in record.get("rollback_times") or []]
        runner._retired = [
            _Participant(name=str(n), rank=-1, host="", control_port=0, member=str(m))
            for n, m in record.get("retired") or []
        ]
        runner.term = int(record.get("term") or 0) + 1
        runner.seq = int(record.get("seq") or 0)
        runner.log.extend(log)
        runner.log_seq = max([int(record.get("log_seq") or 0), *(entry[0] for entry in log)])
        runner.add_event({"t": clock(), "kind": "coordinator", "node": me, "detail": "took over the job"})
        return runner

    # control

    def cancel(self, reason: str = "cancelled by the user") -> None:
        """Cancel the job: here while this node coordinates, else through the node that does."""
        if not self.coordinating and self.links is not None and hasattr(self.links, "cancel_local"):
            self.links.cancel_local(self.job, reason)
        if not self._cancel.is_set():
            self._cancel_reason = reason
        self._cancel.set()
        self._wake.set()

    @property
    def coordinating(self) -> bool:
        return not self._stepped_down and self.result is None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def step_down(self) -> None:
        """Coordination moved to another node: stop following (the workers go on)."""
        self._stepped_down = True
        self._wake.set()

    def add_event(self, event: dict[str, Any]) -> None:
        self.state.add_event(event)

    def deliver(
        self, node: str, member: str, first: int, entries: Sequence[Any], view_version: int = 0
    ) -> int:
        """Apply the reports of worker `member` numbered from `first`; the last number applied.

        Reports already applied are skipped and a gap is refused (the sender
        resends from the cursor it gets back), so a successor that has an
        older record than its predecessor applied loses nothing.
        """
        self.succession.hear(node)
        if isinstance(view_version, int) and view_version > self._view_version:
            self._view_version = view_version  # a predecessor's view we never saw: number above it
        cursor = self._cursors.get(member, 0)
        p = next((q for q in self._parts if (q.member or q.name) == member), None)
        if p is None or first > cursor + 1:
            return cursor
        logs: list[tuple[str, int, str, str]] = []
        for entry in entries:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)):
                continue
            seq = int(entry[0])
            if seq <= cursor:
                continue
            if not p.lost:
                self._handle(p, entry[1], logs)
            cursor = seq
        self._cursors[member] = cursor
        for log_node, rank, stream, line in logs:
            self.log_seq += 1
            self.log.append((self.log_seq, log_node, rank, stream, line))
        self._wake.set()
        return cursor

    # the origin's path

    async def run(self, sink: JobSink | None = None) -> JobResult:
        """Submit the job from this node and follow it into `sink` until it ends, wherever it is coordinated.

        With the agent's jobs (meshtrain.agent.mesh_jobs) this node starts the
        job as its origin and then watches its replica: coordination may move
        to another node and the job still ends here with its result. Without
        them (unit tests) it coordinates alone.
        """
        links = self.links or getattr(self.membership, "jobs", None)
        if links is not None and hasattr(links, "submit_runner"):
            self.links = links
            return await links.submit_runner(self, sink)  # type: ignore[no-any-return]
        result = await self.coordinate()
        return result if result is not None else JobResult("failed", "coordination moved away")

    async def coordinate(self) -> JobResult | None:
        """The origin's coordination: place, start the workers, number the first view, then follow."""
        decision = await self._place()
        if decision.kind != "ready":
            if self._cancel.is_set():
                return await self._end(JobResult("cancelled", self._cancel_reason))
            return await self._end(JobResult("failed", decision.message))
        self.state.assign(list(decision.nodes))
        self.state.set_state("starting", f"starting on {', '.join(decision.nodes)}", self.clock())
        await self._publish()
        error = await self._prepare(list(decision.nodes))
        if error is not None:
            self._cancel_all()
            return await self._end(JobResult("failed", error))
        for p in self._parts:
            p.in_view = True
        self._send_view()
        self.state.set_state("running", None, self.clock())
        await self._publish()
        return await self.follow()

    async def _publish(self) -> None:
        if self.links is not None:
            await self.links.publish(self)

    async def _end(self, result: JobResult) -> JobResult:
        self.state.set_state(result.state, result.message, self.clock())
        self.result = result
        await self._publish()
        return result

    async def _place(self) -> Decision:
        req = Request.parse(self.request.nodes, self.request.min_nodes)
        deadline = self.clock() + max(0.0, self.request.wait)
        while True:
            timed_out = self.clock() >= deadline
            decision = place(self.membership.candidates(), req, self.protocol, timed_out=timed_out)
            if decision.kind != "wait" or self._cancel.is_set():
                return decision
            if self.state.message != decision.message:
                self.state.set_state("waiting", decision.message, self.clock())
                await self._publish()
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
            member = self._next_member(name)
            self._parts.append(
                _Participant(name=name, rank=rank, host=endpoint[0], control_port=endpoint[1], member=member)
            )
        results = await asyncio.gather(*(self._prepare_one(p) for p in self._parts))
        return next((r for r in results if r is not None), None)

    async def _prepare_one(self, p: _Participant, joiner: bool = False) -> str | None:
        options = self.request.options.replace(joiner=joiner).to_wire()
        record = self.record()
        record["parts"] = [*record["parts"], p.to_record()] if p not in self._parts else record["parts"]
        try:
            conn = await open_request(
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
                record=record,
            )
            try:
                header, _ = await asyncio.wait_for(conn.recv(), PREPARE_TIMEOUT_S)
            finally:
                await conn.close()
        except (OSError, WireError, asyncio.TimeoutError) as exc:
            return f"cannot start the worker on {p.name}: {exc.__class__.__name__} {exc}".strip()
        if not header.get("ok"):
            if header.get("error") == "protocol":
                theirs = header.get("proto")
                return f"{p.name} runs meshtrain protocol {theirs} (this is {self.protocol}): upgrade it"
            return str(header.get("message") or f"{p.name} refused the job")
        p.ring_port = header.get("ring_port")
        return None

    # following the job (any coordinator)

    async def follow(self) -> JobResult | None:
        """Apply reports until every worker has exited; keep the job's membership view current.

        A worker lost (its process killed, its node dead in gossip) leaves the
        view and the others go on (elastic training); a node that joins the mesh
        gets a worker, which enters the view once it can train. A worker's own
        exception ends the job: every worker would hit it -- unless it asks for
        a roll-back (a sharded job whose shard holder was lost, `ShardLost`):
        with checkpoints, every worker is then ended and the job starts again
        on the nodes there are now, from the run's newest complete checkpoint.
        """
        while True:
            if not await self._follow_workers():
                return None
            if self._rollback is None or self._failures or self._cancel.is_set():
                return await self._end(self._verdict())
            error = await self._roll_back()
            if error is not None:
                if self._cancel.is_set():
                    return await self._end(JobResult("cancelled", self._cancel_reason))
                return await self._end(JobResult("failed", error))

    async def _follow_workers(self) -> bool:
        """Follow this attempt's workers until all have exited; False if coordination moved away."""
        if self._cancelling:
            self._cancel_all()
        next_snapshot = self.clock() + SNAPSHOT_INTERVAL_S
        change = asyncio.create_task(self.membership.changed(SNAPSHOT_INTERVAL_S))
        try:
            while any(p.exit_code is None and not p.lost for p in self._parts):
                if self._stepped_down:
                    await self._publish()
                    return False
                self._wake.clear()
                waker = asyncio.create_task(self._wake.wait())
                timeout = max(0.0, next_snapshot - self.clock())
                await asyncio.wait({waker, change}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
                if change.done():
                    change = asyncio.create_task(self.membership.changed(SNAPSHOT_INTERVAL_S))
                if not (self._cancelling or self._failures or self._rollback):
                    self._check_orphans()
                if not (self._cancelling or self._failures or self._rollback):  # it may have ended it
                    self._watch_membership()
                    self._update_view()
                    if self._finished_any():
                        self._end_stragglers()
                if not self._cancelling and (self._failures or self._cancel.is_set() or self._rollback):
                    self._cancelling = True
                    self._cancel_all()
                if self.clock() >= next_snapshot:
                    next_snapshot = self.clock() + SNAPSHOT_INTERVAL_S
                    await self._publish()
        finally:
            change.cancel()
        return not self._stepped_down

    def _next_member(self, name: str) -> str:
        """A new worker's member id on node `name`: the name, then ``name~k`` (never reused in a job,
        so a view, a report cursor or a checkpoint ack of an ended worker never names a new one)."""
        earlier = max(
            sum(1 for p in (*self._retired, *self._parts) if p.name == name), self._issued.get(name, 0)
        )
        self._issued[name] = earlier + 1
        return name if earlier == 0 else f"{name}~{earlier}"

    def _may_roll_back(self) -> bool:
        options = self.request.options
        recent = [t for t in self._rollback_times if self.clock() - t < ROLLBACK_WINDOW_S]
        return bool(options.checkpoint_every and options.run) and len(recent) < MAX_ROLLBACKS

    async def _roll_back(self) -> str | None:
        """Start the job again from the run's newest complete checkpoint on the nodes there are now.

        Every worker of the attempt has exited. The new attempt is the job's own
        `--resume`: each node fetches the newest complete checkpoint before its
        worker starts (a sharded one's parts are on every writer), the sampler
        goes on from the checkpoint's step, so from there each sample is trained
        once per epoch; the steps after it are trained again. None when the
        new workers run, else the one line why the job cannot go on.
        """
        reason, self._rollback = str(self._rollback), None
        self.rollbacks += 1
        self._rollback_times.append(self.clock())
        run = self.request.options.run
        recent = sum(1 for t in self._rollback_times if self.clock() - t < ROLLBACK_WINDOW_S)
        detail = (
            f"{reason}; rolling back to the newest complete checkpoint of {run} (roll-back "
            f"{self.rollbacks}; {recent} of at most {MAX_ROLLBACKS} within {ROLLBACK_WINDOW_S / 60:.0f} min)"
        )
        self.add_event({"t": self.clock(), "kind": "rollback", "node": self.me, "detail": detail})
        self.state.set_state("starting", f"rolling back to the newest checkpoint of {run}", self.clock())
        self._retired.extend(self._parts)
        self._parts = []
        self._attempt += 1
        self._view, self._formed, self._view_dirty = None, None, False
        self._cancelling = False
        self._joining.clear()
        self.request = self.request.with_options(self.request.options.replace(resume=True))
        await self._publish()
        decision = await self._place()
        if decision.kind != "ready":
            return f"cannot roll back ({reason}): {decision.message}"
        self.state.assign(list(decision.nodes))
        error = await self._prepare(list(decision.nodes))
        if error is not None:
            self._cancel_all()
            return f"cannot roll back ({reason}): {error}"
        for p in self._parts:
            p.in_view = True
        self._send_view()
        self.state.set_state("running", f"rolled back: {reason}", self.clock())
        await self._publish()
        return None

    def _finished_any(self) -> bool:
        return any(p.exit_code == 0 for p in self._parts)

    def _live_nodes(self) -> set[str]:
        return {c.name for c in self.membership.candidates() if c.state in ("alive", "suspect")}

    def _send_view(self) -> bool:
        """Number the current workers as the next view and send it to each of them, if a quorum allows."""
        members = sorted((p for p in self._parts if p.in_view and not p.lost), key=lambda p: p.rank)
        previous = base_members(self._formed, self._view)
        if previous is not None:
            ended = {p.member or p.name for p in self._parts if p.exit_code is not None}
            if not has_quorum(previous, {p.member or p.name for p in members}, ended):
                return False
        self._view_version += 1
        view = {
            "version": self._view_version,
            "members": [[p.member or p.name, p.host, p.ring_port or 0] for p in members],
            "min_nodes": self.request.min_nodes or 1,
        }
        self._view = view
        self.state.generation = self._view_version
        for p in members:
            if p.exit_code is None and self.links is not None:
                self.links.tell(
                    p.name, "job.view", job=self.job, member=p.member or p.name, view=view, by=self.me
                )
        self._view_dirty = False
        return True

    def _update_view(self) -> None:
        if not self._view_dirty or self._finished_any():
            return
        live = {p.name for p in self._parts if not p.lost and p.exit_code is None}
        if self.succession.may_issue(live, time.monotonic()):
            self._send_view()

    def _end_stragglers(self) -> None:
        """The job finished: end the workers that never formed a ring with the others (a joiner admitted
        near the end waits for a ring whose members have exited, and would hold the job open for ever)."""
        formed = set(base_members(self._formed, self._view) or [])
        for p in self._parts:
            if p.exit_code is None and not p.lost and not p.killed and (p.member or p.name) not in formed:
                p.killed = True  # its exit is ours, not a failure
                detail = f"worker {p.member or p.name} ended: the job finished before it joined a ring"
                self.add_event({"t": self.clock(), "kind": "left", "node": p.name, "detail": detail})
                if self.links is not None:
                    self.links.tell(p.name, "job.kill", job=self.job, member=p.member or p.name, by=self.me)

    def _lose(self, p: _Participant, why: str) -> None:
        """An elastic loss: the worker leaves the view; the job goes on without it."""
        if p.lost:
            return
        p.lost = True
        p.why = why
        if p.in_view:
            self._view_dirty = True
        self.state.remove_worker(p.rank)
        self.add_event({"t": self.clock(), "kind": "lost", "node": p.name, "detail": why})
        if self.links is not None and not p.left_mesh:
            self.links.tell(p.name, "job.kill", job=self.job, member=p.member or p.name, by=self.me)
        if not any(not q.lost and q.exit_code is None for q in self._parts) and not self._finished_any():
            self._fail(False, f"every worker was lost; the last, {p.name} (rank {p.rank}): {why}", None)

    def _check_orphans(self) -> None:
        """Every worker holding the training state is gone and only joiners are left (they wait for a
        state nobody can send: a silent hang). After ORPHAN_GRACE_S with none of them adopting it, the
        job rolls back to its newest checkpoint if it has one, else fails with the reason."""
        live = [q for q in self._parts if not q.lost and q.exit_code is None]
        if not live or any(q.holds_state for q in live) or self._finished_any():
            self._orphaned_at = None
            return
        if self._orphaned_at is None:
            self._orphaned_at = self.clock()
            return
        if self.clock() - self._orphaned_at < ORPHAN_GRACE_S:
            return
        last = max((q for q in self._parts if q.lost and q.holds_state), key=lambda q: q.rank, default=None)
        who = f"; the last, {last.name} (rank {last.rank}): {last.why or 'lost'}" if last is not None else ""
        names = ", ".join(q.member or q.name for q in live)
        message = (
            f"every worker holding the training state was lost{who}; the workers that joined since "
            f"({names}) have no state to go on from"
        )
        self._orphaned_at = None
        if self._may_roll_back():
            self._rollback = message
        else:
            self._fail(False, message, None)

    def _watch_membership(self) -> None:
        """Drop workers whose node is gone (given a quorum); start workers on nodes that joined."""
        alive = self._live_nodes()
        gone = [p for p in self._parts if not p.lost and p.exit_code is None and p.name not in alive]
        previous = base_members(self._formed, self._view)
        if gone and previous is not None:
            reachable = {p.member or p.name for p in self._parts if p.name in alive}
            ended = {p.member or p.name for p in self._parts if p.exit_code is not None}
            if not has_quorum(previous, reachable, ended):
                names = ", ".join(sorted({p.name for p in gone}))
                message = (
                    f"waiting: lost contact with most of the job's nodes ({names}); no step is taken here"
                )
                if self.state.message != message:
                    self.state.set_state("paused", message, self.clock())
                    self.add_event(
                        {"t": self.clock(), "kind": "partition", "node": self.me, "detail": message}
                    )
                return
            if self.state.state == "paused" and (self.state.message or "").startswith(
                "waiting: lost contact"
            ):
                self.state.set_state("running", None, self.clock())
        for p in gone:
            p.left_mesh = True
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
            self._tasks.append(asyncio.ensure_future(self._admit(name)))

    def _admits(self, name: str) -> bool:
        """A node joining mid-job gets a worker when the user asked for all nodes (no --nodes); a node
        of the job whose worker was lost while its agent lived on gets a new one -- at most
        MAX_INCARNATIONS, so a node whose worker keeps dying does not restart it forever. With
        --nodes, a node that left the mesh stays out when it comes back."""
        mine = [p for p in self._parts if p.name == name]
        if len(mine) >= MAX_INCARNATIONS:
            return False
        if self.request.nodes is None:
            return True
        return bool(mine) and not any(p.left_mesh for p in mine)

    async def _admit(self, name: str) -> None:
        try:
            endpoint = self.membership.endpoint(name)
            if endpoint is None:
                return
            member = self._next_member(name)
            index = max((p.rank for p in self._parts), default=-1) + 1
            p = _Participant(
                name=name, rank=index, host=endpoint[0], control_port=endpoint[1], member=member, joiner=True
            )
            attempt = self._attempt
            error = await self._prepare_one(p, joiner=True)
            void = attempt != self._attempt or self._rollback is not None  # a roll-back began meanwhile
            if error is not None or self._finished_any() or self._stepped_down or self._cancelling or void:
                if error is None and self.links is not None:
                    self.links.tell(name, "job.kill", job=self.job, member=member, by=self.me)
                return
            self._parts.append(p)
            self.state.add_worker(p.rank, name)
            self.add_event({"t": self.clock(), "kind": "joined", "node": name, "detail": f"worker {member}"})
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
        if kind == "event" and header.get("type") == "adopted":
            p.adopted = True  # a holder now: the next _check_orphans clears any countdown
            return False
        if kind == "event" and header.get("type") == "formed":
            self._saw_formed(header.get("generation"), header.get("members"))
            return False
        if kind == "log":
            line = str(header.get("line", ""))
            self.state.add_log(p.name, line)
            logs.append((p.name, p.rank, str(header.get("stream", "stdout")), line))
        elif kind == "event" and header.get("type") == "metrics":
            for item in header.get("batch") or []:
                if isinstance(item, list) and len(item) == 2 and isinstance(item[1], dict):
                    self._saw_formed(item[1].get("generation"), None)  # a step in it: it formed
                    self.state.report(p.rank, float(item[0]), item[1])
                    if self.on_metrics is not None:
                        self.on_metrics(p.member, float(item[0]), item[1])
        elif kind == "event" and header.get("type") == "crash":
            p.crash = header
            primary = not header.get("secondary")
            if not primary and not p.killed:
                self._lose(p, str(header.get("summary") or "lost its ring"))
            elif primary and header.get("rollback") and (self._rollback or self._may_roll_back()):
                if self._rollback is None and not self._failures and not self._cancel.is_set():
                    why = header.get("summary") or "asked to roll back"
                    self._rollback = f"{p.name} (rank {p.rank}): {why}"
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
            if p.exit_code < 0 and not p.killed and header.get("oom"):
                self._lose(p, OUT_OF_MEMORY)
            elif p.exit_code < 0 and not p.killed:  # killed by a signal: an elastic loss
                self._lose(p, f"its worker was killed (signal {-p.exit_code})")
            elif p.exit_code != 0 and p.crash is None and not p.killed and not p.lost:
                tail = p.stderr.strip().splitlines()[-1:] if p.stderr.strip() else []
                detail = f": {tail[0]}" if tail else ""
                self._fail(
                    True, f"{p.name} (rank {p.rank}) exited with code {p.exit_code}{detail}", p.stderr or None
                )
            return True
        return False

    def _saw_formed(self, version: Any, members: Any) -> None:
        """A worker formed the ring of view `version` (every member connected): the quorum's new base."""
        if not isinstance(version, int) or version <= int((self._formed or {}).get("version") or 0):
            return
        if not isinstance(members, (list, tuple)):
            if self._view is None or self._view.get("version") != version:
                return  # a view this coordinator never saw, named without its members: wait for its report
            members = [m[0] for m in self._view.get("members") or []]
        self._formed = {"version": version, "members": [str(m) for m in members]}
        self._view_version = max(self._view_version, version)

    def _fail(self, primary: bool, message: str, traceback: str | None) -> None:
        self._failures.append(_Failure(len(self._failures), primary, message, traceback))

    def _cancel_all(self) -> None:
        for p in self._parts:
            if p.exit_code is None and not p.lost:
                p.killed = True
                if self.links is not None:
                    self.links.tell(p.name, "job.kill", job=self.job, member=p.member or p.name, by=self.me)

    def _verdict(self) -> JobResult:
        if self._failures:
            best = min(self._failures, key=lambda f: (not f.primary, f.order))
            return JobResult("failed", best.message, best.traceback)
        if self._cancel.is_set():
            return JobResult("cancelled", self._cancel_reason)
        return JobResult("done", None)


def is_final(record: dict[str, Any]) -> bool:
    return bool(record.get("result")) or str((record.get("state") or {}).get("state")) in FINAL_STATES


async def _quiet(task: asyncio.Task[Any]) -> None:
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await task
