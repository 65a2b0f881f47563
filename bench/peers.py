"""meshtrain side by side with its peers on a GPT: MLX's own ring backend, PyTorch DDP (gloo), and local SGD.

The same model (examples/shakespeare.py's GPT, `--size tiny|small|base`, char
tokens), the same global batch (`--batch-size` windows of the size's context,
split evenly or by meshtrain's shares), the same seed, initial weights, data
order, AdamW schedule and global-norm clipping, the same cores per node (each
node's processes pinned to `--cores-per-node` cores of their own, OpenBLAS /
OpenMP / torch threads set to that many) and the same links: for each link
(`--links`: `loopback`, or a tc-shaped rate such as `10gbit 1gbit 100mbit`
between network namespaces; meshtrain.netns, no delay where the kernel has no
netem) and each N (`--nodes`), every mode trains `--steps` steps, and each
(link, N) runs its modes in interleaved rounds (`--rounds`):

  meshtrain-bf16, meshtrain-fp32  per-step data parallel: `meshtrain run --nodes N` of this file
                                  on real `meshtrain join` agents (one per namespace, or on
                                  127.0.0.1 for loopback), `mesh.allreduce` with that wire dtype
  mlx-fp32, mlx-bf16              the same loop on `mx.distributed`'s ring backend (MLX_RANK /
                                  MLX_HOSTFILE, one process per node): `nn.average_gradients`, or
                                  its bfloat16 variant (cast, all_sum, cast back: what newer
                                  MLX's communication_type does)
  ddp-fp32, ddp-bf16              bench/peers_torch.py: the PyTorch port under
                                  DistributedDataParallel with gloo on the CPU (bf16:
                                  DDP's bf16_compress_hook); needs torch (`--torch-path`)
  local-sgd                       meshtrain's OuterOptimizer (DiLoCo), `--sync-every` H, bf16 wire
  local-sgd-int8, local-sgd-int4  the same, its deltas compressed (int8 / 4-bit, error feedback)
  local-sgd-overlap, local-sgd-int4-overlap
                                  the same, each sync run in the background over the next
                                  `--overlap` steps (OuterOptimizer(overlap=); default H/2)
  meshtrain-s2, meshtrain-s3      ZeRO (issue 19): the meshtrain worker with `mesh.shard(model,
                                  optimizer, stage=2|3, wire_dtype="float32", max_grad_norm=--clip)`
                                  instead of mesh.register + allreduce; stage 3 shards the
                                  parameters over the GPT's blocks (`layers=model.blocks`: each
                                  block gathered in its forward and again in its backward, its
                                  gradient reduce-scattered there). Stage 3 runs the forward and
                                  backward eagerly (its collectives cannot sit inside mx.compile),
                                  stage 2 compiled like the others; the clip + update phase holds the
                                  sharded update (stage 2: its reduce-scatter and all-gather)

It prints, per run and then as tables: tokens/s and the median step time
(the first `--warmup-steps` steps left out: compiling, ring start), the
efficiency against N x one node, bytes sent per node per token (tx bytes of
each namespace's interface over the timed steps; on loopback the ring's
2(N-1)/N x gradient bytes, computed, marked ~), the validation loss after the
same tokens, and the ratio meshtrain / best peer in each (link, N) cell, per
wire dtype and overall; with `--ceiling`, also meshtrain's best over the
free-network ceiling (N x one node at the local batch G/N, nothing on a wire:
bench/tta_bound.py's argument). It says what ran where and the machine's load.

    flock /tmp/meshtrain-bench.lock .venv/bin/python bench/peers.py --torch-path /tmp/peers-torch \\
        --nodes 1 2 --links loopback 1gbit 100mbit --steps 40

Needs root and iproute2 for anything but `--links loopback`. On the 16-core
device machine: `bash bench/device/peers.sh`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
PREFIX = "mpr"  # this bench's namespaces (scaling.py's are "msb"): both can exist at once
PEER_PORT = 29600
RESULT = re.compile(r"RESULT (\{.*\})")
MODES = (
    "meshtrain-bf16",
    "meshtrain-fp32",
    "mlx-fp32",
    "mlx-bf16",
    "ddp-fp32",
    "ddp-bf16",
    "local-sgd",
    "local-sgd-int8",
    "local-sgd-int4",
    "local-sgd-overlap",
    "local-sgd-int4-overlap",
    "meshtrain-s2",
    "meshtrain-s3",
)
FAMILY = {  # a mode's framework, and at N=1 (nothing on a wire) the one run that stands for it
    "meshtrain-bf16": "meshtrain",
    "meshtrain-fp32": "meshtrain",
    "meshtrain-s2": "meshtrain",
    "meshtrain-s3": "meshtrain",
    "local-sgd": "meshtrain",
    "local-sgd-int8": "meshtrain",
    "local-sgd-int4": "meshtrain",
    "local-sgd-overlap": "meshtrain",
    "local-sgd-int4-overlap": "meshtrain",
    "mlx-fp32": "mlx",
    "mlx-bf16": "mlx",
    "ddp-fp32": "ddp",
    "ddp-bf16": "ddp",
}
WIRE_BYTES = {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.5}
STAGES = {"meshtrain-s2": 2, "meshtrain-s3": 3}  # the ZeRO modes' shard stage (fp32 wire)


def local_sgd_mode(mode: str) -> tuple[str | None, bool]:
    """A local-sgd mode's (compression or None, whether its syncs run in the background)."""
    parts = mode.split("-")[2:]
    return next((p for p in parts if p in ("int8", "int4")), None), "overlap" in parts


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --- the training loop every mode shares ----------------------------------------------------------


def tx_bytes(prefix: str | None) -> int:
    """Bytes this network namespace's interfaces named `prefix*` have sent (0 without a prefix)."""
    if not prefix:
        return 0
    total = 0
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, _, fields = line.partition(":")
        if name.strip().startswith(prefix):
            total += int(fields.split()[8])
    return total


