"""The checkpoint leader role on real agents: three in-process `Agent`s on loopback (gossip, election,
authenticated control TCP, checkpoint servers, one store each), with in-process workers standing in
for the worker processes: `send_to_worker` hands the line to a `WorkerCheckpoints`, whose reports go
back through `Agent.on_worker_report`, exactly the calls the worker host makes."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import mlx.core as mx

from meshtrain.agent.agent import Agent
from meshtrain.checkpoints.node import claim_store, read_term_floor, write_term_floor
from meshtrain.checkpoints.store import MANIFEST
from meshtrain.gossip import GossipConfig
from meshtrain.security import Keyring, generate_secret
from meshtrain.worker.checkpointing import WorkerCheckpoints

FORM_TIMEOUT_S = 20.0


@contextlib.asynccontextmanager
async def mesh(tmp: Path, n: int = 3) -> AsyncIterator[list[Agent]]:
    keyring = Keyring([generate_secret()])
    agents: list[Agent] = []
    try:
        for i in range(n):
            seeds = [("127.0.0.1", agents[0].gossip_port)] if agents else []
            agent = Agent(
                name=f"n{i + 1}",
                gossip=GossipConfig(
                    profile="local", host="127.0.0.1", port=0, seeds=tuple(seeds), discovery=False
                ),
                home=tmp / f"n{i + 1}",
                unix_socket=False,
                keyring=keyring,
            )
            agents.append(agent)
            await agent.start()
        await until(lambda: settled_leader(agents) is not None, "the mesh to form and elect")
        yield agents
    finally:
        for agent in agents:
            with contextlib.suppress(Exception):
                await agent.leave()


def settled_leader(agents: list[Agent]) -> str | None:
    """The leader's name once every live agent sees the whole live mesh and the same settled leader."""
    live = [a for a in agents if not a.closed]
    names = {a.name for a in live}
    views = set()
    for a in live:
        seen = {m.name for m in a.members() if m.state == "alive" and "control" in (m.meta or {})}
        if seen != names or a.checkpoints is None:
            return None
        views.add(a.checkpoints.leader_name)
    return views.pop() if len(views) == 1 and None not in views else None


