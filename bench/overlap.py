"""Overlapping the all-reduce with the backward pass: what does it gain here?

    python bench/overlap.py --model mlp [--steps 60] [--buckets 4]
    python bench/overlap.py --model gpt --size small --batch 8 --cores-per-rank 2   # the transformer

Two ranks (processes) on a loopback ring run examples/mnist.py's model on MNIST batches
of 128 per rank, or examples/shakespeare.py's GPT on random char-level windows (`--batch`
windows of its block size per rank), and time one training step three ways:

- sequential, compiled: evaluate every gradient (mx.compile'd loss-and-grad), then one
  all-reduce of the fused tree (what meshtrain does);
- sequential, eager: the same without mx.compile (the fair baseline for the next one);
- bucketed, eager: MLX is lazy, so the gradients are evaluated one bucket at a time, last
  layer first (the order backprop produces them); each bucket goes to a sender thread that
  all-reduces it while the main thread evaluates the next bucket.

The variants alternate step by step; the figure per variant is the median step time. Both ranks
share this machine's cores, so the overlap can only win what the ring's own CPU time leaves free.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import multiprocessing as mp
import os
import queue
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mnist_example import load_example  # noqa: E402


def load_gpt_example():  # type: ignore[no-untyped-def]
    """examples/shakespeare.py as a module (its GPT, loss and compiled step functions)."""
    spec = importlib.util.spec_from_file_location("shakespeare_example", ROOT / "examples" / "shakespeare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def bucketed(grads: Any, buckets: int) -> list[list[tuple[str, Any]]]:
    """Leaves in reverse order (last layer first), cut into `buckets` groups of similar size."""
    from mlx.utils import tree_flatten

    leaves = list(reversed(tree_flatten(grads)))
    total = sum(v.size for _, v in leaves)
    out: list[list[tuple[str, Any]]] = [[]]
    size = 0
    for key, leaf in leaves:
        if size >= total / buckets * len(out) and len(out) < buckets:
            out.append([])
        out[-1].append((key, leaf))
        size += leaf.size
    return out


def rank_main(rank: int, port_q: Any, ports: Any, args: argparse.Namespace, results: Any) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_unflatten

    from meshtrain.ring import Ring, RingListener

    if args.cores_per_rank:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cores[rank * args.cores_per_rank : (rank + 1) * args.cores_per_rank] or cores)
    batch = args.batch if args.model == "gpt" else 128
    if args.model == "gpt":
        ex = load_gpt_example()
        config = dataclasses.replace(ex.SIZES[args.size], vocab_size=65)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 65, size=(4096 + config.block_size + 1,), dtype=np.int32)
        starts = np.arange(4096 - batch)
        x_all = mx.array(np.stack([tokens[s : s + config.block_size] for s in starts[:512]]))
        y_all = mx.array(np.stack([tokens[s + 1 : s + config.block_size + 1] for s in starts[:512]]))
        mx.random.seed(0)
        model = ex.GPT(config)
        opt = optim.AdamW(learning_rate=1e-4)
        compiled, apply_c = ex.train_functions(model, opt, compile=True)
        value_and_grad = nn.value_and_grad(model, ex.loss_fn)
        pool = 512
    else:
        from meshtrain.datasets import mnist

        ex = load_example()
        images, labels = mnist("train")
        x_all, y_all = ex.prepare(images[:4096], args.model), mx.array(labels[:4096].astype(np.int32))
        mx.random.seed(0)
        model = ex.MODELS[args.model]()
        opt = optim.Adam(learning_rate=1e-4)
        compiled, apply_c = ex.train_functions(model, opt, compile=True)
        value_and_grad = nn.value_and_grad(model, ex.loss_fn)
        pool = 4096
    if rank == 0:
        from mlx.utils import tree_flatten

        results.put({"params": sum(v.size for _, v in tree_flatten(model.parameters()))})
    listener = RingListener.bind("127.0.0.1")
    port_q.put((rank, listener.port))
    addrs = [("127.0.0.1", p) for p in ports.get()]
    ring = Ring.connect(listener, rank=rank, addrs=addrs, job="overlap", generation=0, timeout=30)

    jobs: queue.Queue[tuple[int, np.ndarray] | None] = queue.Queue()
    done: queue.Queue[tuple[int, np.ndarray]] = queue.Queue()

    def sender() -> None:
        while (item := jobs.get()) is not None:
            i, buf = item
            done.put((i, ring.allreduce(buf, step=i, wire_dtype="bfloat16")))

    threading.Thread(target=sender, daemon=True).start()

    def step(variant: str, s: int) -> float:
        lo = (s * batch * 2 + rank * batch) % (pool - batch)
        x, y = x_all[lo : lo + batch], y_all[lo : lo + batch]
        t0 = time.perf_counter()
        if variant == "seq-compiled":
            _, grads = compiled(x, y)
            mx.eval(grads)
            grads = ring.allreduce_tree(grads, step=s, wire_dtype="bfloat16")
        else:
            _, grads = value_and_grad(model, x, y)
            if variant == "seq-eager":
                mx.eval(grads)
                grads = ring.allreduce_tree(grads, step=s, wire_dtype="bfloat16")
            else:
                groups = bucketed(grads, args.buckets)
                for i, group in enumerate(groups):
                    mx.eval([v for _, v in group])
                    flat = np.concatenate([np.asarray(v).reshape(-1) for _, v in group]).astype(np.float32)
                    jobs.put((i, flat))
                reduced: dict[int, np.ndarray] = dict(done.get() for _ in groups)
                pairs = []
                for i, group in enumerate(groups):
                    off = 0
                    for key, v in group:
                        pairs.append((key, mx.array(reduced[i][off : off + v.size].reshape(v.shape))))
                        off += v.size
                grads = tree_unflatten(pairs)
        mx.eval(grads)
        return time.perf_counter() - t0

    variants = ["seq-compiled", "seq-eager", "bucketed"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for s in range(args.steps + 5):
        order = variants if s % 2 == 0 else variants[::-1]
        for v in order:
            t = step(v, s)
            if s >= 5:
                times[v].append(t)
    jobs.put(None)
    ring.close()
    if rank == 0:
        results.put({v: statistics.median(t) * 1e3 for v, t in times.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["mlp", "cnn", "gpt"], default="mlp")
    parser.add_argument("--size", choices=["tiny", "small", "base"], default="tiny", help="the GPT's size")
    parser.add_argument("--batch", type=int, default=8, help="GPT windows per rank a step")
    parser.add_argument("--cores-per-rank", type=int, default=0, help="pin each rank to this many cores")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--buckets", type=int, default=4)
    args = parser.parse_args()
    from meshtrain import blas

    blas.ensure_fast_blas()  # may re-exec this process with OpenBLAS preloaded; the ranks inherit it
    ctx = mp.get_context("spawn")
    port_q, results = ctx.Queue(), ctx.Queue()
    port_lists = [ctx.Queue(), ctx.Queue()]
    procs = [ctx.Process(target=rank_main, args=(r, port_q, port_lists[r], args, results)) for r in range(2)]
    for p in procs:
        p.start()
    ports = dict(port_q.get(timeout=120) for _ in range(2))
    for q in port_lists:
        q.put([ports[0], ports[1]])
    params = results.get(timeout=300)["params"]
    med = results.get(timeout=1800)
    for p in procs:
        p.join(60)
    what = f"gpt {args.size}, {args.batch} windows" if args.model == "gpt" else f"{args.model}, 128 samples"
    pinned = f"{args.cores_per_rank} cores a rank" if args.cores_per_rank else "unpinned"
    print(
        f"{what} per rank, {params / 1e6:.2f}M parameters, 2 ranks on a loopback ring ({pinned},"
        f" {os.cpu_count()} cores here), bf16 wire, {args.buckets} buckets, {args.steps} timed steps each"
    )
    for v, ms in med.items():
        print(f"  {v:<13} {ms:7.2f} ms/step")
    print(f"bucketed vs sequential eager: {med['seq-eager'] / med['bucketed']:.2f}x faster")
    print(f"bucketed vs sequential compiled: {med['seq-compiled'] / med['bucketed']:.2f}x faster")


if __name__ == "__main__":
    main()
