"""A tiny elastic training script for the fault tests: a plain MLX loop with the meshtrain lines.

Synthetic data (no downloads), a small MLP, Adam. `--step-sleep S` slows each step so a test can kill a
worker mid-training; at the end every worker writes its state digest and step to OUT/result-<member>.json.
"""

from __future__ import annotations

import argparse
import json
import os
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
args = parser.parse_args()

mesh = meshtrain.init()
rng = np.random.default_rng(123)
x_all = rng.standard_normal((args.n, 16)).astype(np.float32)
y_all = np.argmax(x_all @ rng.standard_normal((16, 4)).astype(np.float32), axis=1).astype(np.int32)
mx.random.seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
optimizer = optim.Adam(learning_rate=1e-2)
mesh.register(model, optimizer)
loss_and_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y).mean())
zeros = None
for epoch in range(args.epochs):
    for step, idx in enumerate(mesh.batches(args.n, args.batch, epoch=epoch, seed=7)):
        if len(idx):
            loss, grads = loss_and_grad(model, mx.array(x_all[idx]), mx.array(y_all[idx]))
        else:
            from mlx.utils import tree_map

            loss, grads = mx.array(0.0), tree_map(mx.zeros_like, model.trainable_parameters())
        time.sleep(args.step_sleep)
        grads = mesh.allreduce(grads, weight=len(idx), wire_dtype="float32")
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        mesh.report(epoch=epoch, epochs=args.epochs, step=step, loss=float(loss), samples=len(idx))
    if mesh.is_main:
        print(f"epoch {epoch + 1} done", flush=True)
member = getattr(mesh, "member", "local")
tree = {"params": model.parameters(), "opt": optimizer.state}
committed = getattr(mesh, "committed", 0)
result = {"digest": state_digest(tree, committed), "committed": committed}
with open(os.path.join(args.out, f"result-{member}.json"), "w") as f:
    json.dump(result, f)
mesh.close()
