"""The node agent behind `meshtrain join`: membership, the control server, jobs.

One asyncio process per machine. It publishes what the node is (platform,
device, cores, memory, load, protocol version, control port) as gossip
metadata, keeps a short log of membership events, answers the CLI over a
0600 unix socket and other agents over TCP, coordinates the jobs submitted
to it (agent/jobs.py) and hosts the workers other coordinators place on it
(agent/workers.py). User code never runs in here: a crashing script takes
down its worker process, never the node's membership.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from meshtrain import PROTOCOL_VERSION, __version__
from meshtrain.agent.control import Conn, ControlServer, call, socket_path, state_dir
from meshtrain.agent.data_transfer import NodeData
from meshtrain.agent.jobs import JobRequest, JobResult, JobRunner, JobSink
from meshtrain.agent.mesh_jobs import MeshJobs
from meshtrain.agent.placement import Candidate
from meshtrain.agent.snapshot import EVENTS_KEPT, mesh_snapshot
from meshtrain.agent.workers import HostedWorker
from meshtrain.checkpoints.node import (
    CKPT_META_KEY,
    NodeCheckpoints,
    claim_store,
    read_term_floor,
    write_term_floor,
)
from meshtrain.errors import UserError, WireError
from meshtrain.gossip.config import GossipConfig
from meshtrain.jobspec import JobSpec, JobSpecError
from meshtrain.metrics import extras
from meshtrain.security import DROP_REASONS, ENV_SECRET, DropCounters, Keyring
from meshtrain.worker.checkpointing import ENV_CHECKPOINTS

LOAD_PERIOD_S = 5.0
JOB_EVENTS_BEFORE = 5
ELECTION_SETTLE_S = 1.0  # a new node waits for its join to land before it may claim leadership
ELECTION_PERIOD_S = 0.5
NODE_ID_FILE = "node-id"
LEAVE_WORKERS_S = 5.0  # how long a leaving agent waits for its workers to end (SIGTERM, then SIGKILL)
FINISHED_JOBS_KEPT = 20


def node_facts() -> dict[str, Any]:
    """What this machine offers, in the snapshot's terms, for gossip metadata."""
    facts: dict[str, Any] = {
        "platform": f"{platform.system()} {platform.machine()}",
        "device": "CPU",
        "cores": os.cpu_count() or 1,
        "memory_gb": None,
        "battery": None,
    }
    try:
        from meshtrain import sysinfo

        known = sysinfo.node_facts()
    except Exception:  # noqa: BLE001 - facts are decoration; an agent must start without them
        return facts
    backend = str(known.get("mlx_backend") or known.get("mlx_device") or "").lower()
    facts["device"] = "Metal" if "metal" in backend else "CUDA" if "cuda" in backend else "CPU"
    if facts["device"] == "CPU":
        from meshtrain import blas

        if blas.slow_warning() is not None:  # every view shows it: a node training ~30x slower
            facts["device"] = "CPU, slow BLAS"
    for key in ("cores", "memory_gb", "battery"):
        if known.get(key) is not None:
            facts[key] = known[key]
    return facts


def node_identity(home: Path, name: str) -> str:
    """This node's id in the mesh, stored in ``home/nodes/NAME/node-id`` (created on first use).

    Gossip keys on the id, so two machines with one hostname are two members (their names are then
    told apart by meshtrain.gossip.names), while a restart of the same agent keeps its id and is
    recognised as the same member coming back. Per name, because one state directory may hold
    several agents (the nodes of a `--local` mesh). Readable: the name, then 12 random hex digits.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:40] or "node"
    path = home / "nodes" / safe / NODE_ID_FILE
    with contextlib.suppress(OSError, UnicodeDecodeError):
        stored = path.read_text().strip()
        if re.fullmatch(r"[A-Za-z0-9._-]{1,100}", stored):
            return stored
    node_id = f"{safe}-{secrets.token_hex(6)}"
    tmp = path.with_name(f".{NODE_ID_FILE}.{os.getpid()}")
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(node_id + "\n")
        os.replace(tmp, path)
    return node_id


class _ForwardSink:
    """A JobSink that writes to the submitting CLI's control stream."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    async def log(self, node: str, rank: int, stream: str, line: str) -> None:
        with contextlib.suppress(ConnectionError, WireError):
            await self.conn.send("log", {"node": node, "rank": rank, "stream": stream, "line": line})

    async def snapshot(self, snap: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, WireError):
            await self.conn.send("event", {"type": "job", "snapshot": snap})


