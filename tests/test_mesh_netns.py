"""A namespaced LAN of 3 hosts: `meshtrain join` in each, `meshtrain run` from one, all three train.

Needs root and iproute2 (skips otherwise). The hosts find each other by LAN
broadcast discovery alone: no seeds are given.
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

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not netns.available(), reason="needs root and iproute2 for network namespaces"
)


def test_three_hosts_join_and_all_train(tmp_path: Path) -> None:
    agents: list[subprocess.Popen[bytes]] = []
    secret = Keyring([generate_secret()]).to_text()  # the one mesh secret every host holds
    with netns.Cluster(3, prefix="ms", rate="1gbit") as cluster:

        def env(i: int) -> dict[str, str]:
            return {
                **os.environ,
                "MESHTRAIN_HOME": str(tmp_path / f"h{i}"),
                "MESHTRAIN_SECRET": secret,
                "OPENBLAS_NUM_THREADS": "1",
            }

        def status(i: int) -> dict:  # type: ignore[type-arg]
            out = subprocess.run(
                [*cluster.exec_prefix(i), sys.executable, "-m", "meshtrain", "status", "--json"],
                env=env(i),
                capture_output=True,
                text=True,
                timeout=30,
            )
            return json.loads(out.stdout) if out.returncode == 0 else {"nodes": []}

        try:
            for i in range(3):
                agents.append(cluster.join(i, tmp_path / f"agent{i}.log", env(i)))
            deadline = time.monotonic() + 30
            while sum(n["state"] == "alive" for n in status(2)["nodes"]) < 3:
                assert time.monotonic() < deadline, (tmp_path / "agent2.log").read_text()
                time.sleep(0.3)
            out = subprocess.run(
                [
                    *cluster.exec_prefix(0),
                    sys.executable,
                    "-m",
                    "meshtrain",
                    "run",
                    "--nodes",
                    "3",
                    "--wait",
                    "20",
                    "examples/mnist.py",
                    "--epochs",
                    "1",
                    "--train-limit",
                    "1500",
                ],
                env=env(0),
                capture_output=True,
                text=True,
                timeout=120,
                cwd=ROOT,
            )
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
            assert "starting on host0, host1, host2" in out.stdout
            assert "world size 3" in out.stdout and "[host0] final test accuracy:" in out.stdout
            snap = status(1)
            addrs = {n["name"]: n["addr"] for n in snap["nodes"]}
            assert addrs == {f"host{i}": f"10.77.0.{i + 1}:7946" for i in range(3)}
        finally:
            netns.stop_processes(agents)
