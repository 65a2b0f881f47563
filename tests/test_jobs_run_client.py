"""The agent says, in one line, when a foreground `meshtrain run` client goes away (issue 17).

Real agents on loopback. A `run` client stopped by SIGTERM sends its cancel with a `why` ("the
submitting `meshtrain run` got SIGTERM"): the agent logs that once and the job is cancelled on every
node. A `run` client that vanishes without a word (SIGKILL, its terminal gone) leaves the job running,
and the agent logs that once too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_elastic_agents import SCRIPT
from tests.test_mesh_agents import AgentProcess, alive_names, cli, wait_for
from tests.test_mesh_jobs_agents import job_row, jobs_on


def steps(ledger: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in ledger.glob("ledger-*.jsonl"))


def start_run(home: Path, ledger: Path, out: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "meshtrain", "run", "--ledger", str(ledger), str(SCRIPT)]
    cmd += ["--out", str(out), "--epochs", "200", "--step-sleep", "0.05"]
    env = {**os.environ, "MESHTRAIN_HOME": str(home)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(180)
def test_a_run_client_that_goes_away_is_one_line_in_the_agents_log(tmp_path: Path) -> None:
    a = AgentProcess(tmp_path / "a", "a")
    b = AgentProcess(tmp_path / "b", "b", token=a.token)
    try:
        wait_for(lambda: alive_names(a.home) == {"a", "b"}, 30)
        # SIGTERM: the client cancels the job and says why; the agent logs it once
        ledger, out = tmp_path / "l1", tmp_path / "o1"
        out.mkdir()
        client = start_run(a.home, ledger, out)
        wait_for(lambda: ledger.exists() and steps(ledger) >= 4, 90)
        first = next(r["job"] for r in jobs_on(b.home) if r["state"] == "running")
        client.send_signal(signal.SIGTERM)
        _, err = client.communicate(timeout=30)
        assert client.returncode != 0
        assert "terminated (SIGTERM): the job was cancelled on every node" in err, err[-2000:]
        wait_for(lambda: (job_row(b.home, first) or {}).get("state") == "cancelled", 20)
        assert "got SIGTERM" in str(job_row(b.home, first)["exit"])
        # SIGKILL: the client vanishes; the job goes on, and the agent says that once
        ledger, out = tmp_path / "l2", tmp_path / "o2"
        out.mkdir()
        client = start_run(a.home, ledger, out)
        wait_for(lambda: ledger.exists() and steps(ledger) >= 4, 90)
        second = next(r["job"] for r in jobs_on(b.home) if r["state"] == "running")
        client.kill()
        client.wait(10)
        at = steps(ledger)
        wait_for(lambda: steps(ledger) >= at + 6, 30)  # it trains on
        assert (job_row(b.home, second) or {}).get("state") == "running"
        assert cli(b.home, "cancel", second).returncode == 0
        wait_for(lambda: (job_row(a.home, second) or {}).get("state") == "cancelled", 20)
        time.sleep(1.0)  # the agent's log shows its events once a second
    finally:
        b.stop()
        a.stop()
    assert a.proc.stdout is not None
    log = a.proc.stdout.read()
    term = f"job {first}: the submitting `meshtrain run` got SIGTERM: cancelling it on every node"
    gone = f"job {second}: its `meshtrain run` client went away; it goes on"
    assert log.count(term) == 1 and log.count(gone) == 1, log[-3000:]
    assert f"job {first}: its `meshtrain run` client went away" not in log  # it said why: no second line