class Agent:
    """One node of the mesh; `await start()`, then `await wait_closed()` until it leaves."""

    def __init__(
        self,
        *,
        name: str | None = None,
        gossip: GossipConfig | None = None,
        home: Path | None = None,
        unix_socket: bool = True,
        protocol: int = PROTOCOL_VERSION,
        worker_env: dict[str, str] | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        """`gossip` says where the node listens and whom it joins through (meshtrain.gossip.config).

        `keyring` is the mesh secret: gossip, control TCP and the workers' ring use it.

        None runs an unauthenticated mesh (only tests and benches do that; the CLI
        always passes one, `run --local` an ephemeral one).
        """
        self._name = name or socket.gethostname().split(".")[0]
        self.explicit_name = name is not None  # a clash then refuses to start, instead of taking NAME-2
        self.failure: str | None = None  # why this agent stopped itself (a name clash), for the CLI
        self._leaving: asyncio.Future[None] | None = None
        self.gossip = gossip or GossipConfig()
        self.home = home or state_dir()
        self.unix_socket = unix_socket
        self.protocol = protocol
        self.worker_env = dict(worker_env or {})
        self.keyring = keyring
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self.runners: dict[str, JobRunner] = {}
        self.jobs = MeshJobs(self)  # every job this node runs, submitted or holds (agent/mesh_jobs.py)
        self.hosted: dict[str, HostedWorker] = {}
        self.finished_jobs: deque[dict[str, Any]] = deque(maxlen=FINISHED_JOBS_KEPT)  # for the dashboard
        self._ended_ring_drops = DropCounters()  # refused ring hellos of workers that have exited
        self.node: Any = None
        self._server = ControlServer(self._handle, protocol=protocol, keyring=keyring)
        self._closed = asyncio.Event()
        self._changed = asyncio.Event()
        self.election: Any = None  # meshtrain.leader.Election, once the node has an id
        self.checkpoints: NodeCheckpoints | None = None  # store, transfer server, checkpoint leader role
        self.data = NodeData(self)  # run --data: the submitted sources, the cache, serving and fetching
        self._tasks: list[asyncio.Task[None]] = []
        self._jobs_dir = Path(tempfile.mkdtemp(prefix=f"meshtrain-{self.name}-"))
        self.control_port = 0
        self.tracking: Any = None  # meshtrain.tracking.recorder.Tracking, opened at the first job or push

    @property
    def name(self) -> str:
        """This node's display name: the requested one, or NAME-2... when a live member held it first."""
        return str(self.node.name) if self.node is not None else self._name

    @name.setter
    def name(self, value: str) -> None:  # the name to ask for (before start)
        self._name = value

    @property
    def host(self) -> str:
        """The address this node binds (gossip, control TCP, checkpoint transfer)."""
        return self.gossip.host

    @property
    def join_problem(self) -> str | None:
        """Why the join through the seeds failed (refused, silent, unreachable), while it has."""
        return self.node.join_problem if self.node is not None else None

    # lifecycle

    async def start(self) -> None:
        from meshtrain.gossip import GossipNode

        self.control_port = await self._server.start_tcp(self.host, 0)
        store, lock = claim_store(self.home, self.name)
        self.checkpoints = NodeCheckpoints(
            self,
            store,
            call=call,
            deliver=self._deliver_to_worker,
            event=self._event,
            keyring=self.keyring,
            lock=lock,
        )
        ckpt_port = await self.checkpoints.start(self.host)
        meta = {
            "proto": self.protocol,
            "version": __version__,
            "control": self.control_port,
            CKPT_META_KEY: ckpt_port,
            **node_facts(),
            "load": None,
            "job": None,
            "role": None,
        }
        self.node = GossipNode.from_config(
            self.name,
            self.gossip,
            meta,
            keyring=self.keyring,
            node_id=node_identity(self.home, self._name),
            on_clash="refuse" if self.explicit_name else "suffix",
        )
        self.node.subscribe(self._on_member_event)
        await self.node.start()
        if self.failure is not None:
            raise UserError(self.failure)
        if self.node.join_refused:  # a seed answered, and refused us: no retry can help
            raise UserError(str(self.node.join_problem))
        if self.unix_socket:  # last: once the CLI can reach us, the node is fully there
            await self._server.start_unix(socket_path(self.home))
        from meshtrain.leader.election import Election, is_agent

        loop = asyncio.get_running_loop()
        self.election = Election(
            self.node.id,
            eligible=is_agent,
            started=loop.time(),
            settle=ELECTION_SETTLE_S,
            term_floor=read_term_floor(self.home),
        )
        self._event("joined", self.name, f"this node, gossip port {self.node.port}")
        if self.join_problem is not None:
            self._event("join", self.name, f"{self.join_problem}; retrying")
        self._elect()
        self._tasks.append(asyncio.create_task(self._publish_load()))
        self._tasks.append(asyncio.create_task(self._elect_periodically()))
        self.jobs.start()

    @property
    def gossip_port(self) -> int:
        return int(self.node.port)

    @property
    def advertised(self) -> tuple[str, int]:
        """The (host, gossip port) other nodes reach this one at."""
        me = next((m for m in self.members() if m.id == self.node.id), None)
        return (str(me.addr[0]), int(me.addr[1])) if me is not None else (self.host, self.gossip_port)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def leave(self) -> None:
        """Leave the mesh gracefully; every caller (Ctrl-C, `meshtrain leave`, the CLI's own exit)
        waits for the one leave in progress to finish, so none ends the process half-way."""
        if self._leaving is None:
            self._leaving = asyncio.ensure_future(self._leave())
        await asyncio.shield(self._leaving)

    async def _leave(self) -> None:
        """Announce `left` first, so the coordinators of our workers' jobs drop them from the views at
        once (a planned departure: no suspicion, no waiting on broken rings); then end the workers,
        the jobs this node holds, the control plane, and close."""
        self._closed.set()
        if self.node is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.node.announce_leave(), 3.0)
        await self.jobs.close()  # this node's workers end (an elastic loss); its jobs go on elsewhere
        deadline = asyncio.get_running_loop().time() + LEAVE_WORKERS_S
        while self.hosted and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)  # each worker's host sends SIGTERM (SIGKILL after a grace)
        for task in self._tasks:
            task.cancel()
        if self.checkpoints is not None:
            with contextlib.suppress(Exception):
                await self.checkpoints.close()
        from meshtrain.notify.hook import drain

        await drain(3.0)  # notifications of jobs that just ended go out before the process does
        await self._server.close()
        if self.node is not None:
            with contextlib.suppress(Exception):
                await self.node.close()
        shutil.rmtree(self._jobs_dir, ignore_errors=True)

    # membership as the job coordinator sees it

    def members(self) -> list[Any]:
        return list(self.node.members()) if self.node is not None else []

    def candidates(self) -> list[Candidate]:
        me = self.node.id if self.node is not None else None
        return [
            Candidate(
                name=m.name,
                state=m.state,
                is_self=m.id == me,
                protocol=m.meta.get("proto") if "control" in (m.meta or {}) else None,
            )
            for m in self.members()
        ]

    def endpoint(self, name: str) -> tuple[str, int] | None:
        me = self.node.id if self.node is not None else None
        live_first = sorted(self.members(), key=lambda m: m.state not in ("alive", "suspect"))
        for m in live_first:  # a dead member may share the name of the one that replaced it
            if m.name == name and "control" in (m.meta or {}):
                host = m.addr[0]
                if m.id == me and host in ("0.0.0.0", ""):
                    host = "127.0.0.1"
                return host, int(m.meta["control"])
        return None

    async def changed(self, timeout: float) -> None:
        self._changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def _on_member_event(self, event: Any) -> None:
        self._changed.set()
        member = event.member
        where = f"{member.addr[0]}:{member.addr[1]}"
        if event.kind == "renamed":
            self._event("renamed", member.name, f"the name {self._name} is taken by another machine")
        elif event.kind == "name_taken":
            self.failure = (
                f"the name {self._name} is taken by the node at {where} (another machine, id {member.id}); "
                "choose another with --name"
            )
            self._event("refused", self._name, self.failure)
            if self.election is not None:  # running: stop; still starting: start() raises it
                asyncio.ensure_future(self.leave())
            return
        elif event.kind != "updated":
            self._event(event.kind, member.name, where)
        if event.kind in ("dead", "left") and self.checkpoints is not None:
            others = [m for m in self.members() if m.name == member.name and m.id != member.id]
            if not any(m.state in ("alive", "suspect") for m in others):  # not a namesake's exit
                self.checkpoints.member_lost(member.name)
        self._elect()

    def _elect(self) -> None:
        """Feed the view to the leader election; publish our claim, log a change of leader."""
        if self.election is None or self.closed:
            return
        from meshtrain.leader.election import Claim, Follow, LeaderChanged, Resign

        actions = self.election.observe(self.members(), asyncio.get_running_loop().time())
        meta: dict[str, Any] = {}
        for action in actions:
            if isinstance(action, Claim):
                meta[self.election.meta_key] = action.term
            elif isinstance(action, Resign):
                meta[self.election.meta_key] = None
            elif isinstance(action, Follow):
                meta[self.election.follow_key] = action.leader  # our support, should two claims meet
            elif isinstance(action, LeaderChanged) and action.current.leader != action.previous.leader:
                leader = action.current.leader
                name = next((m.name for m in self.members() if m.id == leader), leader or "none")
                term = f", term {action.current.term}" if action.current.settled else ""
                self._event("leader", name, f"checkpoint leader{term}")
        if meta:
            self.node.update_meta(**meta)  # one gossip update for a claim and its follow
        if actions:
            self._leadership_to_checkpoints()

    def _leadership_to_checkpoints(self) -> None:
        """Tell the checkpoint layer who leads (settled only) and whether it is us; persist the term."""
        if self.checkpoints is None or self.election is None:
            return
        current = self.election.current
        name = next((m.name for m in self.members() if m.id == current.leader), None)
        self.checkpoints.leadership(name if current.settled else None, self.election.claim)
        write_term_floor(self.home, self.election.highest_term)

    async def _elect_periodically(self) -> None:
        """A view that stops changing must still settle (the election's claim waits out its settle time)."""
        while True:
            await asyncio.sleep(ELECTION_PERIOD_S)
            self._elect()

    def _event(self, kind: str, node: str, detail: str) -> None:
        event = {"t": time.time(), "kind": kind, "node": node, "detail": detail}
        self.events.append(event)
        for runner in self.runners.values():
            runner.add_event(event)

    async def _publish_load(self) -> None:
        try:
            import psutil
        except ImportError:  # pragma: no cover
            return
        psutil.cpu_percent(None)
        last: float | None = None
        while True:
            await asyncio.sleep(LOAD_PERIOD_S)
            load = round(psutil.cpu_percent(None) / 100.0, 2)
            if last is None or abs(load - last) >= 0.05:
                last = load
                self.node.update_meta(load=load)

    # snapshots

    def mesh_snapshot(self) -> dict[str, Any]:
        jobs = [r.state.summary() for r in self.runners.values()]
        known = {j["job"] for j in jobs}
        for hosted in self.hosted.values():
            if hosted.job in known:
                continue
            known.add(hosted.job)
            m = hosted.metrics
            jobs.append(
                {
                    "job": hosted.job,
                    "script": hosted.script,
                    "state": "running",
                    "nodes": [x.name for x in self.members() if (x.meta or {}).get("job") == hosted.job],
                    "epoch": _count(m.get("epoch")),  # loop indices reported, counts shown
                    "epochs": m.get("epochs", 0),
                    "step": _count(m.get("step")),
                    "loss": m.get("loss"),
                    "test_accuracy": m.get("test_accuracy"),
                    "metrics": extras(m),
                }
            )
        drops = self.drop_counts()
        leader = self.election.current.leader if self.election is not None else None
        return dict(mesh_snapshot(self.node.id, leader, self.members(), self.events, jobs, drops))

    def drop_counts(self) -> dict[str, int]:
        """What this node refused, by reason: gossip (codec and authentication) and control TCP."""
        layers: list[dict[str, int]] = [self._server.drops.snapshot(), self._ended_ring_drops.snapshot()]
        layers += [h.ring_drops for h in self.hosted.values()]
        if self.node is not None:
            layers.append(dict(self.node.drops))
            security = getattr(self.node, "security_drops", None)
            if security is not None:
                layers.append(security.snapshot())
        merged = DropCounters.merge(layers)
        for reason, n in (self.node.drops if self.node is not None else {}).items():
            merged.setdefault(reason, n)  # the codec's own reasons (socket, tcp, error) as they are
        return merged

    # jobs

    async def submit(self, request: JobRequest, sink: JobSink, runner: JobRunner | None = None) -> JobResult:
        """Coordinate a job from this node until it ends."""
        options = dict(request.options.to_wire())
        await self.data.register(options)  # run --data PATH: served from here, the job's origin
        if options.get("data") != request.options.data:
            request = request.with_options(request.options.replace(data=options["data"]))
        if runner is not None:
            runner.request = request  # the runner places the job with the origin named
        runner = runner or JobRunner(request=request, membership=self, protocol=self.protocol)
        for event in list(self.events)[-JOB_EVENTS_BEFORE:]:
            runner.add_event(event)  # the view opens on how the mesh got here
        self.runners[runner.job] = runner  # --notify: whoever coordinates tells (mesh_jobs, notify.hook)
        try:
            return await runner.run(sink)
        finally:
            self.runners.pop(runner.job, None)
            self.finished_jobs.append(runner.state.snapshot(time.time()))

    def job_snapshots(self) -> list[dict[str, Any]]:
        """Full snapshots of the jobs this node coordinates, then of those that ended here (the dashboard)."""
        now = time.time()
        return [r.state.snapshot(now) for r in self.runners.values()] + list(self.finished_jobs)

    def _on_hosted(self, hosted: HostedWorker, started: bool) -> None:
        key = f"{hosted.job}/{hosted.member or hosted.rank}"
        if started:
            self.hosted[key] = hosted
        else:
            self.hosted.pop(key, None)
            for reason, n in hosted.ring_drops.items():
                if n and reason in DROP_REASONS:
                    self._ended_ring_drops.count(reason, n)
        current = next(iter(self.hosted.values()), None)
        if self.node is not None:
            self.node.update_meta(job=current.job if current else None, role="worker" if current else None)

    # checkpoints: the hooks the job coordinator and the worker host call

    async def before_worker_start(self, job: str, options: dict[str, Any] | None) -> None:
        """Before a worker of `job` starts here: with ``resume``, fetch the run's newest checkpoint."""
        if self.checkpoints is not None:
            await self.checkpoints.before_worker_start(job, options)

    def on_job_progress(self, job: str, step: int, members: list[tuple[str, str]]) -> None:
        """The coordinator's (step, [(member id, node name)]) of `job`: on to the checkpoint leader."""
        if self.checkpoints is None:
            return
        runner = self.runners.get(job)
        options = runner.request.options.to_wire() if runner is not None else None
        self.checkpoints.on_job_progress(job, step, members, options)

    def on_worker_report(self, job: str, member: str, message: dict[str, Any]) -> None:
        """A hosted worker's ``{"k": "ckpt", ...}`` report (an ack for the leader). Synchronous."""
        if self.checkpoints is not None:
            self.checkpoints.on_worker_report(job, member, message)

    def send_to_worker(self, job: str, member: str, obj: dict[str, Any]) -> bool:
        """One JSON line to the worker of `job` that runs here as `member`; False when there is none."""
        for hosted in list(self.hosted.values()):
            if hosted.job == job and (hosted.member or self.name) == member:
                return bool(hosted.send_line(obj))
        return False

    def _deliver_to_worker(self, job: str, member: str, obj: dict[str, Any]) -> bool:
        return self.send_to_worker(job, member, obj)  # late-bound: tests stand in for the worker here

    def _on_hosted_report(self, hosted: HostedWorker, message: dict[str, Any]) -> None:
        if message.get("k") == "ckpt":
            self.on_worker_report(hosted.job, hosted.member or self.name, message)

    # control requests

    async def _handle(self, header: dict[str, Any], payload: bytes, conn: Conn) -> None:
        op = header.get("op")
        local = _is_unix(conn)
        if op == "ping":
            await conn.reply(
                True, name=self.name, version=__version__, proto=self.protocol, join_problem=self.join_problem
            )
        elif op == "status":
            await conn.reply(True, snapshot=self.mesh_snapshot())
        elif op == "jobs" and local:
            await conn.reply(True, jobs=self.job_snapshots())
        elif op == "cancel" and local and isinstance(header.get("job"), str):
            runner = self.runners.get(header["job"])
            if runner is not None:
                runner.cancel(str(header.get("reason") or "cancelled by the user"))
            why = "cancelling" if runner is not None else "not coordinated by this node"
            await conn.reply(runner is not None, message=f"job {header['job']}: {why}")
        elif self.jobs.serves(op, local):  # job.*, jobs.list; run, attach, logs, mesh.jobs, mesh.cancel
            await self.jobs.handle(header, payload, conn)
        elif op in ("runs.put", "runs.tag"):  # a run record's copy, a model version (meshtrain.tracking)
            from meshtrain.tracking.recorder import Tracking

            self.tracking = self.tracking or Tracking(self)
            await self.tracking.handle(header, payload, conn)
        elif op == "run" and local:
            await self._handle_run(header, payload, conn)
        elif op == "data.fetch":  # run --data: another node asks for a job's data (authenticated TCP)
            await self.data.serve(header, payload, conn)
        elif isinstance(op, str) and op.startswith("ckpt") and self.checkpoints is not None:
            ok, message = await self.checkpoints.handle(header)
            await conn.reply(ok, message=message)
        elif op == "leave" and local:
            await conn.reply(True)
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.leave()))
        else:
            await conn.reply(False, error="op", message=f"unknown or non-local request {op!r}")

    def _worker_env(self) -> dict[str, str]:
        """The worker's extra environment: the keyring travels here, never on a command line."""
        env = dict(self.worker_env)
        if self.checkpoints is not None:
            env[ENV_CHECKPOINTS] = str(self.checkpoints.store.root)
        if self.keyring is not None:
            env[ENV_SECRET] = self.keyring.to_text()
        return env

    async def _handle_run(self, header: dict[str, Any], payload: bytes, conn: Conn) -> None:
        try:
            request = JobRequest.of(JobSpec.from_header(header), payload)
        except JobSpecError as exc:
            await conn.reply(False, error="spec", message=str(exc))
            return
        runner = JobRunner(request=request, membership=self, protocol=self.protocol)

        async def watch_submitter() -> None:
            try:
                while True:
                    frame, _ = await conn.recv()
                    if frame.get("op") == "cancel":
                        runner.cancel("cancelled by the user")
            except (WireError, ConnectionError, asyncio.IncompleteReadError):
                runner.cancel("the submitter went away")

        watcher = asyncio.create_task(watch_submitter())
        try:
            result = await self.submit(request, _ForwardSink(conn), runner)
        finally:
            watcher.cancel()
        with contextlib.suppress(ConnectionError, WireError):
            await conn.reply(
                True,
                state=result.state,
                message=result.message,
                traceback=result.traceback,
                exit_code=result.exit_code,
                job=runner.job,
            )


def _count(index: Any) -> int:
    return index + 1 if isinstance(index, int) and not isinstance(index, bool) else 0


def _is_unix(conn: Conn) -> bool:
    sock = conn.writer.get_extra_info("socket")
    return sock is not None and sock.family == socket.AF_UNIX
