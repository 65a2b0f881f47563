"""Ctrl-C of an agent that runs a worker (issue 16 #4): a graceful leave, with real processes.

Three `meshtrain join` agents on loopback train tests/scripts/elastic_train.py; the one that did not
submit the job gets SIGINT (what Ctrl-C sends) while its worker trains. It must leave as a planned
departure: no traceback in its output, exit 0, its peers see it `left` (never suspect, dead, or alive
again), its worker is gone, and the job goes on without it to the end, every sample of every epoch
trained exactly once and the remaining replicas identical.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.test_elastic_agents import check_ledger, finished_digests, run_job, start_agent, worker_pids
from tests.test_mesh_agents import alive_names, wait_for


def events_about(home: Path, name: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "meshtrain", "status", "--json"],
        env={**os.environ, "MESHTRAIN_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return [e["kind"] for e in json.loads(out.stdout)["events"] if e["node"] == name]


@pytest.mark.timeout(200)
def test_ctrl_c_of_an_agent_with_a_worker_is_a_graceful_leave(tmp_path: Path) -> None:
    ledger, out = tmp_path / "ledger", tmp_path / "out"
    ledger.mkdir()
    out.mkdir()
    agents = [start_agent(tmp_path, "a", None, ledger)]
    try:
        for name in "bc":
            agents.append(start_agent(tmp_path, name, agents[0].token, ledger))
        wait_for(lambda: alive_names(agents[0].home) == set("abc"))
        a, b, _ = agents
        epochs = 6
        job = run_job(a.home, out, "--epochs", str(epochs), "--step-sleep", "0.05")
        wait_for(lambda: worker_pids(b) != [] and (ledger / "ledger-b.jsonl").exists(), timeout=90)
        time.sleep(1.0)  # b's worker is training
        workers = worker_pids(b)
        assert b.proc.stdout is not None
        tail: list[str] = []
        reader = threading.Thread(target=lambda: tail.extend(b.proc.stdout), daemon=True)  # type: ignore[arg-type]
        reader.start()
        sigint_at = time.time()
        b.proc.send_signal(signal.SIGINT)
        assert b.proc.wait(20) == 0
        reader.join(5)
        said = "".join(tail)
        assert "Traceback" not in said and "CancelledError" not in said, said[-3000:]
        assert "b left the mesh" in said
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in workers)
        wait_for(lambda: "left" in events_about(a.home, "b"), timeout=10)
        time.sleep(3.0)  # long enough for a suspicion to turn into a death, had b merely vanished
        for peer in (a, agents[2]):
            seen = events_about(peer.home, "b")
            assert seen[seen.index("left") :] == ["left"], seen  # nothing after: not alive, not dead
            assert "dead" not in seen and "suspect" not in seen, seen
        stdout, stderr = job.communicate(timeout=120)
    finally:
        for agent in agents:
            agent.stop()
        if "job" in locals() and job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr[-3000:]
    digests = finished_digests(out)
    assert set(digests) == {"a", "c"} and len(set(digests.values())) == 1, digests
    check_ledger(ledger, epochs)
    rows = [json.loads(x) for x in (ledger / "ledger-a.jsonl").read_text().splitlines()]
    before = [r for r in rows if r["t"] < sigint_at]
    after = [r for r in rows if r["t"] >= sigint_at and r["gen"] != before[-1]["gen"]]
    resumed = after[0]["t"] - sigint_at  # the survivors' first step without b
    print(f"SIGINT of b -> first step of the next generation: {resumed:.2f} s")
    assert resumed < 5.0  # a planned departure: no suspicion timeout, no ring connect timeout
