"""Communication modes compared: per-step fp32 wire, per-step bf16 wire, local SGD (DiLoCo).

For each world size N (`--sizes`, default 1,2) and each mode this runs
`meshtrain run --local N examples/mnist.py --model M --epochs E ...` with the
mode's flags, and reads back what meshtrain prints: the job's throughput
(samples/s, meshtrain's own average over the training time) and the final
test accuracy. It prints the machine, every command, a table, and two ratios
per row: samples/s against per-step fp32 at the same N, and against per-step
fp32 at N = 1.

Run it under the shared benchmark lock, e.g.:

    flock /tmp/meshtrain-bench.lock .venv/bin/python bench/modes.py --epochs 2

`--local N` nodes share this machine's cores, so on a small machine more
nodes mean less compute each; the ratios say what the modes cost or save
here, not what N machines would do over a real link (bench/scaling.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THROUGHPUT = re.compile(r"throughput: ([\d,]+) samples/s")
ACCURACY = re.compile(r"final test accuracy: ([\d.]+)%")
AUTO_LINE = re.compile(r"local SGD: sync every (\d+) steps \(auto\), compute[^\n]*")


def modes(sync_every: str) -> dict[str, list[str]]:
    """Mode name -> the example's flags."""
    return {
        "per-step fp32": ["--wire", "fp32"],
        "per-step bf16": ["--wire", "bf16"],
        f"local SGD H={sync_every}": ["--wire", "bf16", "--sync-every", sync_every],
    }


def run_one(n: int, flags: list[str], args: argparse.Namespace) -> tuple[float, float, str, float]:
    """(samples/s, final accuracy %, note, wall seconds) of one `meshtrain run`."""
    cmd = [sys.executable, "-m", "meshtrain", "run", "--local", str(n), "examples/mnist.py"]
    cmd += ["--model", args.model, "--epochs", str(args.epochs), "--seed", str(args.seed), *flags]
    if args.train_limit:
        cmd += ["--train-limit", str(args.train_limit)]
    print("$ " + " ".join(cmd[1:]), flush=True)
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    rate = THROUGHPUT.findall(out.stdout)
    acc = ACCURACY.findall(out.stdout)
    if not rate or not acc:
        raise SystemExit(f"no throughput/accuracy line in:\n{out.stdout[-2000:]}")
    auto = AUTO_LINE.search(out.stdout)
    return float(rate[-1].replace(",", "")), float(acc[-1]), auto.group(0) if auto else "", wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,2", help="world sizes, comma-separated")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-limit", type=int, default=None, help="default: all 60,000 samples")
    parser.add_argument("--sync-every", default="4", help="H for the local SGD mode (or auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell, interleaved; median samples/s")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}",
        flush=True,
    )
    print(
        f"workload: examples/mnist.py --model {args.model}, {args.epochs} epochs, "
        f"{args.train_limit or 'all'} training samples, global batch 128, seed {args.seed}; "
        f"--local N nodes on this one machine (loopback ring)",
        flush=True,
    )
    runs: dict[tuple[int, str], list[tuple[float, float, str, float]]] = {}
    for _ in range(args.repeats):  # interleaved, so a noisy neighbour hits every mode alike
        for n in sizes:
            for name, flags in modes(args.sync_every).items():
                result = run_one(n, flags, args)
                runs.setdefault((n, name), []).append(result)
                print(f"  -> {result[0]:,.0f} samples/s, {result[1]:.2f}% {result[2]}", flush=True)
    rows: list[tuple[int, str, float, float, str, float]] = []
    for (n, name), results in runs.items():
        rates = sorted(r[0] for r in results)
        median = (
            rates[len(rates) // 2]
            if len(rates) % 2
            else (rates[len(rates) // 2 - 1] + rates[len(rates) // 2]) / 2
        )
        rows.append((n, name, median, results[-1][1], results[-1][2], sum(r[3] for r in results)))

    base = {n: rate for n, name, rate, *_ in rows if name == "per-step fp32"}
    print()
    header = f"{'N':>2}  {'mode':<18} {'samples/s':>10} {'accuracy':>9}"
    print(f"median of {args.repeats} run(s) per cell; accuracy of the last run")
    print(f"{header} {'vs fp32 same N':>15} {'vs fp32 N=1':>12}")
    for n, name, rate, acc, note, _ in rows:
        vs_same = rate / base[n] if base.get(n) else float("nan")
        vs_one = rate / base[1] if base.get(1) else float("nan")
        print(f"{n:>2}  {name:<18} {rate:>10,.0f} {acc:>8.2f}% {vs_same:>14.2f}x {vs_one:>11.2f}x  {note}")


if __name__ == "__main__":
    main()
