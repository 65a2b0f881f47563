"""CLI defects a new user and a fault drill found (issue 16): each test failed before its fix.

Real processes throughout: a detached agent in a private MESHTRAIN_HOME, `meshtrain run`
clients that get signals, scripts that print what they were given.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshtrain import blas

FLAGS = ["--name", "solo", "--profile", "local", "--host", "127.0.0.1", "--port", "0", "--no-discovery"]
FOREVER = (
    "import time, meshtrain\nm = meshtrain.init()\ni = 0\n"
    "while True:\n    print('tick', i, flush=True)\n    i += 1\n    time.sleep(0.05)\n"
)
SHORT = (
    "import time, meshtrain\nm = meshtrain.init()\n"
    "for i in range(60):\n    print('tick', i, flush=True)\n    time.sleep(0.05)\n"
)
ARGV = "import sys, meshtrain\nmeshtrain.init()\nprint('argv', sys.argv[1:], flush=True)\n"


def env_for(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "MESHTRAIN_HOME": str(home), **extra}


def meshtrain(home: Path, *args: str | bytes, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", *args],
        env=env_for(home, **env),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Path]:
    """A detached agent in its own MESHTRAIN_HOME; the home is yielded, the agent leaves after."""
    home = tmp_path / "home"
    started = meshtrain(home, "join", "--detach", *FLAGS)
    assert started.returncode == 0, started.stderr
    try:
        yield home
    finally:
        meshtrain(home, "leave")


def free_udp_port() -> int:
    """A port free on UDP and TCP, with the next one free on UDP too (gossip + discovery)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        try:
            for kind, p in (
                (socket.SOCK_DGRAM, port),
                (socket.SOCK_STREAM, port),
                (socket.SOCK_DGRAM, port + 1),
            ):
                with socket.socket(socket.AF_INET, kind) as t:
                    t.bind(("0.0.0.0", p))
        except OSError:
            continue
        return port
    raise AssertionError("no free port pair")


