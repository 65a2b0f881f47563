"""The agent's side of tracking: record the jobs it coordinates, keep copies on other nodes.

Where the record comes from: the coordinating agent already sees everything a
run is: the request, the placement, every worker's `mesh.report` batch, the
end. `Tracking.recorder(runner)` follows a `JobRunner` with two hooks only:
`runner.on_metrics` gets every report batch, and the job's state (placement,
workers, state and message) is read from `runner.state` every `POLL_S`, so
the job code does not change for tracking; `end(result)` closes the record
at once when the agent has the result in hand.

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
from collections.abc import Awaitable, Callable
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

PUSH_INTERVAL_S = 1.0
POLL_S = 0.5
FINAL_STATES = ("done", "failed", "cancelled")
PUSH_TIMEOUT_S = 10.0
FINAL_PUSH_WAIT_S = 2.0
PUSH_CHUNK = 20_000  # metric rows per runs.put request
OP_PUT = "runs.put"
OP_TAG = "runs.tag"


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
        self.background: set[asyncio.Future[Any]] = set()  # final pushes still under way

    def recorder(self, runner: Any) -> RunRecorder:
        """Start recording `runner`'s job (see RunRecorder.attach); `end(result)` closes it early."""
        return RunRecorder(self, runner).attach()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.store.close()

    async def handle(self, header: dict[str, Any], payload: bytes, conn: Any) -> None:
        """``runs.put`` (a peer's push) or ``runs.tag`` (tag our copy of a checkpoint)."""
        if header.get("op") == OP_TAG:
            await self._handle_tag(header, conn)
        else:
            await self._handle_put(payload, conn)

    async def _handle_tag(self, header: dict[str, Any], conn: Any) -> None:
        """Tag this node's copy of RUN@STEP; from the local CLI (``forward``), tell every live peer too."""
        from meshtrain.errors import UserError
        from meshtrain.tracking.tags import apply_tag, check_tag

        name, ckpt_run, step = str(header.get("name")), str(header.get("ckpt_run")), header.get("step")
        held = 0
        store = getattr(getattr(self.agent, "checkpoints", None), "store", None)
        try:
            check_tag(name)
            if store is not None and isinstance(step, int):
                held = apply_tag([store], ckpt_run, step, name)[1]
                self.store.put_tag(name, str(header.get("run") or ""), ckpt_run, step)
        except (UserError, OSError):
            held = 0
        peers = 0
        if header.get("forward"):
            me = getattr(self.agent, "name", None)
            for c in self.agent.candidates():
                endpoint = self.agent.endpoint(c.name) if c.state == "alive" and c.name != me else None
                if endpoint is None:
                    continue
                fields = {k: header.get(k) for k in ("name", "ckpt_run", "step", "run")}
                with contextlib.suppress(Exception):
                    reply = await asyncio.wait_for(
                        _request(endpoint, OP_TAG, b"", getattr(self.agent, "keyring", None), **fields),
                        PUSH_TIMEOUT_S,
                    )
                    peers += int(reply.get("held") or 0)
        await conn.reply(True, held=held, peers=peers)

    async def _handle_put(self, payload: bytes, conn: Any) -> None:
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
    """Records one job as a run (see the module docstring)."""

    def __init__(self, tracking: Tracking, runner: Any, clock: Callable[[], float] = time.time) -> None:
        self.tracking = tracking
        self.runner = runner
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
        existing = self.store.get(self.run.id)
        if existing is not None:  # a successor coordinator: carry on from the record this node holds
            self.run.started, self.run.state = existing.started, existing.state
            self.run.mesh, self.run.checkpoints = existing.mesh, existing.checkpoints
            self._argparse = dict(existing.params)
            self.run.params = clean_params({**self.run.params, **existing.params})
        self._folder = MetricFolder(seq=int(clock() * 1000) << 20)
        self._pushed: dict[str, int] = {}  # peer -> highest metric seq it acknowledged
        self._follower: asyncio.Task[None] | None = None
        self._closed = False
        self._reporters: Any = None
        report_to = (tracking_opts or {}).get("report_to") or []
        if report_to:
            from meshtrain.tracking.reporters import open_reporters

            report_dir = (tracking_opts or {}).get("report_dir")
            self._reporters = open_reporters(report_to, self.run, report_dir, self.store.path.parent)
            self._reporters.params(self.run.params)
        self._save()

    # ----------------------------------------------------------------- hooks
    def attach(self) -> RunRecorder:
        """Follow the runner: its metrics through `runner.on_metrics`, its state by polling `runner.state`
        (every POLL_S), pushes to peers every PUSH_INTERVAL_S; the record closes when the job ends."""
        if hasattr(self.runner, "on_metrics"):
            self.runner.on_metrics = self.metrics
        with contextlib.suppress(RuntimeError):
            self._follower = asyncio.get_running_loop().create_task(self._follow())
        return self

    async def _follow(self) -> None:
        next_push = self.clock() + PUSH_INTERVAL_S
        while True:
            await asyncio.sleep(POLL_S)
            state = getattr(self.runner, "state", None)
            if state is None:
                continue
            self.observe(state.state, state.message, [w.node for w in state.workers.values()])
            if state.state in FINAL_STATES:
                with contextlib.suppress(Exception):
                    await self._close(state.state, state.message)
                return
            if self.clock() >= next_push and self.run.state != "waiting":
                next_push = self.clock() + PUSH_INTERVAL_S
                with contextlib.suppress(Exception):
                    await self.push()

    def observe(self, state: str, message: str | None, nodes: list[str]) -> None:
        """The job's state and its workers' nodes as the coordinator has them now."""
        changed = state != self.run.state or bool(set(nodes) - set(self.run.mesh.get("nodes") or []))
        if nodes:
            self._compose(nodes)
        if changed:
            if state == "running" and self.run.state in ("waiting", "starting"):
                self.run.started = self.clock()
            self.run.state = state
            self.run.reason = message if state != "running" else None
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

    def detach(self) -> None:
        """Coordination moved to another node: its recorder carries the record on from here."""
        self._closed = True
        if self._follower is not None and self._follower is not asyncio.current_task():
            self._follower.cancel()
        if getattr(self.runner, "on_metrics", None) == self.metrics:
            self.runner.on_metrics = None

    async def end(self, result: Any) -> None:
        """The job's result: close the record now (before a --local mesh is torn down) and push it."""
        if self._follower is not None and self._follower is not asyncio.current_task():
            self._follower.cancel()
        await self._close(str(result.state), result.message)

    async def _close(self, state: str, message: str | None) -> None:
        if self._closed:
            return
        stepped_down = getattr(self.runner, "coordinating", True) is False and self.runner.result is None
        if stepped_down:  # a mirror of a job coordinated elsewhere
            self.detach()
            return
        self._closed = True
        state_obj = getattr(self.runner, "state", None)
        if state_obj is not None:
            self._compose([w.node for w in state_obj.workers.values()])
        self.run.state = state
        self.run.reason = message
        self.run.ended = self.clock()
        self.run.checkpoints = self._checkpoints()
        self._save()
        if self._reporters is not None:
            with contextlib.suppress(Exception):
                self._reporters.close(self.store.final_metrics(self.run.id), self.run.state)
        # the final push: waited for briefly (a --local mesh is torn down right after), then left to
        # finish in the background, so an unreachable peer never holds up the job's end
        push = asyncio.ensure_future(self.push())
        self.tracking.background.add(push)
        push.add_done_callback(self.tracking.background.discard)
        push.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.wait({push}, timeout=FINAL_PUSH_WAIT_S)

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
        wanted = [*(self.run.mesh.get("nodes") or []), str(getattr(self.runner, "origin", "") or "")]
        peers = list(dict.fromkeys(n for n in wanted if n and n != me and n in alive))
        if not peers:
            peers = [n for n in alive if n != me][:1]  # a one-node job still gets a second copy
        return peers

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
                        _request(endpoint, OP_PUT, body, getattr(self.agent, "keyring", None)),
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


