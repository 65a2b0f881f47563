"""Scaling of examples/mnist.py over a namespaced LAN: time-to-accuracy per mode, N and link; uneven nodes.

Time-to-accuracy (the default). For each link (`--links`, e.g. `1gbit` and
`100mbit/2ms`, a Wi-Fi-like link; `100mbit/2ms@35:local-sgd,bf16` also caps
each run on it at 35 s and runs only those modes there), each N (`--nodes`, default 1 2 4 8) and
each mode (`--modes`: `fp32` = per-step sync with `--wire fp32`, `bf16` =
per-step sync with the default bf16 wire, `local-sgd` = `--sync-every auto`),
this builds N network namespaces on one bridge with every link shaped
(meshtrain.netns: tc tbf rate, netem delay), runs `meshtrain join` in each,
pinned to `--cores-per-node` cores of its own, and runs `meshtrain run
examples/mnist.py --nodes N` from host 0 with the mode's flags. It reads the
job's output as it streams: time-to-accuracy is the wall time from the
script's first line (the job has started: mesh formed, data loaded) to the
first test evaluation at or above `--target` (`--evals-per-epoch`, default 8:
the script evaluates 8 times an epoch; local SGD at its first sync after each
point). The job is then cancelled (Ctrl-C semantics: every node stops),
unless `--no-stop-at-target`. A run past `--max-run-s` is cancelled too and
reported as "> LIMIT". The table gives, per (link, mode, N): samples/s,
time-to-target, speed-up against N=1 of the same mode and against the best
N=1 of any mode, efficiency (speed-up / N) and the accuracy reached.

Batch: by default the global batch is `--batch-size` for every N (strong
scaling); `--batch-per-node B` makes it B*N instead (each node keeps a local
batch of B, the DiLoCo setting), with the learning rate of the per-step modes
scaled by `--lr-scale` (local SGD's inner optimizer sees batches of B, so its
rate stays).

Heterogeneous case (`--hetero`): two nodes, host 1 slowed to `--slow-factor`
of its speed by a CPU quota (cgroup v2 `cpu.max`, else cgroup v1
`cpu.cfs_quota_us`, else half of its cores) on its agent, which its workers
inherit. It measures each node's solo throughput (`--nodes host0`, then
`--nodes host1`) and the pair's with equal and with performance-based shares
(`meshtrain run --shares=equal|perf` where the tree has that flag, else agents
started with MESHTRAIN_SHARES=equal|perf), and prints the pair's throughput
against the sum of the solos, run one at a time and both at once: the job's
average, and epochs 2 to the last (shares settle at step 4; the first epoch
also pays ring start-up and compiling), per round (`--hetero-repeats`) and
their median. Its mode defaults to local SGD with H=16 (`--hetero-mode`,
`--hetero-sync-every`): an uneven pair that meets every step waits every step.

Where namespaces or `tc` do not work (a sandboxed kernel), `--loopback` runs
the same agents on 127.0.0.1 with distinct ports: the links are then unshaped
loopback, and the output says so. Needs root and iproute2 otherwise.

    flock /tmp/meshtrain-bench.lock .venv/bin/python bench/scaling.py --nodes 1 2 --epochs 4 --target 98
    flock /tmp/meshtrain-bench.lock .venv/bin/python bench/scaling.py --hetero --epochs 1

On the 16-core device machine: `bash bench/device/tta.sh` and
`bash bench/device/hetero.sh` (see bench/device/README.md: wheels and .debs
carried in the ignored .whl folder, `pip install --target /tmp/site`,
PYTHONPATH, MESHTRAIN_BLAS to the carried OpenBLAS).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from meshtrain import netns
from meshtrain.security import Keyring, generate_secret

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
MID_EPOCH_LINE = re.compile(r"epoch ([\d.]+)/(\d+)\s+test accuracy ([\d.]+)%")  # --evals-per-epoch
EVAL_TIME = re.compile(r"evaluating so far ([\d.]+) s")
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)\s+loss ([\d.]+)\s+test accuracy ([\d.]+)%\s+([\d.]+) s")
START_LINE = re.compile(r"world size (\d+)")
THROUGHPUT_LINE = re.compile(r"throughput: ([\d,]+) samples/s")
AUTO_LINE = re.compile(r"local SGD: sync every (\d+) steps")
LIVE_RATE_LINE = re.compile(r"evaluated \(epoch (\d+)/\d+\).*\| ([\d,]+) samples/s")
SHARE_LINE = re.compile(r"\bshares?\b", re.IGNORECASE)
GOSSIP_PORT = 7946
MESH_FORM_TIMEOUT_S = 30.0
CANCEL_GRACE_S = 20.0
PREFIX = "msb"
NO_NETEM: set[str] = set()  # links whose delay could not be applied (no sch_netem in this kernel)
DEFAULT_LR = {"mlp": 1e-3, "cnn": 3e-4}  # examples/mnist.py's defaults, scaled for --batch-per-node

MODES: dict[str, list[str]] = {
    "fp32": ["--wire", "fp32"],
    "bf16": ["--wire", "bf16"],
    "local-sgd": ["--wire", "bf16", "--sync-every", "auto"],
}
MODE_NAMES = {"fp32": "per-step fp32", "bf16": "per-step bf16", "local-sgd": "local SGD auto"}


@dataclass(frozen=True)
class Link:
    """A namespace link shape: rate (tc tbf) and delay (netem); `none` = unshaped veth.

    Spelled RATE[/DELAY][@SECONDS][:MODE,MODE]: `@` caps each run on this link
    (instead of --max-run-s), `:` runs only these modes on it (instead of --modes).
    """

    rate: str | None
    delay: str | None
    limit_s: float | None = None
    modes: tuple[str, ...] | None = None

    @staticmethod
    def parse(text: str) -> Link:
        text, _, modes = text.partition(":")
        text, _, limit = text.partition("@")
        rate, _, delay = text.partition("/")
        wanted = tuple(m for m in modes.split(",") if m) or None
        unknown = [m for m in wanted or () if m not in MODES]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown mode(s) {unknown}: choose from {sorted(MODES)}")
        return Link(
            None if rate in ("", "none") else rate, delay or None, float(limit) if limit else None, wanted
        )

    def __str__(self) -> str:
        return (self.rate or "unshaped") + (f"+{self.delay}" if self.delay else "")


@dataclass
class Run:
    """One `meshtrain run`: what it printed, when, and how it ended."""

    epochs: list[tuple[int, float, float, float]] = field(default_factory=list)  # (k, acc %, s, at)
    evals: list[tuple[float, float]] = field(default_factory=list)  # every evaluation: (acc %, at)
    eval_s: list[float] = field(default_factory=list)  # per evaluation: the main's evaluating so far
    started_at: float | None = None  # the script's first line (seconds after submit)
    samples_per_s: float | None = None
    auto_h: int | None = None
    live_rates: list[float] = field(default_factory=list)  # meshtrain's live samples/s at each evaluation
    share_lines: list[str] = field(default_factory=list)  # what the live view said about shares
    stopped: str = ""  # "" finished; "target" cancelled at the target; "limit" cancelled at --max-run-s
    wall_s: float = 0.0
    limit_s: float = 0.0
    output: list[str] = field(default_factory=list)

    def time_to(self, target: float, training_only: bool = False) -> float | None:
        """Wall time to the first evaluation at target; `training_only` leaves out evaluating."""
        for i, (acc, at) in enumerate(self.evals):
            if acc >= target:
                evaluating = self.eval_s[i] if training_only and i < len(self.eval_s) else 0.0
                return at - (self.started_at or 0.0) - evaluating
        return None

    def rate(self, samples_per_epoch: int) -> float:
        """meshtrain's own training-only average, else samples over the script's epoch times."""
        if self.samples_per_s is not None:
            return self.samples_per_s
        seconds = sum(s for _, _, s, _ in self.epochs)
        return samples_per_epoch * len(self.epochs) / seconds if seconds > 0 else float("nan")


class Hosts(Protocol):
    """Where the N agents live: how to start a program on host i and how to reach it."""

    def exec_prefix(self, i: int) -> list[str]: ...

    def ip(self, i: int) -> str: ...

    def port(self, i: int) -> int: ...


class NamespaceHosts:
    """Host i is network namespace i of a meshtrain.netns cluster; every agent on the usual port."""

    def __init__(self, cluster: netns.Cluster) -> None:
        self.cluster = cluster

    def exec_prefix(self, i: int) -> list[str]:
        return self.cluster.exec_prefix(i)

    def ip(self, i: int) -> str:
        return self.cluster.ip(i)

    def port(self, i: int) -> int:
        return GOSSIP_PORT


class LoopbackHosts:
    """Every host on 127.0.0.1, told apart by its gossip port (free UDP ports picked up front)."""

    def __init__(self, n: int) -> None:
        self.ports = _free_udp_ports(n)

    def exec_prefix(self, i: int) -> list[str]:
        return []

    def ip(self, i: int) -> str:
        return "127.0.0.1"

    def port(self, i: int) -> int:
        return self.ports[i]


def _free_udp_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextmanager
def hosts_for(n: int, link: Link, args: argparse.Namespace) -> Iterator[Hosts]:
    if args.loopback:
        yield LoopbackHosts(n)
        return
    delay = None if str(link) in NO_NETEM else link.delay
    try:
        cluster = netns.Cluster(n, prefix=PREFIX, rate=link.rate, delay=delay).up()
    except subprocess.CalledProcessError:
        if not delay:
            raise
        # A kernel without sch_netem: keep the rate, drop the delay, and say so in every row.
        NO_NETEM.add(str(link))
        print(f"  !! {link}: tc netem is not available here: the link runs at {link.rate} WITHOUT the delay")
        cluster = netns.Cluster(n, prefix=PREFIX, rate=link.rate, delay=None).up()
    if delay and not cluster.delay_applied:  # netns shaped the rate only (no netem)
        NO_NETEM.add(str(link))
        print(f"  !! {link}: tc netem is not available here: the link runs at {link.rate} WITHOUT the delay")
    try:
        yield NamespaceHosts(cluster)
    finally:
        cluster.down()


def node_cores(i: int, n: int, per_node: int, available: Sequence[int]) -> list[int]:
    """Node i's cores: a block of its own when there are enough, else shared round-robin."""
    if per_node * n <= len(available):
        return list(available[per_node * i : per_node * (i + 1)])
    return sorted({available[(per_node * i + j) % len(available)] for j in range(per_node)})


