"""A small model trained sharded (--stage 1, 2, 3) or not (0) until the global step --steps, resumable.

The loop keys everything on mesh.step (continued by --resume), so a run cut short and resumed on
another number of nodes ends at the same step as one uninterrupted run. Rank 0 saves the parameters
after every step to OUT/params-<step>.npz (to compare an export with), and every worker its final
parameters and mesh.resumed_from to OUT/result-<rank>.npz.
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
parser.add_argument("--stage", type=int, default=2)
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--sleep", type=float, default=0.0, help="seconds each step waits (checkpoints come due)")
parser.add_argument("--forward-sleep", type=float, default=0.0, help="seconds between backward and update")
parser.add_argument("--hidden", type=int, default=48, help="the hidden layers' width")
parser.add_argument("--no-step-params", action="store_true", help="do not save the parameters every step")
parser.add_argument("--times", default="", help="rank 0 logs step times here (bench/reshard.py)")
args = parser.parse_args()

def mark(event: str) -> None:
    # node1's worker only (never the one killed): a restarted worker joining is rank 0 of no ring
    # yet, so is_main alone would log its start as if the job had started again
    if args.times and mesh.is_main and getattr(mesh, "node", "node1") == "node1":
        with open(args.times, "a") as f:
            f.write(json.dumps({"event": event, "step": mesh.step, "t": time.time()}) + "\n")


mesh = meshtrain.init()
mark("started")
mx.random.seed(0)
H = args.hidden
model = nn.Sequential(nn.Linear(12, H), nn.GELU(), nn.Linear(H, H), nn.GELU(), nn.Linear(H, 6))
mx.eval(model.parameters())
rng = np.random.default_rng(1)
X = rng.standard_normal((512, 12)).astype(np.float32)
Y = np.argmax(X @ rng.standard_normal((12, 6)), axis=1).astype(np.int32)
loss_and_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y).mean())
optimizer = optim.AdamW(learning_rate=1e-2, weight_decay=0.01)
if args.stage:
    opt = mesh.shard(model, optimizer, stage=args.stage, wire_dtype="float32")
else:
    mesh.register(model, optimizer)
mark("registered")
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
loss = float("nan")
done = mesh.resumed_from or 0  # the global steps done, counted here (the file names)
for idx in mesh.batches(len(X), args.batch, epoch=0):
    if mesh.step >= args.steps:
        break
    loss_value, grads = loss_and_grad(model, mx.array(X[idx]), mx.array(Y[idx]))
    if args.forward_sleep:  # a step's compute, so a fault "2 ms into the forward" lands in it
        mx.eval(loss_value, grads)
        time.sleep(args.forward_sleep)
    if args.stage:
        opt.update(model, grads, weight=len(idx))
        mx.eval(model.parameters(), opt.state)
    else:
        grads = mesh.allreduce(grads, weight=len(idx), wire_dtype="float32")
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    loss = float(loss_value.item())
    time.sleep(args.sleep)
    mesh.report(loss=loss, samples=len(idx))
    done += 1
    mark("step")
    if args.no_step_params:
        continue
    whole = opt.gather_parameters(model) if args.stage == 3 else dict(tree_flatten(model.parameters()))
    if mesh.is_main:
        np.savez(out / f"params-{done}.npz", **{k: np.array(v) for k, v in whole.items()})
whole = opt.gather_parameters(model) if args.stage == 3 else dict(tree_flatten(model.parameters()))
params = {k: np.array(v) for k, v in whole.items()}
meta = {"resumed_from": mesh.resumed_from, "size": mesh.size, "step": mesh.step, "loss": loss}
np.savez(out / f"result-{mesh.rank}.npz", meta=json.dumps(meta), **params)
if mesh.is_main:
    print(
        f"stage {args.stage}: step {mesh.step} on {mesh.size} workers, resumed from {mesh.resumed_from}",
        flush=True,
    )
