"""Four `meshtrain join` hosts in network namespaces for the job tests (tests/test_jobs_*netns.py).

Each host is a namespace on one bridge (meshtrain.netns), its agent started with `join --name hostI`
and the mesh secret in the environment, every worker logging its committed steps to one shared
debug ledger (MESHTRAIN_LEDGER_DIR). The harness runs the CLI inside a host, kills a whole host
(agent, workers, and any `run` client started there) by pid, and cuts or heals a host's link.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from meshtrain import netns
from meshtrain.env import LEDGER_DIR
from meshtrain.security import Keyring, generate_secret
from meshtrain.testing.agents import worker_pids_under

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "elastic_train.py"


class Hosts:
    """N namespaced hosts with one mesh secret; `agents[i]` is host i's `meshtrain join` (or None)."""

    def __init__(
        self, cluster: netns.Cluster, root: Path, extra: dict[int, dict[str, str]] | None = None
    ) -> None:
        self.cluster, self.root = cluster, root
        self.extra = extra or {}  # more environment for host i's agent (and so its workers) and CLI
        self.secret = Keyring([generate_secret()]).to_text()
        self.ledger, self.out = root / "ledger", root / "out"
        self.ledger.mkdir(exist_ok=True)
        self.out.mkdir(exist_ok=True)
        self.agents: list[subprocess.Popen[bytes] | None] = [None] * cluster.n
        self.clients: list[subprocess.Popen[str]] = []
        self.starts = [0] * cluster.n

    def env(self, i: int) -> dict[str, str]:
        return {
            **os.environ,
            "MESHTRAIN_HOME": str(self.root / f"h{i}"),
            "MESHTRAIN_SECRET": self.secret,
            "OPENBLAS_NUM_THREADS": "1",
            LEDGER_DIR: str(self.ledger),
            **self.extra.get(i, {}),
        }

    def start(self, i: int) -> None:
        self.starts[i] += 1
        log = self.root / f"agent{i}.{self.starts[i]}.log"
        self.agents[i] = self.cluster.join(i, log, self.env(i))

    def log(self, i: int) -> str:
        return "".join((self.root / f"agent{i}.{k}.log").read_text() for k in range(1, self.starts[i] + 1))

    def cmd(self, i: int, *args: str) -> list[str]:
        return [*self.cluster.exec_prefix(i), sys.executable, "-m", "meshtrain", *args]

    def cli(self, i: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.cmd(i, *args), env=self.env(i), capture_output=True, text=True, timeout=timeout
        )

    def spawn(self, i: int, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            self.cmd(i, *args), env=self.env(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.clients.append(proc)
        return proc

    def run_job(self, i: int, *options: str, epochs: int, sleep: float = 0.05) -> subprocess.Popen[str]:
        """`meshtrain run [OPTIONS] elastic_train.py --out OUT --epochs E --step-sleep S` on host i."""
        script = ["--out", str(self.out), "--epochs", str(epochs), "--step-sleep", str(sleep)]
        return self.spawn(i, "run", *options, str(SCRIPT), *script)

    def alive(self, i: int) -> set[str]:
        out = self.cli(i, "status", "--json", timeout=30)
        if out.returncode != 0:
            return set()
        return {n["name"] for n in json.loads(out.stdout)["nodes"] if n["state"] == "alive"}

    def jobs(self, i: int) -> list[dict[str, Any]]:
        out = self.cli(i, "jobs", "--json", timeout=30)
        return list(json.loads(out.stdout)) if out.returncode == 0 else []

    def job(self, i: int, job: str) -> dict[str, Any]:
        return next((r for r in self.jobs(i) if r["job"] == job), {})

    def running(self, i: int) -> list[str]:
        return [str(r["job"]) for r in self.jobs(i) if r["state"] in ("running", "paused")]

    def worker_pids(self, i: int) -> list[int]:
        agent = self.agents[i]
        if agent is None:
            return []
        return worker_pids_under(agent.pid)

    def kill(self, i: int, *clients: subprocess.Popen[str]) -> None:
        """SIGKILL host i at once: its agent, its workers, and the given CLI clients running there."""
        agent = self.agents[i]
        pids = [*([agent.pid] if agent is not None else []), *self.worker_pids(i), *(c.pid for c in clients)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if agent is not None:
            agent.wait(10)
        self.agents[i] = None

    def steps(self, member: str) -> int:
        path = self.ledger / f"ledger-{member}.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def stop(self) -> None:
        for proc in self.clients:
            if proc.poll() is None:
                proc.kill()
        netns.stop_processes([a for a in self.agents if a is not None])


SLOW_WORKER = """
import os, time
try:
    _cmd = open("/proc/self/cmdline", "rb").read().split(b"\\0")
except OSError:
    _cmd = []
if b"meshtrain.worker" in _cmd:  # this host's workers start late (a slow disk, a cold cache)
    time.sleep(float(os.environ.get("MESHTRAIN_TEST_SLOW_WORKER_S", "30")))
"""


def slow_workers(root: Path) -> dict[str, str]:
    """Environment that delays every worker process started with it (a sitecustomize on PYTHONPATH)."""
    site = root / "slow-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SLOW_WORKER)
    return {"PYTHONPATH": str(site)}


def wait(cond: Callable[[], Any], timeout: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            raise AssertionError(what() if callable(what) else what)
        time.sleep(0.3)


@contextmanager
def hosts(
    root: Path, n: int = 4, prefix: str = "jb", extra: dict[int, dict[str, str]] | None = None
) -> Iterator[Hosts]:
    """N hosts whose agents all see each other alive."""
    with netns.Cluster(n, prefix=prefix, rate="1gbit") as cluster:
        mesh = Hosts(cluster, root, extra)
        try:
            for i in range(n):
                mesh.start(i)
            names = {f"host{i}" for i in range(n)}
            for i in range(n):
                wait(lambda i=i: mesh.alive(i) == names, 60, lambda i=i: mesh.log(i))
            yield mesh
        finally:
            mesh.stop()