async def _request(
    endpoint: tuple[str, int], op: str, body: bytes, keyring: Any, **fields: Any
) -> dict[str, Any]:
    """`control.call` has no payload argument: open the request ourselves and read the one reply."""
    from meshtrain.agent.control import open_request

    conn = await open_request(endpoint, op, body, keyring=keyring, **fields)
    try:
        header, _ = await conn.recv()
    finally:
        await conn.close()
    return dict(header)


async def follow_runner(agent: Any, runner: Any, body: Awaitable[Any]) -> Any:
    """Drive `body` (a runner's coordination) with the run recorded while this node coordinates.

    The hook of meshtrain.agent.mesh_jobs: every runner an agent drives (the origin's, a successor's)
    passes through here, so the record follows whoever coordinates. A result closes the record at once
    (and pushes it); None (coordination moved away) hands the record on. Tracking never fails a job.
    """
    recorder: RunRecorder | None = None
    try:
        if getattr(agent, "tracking", None) is None:
            agent.tracking = Tracking(agent)
        recorder = agent.tracking.recorder(runner)
    except Exception:  # noqa: BLE001 - a job runs even where its record cannot be kept
        recorder = None
    result = await body
    if recorder is not None:
        with contextlib.suppress(Exception):
            if result is None:
                recorder.detach()
            else:
                await recorder.end(result)
    return result
