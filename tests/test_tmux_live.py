"""The real programs in a real terminal: `meshtrain join` and `meshtrain run` inside tmux.

Starts an agent in one tmux window and a training run in another, captures the
panes as a person would see them, and checks that the mesh view lists the
node, the run view draws its progress bar and ends on the final test accuracy.
Each test uses its own tmux server socket and $MESHTRAIN_HOME, so nothing is
shared with other agents on the machine; the tmux server is killed at the end.
Set MESHTRAIN_CAPTURE_DIR to keep the captured screens (for the closing note).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WIDTH, HEIGHT = 80, 24  # the classic terminal: the views must be readable on it

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def cli_has(*commands: str) -> bool:
    """Whether this checkout's CLI already offers these subcommands."""
    out = subprocess.run(
        [sys.executable, "-m", "meshtrain", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=30
    ).stdout
    return all(re.search(rf"\b{c}\b", out) for c in commands)


class Tmux:
    """A private tmux server (own socket) with one window per program."""

    def __init__(self, socket: Path, env: dict[str, str]) -> None:
        self.socket = socket
        self.env = env

    def tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-S", str(self.socket), *args], capture_output=True, text=True, env=self.env, timeout=10
        )
        if result.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def start(self, window: str, command: str) -> None:
        """Run `command` in a new window of a WIDTHxHEIGHT terminal; the pane stays after it exits."""
        shell_cmd = f'cd {shlex.quote(str(ROOT))} && {command}; rc=$?; echo; echo "[exit $rc]"; sleep 600'
        if not self.socket.exists():
            self.tmux(
                "new-session",
                "-d",
                "-s",
                "mt",
                "-n",
                window,
                "-x",
                str(WIDTH),
                "-y",
                str(HEIGHT),
                "bash",
                "-c",
                shell_cmd,
            )
        else:
            self.tmux("new-window", "-t", "mt", "-n", window, "bash", "-c", shell_cmd)

    def capture(self, window: str) -> str:
        return self.tmux("capture-pane", "-p", "-t", f"mt:{window}")

    def wait_for(self, window: str, ready: Callable[[str], bool], timeout: float, what: str) -> str:
        """Poll the screen until `ready(screen)`; a terminal offers no event to await but its contents."""
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.capture(window)
            if ready(screen):
                return screen
            if "[exit " in screen:
                break  # the program ended without showing it: no point waiting
            time.sleep(0.2)
        raise AssertionError(
            f"{what} did not appear in window {window} within {timeout:.0f}s; screen:\n{screen}"
        )

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}:{env.get('PATH', '')}",
        MESHTRAIN_HOME=str(tmp_path / "home"),
        TERM="xterm-256color",
        LANG="C.UTF-8",
        LC_ALL="C.UTF-8",
    )
    env.pop("NO_COLOR", None)
    env.pop("TMUX", None)
    session = Tmux(Path("/tmp") / f"meshtrain-tmux-{uuid.uuid4().hex[:10]}", env)
    try:
        yield session
    finally:
        session.kill()
        session.socket.unlink(missing_ok=True)


def keep(name: str, screen: str) -> None:
    directory = os.environ.get("MESHTRAIN_CAPTURE_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / f"{name}.txt").write_text(screen)


# Loopback only, no LAN broadcast beacons: the test never sends a packet off this machine.
AGENT = "meshtrain join --profile local --port 0 --host 127.0.0.1 --no-discovery"
RUN = "meshtrain run --nodes 2 examples/mnist.py --epochs 1 --train-limit 10000"


@pytest.mark.timeout(90)
@pytest.mark.skipif(not cli_has("join", "run"), reason="meshtrain join/run are not in this checkout yet")
def test_join_and_run_live_views_in_tmux(tmux: Tmux, tmp_path: Path) -> None:
    home_a, home_b = tmp_path / "home-a", tmp_path / "home-b"
    tmux.start("join-a", f"MESHTRAIN_HOME={home_a} {AGENT} --name tmux-a")
    first = tmux.wait_for(
        "join-a", lambda s: "tmux-a" in s and "alive" in s, 20, "the first node's mesh view"
    )
    assert "╭" in first  # the live (rich) view, not the plain fallback
    port = re.search(r"gossip port (\d+)", first)
    assert port, first

    tmux.start(
        "join-b",
        f"MESHTRAIN_HOME={home_b} {AGENT} --name tmux-b --seed 127.0.0.1:{port.group(1)} "
        f"--secret-file {home_a}/secret",  # the mesh secret the first join created
    )
    mesh = tmux.wait_for("join-a", lambda s: "2 alive" in s and "tmux-b" in s, 20, "the second node")
    keep("join", mesh)
    rows = {
        n: next(ln for ln in mesh.splitlines() if "● alive" in ln and n in ln) for n in ("tmux-a", "tmux-b")
    }
    assert sum("★" in row for row in rows.values()) == 1  # exactly one leader mark
    assert "(you)" in rows["tmux-a"] and "127.0.0.1:" in rows["tmux-a"]
    assert re.search(r"\+ joined +tmux-b", mesh), mesh  # the events log

    # the same mesh through a pipe: `meshtrain status` falls back to plain text
    status = subprocess.run(
        [str(BIN / "meshtrain"), "status"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**tmux.env, "MESHTRAIN_HOME": str(home_a)},
    )
    keep("status-piped", status.stdout)
    assert status.returncode == 0, status.stderr
    assert "\x1b" not in status.stdout and "╭" not in status.stdout
    assert "2 alive; leader" in status.stdout and "tmux-b" in status.stdout

    tmux.start("run", f"MESHTRAIN_HOME={home_a} {RUN}")
    partly_done = re.compile(r"● running +━+╸?─+ ")  # an epoch bar with some still to go
    running = tmux.wait_for("run", lambda s: bool(partly_done.search(s)), 40, "the progress bar")
    keep("run-progress", running)
    assert "mnist.py" in running and "epoch 1/1" in running and "ETA" in running

    final = tmux.wait_for("run", lambda s: "[exit " in s, 60, "the end of the run")
    keep("run-final", final)
    assert "[exit 0]" in final, final
    assert "done" in final and "on 2 nodes" in final
    assert "tmux-a" in final and "tmux-b" in final  # one row per worker
    assert re.search(r"test accuracy \d+\.\d\d%", final), final

    after = tmux.wait_for("join-a", lambda s: "job " in s, 10, "the job in the mesh view")
    keep("join-after", after)

    # Ctrl-C: the agent leaves gracefully, its final frame is drawn once and cleanly
    tmux.tmux("send-keys", "-t", "mt:join-b", "C-c")
    left = tmux.wait_for("join-b", lambda s: "[exit " in s, 15, "the agent's exit")
    keep("join-b-ctrl-c", left)
    assert "[exit 0]" in left and left.count("╭─ meshtrain · mesh") == 1 and "^C" not in left
    seen = tmux.wait_for("join-a", lambda s: "○ left" in s and "- left" in s, 15, "the node that left")
    keep("join-a-after-leave", seen)
