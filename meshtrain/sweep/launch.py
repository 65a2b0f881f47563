"""Where a sweep's trials run: an in-process ``--local N`` mesh, or the mesh of this machine's agent.

Both start each trial as an ordinary job pinned to named nodes (``--nodes a,b``) and read its
metrics back from the run store the coordinating agent writes (meshtrain.tracking).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from meshtrain.errors import UserError, WireError
from meshtrain.tracking.store import RunStore

NODE_WAIT_S = 30.0
SETTLE_S = 5.0


class _QuietSink:
    """A trial's output is kept, not printed (the sweep prints one line per trial event)."""

    def __init__(self) -> None:
        self.tail: list[str] = []

    async def log(self, node: str, rank: int, stream: str, line: str) -> None:
        self.tail = (self.tail + [f"[{node}] {line}"])[-20:]

    async def snapshot(self, snap: dict[str, Any]) -> None:
        pass


class _LocalTrial:
    def __init__(self, runner: Any, task: asyncio.Task[Any]) -> None:
        self.runner, self.task = runner, task

    @property
    def run_id(self) -> str | None:
        return str(self.runner.job)

    def cancel(self, reason: str) -> None:
        self.runner.cancel(reason)

    def abandon(self) -> None:
        pass  # the in-process runner ends with the local mesh

    async def wait(self) -> tuple[str, str | None]:
        result = await self.task
        return str(result.state), result.message


class LocalLauncher:
    """An embedded mesh of N agents (like `run --local N`), every trial coordinated by the first."""

    def __init__(self, n: int, script: str, bundle: bytes) -> None:
        self.n, self.script, self.bundle = n, script, bundle
        self.agents: list[Any] = []
        self.nodes: list[str] = []
        self._store: RunStore | None = None

    async def __aenter__(self) -> LocalLauncher:
        from meshtrain.launcher import start_local_mesh

        self.agents = await start_local_mesh(self.n)
        self.nodes = [a.name for a in self.agents]
        return self

    async def __aexit__(self, *exc: object) -> None:
        from meshtrain.launcher import stop_local_mesh

        await stop_local_mesh(self.agents)

    async def start(self, args: list[str], nodes: list[str], options: dict[str, Any]) -> _LocalTrial:
        from meshtrain.agent.jobs import JobRequest, JobRunner
        from meshtrain.jobspec import JobOptions

        coordinator = self.agents[0]
        request = JobRequest(
            script=self.script,
            args=args,
            bundle=self.bundle,
            nodes=",".join(nodes),
            wait=NODE_WAIT_S,
            options=JobOptions.from_wire(options),  # the trial's options, checked as any job's
        )
        runner = JobRunner(request=request, membership=coordinator, protocol=coordinator.protocol)
        task = asyncio.ensure_future(coordinator.submit(request, _QuietSink(), runner))
        return _LocalTrial(runner, task)

    def _stores(self) -> list[RunStore]:
        """Every node's store: a trial is recorded by whichever node coordinates it (its own)."""
        stores = [getattr(getattr(a, "tracking", None), "store", None) for a in self.agents]
        return [s for s in stores if s is not None]

    def metrics(self, run_id: str, key: str) -> list[tuple[int, float, float]]:
        return max((s.series(run_id, key) for s in self._stores()), key=len, default=[])

    def metric_keys(self, run_id: str) -> list[str]:
        return sorted({k for s in self._stores() for k in s.metric_keys(run_id)})

    async def settled(self, run_id: str) -> None:
        await _settled(self._stores, run_id)

    async def live_nodes(self) -> list[str]:
        coordinator = self.agents[0]
        return sorted(c.name for c in coordinator.candidates() if c.state == "alive")

    def stores(self) -> list[RunStore]:
        """Every node's run store as on disk (an agent opens its own at its first job)."""
        from meshtrain.tracking.recorder import db_path_for

        paths = [db_path_for(a) for a in self.agents]
        return [RunStore(p) for p in paths if p.is_file()]

    def checkpoint_stores(self) -> list[Any]:
        """Every node's checkpoint store (they are all on this machine)."""
        return [a.checkpoints.store for a in self.agents if getattr(a, "checkpoints", None) is not None]


