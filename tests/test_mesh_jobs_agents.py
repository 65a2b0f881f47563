"""A job belongs to the mesh: real `meshtrain join` agents on loopback, `meshtrain run`, and the node the
job was submitted from SIGKILLed mid-job (agent, worker, and the `run` client's agent gone with it).

The job finishes on the other nodes (coordination passes to the lowest-ranked live worker), every sample
of every epoch is trained exactly once (the debug ledger), `meshtrain jobs` on another node lists it as
done with its exit status, `meshtrain attach` from a node shows its history (output printed before the
kill), and `run --detach` + `cancel` work from nodes that never submitted the job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_elastic_agents import SCRIPT, check_ledger, finished_digests, start_agent, worker_pids
from tests.test_mesh_agents import AgentProcess, alive_names, cli, wait_for


def jobs_on(home: Path) -> list[dict[str, Any]]:
    out = cli(home, "jobs", "--json", timeout=30)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def job_row(home: Path, job: str) -> dict[str, Any] | None:
    return next((r for r in jobs_on(home) if r["job"] == job), None)


@pytest.fixture()
def three(tmp_path: Path) -> Iterator[tuple[list[AgentProcess], Path, Path]]:
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


def wait_for_line(home: Path, job: str, line: str, timeout: float) -> None:
    """Follow `meshtrain attach JOB` on the node at `home` until `line` shows (then stop watching)."""
    watch = subprocess.Popen(
        [sys.executable, "-m", "meshtrain", "attach", job],
        env={**os.environ, "MESHTRAIN_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + timeout
    try:
        assert watch.stdout is not None
        for got in watch.stdout:
            if line in got:
                return
            assert time.monotonic() < deadline, f"{line!r} not seen on {home.name} in {timeout}s"
        raise AssertionError(f"attach ended before {line!r} showed")
    finally:
        watch.kill()
        watch.wait()


def steps_logged(ledger: Path) -> int:
    path = ledger / "ledger-b.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.timeout(180)
def test_the_job_outlives_the_node_it_was_submitted_from(
    three: tuple[list[AgentProcess], Path, Path],
) -> None:  # noqa: E501
    agents, ledger, out = three
    a, b, c = agents
    epochs = 8
    env = {**os.environ, "MESHTRAIN_HOME": str(a.home)}
    cmd = [sys.executable, "-m", "meshtrain", "run", str(SCRIPT), "--out", str(out)]
    cmd += ["--epochs", str(epochs), "--step-sleep", "0.05"]
    client = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: steps_logged(ledger) >= 16 and worker_pids(a) != [], timeout=90)  # past epoch 1
        running = [r for r in jobs_on(c.home) if r["state"] == "running"]
        assert len(running) == 1, running
        job = running[0]["job"]
        # a's line has reached c (records replicate every 0.5 s): what a printed and c holds must survive a
        wait_for_line(c.home, job, "[a] epoch 1 done", timeout=60)
        for pid in [a.proc.pid, *worker_pids(a)]:  # the submitting machine, at once
            os.kill(pid, signal.SIGKILL)
        _, stderr = client.communicate(timeout=30)
        assert stderr.strip().splitlines()[-1] == (
            f"meshtrain: lost this machine's agent; the job goes on: meshtrain attach {job} on another node"
        )
        assert client.returncode != 0
        # watching from another node while it goes on: the history so far comes first
        attached = subprocess.Popen(
            [sys.executable, "-m", "meshtrain", "attach", job],
            env={**os.environ, "MESHTRAIN_HOME": str(c.home)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        seen, seen_err = attached.communicate(timeout=120)
        assert attached.returncode == 0, seen_err[-2000:]
        assert "[a] epoch 1 done" in seen, seen[-2000:]  # printed by a before it died
        assert f"[b] epoch {epochs} done" in seen  # b coordinates the end (the lowest live rank)
        assert f"job {job} done" in seen
    finally:
        if client.poll() is None:
            client.kill()
    row = job_row(b.home, job)
    assert row is not None and row["state"] == "done" and row["exit_code"] == 0, row
    assert set(row["nodes"]) == {"b", "c"}
    digests = finished_digests(out)
    assert set(digests) == {"b", "c"} and len(set(digests.values())) == 1, digests
    check_ledger(ledger, epochs)


@pytest.mark.timeout(150)
def test_detach_attach_and_cancel_from_other_nodes(three: tuple[list[AgentProcess], Path, Path]) -> None:
    agents, ledger, out = three
    a, b, c = agents
    detached = cli(
        a.home,
        "run",
        "--detach",
        "--nodes",
        "a,b",
        str(SCRIPT),
        *("--out", str(out), "--epochs", "200", "--step-sleep", "0.05"),
    )
    assert detached.returncode == 0, detached.stderr
    job = detached.stdout.strip().splitlines()[-1]
    assert job.startswith("j") and f"meshtrain attach {job}" in detached.stderr
    wait_for(lambda: steps_logged(ledger) >= 3, timeout=60)
    row = job_row(c.home, job)  # c never ran the job, and sees it
    assert row is not None and row["state"] == "running" and set(row["nodes"]) == {"a", "b"}, row
    start = time.monotonic()
    cancelled = cli(c.home, "cancel", job)
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"cancelling job {job}", cancelled
    wait_for(lambda: (job_row(c.home, job) or {}).get("state") == "cancelled", timeout=20)
    assert time.monotonic() - start < 10
    wait_for(lambda: worker_pids(a) == [] and worker_pids(b) == [], timeout=10)
    again = cli(b.home, "cancel", job)
    assert again.returncode == 0 and "already ended (cancelled)" in again.stdout, again
    summary = cli(c.home, "attach", job)  # a finished job: its summary, its exit status
    assert summary.returncode == 130 and f"job {job} cancelled" in summary.stderr, summary
    logs = cli(c.home, "logs", job)
    assert logs.returncode == 0
    for op in ("attach", "cancel", "logs"):
        unknown = cli(b.home, op, "jnosuch")
        assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1, unknown
        assert "no job jnosuch" in unknown.stderr
