"""Where the dashboard's snapshots come from: the local agent, over its control socket or in process.

Both give the same three things: the mesh snapshot (`status`, exactly what
`meshtrain status --json` prints), the full snapshots of the jobs the agent
coordinates and has finished (`jobs`, what the live job view reads), and a
way to cancel one (`cancel`). `meshtrain dashboard` is a client of the unix
socket (0600, this user only); `join --dashboard` reads the agent directly.
Checkpoints are listed from this node's store (file reads, in a thread), and
finished jobs' history read from its run store (`runs_db`, meshtrain.tracking);
`checkpoint_root` is where an export started from the page reads.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

from meshtrain.errors import UserError, WireError

CALL_TIMEOUT_S = 5.0


class Source(Protocol):
    async def snapshots(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(mesh snapshot, full job snapshots); raises OSError/UserError when the agent is unreachable."""
        ...

    async def cancel(self, job: str, reason: str) -> tuple[bool, str]: ...

    async def checkpoints(self) -> list[dict[str, Any]]: ...

    def checkpoint_root(self) -> Path | None:
        """This node's checkpoint store (None: the default, ``$MESHTRAIN_HOME/checkpoints``)."""
        ...

    def runs_db(self) -> Path:
        """This node's run store (``runs.sqlite``), which may not exist yet."""
        ...


def _listing(store: Any) -> list[dict[str, Any]]:
    runs = []
    for run in store.runs():
        found = store.checkpoints(run)
        if found:
            runs.append(
                {
                    "run": run,
                    "checkpoints": [
                        {
                            "step": info.step,
                            "time": info.time,
                            "bytes": info.bytes,
                            "metrics": {
                                k: v for k, v in (info.metrics or {}).items() if isinstance(v, (int, float))
                            },
                            "replicas": list(info.replicas),
                        }
                        for info in found
                    ],
                }
            )
    return runs


def sweep_tables(source: Source) -> list[dict[str, Any]]:
    """The live tables of the sweeps started on this machine, newest first (meshtrain.sweep.resume:
    ``$MESHTRAIN_HOME/sweeps/NAME.json``, beside the run store): the page's Sweeps tables."""
    from meshtrain.sweep.resume import sweep_tables as tables

    return tables(source.runs_db().parent)


class AgentSource:
    """The agent on this machine, through its control socket."""

    def __init__(self, path: Path, store_root: Path | None = None) -> None:
        self.path = path
        self.store_root = store_root

    async def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        from meshtrain.agent.control import call

        try:
            return await asyncio.wait_for(call(self.path, op, **fields), CALL_TIMEOUT_S)
        except (OSError, WireError, asyncio.TimeoutError) as exc:
            raise UserError(
                f"the agent on this machine is not answering ({exc.__class__.__name__})"
            ) from None

    async def snapshots(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        reply = await self._call("status")
        snapshot = reply.get("snapshot")
        mesh: dict[str, Any] = snapshot if isinstance(snapshot, dict) else {}
        try:
            jobs = (await self._call("jobs")).get("jobs")
        except UserError as exc:
            if "unknown" not in str(exc):
                raise
            jobs = []  # an agent from before the `jobs` request: summaries only
        return mesh, [j for j in jobs or [] if isinstance(j, dict)]

    async def cancel(self, job: str, reason: str) -> tuple[bool, str]:
        try:
            reply = await self._call("cancel", job=job, reason=reason)
        except UserError as exc:
            return False, str(exc)
        return bool(reply.get("ok")), str(reply.get("message") or "")

    async def checkpoints(self) -> list[dict[str, Any]]:
        from meshtrain.checkpoints.store import CheckpointStore

        return await asyncio.to_thread(_listing, CheckpointStore(self.store_root))

    def checkpoint_root(self) -> Path | None:
        return self.store_root

    def runs_db(self) -> Path:
        from meshtrain.tracking.store import runs_db_path

        return self.store_root.parent / "runs.sqlite" if self.store_root else runs_db_path()


class InAgentSource:
    """The agent this dashboard runs inside (`meshtrain join --dashboard`)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    async def snapshots(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if self.agent.node is None:
            raise UserError("the agent is starting")
        return self.agent.mesh_snapshot(), self.agent.job_snapshots()

    async def cancel(self, job: str, reason: str) -> tuple[bool, str]:
        runner = self.agent.runners.get(job)
        if runner is None:
            return False, f"job {job} is not running on this node"
        runner.cancel(reason)
        return True, f"cancelling job {job}"

    async def checkpoints(self) -> list[dict[str, Any]]:
        if self.agent.checkpoints is None:
            return []
        return await asyncio.to_thread(_listing, self.agent.checkpoints.store)

    def checkpoint_root(self) -> Path | None:
        store = getattr(self.agent.checkpoints, "store", None)
        return Path(store.root) if store is not None else None

    def runs_db(self) -> Path:
        from meshtrain.tracking.recorder import db_path_for

        return db_path_for(self.agent)