class _AgentTrial:
    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.job: str | None = None
        self._done: asyncio.Future[tuple[str, str | None]] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.ensure_future(self._read())

    @property
    def run_id(self) -> str | None:
        return self.job

    def cancel(self, reason: str) -> None:
        with contextlib.suppress(Exception):
            asyncio.ensure_future(self.conn.send("request", {"op": "cancel"}))

    def abandon(self) -> None:
        self._reader.cancel()  # its `finally` closes the connection
        if not self._done.done():
            self._done.set_result(("failed", "abandoned: its nodes left the mesh"))

    async def _read(self) -> None:
        try:
            while True:
                header, _ = await self.conn.recv()
                kind = header.get("kind")
                snap = header.get("snapshot")
                if kind == "event" and isinstance(snap, dict) and snap.get("job"):
                    self.job = str(snap["job"])
                elif kind == "reply":
                    self.job = self.job or header.get("job")
                    state = str(header.get("state") or ("failed" if not header.get("ok") else "done"))
                    self._done.set_result((state, header.get("message")))
                    return
        except Exception as exc:  # noqa: BLE001 - the agent went away: this trial failed
            if not self._done.done():
                self._done.set_result(("failed", f"lost the agent: {exc.__class__.__name__}"))
        finally:
            await self.conn.close()

    async def wait(self) -> tuple[str, str | None]:
        return await self._done


class AgentLauncher:
    """The mesh of this machine's agent: trials go to it like `meshtrain run --nodes NAME` would."""

    def __init__(self, socket: Path, script: str, bundle: bytes, db: Path) -> None:
        self.socket, self.script, self.bundle, self.db = socket, script, bundle, db
        self.nodes: list[str] = []
        self._store: RunStore | None = None

    async def __aenter__(self) -> AgentLauncher:
        from meshtrain.agent.control import call

        try:
            reply = await asyncio.wait_for(call(self.socket, "status"), 10.0)
        except (OSError, asyncio.TimeoutError, WireError):
            raise UserError(
                "no agent is running on this machine: `meshtrain join`, or sweep --local N"
            ) from None
        self.nodes = _alive(reply)
        if not self.nodes:
            raise UserError("the mesh has no live node to run trials on")
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def start(self, args: list[str], nodes: list[str], options: dict[str, Any]) -> _AgentTrial:
        from meshtrain.agent.control import open_request

        conn = await open_request(
            self.socket,
            "run",
            self.bundle,
            script=self.script,
            args=args,
            nodes=",".join(nodes),
            min_nodes=None,
            wait=NODE_WAIT_S,
            options=options,
        )
        return _AgentTrial(conn)

    def _runs(self) -> RunStore | None:
        if self._store is None and self.db.exists():
            self._store = RunStore(self.db)
        return self._store

    def metrics(self, run_id: str, key: str) -> list[tuple[int, float, float]]:
        store = self._runs()
        return store.series(run_id, key) if store is not None else []

    def metric_keys(self, run_id: str) -> list[str]:
        store = self._runs()
        return store.metric_keys(run_id) if store is not None else []

    async def settled(self, run_id: str) -> None:
        await _settled(lambda: [s for s in [self._runs()] if s is not None], run_id)

    async def live_nodes(self) -> list[str]:
        from meshtrain.agent.control import call

        try:
            reply = await asyncio.wait_for(call(self.socket, "status"), 10.0)
        except (OSError, asyncio.TimeoutError, WireError):
            raise UserError("the agent on this machine stopped answering: the sweep stops") from None
        return _alive(reply)

    def stores(self) -> list[RunStore]:
        store = self._runs()
        return [store] if store is not None else []

    def checkpoint_stores(self) -> list[Any]:
        """This machine's store: the agent's own, which holds the trials it ran and the replicas it got."""
        from meshtrain.checkpoints.store import CheckpointStore

        return [CheckpointStore()]


def _alive(reply: dict[str, Any]) -> list[str]:
    nodes = (reply.get("snapshot") or {}).get("nodes") or []
    return sorted(str(n["name"]) for n in nodes if n.get("state") == "alive" and n.get("role") != "viewer")


async def _settled(stores: Any, run_id: str, timeout: float = SETTLE_S) -> None:
    """Wait (briefly) until a store holds the trial's closed record: a trial coordinated by another
    node reaches this one by that node's push, which may land just after the job's end does."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for store in stores():
            run = store.get(run_id)
            if run is not None and run.ended is not None:
                return
        await asyncio.sleep(0.1)
