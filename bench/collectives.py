"""Bus bandwidth of the ring's reduce-scatter and all-gather beside its all-reduce, on the same links.

One process per rank (loopback, or one network namespace per rank on a shaped LAN with --netns),
one ring per run, the three collectives interleaved within each round (all-reduce, reduce-scatter,
all-gather, then again), so drift of a shared machine hits them alike. Bus bandwidth is NCCL's:

    all-reduce      2(N-1)/N * bytes / time
    reduce-scatter   (N-1)/N * bytes / time      (bytes: the whole buffer, fp32-equivalent)
    all-gather       (N-1)/N * bytes / time

so a collective that runs at link rate shows the same busbw for all three; the all-reduce moves
twice the bytes of either half. Every call writes into buffers kept across calls (the all-reduce
through `Ring.reduce_into`, the all-gather with `out=`, the reduce-scatter's own accumulator), as
training does: on this machine the page faults of a fresh 64 MiB output cost more than the transfer.

    flock /tmp/meshtrain-bench.lock .venv/bin/python bench/collectives.py --ns 2,3,4 --sizes 4,16,64
    flock /tmp/meshtrain-bench.lock .venv/bin/python bench/collectives.py --netns --rate 1gbit --auth
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial

import numpy as np

MiB = 1 << 20
OPS = ("allreduce", "reduce_scatter", "all_gather")


def worker(args: argparse.Namespace) -> None:
    from meshtrain.ring import Ring, RingListener
    from meshtrain.security import load_keyring

    addrs = [(h, int(p)) for h, p in (a.rsplit(":", 1) for a in args.addrs.split(","))]
    keyring = load_keyring(create=False)[0] if args.auth else None
    sizes = [int(s) for s in args.sizes.split(",")]
    wire = None if args.wire == "float32" else args.wire
    times: dict[str, list[float]] = {}
    with RingListener.bind(*addrs[args.rank]) as listener:
        ring = Ring.connect(
            listener,
            args.rank,
            addrs,
            job="bench",
            generation=1,
            timeout=60.0,
            keyring=keyring,
        )
        n = ring.size
        for size in sizes:
            buf = np.random.default_rng(args.rank).standard_normal(size // 4).astype(np.float32)
            shard = buf[: buf.size // n].copy()
            out = np.empty_like(buf)  # one output buffer, reused: fresh pages fault on every call
            calls: dict[str, Callable[[], object]] = {
                "allreduce": partial(ring.reduce_into, buf, out, wire_dtype=wire or "float32"),
                "reduce_scatter": partial(ring.reduce_scatter, buf, wire_dtype=wire),
                "all_gather": partial(ring.all_gather, shard, wire_dtype=wire, out=out),
            }
            for op in OPS:  # warm-up
                calls[op]()
            for _ in range(args.rounds):
                for op in OPS:
                    for _ in range(args.iters):
                        start = time.perf_counter()
                        calls[op]()
                        times.setdefault(f"{op}:{size}", []).append(time.perf_counter() - start)
        ring.close()
    if args.rank == 0:
        print("RESULT " + json.dumps(times), flush=True)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run(n: int, args: argparse.Namespace, sizes: list[int]) -> dict[str, list[float]]:
    cluster = None
    if args.netns:
        from meshtrain.netns import Cluster

        cluster = Cluster(n, prefix="cl", rate=args.rate).up()
        base = 29000 + int(time.time() * 10) % 3000
        addrs = [(cluster.ip(i), base + i) for i in range(n)]
    else:
        addrs = [("127.0.0.1", p) for p in free_ports(n)]
    try:
        procs = []
        for rank in range(n):
            prefix = cluster.exec_prefix(rank) if cluster is not None else []
            cmd = [*prefix, sys.executable, os.path.abspath(__file__), "--worker", "--rank", str(rank)]
            cmd += ["--addrs", ",".join(f"{h}:{p}" for h, p in addrs), "--sizes", ",".join(map(str, sizes))]
            cmd += ["--iters", str(args.iters), "--rounds", str(args.rounds), "--wire", args.wire]
            cmd += ["--auth"] if args.auth else []
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=900)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"N={n}: a rank failed (exit codes {[p.returncode for p in procs]})")
    finally:
        if cluster is not None:
            cluster.down()
    line = next(ln for ln in outs[0].splitlines() if ln.startswith("RESULT "))
    result: dict[str, list[float]] = json.loads(line[7:])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--addrs", default="", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="4,16,64", help="MiB (fp32), comma separated")
    ap.add_argument("--ns", default="2,3,4", help="world sizes, comma separated")
    ap.add_argument("--iters", type=int, default=3, help="timed calls per collective per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--wire", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--auth", action="store_true", help="the ring with a mesh secret (tagged frames)")
    ap.add_argument("--netns", action="store_true", help="one host per namespace on a shaped LAN (root)")
    ap.add_argument("--rate", default="1gbit", help="link rate with --netns")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.auth:
        from meshtrain.security import Keyring, generate_secret

        os.environ["MESHTRAIN_SECRET"] = Keyring([generate_secret()]).to_text()
    sizes = [int(float(s) * MiB) for s in args.sizes.split(",")]
    link = f"namespaces, {args.rate}" if args.netns else "loopback"
    print(
        f"# ring collectives on {link}, {os.cpu_count()} cores, wire {args.wire}"
        f"{', authenticated' if args.auth else ''}; {args.rounds} rounds x {args.iters} calls; "
        "median ms | busbw MB/s",
        flush=True,
    )
    for n in [int(x) for x in args.ns.split(",")]:
        times = run(n, args, sizes)
        print(f"\nN={n}")
        print(f"{'size':>8} " + " ".join(f"{op:>22}" for op in OPS) + "   rs/ar  ag/ar")
        for size in sizes:
            bw = {}
            cells = []
            for op in OPS:
                t = statistics.median(times[f"{op}:{size}"])
                factor = 2 * (n - 1) / n if op == "allreduce" else (n - 1) / n
                bw[op] = factor * size / t / 1e6
                cells.append(f"{t * 1e3:9.2f} | {bw[op]:8.1f}")
            rs, ag = bw["reduce_scatter"] / bw["allreduce"], bw["all_gather"] / bw["allreduce"]
            ratios = f"{rs:6.2f} {ag:6.2f}"
            print(f"{size / MiB:6.0f}Mi " + " ".join(f"{c:>22}" for c in cells) + "   " + ratios, flush=True)


if __name__ == "__main__":
    main()
