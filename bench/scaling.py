"""Scaling of examples/mnist.py over a namespaced LAN: throughput and time-to-accuracy at N nodes.

For each N (default 1, 2, 4) this builds N network namespaces on one bridge
with every link shaped to `--rate` (meshtrain.netns), runs `meshtrain join`
in each (pinned to its own core with taskset, round-robin when there are
fewer cores than nodes), then `meshtrain run examples/mnist.py --nodes N`
from host 0, with the same global batch and epochs for every N. It prints
samples/s (training only: the job's own average, from the workers' step
reports, as `meshtrain run` prints it), seconds to reach `--target` test
accuracy (the script's epoch times summed, evaluation included), speed-up and
efficiency against N = 1. Needs root and iproute2.

    flock /tmp/meshtrain-bench.lock .venv/bin/python bench/scaling.py --nodes 1 2 4 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from meshtrain import netns

ROOT = Path(__file__).resolve().parent.parent
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)\s+loss ([\d.]+)\s+test accuracy ([\d.]+)%\s+([\d.]+) s")
THROUGHPUT_LINE = re.compile(r"throughput: ([\d,]+) samples/s")
GOSSIP_PORT = 7946


@dataclass
class Result:
    nodes: int
    samples_per_s: float
    time_to_target_s: float | None
    final_accuracy: float
    wall_s: float


def _agent(cluster: netns.Cluster, i: int, home: Path, cores: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "MESHTRAIN_HOME": str(home / f"h{i}"),
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [*cluster.exec_prefix(i)]
    if shutil.which("taskset"):
        cmd += ["taskset", "-c", str(i % cores)]
    cmd += [
        sys.executable,
        "-m",
        "meshtrain",
        "join",
        "--name",
        f"host{i}",
        "--port",
        str(GOSSIP_PORT),
        "--host",
        cluster.ip(i),
        "--no-discovery",
    ]
    if i:
        cmd += ["--seed", f"{cluster.ip(0)}:{GOSSIP_PORT}"]
    log = open(home / f"agent{i}.log", "wb")  # noqa: SIM115 - lives as long as the agent
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _mesh_size(cluster: netns.Cluster, home: Path) -> int:
    env = {**os.environ, "MESHTRAIN_HOME": str(home / "h0")}
    out = subprocess.run(
        [*cluster.exec_prefix(0), sys.executable, "-m", "meshtrain", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return 0
    return sum(1 for n in json.loads(out.stdout)["nodes"] if n["state"] == "alive")


def run_once(n: int, args: argparse.Namespace, cores: int) -> Result:
    home = Path(tempfile.mkdtemp(prefix=f"meshtrain-scaling-{n}-"))
    agents: list[subprocess.Popen[bytes]] = []
    rate = None if args.rate == "none" else args.rate
    with netns.Cluster(n, prefix="msb", rate=rate) as cluster:
        try:
            for i in range(n):
                agents.append(_agent(cluster, i, home, cores))
            deadline = time.monotonic() + 30
            while _mesh_size(cluster, home) < n:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the {n}-node mesh did not form; see {home}/agent*.log")
                time.sleep(0.3)
            env = {**os.environ, "MESHTRAIN_HOME": str(home / "h0")}
            cmd = [
                *cluster.exec_prefix(0),
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
                raise SystemExit(
                    f"N={n}: run failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
                )
        finally:
            for proc in agents:
                proc.terminate()
            for proc in agents:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    epochs = [(int(m[1]), float(m[4]), float(m[5])) for m in EPOCH_LINE.finditer(out.stdout)]
    if len(epochs) != args.epochs:
        raise SystemExit(f"N={n}: expected {args.epochs} epoch lines in:\n{out.stdout[-2000:]}")
    rate = THROUGHPUT_LINE.search(out.stdout)
    if rate is None:
        raise SystemExit(f"N={n}: no throughput line in:\n{out.stdout[-2000:]}")
    elapsed, to_target = 0.0, None
    for _, acc, secs in epochs:
        elapsed += secs
        if to_target is None and acc >= args.target:
            to_target = elapsed
    shutil.rmtree(home, ignore_errors=True)
    return Result(n, float(rate[1].replace(",", "")), to_target, epochs[-1][1], wall)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rate", default="1gbit", help="every host's link rate (tc tbf); none: unshaped")
    parser.add_argument("--model", choices=("mlp", "cnn"), default=None, help="examples/mnist.py --model")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, the same for every N")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--target", type=float, default=95.0, help="test accuracy (%%) for time-to-accuracy")
    args = parser.parse_args()
    if not netns.available():
        print("scaling.py needs root and iproute2 (network namespaces)", file=sys.stderr)
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    print(
        f"examples/mnist.py --model {args.model or 'default'}, {args.epochs} epochs, "
        f"global batch {args.batch_size}, "
        f"{args.train_limit or 60000} training samples; links {args.rate} (tc tbf) between namespaces; "
        f"{cores} CPU cores here, each node pinned to core (i mod {cores})"
        + ("" if max(args.nodes) <= cores else ": with more nodes than cores, nodes share cores"),
        flush=True,
    )
    results = []
    for n in args.nodes:
        r = run_once(n, args, cores)
        results.append(r)
        print(
            f"  N={n}: {r.samples_per_s:8.0f} samples/s, final accuracy {r.final_accuracy:.2f}%, "
            f"time to {args.target}%: {_seconds(r.time_to_target_s)},"
            f" run wall {r.wall_s:.1f} s",
            flush=True,
        )
    base = results[0]
    print(
        f"\n{'N':>3} {'samples/s':>10} {'speed-up':>9} {'efficiency':>10} {f't->{args.target}%':>10}"
        f" {'accuracy':>9}"
    )
    for r in results:
        speedup = r.samples_per_s / base.samples_per_s
        tta = _seconds(r.time_to_target_s)
        print(
            f"{r.nodes:>3} {r.samples_per_s:>10.0f} {speedup:>8.2f}x {speedup / r.nodes * base.nodes:>9.0%}"
            f" {tta:>10} {r.final_accuracy:>8.2f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
