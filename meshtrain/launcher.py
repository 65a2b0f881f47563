"""Meshes that live only for one `meshtrain run`: `--local N`, and training alone.

`run --local N` starts N agents inside the CLI process (profile "local",
loopback, no broadcast discovery), lets them find each other, submits the
job to the first one and tears all of them down afterwards. The agents are
the real ones (gossip, control server, worker processes, ring over TCP); only
their lifetime is borrowed. With no agent on this machine, a plain `run` is
the same thing with N = 1. Such a mesh has its own ephemeral secret, made for
the run and never stored: its gossip, control and ring traffic is authenticated
like any mesh's, and nothing outside the run holds the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from meshtrain.agent.agent import Agent
from meshtrain.agent.jobs import JobRequest, JobResult, JobRunner, JobSink
from meshtrain.errors import UserError
from meshtrain.gossip.config import GossipConfig
from meshtrain.security import Keyring, generate_secret

FORM_TIMEOUT_S = 20.0
LOOPBACK = "127.0.0.1"


def thread_env(n_local: int) -> dict[str, str]:
    """Split this machine's cores between the N workers it hosts, so they do not fight over them."""
    threads = str(max(1, (os.cpu_count() or 1) // max(1, n_local)))
    return {"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


async def start_local_mesh(n: int, encrypt: bool = False) -> list[Agent]:
    """N agents on loopback that all see each other; the caller must `leave()` them. `encrypt`:
    AES-GCM for all their traffic (gossip, control, ring), as `join --encrypt` gives a mesh."""
    agents: list[Agent] = []
    keyring = Keyring([generate_secret()], encrypt=encrypt)
    try:
        for i in range(n):
            seeds = [(LOOPBACK, agents[0].gossip_port)] if agents else []
            agent = Agent(
                name=f"node{i + 1}",
                gossip=GossipConfig(
                    profile="local", host=LOOPBACK, port=0, seeds=tuple(seeds), discovery=False
                ),
                unix_socket=False,
                worker_env=thread_env(n),
                keyring=keyring,
            )
            agents.append(agent)
            await agent.start()
        deadline = time.monotonic() + FORM_TIMEOUT_S
        while not all(_sees_all(a, n) for a in agents):
            if time.monotonic() > deadline:
                raise UserError(f"the local mesh of {n} nodes did not form within {FORM_TIMEOUT_S:.0f}s")
            await asyncio.sleep(0.05)
    except BaseException:
        await stop_local_mesh(agents)
        raise
    return agents


def _sees_all(agent: Agent, n: int) -> bool:
    return sum(1 for c in agent.candidates() if c.state == "alive" and c.protocol is not None) >= n


async def stop_local_mesh(agents: list[Agent]) -> None:
    for agent in reversed(agents):
        with contextlib.suppress(Exception):
            await agent.leave()


async def run_embedded(
    request: JobRequest,
    n: int,
    sink: JobSink,
    runner_ready: asyncio.Future[JobRunner],
    *,
    encrypt: bool = False,
) -> JobResult:
    """Run the job on a fresh local mesh of `n` nodes; `runner_ready` gets the runner (for Ctrl-C)."""
    agents = await start_local_mesh(n, encrypt=encrypt)
    try:
        job = JobRequest(
            script=request.script,
            args=request.args,
            bundle=request.bundle,
            nodes=str(n),
            wait=FORM_TIMEOUT_S,
            min_nodes=request.min_nodes,
            options=request.options,
        )
        runner = JobRunner(request=job, membership=agents[0], protocol=agents[0].protocol)
        if not runner_ready.done():
            runner_ready.set_result(runner)
        return await agents[0].submit(job, sink, runner)
    finally:
        await stop_local_mesh(agents)
