"""Scaling of examples/mnist.py over a namespaced LAN: throughput and time-to-accuracy at N nodes.

For each N (default 1, 2, 4) this builds N network namespaces on one bridge
with every link shaped to `--rate` (meshtrain.netns), runs `meshtrain join`
in each, pinned to its own `--cores-per-node` cores (node i gets cores
k*i .. k*i+k-1 when the machine has k*N of them; otherwise nodes share cores
round-robin, and the header says so), then `meshtrain run examples/mnist.py
--nodes N` from host 0, with the same global batch and epochs for every N. It
prints samples/s (training only: the job's own average, from the workers'
step reports, as `meshtrain run` prints it), seconds to reach `--target` test
accuracy (the script's epoch times summed, evaluation included), speed-up and
efficiency against the first N. Needs root and iproute2.

Where namespaces or `tc` do not work (a sandboxed kernel), `--loopback` runs
the same agents on 127.0.0.1 with distinct ports: the links are then unshaped
loopback, and the output says so.

    flock /tmp/meshtrain-bench.lock .venv/bin/python bench/scaling.py --nodes 1 2 4 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from meshtrain import netns
from meshtrain.security import Keyring, generate_secret

ROOT = Path(__file__).resolve().parent.parent
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)\s+loss ([\d.]+)\s+test accuracy ([\d.]+)%\s+([\d.]+) s")
THROUGHPUT_LINE = re.compile(r"throughput: ([\d,]+) samples/s")
GOSSIP_PORT = 7946
MESH_FORM_TIMEOUT_S = 30.0


@dataclass
class Result:
    nodes: int
    samples_per_s: float
    time_to_target_s: float | None
    final_accuracy: float
    wall_s: float
    epochs: list[tuple[float, float]]  # (test accuracy %, seconds) per epoch, as the script printed them


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
def hosts_for(n: int, args: argparse.Namespace) -> Iterator[Hosts]:
    if args.loopback:
        yield LoopbackHosts(n)
        return
    rate = None if args.rate == "none" else args.rate
    with netns.Cluster(n, prefix="msb", rate=rate, delay=args.delay) as cluster:
        yield NamespaceHosts(cluster)


def node_cores(i: int, n: int, per_node: int, available: Sequence[int]) -> list[int]:
    """Node i's cores: a block of its own when there are enough, else shared round-robin."""
    if per_node * n <= len(available):
        return list(available[per_node * i : per_node * (i + 1)])
    return sorted({available[(per_node * i + j) % len(available)] for j in range(per_node)})


def _env(home: Path, i: int, secret: str) -> dict[str, str]:
    """Host i's environment: its own agent home, and the one mesh secret every host holds."""
    return {**os.environ, "MESHTRAIN_HOME": str(home / f"h{i}"), "MESHTRAIN_SECRET": secret}


