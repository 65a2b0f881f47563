"""A node agent's checkpoint duties: its store and transfer server, the leader's rounds, message routing.

Every agent owns one `NodeCheckpoints`. What it does, by role:

- **every node**: keeps the store (one per node: a second agent on the same machine, such as the
  other nodes of a ``--local`` mesh, gets its own directory), serves it over TCP (port in gossip
  meta ``ckpt``), routes protocol messages between its workers and the leader, pushes replicas when
  the leader asks, and before a ``--resume`` job's worker starts fetches the run's newest complete
  checkpoint from whichever node has it (`before_worker_start`).
- **the job's coordinating agent**: forwards the job's progress (step, members) to the leader
  (`on_job_progress`), as control op ``ckpt.progress``.
- **the elected leader**: one `CheckpointLeader` per job and term; it decides when to checkpoint,
  collects acks, commits, asks for replicas. When leadership moves the old objects are closed and
  the new leader's first message (Abort of every older term) makes every worker drop what was in
  flight.

Control ops (over the agents' authenticated control TCP)::

    ckpt.progress  {job, options, step, members: [[member, node], ...]}   coordinator -> leader
    ckpt           {job, member, msg}                                      leader <-> a worker's agent
    ckpt.replicate {run, step, to_node}                                    leader -> replica source
    ckpt.prune     {run, keep}                                             leader -> replica holder
    ckpt.pull      {run, step, holders, keep}                              leader -> each writer of a
                   sharded checkpoint: fetch the other writers' parts (meshtrain.shard.checkpoint)

Messages travel one connection each and may overtake each other; the protocol (leader/checkpoint.py)
is built for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from meshtrain import env as env_names
from meshtrain.checkpoints.leading import CheckpointLeader
from meshtrain.checkpoints.options import CheckpointOptions
from meshtrain.checkpoints.store import CheckpointStore
from meshtrain.checkpoints.transfer import (
    CheckpointServer,
    fetch_checkpoint,
    fetch_newest,
    replicate_checkpoint,
)
from meshtrain.errors import MeshtrainError
from meshtrain.leader.checkpoint import MAX_LEAD_STEPS

__all__ = ["CKPT_META_KEY", "ENV_CHECKPOINT_DIR", "NodeCheckpoints", "claim_store"]

CKPT_META_KEY = "ckpt"
ENV_CHECKPOINT_DIR = (
    env_names.CHECKPOINT_DIR  # the checkpoint directory instead of $MESHTRAIN_HOME/checkpoints
)
PROTOCOL_TYPES_FOR_LEADER = ("written", "failed")
CALL_TIMEOUT_S = 30.0
REPLICATE_TIMEOUT_S = 600.0
TERM_FILE = "leader_term"
COMMIT_POLL_S = 0.05
FINISHED_AFTER_S = 600.0
LEAD_S = 0.5
"""How far ahead (in seconds of training) the first Prepare aims: progress is some tenths of a second old."""


class NodeView(Protocol):
    """What `NodeCheckpoints` needs from its agent."""

    name: str

    def members(self) -> list[Any]: ...

    def endpoint(self, name: str) -> tuple[str, int] | None: ...


Caller = Callable[..., Awaitable[dict[str, Any]]]
"""`call(target, op, **fields)`: one control request to another agent (meshtrain.agent.control.call)."""
Deliver = Callable[[str, str, dict[str, Any]], bool]
"""`send_to_worker(job, member, obj)`: a line to a hosted worker's stdin; False when there is none."""
Event = Callable[[str, str, str], None]


