"""Elastic training through the real product: `meshtrain join` agents on loopback, `meshtrain run`, and
processes SIGKILLed mid-all-reduce, mid-forward, and a whole node (the checkpoint leader, agent and
worker) killed; a node joining mid-training. Every time the job completes, the replicas that finish
hold bit-identical state, and the debug sample ledger (MESHTRAIN_LEDGER_DIR) shows every index of
every epoch in exactly one committed step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshtrain.testing.agents import worker_pids_under
from tests.test_mesh_agents import AgentProcess, alive_names, wait_for

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "elastic_train.py"
N, BATCH = 384, 32


def start_agent(root: Path, name: str, token: str | None, ledger: Path) -> AgentProcess:
    os.environ["MESHTRAIN_LEDGER_DIR"] = str(ledger)  # inherited by the agent, then by its workers
    try:
        return AgentProcess(root / name, name, token=token)
    finally:
        del os.environ["MESHTRAIN_LEDGER_DIR"]


def run_job(home: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "MESHTRAIN_HOME": str(home)}
    cmd = [sys.executable, "-m", "meshtrain", "run", str(SCRIPT), "--", "--out", str(out), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker_pids(agent: AgentProcess) -> list[int]:
    return worker_pids_under(agent.proc.pid)


def ledger_steps(ledger: Path) -> dict[tuple[int, int], dict[str, list[int]]]:
    """Every committed step's slices by member, from all the ledgers (members that logged the same
    step must have logged the same slices)."""
    steps: dict[tuple[int, int], dict[str, list[int]]] = {}
    for path in ledger.glob("ledger-*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            key = (row["epoch"], row["step"])
            assert steps.setdefault(key, row["slices"]) == row["slices"], f"members disagree on step {key}"
    return steps


def check_ledger(ledger: Path, epochs: int) -> int:
    """Every index exactly once per epoch; members that logged the same step logged the same slices."""
    steps = ledger_steps(ledger)
    for epoch in range(epochs):
        seen = Counter(i for (e, _), sl in steps.items() if e == epoch for v in sl.values() for i in v)
        assert sorted(seen) == list(range(N)), f"epoch {epoch}: missing {sorted(set(range(N)) - set(seen))}"
        assert max(seen.values()) == 1, f"epoch {epoch}: repeated {[i for i, c in seen.items() if c > 1]}"
    return len(steps)


def finished_digests(out: Path) -> dict[str, str]:
    return {p.stem.removeprefix("result-"): json.loads(p.read_text())["digest"] for p in out.glob("result-*")}


@pytest.fixture()
def four(tmp_path: Path) -> Iterator[tuple[list[AgentProcess], Path, Path]]:
    ledger, out = tmp_path / "ledger", tmp_path / "out"
    ledger.mkdir()
    out.mkdir()
    agents = [start_agent(tmp_path, "a", None, ledger)]
    try:
        for name in "bcd":
            agents.append(start_agent(tmp_path, name, agents[0].token, ledger))
        wait_for(lambda: alive_names(agents[0].home) == set("abcd"))
        yield agents, ledger, out
    finally:
        for agent in agents:
            agent.stop()


@pytest.mark.timeout(150)
def test_kill_mid_allreduce_and_mid_forward_then_a_node_joins(
    four: tuple[list[AgentProcess], Path, Path], tmp_path: Path
) -> None:
    agents, ledger, out = four
    epochs = 8
    job = run_job(
        agents[0].home,
        out,
        *("--epochs", str(epochs), "--step-sleep", "0.05", "--hidden", "512", "--evaluate"),
        *("--die", "c:6:allreduce", "--die", "d:16:forward"),
    )
    try:
        wait_for(lambda: (ledger / "ledger-c.jsonl").exists(), timeout=60)
        agents.append(start_agent(tmp_path, "e", agents[0].token, ledger))  # joins mid-training
        stdout, stderr = job.communicate(timeout=100)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr[-3000:]
    digests = finished_digests(out)
    # c and d lost their workers (their agents live on: each got a new worker, c~1 and d~1, that joined)
    assert {"a", "b", "e"} <= set(digests) and "c" not in digests and "d" not in digests, (digests, stderr)
    assert len(set(digests.values())) == 1, f"replicas diverged: {digests}"
    assert check_ledger(ledger, epochs) >= epochs * (N // BATCH)
    rows = [json.loads(x) for x in (ledger / "ledger-e.jsonl").read_text().splitlines()]
    assert rows and rows[0]["epoch"] >= 0  # the joiner trained on its share after receiving state
    # mesh.evaluate on every worker at each epoch's end: the whole set counted once by those who were
    # there (a, present throughout), NaN for the epochs a joiner's loop passed before it took part
    evals = {m: json.loads((out / f"result-{m}.json").read_text())["evals"] for m in digests}
    assert evals["a"] == [float(N)] * epochs, evals
    first = next(i for i, v in enumerate(evals["e"]) if v == v)  # the first epoch e evaluated
    assert all(v != v for v in evals["e"][:first]) and evals["e"][first:] == [float(N)] * (epochs - first)


@pytest.mark.timeout(150)
def test_sigkill_of_the_leader_node_agent_and_worker(four: tuple[list[AgentProcess], Path, Path]) -> None:
    agents, ledger, out = four
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "meshtrain", "status", "--json"],
            env={**os.environ, "MESHTRAIN_HOME": str(agents[0].home)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    leader_id = status.get("leader")
    leader = next(n["name"] for n in status["nodes"] if n.get("id") == leader_id or n["name"] == leader_id)
    victim = next(a for a in agents if a.name == leader)
    submitter = next(a for a in agents if a.name != leader)  # the submitter's node owns the live view
    epochs = 4
    job = run_job(submitter.home, out, "--epochs", str(epochs), "--step-sleep", "0.05")
    try:
        wait_for(lambda: len(list(ledger.glob("*.jsonl"))) >= 4 and worker_pids(victim) != [], timeout=60)
        time.sleep(0.5)
        for pid in [victim.proc.pid, *worker_pids(victim)]:  # the whole node, at once
            os.kill(pid, signal.SIGKILL)
        stdout, stderr = job.communicate(timeout=100)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr[-3000:]
    digests = finished_digests(out)
    assert leader not in digests and len(digests) == 3, digests
    assert len(set(digests.values())) == 1, f"replicas diverged: {digests}"
    check_ledger(ledger, epochs)


@pytest.mark.timeout(150)
def test_below_min_nodes_the_job_pauses_and_resumes_when_a_node_returns(tmp_path: Path) -> None:
    import threading

    ledger, out = tmp_path / "ledger", tmp_path / "out"
    ledger.mkdir()
    out.mkdir()
    a = start_agent(tmp_path, "a", None, ledger)
    agents = [a, start_agent(tmp_path, "b", a.token, ledger)]
    lines: list[str] = []
    try:
        wait_for(lambda: alive_names(a.home) == {"a", "b"})
        env = {**os.environ, "MESHTRAIN_HOME": str(a.home)}
        cmd = [sys.executable, "-m", "meshtrain", "run", "--min-nodes", "2", str(SCRIPT), "--"]
        cmd += ["--out", str(out), "--epochs", "5", "--step-sleep", "0.05"]
        job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert job.stdout is not None
        errors: list[str] = []  # each pipe has one reader (communicate() would race the line reader)
        reader = threading.Thread(target=lambda: lines.extend(iter(job.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
        err_reader = threading.Thread(target=lambda: errors.append(job.stderr.read()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        err_reader.start()
        wait_for(
            lambda: (
                len((ledger / "ledger-b.jsonl").read_text().splitlines()) >= 5
                if (ledger / "ledger-b.jsonl").exists()
                else False
            ),
            timeout=60,
        )
        for pid in [agents[1].proc.pid, *worker_pids(agents[1])]:  # node b is gone: 1 worker < 2
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: any("paused" in line for line in lines), timeout=30)
        steps_when_paused = len((ledger / "ledger-a.jsonl").read_text().splitlines())
        time.sleep(1.0)
        assert len((ledger / "ledger-a.jsonl").read_text().splitlines()) == steps_when_paused  # no training
        agents.append(start_agent(tmp_path / "again", "b", a.token, ledger))  # b restarts its agent
        job.wait(timeout=100)
        reader.join(5)
        err_reader.join(5)
        stderr = "".join(errors)
    finally:
        for agent in agents:
            agent.stop()
    assert job.returncode == 0, stderr[-3000:]
    digests = finished_digests(out)
    assert set(digests) == {"a", "b~1"} and len(set(digests.values())) == 1, digests
    check_ledger(ledger, 5)
