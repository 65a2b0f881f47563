"""Shares through the real product: a node switched to "on battery" (the power probe's test hook)
takes a smaller share of every global batch from the next re-balance on (the job's first one comes
FIRST_CHECK steps in, not at the first epoch's end), and the job's output says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshtrain.power import PowerState, write_override
from meshtrain.train.shares import FIRST_CHECK
from tests.test_mesh_agents import AgentProcess, alive_names, wait_for

SCRIPT = Path(__file__).resolve().parent / "scripts" / "elastic_train.py"


@pytest.mark.timeout(120)
def test_a_node_on_battery_halves_its_share_at_the_next_rebalance(tmp_path: Path) -> None:
    ledger, out, power = tmp_path / "ledger", tmp_path / "out", tmp_path / "power.json"
    ledger.mkdir()
    out.mkdir()
    write_override(power, PowerState(on_battery=False, percent=100.0, thermal=None))
    os.environ["MESHTRAIN_LEDGER_DIR"] = str(ledger)
    try:
        a = AgentProcess(tmp_path / "a", "a")
        os.environ["MESHTRAIN_POWER_FILE"] = str(power)  # only b's agent (and worker) reads this file
        try:
            b = AgentProcess(tmp_path / "b", "b", token=a.token)
        finally:
            del os.environ["MESHTRAIN_POWER_FILE"]
    finally:
        del os.environ["MESHTRAIN_LEDGER_DIR"]
    try:
        wait_for(lambda: alive_names(a.home) == {"a", "b"})
        write_override(power, PowerState(on_battery=True, percent=12.0, thermal=None))  # the lid is unplugged
        env = {**os.environ, "MESHTRAIN_HOME": str(a.home)}
        cmd = [
            sys.executable,
            "-m",
            "meshtrain",
            "run",
            str(SCRIPT),
            "--",
            "--out",
            str(out),
            "--epochs",
            "3",
        ]
        cmd += ["--step-sleep", "0.01", "--n", "768"]
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=100)
    finally:
        b.stop()
        a.stop()
    assert job.returncode == 0, job.stderr[-2000:]
    rows = [json.loads(x) for x in (ledger / "ledger-a.jsonl").read_text().splitlines()]
    full = [r for r in rows if len(r["slices"]["a"]) + len(r["slices"]["b"]) == 32]
    first = [r for r in full if r["step"] < FIRST_CHECK]
    later = [r for r in full if r["step"] >= FIRST_CHECK]
    assert len(first) == FIRST_CHECK and all(len(r["slices"]["b"]) == 16 for r in first)  # equal: unmeasured
    assert any(r["epoch"] == 0 for r in later)  # the first re-balance comes within the first epoch
    assert later and all(len(r["slices"]["b"]) <= 13 for r in later), [len(r["slices"]["b"]) for r in later]
    assert "share: b" in job.stdout and "on battery 12%: halved" in job.stdout, job.stdout[-2000:]