def loop(
    args: argparse.Namespace,
    step: Callable[[np.ndarray, int], float],
    batches: Iterator[np.ndarray],
    rank: int,
) -> dict[str, Any]:
    """`args.steps` steps of `step(local indices, i)`: times, local batch sizes, tx bytes (timed ones)."""
    times, locals_, losses = [], [], []
    sent = 0
    began = 0.0
    for i, idx in enumerate(batches):
        if i >= args.steps:
            break
        if i == args.warmup_steps:
            sent, began = tx_bytes(args.iface_prefix), time.perf_counter()
        t0 = time.perf_counter()
        losses.append(step(np.asarray(idx), i))  # returns a float: the step is done
        times.append(time.perf_counter() - t0)
        locals_.append(len(idx))
    elapsed = time.perf_counter() - began
    timed = times[args.warmup_steps :]
    return {
        "rank": rank,
        "timed_steps": len(timed),
        "elapsed_s": elapsed,
        "step_ms": [t * 1e3 for t in times],
        "tx_bytes": tx_bytes(args.iface_prefix) - sent,
        "local_batches": locals_,
        "loss": losses[-1] if losses else None,
    }


def global_batches(n_windows: int, batch: int, seed: int, rank: int, size: int) -> Iterator[np.ndarray]:
    """meshtrain.Mesh.batches' order (a permutation per (seed, epoch)), split evenly: what the peers use."""
    epoch = 0
    while True:
        perm = np.random.default_rng([seed, epoch]).permutation(n_windows)
        for start in range(0, n_windows, batch):
            yield np.array_split(perm[start : start + batch], size)[rank]
        epoch += 1


@dataclasses.dataclass
class Setup:
    """What every worker builds alike from the same arguments."""

    lm: ModuleType  # examples/shakespeare.py
    config: Any
    train: np.ndarray
    val: np.ndarray
    n_windows: int
    offset: int
    lr: float


def setup(args: argparse.Namespace) -> Setup:
    root = Path(args.root)
    lm = load_module(root / "examples" / "shakespeare.py", "peers_shakespeare")
    train = np.load(Path(args.tokens) / "train.npy", mmap_mode="r")
    val = np.load(Path(args.tokens) / "val.npy")
    vocab = int(Path(args.tokens, "vocab").read_text())
    base = lm.SIZES[args.size]
    config = dataclasses.replace(base, vocab_size=vocab, block_size=args.block_size or base.block_size)
    block = config.block_size
    offset = int(np.random.default_rng([args.seed, 0, 1]).integers(block))
    return Setup(
        lm, config, train, val, (len(train) - block) // block - 1, offset, args.lr or lm.DEFAULT_LR[args.size]
    )


def mlx_model(args: argparse.Namespace, s: Setup, evaluate: bool = True) -> tuple[Any, Any]:
    """The GPT and its optimizer; `evaluate=False` leaves the weights lazy (stage 3 drops the blocks'
    arrays a node does not own before MLX builds them: the same values, never whole on a node)."""
    import mlx.core as mx

    mx.random.seed(args.seed)  # the same initial weights on every worker, in every mode
    model = s.lm.GPT(s.config)
    if evaluate:
        mx.eval(model.parameters())
    optimizer = s.lm.make_optimizer(s.lr, args.steps, args.lr_warmup, args.weight_decay)
    return model, optimizer