class Client:
    """A `meshtrain run` in the background whose stdout lines are collected as they come."""

    def __init__(self, home: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshtrain", "run", *args],
            env=env_for(home),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.err = ""
        self._out = threading.Thread(target=self._read, daemon=True)
        self._out.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, (self.lines[-5:], self.proc.stderr and self.proc.stderr.read())
            assert time.monotonic() < deadline, self.lines[-5:]
            time.sleep(0.1)

    def finish(self, timeout: float = 60.0) -> int:
        assert self.proc.stderr is not None
        self.err = self.proc.stderr.read()
        code = self.proc.wait(timeout)
        self._out.join(5)
        return code


def no_job_runs(home: Path, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = meshtrain(home, "status", "--json")
        if out.returncode == 0 and not json.loads(out.stdout).get("jobs"):
            return True
        time.sleep(0.3)
    return False


# 5: SIGTERM of `run`


def test_sigterm_of_run_cancels_the_job_and_says_so_in_one_line(agent: Path, tmp_path: Path) -> None:
    script = tmp_path / "forever.py"
    script.write_text(FOREVER)
    client = Client(agent, str(script))
    client.wait_for("tick 3")
    client.proc.send_signal(signal.SIGTERM)
    code = client.finish()
    assert code == 128 + signal.SIGTERM, (code, client.err)
    assert client.err.strip().splitlines()[-1:] == [
        "meshtrain: terminated (SIGTERM): the job was cancelled on every node"
    ], client.err
    assert "Traceback" not in client.err
    assert no_job_runs(agent)  # as Ctrl-C does: the job is cancelled, not left running
    log = (agent / "agent.log").read_text()
    assert "Traceback" not in log and "control request" not in log, log


def test_a_killed_submitter_leaves_no_traceback_in_the_agent(agent: Path, tmp_path: Path) -> None:
    script = tmp_path / "short.py"
    script.write_text(SHORT)
    client = Client(agent, str(script))
    client.wait_for("tick 3")
    client.proc.kill()  # no chance to say goodbye: the agent finds out when it answers at the end
    client.finish()
    assert no_job_runs(agent)  # the job ended (by itself, or cancelled: either way it is over)
    time.sleep(1.0)
    log = (agent / "agent.log").read_text()
    assert "Traceback" not in log and "the handler is closed" not in log, log


def test_sigterm_of_a_run_alone_ends_its_worker_too(tmp_path: Path) -> None:
    script = tmp_path / "forever.py"
    script.write_text(FOREVER)
    client = Client(tmp_path / "home", str(script))
    client.wait_for("tick 3")
    client.proc.send_signal(signal.SIGTERM)
    code = client.finish()
    assert code == 128 + signal.SIGTERM, (code, client.err)
    assert client.err.strip().splitlines()[-1] == (
        "meshtrain: terminated (SIGTERM): the job was cancelled on every node"
    )
    assert "Traceback" not in client.err


# 6: slow BLAS is said where training starts, not only by `doctor`

SLOW = f"meshtrain: MLX uses the slow reference BLAS; for ~30x faster training: {blas.INSTALL_HINT}"
needs_reference_blas = pytest.mark.skipif(
    not blas.mlx_links_reference_blas(), reason="this MLX does not link the reference BLAS"
)


@needs_reference_blas
def test_run_join_and_doctor_warn_of_the_reference_blas(tmp_path: Path) -> None:
    nothing = {"MESHTRAIN_BLAS": str(tmp_path / "no-such-libblas.so")}  # as if OpenBLAS were missing
    script = tmp_path / "s.py"
    script.write_text(ARGV)
    ran = meshtrain(tmp_path / "home", "run", "--local", "1", str(script), **nothing)
    assert ran.returncode == 0, ran.stderr
    assert SLOW in ran.stderr.splitlines(), ran.stderr
    home = tmp_path / "home2"
    joined = meshtrain(home, "join", "--detach", *FLAGS, **nothing)
    try:
        assert joined.returncode == 0 and SLOW in joined.stderr.splitlines(), joined.stderr
        status = meshtrain(home, "status", "--json")  # and every view: the node's device says so
        devices = [n.get("device") for n in json.loads(status.stdout)["nodes"]]
        assert devices == ["CPU, slow BLAS"], devices
    finally:
        meshtrain(home, "leave")
    doctor = meshtrain(tmp_path, "doctor", **nothing)
    assert SLOW in doctor.stderr.splitlines(), doctor.stderr
    fast = meshtrain(tmp_path / "home3", "run", "--local", "1", str(script))
    assert fast.returncode == 0 and "reference BLAS" not in fast.stderr  # with OpenBLAS: quiet


# 9: a second `join --detach`


def test_join_detach_with_an_agent_running_says_so(agent: Path) -> None:
    second = meshtrain(agent, "join", "--detach", *FLAGS)
    assert second.returncode != 0
    assert second.stderr.strip() == (
        "meshtrain: an agent (solo) is already running on this machine; see it with `meshtrain status`"
    )
    assert second.stdout == ""


# 10: meshtrain's options before SCRIPT, the script's after it


def test_everything_after_the_script_is_the_scripts(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text(ARGV)
    out = meshtrain(
        tmp_path / "home", "run", "--local", "1", str(script), "--resume", "--keep", "5", "--local", "3"
    )
    assert out.returncode == 0, out.stderr
    assert "[node1] argv ['--resume', '--keep', '5', '--local', '3']" in out.stdout


# 11: arguments that cannot travel


def test_a_non_utf8_argument_is_one_line(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text(ARGV)
    out = subprocess.run(
        [sys.executable, "-m", "meshtrain", "run", "--local", "1", str(script), b"caf\xe9"],
        env=env_for(tmp_path / "home"),
        capture_output=True,
        timeout=60,
    )
    err = out.stderr.decode(errors="replace").strip()
    assert out.returncode == 2 and "\n" not in err and "Traceback" not in err, err
    assert err.startswith("meshtrain: argument 1 for the script is not valid UTF-8"), err


def test_arguments_over_the_request_limit_are_one_line(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text(ARGV)
    out = meshtrain(tmp_path / "home", "run", "--local", "1", str(script), "x" * 70_000)
    assert out.returncode == 2 and out.stderr.strip() == (
        "meshtrain: the script's arguments are 70,000 bytes; at most 32,768 fit in a job request "
        "(pass a file instead)"
    )


# 12: discovery follows --port; a port in use says so and names the flag


def test_join_on_7947_works_and_discovery_follows_the_port(tmp_path: Path) -> None:
    port = free_udp_port()
    home = tmp_path / "home"
    flags = ["--name", "d", "--profile", "local", "--host", "127.0.0.1", "--port", str(port)]
    started = meshtrain(home, "join", "--detach", *flags)
    try:
        assert started.returncode == 0, started.stderr
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # discovery holds port + 1
            with pytest.raises(OSError):
                s.bind(("0.0.0.0", port + 1))
    finally:
        meshtrain(home, "leave")


def test_a_port_in_use_says_in_use_and_names_the_flag(tmp_path: Path) -> None:
    port = free_udp_port()
    flags = ["--name", "d", "--profile", "local", "--host", "127.0.0.1", "--port", str(port)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", port))
        out = meshtrain(tmp_path / "home", "join", "--detach", "--no-discovery", *flags)
    assert out.returncode != 0 and "in use" in out.stderr and "--port" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", port + 1))
        out = meshtrain(tmp_path / "home", "join", "--detach", *flags)
    assert out.returncode != 0 and "in use" in out.stderr and "--no-discovery" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# 13: a checkpoint that never came


def test_checkpoint_every_longer_than_the_job_warns_at_the_end(tmp_path: Path) -> None:
    script = tmp_path / "short.py"
    script.write_text(
        "import mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim, meshtrain\n"
        "mesh = meshtrain.init()\n"
        "model = nn.Linear(4, 1)\n"
        "opt = optim.SGD(learning_rate=0.1)\n"
        "mesh.register(model, opt)\n"
        "X = mx.ones((64, 4))\n"
        "f = nn.value_and_grad(model, lambda m, x: (m(x) ** 2).mean())\n"
        "for i, idx in enumerate(mesh.batches(64, 8, epoch=0)):\n"
        "    loss, g = f(model, X[mx.array(idx)])\n"
        "    opt.update(model, mesh.allreduce(g, weight=len(idx)))\n"
        "    mx.eval(model.parameters())\n"
        "print('trained', flush=True)\n"
    )
    home = tmp_path / "home"
    out = meshtrain(home, "run", "--local", "1", "--checkpoint-every", "1000", str(script))
    assert out.returncode == 0, out.stderr
    assert "[node1] trained" in out.stdout
    assert out.stderr.strip().splitlines()[-1] == (
        "meshtrain: warning: no checkpoint was written: the job ended before its first checkpoint "
        "was due (--checkpoint-every 1000)"
    ), out.stderr
