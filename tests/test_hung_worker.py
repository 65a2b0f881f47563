"""A hung worker whose agent lives on: SIGSTOP of one worker process (issue 16 #17).

Its agent still answers gossip, so the node stays "alive", and its ring
sockets stay open: before the fix the job blocked until SIGCONT, re-forming
the same view. Now the worker's agent sees the process stopped for longer
than the hang bound (meshtrain.agent.hang: a few recent step times, at least
15 s) and removes it like a lost worker; the others go on without it, the
node comes back as a joiner ("c~1") that receives the state, and the job
finishes with every replica bit-identical. SIGCONT afterwards changes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshtrain.agent.hang import HangWatch
from meshtrain.env import HANG_FLOOR
from tests.test_elastic_agents import check_ledger, finished_digests, run_job, start_agent, worker_pids
from tests.test_mesh_agents import AgentProcess, alive_names, wait_for

FLOOR_S = 4.0  # the agents' floor here ($MESHTRAIN_HANG_FLOOR_S): the default 15 s, shortened


def test_hang_watch_bounds_by_recent_step_times_with_a_floor() -> None:
    watch = HangWatch(floor=15.0, steps=4.0)
    assert watch.observe(0.0, True) is None and watch.observe(15.5, True) == 15.5  # the floor
    assert watch.observe(16.0, False) is None and watch.observe(17.0, True) is None  # a new stop
    slow = HangWatch(floor=15.0, steps=4.0)
    for t in range(0, 50, 10):  # a report every 10 s: 4 steps are 40 s
        slow.reported(float(t))
    assert slow.limit == pytest.approx(40.0)
    slow.observe(100.0, True)
    assert slow.observe(130.0, True) is None and slow.observe(141.0, True) == 41.0


def _rows(ledger: Path, member: str) -> list[dict]:  # type: ignore[type-arg]
    path = ledger / f"ledger-{member}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture()
def three(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[AgentProcess], Path, Path]]:
    monkeypatch.setenv(HANG_FLOOR, str(FLOOR_S))  # inherited by the agents started below
    ledger, out = tmp_path / "ledger", tmp_path / "out"
    ledger.mkdir()
    out.mkdir()
    agents = [start_agent(tmp_path, "a", None, ledger)]
    try:
        for name in "bc":
            agents.append(start_agent(tmp_path, name, agents[0].token, ledger))
        wait_for(lambda: alive_names(agents[0].home) == set("abc"))
        yield agents, ledger, out
    finally:
        for agent in agents:
            agent.stop()


@pytest.mark.timeout(300)
def test_a_stopped_worker_leaves_the_job_and_its_node_rejoins(
    three: tuple[list[AgentProcess], Path, Path],
) -> None:
    agents, ledger, out = three
    epochs = 24
    job = run_job(agents[0].home, out, "--epochs", str(epochs), "--step-sleep", "0.05")
    victim = next(a for a in agents if a.name == "c")
    pids: list[int] = []
    try:
        wait_for(lambda: len(_rows(ledger, "c")) >= 5 and worker_pids(victim) != [], timeout=90)
        pids = worker_pids(victim)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        stopped_at = time.time()

        def trained_without_c() -> bool:
            return any(r["t"] > stopped_at and "c" not in r["slices"] for r in _rows(ledger, "a"))

        wait_for(trained_without_c, timeout=FLOOR_S + 45)
        resumed_after = min(r["t"] for r in _rows(ledger, "a") if r["t"] > stopped_at) - stopped_at
        for pid in pids:  # the stopped process is gone by now; SIGCONT must change nothing
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        stdout, stderr = job.communicate(timeout=200)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode == 0, stderr[-3000:]
    assert FLOOR_S - 1 < resumed_after < FLOOR_S + 30, resumed_after
    assert "stopped for" in stdout + stderr and "(hung)" in stdout + stderr, (stdout + stderr)[-3000:]
    digests = finished_digests(out)
    assert "c" not in digests and {"a", "b", "c~1"} <= set(digests), digests  # c came back as a joiner
    assert len(set(digests.values())) == 1, f"replicas diverged: {digests}"
    check_ledger(ledger, epochs)