def mlx_step(
    args: argparse.Namespace,
    s: Setup,
    model: Any,
    optimizer: Any,
    reduce: Callable[[Any, int], Any] | None,
    comm_s: list[float],
) -> Callable[[np.ndarray, int], float]:
    """One MLX step: loss and gradients (compiled), `reduce` (the average; None: local), clip, update.

    The gradients are evaluated before `reduce` and its result after it, so `comm_s` gets the whole
    reduction's time, tree in to tree out (packing, casting, the ring, unpacking): what a step waits.
    """
    import mlx.core as mx
    import mlx.optimizers as optim

    loss_and_grad, apply_update = s.lm.train_functions(model, optimizer)
    block = s.config.block_size
    phases: dict[str, list[float]] = {"compute": [], "update": []}  # gradients; clip + AdamW

    def step(idx: np.ndarray, i: int) -> float:
        x, y = s.lm.windows(s.train, s.offset + idx * block, block)
        began = time.perf_counter()
        loss, grads = loss_and_grad(x, y)
        if reduce is not None:
            mx.eval(grads)
            reduced = time.perf_counter()
            phases["compute"].append(reduced - began)
            grads = reduce(grads, len(idx))
            mx.eval(grads)
            comm_s.append(time.perf_counter() - reduced)
        updating = time.perf_counter()
        grads, _ = optim.clip_grad_norm(grads, args.clip)
        apply_update(grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        phases["update"].append(time.perf_counter() - updating)
        return float(loss)

    step.phases = phases  # type: ignore[attr-defined]

    return step


def val_loss(args: argparse.Namespace, s: Setup, model: Any) -> float:
    """Mean loss over `--eval-batches` evenly spaced validation batches: the torch port's `evaluate`."""
    block, batch = s.config.block_size, args.batch_size
    n = (len(s.val) - 1) // block
    starts = np.arange(n) * block
    if args.eval_batches * batch < n:
        starts = starts[np.linspace(0, n - 1, args.eval_batches * batch).astype(np.int64)]
    total = 0.0
    for i in range(0, len(starts), batch):
        x, y = s.lm.windows(s.val, starts[i : i + batch], block)
        total += float(s.lm.loss_fn(model, x, y)) * len(x)
    return total / max(len(starts), 1)


def phase_ms(step: Any, args: argparse.Namespace) -> dict[str, float]:
    """Median ms of the step's parts outside the reduction (timed steps): gradients, and clip + update."""
    return {
        f"{name}_ms": statistics.median(times[args.warmup_steps :]) * 1e3
        for name, times in step.phases.items()
        if len(times) > args.warmup_steps
    }


def sharded_step(
    args: argparse.Namespace, s: Setup, model: Any, opt: Any
) -> Callable[[np.ndarray, int], float]:
    """One ZeRO step: loss and gradients (stage 3: eager, its gathers and reduce-scatters inside),
    then `opt.update` (the clip by global norm, this shard's AdamW, stage 2's reduce-scatter and
    all-gather). No separate reduction time: the collectives are inside the two phases."""
    import mlx.core as mx
    import mlx.nn as nn

    if args.stage == 3:
        value_and_grad = nn.value_and_grad(model, s.lm.loss_fn)

        def loss_and_grad(x: Any, y: Any) -> tuple[Any, Any]:
            return value_and_grad(model, x, y)

    else:  # stage 2: the forward and backward are the unsharded ones, compiled alike
        loss_and_grad, _ = s.lm.train_functions(model, opt.optimizer)
    block = s.config.block_size
    phases: dict[str, list[float]] = {"compute": [], "update": []}

    def step(idx: np.ndarray, i: int) -> float:
        x, y = s.lm.windows(s.train, s.offset + idx * block, block)
        began = time.perf_counter()
        loss, grads = loss_and_grad(x, y)
        mx.eval(loss, grads)
        updating = time.perf_counter()
        phases["compute"].append(updating - began)
        # stage 3 reduced the blocks' gradients in the backward, weighted by mesh.batches' slice
        opt.update(model, grads, weight=None if args.stage == 3 else len(idx))
        mx.eval(model.parameters(), opt.state)
        phases["update"].append(time.perf_counter() - updating)
        return float(loss)

    step.phases = phases  # type: ignore[attr-defined]
    return step


def worker_meshtrain(args: argparse.Namespace) -> None:
    import meshtrain

    mesh = meshtrain.init()  # first: on a Linux CPU this may re-exec with the fast BLAS
    s = setup(args)
    model, optimizer = mlx_model(args, s, evaluate=args.stage != 3)
    if args.stage:
        layers = {"layers": model.blocks} if args.stage == 3 else {}
        opt = mesh.shard(
            model, optimizer, stage=args.stage, wire_dtype="float32", max_grad_norm=args.clip, **layers
        )
    else:
        mesh.register(model, optimizer)
    outer = None
    wire = "bfloat16" if args.wire == "bf16" else "float32"
    if args.local_sgd:
        from meshtrain.train.local_sgd import OuterOptimizer, parse_sync_every

        outer = OuterOptimizer(
            model,
            mesh,
            sync_every=parse_sync_every(args.local_sgd),
            wire_dtype=wire,
            compress=args.compress,
            overlap=args.overlap,
        )

        def reduce(grads: Any, n: int) -> Any:
            return grads  # local steps: the outer step syncs the parameters every H

    else:

        def reduce(grads: Any, n: int) -> Any:
            return mesh.allreduce(grads, weight=n, wire_dtype=wire)

    comm_s: list[float] = []
    if args.stage:
        inner = sharded_step(args, s, model, opt)
    else:
        inner = mlx_step(args, s, model, optimizer, None if outer is not None else reduce, comm_s)

    def step(idx: np.ndarray, i: int) -> float:
        loss = inner(idx, i)
        if outer is not None and outer.step(samples=len(idx)) and outer.last_comm_s is not None:
            comm_s.append(outer.last_comm_s)  # local SGD: the delta's all-reduce, every H steps
        return loss

    def batches() -> Iterator[np.ndarray]:
        epoch = 0
        while True:
            yield from mesh.batches(s.n_windows, args.batch_size, epoch=epoch, seed=args.seed)
            epoch += 1

    out = loop(args, step, batches(), mesh.rank)
    out["comm_ms"] = [c * 1e3 for c in comm_s[args.warmup_steps :]]
    out.update(phase_ms(inner, args))
    if outer is not None:
        outer.flush()
        out["mode"] = outer.describe()
    if args.stage:
        out["mode"] = f"ZeRO stage {args.stage}, fp32 wire"
    if args.stage == 3:  # every forward gathers the blocks: every worker evaluates, the main one reports
        loss = val_loss(args, s, model)
        if mesh.is_main:
            out["val_loss"] = loss
    elif mesh.is_main:
        out["val_loss"] = val_loss(args, s, model)
    print("RESULT " + json.dumps(out), flush=True)
    mesh.close()


def average_bf16(grads: Any, group: Any) -> Any:
    """nn.average_gradients with a bfloat16 wire: one flat buffer cast down, all_sum, cast back, / N."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    flat = tree_flatten(grads)
    big = mx.concatenate([g.reshape(-1) for _, g in flat]).astype(mx.bfloat16)
    summed = mx.distributed.all_sum(big, group=group).astype(mx.float32) / group.size()
    out, at = [], 0
    for name, g in flat:
        out.append((name, summed[at : at + g.size].reshape(g.shape)))
        at += g.size
    return tree_unflatten(out)


def worker_mlx(args: argparse.Namespace) -> None:
    import mlx.core as mx
    import mlx.nn as nn

    group = mx.distributed.init(backend="ring", strict=True) if args.world > 1 else None
    if group is not None and group.size() != args.world:
        raise SystemExit(f"peers.py: the MLX ring has {group.size()} members, not {args.world}")
    s = setup(args)
    model, optimizer = mlx_model(args, s)
    reduce = None
    if group is not None:
        if args.wire == "bf16":

            def reduce(grads: Any, n: int) -> Any:
                return average_bf16(grads, group)

        else:

            def reduce(grads: Any, n: int) -> Any:
                return nn.average_gradients(grads, group=group)

    comm_s: list[float] = []
    step = mlx_step(args, s, model, optimizer, reduce, comm_s)
    out = loop(
        args, step, global_batches(s.n_windows, args.batch_size, args.seed, args.rank, args.world), args.rank
    )
    out["comm_ms"] = [c * 1e3 for c in comm_s[args.warmup_steps :]]
    out.update(phase_ms(step, args))
    if args.rank == 0:
        out["val_loss"] = val_loss(args, s, model)
    if group is not None:  # nobody leaves the ring while rank 0 evaluates
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
    print("RESULT " + json.dumps(out), flush=True)


def worker_ddp(args: argparse.Namespace) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    torch_port = load_module(HERE / "peers_torch.py", "peers_torch")
    s = setup(args)
    model, optimizer = mlx_model(args, s)  # only for the initial weights and the schedule's rates
    weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    schedule = optimizer._schedulers["learning_rate"]
    lrs = [float(schedule(mx.array(i))) for i in range(args.steps)]

    def run(step: Callable[[np.ndarray, int], float], rank: int, size: int) -> dict[str, Any]:
        return loop(args, step, global_batches(s.n_windows, args.batch_size, args.seed, rank, size), rank)

    out = torch_port.worker(
        args,
        {
            "config": s.config,
            "weights": weights,
            "train": s.train,
            "val": s.val,
            "offset": s.offset,
            "lrs": lrs,
            "clip": args.clip,
            "weight_decay": args.weight_decay,
            "eval_batch": args.batch_size,
            "eval_batches": args.eval_batches,
            "loop": run,
        },
    )
    print("RESULT " + json.dumps(out), flush=True)


WORKERS = {"meshtrain": worker_meshtrain, "mlx": worker_mlx, "ddp": worker_ddp}


# --- the driver: hosts, runs, tables --------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """One run of one mode: every rank's RESULT, or why there is none."""

    mode: str
    ranks: list[dict[str, Any]]
    wall_s: float
    load: float  # the 1-minute load average when it ended
    error: str = ""

    @property
    def main(self) -> dict[str, Any]:
        return next(r for r in self.ranks if r.get("val_loss") is not None or r["rank"] == 0)

    def tokens_per_s(self, tokens_per_step: int) -> float:
        m = self.main
        return m["timed_steps"] * tokens_per_step / m["elapsed_s"] if m["elapsed_s"] > 0 else float("nan")

    def step_ms(self, warmup: int) -> float:
        return statistics.median(self.main["step_ms"][warmup:])

    def shares(self, warmup: int) -> str:
        """Each rank's local batches over the timed steps: "8/8", or "6-10/6-10" where shares moved."""
        parts = []
        for r in sorted(self.ranks, key=lambda r: r["rank"]):
            sizes = sorted(set(r["local_batches"][warmup:]))
            parts.append(str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}")
        return "/".join(parts)


def common_flags(args: argparse.Namespace, tokens_dir: str) -> list[str]:
    flags = ["--root", str(HERE.parent), "--tokens", tokens_dir, "--size", args.size]
    flags += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    flags += ["--warmup-steps", str(args.warmup_steps), "--seed", str(args.seed)]
    flags += ["--eval-batches", str(args.eval_batches), "--lr-warmup", str(args.lr_warmup)]
    if args.block_size:
        flags += ["--block-size", str(args.block_size)]
    if args.lr:
        flags += ["--lr", str(args.lr)]
    return flags


def thread_env(k: int) -> dict[str, str]:
    return {name: str(k) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def run_peers(
    kind: str,
    wire: str,
    n: int,
    hosts: Any,
    ns_prefix: str | None,
    args: argparse.Namespace,
    flags: list[str],
) -> Outcome:
    """N processes of an MLX-ring or DDP worker, one per host, pinned to that node's cores."""
    from meshtrain import blas

    scaling = sys.modules["peers_scaling"]
    if ns_prefix is None:
        addrs = [("127.0.0.1", p) for p in free_tcp_ports(n)]
    else:
        base = PEER_PORT + int(time.time()) % 200 * 2
        addrs = [(hosts.ip(i), base + i) for i in range(n)]
    addr_arg = ",".join(f"{h}:{p}" for h, p in addrs)
    hostfile = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)  # noqa: SIM115
    json.dump([[f"{h}:{p}"] for h, p in addrs], hostfile)
    hostfile.close()
    env = {
        **os.environ,
        **thread_env(args.cores_per_node),
        "PYTHONUNBUFFERED": "1",
        "TORCH_CPP_LOG_LEVEL": "ERROR",
    }
    if kind == "mlx":
        env = blas.child_env(env)  # the OpenBLAS meshtrain's workers get
    elif args.torch_path:
        env["PYTHONPATH"] = args.torch_path + os.pathsep + env.get("PYTHONPATH", "")
    procs = []
    for rank in range(n):
        cores = scaling.node_cores(rank, n, args.cores_per_node, args.available_cores)
        cmd = [*hosts.exec_prefix(rank), sys.executable, str(HERE / "peers.py"), "--worker", kind, *flags]
        cmd += ["--rank", str(rank), "--world", str(n), "--addrs", addr_arg, "--wire", wire]
        cmd += ["--threads", str(args.cores_per_node)]
        if ns_prefix:
            cmd += ["--iface-prefix", f"{ns_prefix}h"]
        rank_env = {
            **env,
            "MLX_RANK": str(rank),
            "MLX_HOSTFILE": hostfile.name,
            "GLOO_SOCKET_IFNAME": f"{ns_prefix}h{rank}" if ns_prefix else "lo",
        }
        procs.append(
            subprocess.Popen(
                cmd,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                preexec_fn=lambda c=cores: os.sched_setaffinity(0, c),
            )
        )
    start = time.monotonic()
    outs: list[str] = [""] * n

    def read(i: int) -> None:
        outs[i] = procs[i].communicate()[0]

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(n)]
    try:
        for t in readers:
            t.start()
        for t in readers:
            t.join(max(1.0, args.max_run_s - (time.monotonic() - start)))
        timed_out = any(p.poll() is None for p in procs)
    finally:  # a cut run, or the whole bench interrupted: no worker outlives it
        for p in procs:
            if p.poll() is None:
                p.kill()
        for t in readers:
            t.join(5)
        os.unlink(hostfile.name)
    return collect(f"{kind}-{wire}", "\n".join(outs), time.monotonic() - start, timed_out, args, n)


