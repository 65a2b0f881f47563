"""Once per event by the mesh, also when the sender is lost: real `meshtrain join` agents on loopback, a
webhook receiver that refuses some notices while the coordinator lives, and the coordinator SIGKILLed.

Mid-job: `a` submits and coordinates; it delivers the first `--notify-when` notice, the second is refused
(HTTP 500, so `a` is still retrying it) when `a` is killed; `b` takes the job over, sends the second (the
record's ledger says it is owed), not the first (delivered), then the lost node and the end. After the end:
`a` ends the job but its `finished` is refused; `a` is killed; `b` (the lowest-ranked live worker, holding
the final record) tells the end. Each accepted message is counted: exactly one per event.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_elastic_agents import SCRIPT, start_agent, worker_pids
from tests.test_mesh_agents import AgentProcess, alive_names, wait_for

web = pytest.importorskip("aiohttp.web")


class Receiver:
    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []  # accepted
        self.refused: list[dict[str, Any]] = []
        self.refuse: set[str] = set()  # events or notice keys answered with HTTP 500
        self.url = ""

    def refuses(self, body: dict[str, Any]) -> bool:
        key = str(body.get("id", "")).split("/", 1)[-1]
        return body.get("event") in self.refuse or key in self.refuse

    def events(self) -> list[str]:
        return sorted(str(m["id"]).split("/", 1)[-1] for m in self.got)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rx = Receiver()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def hook(request: Any) -> Any:
        body = await request.json()
        if rx.refuses(body):
            rx.refused.append(body)
            return web.Response(status=500, text="not now")
        rx.got.append(body)
        return web.Response(text="ok")

    def serve() -> None:
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        box["port"] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        box["loop"] = loop
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    rx.url = f"http://127.0.0.1:{box['port']}/hook"
    yield rx
    box["loop"].call_soon_threadsafe(box["loop"].stop)
    thread.join(10)


@pytest.fixture()
def three(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    agents = [start_agent(tmp_path, "a", None, ledger)]
    try:
        for name in "bc":
            agents.append(start_agent(tmp_path, name, agents[0].token, ledger))
        wait_for(lambda: alive_names(agents[0].home) == set("abc"))
        yield agents
    finally:
        for agent in agents:
            agent.stop()


def submit(a: AgentProcess, out: Path, url: str, epochs: int, *extra: str) -> subprocess.Popen[str]:
    out.mkdir(exist_ok=True)
    env = {**os.environ, "MESHTRAIN_HOME": str(a.home)}
    cmd = [sys.executable, "-m", "meshtrain", "run", "--notify", url, *extra, str(SCRIPT)]
    cmd += ["--out", str(out), "--epochs", str(epochs), "--step-sleep", "0.1"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill(agent: AgentProcess) -> None:
    for pid in [agent.proc.pid, *worker_pids(agent)]:
        os.kill(pid, signal.SIGKILL)
    agent.proc.wait(10)


def settle(rx: Receiver, keys: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not set(keys) <= set(rx.events()) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)  # and nothing more


@pytest.mark.timeout(150)
def test_a_successor_sends_what_the_lost_coordinator_had_not(
    three: list[AgentProcess], receiver: Receiver, tmp_path: Path
) -> None:
    a, b, c = three
    receiver.refuse = {"metric:epoch>=4"}
    client = submit(
        a, tmp_path / "out", receiver.url, 12, "--notify-when", "epoch>=2", "--notify-when", "epoch>=4"
    )
    try:
        wait_for(lambda: receiver.refused and "metric:epoch>=2" in receiver.events(), timeout=90)
        kill(a)  # a is retrying metric:epoch>=4 (1 s later, then 5 s)
        receiver.refuse = set()
        client.communicate(timeout=30)
        settle(receiver, ["end", "metric:epoch>=2", "metric:epoch>=4"])
    finally:
        if client.poll() is None:
            client.kill()
    keys = receiver.events()
    assert [k for k in keys if not k.startswith("node_lost:")] == [
        "end",
        "metric:epoch>=2",
        "metric:epoch>=4",
    ]
    lost = [m for m in receiver.got if m["event"] == "node_lost"]
    assert [m["node"] for m in lost] == ["a"], lost  # told by b, once
    (end,) = [m for m in receiver.got if m["id"].endswith("/end")]
    assert end["event"] == "finished", end


@pytest.mark.timeout(150)
def test_the_end_is_told_when_the_node_that_ended_the_job_is_lost(
    three: list[AgentProcess], receiver: Receiver, tmp_path: Path
) -> None:
    a, b, c = three
    receiver.refuse = {"finished"}
    client = submit(a, tmp_path / "out", receiver.url, 2)
    _, err = client.communicate(timeout=90)
    assert client.returncode == 0, err[-2000:]
    wait_for(lambda: bool(receiver.refused), timeout=10)  # a's first attempt, refused
    kill(a)
    receiver.refuse = set()
    settle(receiver, ["end"])
    assert receiver.events() == ["end"], receiver.got
    assert receiver.got[0]["event"] == "finished" and len(receiver.refused) >= 1
