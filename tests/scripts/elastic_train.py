"""A tiny elastic training script for the fault tests: a plain MLX loop with the meshtrain lines.

Synthetic data (no downloads), a small MLP, Adam. `--step-sleep S` slows each step so a test can kill a
worker mid-training; at the end every worker writes its state digest and step to OUT/result-<member>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

import meshtrain
from meshtrain.train.digest import state_digest

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--n", type=int, default=384)
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--step-sleep", type=float, default=0.0)
parser.add_argument("--hidden", type=int, default=64)
parser.add_argument(
    "--die",
    action="append",
    default=[],
    metavar="MEMBER:STEP:WHERE",
    help="fault injection: SIGKILL this worker at global STEP, in 'forward' or 'allreduce'",
)
parser.add_argument(
    "--nested",
    action="store_true",
    help="a transformer-like layout: a list of blocks, each with a parameter-free nn.Dropout inside",
)
parser.add_argument("--no-seed", action="store_true", help="never seed MLX (README's loop need not)")
parser.add_argument(
    "--perturb-main",
    action="store_true",
    help="change the main worker's model after mesh.register (the first reduction must refuse)",
)
parser.add_argument("--checksum-out", action="store_true", help="also write the initial parameter sum")
parser.add_argument("--evaluate", action="store_true", help="mesh.evaluate on every worker at each epoch end")
args = parser.parse_args()


def maybe_die(member: str, step: int, where: str) -> None:
    """SIGKILL ourselves: right away (mid-forward) or 2 ms into the all-reduce (mid-stream)."""
    for spec in args.die:
        m, s, w = spec.split(":")
        if m == member and int(s) == step and w == where:
            delay = 0.002 if where == "allreduce" else 0.0
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
            if delay == 0.0:
                time.sleep(5)


mesh = meshtrain.init()
rng = np.random.default_rng(123)
x_all = rng.standard_normal((args.n, 16)).astype(np.float32)
y_all = np.argmax(x_all @ rng.standard_normal((16, 4)).astype(np.float32), axis=1).astype(np.int32)
if not args.no_seed:
    mx.random.seed(0)


class Block(nn.Module):
    """A residual MLP block holding a parameter-free submodule, as transformer blocks do."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dims)
        self.fc = nn.Linear(dims, dims)
        self.drop = nn.Dropout(0.1)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.drop(nn.relu(self.fc(self.norm(x))))


class Nested(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.inp = nn.Linear(16, hidden)
        self.blocks = [Block(hidden) for _ in range(2)]
        self.act = nn.ReLU()
        self.out = nn.Linear(hidden, 4)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.act(self.inp(x))
        for block in self.blocks:
            x = block(x)
        return self.out(x)


if args.nested:
    model: nn.Module = Nested(args.hidden)
else:
    model = nn.Sequential(
        nn.Linear(16, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, 4),
    )
me = str(getattr(mesh, "member", "local"))
optimizer = optim.Adam(learning_rate=1e-2)
mesh.register(model, optimizer)
if args.checksum_out:
    from mlx.utils import tree_flatten

    start_sum = float(sum(mx.sum(v).item() for _, v in tree_flatten(model.parameters())))
    with open(os.path.join(args.out, f"start-{me}.json"), "w") as f:
        json.dump({"sum": start_sum}, f)
if args.perturb_main and mesh.is_main:
    model.update({"out": {"bias": model.out.bias + 1.0}} if args.nested else {})
    if not args.nested:
        model.layers[-1].bias = model.layers[-1].bias + 1.0
loss_and_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y).mean())
zeros = None
evals: list[float] = []  # each epoch's evaluated sample count (NaN: an epoch that ended before we joined)
for epoch in range(args.epochs):
    for step, idx in enumerate(mesh.batches(args.n, args.batch, epoch=epoch, seed=7)):
        if len(idx):
            loss, grads = loss_and_grad(model, mx.array(x_all[idx]), mx.array(y_all[idx]))
        else:
            from mlx.utils import tree_map

            loss, grads = mx.array(0.0), tree_map(mx.zeros_like, model.trainable_parameters())
        time.sleep(args.step_sleep)
        at = getattr(mesh, "committed", 0)
        maybe_die(me, at, "forward")
        maybe_die(me, at, "allreduce")
        grads = mesh.allreduce(grads, weight=len(idx), wire_dtype="float32")
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        mesh.report(epoch=epoch, epochs=args.epochs, step=step, loss=float(loss), samples=len(idx))
    if args.evaluate:
        def count(ix: np.ndarray) -> dict[str, float]:
            logits = model(mx.array(x_all[ix])) if len(ix) else mx.zeros((0, 4))
            hits = mx.sum(mx.argmax(logits, axis=1) == mx.array(y_all[ix])).item() if len(ix) else 0
            return {"count": len(ix), "correct": hits}

        evals.append(mesh.evaluate(args.n, count)["count"])
    if mesh.is_main:
        print(f"epoch {epoch + 1} done", flush=True)
member = me
tree = {"params": model.parameters(), "opt": optimizer.state}
committed = getattr(mesh, "committed", 0)
result = {"digest": state_digest(tree, committed), "committed": committed, "evals": evals}
with open(os.path.join(args.out, f"result-{member}.json"), "w") as f:
    json.dump(result, f)
mesh.close()