async def until(condition: Callable[[], Any], what: str, timeout: float = FORM_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def crash(agent: Agent) -> None:
    """The agent dies: no goodbye to the mesh, nothing flushed, every socket just closes."""
    agent._closed.set()
    for task in agent._tasks:
        task.cancel()
    assert agent.checkpoints is not None
    for led in agent.checkpoints.led.values():  # its timers die with it
        if led.leader is not None and led.leader._timer is not None:
            led.leader._timer.cancel()
    agent.checkpoints.led.clear()
    await agent.checkpoints.server.close()
    await agent.node.close()
    await agent._server.close()


class Job:
    """A job's workers on some of the agents, stepping in lockstep; the coordinator reports progress."""

    def __init__(self, job: str, agents: list[Agent], on: list[Agent], options: dict[str, Any]) -> None:
        self.job, self.agents, self.on, self.options = job, agents, on, options
        self.workers: dict[str, WorkerCheckpoints] = {}
        self.step = 0
        for agent in on:
            member = f"{agent.name}~0"
            ck = WorkerCheckpoints.create(
                options,
                node=agent.name,
                member=member,
                report=self._reporter(agent, member),
            )
            assert ck is not None and agent.checkpoints is not None
            ck.store = agent.checkpoints.store  # what MESHTRAIN_CHECKPOINTS tells a real worker
            self.workers[agent.name] = ck
        for agent in agents:
            agent.send_to_worker = self._deliver_for(agent)  # type: ignore[method-assign,assignment]

    def _reporter(self, agent: Agent, member: str) -> Callable[[dict[str, Any]], None]:
        loop = asyncio.get_running_loop()

        def report(msg: dict[str, Any]) -> None:  # acks come from the checkpoint writer's thread too:
            loop.call_soon_threadsafe(agent.on_worker_report, self.job, member, msg)  # like the pipe

        return report

    def _deliver_for(self, agent: Agent) -> Callable[[str, str, dict[str, Any]], bool]:
        def deliver(job: str, member: str, obj: dict[str, Any]) -> bool:
            ck = self.workers.get(agent.name)
            if job != self.job or ck is None or member != f"{agent.name}~0":
                return False
            ck.on_message(obj["ckpt"])
            return True

        return deliver

    async def start(self) -> None:
        for agent in self.on:
            await agent.before_worker_start(self.job, self.options)

    async def run(self, coordinator: Agent, until_done: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        last_progress = 0.0
        while not until_done():
            if time.monotonic() > deadline:
                raise AssertionError(f"job {self.job} did not get there by step {self.step}")
            self.step += 1
            w = mx.full((64,), float(self.step))

            def state() -> dict[str, Any]:
                return {"params": {"w": w}, "opt": {"m": w * 2}}  # noqa: B023 - called right here

            for ck in self.workers.values():
                ck.at_boundary(self.step, state, {"cursor": self.step})
            if time.monotonic() - last_progress >= 0.1 and not coordinator.closed:
                last_progress = time.monotonic()
                members = [(f"{a.name}~0", a.name) for a in self.on]
                coordinator.checkpoints.on_job_progress(self.job, self.step, members, self.options)  # type: ignore[union-attr]
            await asyncio.sleep(0.01)


def steps_on(agent: Agent, run: str) -> list[int]:
    assert agent.checkpoints is not None
    return [i.step for i in agent.checkpoints.store.checkpoints(run)]


def test_commit_replicas_and_resume_from_a_replica_after_losing_a_store(tmp_path: Path) -> None:
    async def go() -> None:
        async with mesh(tmp_path) as agents:
            leader = settled_leader(agents)
            worker_node = next(a for a in agents if a.name != leader)
            others = [a for a in agents if a is not worker_node]
            opts = {"run": "solo", "checkpoint_every": "10", "replicas": 2, "keep": 2}
            job = Job("j1", agents, [worker_node], opts)
            await job.start()
            await job.run(worker_node, lambda: all(len(steps_on(a, "solo")) >= 2 for a in agents))
            lead = next(a for a in agents if a.name == leader)
            committed = {s for r, s in lead.checkpoints.committed if r == "solo"}  # type: ignore[union-attr]
            assert set(steps_on(worker_node, "solo")) <= committed
            for a in others:  # pushed whole to both idle nodes, pruned to --keep there too
                assert set(steps_on(a, "solo")) <= committed and len(steps_on(a, "solo")) <= 2
                info = a.checkpoints.store.latest("solo")  # type: ignore[union-attr]
                assert info is not None and sorted(info.replicas) == sorted(x.name for x in agents)
            newest = max(max(steps_on(a, "solo")) for a in agents)
            # the worker node loses its whole checkpoint directory; --resume fetches the newest replica
            assert worker_node.checkpoints is not None
            shutil.rmtree(worker_node.checkpoints.store.root / "solo")
            resume = {**opts, "resume": True}
            again = Job("j2", agents, [worker_node], resume)
            await again.start()
            found = again.workers[worker_node.name].resume()
            assert found is not None
            tree, meta, step = found
            assert step == newest and meta["cursor"] == newest
            assert (
                float(tree["params"]["w"][0]) == float(newest) and float(tree["opt"]["m"][0]) == 2.0 * newest
            )

    asyncio.run(go())


def test_leader_killed_between_acks_and_manifest(tmp_path: Path) -> None:
    async def go() -> None:
        async with mesh(tmp_path) as agents:
            leader_name = settled_leader(agents)
            old = next(a for a in agents if a.name == leader_name)
            on = [a for a in agents if a is not old]  # the job runs on the two others
            opts = {"run": "pair", "checkpoint_every": "15", "replicas": 1, "keep": 3}
            job = Job("j3", agents, on, opts)
            await job.start()
            assert old.checkpoints is not None
            held: list[dict[str, Any]] = []
            route = old.checkpoints.route

            def withhold_last_ack(job_id: str, member: str | None, msg: dict[str, Any]) -> bool:
                led = old.checkpoints.led.get(job_id)  # type: ignore[union-attr]
                rnd = led.leader.coordinator.round if led is not None and led.leader is not None else None
                if (
                    msg.get("type") == "written"
                    and rnd is not None
                    and len(rnd.acked) == len(rnd.writers) - 1
                ):
                    held.append(msg)  # every writer has acked; the leader dies before it commits
                    return True
                return route(job_id, member, msg)

            old.checkpoints.route = withhold_last_ack  # type: ignore[method-assign,assignment]
            await job.run(on[0], lambda: bool(held))
            torn = int(held[0]["step"])
            await crash(old)
            killed_at = time.monotonic()
            for a in on:  # both parts are on disk, durable, and not a checkpoint
                assert (a.checkpoints.store.step_dir("pair", torn) / "part.json").exists()  # type: ignore[union-attr]
                assert not (a.checkpoints.store.step_dir("pair", torn) / MANIFEST).exists()  # type: ignore[union-attr]
                assert steps_on(a, "pair") == []
            await until(lambda: settled_leader(on) not in (None, leader_name), "a new leader", timeout=30)
            elected_s = time.monotonic() - killed_at
            assert elected_s < 10.0  # the local profile detects a SIGKILLed node in ~2-3 s, then settles
            await job.run(on[0], lambda: all(steps_on(a, "pair") for a in on), timeout=30)
            for a in on:
                assert not a.checkpoints.store.step_dir("pair", torn).exists()  # type: ignore[union-attr]
                assert steps_on(a, "pair") and steps_on(a, "pair")[0] > torn
            print(
                f"new leader {settled_leader(on)} elected {elected_s:.2f}s after the crash; torn step {torn}"
            )

    asyncio.run(go())


def test_one_store_per_agent_and_the_term_floor_persists(tmp_path: Path) -> None:
    first, lock1 = claim_store(tmp_path, "node1")
    second, lock2 = claim_store(tmp_path, "node2")  # a second agent on this machine (a --local mesh)
    assert (
        first.root == tmp_path / "checkpoints" and second.root == tmp_path / "nodes" / "node2" / "checkpoints"
    )
    assert lock1 is not None and lock2 is not None
    lock1.close()  # the machine's agent left: the next one takes the machine's store again
    third, lock3 = claim_store(tmp_path, "node3")
    assert third.root == tmp_path / "checkpoints"
    for lock in (lock2, lock3):
        assert lock is not None
        lock.close()
    assert read_term_floor(tmp_path) == 0
    write_term_floor(tmp_path, 7)
    write_term_floor(tmp_path, 3)  # never goes back
    assert read_term_floor(tmp_path) == 7