def run_meshtrain(
    mode: str,
    n: int,
    hosts: Any,
    home: Path,
    secret: str,
    ns_prefix: str | None,
    args: argparse.Namespace,
    flags: list[str],
) -> Outcome:
    """`meshtrain run --nodes N` of this file's meshtrain worker from host 0."""
    scaling = sys.modules["peers_scaling"]
    wire = "bf16" if mode == "meshtrain-bf16" or mode.startswith("local-sgd") else "fp32"
    script = [*flags, "--worker", "meshtrain", "--wire", wire, "--threads", str(args.cores_per_node)]
    if mode in STAGES:
        script += ["--stage", str(STAGES[mode])]
    if mode.startswith("local-sgd"):
        script += ["--local-sgd", args.sync_every]
        compress, overlap = local_sgd_mode(mode)
        if compress:
            script += ["--compress", compress]
        if overlap:
            script += ["--overlap", str(overlap_steps(args))]
    if ns_prefix:
        script += ["--iface-prefix", f"{ns_prefix}h"]
    run_flags = ["--nodes", str(n), "--wait", "30", "--shares", args.shares]
    cmd = [
        *hosts.exec_prefix(0),
        sys.executable,
        "-m",
        "meshtrain",
        "run",
        *run_flags,
        str(HERE / "peers.py"),
        *script,
    ]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        env={**scaling._env(home, 0, secret), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        output = proc.communicate(timeout=args.max_run_s)[0]
        timed_out = False
    except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
        proc.send_signal(signal.SIGINT)  # the first Ctrl-C cancels the job on every node
        if isinstance(exc, KeyboardInterrupt):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
            if proc.poll() is None:
                proc.kill()
            raise
        try:
            output = proc.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
        timed_out = True
    return collect(mode, output, time.monotonic() - start, timed_out, args, n)


def collect(
    mode: str, output: str, wall: float, timed_out: bool, args: argparse.Namespace, n: int
) -> Outcome:
    ranks = [json.loads(m[1]) for m in RESULT.finditer(output)]
    load = os.getloadavg()[0]
    if timed_out:
        return Outcome(mode, [], wall, load, f"> {args.max_run_s:.0f} s (cut)")
    if len(ranks) != n:
        tail = "\n".join("      " + line for line in output.strip().splitlines()[-12:])
        return Outcome(mode, [], wall, load, f"failed ({len(ranks)} of {n} results)\n{tail}")
    return Outcome(mode, ranks, wall, load)


def free_tcp_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclasses.dataclass
class Cell:
    link: str
    nodes: int
    runs: dict[str, list[Outcome]] = dataclasses.field(default_factory=dict)
    note: str = ""


def prepare_tokens(args: argparse.Namespace) -> tuple[str, int, int]:
    """The corpus tokenized once, as .npy files every worker maps: (folder, vocabulary, parameters)."""
    lm = load_module(HERE.parent / "examples" / "shakespeare.py", "peers_shakespeare")
    tokenizer, train, val = lm.load_tokens("char")
    folder = tempfile.mkdtemp(prefix="meshtrain-peers-")
    np.save(Path(folder) / "train.npy", train)
    np.save(Path(folder) / "val.npy", val)
    Path(folder, "vocab").write_text(str(tokenizer.vocab_size))
    import mlx.core as mx
    from mlx.utils import tree_flatten

    base = lm.SIZES[args.size]
    config = dataclasses.replace(
        base, vocab_size=tokenizer.vocab_size, block_size=args.block_size or base.block_size
    )
    mx.random.seed(args.seed)
    params = sum(v.size for _, v in tree_flatten(lm.GPT(config).parameters()))
    return folder, tokenizer.vocab_size, params


@contextlib.contextmanager
def cell_hosts(
    link: str, n: int, args: argparse.Namespace
) -> Iterator[tuple[Any, Path, str, str | None, str]]:
    """N `meshtrain join` agents on this link (scaling.py's mesh), up while every mode of the cell runs."""
    scaling = sys.modules["peers_scaling"]
    loopback = link == "loopback"
    shaped = scaling.Link.parse("none" if loopback else link)
    opts = argparse.Namespace(
        loopback=loopback, cores_per_node=args.cores_per_node, available_cores=args.available_cores
    )
    with scaling.mesh(n, shaped, opts) as (hosts, home, secret):
        how = "127.0.0.1, unshaped" if loopback else f"namespaces, tc tbf {link}"
        yield hosts, home, secret, None if loopback else PREFIX, how


class OutOfTime(Exception):
    """--budget-s is spent: no new run starts, the tables show what was measured."""


def run_cell(
    link: str, n: int, modes: list[str], args: argparse.Namespace, flags: list[str], cells: list[Cell]
) -> None:
    cell = Cell(link, n)
    cells.append(cell)
    with cell_hosts(link, n, args) as (hosts, home, secret, ns_prefix, how):
        cell.note = how
        for round_ in range(args.rounds):
            for mode in modes:
                if args.deadline and time.monotonic() > args.deadline:
                    raise OutOfTime
                print(f"[{link}] N={n} {mode} (round {round_ + 1})", flush=True)
                if FAMILY[mode] == "meshtrain":
                    out = run_meshtrain(mode, n, hosts, home, secret, ns_prefix, args, flags)
                else:
                    kind, wire = mode.split("-")
                    out = run_peers(kind, wire, n, hosts, ns_prefix, args, flags)
                cell.runs.setdefault(mode, []).append(out)
                print("  -> " + describe_run(out, n, args), flush=True)


def measure_ceilings(args: argparse.Namespace, tokens_dir: str) -> None:
    """args.ceilings[N]: N x the tokens/s of one meshtrain node at the local batch G/N, no wire (the
    time a step of N workers cannot go under: bench/tta_bound.py's free-network ceiling)."""
    for n in sorted(x for x in args.nodes if x > 1):
        local = copy.copy(args)
        local.batch_size = max(1, args.batch_size // n)
        runs: list[Cell] = []
        print(f"[ceiling] N={n}: one node at the local batch of {local.batch_size} windows", flush=True)
        try:
            run_cell(args.links[0], 1, ["meshtrain-bf16"], local, common_flags(local, tokens_dir), runs)
        except (subprocess.CalledProcessError, SystemExit) as exc:
            print(f"  !! [ceiling] N={n} failed: {exc}", flush=True)
            continue
        best = best_outcome(runs[0].runs.get("meshtrain-bf16", []), args)
        if best is not None:
            args.ceilings[n] = n * best.tokens_per_s(tokens_per_step(local))
            print(f"  -> ceiling at N={n}: {args.ceilings[n]:,.0f} tokens/s", flush=True)


def tokens_per_step(args: argparse.Namespace) -> int:
    return args.batch_size * args.block


def describe_run(out: Outcome, n: int, args: argparse.Namespace) -> str:
    if out.error:
        return out.error
    tps = out.tokens_per_s(tokens_per_step(args))
    extra = f"; {out.main['mode']}" if out.main.get("mode") else ""
    if out.main.get("comm_ms"):
        extra += f"; reduction {statistics.median(out.main['comm_ms']):.1f} ms (median, tree in to tree out)"
    if out.main.get("compute_ms") is not None and out.main.get("update_ms") is not None:
        extra += f"; gradients {out.main['compute_ms']:.1f} ms, clip + update {out.main['update_ms']:.1f} ms"
    return (
        f"{tps:,.0f} tokens/s, step {out.step_ms(args.warmup_steps):.1f} ms (median), local batches "
        f"{out.shares(args.warmup_steps)}, val loss {out.main.get('val_loss', float('nan')):.4f}, "
        f"wall {out.wall_s:.1f} s, load {out.load:.1f}{extra}"
    )


def bytes_per_token(out: Outcome, mode: str, n: int, link: str, args: argparse.Namespace) -> str:
    """Measured tx bytes per node per token; on loopback the ring's share, computed (marked ~)."""
    tokens = out.main["timed_steps"] * tokens_per_step(args)
    if n == 1:
        return "0"
    if link != "loopback":
        return f"{statistics.mean(r['tx_bytes'] for r in out.ranks) / tokens:.1f}"
    if mode.startswith("local-sgd"):
        dtype = local_sgd_mode(mode)[0] or "bf16"
    else:
        dtype = "fp32" if mode in STAGES else mode.rsplit("-", 1)[1]
    wire = WIRE_BYTES["bf16" if mode == "meshtrain-bf16" else dtype]
    # stage 3: each block's parameters gathered twice (forward, backward) and its gradient reduce-scattered,
    # 3 x (N-1)/N of them (the root unit's 2 x, an all-reduce, is counted as 3 x: an upper bound)
    per_step = (3 if STAGES.get(mode) == 3 else 2) * (n - 1) / n * args.params * wire
    if mode.startswith("local-sgd"):
        h = re.search(r"sync every (\d+)", out.main.get("mode", ""))
        per_step /= int(h[1]) if h else float(args.sync_every)
    return f"~{per_step / tokens_per_step(args):.1f}"


def overlap_steps(args: argparse.Namespace) -> int:
    """τ of the -overlap modes: `--overlap`, else half of H (4 when H is auto: capped at H - 1)."""
    if args.overlap:
        return int(args.overlap)
    return 4 if args.sync_every == "auto" else max(1, int(args.sync_every) // 2)


def best_outcome(runs: list[Outcome], args: argparse.Namespace) -> Outcome | None:
    """The round with the highest tokens/s (one real run, so its other figures belong to it).

    The best of interleaved rounds, not their median: on a shared machine other processes only ever
    slow a run down, so the fastest round is the closest to what the mode can do; every round's
    tokens/s is printed beside it.
    """
    good = [r for r in runs if not r.error]
    return max(good, key=lambda r: r.tokens_per_s(tokens_per_step(args))) if good else None


def print_tables(cells: list[Cell], args: argparse.Namespace) -> None:
    tps = tokens_per_step(args)
    n1: dict[str, float] = {}
    for cell in cells:
        if cell.nodes == 1:
            for mode, runs in cell.runs.items():
                best = best_outcome(runs, args)
                if best is not None:
                    n1.setdefault(FAMILY[mode], best.tokens_per_s(tps))
    print(
        f"\n{'link':<9} {'N':>2} {'mode':<15} {'tokens/s':>9} {'step ms':>8} {'eff':>5} "
        f"{'B/node/token':>12} {'val loss':>9} {'vs DP':>6}  local batches; every round's tokens/s; notes"
    )
    for cell in cells:
        ref = best_outcome(cell.runs.get("meshtrain-fp32", []) or cell.runs.get("mlx-fp32", []), args)
        ref_loss = ref.main.get("val_loss") if ref else None
        for mode, runs in cell.runs.items():
            best = best_outcome(runs, args)
            name = FAMILY[mode] if cell.nodes == 1 else mode
            if best is None:
                print(f"{cell.link:<9} {cell.nodes:>2} {name:<15} {runs[0].error.splitlines()[0]}")
                continue
            rate = best.tokens_per_s(tps)
            base = n1.get(FAMILY[mode])
            eff = f"{rate / (cell.nodes * base):.0%}" if base else "-"
            loss = best.main.get("val_loss", float("nan"))
            vs = f"{(loss / ref_loss - 1) * 100:+.1f}%" if ref_loss and cell.nodes > 1 else ""
            rates = ",".join(f"{r.tokens_per_s(tps):,.0f}" for r in runs if not r.error)
            h = re.search(r"sync every (\d+)", best.main.get("mode", ""))
            note = f"{best.shares(args.warmup_steps)}; {rates}" + (f"; H={h[1]}" if h else "")
            if best.main.get("comm_ms"):
                note += f"; reduction {statistics.median(best.main['comm_ms']):.1f} ms"
            if len(runs) > len([r for r in runs if not r.error]):
                note += f"; {sum(1 for r in runs if r.error)} round(s) failed or cut"

            sent = bytes_per_token(best, mode, cell.nodes, cell.link, args)
            step = best.step_ms(args.warmup_steps)
            print(
                f"{cell.link:<9} {cell.nodes:>2} {name:<15} {rate:>9,.0f} {step:>8.1f} "
                f"{eff:>5} {sent:>12} {loss:>9.4f} {vs:>6}  {note}"
            )
    print(
        "\nratios: meshtrain / the best peer in the cell (peer: the faster of MLX ring and DDP gloo, at that"
        " wire dtype where a column says one); `scaling`: the same for efficiency (tokens/s over N x the"
        " framework's own N=1), which leaves out how fast each framework computes alone"
    )
    print(
        f"{'link':<9} {'N':>2} {'fp32 wire':>20} {'bf16 wire':>20} {'best/best':>20} {'local SGD/best':>20}"
        f" {'scaling best/best':>20} {'s2/DP fp32':>11} {'s3/DP fp32':>11} {'best/ceiling':>24}"
    )
    peers = ["mlx-fp32", "ddp-fp32", "mlx-bf16", "ddp-bf16"]
    ours = ["meshtrain-fp32", "meshtrain-bf16"]
    local = [m for m in MODES if m.startswith("local-sgd")]  # the best of them
    for cell in cells:
        speed = {
            m: o.tokens_per_s(tps)
            for m, runs in cell.runs.items()
            if (o := best_outcome(runs, args)) is not None
        }
        eff = {m: r / (cell.nodes * n1[FAMILY[m]]) for m, r in speed.items() if n1.get(FAMILY[m])}
        if cell.nodes == 1:
            continue

        def ratio(a_modes: list[str], b_modes: list[str], table: dict[str, float] = speed) -> str:
            a = [(table[m], m) for m in a_modes if m in table]
            b = [(table[m], m) for m in b_modes if m in table]
            if not a or not b:
                return "-"
            (x, _), (y, who) = max(a), max(b)
            return f"{x / y:.2f}x ({who})"

        def zero(mode: str, table: dict[str, float] = speed) -> str:  # a ZeRO stage over unsharded fp32
            if mode not in table or "meshtrain-fp32" not in table:
                return "-"
            return f"{table[mode] / table['meshtrain-fp32']:.2f}x"

        ceiling = getattr(args, "ceilings", {}).get(cell.nodes)
        mine = [(speed[m], m) for m in [*ours, *local] if m in speed]
        of_ceiling = f"{max(mine)[0] / ceiling:.2f}x ({max(mine)[1]})" if ceiling and mine else "-"
        print(
            f"{cell.link:<9} {cell.nodes:>2} {ratio(['meshtrain-fp32'], ['mlx-fp32', 'ddp-fp32']):>20} "
            f"{ratio(['meshtrain-bf16'], ['mlx-bf16', 'ddp-bf16']):>20} {ratio(ours, peers):>20} "
            f"{ratio(local, peers):>20} {ratio(ours, peers, eff):>20} {zero('meshtrain-s2'):>11} "
            f"{zero('meshtrain-s3'):>11} {of_ceiling:>24}"
        )


def describe_setup(args: argparse.Namespace) -> str:
    import mlx.core as mx

    from meshtrain import blas

    torch = args.torch_version
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in open("/proc/cpuinfo")
                if line.startswith("model name")
            ),
            cpu,
        )
    k = args.cores_per_node
    shared = [n for n in args.nodes if n * k > len(args.available_cores)]
    return "\n".join(
        [
            f"# GPT {args.size} (examples/shakespeare.py): {args.params / 1e6:.2f}M parameters, "
            f"{args.params * 4 / 1e6:.1f} MB of fp32 gradients; global batch "
            f"{args.batch_size} x {args.block} = {tokens_per_step(args):,} tokens a step at every N; "
            f"{args.steps} steps a run, the first "
            f"{args.warmup_steps} untimed; AdamW (MLX's arithmetic in torch too), warm-up {args.lr_warmup}, "
            f"clip {args.clip}; seed {args.seed}: the same initial weights and windows in every mode",
            f"# machine: {len(args.available_cores)} cores here (os.cpu_count {os.cpu_count()}), {cpu}; "
            f"MLX {mx.__version__} ({blas.find_openblas() or 'its bundled BLAS'}), torch {torch or 'absent'}"
            + (" eager (MLX compiles)" if torch else ""),
            f"# each node pinned to {k} core(s) of its own, {k} BLAS/OpenMP/torch thread(s) a process"
            + (f"; at N={','.join(map(str, shared))} nodes SHARE cores" if shared else ""),
            f"# links: {', '.join(args.links)} (namespaces: tc tbf rate, no delay); "
            f"modes {', '.join(args.modes)}; meshtrain run --shares {args.shares}; "
            f"local SGD --sync-every {args.sync_every} (-overlap modes: τ = {overlap_steps(args)}); "
            f"{args.rounds} interleaved round(s), the tables take each mode's fastest",
            f"# load: 1-minute load average {os.getloadavg()[0]:.1f} at the start; the cell's idle meshtrain "
            "agents stay up while its peers run; other users' processes may share these cores",
        ]
    )


def fail(message: str) -> None:
    """A bad option: one line on stderr, exit status 2."""
    print(f"peers.py: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "small", "base"), default="tiny")
    p.add_argument("--batch-size", type=int, default=16, help="global batch of windows, at every N")
    p.add_argument("--block-size", type=int, default=None, help="context (default: the size's)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps a run (equal tokens in every mode)")
    p.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the timing")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lr-warmup", type=int, default=10, help="the schedule's warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches after the run")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--links", nargs="+", default=["loopback", "1gbit"], help="loopback and/or tc rates")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--sync-every", default="8", help="local SGD's H (or auto)")
    p.add_argument("--shares", choices=("perf", "equal"), default="perf", help="meshtrain run --shares")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every mode per (link, N)")
    p.add_argument(
        "--cores-per-node", type=int, default=None, help="default 2 where there are enough, else 1"
    )
    p.add_argument("--torch-path", default="", help="extra PYTHONPATH holding torch (for the DDP modes)")
    p.add_argument("--max-run-s", type=float, default=180.0, help="cut a run after this many seconds")
    p.add_argument(
        "--budget-s", type=float, default=0.0, help="start no run after this many seconds (0: none)"
    )
    # worker side (set by the driver)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--root", default=str(HERE.parent), help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--addrs", default="", help=argparse.SUPPRESS)
    p.add_argument("--wire", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--iface-prefix", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local-sgd", default=None, metavar="H", help=argparse.SUPPRESS)
    p.add_argument("--compress", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="also run meshtrain alone at each N's local batch (global / N, nothing on a wire): N x its "
        "tokens/s is the free-network ceiling (bench/tta_bound.py's argument), and the ratio table adds "
        "meshtrain's best over it",
    )
    p.add_argument(
        "--overlap", type=int, default=0, help="the -overlap modes' τ: steps a sync runs under (default H/2)"
    )
    p.add_argument("--stage", type=int, default=0, choices=(0, 2, 3), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    for name in ("batch_size", "steps", "rounds"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.warmup_steps < args.steps:
        fail("--warmup-steps must be at least 0 and below --steps")
    for link in args.links:
        if link != "loopback" and not re.fullmatch(r"\d+(\.\d+)?[kmg]bit", link):
            fail(f"--links: {link!r} is neither loopback nor a rate like 1gbit or 100mbit")
    if any(n < 1 for n in args.nodes):
        fail("--nodes must be at least 1")
    args.available_cores = sorted(os.sched_getaffinity(0))
    if args.cores_per_node is None:
        args.cores_per_node = 2 if 2 * max(args.nodes) <= len(args.available_cores) else 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        WORKERS[args.worker](args)
        return 0
    from meshtrain import netns

    if any(link != "loopback" for link in args.links) and not netns.available():
        print(
            "peers.py: shaped links need root and iproute2 (network namespaces); try --links loopback",
            file=sys.stderr,
        )
        return 2
    torch_port = load_module(HERE / "peers_torch.py", "peers_torch")
    if args.torch_path:
        sys.path.insert(0, args.torch_path)
    args.torch_version = torch_port.torch_version()
    if any(FAMILY[m] == "ddp" for m in args.modes) and args.torch_version is None:
        print(
            "peers.py: torch is not installed: the DDP modes are left out (pip install torch==2.13.0, "
            "or --torch-path DIR)",
            flush=True,
        )
        args.modes = [m for m in args.modes if FAMILY[m] != "ddp"]
    scaling = load_module(HERE / "scaling.py", "peers_scaling")
    scaling.PREFIX = PREFIX
    tokens_dir, _, args.params = prepare_tokens(args)
    lm = sys.modules["peers_shakespeare"]
    args.block = args.block_size or lm.SIZES[args.size].block_size
    print(describe_setup(args), flush=True)
    flags = common_flags(args, tokens_dir)
    families = list(dict.fromkeys(FAMILY[m] for m in args.modes))
    cells: list[Cell] = []
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also where a background start ignored it
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    args.deadline = time.monotonic() + args.budget_s if args.budget_s > 0 else 0.0
    # nothing crosses a wire at N=1: one run per framework stands for every link and wire
    plan = [(args.links[0], 1, [next(m for m in args.modes if FAMILY[m] == f) for f in families])]
    plan = plan if 1 in args.nodes else []
    plan += [(link, n, list(args.modes)) for link in args.links for n in sorted(args.nodes) if n > 1]
    args.ceilings = {}
    try:
        if args.ceiling:
            measure_ceilings(args, tokens_dir)
        for link, n, modes in plan:  # link by link, so a cut bench has every N of its first links
            try:
                run_cell(link, n, modes, args, flags, cells)
            except (subprocess.CalledProcessError, SystemExit) as exc:
                print(f"  !! [{link}] N={n} failed: {exc}", flush=True)
    except KeyboardInterrupt:  # `timeout -s INT`: still print what was measured
        print("\ninterrupted: the tables have the runs measured so far", flush=True)
    except OutOfTime:
        print(f"\n--budget-s {args.budget_s:.0f} spent: the tables have the runs measured so far", flush=True)
    finally:
        import shutil

        shutil.rmtree(tokens_dir, ignore_errors=True)
    print_tables(cells, args)
    print(f"# load: 1-minute load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