def claim_store(home: Path, name: str) -> tuple[CheckpointStore, IO[str] | None]:
    """This node's store and the lock that makes it ours.

    The machine's store is ``home/checkpoints`` (what `meshtrain checkpoints` lists), or the directory
    in $MESHTRAIN_CHECKPOINT_DIR (`run --checkpoint-dir DIR` sets it for the mesh it starts). Only one
    agent may own it: two writers of one run in one directory would overwrite each other's parts. A
    second agent on the same machine (the other nodes of a ``--local`` mesh) keeps
    ``home/nodes/NAME/checkpoints`` (``DIR/nodes/NAME``).
    """
    chosen = os.environ.get(ENV_CHECKPOINT_DIR)
    if chosen:
        candidates = [Path(chosen), Path(chosen) / "nodes" / name]
    else:
        candidates = [home / "checkpoints", home / "nodes" / name / "checkpoints"]
    for root in candidates:
        try:
            root.mkdir(parents=True, exist_ok=True)
            lock = open(root / ".lock", "a+")  # noqa: SIM115 - held for the agent's lifetime
        except OSError:
            continue
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        return CheckpointStore(root), lock
    return CheckpointStore(candidates[-1]), None  # the same name twice on one machine: share, unlocked


def node_of(member: str) -> str:
    """The node a member id runs on: ``n2~1`` (re-admitted) and ``n2`` are both on node ``n2``."""
    return member.split("~", 1)[0]


def read_term_floor(home: Path) -> int:
    """The highest leader term this machine has seen (persisted, so a restarted leader never goes back)."""
    try:
        value = json.loads((home / TERM_FILE).read_text())
    except (OSError, ValueError):
        return 0
    return value if isinstance(value, int) and value > 0 else 0


def write_term_floor(home: Path, term: int) -> None:
    if term <= read_term_floor(home):
        return
    tmp = home / f".{TERM_FILE}.{os.getpid()}"
    with contextlib.suppress(OSError):
        home.mkdir(parents=True, exist_ok=True)
        tmp.write_text(str(term))
        os.replace(tmp, home / TERM_FILE)


@dataclass
class _LedJob:
    """A job this node leads checkpoints for, in one term."""

    term: int
    run: str
    leader: CheckpointLeader | None = None
    members: dict[str, str] = field(default_factory=dict)  # node name -> member id
    workers: dict[str, str] = field(default_factory=dict)  # node name -> the newest member id seen there
    last_progress: float = 0.0
    last_step: int = 0
    aimed: bool = False


