"""Peak memory per worker and tokens/s of sharded training (stages 1, 2, 3) against unsharded (stage 0).

Each cell is a real job, `meshtrain run --local N --shares equal bench/sharded.py --worker ...`: a
GPT-style transformer (pre-norm blocks, learned positions, tied nothing) trained on random tokens
with AdamW, float32 parameters and state. Every worker reports

- MLX's peak memory (`mx.get_peak_memory()`: parameters, gradients, optimizer state, activations,
  the all-gathered parameters; not numpy's ring buffers),
- the process's peak resident set (`ru_maxrss`: everything, the ring buffers and the interpreter too),
- tokens/s of the whole mesh over the timed steps (after one warm-up step),

and the table prints the largest of each over the workers, with the ratio to stage 0 at the same N.
Training state in fp32 AdamW is 16 B a parameter (parameters 4, gradients 4, moments 8).

    flock /tmp/meshtrain-bench.lock .venv/bin/python bench/sharded.py --ns 1,2,4 --dim 512 --layers 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


CGROUP_PREFIX = "meshtrain-cap-"


def _memory_cgroup() -> Path:
    """This process's memory cgroup directory: cgroup v2 where it has the memory controller, else v1."""
    root = Path("/sys/fs/cgroup")
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v2 = root / "cgroup.controllers"
    if v2.exists() and "memory" in v2.read_text().split():
        return root  # v2: the root cgroup may hold processes and children alike
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return root / "memory" / path.lstrip("/")
    raise SystemExit("bench/sharded.py --cap-mb: no memory cgroup here (cgroup v1 or v2 with memory)")


def confine(cap_bytes: int) -> Path:
    """Move this process into a cgroup of its own capped at `cap_bytes` (as root): v2 memory.max with
    no swap, else v1 memory.limit_in_bytes (and memsw: no swap either). Over the cap the kernel's
    out-of-memory killer ends the process, as it would on a machine that small."""
    base = _memory_cgroup()
    group = base / f"{CGROUP_PREFIX}{os.getpid()}"
    try:
        if (base / "cgroup.subtree_control").exists():  # v2
            if "memory" not in (base / "cgroup.subtree_control").read_text().split():
                (base / "cgroup.subtree_control").write_text("+memory")
            group.mkdir(exist_ok=True)
            (group / "memory.max").write_text(str(cap_bytes))
            if (group / "memory.swap.max").exists():
                (group / "memory.swap.max").write_text("0")
        else:
            group.mkdir(exist_ok=True)
            (group / "memory.limit_in_bytes").write_text(str(cap_bytes))
            if (group / "memory.memsw.limit_in_bytes").exists():
                (group / "memory.memsw.limit_in_bytes").write_text(str(cap_bytes))
        (group / "cgroup.procs").write_text(str(os.getpid()))
    except OSError as exc:
        raise SystemExit(f"bench/sharded.py --cap-mb: no memory cgroup under {base}: {exc}") from None
    return group


def remove_cgroups() -> None:
    """The capped workers' cgroups, once their processes are gone (empty ones only)."""
    try:
        base = _memory_cgroup()
    except (SystemExit, OSError):
        return
    for group in base.glob(f"{CGROUP_PREFIX}*"):
        with contextlib.suppress(OSError):
            group.rmdir()


def worker(args: argparse.Namespace) -> None:
    if args.cap_mb:
        confine(args.cap_mb << 20)
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten

    import meshtrain

    class Block(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = nn.MultiHeadAttention(dim, max(1, dim // 64))
            self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
            h = self.n1(x)
            x = x + self.attn(h, h, h, mask)
            return x + self.down(nn.gelu(self.up(self.n2(x))))

    class GPT(nn.Module):
        def __init__(self, vocab: int, dim: int, layers: int, seq: int) -> None:
            super().__init__()
            self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
            self.blocks = [Block(dim) for _ in range(layers)]
            self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

        def __call__(self, x: mx.array) -> mx.array:
            mask = nn.MultiHeadAttention.create_additive_causal_mask(x.shape[1])
            h = self.embed(x) + self.pos(mx.arange(x.shape[1]))
            for b in self.blocks:
                h = b(h, mask)
            return self.head(self.norm(h))

    mesh = meshtrain.init()
    mx.random.seed(0)
    model = GPT(args.vocab, args.dim, args.layers, args.seq)
    if args.stage < 3:  # stage 3 drops the layers' arrays a node does not own before MLX ever builds them
        mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))  # type: ignore[str-unpack,union-attr]
    optimizer = optim.AdamW(learning_rate=1e-4)
    if args.stage == 3:
        prefetch = not args.no_prefetch
        sharded = mesh.shard(
            model, optimizer, stage=3, wire_dtype=args.wire, layers=model.blocks, prefetch=prefetch
        )
    elif args.stage:
        sharded = mesh.shard(model, optimizer, stage=args.stage, wire_dtype=args.wire)
    else:
        mesh.register(model, optimizer)
    tokens = np.random.default_rng(0).integers(
        0, args.vocab, size=(args.batch * (args.steps + 1), args.seq + 1)
    )

    def loss_fn(m: GPT, x: mx.array, y: mx.array) -> mx.array:
        return nn.losses.cross_entropy(m(x), y).mean()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    started, timed_tokens, step = 0.0, 0, 0
    for idx in mesh.batches(len(tokens), args.batch, epoch=0):
        batch = mx.array(tokens[idx])
        loss, grads = loss_and_grad(model, batch[:, :-1], batch[:, 1:])
        if args.stage:
            sharded.update(model, grads, weight=len(idx))
            mx.eval(loss, model.parameters(), sharded.state)
        else:
            grads = mesh.allreduce(grads, weight=len(idx), wire_dtype=args.wire)
            optimizer.update(model, grads)
            mx.eval(loss, model.parameters(), optimizer.state)
        del grads
        step += 1
        if step == 1:
            started = time.perf_counter()
        else:
            timed_tokens += len(idx) * args.seq
        if step > args.steps:
            break
    seconds = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "rank": mesh.rank,
        "size": mesh.size,
        "params": n_params,
        "mlx_peak": mx.get_peak_memory(),
        "rss_peak": rss,
        "tokens": timed_tokens,
        "seconds": seconds,
        "shard": sharded.plan.sizes[mesh.rank] if args.stage else n_params,
    }
    Path(args.out, f"r{mesh.rank}.json").write_text(json.dumps(result))