def _agent(
    hosts: Hosts, i: int, n: int, home: Path, secret: str, args: argparse.Namespace
) -> subprocess.Popen[bytes]:
    cores = node_cores(i, n, args.cores_per_node, args.available_cores)
    env = {
        **_env(home, i, secret),
        # One BLAS thread per pinned core: more would only fight over them.
        "OPENBLAS_NUM_THREADS": str(len(cores)),
        "OMP_NUM_THREADS": str(len(cores)),
    }
    cmd = [
        *hosts.exec_prefix(i),
        sys.executable,
        "-m",
        "meshtrain",
        "join",
        "--name",
        f"host{i}",
        "--port",
        str(hosts.port(i)),
        "--host",
        hosts.ip(i),
        "--no-discovery",
    ]
    if i:
        cmd += ["--seed", f"{hosts.ip(0)}:{hosts.port(0)}"]
    log = open(home / f"agent{i}.log", "wb")  # noqa: SIM115 - lives as long as the agent
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
    env = _env(home, 0, secret)
    out = subprocess.run(
        [*hosts.exec_prefix(0), sys.executable, "-m", "meshtrain", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return 0
    return sum(1 for n in json.loads(out.stdout)["nodes"] if n["state"] == "alive")


def _run_job(hosts: Hosts, n: int, home: Path, secret: str, args: argparse.Namespace) -> tuple[str, float]:
    env = _env(home, 0, secret)
    cmd = [
        *hosts.exec_prefix(0),
        sys.executable,
        "-m",
        "meshtrain",
        "run",
        str(ROOT / "examples/mnist.py"),
        "--nodes",
        str(n),
        "--wait",
        "30",
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
    ]
    if args.model:
        cmd += ["--model", args.model]
    if args.train_limit:
        cmd += ["--train-limit", str(args.train_limit)]
    start = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    if out.returncode != 0:
        raise SystemExit(f"N={n}: run failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout, wall


def run_once(n: int, args: argparse.Namespace) -> Result:
    home = Path(tempfile.mkdtemp(prefix=f"meshtrain-scaling-{n}-"))
    agents: list[subprocess.Popen[bytes]] = []
    secret = Keyring([generate_secret()]).to_text()
    with hosts_for(n, args) as hosts:
        try:
            for i in range(n):
                agents.append(_agent(hosts, i, n, home, secret, args))
            deadline = time.monotonic() + MESH_FORM_TIMEOUT_S
            while _mesh_size(hosts, home, secret) < n:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the {n}-node mesh did not form; see {home}/agent*.log")
                time.sleep(0.3)
            stdout, wall = _run_job(hosts, n, home, secret, args)
        finally:
            netns.stop_processes(agents)
    epochs = [(int(m[1]), float(m[4]), float(m[5])) for m in EPOCH_LINE.finditer(stdout)]
    if len(epochs) != args.epochs:
        raise SystemExit(f"N={n}: expected {args.epochs} epoch lines in:\n{stdout[-2000:]}")
    rate = THROUGHPUT_LINE.search(stdout)
    if rate is not None:
        samples_per_s = float(rate[1].replace(",", ""))
    else:
        # `meshtrain run` prints no average for a job that trained under half a second.
        trained = (args.train_limit or 60000) * args.epochs
        samples_per_s = trained / max(sum(secs for _, _, secs in epochs), 1e-9)
        print(f"  N={n}: job too short for meshtrain's own average: samples/s from epoch times", flush=True)
    elapsed, to_target = 0.0, None
    for _, acc, secs in epochs:
        elapsed += secs
        if to_target is None and acc >= args.target:
            to_target = elapsed
    shutil.rmtree(home, ignore_errors=True)
    per_epoch = [(acc, secs) for _, acc, secs in epochs]
    return Result(n, samples_per_s, to_target, epochs[-1][1], wall, per_epoch)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _describe_setup(args: argparse.Namespace) -> str:
    available = args.available_cores
    k = args.cores_per_node
    if args.loopback:
        links = "UNSHAPED LOOPBACK links (127.0.0.1, no namespaces, no tc): not a LAN"
    else:
        shaped = "unshaped veth" if args.rate == "none" else f"{args.rate} (tc tbf)"
        links = f"links {shaped}" + (f" + {args.delay} delay (tc netem)" if args.delay else "")
        links += " between namespaces"
    shared = [n for n in args.nodes if k * n > len(available)]
    block = "core i" if k == 1 else f"cores {k}i..{k}i+{k - 1}"
    pinning = f"each node pinned to {k} core(s) of its own (node i: {block})"
    if shared:
        pinning += f"; at N={','.join(map(str, shared))} there are too few cores and nodes share them"
    return (
        f"examples/mnist.py --model {args.model or 'default'}, {args.epochs} epochs, "
        f"global batch {args.batch_size}, {args.train_limit or 60000} training samples; {links}; "
        f"{len(available)} CPU cores here; {pinning}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rate", default="1gbit", help="every host's link rate (tc tbf); none: unshaped")
    parser.add_argument("--delay", default=None, help="every host's link delay (tc netem), e.g. 2ms")
    parser.add_argument(
        "--loopback", action="store_true", help="no namespaces: agents on 127.0.0.1 (unshaped links)"
    )
    parser.add_argument("--cores-per-node", type=int, default=None, help="default: 2 where there are enough")
    parser.add_argument("--model", choices=("mlp", "cnn"), default=None, help="examples/mnist.py --model")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, the same for every N")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--target", type=float, default=95.0, help="test accuracy (%%) for time-to-accuracy")
    args = parser.parse_args()
    if not args.loopback and not netns.available():
        print("scaling.py needs root and iproute2 (network namespaces), or --loopback", file=sys.stderr)
        return 2
    args.available_cores = (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )
    if args.cores_per_node is None:
        args.cores_per_node = 2 if 2 * max(args.nodes) <= len(args.available_cores) else 1
    print(_describe_setup(args), flush=True)
    results = []
    for n in args.nodes:
        r = run_once(n, args)
        results.append(r)
        print(
            f"  N={n}: {r.samples_per_s:8.0f} samples/s, final accuracy {r.final_accuracy:.2f}%, "
            f"time to {args.target}%: {_seconds(r.time_to_target_s)},"
            f" run wall {r.wall_s:.1f} s; epochs: "
            + ", ".join(f"{acc:.2f}% in {secs:.1f}s" for acc, secs in r.epochs),
            flush=True,
        )
    base = results[0]
    print(
        f"\n{'N':>3} {'samples/s':>10} {'speed-up':>9} {'efficiency':>10} {f't->{args.target}%':>10}"
        f" {'tta speed-up':>12} {'accuracy':>9}"
    )
    for r in results:
        speedup = r.samples_per_s / base.samples_per_s
        tta = _seconds(r.time_to_target_s)
        tta_speedup = (
            f"{base.time_to_target_s / r.time_to_target_s:.2f}x"
            if base.time_to_target_s and r.time_to_target_s
            else "-"
        )
        print(
            f"{r.nodes:>3} {r.samples_per_s:>10.0f} {speedup:>8.2f}x {speedup / r.nodes * base.nodes:>9.0%}"
            f" {tta:>10} {tta_speedup:>12} {r.final_accuracy:>8.2f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
