"""The ceiling on data-parallel time-to-accuracy: how fast N nodes *could* reach a target, at best.

Why: synchronous data parallelism with exact averaging (what meshtrain's
per-step modes compute) trains the same model as one process taking steps of
the global batch G. So its time-to-accuracy factors into

    epochs_to_target(G)  x  60,000 samples  /  (N x one node's samples/s at local batch G/N)

plus communication. The first factor is statistics (bigger batches need more
epochs), the second is compute; a perfect network removes only the third.
This bench measures both factors on this machine and prints, per N, the best
speed-up any choice of G could give with a free network, and with per-step
bf16 all-reduces over the links of `--links` (the ring's 2(N-1)/N bytes law at
the link rate). A measured speed-up above the free-network ceiling would be an
error in the measurement; a target above it cannot be met by any data-parallel
system on this model and hardware.

1. Statistics: examples/mnist.py's model, optimizer (Adam, warm-up, cosine
   over the schedule's epochs) and evaluation, trained in one process at each
   global batch of `--batches`, for each peak rate of `--lrs` and schedule
   length of `--schedules` (shortest first; a longer one only where the
   shorter missed), evaluated `--evals-per-epoch` times an epoch; the
   fewest epochs to `--target` per G.
2. Compute: one node's samples/s (loss, gradients, Adam update, evaluation
   of the step) at each local batch, on this process's cores: pin it
   (`taskset -c 0,1`) to measure a 2-core node.

    taskset -c 0,1 .venv/bin/python bench/tta_bound.py            # MLP -> 98%, about 5 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also when loaded by path
from mnist_example import load_example  # noqa: E402

from meshtrain import Mesh  # noqa: E402
from meshtrain.blas import describe as describe_blas  # noqa: E402
from meshtrain.blas import ensure_fast_blas  # noqa: E402
from meshtrain.train.local_sgd import outer_update  # noqa: E402

N_TRAIN = 60_000
LINK_BYTES_PER_S = {"1gbit": 125e6 * 0.95, "100mbit": 12.5e6 * 0.95}  # tc rate less framing (~95% goodput)


def epochs_to_target(
    ex: ModuleType, data: tuple[mx.array, ...], batch: int, lr: float, epochs: int, evals: int, target: float
) -> tuple[float | None, float]:
    """(epochs at the first evaluation >= target or None, best accuracy) for one schedule."""
    x, y, xt, yt = data
    mx.random.seed(0)
    model = ex.MLP()
    mx.eval(model.parameters())
    steps = math.ceil(N_TRAIN / batch)
    optimizer = ex.make_optimizer(lr, epochs * steps)
    loss_and_grad, apply_update = ex.train_functions(model, optimizer)
    every = max(1, math.ceil(steps / evals))
    rng = np.random.default_rng(0)
    best = 0.0
    for epoch in range(epochs):
        order = rng.permutation(N_TRAIN)
        for step in range(steps):
            idx = mx.array(order[step * batch : (step + 1) * batch])
            _, grads = loss_and_grad(x[idx], y[idx])
            apply_update(grads)
            mx.eval(model.parameters(), optimizer.state)
            if (step + 1) % every == 0 or step + 1 == steps:
                accuracy = ex.evaluate(Mesh(), model, xt, yt)
                best = max(best, accuracy)
                if accuracy >= target:
                    return epoch + (step + 1) / steps, best
    return None, best


def local_sgd_epochs_to_target(
    ex: ModuleType,
    data: tuple[mx.array, ...],
    setting: LocalSgd,
    lr: float,
    epochs: int,
    evals: int,
    target: float,
) -> tuple[float | None, float]:
    """Local SGD's (epochs to target or None, best accuracy), its N replicas simulated in one process.

    Each replica has its own model and Adam, takes its slice of every global
    batch, and every H steps the replicas' mean delta goes through the outer
    step meshtrain's OuterOptimizer applies (meshtrain.train.local_sgd's
    outer_update, the same constants as examples/mnist.py); the shared model
    is evaluated at the first sync after each evaluation point.
    """
    x, y, xt, yt = data
    n, h, b = setting.nodes, setting.sync_every, setting.batch_per_node
    mx.random.seed(0)
    first = ex.MLP()
    mx.eval(first.parameters())
    steps = N_TRAIN // (n * b)
    replicas = []
    for _ in range(n):
        model = ex.MLP()
        model.update(tree_map(mx.array, first.parameters()))
        optimizer = ex.make_optimizer(lr, epochs * steps)
        replicas.append((model, optimizer, *ex.train_functions(model, optimizer)))
    anchor = dict(tree_flatten(tree_map(mx.array, first.trainable_parameters())))
    velocity = {k: mx.zeros_like(v) for k, v in anchor.items()}
    every = max(1, math.ceil(steps / evals))
    rng = np.random.default_rng(0)
    best, since, due = 0.0, 0, False
    for epoch in range(epochs):
        order = rng.permutation(N_TRAIN)
        for step in range(steps):
            chunk = order[step * n * b : (step + 1) * n * b]
            for i, (model, optimizer, loss_and_grad, apply_update) in enumerate(replicas):
                idx = mx.array(chunk[i * b : (i + 1) * b])
                _, grads = loss_and_grad(x[idx], y[idx])
                apply_update(grads)
                mx.eval(model.parameters(), optimizer.state)
            since += 1
            due = due or (step + 1) % every == 0 or step + 1 == steps
            if since < h and step + 1 < steps:
                continue
            since = 0
            current = [dict(tree_flatten(r[0].trainable_parameters())) for r in replicas]
            for k in anchor:
                delta = sum((anchor[k] - c[k] for c in current), mx.zeros_like(anchor[k])) / n
                anchor[k], velocity[k] = outer_update(
                    anchor[k], velocity[k], delta, ex.DEFAULT_OUTER_LR, ex.DEFAULT_OUTER_MOMENTUM, True
                )
            mx.eval(anchor, velocity)
            for model, *_ in replicas:
                model.update(tree_unflatten([(k, mx.array(v)) for k, v in anchor.items()]))
            if due:
                due = False
                accuracy = ex.evaluate(Mesh(), replicas[0][0], xt, yt)
                best = max(best, accuracy)
                if accuracy >= target:
                    return epoch + (step + 1) / steps, best
    return None, best


def node_rate(ex: ModuleType, data: tuple[mx.array, ...], batch: int, seconds: float = 1.5) -> float:
    """One node's training samples/s at this local batch (what a worker's loop computes per step)."""
    x, y, _, _ = data
    mx.random.seed(0)
    model = ex.MLP()
    optimizer = ex.make_optimizer(1e-3, 10_000)
    loss_and_grad, apply_update = ex.train_functions(model, optimizer)
    rng = np.random.default_rng(1)

    def step() -> None:
        idx = mx.array(rng.integers(0, N_TRAIN, batch))
        loss, grads = loss_and_grad(x[idx], y[idx])
        apply_update(grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        float(loss)

    for _ in range(5):
        step()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        done += 1
    return done * batch / (time.perf_counter() - start)


def allreduce_s(n: int, param_bytes: float, link: str) -> float:
    """A ring all-reduce's time at the link's rate: each node sends 2(N-1)/N of the bytes."""
    return 0.0 if n == 1 else 2 * (n - 1) / n * param_bytes / LINK_BYTES_PER_S[link]


@dataclass(frozen=True)
class LocalSgd:
    """One simulated local-SGD setting, spelled N:H:B on the command line."""

    nodes: int
    sync_every: int
    batch_per_node: int

    @staticmethod
    def parse(text: str) -> LocalSgd:
        try:
            n, h, b = (int(v) for v in text.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected N:H:B, e.g. 8:8:128 (got {text!r})") from None
        return LocalSgd(n, h, b)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=float, default=98.0, help="test accuracy, %%")
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512, 1024, 2048], help="global")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3])
    p.add_argument("--schedules", type=int, nargs="+", default=[3, 4, 6, 8], help="epochs of the cosine")
    p.add_argument("--evals-per-epoch", type=int, default=8)
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--links", nargs="+", default=["1gbit", "100mbit"], choices=sorted(LINK_BYTES_PER_S))
    p.add_argument("--min-local-batch", type=int, default=16)
    p.add_argument("--save-epochs", type=Path, default=None, help="write part 1's result (JSON) here")
    p.add_argument("--epochs-from", type=Path, default=None, help="skip part 1: read a --save-epochs file")
    p.add_argument(
        "--local-sgd",
        type=LocalSgd.parse,
        nargs="*",
        default=[LocalSgd(2, 8, 256), LocalSgd(4, 8, 256), LocalSgd(8, 8, 128)],
        help="part 4: local SGD settings N:H:B to simulate (none: skip)",
    )
    p.add_argument("--local-sgd-lr", type=float, default=2e-3)
    p.add_argument("--local-sgd-schedules", type=int, nargs="+", default=[4, 6, 8])
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ensure_fast_blas()  # what meshtrain.init() does for a training script: OpenBLAS, re-exec if needed
    args = parse_args(argv)
    ex = load_example()
    train_images, train_labels = ex.mnist("train")
    test_images, test_labels = ex.mnist("test")
    data = (
        ex.prepare(train_images, "mlp"),
        mx.array(train_labels.astype(np.int32)),
        ex.prepare(test_images, "mlp"),
        mx.array(test_labels.astype(np.int32)),
    )
    cores = len(os.sched_getaffinity(0))
    leaves: list[tuple[str, mx.array]] = tree_flatten(ex.MLP().parameters())  # type: ignore[assignment]
    params = sum(int(v.size) for _, v in leaves)
    wire_bytes = 2 * params  # bf16
    print(
        f"MLP ({params:,} params, bf16 wire {wire_bytes / 1e6:.2f} MB), target {args.target}%, "
        f"{mx.default_device()}, {cores} cores for this process, {describe_blas()}",
        flush=True,
    )
    best_epochs: dict[int, float] = {}
    if args.epochs_from is not None:
        best_epochs = {int(g): e for g, e in json.loads(args.epochs_from.read_text()).items()}
        print(f"\n1. epochs to target by global batch, from {args.epochs_from}: {best_epochs}")
    else:
        print("\n1. epochs to target by global batch (one process = exact synchronous data parallelism)")
    for batch in [] if args.epochs_from else args.batches:
        tried = []
        for lr in args.lrs:
            for schedule in args.schedules:
                started = time.perf_counter()
                reached, acc = epochs_to_target(
                    ex, data, batch, lr, schedule, args.evals_per_epoch, args.target / 100
                )
                tried.append(f"lr {lr:g} x{schedule}: {'-' if reached is None else f'{reached:.2f}'}")
                print(
                    f"  G={batch:<5} lr {lr:g}, {schedule}-epoch schedule: "
                    + (f"{reached:.2f} epochs" if reached is not None else f"not reached (best {acc:.2%})")
                    + f"  [{time.perf_counter() - started:.0f} s]",
                    flush=True,
                )
                if reached is not None:
                    best_epochs[batch] = min(best_epochs.get(batch, math.inf), reached)
                    break
    if args.save_epochs is not None:
        args.save_epochs.write_text(json.dumps(best_epochs))
    print("\n2. one node's samples/s by local batch")
    local = sorted(
        {g // n for g in best_epochs for n in args.nodes if g % n == 0}
        | {s.batch_per_node for s in args.local_sgd}
    )
    local = [b for b in local if b >= args.min_local_batch]
    rates = {b: node_rate(ex, data, b) for b in local}
    for b in local:
        print(f"  B={b:<5} {rates[b]:>9,.0f} samples/s")

    def seconds(n: int, g: int, link: str | None) -> float:
        b = g // n
        per_step = b / rates[b] + (allreduce_s(n, wire_bytes, link) if link else 0.0)
        return best_epochs[g] * math.ceil(N_TRAIN / g) * per_step

    options = {n: [g for g in best_epochs if g % n == 0 and g // n in rates] for n in args.nodes}
    base = min(seconds(1, g, None) for g in options[1])
    print(f"\n3. best time-to-{args.target}% per N (best N=1: {base:.1f} s of compute)")
    print(
        f"  {'N':>2} {'link':<14} {'G':>5} {'B':>5} {'epochs':>6} {'seconds':>8} {'speed-up':>8} {'eff':>5}"
    )
    for n in args.nodes:
        for link in [None, *args.links]:
            if not options[n] or (n == 1 and link):
                continue
            g = min(options[n], key=lambda g: seconds(n, g, link))
            t = seconds(n, g, link)
            print(
                f"  {n:>2} {link or 'free network':<14} {g:>5} {g // n:>5} {best_epochs[g]:>6.2f} {t:>8.1f}"
                f" {base / t:>7.2f}x {base / t / n:>5.2f}"
            )
    if args.local_sgd:
        print(
            f"\n4. local SGD (N replicas simulated in one process, lr {args.local_sgd_lr:g}, outer step as"
            " examples/mnist.py): epochs to target and the free-network speed-up it allows"
        )
    for setting in args.local_sgd:
        for schedule in args.local_sgd_schedules:
            reached, acc = local_sgd_epochs_to_target(
                ex, data, setting, args.local_sgd_lr, schedule, args.evals_per_epoch, args.target / 100
            )
            n, b = setting.nodes, setting.batch_per_node
            text = f"  N={n} H={setting.sync_every} B={b}, {schedule}-epoch schedule: "
            if reached is None:
                print(text + f"not reached (best {acc:.2%})", flush=True)
                continue
            t = reached * N_TRAIN / (n * rates[b])
            print(text + f"{reached:.2f} epochs, {t:.1f} s, at most {base / t:.2f}x", flush=True)
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
