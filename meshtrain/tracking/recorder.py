"""The agent's side of tracking: record the jobs it coordinates, keep copies on other nodes.

Where the record comes from: the coordinating agent already sees everything a
run is (the request, the placement, every worker's `mesh.report` batch, the
end). `Tracking.recorder(runner)` gives it a `RunRecorder` that the agent
hooks to the runner: the sink wrapper sees the state changes, `metrics()`
every report batch, `end()` the result.

How a lost node loses no history: the coordinator pushes the record (the run
row plus the metric rows the peer lacks) to the agents of the job's other
nodes every `PUSH_INTERVAL_S` and at the end, as a ``runs.put`` control
request on the authenticated agent-to-agent TCP path; a job that ran on the
coordinator alone is pushed to one other live agent, so the record is on at
least two nodes whenever the mesh has two. Pushes are idempotent (metric rows
are keyed by the coordinator's sequence number, the run row by its update
time), so a retried or reordered push never duplicates or rolls back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from meshtrain.tracking.record import (
    MetricFolder,
    bundle_hash,
    clean_params,
    params_from_args,
)
from meshtrain.tracking.store import MetricRow, Run, RunStore

PUSH_INTERVAL_S = 2.0
PUSH_TIMEOUT_S = 10.0
PUSH_CHUNK = 20_000  # metric rows per runs.put request
OP_PUT = "runs.put"


def db_path_for(agent: Any) -> Path:
    """The agent's run store: beside its checkpoint store (``home/runs.sqlite`` for the machine's agent,
    ``home/nodes/NAME/runs.sqlite`` for the other nodes of a --local mesh), so each node has its own copy."""
    ckpt = getattr(getattr(agent, "checkpoints", None), "store", None)
    root = getattr(ckpt, "root", None)
    if root is not None:
        return Path(root).parent / "runs.sqlite"
    return Path(agent.home) / "runs.sqlite"


def run_name(script: str, options: dict[str, Any]) -> str:
    tracking = options.get("tracking") if isinstance(options.get("tracking"), dict) else {}
    name = (tracking or {}).get("name") or options.get("run")
    return str(name) if name else Path(script).stem


class Tracking:
    """One agent's run store, the recorders of its jobs, and the ``runs.put`` handler."""

    def __init__(self, agent: Any, path: Path | None = None) -> None:
        self.agent = agent
        self.store = RunStore(path or db_path_for(agent))

    def recorder(self, runner: Any) -> RunRecorder:
        return RunRecorder(self, runner)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.store.close()

    async def handle(self, header: dict[str, Any], payload: bytes, conn: Any) -> None:
        """A peer's push: take the run row (if newer) and the metric rows we lack."""
        try:
            body = msgpack.unpackb(payload, raw=False) if payload else {}
            row = body["run"]
            run = Run.from_row(row)
            rows = [MetricRow.from_list(item) for item in body.get("metrics") or []]
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
            await conn.reply(False, error="runs", message=f"malformed run record: {exc}")
            return
        self.store.put_run(run)
        added = self.store.add_metrics(run.id, rows)
        await conn.reply(True, added=added, seq=self.store.max_seq(run.id))


