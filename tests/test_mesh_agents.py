"""Two real agents (`meshtrain join` processes on loopback) and the CLI driving them.

Everything is real: gossip over UDP, the control socket, worker processes,
the ring over TCP. The tiny training script all-reduces numpy vectors, so a
job takes about a second and the weighted mean it prints is checkable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshtrain.testing.agents import AgentProcess, alive_names, cli, meshtrain_cmd, wait_for

TINY = textwrap.dedent(
    """
    import sys
    import numpy as np
    import meshtrain
    mesh = meshtrain.init()
    print(f"rank {mesh.rank}/{mesh.size} on {mesh.node} args {sys.argv[1:]}", flush=True)
    print(f"ring authenticated {getattr(mesh, 'ring_authenticated', None)}", flush=True)
    for step in range(5):
        out = mesh.allreduce(np.full(1000, float(mesh.rank + 1), dtype=np.float32), weight=mesh.rank + 1)
        mesh.report(epoch=0, epochs=1, step=step, steps_per_epoch=5, loss=float(out[0]), samples=10)
    if "--boom" in sys.argv and mesh.rank == 1:
        raise ValueError("boom on rank 1")
    if mesh.is_main:
        print(f"weighted mean {float(out[0]):.4f}", flush=True)
    mesh.close()
    """
)


__all__ = [
    "AgentProcess",
    "alive_names",
    "cli",
    "meshtrain_cmd",
    "wait_for",
]  # other tests import them from here


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    root = tmp_path_factory.mktemp("mesh")
    script = root / "work" / "tiny.py"
    script.parent.mkdir()
    script.write_text(TINY)
    a = AgentProcess(root / "a", "a")
    b = AgentProcess(root / "b", "b", token=a.token)  # the token names a's secret and address
    try:
        wait_for(lambda: alive_names(a.home) == {"a", "b"})
        yield a.home, b.home, script
    finally:
        b.stop()
        a.stop()


def test_status_json_follows_the_schema(mesh: tuple[Path, Path, Path]) -> None:
    home_a, _, _ = mesh
    snap = json.loads(cli(home_a, "status", "--json").stdout)
    ids = {n["name"]: n["id"] for n in snap["nodes"]}  # ids are stored per node, apart from names
    assert snap["self"] == ids["a"] and snap["leader"] in (ids["a"], ids["b"])
    node = next(n for n in snap["nodes"] if n["name"] == "b")
    for key in (
        "id",
        "addr",
        "state",
        "incarnation",
        "platform",
        "device",
        "cores",
        "memory_gb",
        "load",
        "battery",
        "job",
        "role",
    ):
        assert key in node
    assert any(e["kind"] == "joined" and e["node"] == "b" for e in snap["events"])


def test_run_trains_on_both_nodes_with_the_weighted_mean(mesh: tuple[Path, Path, Path]) -> None:
    home_a, _, script = mesh
    out = cli(home_a, "run", "--nodes", "2", str(script), "x", "--flag")
    assert out.returncode == 0, out.stderr
    assert "[a] rank 0/2 on a args ['x', '--flag']" in out.stdout
    assert "[b] rank 1/2 on b args ['x', '--flag']" in out.stdout
    assert "[a] weighted mean 1.6667" in out.stdout  # (1*1 + 2*2) / (1 + 2)
    # the agents handed the mesh secret to their workers: the ring proved it and tags every frame
    assert "[a] ring authenticated True" in out.stdout and "[b] ring authenticated True" in out.stdout


def test_a_crash_on_one_node_is_shown_once_and_the_agents_survive(mesh: tuple[Path, Path, Path]) -> None:
    home_a, home_b, script = mesh
    out = cli(home_a, "run", str(script), "--boom")
    assert out.returncode != 0
    assert out.stderr.count("Traceback") == 1 and 'raise ValueError("boom on rank 1")' in out.stderr
    assert (
        out.stderr.strip().splitlines()[-1]
        == "meshtrain: job failed: b (rank 1) failed: ValueError: boom on rank 1"
    )
    assert alive_names(home_a) == {"a", "b"} and alive_names(home_b) == {"a", "b"}
    again = cli(home_b, "run", str(script))  # and from the other node, the mesh still trains
    assert (
        again.returncode == 0
        and "[a] weighted mean" not in again.stdout
        and "[b] weighted mean" in again.stdout
    )


def test_unknown_node_name_is_one_line(mesh: tuple[Path, Path, Path]) -> None:
    out = cli(mesh[0], "run", "--nodes", "a,zz", str(mesh[2]))
    assert out.returncode != 0
    assert out.stderr.strip() == "meshtrain: job failed: unknown node 'zz'; the mesh has: a, b"


def test_too_few_nodes_waits_then_says_who_is_missing(mesh: tuple[Path, Path, Path]) -> None:
    start = time.monotonic()
    out = cli(mesh[0], "run", "--nodes", "3", "--wait", "1.5", str(mesh[2]))
    assert out.returncode != 0 and time.monotonic() - start >= 1.5
    assert "only 2 of 3 nodes reachable: have a, b" in out.stderr.strip().splitlines()[-1]


OLD_AGENT = textwrap.dedent(
    """
    import asyncio, sys
    from meshtrain.agent import Agent
    from meshtrain.gossip import GossipConfig
    from meshtrain.security import load_keyring

    async def main():
        keyring, _ = load_keyring(create=False)  # the mesh's secret, from MESHTRAIN_SECRET
        agent = Agent(name="old", keyring=keyring, protocol=0,
                      gossip=GossipConfig(profile="local", host="127.0.0.1", port=0, discovery=False,
                                          seeds=(("127.0.0.1", int(sys.argv[1])),)))
        await agent.start()
        print(f"old agent (gossip port {agent.gossip_port})", flush=True)
        await agent.wait_closed()

    asyncio.run(main())
    """
)


def test_an_agent_of_an_older_protocol_gets_one_clear_line(
    mesh: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    home_a, _, script = mesh
    secret = (home_a / "secret").read_text()
    env = {**os.environ, "MESHTRAIN_HOME": str(tmp_path / "old"), "MESHTRAIN_SECRET": secret}
    port = json.loads(cli(home_a, "status", "--json").stdout)["nodes"][0]["addr"].split(":")[1]
    old = subprocess.Popen(
        [sys.executable, "-c", OLD_AGENT, port], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert old.stdout is not None and "gossip port" in old.stdout.readline()
        wait_for(lambda: "old" in alive_names(home_a))
        named = cli(home_a, "run", "--nodes", "a,old", str(script))
        assert named.returncode != 0
        assert named.stderr.strip() == (
            "meshtrain: job failed: old runs meshtrain protocol 0 (this is 1): upgrade it"
        )
        everyone = cli(home_a, "run", str(script))  # the default skips it and trains on the others
        assert everyone.returncode == 0 and "rank 1/2" in everyone.stdout
        local = cli(tmp_path / "old", "status")  # this CLI against the older agent on "its" machine
        assert local.returncode != 0
        assert local.stderr.strip() == (
            "meshtrain: the agent on this machine speaks meshtrain protocol 0, this meshtrain speaks 1: "
            "run the same meshtrain version everywhere"
        )
    finally:
        old.terminate()
        old.wait(10)


FOREVER = textwrap.dedent(
    """
    import time
    import numpy as np
    import meshtrain
    mesh = meshtrain.init()
    print("started", flush=True)
    while True:
        mesh.allreduce(np.ones(10, dtype=np.float32))
        time.sleep(0.02)
    """
)


def test_ctrl_c_cancels_the_job_everywhere(mesh: tuple[Path, Path, Path]) -> None:
    home_a, home_b, script = mesh
    forever = script.parent / "forever.py"
    forever.write_text(FOREVER)
    env = {**os.environ, "MESHTRAIN_HOME": str(home_a)}
    proc = subprocess.Popen(
        meshtrain_cmd("run", str(forever)), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    started: set[str] = set()
    while len(started) < 2:
        line = proc.stdout.readline()
        assert line, "run ended before both workers started"
        if line.strip().endswith("started") and line.startswith("["):
            started.add(line.split("]")[0])
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and "meshtrain: job cancelled: cancelled by the user" in err

    def idle(home: Path) -> bool:
        snap = json.loads(cli(home, "status", "--json").stdout)
        return all(n["job"] is None for n in snap["nodes"]) and not snap["jobs"]

    wait_for(lambda: idle(home_a) and idle(home_b))


def test_leave_is_graceful_and_seen_as_left(mesh: tuple[Path, Path, Path]) -> None:
    home_a, home_b, _ = mesh
    out = cli(home_b, "leave")
    assert out.returncode == 0 and "left the mesh" in out.stdout

    def b_left() -> bool:
        nodes = json.loads(cli(home_a, "status", "--json").stdout)["nodes"]
        return any(n["name"] == "b" and n["state"] == "left" for n in nodes)

    wait_for(b_left)
    gone = cli(home_b, "status")
    assert gone.returncode != 0 and gone.stderr.strip() == (
        "meshtrain: no agent is running on this machine: start one with `meshtrain join`"
    )
