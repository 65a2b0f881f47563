"""Jobs as the mesh holds them: one replica of each job on every node that runs it, any node a viewer.

The agent keeps a `JobReplica` per job it runs a worker of, submitted, or
coordinates: the job's record (spec, participants, last view, progress,
result; see meshtrain.agent.jobs), its bundle, its recent output, and the
workers it hosts. Coordination follows meshtrain.agent.job_coordination:
every replica evaluates the same rule on its own record and its own gossip
view, and the node it names builds a `JobRunner` from its record; when the
rule names another node the runner steps down and the workers go on.

Traffic, all over the authenticated control TCP (one request, one reply):
- `job.prepare`: the coordinator starts a worker here (bundle + record);
  the worker's lifeline is this agent, not the coordinator's connection, so
  a lost coordinator leaves the job's workers running; refused when this
  node's record shows the sender was replaced (`superseded`: the far side of
  a healed partition must not start a second copy);
- `job.report`: this agent's workers' output, metrics and exits, numbered,
  to the coordinator, which answers with what it has applied (resent on a
  gap, so a successor loses nothing this node still holds);
- `job.sync`: the coordinator's record (and the output lines the receiver
  lacks) to every node of the job and its origin, twice a second; a finished
  job's record goes to at least two nodes;
- `job.view` / `job.kill`: a new membership view for, or the end of, a
  hosted worker (the fast path; the view also travels in every sync),
  ignored from a sender this node's record does not name as coordinator, so
  a replaced coordinator cannot pull the job's workers into its views;
- `job.cancel`, `job.get`, `jobs.list`: what `meshtrain cancel`, `attach`,
  `logs` and `jobs` ask, on any node, of the nodes holding a job.

A job not yet started has no successor (until its first view only the
origin knows every worker's ring port): when its origin is gone, every node
holding it gives it up after ORPHAN_S, stops its workers and logs one line.

The CLI speaks to its own agent over the unix socket (`run`, `attach`,
`jobs`, `cancel`, `logs`); an agent that holds no replica of the job asks
the others, so every command works from every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from meshtrain.agent.control import Conn, call
from meshtrain.agent.job_coordination import (
    STARTED_STATES,
    record_coordinator,
    record_key,
    seats_of,
    superseded,
)
from meshtrain.agent.jobs import LOG_KEPT, JobRequest, JobResult, JobRunner, JobSink, is_final
from meshtrain.agent.jobstate import JobState
from meshtrain.agent.workers import host_worker
from meshtrain.errors import UserError, WireError
from meshtrain.jobspec import JobSpec, JobSpecError
from meshtrain.wire import StreamClosed

TICK_S = 0.25
CALL_TIMEOUT_S = 3.0
REPORT_BATCH = 500
OUTBOX_KEPT = 20000
FINISHED_KEPT = 50
SYNC_LINES = 1000
STREAM_INTERVAL_S = 0.5
FINAL_HOLDERS = 2
FINAL_RETRIES = 20  # a final record's sync is retried this many times (every 0.5 s) to a live holder
ORPHAN_S = 5.0  # a job not yet started whose origin is gone this long is given up by every node holding it

LogEntry = tuple[int, str, int, str, str]  # (seq, node, rank, stream, line)


class LocalLink(Conn):
    """`host_worker`'s stream to the job: this agent's replica, in-process.

    What the worker host sends (output lines, metric batches, crash, exit)
    goes into the replica's numbered outbox; what it receives (views, cancel)
    comes from the replica. Closing the link (`shut`) ends the worker.
    """

    def __init__(self, replica: JobReplica, member: str) -> None:  # noqa: D107 - no socket behind it
        self.replica = replica
        self.member = member
        self.channel = None
        self.mac_send = self.mac_recv = None
        self.commands: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.view_version = 0
        self.done = False

    async def send(self, kind: str, header: dict[str, Any], payload: bytes = b"") -> None:
        self.replica.post(self.member, {**header, "kind": kind})

    async def reply(self, ok: bool, **fields: Any) -> None:
        if not self.ready.done():
            self.ready.set_result({"ok": ok, **fields})

    async def recv(self) -> tuple[dict[str, Any], bytes]:
        item = await self.commands.get()
        if item is None:
            raise StreamClosed("the job's replica closed the worker's link")
        return item, b""

    async def close(self) -> None:
        return None

    def push_view(self, view: dict[str, Any]) -> None:
        version = int(view.get("version") or 0)
        if version > self.view_version and not self.done:
            self.view_version = version
            self.commands.put_nowait({"kind": "request", "op": "job.view", "view": view})

    def kill(self) -> None:
        if not self.done:
            self.commands.put_nowait({"kind": "request", "op": "job.cancel"})

    def shut(self) -> None:
        self.commands.put_nowait(None)


@dataclass
class JobReplica:
    """This node's copy of one job."""

    job: str
    record: dict[str, Any]
    bundle: bytes = b""
    log: deque[LogEntry] = field(default_factory=lambda: deque(maxlen=LOG_KEPT))
    links: dict[str, LocalLink] = field(default_factory=dict)
    outbox: dict[str, deque[tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    next_seq: dict[str, int] = field(default_factory=dict)
    acked: dict[str, int | None] = field(default_factory=dict)
    report_target: str | None = None
    runner: JobRunner | None = None
    runner_task: asyncio.Task[JobResult | None] | None = None
    cancel_pending: str | None = None
    reporting: bool = False
    orphaned_since: float | None = None  # when this node first saw the origin of a job still placing gone
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)  # the worker hosts, by member
    version: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def post(self, member: str, header: dict[str, Any]) -> None:
        seq = self.next_seq.get(member, 0) + 1
        self.next_seq[member] = seq
        self.outbox.setdefault(member, deque(maxlen=OUTBOX_KEPT)).append((seq, header))

    @property
    def log_seq(self) -> int:
        return self.log[-1][0] if self.log else 0

    def add_lines(self, lines: list[Any]) -> None:
        last = self.log_seq
        for entry in lines:
            if isinstance(entry, (list, tuple)) and len(entry) == 5 and int(entry[0]) > last:
                self.log.append((int(entry[0]), str(entry[1]), int(entry[2]), str(entry[3]), str(entry[4])))
                last = int(entry[0])

    def lines_since(self, seq: int, limit: int = LOG_KEPT) -> list[LogEntry]:
        return [e for e in self.log if e[0] > seq][-limit:]

    def touch(self) -> None:
        self.version += 1
        self.changed.set()

    @property
    def final(self) -> bool:
        return is_final(self.record)


def summary_of(record: dict[str, Any]) -> dict[str, Any]:
    """One line of `meshtrain jobs`: state, nodes, step, started/finished, exit reason."""
    state = record.get("state") or {}
    result = record.get("result") or {}
    return {
        "job": record.get("job"),
        "script": state.get("script"),
        "state": result.get("state") or state.get("state"),
        "message": state.get("message"),
        "nodes": list(state.get("nodes") or []),
        "epoch": state.get("epoch"),
        "epochs": state.get("epochs"),
        "step": state.get("step"),
        "steps_per_epoch": state.get("steps_per_epoch"),
        "loss": state.get("loss"),
        "test_accuracy": state.get("test_accuracy"),
        "started": state.get("started"),
        "finished": state.get("finished"),
        "exit": result.get("message") if result else None,
        "exit_code": result.get("exit_code") if result else None,
        "coordinator": record.get("coordinator"),
        "origin": record.get("origin"),
        "key": list(record_key(record)),
    }


class MeshJobs:
    """The agent's jobs: replicas, the succession rule, reports, syncs and the CLI's job commands."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.replicas: dict[str, JobReplica] = {}
        self._outgoing: dict[tuple[str, str], dict[str, Any]] = {}  # (job, node) -> newest record to send
        self._senders: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._sent_log: dict[tuple[str, str], int] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def me(self) -> str:
        return str(self.agent.name)

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.ensure_future(self._tick_forever())

    async def close(self) -> None:
        """This node leaves: stop coordinating, end the workers hosted here (an elastic loss for the job)."""
        self._closed = True
        if self._loop is not None:
            self._loop.cancel()
        for replica in self.replicas.values():
            if replica.runner is not None:
                replica.runner.step_down()
            for link in replica.links.values():
                link.shut()
        tasks = [r.runner_task for r in self.replicas.values() if r.runner_task is not None]
        for task in [*tasks, *self._background, *self._senders.values()]:
            task.cancel()

    # membership

    def live(self) -> set[str]:
        return {
            c.name
            for c in self.agent.candidates()
            if c.state in ("alive", "suspect") and c.protocol is not None
        }

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _call(self, peer: str, op: str, **fields: Any) -> dict[str, Any] | None:
        endpoint = self.agent.endpoint(peer)
        if endpoint is None:
            return None
        try:
            return await asyncio.wait_for(
                call(endpoint, op, who=f"the agent on {peer}", keyring=self.agent.keyring, **fields),
                CALL_TIMEOUT_S,
            )
        except (OSError, WireError, UserError, asyncio.TimeoutError):
            return None

    # JobLinks, for the runners

    def tell(self, node: str, op: str, **fields: Any) -> None:
        if node == self.me:
            self._local(op, fields)
        else:
            self._spawn(self._call(node, op, **fields))

    async def publish(self, runner: JobRunner) -> None:
        from meshtrain.notify.hook import RECORD_KEY, record_notices

        record = runner.record()
        notices = record_notices(runner)  # --notify: what was told, for a successor (notify.ledger)
        if notices is not None:
            record[RECORD_KEY] = notices
        replica = self.replicas.get(runner.job)
        if replica is None:
            replica = self.replicas[runner.job] = JobReplica(
                job=runner.job, record=record, bundle=runner.request.bundle
            )
        self._adopt(replica, record, [e for e in runner.log if e[0] > replica.log_seq])
        self._send_record(record)

    def _send_record(self, record: dict[str, Any]) -> None:
        for node in sorted(self._holders(record) - {self.me}):
            key = (str(record["job"]), node)
            self._outgoing[key] = record
            sender = self._senders.get(key)
            if sender is None or sender.done():
                self._senders[key] = asyncio.ensure_future(self._send_syncs(key))

    def _holders(self, record: dict[str, Any]) -> set[str]:
        live = self.live()
        holders = {s.node for s in seats_of(record) if not s.lost} | {str(record.get("origin") or "")}
        holders = {h for h in holders if h in live}
        if is_final(record) and len(holders) < FINAL_HOLDERS:
            holders |= set(sorted(live - holders)[: FINAL_HOLDERS - len(holders)])
        return holders

    async def _send_syncs(self, key: tuple[str, str]) -> None:
        job, node = key
        retries = FINAL_RETRIES
        while (record := self._outgoing.pop(key, None)) is not None:
            replica = self.replicas.get(job)
            lines = replica.lines_since(self._sent_log.get(key, 0), SYNC_LINES) if replica else []
            reply = await self._call(node, "job.sync", record=record, lines=[list(e) for e in lines])
            if reply is not None and isinstance(reply.get("log_seq"), int):
                self._sent_log[key] = int(reply["log_seq"])
            elif is_final(record) and retries > 0 and node in self.live():
                retries -= 1  # the end is published once: a holder that missed it would wait forever
                self._outgoing.setdefault(key, record)
                await asyncio.sleep(STREAM_INTERVAL_S)
        self._senders.pop(key, None)

    # replicas

    def _adopt(self, replica: JobReplica, record: dict[str, Any], lines: list[Any]) -> bool:
        """Take `record` if it is newer than ours; the output lines in any case. True when taken."""
        taken = record_key(record) >= record_key(replica.record) or not replica.record.get("parts")
        if replica.final and not is_final(record):
            taken = False
        if taken:
            replica.record = record
            view = record.get("view")
            if isinstance(view, dict):
                members = {str(m[0]) for m in view.get("members") or []}
                for member, link in replica.links.items():
                    if member in members:
                        link.push_view(view)
            lost = {s.member for s in seats_of(record) if s.lost}
            for member, link in replica.links.items():
                if member in lost:
                    link.kill()  # superseded: a partition's other side replaced this worker
        replica.add_lines(lines)
        replica.touch()
        if replica.final:
            self._forget_old()
        return taken

    def _forget_old(self) -> None:
        finished = sorted(
            (r for r in self.replicas.values() if r.final and not r.links and r.runner is None),
            key=lambda r: float((r.record.get("state") or {}).get("finished") or 0.0),
        )
        for replica in finished[: max(0, len(finished) - FINISHED_KEPT)]:
            self.replicas.pop(replica.job, None)

    def summaries(self) -> list[dict[str, Any]]:
        """The running jobs this node holds, for the mesh snapshot's `jobs`."""
        out = []
        for replica in self.replicas.values():
            if not replica.final:
                state = replica.record.get("state") or {}
                out.append(
                    {
                        "job": replica.job,
                        "script": state.get("script"),
                        "state": state.get("state"),
                        "nodes": list(state.get("nodes") or []),
                        "epoch": state.get("epoch", 0),
                        "epochs": state.get("epochs", 0),
                        "step": state.get("step", 0),
                        "loss": state.get("loss"),
                        "test_accuracy": state.get("test_accuracy"),
                    }
                )
        return out

    def options(self, job: str) -> dict[str, Any] | None:
        replica = self.replicas.get(job)
        if replica is None:
            return None
        options = (replica.record.get("spec") or {}).get("options")
        return dict(options) if isinstance(options, dict) else None

    # the succession rule and the reports, every tick

    async def _tick_forever(self) -> None:
        while not self._closed:
            with contextlib.suppress(Exception):
                self._tick()
            await asyncio.sleep(TICK_S)

    def _tick(self) -> None:
        live = self.live()
        for replica in list(self.replicas.values()):
            if replica.final:
                if replica.record.get("notices"):  # --notify: an ender lost before its end got through
                    self._settle_notices(replica, live)
                continue
            coordinator = record_coordinator(replica.record, live)
            started = str((replica.record.get("state") or {}).get("state")) in STARTED_STATES
            if not started and self._orphaned(replica, live):
                continue
            if coordinator == self.me and replica.runner is None and started and replica.record.get("parts"):
                self._take_over(replica)
            elif coordinator != self.me and replica.runner is not None and started:
                replica.runner.step_down()
            if coordinator is not None and not replica.reporting:
                if any(replica.outbox.values()) or replica.cancel_pending:
                    replica.reporting = True
                    self._spawn(self._report(replica, coordinator))

    def _settle_notices(self, replica: JobReplica, live: set[str]) -> None:
        from meshtrain.notify.hook import settle_final

        def republish(record: dict[str, Any]) -> None:
            if self._adopt(replica, record, []):
                self._send_record(record)

        settle_final(replica.record, self.me, live | {self.me}, republish)

    def _orphaned(self, replica: JobReplica, live: set[str]) -> bool:
        """A job still being placed whose origin is gone: give it up here after ORPHAN_S (True once given up).

        Until the first view only the origin knows every worker's ring port
        and whether every `job.prepare` succeeded, so no other node can start
        the job; without this rule its workers would wait for a view forever.
        Every node holding the job's record evaluates it alike: the origin gone
        (dead or left in gossip) for ORPHAN_S seconds, the job not started.
        A record that says started (the origin's last publish) supersedes it:
        then the job has a successor.
        """
        origin = str(replica.record.get("origin") or "")
        if not origin or origin == self.me or origin in live or not replica.record.get("parts"):
            replica.orphaned_since = None
            return False
        now = time.monotonic()
        if replica.orphaned_since is None:
            replica.orphaned_since = now
        if now - replica.orphaned_since < ORPHAN_S:
            return False
        message = (
            f"{origin}, the node job {replica.job} was submitted from, was lost while placing it: "
            "the job never started (run it again)"
        )
        record = dict(replica.record)
        state = JobState.from_record(record["state"]) if isinstance(record.get("state"), dict) else None
        if state is not None:
            state.set_state("failed", message, time.time())
            record["state"], record["snapshot"] = state.to_record(), state.snapshot(time.time())
        record["result"] = JobResult("failed", message).to_record()
        replica.record = record
        hosted = sorted(replica.tasks)
        for member in hosted:
            replica.tasks.pop(member).cancel()  # its host kills the worker, ready or still starting
        replica.links.clear()
        replica.touch()
        stopped = f"; stopped its worker here ({', '.join(hosted)})" if hosted else ""
        self.agent._event("job", self.me, message + stopped)  # the agent's log line (and `status` events)
        return True

    def _take_over(self, replica: JobReplica) -> None:
        runner = JobRunner.from_record(
            replica.record,
            replica.bundle,
            self.agent,
            me=self.me,
            links=self,
            log=list(replica.log),
            protocol=self.agent.protocol,
        )
        self.agent._event("coordinator", self.me, f"coordinates job {replica.job} now")
        self._run_runner(replica, runner, runner.follow())

    def _run_runner(self, replica: JobReplica, runner: JobRunner, body: Awaitable[JobResult | None]) -> None:
        from meshtrain.notify.hook import follow_notices
        from meshtrain.tracking.recorder import follow_runner  # experiment tracking: the run's record

        body = follow_runner(self.agent, runner, body)  # recorded here while this node coordinates
        body = follow_notices(runner, body, replica.record.get("notices"))  # --notify: told from here too
        replica.runner = runner
        runners = getattr(self.agent, "runners", {})
        registered = (
            runners.setdefault(runner.job, runner) is runner
        )  # the agent's view of what it coordinates
        if replica.cancel_pending:
            runner.cancel(replica.cancel_pending)

        async def drive() -> JobResult | None:
            try:
                return await body
            finally:
                if replica.runner is runner:
                    replica.runner = None
                if registered and runner.origin != self.me and runners.get(runner.job) is runner:
                    runners.pop(runner.job, None)  # the origin's own entry is the agent's submit()'s to drop

        replica.runner_task = asyncio.ensure_future(drive())

    async def _report(self, replica: JobReplica, target: str) -> None:
        try:
            if target != replica.report_target:
                replica.report_target = target
                replica.acked = {m: None for m in replica.outbox}
            for member, box in list(replica.outbox.items()):
                acked = replica.acked.get(member)
                first = (acked or 0) + 1
                entries = [] if acked is None else [[s, h] for s, h in box if s >= first][:REPORT_BATCH]
                if acked is not None and not entries and not replica.cancel_pending:
                    continue
                link = replica.links.get(member)
                view_version = link.view_version if link is not None else 0
                if target == self.me:
                    runner = replica.runner
                    if runner is None:
                        return
                    if replica.cancel_pending:
                        runner.cancel(replica.cancel_pending)
                        replica.cancel_pending = None
                    cursor = runner.deliver(self.me, member, first, entries, view_version)
                else:
                    reply = await self._call(
                        target,
                        "job.report",
                        job=replica.job,
                        node=self.me,
                        member=member,
                        first=first,
                        entries=entries,
                        view_version=view_version,
                        cancel=replica.cancel_pending,
                    )
                    if reply is None or not isinstance(reply.get("cursor"), int):
                        return
                    if replica.cancel_pending and reply.get("cancelled"):
                        replica.cancel_pending = None
                    cursor = int(reply["cursor"])
                replica.acked[member] = cursor
                if acked is None:
                    replica.acked[member] = cursor  # probed: the next report starts after it
            if replica.cancel_pending and not replica.outbox and target != self.me:
                reply = await self._call(target, "job.cancel", job=replica.job, reason=replica.cancel_pending)
                if reply is not None:
                    replica.cancel_pending = None
        finally:
            replica.reporting = False

    # submitting, following, cancelling

    async def submit_runner(self, runner: JobRunner, sink: JobSink | None) -> JobResult:
        """`JobRunner.run(sink)`: start the job here (its origin), follow it to its end into `sink`."""
        job = self.start_job(runner.request, runner)
        return await self.follow(job, sink or _NullSink(), runner=runner)

    def start_job(self, request: JobRequest, runner: JobRunner | None = None) -> str:
        runner = runner or JobRunner(request=request, membership=self.agent, protocol=self.agent.protocol)
        runner.me = runner.origin = self.me
        runner.links = self
        runner.succession.me = self.me
        replica = JobReplica(job=runner.job, record=runner.record(), bundle=request.bundle)
        self.replicas[runner.job] = replica
        self._run_runner(replica, runner, runner.coordinate())
        return runner.job

    def cancel_local(self, job: str, reason: str) -> bool:
        """Cancel `job` from this node's replica: its runner, or the coordinator with the next report."""
        replica = self.replicas.get(job)
        if replica is None or replica.final:
            return False
        if replica.runner is not None and replica.runner.coordinating:
            replica.runner.cancel(reason)
        else:
            replica.cancel_pending = reason
            coordinator = record_coordinator(replica.record, self.live())
            if coordinator is not None and coordinator != self.me:
                self._spawn(self._call(coordinator, "job.cancel", job=job, reason=reason))
        return True

    async def cancel(self, job: str, reason: str) -> str:
        """Cancel from any node; the one line `meshtrain cancel` prints.

        One round of questions, not two: the newest record and the nodes
        holding the job come from the same `job.get` to every live node, and the
        cancel goes to every holder at once (the coordinator acts on it; the
        others pass it on), so it takes effect within one more hop.
        """
        replica = self.replicas.get(job)
        holders: list[str] = []
        if replica is not None and (replica.final or replica.record.get("parts")):
            record: dict[str, Any] | None = replica.record
        else:
            found = await self._records_of(job)
            holders = [node for _, node, _ in found]
            record = found[0][2] if found else (replica.record if replica is not None else None)
        if record is None:
            raise UserError(f"no job {job} in the mesh (`meshtrain jobs` lists them)")
        if is_final(record):
            state = (record.get("result") or {}).get("state") or "over"
            return f"job {job} already ended ({state}): nothing to cancel"
        if record.get("cancel"):
            return f"job {job} is already being cancelled"
        if not self.cancel_local(job, reason):
            for node in holders:
                self._spawn(self._call(node, "job.cancel", job=job, reason=reason))
        return f"cancelling job {job}"

    async def find(self, job: str) -> dict[str, Any] | None:
        """The newest record of `job` this node holds or can get from another node."""
        replica = self.replicas.get(job)
        if replica is not None and (replica.final or replica.record.get("parts")):
            return replica.record
        best: dict[str, Any] | None = replica.record if replica is not None else None
        found = await self._records_of(job)
        if found and (best is None or record_key(found[0][2]) > record_key(best)):
            best = found[0][2]
        return best

    async def _records_of(self, job: str) -> list[tuple[tuple[int, ...], str, dict[str, Any]]]:
        """(key, node, record) of every live node holding `job`, newest first: one question to each."""
        found = []
        for node, reply in await self._ask_all("job.get", job=job, since=1 << 60):
            record = reply.get("record")
            if isinstance(record, dict):
                found.append((record_key(record), node, record))
        return sorted(found, key=lambda f: (f[0], f[1]), reverse=True)

    async def _holders_of(self, job: str) -> list[str]:
        return [node for _, node, _ in await self._records_of(job)]

    async def _ask_all(self, op: str, **fields: Any) -> list[tuple[str, dict[str, Any]]]:
        others = sorted(self.live() - {self.me})
        replies = await asyncio.gather(*(self._call(node, op, **fields) for node in others))
        return [(node, r) for node, r in zip(others, replies, strict=True) if r is not None]

    async def listing(self) -> list[dict[str, Any]]:
        """Every job any live node holds, newest record of each, for `meshtrain jobs`."""
        best: dict[str, dict[str, Any]] = {}
        mine = [summary_of(r.record) for r in self.replicas.values() if r.record.get("state")]
        rows = list(mine)
        for _, reply in await self._ask_all("jobs.list"):
            rows.extend(j for j in reply.get("jobs") or [] if isinstance(j, dict))
        for row in rows:
            job = str(row.get("job"))
            if job not in best or list(row.get("key") or []) > list(best[job].get("key") or []):
                best[job] = row
        return sorted(best.values(), key=lambda r: float(r.get("started") or 0.0))

    async def latest_job(self) -> str | None:
        """The job `attach` with no id means: the only running one, else the newest."""
        rows = await self.listing()
        running = [r for r in rows if r.get("state") not in ("done", "failed", "cancelled")]
        pick = running or rows
        if len(running) > 1:
            ids = ", ".join(str(r["job"]) for r in running)
            raise UserError(f"more than one job is running ({ids}): name one")
        return str(pick[-1]["job"]) if pick else None

    async def follow(
        self,
        job: str,
        sink: JobSink,
        *,
        since: int = 0,
        logs_only: bool = False,
        runner: JobRunner | None = None,
    ) -> JobResult:
        """Feed `sink` the job's output lines (from `since`) and snapshots until it ends, from any node."""
        remote: str | None = None
        while True:
            replica = self.replicas.get(job)
            if replica is not None and (replica.record.get("parts") or replica.final or replica.runner):
                record, lines = replica.record, replica.lines_since(since)
                remote = None
            else:
                fetched, lines, remote = await self._fetch(job, since, remote)
                if fetched is None:
                    raise UserError(f"lost track of job {job}: no node that holds it answers")
                record = fetched
            for seq, node, rank, stream, line in lines:
                await sink.log(node, rank, stream, line)
                since = seq
            if not logs_only and isinstance(record.get("snapshot"), dict):
                await sink.snapshot(record["snapshot"])
            if runner is not None and not runner.coordinating and isinstance(record.get("state"), dict):
                runner.state = JobState.from_record(record["state"])  # the origin's runner mirrors the job
            if record.get("result"):
                return JobResult.from_record(record["result"])
            if replica is not None and remote is None:
                replica.changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(replica.changed.wait(), STREAM_INTERVAL_S)
            else:
                await asyncio.sleep(STREAM_INTERVAL_S)

    async def _fetch(
        self, job: str, since: int, node: str | None
    ) -> tuple[dict[str, Any] | None, list[Any], str | None]:
        candidates = [node] if node is not None else []
        candidates += await self._holders_of(job) if node is None else []
        for other in candidates:
            reply = await self._call(other, "job.get", job=job, since=since)
            if reply is not None and isinstance(reply.get("record"), dict):
                return reply["record"], list(reply.get("lines") or []), other
        if node is not None:
            return await self._fetch(job, since, None)
        return None, [], None

    # requests

    LOCAL_OPS = ("run", "attach", "mesh.jobs", "mesh.cancel", "logs")
    MESH_OPS = (
        "job.prepare",
        "job.report",
        "job.sync",
        "job.view",
        "job.kill",
        "job.cancel",
        "job.get",
        "jobs.list",
    )

    def serves(self, op: Any, local: bool) -> bool:
        return op in self.MESH_OPS or (local and op in self.LOCAL_OPS)

    async def handle(self, header: dict[str, Any], payload: bytes, conn: Conn) -> None:
        op = str(header.get("op"))
        if op == "job.prepare":
            await self._prepare(header, payload, conn)
        elif op in ("run", "attach", "logs"):
            await self._stream_request(op, header, payload, conn)
        elif op == "mesh.jobs":
            await conn.reply(True, jobs=await self.listing())
        elif op == "mesh.cancel":
            given = header.get("reason")  # a sweep says why it gives a trial up; `meshtrain cancel` does not
            reason = (
                f"cancelled: {given.strip()[:200]}"
                if isinstance(given, str) and given.strip()
                else "cancelled by the user (meshtrain cancel)"
            )
            try:
                note = await self.cancel(str(header.get("job")), reason)
            except UserError as exc:
                await conn.reply(False, error="job", message=str(exc))
                return
            await conn.reply(True, message=note)
        elif op in ("job.view", "job.kill"):
            self._local(op, header)
            await conn.reply(True)
        else:
            await conn.reply(True, **self._mesh_answer(op, header))

    def _local(self, op: str, fields: dict[str, Any]) -> None:
        replica = self.replicas.get(str(fields.get("job")))
        if replica is None:
            return
        link = replica.links.get(str(fields.get("member")))
        if link is None:
            return
        sender = fields.get("by")
        if isinstance(sender, str) and sender != record_coordinator(replica.record, self.live() | {self.me}):
            return  # a coordinator this node's record says was replaced (the far side of a healed partition)
        if op == "job.view" and isinstance(fields.get("view"), dict):
            link.push_view(fields["view"])
        elif op == "job.kill":
            link.kill()

    def _mesh_answer(self, op: str, header: dict[str, Any]) -> dict[str, Any]:
        job = str(header.get("job"))
        replica = self.replicas.get(job)
        if op == "jobs.list":
            return {"jobs": [summary_of(r.record) for r in self.replicas.values() if r.record.get("state")]}
        if op == "job.sync":
            record = header.get("record")
            if not isinstance(record, dict) or not isinstance(record.get("job"), str):
                return {"log_seq": 0}
            replica = self.replicas.get(record["job"])
            if replica is None:
                replica = self.replicas[record["job"]] = JobReplica(job=record["job"], record=record)
            lines = header.get("lines")
            self._adopt(replica, record, lines if isinstance(lines, list) else [])
            return {"log_seq": replica.log_seq}
        if replica is None:
            return {"cursor": None, "record": None}
        if op == "job.get":
            since = header.get("since")
            lines = replica.lines_since(int(since) if isinstance(since, int) else 0)
            return {"record": replica.record, "lines": [list(e) for e in lines]}
        if op == "job.cancel":
            self.cancel_local(job, str(header.get("reason") or "cancelled by the user"))
            return {"cancelled": True}
        if op == "job.report":
            runner = replica.runner
            if runner is None:
                return {"cursor": None, "error": "not coordinating"}
            if header.get("cancel"):
                runner.cancel(str(header["cancel"]))
            first, entries = header.get("first"), header.get("entries")
            cursor = runner.deliver(
                str(header.get("node")),
                str(header.get("member")),
                int(first) if isinstance(first, int) else 1,
                entries if isinstance(entries, list) else [],
                int(header.get("view_version") or 0),
            )
            return {"cursor": cursor, "cancelled": bool(header.get("cancel"))}
        return {}

    async def _prepare(self, header: dict[str, Any], payload: bytes, conn: Conn) -> None:
        """Host one worker of a job: it lives as long as this agent and the job want it."""
        if not isinstance(header.get("job"), str) or not isinstance(header.get("rank"), int):
            await conn.reply(False, error="prepare", message="a job.prepare without job and rank")
            return
        job, member = header["job"], str(header.get("member") or self.me)
        record = header.get("record")
        replica = self.replicas.get(job)
        fresh = replica is None
        if replica is not None and (
            replica.final or (isinstance(record, dict) and superseded(record, replica.record))
        ):
            sender = record.get("coordinator") if isinstance(record, dict) else None
            await conn.reply(
                False,
                error="prepare",
                message=f"{self.me} holds a newer record of job {job}: {sender or 'the sender'} no longer "
                "coordinates it",
            )
            return
        if replica is None:
            replica = JobReplica(job=job, record=record if isinstance(record, dict) else {"job": job})
        elif isinstance(record, dict):
            self._adopt(replica, record, [])
        replica.bundle = payload
        link = LocalLink(replica, member)
        agent = self.agent
        task = asyncio.ensure_future(
            host_worker(
                {"size": 1, **header},
                payload,
                link,
                node=agent.name,
                bind=agent.host,
                jobs_dir=agent._jobs_dir,
                extra_env=agent._worker_env(),
                on_change=agent._on_hosted,
                on_report=agent._on_hosted_report,
                before_start=agent.before_worker_start,
                prepare_data=agent.data.prepare,  # run --data: the job's data on this node first
            )
        )
        if fresh and isinstance(record, dict):
            self.replicas[job] = replica
        old = replica.links.get(member)
        if old is not None:
            old.shut()
        replica.links[member] = link

        replica.tasks[member] = task

        def finished(_: asyncio.Future[None]) -> None:
            if replica.tasks.get(member) is task:
                replica.tasks.pop(member, None)
            link.done = True
            if replica.links.get(member) is link:
                replica.links.pop(member, None)
            if not link.ready.done():
                link.ready.set_result(
                    {"ok": False, "error": "worker", "message": f"the worker on {self.me} ended"}
                )

        task.add_done_callback(finished)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        answer = await link.ready
        if not answer.get("ok") and fresh:
            replica.links.pop(member, None)
            if not replica.links and self.replicas.get(job) is replica and not replica.record.get("parts"):
                self.replicas.pop(job, None)
        ok = bool(answer.pop("ok", False))
        await conn.reply(ok, **answer)

    async def _stream_request(self, op: str, header: dict[str, Any], payload: bytes, conn: Conn) -> None:
        """`run` (submit, then follow), `attach` and `logs` for a CLI on this machine."""
        submitted: asyncio.Task[JobResult] | None = None
        if op == "run":
            try:
                request = _request_from(header, payload)
            except JobSpecError as exc:
                await conn.reply(False, error="spec", message=str(exc))
                return
            runner = JobRunner(request=request, membership=self.agent, protocol=self.agent.protocol)
            job = runner.job
            submitted = asyncio.ensure_future(self.agent.submit(request, _ForwardSink(conn), runner))
            self._background.add(submitted)
            submitted.add_done_callback(self._background.discard)
            while job not in self.replicas and not submitted.done():
                await asyncio.sleep(0.01)
            if header.get("detach") and job in self.replicas:
                replica = self.replicas[job]
                while not replica.final and str((replica.record.get("state") or {}).get("state")) not in (
                    "running",
                    "paused",
                ):
                    replica.changed.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(replica.changed.wait(), STREAM_INTERVAL_S)
                if not replica.final:
                    await conn.reply(True, job=job, state="running", detached=True)
                    return
        else:
            named = header.get("job") if isinstance(header.get("job"), str) else None
            try:
                picked = named or await self.latest_job()
            except UserError as exc:
                await conn.reply(False, error="job", message=str(exc))
                return
            if picked is None:
                await conn.reply(False, error="job", message="no job has run on this mesh yet")
                return
            job = picked
            if await self.find(job) is None:
                await conn.reply(
                    False, error="job", message=f"no job {job} in the mesh (`meshtrain jobs` lists them)"
                )
                return
            if op == "logs" and not header.get("follow"):
                record = await self.find(job)
                lines = (
                    self.replicas[job].lines_since(0)
                    if job in self.replicas and self.replicas[job].log
                    else (await self._fetch(job, 0, None))[1]
                )
                for seq, node, rank, stream, line in lines:
                    await conn.send(
                        "log", {"node": node, "rank": rank, "stream": stream, "line": line, "seq": seq}
                    )
                result = (record or {}).get("result") or {}
                await conn.reply(True, job=job, state=result.get("state"), message=result.get("message"))
                return
        cancel_reason = "cancelled by the user (Ctrl-C in meshtrain run)"
        said: list[str] = []

        async def watch_client() -> None:
            try:
                while True:
                    frame, _ = await conn.recv()
                    if frame.get("op") == "cancel" and op == "run":
                        why = frame.get("why")
                        if isinstance(why, str) and why and not said:
                            said.append(why)  # a client stopped by a signal says which: one line here
                            self.agent._event(
                                "run", self.me, f"job {job}: {why}: cancelling it on every node"
                            )
                        self.cancel_local(
                            str(job), f"cancelled: {why}" if isinstance(why, str) else cancel_reason
                        )
            except (WireError, ConnectionError, asyncio.IncompleteReadError):
                if (
                    op == "run" and not said
                ):  # gone without a word (killed, its terminal lost): the job goes on
                    self.agent._event(
                        "run", self.me, f"job {job}: its `meshtrain run` client went away; it goes on"
                    )
                return

        watcher = asyncio.create_task(watch_client())
        try:
            if submitted is not None:
                result = await submitted
            else:
                result = await self.follow(str(job), _ForwardSink(conn), logs_only=op == "logs")
        except UserError as exc:
            with contextlib.suppress(ConnectionError, WireError):
                await conn.reply(False, error="job", message=str(exc))
            return
        finally:
            watcher.cancel()
        with contextlib.suppress(ConnectionError, WireError):
            await conn.reply(
                True,
                job=job,
                state=result.state,
                message=result.message,
                traceback=result.traceback,
                exit_code=result.exit_code,
            )


class _ForwardSink:
    """A JobSink that writes to a CLI's control stream."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    async def log(self, node: str, rank: int, stream: str, line: str) -> None:
        with contextlib.suppress(ConnectionError, WireError):
            await self.conn.send("log", {"node": node, "rank": rank, "stream": stream, "line": line})

    async def snapshot(self, snap: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, WireError):
            await self.conn.send("event", {"type": "job", "snapshot": snap})


class _NullSink:
    async def log(self, node: str, rank: int, stream: str, line: str) -> None:
        return None

    async def snapshot(self, snap: dict[str, Any]) -> None:
        return None


def _request_from(header: dict[str, Any], payload: bytes) -> JobRequest:
    """The job a `run` request's header asks for (meshtrain.jobspec); JobSpecError for one refused."""
    return JobRequest.of(JobSpec.from_header(header), payload)