# --- slowing one node down -------------------------------------------------------------------------


class CpuQuota:
    """Caps a process tree's CPU time to `fraction` of `cores` cores; children inherit it.

    cgroup v2 (`cpu.max`) where the unified hierarchy has the cpu controller,
    else cgroup v1 (`cpu.cfs_quota_us`); `method` says which, or why neither.
    """

    PERIOD_US = 10_000  # short periods: a throttled step waits 5 ms at a time, not 50

    def __init__(self, name: str, cores: int, fraction: float) -> None:
        self.quota_us = max(1000, int(self.PERIOD_US * cores * fraction))
        self.path: Path | None = None
        self.method = "none"
        for make in (self._v2, self._v1):
            try:
                if make(name):
                    return
            except OSError as exc:
                self.method = f"none ({exc.strerror or exc})"
        self.path = None

    def _v2(self, name: str) -> bool:
        root = _cgroup2_root()
        if root is None or "cpu" not in (root / "cgroup.controllers").read_text().split():
            return False
        with suppress(OSError):
            (root / "cgroup.subtree_control").write_text("+cpu")
        path = root / f"meshtrain-{name}"
        path.mkdir(exist_ok=True)
        try:
            (path / "cpu.max").write_text(f"{self.quota_us} {self.PERIOD_US}")
        except OSError:
            path.rmdir()  # the cpu controller is not delegated to children here
            raise
        self.path, self.method = path, f"cgroup v2 cpu.max {self.quota_us} {self.PERIOD_US}"
        return True

    def _v1(self, name: str) -> bool:
        root = Path("/sys/fs/cgroup/cpu")
        if not (root / "cpu.cfs_quota_us").exists():
            return False
        path = root / f"meshtrain-{name}"
        path.mkdir(exist_ok=True)
        (path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
        (path / "cpu.cfs_quota_us").write_text(str(self.quota_us))
        self.path, self.method = path, f"cgroup v1 cfs_quota {self.quota_us}/{self.PERIOD_US} us"
        return True

    @property
    def ok(self) -> bool:
        return self.path is not None

    def add(self, pid: int) -> None:
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        if self.path is None:
            return
        parent = self.path.parent
        with suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with suppress(OSError):
                    (parent / "cgroup.procs").write_text(pid)
        with suppress(OSError):
            self.path.rmdir()


def _cgroup2_root() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return Path(parts[1])
    return None


# --- agents and runs -------------------------------------------------------------------------------


def _env(home: Path, i: int, secret: str) -> dict[str, str]:
    """Host i's environment: its own agent home, and the one mesh secret every host holds."""
    return {**os.environ, "MESHTRAIN_HOME": str(home / f"h{i}"), "MESHTRAIN_SECRET": secret}


def _agent(
    hosts: Hosts,
    i: int,
    cores: list[int],
    home: Path,
    secret: str,
    threads: int | None = None,
    extra: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    env = {
        **_env(home, i, secret),
        **(extra or {}),
        # One BLAS thread per pinned core: more would only fight over them.
        "OPENBLAS_NUM_THREADS": str(threads or len(cores)),
        "OMP_NUM_THREADS": str(threads or len(cores)),
    }
    cmd = [*hosts.exec_prefix(i), sys.executable, "-m", "meshtrain", "join", "--name", f"host{i}"]
    cmd += ["--port", str(hosts.port(i)), "--host", hosts.ip(i), "--no-discovery"]
    if i:
        cmd += ["--seed", f"{hosts.ip(0)}:{hosts.port(0)}"]
    log = open(home / f"agent{i}.log", "ab")  # noqa: SIM115 - lives as long as the agent
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        # Affinity is inherited across exec, so the agent and its workers stay on these cores.
        preexec_fn=lambda: os.sched_setaffinity(0, cores),
    )


def _mesh_size(hosts: Hosts, home: Path, secret: str) -> int:
    out = subprocess.run(
        [*hosts.exec_prefix(0), sys.executable, "-m", "meshtrain", "status", "--json"],
        env=_env(home, 0, secret),
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return 0
    return sum(1 for n in json.loads(out.stdout)["nodes"] if n["state"] == "alive")


def _wait_for_mesh(hosts: Hosts, n: int, home: Path, secret: str) -> None:
    deadline = time.monotonic() + MESH_FORM_TIMEOUT_S
    while _mesh_size(hosts, home, secret) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"the {n}-node mesh did not form; see {home}/agent*.log")
        time.sleep(0.3)


def parse_epochs(text: str) -> dict[int, int]:
    """`4` (every N) or `1=4,2=4,8=8` (per N; an N not listed takes the largest N listed below it)."""
    return parse_per_n(text, int)


def parse_per_n(text: str, cast: Callable[[str], T]) -> dict[int, T]:
    """A value for every N (`4`) or per N (`1=4,2=4,8=8`)."""
    if "=" not in text:
        return {1: cast(text)}
    pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
    return dict(sorted((int(n), cast(e)) for n, e in pairs))


def epochs_for(n: int, table: dict[int, T]) -> T:
    """Table lookup: an N not listed takes the largest N listed below it."""
    below = [k for k in table if k <= n]
    return table[max(below)] if below else table[min(table)]


def script_flags(mode: str, n: int, args: argparse.Namespace) -> list[str]:
    """examples/mnist.py's flags for this mode at N nodes (same epochs and seed everywhere)."""
    flags = ["--epochs", str(epochs_for(n, args.epochs)), "--seed", str(args.seed), *MODES[mode]]
    if args.evals_per_epoch > 1:
        flags += ["--evals-per-epoch", str(args.evals_per_epoch)]
    if args.model:
        flags += ["--model", args.model]
    if args.train_limit:
        flags += ["--train-limit", str(args.train_limit)]
    if args.batch_per_node:
        flags += ["--batch-size", str(args.batch_per_node * n)]
        if mode != "local-sgd" and args.lr_scale != "none":
            base = DEFAULT_LR[args.model or "mlp"]
            scale = n if args.lr_scale == "linear" else math.sqrt(n)
            flags += ["--lr", f"{base * scale:.6g}"]
    else:
        flags += ["--batch-size", str(epochs_for(n, args.batch_size))]
    if args.lr is not None:
        flags += ["--lr", f"{epochs_for(n, args.lr):g}"]
    return flags


def run_job(
    hosts: Hosts,
    nodes: str,
    run_flags: list[str],
    flags: list[str],
    home: Path,
    secret: str,
    *,
    target: float | None,
    limit_s: float,
    echo: bool,
) -> Run:
    """`meshtrain run` from host 0, its output read line by line as it streams; cancelled at target."""
    cmd = [*hosts.exec_prefix(0), sys.executable, "-m", "meshtrain", "run", *run_flags]
    cmd += ["--nodes", nodes, "--wait", "30", str(ROOT / "examples/mnist.py"), *flags]
    print("  $ meshtrain run " + " ".join([*run_flags, "--nodes", nodes, "examples/mnist.py", *flags]))
    result = Run(limit_s=limit_s)
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        env={**_env(home, 0, secret), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
    )

    def cancel(why: str) -> None:
        if proc.poll() is None and not result.stopped:
            result.stopped = why
            proc.send_signal(signal.SIGINT)  # meshtrain run: first Ctrl-C cancels the job on every node
            killer = threading.Timer(CANCEL_GRACE_S, _kill_if_running, args=(proc,))
            killer.daemon = True
            killer.start()

    watchdog = threading.Timer(limit_s, cancel, args=("limit",))
    watchdog.daemon = True
    watchdog.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.monotonic() - start
        result.output.append(line)
        if echo:
            print("    " + line.rstrip(), flush=True)
        if result.started_at is None and START_LINE.search(line):
            result.started_at = now
        if (m := EPOCH_LINE.search(line)) is not None:
            result.epochs.append((int(m[1]), float(m[4]), float(m[5]), now))
            result.evals.append((float(m[4]), now))
        elif (m := MID_EPOCH_LINE.search(line)) is not None:
            result.evals.append((float(m[3]), now))
        if (m := EVAL_TIME.search(line)) is not None:
            result.eval_s.append(float(m[1]))
        reached = result.evals and result.evals[-1][1] == now and result.evals[-1][0] >= (target or 101.0)
        if reached:
            cancel("target")
        if (m := THROUGHPUT_LINE.search(line)) is not None:
            result.samples_per_s = float(m[1].replace(",", ""))
        if (m := AUTO_LINE.search(line)) is not None:
            result.auto_h = int(m[1])
        if (m := LIVE_RATE_LINE.search(line)) is not None:
            result.live_rates.append(float(m[2].replace(",", "")))
        if SHARE_LINE.search(line) and not line.lstrip().startswith("$"):
            result.share_lines.append(line.rstrip())
    proc.wait()
    watchdog.cancel()
    result.wall_s = time.monotonic() - start
    if proc.returncode != 0 and not result.stopped:
        tail = "".join(result.output[-30:])
        raise SystemExit(f"`meshtrain run --nodes {nodes}` failed ({proc.returncode}):\n{tail}")
    return result


def _kill_if_running(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()


@contextmanager
def mesh(
    n: int,
    link: Link,
    args: argparse.Namespace,
    quota: CpuQuota | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[Hosts, Path, str]]:
    """N agents up and seeing each other; torn down (agents, namespaces, cgroup) however it ends."""
    home = Path(tempfile.mkdtemp(prefix=f"meshtrain-scaling-{n}-"))
    secret = Keyring([generate_secret()]).to_text()
    agents: list[subprocess.Popen[bytes]] = []
    with hosts_for(n, link, args) as hosts:
        try:
            for i in range(n):
                cores = node_cores(i, n, args.cores_per_node, args.available_cores)
                threads = None
                if quota is not None and i == 1 and not quota.ok:
                    cores = cores[: max(1, len(cores) // 2)]  # no cgroup here: half the cores instead
                    threads = len(cores)
                agents.append(_agent(hosts, i, cores, home, secret, threads, env))
                if quota is not None and i == 1:
                    quota.add(agents[-1].pid)
            _wait_for_mesh(hosts, n, home, secret)
            yield hosts, home, secret
        finally:
            netns.stop_processes(agents)
            if quota is not None:
                quota.remove()
    shutil.rmtree(home, ignore_errors=True)


# --- time-to-accuracy ------------------------------------------------------------------------------


@dataclass
class Cell:
    link: str
    mode: str
    nodes: int
    run: Run
    note: str = ""


def time_to_accuracy(args: argparse.Namespace, cells: list[Cell]) -> None:
    """Run every (link, N, mode) cell, appending each to `cells` as it finishes."""
    samples = args.train_limit or 60000
    n1_runs: dict[str, tuple[Run, str]] = {}  # N=1 moves no bytes: one run per mode serves every link
    for link in args.links:
        for n in args.nodes:
            modes = [m for m in (link.modes or args.modes) if n > 1 or m in args.n1_modes]
            if n == 1 and all(_n1_key(m) in n1_runs for m in modes):
                for mode in modes:
                    run, where = n1_runs[_n1_key(mode)]
                    cells.append(Cell(str(link), mode, n, run, f"N=1 moves no bytes: the run {where}"))
                continue
            try:
                _run_cells(n, link, modes, args, cells, n1_runs, samples)
            except (subprocess.CalledProcessError, SystemExit) as exc:  # one broken cell set, not the table
                print(f"  !! [{link}] N={n} failed: {exc}", flush=True)


def _run_cells(
    n: int,
    link: Link,
    modes: list[str],
    args: argparse.Namespace,
    cells: list[Cell],
    n1_runs: dict[str, tuple[Run, str]],
    samples: int,
) -> None:
    """One (link, N): the mesh up once, every mode's run on it in turn."""
    with mesh(n, link, args) as (hosts, home, secret):
        for mode in modes:
            if n == 1 and _n1_key(mode) in n1_runs:
                run, where = n1_runs[_n1_key(mode)]
                cells.append(Cell(str(link), mode, n, run, f"N=1 moves no bytes: the run {where}"))
                continue
            print(f"[{link}] N={n} {MODE_NAMES[mode]}", flush=True)
            r = run_job(
                hosts,
                str(n),
                [],
                script_flags(mode, n, args),
                home,
                secret,
                target=args.target if args.stop_at_target else None,
                limit_s=link.limit_s or args.max_run_s,
                echo=args.verbose,
            )
            if n == 1:
                n1_runs[_n1_key(mode)] = (r, f"of {MODE_NAMES[mode]} on {link}")
            note = f"H={r.auto_h}" if r.auto_h else ""
            if str(link) in NO_NETEM:
                note = (note + "; " if note else "") + "NO delay (no netem)"
            cells.append(Cell(str(link), mode, n, r, note))
            tta = r.time_to(args.target)
            accs = ", ".join(f"{acc:.2f}%@{at - (r.started_at or 0):.1f}s" for acc, at in r.evals)
            print(
                f"  -> {r.rate(samples):,.0f} samples/s, to {args.target}%: "
                f"{_seconds(tta, r)}; evaluations: {accs}; wall {r.wall_s:.1f}s"
                + (f"; H={r.auto_h}" if r.auto_h else ""),
                flush=True,
            )


def _n1_key(mode: str) -> str:
    """At N=1 nothing crosses a wire: the two per-step modes are one and the same run."""
    return "per-step" if mode in ("fp32", "bf16") else mode


def _seconds(value: float | None, run: Run) -> str:
    if value is not None:
        return f"{value:.1f}s"
    if run.stopped == "limit":
        return f">{run.limit_s - (run.started_at or 0):.0f}s"
    return "not reached"


def print_tta_table(cells: list[Cell], args: argparse.Namespace) -> None:
    samples = args.train_limit or 60000
    print(
        f"\ntime to {args.target}% test accuracy, from the job's first line to the first evaluation"
        f" at or above it ({args.evals_per_epoch} evaluation(s) per epoch); `training`: the same less the"
        " main worker's evaluation time (the others wait for it), and its speed-up against the best N=1"
    )
    header = (
        f"{'link':<14} {'mode':<15} {'N':>2} {'samples/s':>10} {'t->target':>10} {'vs N=1 same':>12}"
        f" {'eff':>5} {'vs best N=1':>12} {'eff':>5} {'accuracy':>9} {'training':>9} {'vs best':>8}  note"
    )
    print(header)
    for link in dict.fromkeys(c.link for c in cells):
        here = [c for c in cells if c.link == link]
        base_same = {c.mode: c.run.time_to(args.target) for c in here if c.nodes == 1}
        n1 = [t for t in base_same.values() if t is not None]
        best_n1 = min(n1) if n1 else None
        n1_train = [t for c in here if c.nodes == 1 and (t := c.run.time_to(args.target, True)) is not None]
        best_n1_train = min(n1_train) if n1_train else None
        for c in here:
            tta = c.run.time_to(args.target)
            same = base_same.get(c.mode)
            s_same = same / tta if same and tta else None
            s_best = best_n1 / tta if best_n1 and tta else None
            acc = max((a for a, _ in c.run.evals), default=float("nan"))  # the best evaluation
            train = c.run.time_to(args.target, training_only=True)
            s_train = best_n1_train / train if best_n1_train and train else None
            print(
                f"{link:<14} {MODE_NAMES[c.mode]:<15} {c.nodes:>2} {c.run.rate(samples):>10,.0f}"
                f" {_seconds(tta, c.run):>10} {_ratio(s_same):>12} {_eff(s_same, c.nodes):>5}"
                f" {_ratio(s_best):>12} {_eff(s_best, c.nodes):>5} {acc:>8.2f}%"
                f" {_seconds(train, c.run):>9} {_ratio(s_train):>8}  {c.note}"
            )


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _eff(speedup: float | None, n: int) -> str:
    return "-" if speedup is None else f"{speedup / n:.0%}"


# --- heterogeneous nodes ---------------------------------------------------------------------------


def shares_flag_supported() -> bool:
    """Does this tree's `meshtrain run` know `--shares`? (The mesh rewrite adds it.)"""
    out = subprocess.run(
        [sys.executable, "-m", "meshtrain", "run", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    return "--shares" in out.stdout


def heterogeneous(args: argparse.Namespace) -> None:
    """Two nodes, host1 slowed: each alone, both at once (separate jobs), and together with equal and
    with performance shares; every pair figure against the sum of the solos."""
    link = args.links[0]
    k = args.cores_per_node
    probe_quota = CpuQuota("msb-probe", k, args.slow_factor)
    how = probe_quota.method if probe_quota.ok else f"{probe_quota.method}: half of its cores instead"
    probe_quota.remove()
    samples = args.train_limit or 60000
    flags = script_flags(args.hetero_mode, 2, args)
    mode = MODE_NAMES[args.hetero_mode]
    if "--sync-every" in flags and args.hetero_sync_every:
        flags[flags.index("--sync-every") + 1] = args.hetero_sync_every
        mode = f"local SGD H={args.hetero_sync_every}"
    if "--evals-per-epoch" in flags:  # throughput: evaluate at epoch ends only (main evaluates, others wait)
        del flags[flags.index("--evals-per-epoch") : flags.index("--evals-per-epoch") + 2]
    supported = shares_flag_supported()
    print(
        f"heterogeneous: 2 nodes, {k} core(s) each, host1 slowed to {args.slow_factor:g} of its speed"
        f" by {how}; link {link}; mode {mode}; examples/mnist.py {' '.join(flags)};"
        f" shares chosen by {'meshtrain run --shares' if supported else 'the agents MESHTRAIN_SHARES'};"
        f" {args.hetero_repeats} round(s)",
        flush=True,
    )
    # label -> one (job average, last epoch) pair per round
    rates: dict[str, list[tuple[float, float]]] = {}

    def one(hosts: Hosts, home: Path, secret: str, label: str, nodes: str, run_flags: list[str]) -> list[str]:
        r = run_job(
            hosts,
            nodes,
            run_flags,
            flags,
            home,
            secret,
            target=None,
            limit_s=args.max_run_s,
            echo=args.verbose,
        )
        # Per epoch: samples over the time between two epoch lines (the script prints its own epoch
        # time to 0.1 s only); the first epoch from its own time. After the first epoch the shares
        # have settled: those epochs together are the settled rate (several seconds: less noise).
        seconds = [r.epochs[0][2]] if r.epochs else []
        seconds += [b[3] - a[3] for a, b in zip(r.epochs, r.epochs[1:], strict=False)]
        settled = samples * len(seconds[1:]) / sum(seconds[1:]) if seconds[1:] else float("nan")
        rates.setdefault(label, []).append((r.rate(samples), settled))
        acc = r.epochs[-1][1] if r.epochs else float("nan")
        epochs = ", ".join(f"{samples / secs:,.0f}" for secs in seconds)
        sync = f"; {r.auto_h} steps between syncs" if r.auto_h and "auto" in flags else ""
        out = [
            f"  -> {label}: {r.rate(samples):,.0f} samples/s job average; per epoch: {epochs};"
            f" accuracy {acc:.2f}%{sync}"
        ]
        return out + [f"     live view: {line.strip()}" for line in r.share_lines[-4:]]

    def both_alone(hosts: Hosts, home: Path, secret: str) -> None:
        """host0's and host1's solo jobs at the same time: every core busy, as in the pair."""
        outs: dict[str, list[str]] = {}

        def alone(label: str, node: str) -> None:
            outs[label] = one(hosts, home, secret, label, node, [])

        jobs = (("solo host0, both at once", "host0"), ("solo host1, both at once", "host1"))
        threads = [threading.Thread(target=alone, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for label in sorted(outs):
            print("\n".join(outs[label]), flush=True)

    sessions = [("equal", "perf")] if supported else [("equal",), ("perf",)]
    for round_ in range(args.hetero_repeats):
        for session in sessions:
            env = {} if supported else {"MESHTRAIN_SHARES": session[0]}
            quota = CpuQuota("msb-slow", k, args.slow_factor)
            with mesh(2, link, args, quota, env) as (hosts, home, secret):
                if "equal" in session:
                    print(f"round {round_ + 1}", flush=True)
                    print("\n".join(one(hosts, home, secret, "solo host0", "host0", [])), flush=True)
                    print("\n".join(one(hosts, home, secret, "solo host1", "host1", [])), flush=True)
                    both_alone(hosts, home, secret)
                for shares in session:
                    how_shares = [f"--shares={shares}"] if supported else []
                    label = f"pair, shares {shares}"
                    print("\n".join(one(hosts, home, secret, label, "2", how_shares)), flush=True)
    _hetero_summary(rates)


def _hetero_summary(rates: dict[str, list[tuple[float, float]]]) -> None:
    """Each pair against the sum of the solos, per round and as the median over rounds."""
    rounds = len(rates["solo host0"])
    for i, what in ((0, "job average"), (1, "epochs 2 to the last (shares settled)")):
        print(f"\n{what}, samples/s (rounds: {rounds}; median):")
        for baseline, suffix in (("one at a time", ""), ("both at once", ", both at once")):
            sums = [
                a[i] + b[i]
                for a, b in zip(rates["solo host0" + suffix], rates["solo host1" + suffix], strict=True)
            ]
            fast = [a[i] for a in rates["solo host0" + suffix]]
            slow = [b[i] for b in rates["solo host1" + suffix]]
            print(
                f"  solos {baseline}: host0 {_runs(fast)}, host1 (slowed) {_runs(slow)}"
                f" ({statistics.median(slow) / statistics.median(fast):.2f}x); sum {_runs(sums)}"
            )
            for shares in ("equal", "perf"):
                pair = [p[i] for p in rates[f"pair, shares {shares}"]]
                ratios = [p / s for p, s in zip(pair, sums, strict=True)]
                print(
                    f"    pair, shares {shares}: {_runs(pair)} = "
                    + ", ".join(f"{r:.0%}" for r in ratios)
                    + f" of the sum (median {statistics.median(ratios):.0%})"
                )


def _runs(values: list[float]) -> str:
    text = ", ".join(f"{v:,.0f}" for v in values)
    return text if len(values) == 1 else f"{text} (median {statistics.median(values):,.0f})"


# --- main ------------------------------------------------------------------------------------------


def _describe_setup(args: argparse.Namespace) -> str:
    available = args.available_cores
    k = args.cores_per_node
    if args.loopback:
        links = "UNSHAPED LOOPBACK links (127.0.0.1, no namespaces, no tc): not a LAN"
    else:
        links = "links " + ", ".join(str(link) for link in args.links) + " (tc tbf rate / netem delay)"
    shared = [n for n in args.nodes if k * n > len(available)]
    block = "core i" if k == 1 else f"cores {k}i..{k}i+{k - 1}"
    pinning = f"each node pinned to {k} core(s) of its own (node i: {block})"
    if shared:
        pinning += f"; at N={','.join(map(str, shared))} there are too few cores and nodes share them"
    batch = (
        f"global batch {args.batch_per_node}*N (lr scale {args.lr_scale} for per-step modes)"
        if args.batch_per_node
        else f"global batch {_epochs_text(args.batch_size)}"
    )
    return (
        f"examples/mnist.py --model {args.model or 'default'}, --epochs {_epochs_text(args.epochs)},"
        f" {batch}, peak lr {_epochs_text(args.lr) if args.lr else 'the default'}, "
        f"{args.train_limit or 60000} training samples, seed {args.seed}; {links}; "
        f"{len(available)} CPU cores here (os.cpu_count {os.cpu_count()}); {pinning}; "
        f"BLAS {os.environ.get('MESHTRAIN_BLAS') or os.environ.get('LD_PRELOAD') or 'default'}"
    )


def _epochs_text(table: dict[int, T]) -> str:
    return str(table[1]) if list(table) == [1] else ",".join(f"N={n}:{e}" for n, e in table.items())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--links", nargs="+", default=None, help="link shapes RATE[/DELAY] or none, e.g. 1gbit 100mbit/2ms"
    )
    parser.add_argument("--rate", default=None, help="one link's rate (older spelling of --links RATE)")
    parser.add_argument("--delay", default=None, help="with --rate: its delay, e.g. 2ms")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["fp32", "bf16", "local-sgd"])
    parser.add_argument(
        "--n1-modes",
        nargs="+",
        choices=sorted(MODES),
        default=None,
        help="modes run at N=1 (default: --modes)",
    )
    parser.add_argument(
        "--loopback", action="store_true", help="no namespaces: agents on 127.0.0.1 (unshaped links)"
    )
    parser.add_argument("--cores-per-node", type=int, default=None, help="default: 2 where there are enough")
    parser.add_argument("--model", choices=("mlp", "cnn"), default=None, help="examples/mnist.py --model")
    parser.add_argument(
        "--epochs",
        type=parse_epochs,
        default=parse_epochs("4"),
        help="the script's --epochs (its LR schedule length): E, or per N as 1=4,8=8",
    )
    parser.add_argument(
        "--batch-size", type=lambda t: parse_per_n(t, int), default={1: 128}, help="global batch: B or per N"
    )
    parser.add_argument(
        "--lr", type=lambda t: parse_per_n(t, float), default=None, help="the script's --lr: LR or per N"
    )
    parser.add_argument("--batch-per-node", type=int, default=None, help="global batch = this * N instead")
    parser.add_argument("--lr-scale", choices=("none", "sqrt", "linear"), default="sqrt")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=98.0, help="test accuracy (%%) for time-to-accuracy")
    parser.add_argument("--no-stop-at-target", dest="stop_at_target", action="store_false")
    parser.add_argument("--evals-per-epoch", type=int, default=8, help="evaluations per epoch (resolution)")
    parser.add_argument("--max-run-s", type=float, default=300.0, help="cancel a run after this many seconds")
    parser.add_argument("--hetero", action="store_true", help="the heterogeneous 2-node case instead")
    parser.add_argument("--slow-factor", type=float, default=0.5, help="--hetero: host1's CPU quota fraction")
    parser.add_argument(  # local SGD: an uneven pair meets only every H steps, so the sync is amortised
        "--hetero-mode", choices=sorted(MODES), default="local-sgd"
    )
    parser.add_argument("--hetero-repeats", type=int, default=1, help="--hetero: rounds of the five runs")
    parser.add_argument(
        "--hetero-sync-every",
        default="16",
        help="--hetero with --hetero-mode local-sgd: the script's --sync-every (H or auto; default 16)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="echo every line of every job")
    args = parser.parse_args(argv)
    if args.links is None:
        args.links = [f"{args.rate}/{args.delay}" if args.delay else args.rate] if args.rate else ["1gbit"]
    args.links = [Link.parse(text) for text in args.links]
    args.n1_modes = args.n1_modes or args.modes
    args.available_cores = (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )
    if args.hetero:
        args.nodes = [2]
    if args.cores_per_node is None:
        args.cores_per_node = 2 if 2 * max(args.nodes) <= len(args.available_cores) else 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.loopback and not netns.available():
        print("scaling.py needs root and iproute2 (network namespaces), or --loopback", file=sys.stderr)
        return 2
    print(_describe_setup(args), flush=True)
    if args.hetero:
        heterogeneous(args)
        return 0
    cells: list[Cell] = []
    try:
        time_to_accuracy(args, cells)
    except KeyboardInterrupt:  # `timeout -s INT`: still print what was measured
        print("\ninterrupted: the table has the cells measured so far", flush=True)
    print_tta_table(cells, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