class NodeCheckpoints:
    def __init__(
        self,
        view: NodeView,
        store: CheckpointStore,
        *,
        call: Caller,
        deliver: Deliver,
        event: Event,
        keyring: Any = None,
        lock: IO[str] | None = None,
        ack_timeout: float = 120.0,
    ) -> None:
        self.view = view
        self.store = store
        self.call = call
        self.deliver = deliver
        self.event = event
        self.keyring = keyring
        self.server = CheckpointServer(store, keyring=keyring)  # per-connection handshake, tag or seal
        self.ack_timeout = ack_timeout
        self.led: dict[str, _LedJob] = {}
        self.options: dict[str, dict[str, Any]] = {}  # job -> options, as the jobs passed through here
        self.committed: list[tuple[str, int]] = []
        self.keep: dict[str, int] = {}  # run -> --keep, for the replica holders
        self._lock = lock
        self._tasks: set[asyncio.Task[Any]] = set()
        self.leader_term: int | None = None  # our claim while we lead, else None
        self.leader_name: str | None = None  # the settled leader's node name

    @property
    def name(self) -> str:
        return self.view.name

    # ------------------------------------------------------------ lifecycle

    async def start(self, host: str) -> int:
        """Clean what a crash left, start serving; returns the port for gossip meta ``ckpt``."""
        await asyncio.to_thread(self.store.clean)
        return await self.server.start(host, 0)

    async def close(self) -> None:
        for job in list(self.led):
            await self._drop(job, "the agent is leaving")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ------------------------------------------------------------ leadership (from the agent's election)

    def leadership(self, leader_name: str | None, my_term: int | None) -> None:
        """The election's view changed: `my_term` is our claim if we lead, else None."""
        self.leader_name = leader_name
        self.leader_term = my_term
        for job, led in list(self.led.items()):
            if led.term != my_term:
                self._retire(job, "leadership moved")

    def member_lost(self, node: str) -> None:
        for led in self.led.values():
            if led.leader is not None:
                led.leader.member_lost(node)

    # ------------------------------------------------------------ hooks the agent exposes

    async def before_worker_start(self, job: str, options: dict[str, Any] | None) -> None:
        """With ``resume``: bring the run's newest complete checkpoint in the mesh into our store."""
        self.options[job] = dict(options or {})
        parsed = CheckpointOptions.from_dict(options)
        if parsed is None or not parsed.resume:
            return
        peers = [p for n, p in self._ckpt_peers().items() if n != self.name]
        before = await asyncio.to_thread(self.store.latest, parsed.run)
        try:
            info = await fetch_newest(peers, parsed.run, store=self.store, keyring=self.keyring)
        except (OSError, MeshtrainError, asyncio.TimeoutError) as exc:
            self.event("checkpoint", self.name, f"resume of {parsed.run}: fetch failed ({exc})")
            return
        if info is not None:  # a sharded checkpoint: the parts of its other holders, from them
            from meshtrain.shard.checkpoint import shard_record_of

            record = await asyncio.to_thread(shard_record_of, info.path)
            if record is not None:
                holders = sorted({node_of(str(h)) for h in record.get("holders") or []})
                await self.pull_shards(parsed.run, info.step, holders, parsed.keep, patience=5.0)
        if info is None:
            self.event("checkpoint", self.name, f"resume of {parsed.run}: no complete checkpoint in the mesh")
        elif before is None or info.step != before.step:
            self.event("checkpoint", self.name, f"resume of {parsed.run}: fetched step {info.step}")
        else:
            self.event("checkpoint", self.name, f"resume of {parsed.run}: step {info.step} (local copy)")

    def on_job_progress(
        self, job: str, step: int, members: list[tuple[str, str]], options: dict[str, Any] | None
    ) -> None:
        """The coordinator's view of a job: hand it to the leader (here or over the control plane)."""
        if options is not None:
            self.options[job] = dict(options)
        options = self.options.get(job)
        parsed = CheckpointOptions.from_dict(options)
        if parsed is None or parsed.policy is None or self.leader_name is None:
            return
        pairs = [[str(m), str(n)] for m, n in members]
        if self.leader_name == self.name:
            self.progress(job, options or {}, step, pairs)
        else:
            self._spawn(
                self._call_node(
                    self.leader_name, "ckpt.progress", job=job, options=options, step=step, members=pairs
                )
            )

    def on_worker_report(self, job: str, member: str, message: dict[str, Any]) -> None:
        """A hosted worker's ``{"k": "ckpt", "to": leader, "msg": ...}`` (an ack) or
        ``{"k": "ckpt", "progress": step, "members": [...]}``: on to the leader."""
        step, members = message.get("progress"), message.get("members")
        if isinstance(step, int) and isinstance(members, list):
            pairs = [(str(m), node_of(str(m))) for m in members]
            sharded = {**self.options.get(job, {}), "sharded": True} if message.get("sharded") else None
            self.on_job_progress(job, step, pairs, sharded)
            return
        to, msg = message.get("to"), message.get("msg")
        if not isinstance(to, str) or not isinstance(msg, dict):
            return
        if to == self.name:
            self.route(job, member, msg)
        else:
            self._spawn(self._call_node(to, "ckpt", job=job, member=member, msg=msg))

    # ------------------------------------------------------------ control ops

    async def handle(self, header: dict[str, Any]) -> tuple[bool, str]:
        """Serve a ``ckpt*`` control op; (ok, message) for the reply."""
        op = header.get("op")
        job = str(header.get("job", ""))
        if op == "ckpt.progress":
            members = [list(m) for m in header.get("members") or [] if isinstance(m, (list, tuple))]
            step = header.get("step")
            if not isinstance(step, int):
                return False, "bad step"
            if self.leader_term is None:
                return False, f"{self.name} is not the checkpoint leader"
            self.progress(job, dict(header.get("options") or {}), step, members)
            return True, ""
        if op == "ckpt":
            msg = header.get("msg")
            if not isinstance(msg, dict):
                return False, "bad message"
            member = header.get("member")
            return self.route(job, str(member) if member is not None else None, msg), ""
        if op == "ckpt.replicate":
            run, step, target = header.get("run"), header.get("step"), header.get("to_node")
            if not isinstance(run, str) or not isinstance(step, int) or not isinstance(target, str):
                return False, "bad replicate request"
            try:
                await self.push(run, step, target)
            except (OSError, MeshtrainError, asyncio.TimeoutError) as exc:
                return False, f"replication to {target} failed: {exc}"
            return True, ""
        if op == "ckpt.pull":  # a sharded checkpoint: fetch the other writers' parts (pull_shards)
            run, step, holders = header.get("run"), header.get("step"), header.get("holders")
            if not isinstance(run, str) or not isinstance(step, int) or not isinstance(holders, list):
                return False, "bad pull request"
            keep = header.get("keep")
            missing = await self.pull_shards(run, step, [str(h) for h in holders], keep)
            return not missing, f"parts of {', '.join(missing)} not fetched" if missing else ""
        if op == "ckpt.prune":
            run, keep = header.get("run"), header.get("keep")
            if not isinstance(run, str) or not isinstance(keep, int) or keep < 1:
                return False, "bad prune request"
            try:
                await asyncio.to_thread(self.store.prune, run, keep)
            except (OSError, MeshtrainError) as exc:
                return False, str(exc)
            return True, ""
        return False, f"unknown checkpoint op {op!r}"

    # ------------------------------------------------------------ routing

    def route(self, job: str, member: str | None, msg: dict[str, Any]) -> bool:
        """Acks go to our leader object for the job; everything else to the job's worker here."""
        if msg.get("type") in PROTOCOL_TYPES_FOR_LEADER:
            led = self.led.get(job)
            if led is None or led.leader is None:
                return False
            try:
                led.leader.on_message(msg)
            except (TypeError, ValueError):
                return False
            return True
        if member is None:
            return False
        return bool(self.deliver(job, member, {"ckpt": msg}))

    # ------------------------------------------------------------ the leader's side

    def progress(self, job: str, options: dict[str, Any], step: int, members: list[list[str]]) -> None:
        parsed = CheckpointOptions.from_dict(options)
        term = self.leader_term
        if parsed is None or parsed.policy is None or term is None:
            return
        self.options.setdefault(job, dict(options))
        self.keep[parsed.run] = parsed.keep
        self._forget_finished_jobs(time.monotonic(), but=job)
        led = self.led.get(job)
        if led is not None and led.term != term:
            self._retire(job, "a newer term")
            led = None
        nodes = [n for m, n in members]
        if led is None:
            led = self.led[job] = _LedJob(term=term, run=parsed.run)
            led.members = {n: m for m, n in members}
            led.leader = CheckpointLeader(
                parsed.run,
                term,
                self.name,
                parsed.policy,
                send=lambda node, wire: self._send_for(job, node, wire),
                replicate=self._replicate,
                on_commit=self._on_commit,
                on_abort=self._on_abort,
                nodes=self._agent_names(),
                replicas=parsed.replicas,
                ack_timeout=self.ack_timeout,
                last_step=step,
            )
        if step < led.last_step:
            return  # an older view of the job (two sources of progress): it would aim too early
        current = {n: m for m, n in members}
        for node, member in current.items():
            seen = led.workers.get(node)
            if seen is not None and seen != member and led.leader is not None:
                # a new worker on that node: the one a round's Prepare went to has ended, and a round
                # waiting on its ack would stall every later checkpoint until the ack timeout
                led.leader.member_lost(node)
            led.workers[node] = member
        led.members = current
        now = time.monotonic()
        assert led.leader is not None
        if options.get("sharded"):
            led.leader.coordinator.all_writers = True  # each member's part is its shard: all write
        if not led.aimed and led.last_progress and now > led.last_progress and step > led.last_step:
            # aim the first Prepare where the job will be once it arrives (progress lags the workers,
            # a Prepare for a step already passed fails); the coordinator doubles it if still late
            led.aimed = True
            rate = (step - led.last_step) / (now - led.last_progress)
            coordinator = led.leader.coordinator
            coordinator.lead_steps = max(
                coordinator.lead_steps, min(MAX_LEAD_STEPS, math.ceil(rate * LEAD_S))
            )
        if step > led.last_step and led.last_progress:
            led.leader.coordinator.horizon_steps = step - led.last_step  # the steps until the next report
        led.last_progress, led.last_step = now, step
        led.leader.mesh = sorted(set(self._agent_names()) | set(nodes))
        led.leader.progress(step, nodes)

    def _forget_finished_jobs(self, now: float, but: str) -> None:
        """Jobs end without telling the leader: one that has sent no progress for long is over."""
        for job, led in list(self.led.items()):
            if job != but and led.last_progress and now - led.last_progress > FINISHED_AFTER_S:
                self._retire(job, "the job sends no more progress")

    async def _send_for(self, job: str, node: str, wire: dict[str, Any]) -> None:
        led = self.led.get(job)
        member = led.members.get(node) if led is not None else None
        if node == self.name:
            self.route(job, member, wire)
        else:
            await self._call_node(node, "ckpt", job=job, member=member, msg=wire)

    async def _replicate(self, run: str, step: int, source: str, target: str) -> None:
        """Have `source` push RUN@STEP to `target`, then have `target` prune the run to --keep."""
        if source == self.name:
            with contextlib.suppress(OSError, MeshtrainError, asyncio.TimeoutError):
                await self.push(run, step, target)
        else:
            await self._call_node(
                source, "ckpt.replicate", timeout=REPLICATE_TIMEOUT_S, run=run, step=step, to_node=target
            )
        keep = self.keep.get(run)
        if keep is None:
            return
        if target == self.name:
            await asyncio.to_thread(self.store.prune, run, keep)
        else:
            await self._call_node(target, "ckpt.prune", run=run, keep=keep)

    async def push(self, run: str, step: int, target: str) -> None:
        """Copy our complete RUN@STEP to node `target`'s store (a replica).

        The leader asks right after it sent the Commit, which our worker applies at its next step
        boundary: the manifest may not be here yet, so wait for it (a bounded wait on the disk: the
        worker is another process and tells the agent nothing about its commits).
        """
        address = self._ckpt_peers().get(target)
        if address is None:
            raise MeshtrainError(f"{target} has no checkpoint server in our view")
        deadline = time.monotonic() + self.ack_timeout
        while not await asyncio.to_thread(self._complete, run, step):
            if time.monotonic() > deadline:
                raise MeshtrainError(f"{run}@{step} was never committed here")
            await asyncio.sleep(COMMIT_POLL_S)
        await asyncio.wait_for(
            replicate_checkpoint(address[0], address[1], run, step, store=self.store, keyring=self.keyring),
            REPLICATE_TIMEOUT_S,
        )

    def _complete(self, run: str, step: int) -> bool:
        return any(i.step == step for i in self.store.checkpoints(run))

    def _on_commit(self, run: str, step: int, manifest: dict[str, Any]) -> None:
        self.committed.append((run, step))
        where = ", ".join(str(r) for r in manifest.get("replicas") or [])
        self.event("checkpoint", self.name, f"{run}@{step} committed, copies on {where}")
        if manifest.get("sharded"):  # every writer holds one shard: each pulls the others'
            writers = [str(w) for w in manifest.get("writers") or []]
            for target in writers:
                if target == self.name:
                    self._spawn(self.pull_shards(run, step, writers, self.keep.get(run)))
                else:
                    self._spawn(
                        self._call_node(
                            target,
                            "ckpt.pull",
                            timeout=REPLICATE_TIMEOUT_S,
                            run=run,
                            step=step,
                            holders=writers,
                            keep=self.keep.get(run),
                        )
                    )

    async def pull_shards(
        self, run: str, step: int, holders: list[str], keep: Any = None, *, patience: float | None = None
    ) -> list[str]:
        """Fetch the other holders' parts of sharded RUN@STEP into ``STORE/.shards/HOLDER`` (each
        holder commits at its next step boundary: retried until then), then prune them to --keep.
        Returns the holders whose parts did not come; a part already here is not fetched again."""
        from meshtrain.shard.checkpoint import SHARDS_DIR

        missing = []
        for holder in holders:
            if holder == self.name:
                continue
            sub = CheckpointStore(self.store.root / SHARDS_DIR / holder)
            if any(i.step == step for i in await asyncio.to_thread(sub.checkpoints, run)):
                continue
            deadline = time.monotonic() + (self.ack_timeout if patience is None else patience)
            while True:
                address = self._ckpt_peers().get(holder)
                try:
                    if address is None:
                        raise MeshtrainError(f"{holder} has no checkpoint server in our view")
                    await asyncio.wait_for(
                        fetch_checkpoint(address[0], address[1], run, step, store=sub, keyring=self.keyring),
                        REPLICATE_TIMEOUT_S,
                    )
                    break
                except (OSError, MeshtrainError, asyncio.TimeoutError):
                    if time.monotonic() > deadline:
                        missing.append(holder)
                        break
                    await asyncio.sleep(COMMIT_POLL_S * 4)
            if isinstance(keep, int) and keep >= 1:
                with contextlib.suppress(OSError, MeshtrainError):
                    await asyncio.to_thread(sub.prune, run, keep)
        return missing

    def _on_abort(self, run: str, step: int, reason: str) -> None:
        self.event("checkpoint", self.name, f"{run}@{step} aborted: {reason}")

    def _retire(self, job: str, reason: str) -> None:
        """Forget the job's leader object now (a new one may take its place), close it in the background."""
        led = self.led.pop(job, None)
        if led is not None and led.leader is not None:
            self._spawn(led.leader.close(reason))

    async def _drop(self, job: str, reason: str) -> None:
        led = self.led.pop(job, None)
        if led is not None and led.leader is not None:
            await led.leader.close(reason)

    # ------------------------------------------------------------ the view

    def _alive_agents(self) -> list[Any]:
        return [m for m in self.view.members() if m.state == "alive" and "control" in (m.meta or {})]

    def _agent_names(self) -> list[str]:
        return sorted({m.name for m in self._alive_agents()})

    def _ckpt_peers(self) -> dict[str, tuple[str, int]]:
        """node name -> (host, checkpoint server port) of every live agent that serves one."""
        peers: dict[str, tuple[str, int]] = {}
        for m in self._alive_agents():
            port = (m.meta or {}).get(CKPT_META_KEY)
            if isinstance(port, int) and port > 0:
                host = m.addr[0] if m.addr[0] not in ("", "0.0.0.0") else "127.0.0.1"
                peers[m.name] = (str(host), port)
        return peers

    async def _call_node(self, node: str, op: str, *, timeout: float = CALL_TIMEOUT_S, **fields: Any) -> None:
        endpoint = self.view.endpoint(node)
        if endpoint is None:
            return
        with contextlib.suppress(OSError, MeshtrainError, asyncio.TimeoutError):
            await asyncio.wait_for(self.call(endpoint, op, keyring=self.keyring, who=node, **fields), timeout)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