def run_cell(
    args: argparse.Namespace, n: int, stage: int, home: str, prefetch: bool = True, replicas: int = 1
) -> list[dict]:
    out = tempfile.mkdtemp(prefix=f"sharded-n{n}-s{stage}-")
    cmd = [sys.executable, "-m", "meshtrain", "run"]
    cmd += ["--local", str(n), "--shares", "equal", "--shard-replicas", str(replicas)] if n > 1 else []
    cmd += [str(Path(__file__).resolve()), "--worker", "--stage", str(stage), "--out", out]
    cmd += [] if prefetch else ["--no-prefetch"]
    for key in ("dim", "layers", "seq", "vocab", "batch", "steps", "wire", "cap_mb"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if n == 1:  # plainly: world size 1, no agent
        cmd = [sys.executable, *cmd[4:]]
    env = {**os.environ, "MESHTRAIN_HOME": home}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    remove_cgroups()
    if proc.returncode != 0 and args.cap_mb:  # under a cap a failure is a result: its one line
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        return [{"failed": last}]
    if proc.returncode != 0:
        raise SystemExit(f"N={n} stage {stage} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("r*.json"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--no-prefetch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ns", default="1,2,4", help="world sizes, comma separated")
    ap.add_argument(
        "--stages",
        default="0,1,2,3",
        help="3n: stage 3 without prefetch; 1r: stage 1 with --shard-replicas 2 (the others: 1)",
    )
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up)")
    ap.add_argument("--wire", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--cap-mb",
        type=int,
        default=0,
        help="each worker in a memory cgroup of this many MiB (root; cgroup v2 memory.max or v1): "
        "a cell over it is printed as its job's failure line",
    )
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    home = tempfile.mkdtemp(prefix="sharded-home-")
    print(
        f"# sharded training: GPT dim {args.dim} x {args.layers} layers, vocab {args.vocab}, seq {args.seq}, "
        f"global batch {args.batch}, AdamW fp32, wire {args.wire}, {os.cpu_count()} cores; "
        + (f"each worker capped at {args.cap_mb} MiB (memory cgroup); " if args.cap_mb else "")
        + "per worker: max over workers",
        flush=True,
    )
    print(
        f"{'N':>2} {'stage':>5} {'params':>8} {'shard':>8} {'MLX peak MB':>12} {'ratio':>6} "
        f"{'RSS peak MB':>12} {'ratio':>6} {'tokens/s':>9} {'ratio':>6}"
    )
    for n in [int(x) for x in args.ns.split(",")]:
        base: dict[str, float] = {}
        for label in args.stages.split(","):
            stage = int(label.rstrip("nr"))
            if n == 1 and stage:
                continue  # nothing to shard at world size 1
            copies = 2 if label.endswith("r") else 1
            rows = run_cell(args, n, stage, home, prefetch=not label.endswith("n"), replicas=copies)
            if "failed" in rows[0]:
                cap = f"under a {args.cap_mb} MiB cap per worker"
                print(f"{n:>2} {label:>5} {cap}: {rows[0]['failed']}", flush=True)
                continue
            mlx_peak = max(r["mlx_peak"] for r in rows)
            rss = max(r["rss_peak"] for r in rows)
            tps = sum(r["tokens"] for r in rows) / max(r["seconds"] for r in rows)
            if stage == 0:
                base = {"mlx": mlx_peak, "rss": rss, "tps": tps}
            shard = max(r["shard"] for r in rows)
            ratios = [
                v / base[k] if base else float("nan")
                for k, v in (("mlx", mlx_peak), ("rss", rss), ("tps", tps))
            ]
            print(
                f"{n:>2} {label:>5} {rows[0]['params'] / 1e6:7.1f}M {shard / 1e6:7.1f}M "
                f"{mlx_peak / 2**20:12.0f} {ratios[0]:6.2f} {rss / 2**20:12.0f} {ratios[1]:6.2f} "
                f"{tps:9.0f} {ratios[2]:6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
