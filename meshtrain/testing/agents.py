"""Real agents for tests and benches: `meshtrain join` processes with their own state homes.

One harness instead of a copy per test file: start an agent on loopback (its gossip port read
from its first line, its join token from the second), ask it for `status --json`, wait for a
condition, stop it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from meshtrain import env as env_names

__all__ = ["AgentProcess", "alive_names", "cli", "meshtrain_cmd", "wait_for"]


def meshtrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshtrain", *args]


def cli(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, env_names.HOME: str(home)}
    return subprocess.run(meshtrain_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout)


class AgentProcess:
    """`meshtrain join` in the background with its own state directory."""

    def __init__(
        self,
        home: Path,
        name: str,
        seed: int | None = None,
        python: str | None = None,
        token: str | None = None,
    ) -> None:
        self.home, self.name = home, name
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, env_names.HOME: str(home)}
        args = [
            "join",
            "--name",
            name,
            "--profile",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-discovery",
        ]
        if seed is not None:
            args += ["--seed", f"127.0.0.1:{seed}"]
        if token is not None:
            args += ["--token", token]
        cmd = [sys.executable, "-c", python] if python else meshtrain_cmd(*args)
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert "gossip port" in first, first
        self.port = int(first.split("gossip port ")[1].split(")")[0])
        self.token: str | None = None
        if not python:
            hint = self.proc.stdout.readline()  # the exact command another machine runs to join
            assert "meshtrain join --token " in hint, hint
            self.token = hint.split("--token ")[1].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def alive_names(home: Path) -> set[str]:
    out = cli(home, "status", "--json")
    assert out.returncode == 0, out.stderr
    return {n["name"] for n in json.loads(out.stdout)["nodes"] if n["state"] == "alive"}


def wait_for(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def worker_pids_under(pid: int) -> list[int]:
    """The meshtrain workers among a process's descendants (an agent's). A child that has just
    exited -- gone, or a zombie not yet reaped -- is none: it is no longer a worker."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if "meshtrain.worker" in " ".join(child.cmdline()):
                found.append(child.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # ZombieProcess is a NoSuchProcess
            continue
    return found
