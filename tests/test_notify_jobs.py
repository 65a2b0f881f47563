"""`meshtrain run --notify` end to end: a real job (`--local 1`, a worker process) and a real webhook
receiver; exactly one message per job, with its id, name and final metrics; a failure's last traceback
line; a bad --notify is one line before anything starts."""

from __future__ import annotations

import asyncio
import os
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshtrain.testing.agents import meshtrain_cmd

web = pytest.importorskip("aiohttp.web")

TINY = textwrap.dedent(
    """
    import sys
    import numpy as np
    import meshtrain
    mesh = meshtrain.init()
    for step in range(4):
        mesh.allreduce(np.ones(10, dtype=np.float32))
        mesh.report(epoch=0, epochs=1, step=step, steps_per_epoch=4, loss=1.0 / (step + 1), samples=8,
                    val_loss=0.5)
    if "--boom" in sys.argv:
        raise ValueError("boom in the script")
    mesh.close()
    """
)


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    got: list[dict[str, Any]] = []
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def hook(request: Any) -> Any:
        got.append(await request.json())
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
    yield f"http://127.0.0.1:{box['port']}/hook", got
    box["loop"].call_soon_threadsafe(box["loop"].stop)
    thread.join(10)


def run(tmp_path: Path, *ours: str, script_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`meshtrain run [OURS] tiny.py [SCRIPT_ARGS]` (meshtrain's options before the script)."""
    script = tmp_path / "tiny.py"
    script.write_text(TINY)
    env = {**os.environ, "MESHTRAIN_HOME": str(tmp_path / "home")}
    return subprocess.run(
        meshtrain_cmd("run", "--local", "1", *ours, str(script), *script_args),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def settle(got: list[dict[str, Any]], n: int) -> None:
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # and nothing more


def test_finished_job_sends_one_message_with_its_metrics(
    tmp_path: Path, receiver: tuple[str, list[dict[str, Any]]]
) -> None:
    url, got = receiver
    out = run(tmp_path, "--notify", url)
    assert out.returncode == 0, out.stderr
    settle(got, 1)
    assert len(got) == 1, got
    (msg,) = got
    assert msg["event"] == "finished" and msg["job"].startswith("j") and msg["name"] == "tiny"
    assert msg["metrics"]["loss"] == 0.25 and msg["metrics"]["val_loss"] == 0.5
    assert msg["duration_s"] is not None and msg["job"] in msg["text"]


def test_failed_job_says_the_tracebacks_last_line(
    tmp_path: Path, receiver: tuple[str, list[dict[str, Any]]]
) -> None:
    url, got = receiver
    out = run(tmp_path, "--notify", url, script_args=("--boom",))
    assert out.returncode == 1
    settle(got, 1)
    assert [m["event"] for m in got] == ["failed"]
    assert got[0]["detail"] == "ValueError: boom in the script"


def test_bad_notify_is_one_line(tmp_path: Path) -> None:
    out = run(tmp_path, "--notify", "gopher://x")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "--notify" in out.stderr
