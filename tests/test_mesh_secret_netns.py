"""A namespaced LAN with a stranger: two hosts share the mesh secret, a third holds another one.

All three run plain `meshtrain join` with LAN discovery. The stranger's
beacons and joins reach the members but are refused (counted as
`unknown_mesh` in their `meshtrain status`); it never appears as a member,
sees nobody itself, and can neither place a job on the mesh nor talk to a
member's control port. Needs root and iproute2 (skips otherwise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from meshtrain import netns
from meshtrain.agent.control import NO_SECRET
from meshtrain.security import Keyring, generate_secret

pytestmark = [
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
    pytest.mark.timeout(90),
]

ASK_FOR_A_JOB = textwrap.dedent(
    """
    import asyncio, sys
    from meshtrain.agent.control import call
    from meshtrain.errors import UserError
    from meshtrain.security import load_keyring

    async def main():
        keyring, _ = load_keyring(create=False)
        for port in sys.argv[2:]:
            try:
                await call((sys.argv[1], int(port)), "job.prepare", who="the member", keyring=keyring,
                           job="evil", rank=0, size=1)
                print("ACCEPTED", port)
            except UserError as exc:
                print(exc)
            except Exception as exc:
                print("other", type(exc).__name__)

    asyncio.run(main())
    """
)


def test_a_host_with_another_secret_is_refused_and_counted(tmp_path: Path) -> None:
    mesh, other = (Keyring([generate_secret()]).to_text() for _ in range(2))
    agents: list[subprocess.Popen[bytes]] = []
    with netns.Cluster(3, prefix="si", rate="1gbit") as cluster:

        def env(i: int) -> dict[str, str]:
            return {
                **os.environ,
                "MESHTRAIN_HOME": str(tmp_path / f"h{i}"),
                "MESHTRAIN_SECRET": other if i == 2 else mesh,
            }

        def cli(i: int, *args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*cluster.exec_prefix(i), sys.executable, "-m", "meshtrain", *args],
                env=env(i),
                capture_output=True,
                text=True,
                timeout=30,
            )

        def status(i: int) -> dict[str, Any]:
            out = cli(i, "status", "--json")
            return json.loads(out.stdout) if out.returncode == 0 else {"nodes": [], "drops": {}}

        def alive(i: int) -> set[str]:
            return {n["name"] for n in status(i)["nodes"] if n["state"] == "alive"}

        try:
            for i in range(3):
                agents.append(cluster.join(i, tmp_path / f"agent{i}.log", env(i)))
            deadline = time.monotonic() + 40
            while alive(0) != {"host0", "host1"} or status(0)["drops"].get("unknown_mesh", 0) < 1:
                assert time.monotonic() < deadline, (tmp_path / "agent0.log").read_text()[-2000:]
                time.sleep(0.3)
            assert alive(1) == {"host0", "host1"} and alive(2) == {"host2"}
            assert status(2)["drops"]["unknown_mesh"] >= 1  # the members' beacons, refused there too

            plain = cli(0, "status")
            assert "dropped packets:" in plain.stdout and "unknown_mesh" in plain.stdout

            script = tmp_path / "job.py"
            script.write_text("print('ran')\n")
            refused = cli(2, "run", "--nodes", "host0", "--wait", "1", str(script))
            assert refused.returncode != 0 and "ran" not in refused.stdout
            assert refused.stderr.strip().splitlines()[-1] == (
                "meshtrain: job failed: unknown node 'host0'; the mesh has: host2"
            )

            listening = subprocess.run(
                [*cluster.exec_prefix(0), "ss", "-Htln"], capture_output=True, text=True, check=True
            ).stdout
            ports = sorted({line.split()[3].rsplit(":", 1)[1] for line in listening.splitlines()} - {"7946"})
            assert ports, listening
            before = status(0)["drops"]["unknown_mesh"]
            asked = subprocess.run(
                [*cluster.exec_prefix(2), sys.executable, "-c", ASK_FOR_A_JOB, cluster.ip(0), *ports],
                env=env(2),
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert "ACCEPTED" not in asked.stdout, asked.stdout
            assert f"the member: {NO_SECRET}" in asked.stdout.splitlines(), asked.stdout + asked.stderr
            assert status(0)["drops"]["unknown_mesh"] > before
            assert all(n["job"] is None for n in status(0)["nodes"])
        finally:
            netns.stop_processes(agents)