class RunRecorder:
    """Records one job as a run; the agent calls `wrap`, `metrics` and `end` (see module docstring)."""

    def __init__(self, tracking: Tracking, runner: Any, clock: Callable[[], float] = time.time) -> None:
        self.tracking = tracking
        self.store = tracking.store
        self.agent = tracking.agent
        self.clock = clock
        request = runner.request
        options = dict(getattr(request, "options", {}) or {})
        tracking_opts = options.get("tracking") if isinstance(options.get("tracking"), dict) else {}
        self.run = Run(
            id=str(runner.job),
            name=run_name(request.script, options),
            script=str(request.script),
            args=[str(a) for a in request.args],
            options={k: v for k, v in options.items() if k != "tracking"}
            | {k: v for k, v in (tracking_opts or {}).items() if k in ("report_to",)}
            | {"nodes": request.nodes, "min_nodes": request.min_nodes},
            bundle_hash=bundle_hash(request.bundle),
            git=dict((tracking_opts or {}).get("git") or {}),
            params=clean_params(params_from_args(request.args)),
            sweep=(tracking_opts or {}).get("sweep"),
            coordinator=str(getattr(self.agent, "name", "")),
            started=clock(),
            state="waiting",
            updated=clock(),
        )
        self._argparse: dict[str, Any] = {}
        self._config: dict[str, Any] = {}
        self._folder = MetricFolder()
        self._pushed: dict[str, int] = {}  # peer -> highest metric seq it acknowledged
        self._pusher: asyncio.Task[None] | None = None
        self._reporters: Any = None
        report_to = (tracking_opts or {}).get("report_to") or []
        if report_to:
            from meshtrain.tracking.reporters import open_reporters

            self._reporters = open_reporters(report_to, self.run, (tracking_opts or {}).get("report_dir"))
        self._save()

    # ----------------------------------------------------------------- hooks
    def wrap(self, sink: Any) -> Any:
        return _RecordingSink(sink, self)

    def on_snapshot(self, snap: dict[str, Any]) -> None:
        state = str(snap.get("state") or self.run.state)
        nodes = [
            str(w.get("node")) for w in snap.get("workers") or [] if isinstance(w, dict) and w.get("node")
        ]
        changed = state != self.run.state or (nodes and set(nodes) - set(self.run.mesh.get("nodes") or []))
        if nodes:
            self._compose(nodes)
        if changed:
            if state == "running" and self.run.state in ("waiting", "starting"):
                self.run.started = self.clock()
                self._start_pusher()
            self.run.state = state
            self.run.reason = snap.get("message") if state not in ("running",) else None
            self._save()

    def metrics(self, member: str, t: float, metrics: dict[str, Any]) -> None:
        """One report of worker `member` (stamped `t` by that worker); never raises into the job."""
        try:
            self._metrics(member, t, metrics)
        except Exception:  # noqa: BLE001 - a full disk loses metrics, not the job
            pass

    def _metrics(self, member: str, t: float, metrics: dict[str, Any]) -> None:
        rows, config, parsed, env = self._folder.fold(member, t, metrics)
        if rows:
            self.store.add_metrics(self.run.id, rows)
            if self._reporters is not None:
                self._reporters.log(rows, main=self._is_main(member))
        if config or parsed:
            self._config.update(config)
            self._argparse.update(parsed)
            self.run.params = clean_params(
                {**params_from_args(self.run.args), **self._argparse, **self._config}
            )
            if self._reporters is not None:
                self._reporters.params(self.run.params)
            self._save()
        if env:
            workers = dict(self.run.mesh.get("workers") or {})
            workers[member] = env
            self.run.mesh = {**self.run.mesh, "workers": workers}
            versions = sorted({str(e.get("mlx")) for e in workers.values() if e.get("mlx")})
            self.run.mesh["mlx"] = versions
            self._save()

    async def end(self, result: Any) -> None:
        self.run.state = str(result.state)
        self.run.reason = result.message
        self.run.ended = self.clock()
        self.run.checkpoints = self._checkpoints()
        self._save()
        if self._pusher is not None:
            self._pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pusher
        if self._reporters is not None:
            with contextlib.suppress(Exception):
                self._reporters.close(self.store.final_metrics(self.run.id), self.run.state)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.push(), PUSH_TIMEOUT_S * 2)

    # ----------------------------------------------------------------- parts
    def _is_main(self, member: str) -> bool:
        """The lowest member reporting is the one whose metrics integrations log (once per run)."""
        members = sorted(self._folder.last_step) or [member]
        return member == members[0]

    def _save(self) -> None:
        self.run.updated = max(self.clock(), self.run.updated + 1e-6)
        self.store.put_run(self.run, force=True)

    def _compose(self, nodes: list[str]) -> None:
        """The mesh the run used: its nodes with what gossip says they are (device, platform, version)."""
        known = dict(self.run.mesh.get("node_facts") or {})
        for m in self.agent.members() if hasattr(self.agent, "members") else []:
            if m.name in nodes:
                meta = m.meta or {}
                known[m.name] = {
                    k: meta.get(k) for k in ("device", "platform", "cores", "memory_gb", "version")
                }
        seen = list(self.run.mesh.get("nodes") or [])
        seen += [n for n in nodes if n not in seen]
        self.run.mesh = {**self.run.mesh, "nodes": seen, "node_facts": known}

    def _checkpoints(self) -> list[dict[str, Any]]:
        ckpt_run = self.run.options.get("run") if self.run.options.get("checkpoint_every") else None
        store = getattr(getattr(self.agent, "checkpoints", None), "store", None)
        if not ckpt_run or store is None:
            return []
        try:
            infos = store.checkpoints(str(ckpt_run))
        except Exception:  # noqa: BLE001 - a record without its checkpoint list beats no record
            return []
        return [{"run": str(ckpt_run), "step": int(i.step), "loss": i.loss} for i in infos]

    def _peers(self) -> list[str]:
        me = getattr(self.agent, "name", None)
        alive = [c.name for c in self.agent.candidates() if c.state == "alive" and c.protocol is not None]
        peers = [n for n in self.run.mesh.get("nodes") or [] if n != me and n in alive]
        if not peers:
            peers = [n for n in alive if n != me][:1]  # a one-node job still gets a second copy
        return peers

    def _start_pusher(self) -> None:
        if self._pusher is None:
            with contextlib.suppress(RuntimeError):
                self._pusher = asyncio.get_running_loop().create_task(self._push_periodically())

    async def _push_periodically(self) -> None:
        while True:
            await asyncio.sleep(PUSH_INTERVAL_S)
            with contextlib.suppress(Exception):
                await self.push()

    async def push(self) -> None:
        """Send every peer the run row and the metric rows it has not acknowledged."""
        peers = self._peers()
        row = self.run.to_row()
        for peer in peers:
            endpoint = self.agent.endpoint(peer)
            if endpoint is None:
                continue
            after = self._pushed.get(peer, -1)
            while True:
                rows = self.store.metrics(self.run.id, after_seq=after)[:PUSH_CHUNK]
                body = msgpack.packb({"run": row, "metrics": [r.to_list() for r in rows]}, use_bin_type=True)
                try:
                    reply = await asyncio.wait_for(
                        _call_with_payload(endpoint, body, getattr(self.agent, "keyring", None)),
                        PUSH_TIMEOUT_S,
                    )
                except Exception:  # noqa: BLE001 - a peer down now gets the rest at the next push
                    break
                if not reply.get("ok"):
                    break
                if rows:
                    after = rows[-1].seq
                    self._pushed[peer] = after
                if len(rows) < PUSH_CHUNK:
                    break


async def _call_with_payload(endpoint: tuple[str, int], body: bytes, keyring: Any) -> dict[str, Any]:
    """`control.call` has no payload argument: open the request ourselves and read the one reply."""
    from meshtrain.agent.control import open_request

    conn = await open_request(endpoint, OP_PUT, body, keyring=keyring)
    try:
        header, _ = await conn.recv()
    finally:
        await conn.close()
    return dict(header)


class _RecordingSink:
    """A JobSink that lets the recorder see every snapshot on its way to the real sink."""

    def __init__(self, inner: Any, recorder: RunRecorder) -> None:
        self.inner = inner
        self.recorder = recorder

    async def log(self, node: str, rank: int, stream: str, line: str) -> None:
        await self.inner.log(node, rank, stream, line)

    async def snapshot(self, snap: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            self.recorder.on_snapshot(snap)
        await self.inner.snapshot(snap)
