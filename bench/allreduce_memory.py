"""What an all-reduce of a model's gradients costs in memory, per worker (issue 16, defect 22).

Two worker processes on loopback form a meshtrain Ring and all-reduce an MLX tree of P float32
parameters (a transformer-shaped tree of many leaves) with each wire codec. Each worker reports
the peak of numpy's allocations during the call (tracemalloc traces numpy buffers: the fused
input, the result, the wire buffer) and MLX's peak above what it held before (the result's one
copy into MLX), for the first call and for a later one (buffers reused).

    python bench/allreduce_memory.py --params 20000000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker(rank: int, addrs: list[tuple[str, int]], params: int, wires: list[str], q: mp.Queue) -> None:
    import mlx.core as mx

    from meshtrain.ring import Ring, RingListener

    leaves = 64
    mx.random.seed(rank)
    tree = {"blocks": [{"w": mx.random.normal((params // leaves,))} for _ in range(leaves)]}
    mx.eval(tree)
    with RingListener.bind(*addrs[rank]) as listener:
        ring = Ring.connect(listener, rank, addrs, job="mem", generation=1, timeout=60.0)
        rows = []
        for wire in wires:
            for call in ("first", "later"):
                base_mx = mx.get_active_memory()
                mx.reset_peak_memory()
                tracemalloc.start()
                out = ring.allreduce_tree(tree, wire_dtype=wire)
                mx.eval(out)
                _, peak_np = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                peak_mx = mx.get_peak_memory() - base_mx
                rows.append((wire, call, peak_np / params, peak_mx / params))
                del out
            ring._buffers.clear()  # the next codec starts cold, as a first call does
        ring.close()
    q.put((rank, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=8_000_000)
    args = parser.parse_args()
    wires = ["float32", "bfloat16"]
    addrs = [("127.0.0.1", free_port()) for _ in range(2)]
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, addrs, args.params, wires, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    print(f"all-reduce of an MLX tree of {args.params:,} float32 parameters (64 leaves), 2 workers, loopback")
    print(f"bytes per parameter beyond the caller's gradients, worker 0 (grads are {4} B/param)")
    print(f"{'wire':<10} {'call':<6} {'numpy peak':>11} {'MLX peak':>9} {'total':>6}")
    for wire, call, np_b, mx_b in results[0]:
        print(f"{wire:<10} {call:<6} {np_b:>11.2f} {mx_b:>9.2f} {np_b + mx_b:>6.2f}")


if __name__ == "__main__":
    main()
