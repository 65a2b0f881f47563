"""A small transformer-like model trained data-parallel, unsharded (--stage 0) or sharded (1, 2, 3).

Synthetic data, seeded; float32 on the wire so sharded and unsharded runs can be compared to float
tolerance. At the end every worker writes its parameters, a few figures and MLX's peak memory to
OUT/result-<rank>.npz.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

import meshtrain

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--stage", type=int, default=0)
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--dim", type=int, default=32)
parser.add_argument("--layers", type=int, default=3)
parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "adafactor", "lion"])
parser.add_argument("--clip", type=float, default=0.0, help="clip by global norm (0: no clipping)")
parser.add_argument("--seed-by-rank", action="store_true", help="each worker initialises differently")
parser.add_argument("--wire", default="float32", help="the gradients' wire dtype (parameters: float32)")
parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds a step sleeps")
parser.add_argument("--sleep-between", action="store_true", help="sleep between steps, not before the update")
parser.add_argument("--free-mb", default="", help="comma separated: this rank's free memory for the plan")
args = parser.parse_args()

VOCAB, SEQ = 64, 12


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiHeadAttention(dim, 4)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def __call__(self, x: mx.array) -> mx.array:
        h = self.norm(x)
        x = x + self.attn(h, h, h)
        return x + self.mlp(x)


class Tiny(nn.Module):
    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = [Block(dim) for _ in range(layers)]
        self.head = nn.Linear(dim, VOCAB)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def make_optimizer() -> optim.Optimizer:
    if args.optimizer == "sgd":
        return optim.SGD(learning_rate=0.05, momentum=0.9, weight_decay=1e-4)
    if args.optimizer == "adafactor":
        return optim.Adafactor(learning_rate=1e-2)
    if args.optimizer == "lion":
        return optim.Lion(learning_rate=1e-3, weight_decay=0.01)
    return optim.AdamW(learning_rate=3e-3, weight_decay=0.01)


mesh = meshtrain.init()
mx.random.seed(mesh.rank if args.seed_by_rank else 0)
model = Tiny(args.dim, args.layers)
mx.eval(model.parameters())
rng = np.random.default_rng(1)
data = rng.integers(0, VOCAB, size=(256, SEQ + 1))
X, Y = mx.array(data[:, :-1]), mx.array(data[:, 1:])


def loss_fn(m: Tiny, x: mx.array, y: mx.array) -> mx.array:
    return nn.losses.cross_entropy(m(x), y).mean()


loss_and_grad = nn.value_and_grad(model, loss_fn)
optimizer = make_optimizer()
plan = None
if args.stage:
    free = {}
    if args.free_mb:
        free["free_memory"] = int(args.free_mb.split(",")[mesh.rank]) << 20
    if args.stage == 3:
        free["layers"] = model.blocks
    sharded = mesh.shard(
        model, optimizer, stage=args.stage, max_grad_norm=args.clip or None, wire_dtype=args.wire, **free
    )
    plan = sharded.plan
else:
    mesh.register(model, optimizer)
mx.reset_peak_memory()
step, loss = 0, float("nan")
for epoch in range(-(-args.steps // (len(data) // args.batch))):
    for idx in mesh.batches(len(data), args.batch, epoch=epoch):
        xb, yb = X[mx.array(idx)], Y[mx.array(idx)]
        loss_value, grads = loss_and_grad(model, xb, yb)
        if args.step_sleep and not args.sleep_between:  # a joiner's view comes mid-step, as in a big model
            mx.eval(loss_value, grads)
            time.sleep(args.step_sleep)
        if args.stage:
            sharded.update(model, grads, weight=len(idx))
            mx.eval(model.parameters(), sharded.state)
        else:
            grads = mesh.allreduce(grads, weight=len(idx), wire_dtype=args.wire)
            if args.clip:
                grads, _ = optim.clip_grad_norm(grads, args.clip)
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state)
        loss = float(loss_value.item())
        mesh.report(step=step, loss=loss, samples=len(idx))
        # the global step where a joiner came in part-way (stages 2 and 3 commit at the next boundary)
        step = max(step + 1, mesh.step)
        if args.step_sleep and args.sleep_between:  # ... or at a step boundary
            time.sleep(args.step_sleep)
        if step >= args.steps:
            break

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
whole = sharded.gather_parameters(model) if args.stage else dict(tree_flatten(model.parameters()))
params = {k: np.array(v) for k, v in whole.items()}
meta = {
    "rank": mesh.rank,
    "size": mesh.size,
    "peak": mx.get_peak_memory(),
    "sizes": plan.sizes if plan is not None else None,
    "loss": loss,
    "takeovers": sharded.takeovers if args.stage else 0,
    "plan_members": list(sharded.plan.members) if args.stage and sharded.plan is not None else None,
    "prefetched": sharded.gathered.prefetched if args.stage == 3 else 0,
    "gathers": sharded.gathered.gathers if args.stage == 3 else 0,
}
np.savez(out / f"result-{mesh.rank}.npz", meta=json.dumps(meta), **params)
if mesh.is_main:
    print(f"stage {args.stage}: loss {loss:.4f} after {step} steps on {mesh.size} workers", flush=True)
