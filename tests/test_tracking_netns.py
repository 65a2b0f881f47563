"""A run's record survives the loss of the node that ran it: 3 namespaced hosts, the job's node cut.

Needs root and iproute2 (skips otherwise). host0 coordinates and runs a 2-node job, then its
link is cut and its agent killed; the job's other node still lists the run, done, with the
same settings and final metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshtrain import netns
from meshtrain.security import Keyring, generate_secret
from tests.test_tracking import SCRIPT

pytestmark = pytest.mark.skipif(
    not netns.available(), reason="needs root and iproute2 for network namespaces"
)


def test_a_record_survives_its_node(tmp_path: Path) -> None:
    secret = Keyring([generate_secret()]).to_text()
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    agents: list[subprocess.Popen[bytes]] = []
    with netns.Cluster(3, prefix="tk") as cluster:

        def env(i: int) -> dict[str, str]:
            return {**os.environ, "MESHTRAIN_HOME": str(tmp_path / f"h{i}"), "MESHTRAIN_SECRET": secret}

        def mt(i: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
            cmd = [*cluster.exec_prefix(i), sys.executable, "-m", "meshtrain", *args]
            return subprocess.run(cmd, env=env(i), capture_output=True, text=True, timeout=timeout)

        try:
            for i in range(3):
                agents.append(cluster.join(i, tmp_path / f"agent{i}.log", env(i)))
            deadline = time.monotonic() + 30
            while True:
                out = mt(0, "status", "--json")
                nodes = json.loads(out.stdout)["nodes"] if out.returncode == 0 else []
                if sum(n["state"] == "alive" for n in nodes) == 3:
                    break
                assert time.monotonic() < deadline, (tmp_path / "agent0.log").read_text()
                time.sleep(0.3)
            out = mt(0, "run", "--nodes", "2", "--wait", "20", str(script), "--lr", "0.3", timeout=120)
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
            (mine,) = json.loads(mt(0, "runs", "--json").stdout)
            assert "host0" in mine["mesh"]["nodes"] and len(mine["mesh"]["nodes"]) == 2
            other = int(next(n for n in mine["mesh"]["nodes"] if n != "host0")[-1])
            cluster.cut(0)  # the node that ran (and recorded) the job is gone
            agents[0].kill()
            agents[0].wait(10)
            (theirs,) = json.loads(mt(other, "runs", "--json").stdout)
            assert theirs["id"] == mine["id"] and theirs["state"] == "done"
            assert (
                theirs["params"]
                == mine["params"]
                == {
                    "lr": 0.3,
                    "steps": 6,
                    "optimizer": "sgd",
                    "layers": 2,
                    "width": 16,
                }
            )
            assert theirs["final"] == mine["final"] and theirs["bundle_hash"] == mine["bundle_hash"]
            shown = mt(other, "runs", "show", mine["id"])
            assert shown.returncode == 0 and "loss by step" in shown.stdout
        finally:
            netns.stop_processes(agents)
