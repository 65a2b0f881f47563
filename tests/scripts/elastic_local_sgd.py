"""A tiny local-SGD training script for the elastic tests: tests/scripts/elastic_train.py's loop with
an OuterOptimizer (H local steps, then the outer sync) instead of a per-step all-reduce.

`--die MEMBER:STEP:forward` SIGKILLs that worker when global step STEP is handed out (mid-interval);
`--die MEMBER:STEP:sync` 2 ms into the first outer sync at or after STEP (with `--overlap` it may be
a sync in the background); `--die MEMBER:STEP:presync` just before step STEP's `outer.step`. At
the end every worker writes OUT/result-<member>.json: a digest of its parameters (identical after
the final sync on every replica; the inner optimizers' states stay each worker's own), its step and
sync count.
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
from mlx.utils import tree_map

import meshtrain
from meshtrain.train.digest import state_digest
from meshtrain.train.local_sgd import OuterOptimizer

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--n", type=int, default=384)
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--step-sleep", type=float, default=0.0)
parser.add_argument("--hidden", type=int, default=64)
parser.add_argument("--sync-every", type=int, default=4)
parser.add_argument("--compress", default=None)
parser.add_argument("--overlap", type=int, default=0)
parser.add_argument("--die", action="append", default=[], metavar="MEMBER:STEP:WHERE")
args = parser.parse_args()

mesh = meshtrain.init()
me = str(getattr(mesh, "member", "local"))
rng = np.random.default_rng(123)
x_all = rng.standard_normal((args.n, 16)).astype(np.float32)
y_all = np.argmax(x_all @ rng.standard_normal((16, 4)).astype(np.float32), axis=1).astype(np.int32)
mx.random.seed(0)
model = nn.Sequential(
    nn.Linear(16, args.hidden),
    nn.ReLU(),
    nn.Linear(args.hidden, args.hidden),
    nn.ReLU(),
    nn.Linear(args.hidden, 4),
)
optimizer = optim.Adam(learning_rate=1e-2)
mesh.register(model, optimizer)
outer = OuterOptimizer(
    model,
    mesh,
    sync_every=args.sync_every,
    outer_lr=0.7,
    momentum=0.5,
    compress=args.compress,
    overlap=args.overlap,
)
syncs_at_start = outer.syncs
velocity_at_start = float(sum(float(mx.abs(v).sum()) for v in outer._velocity.values()))
loss_and_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y).mean())
zeros = tree_map(mx.zeros_like, model.trainable_parameters())
armed = {spec for spec in args.die if spec.split(":")[0] == me}


def kill_soon(delay: float) -> None:
    threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
    if delay == 0.0:
        time.sleep(5)


for epoch in range(args.epochs):
    for idx in mesh.batches(args.n, args.batch, epoch=epoch, seed=7):
        at = mesh.step
        for spec in list(armed):
            _, step, where = spec.split(":")
            if where == "forward" and at == int(step):
                kill_soon(0.0)
        if len(idx):
            loss, grads = loss_and_grad(model, mx.array(x_all[idx]), mx.array(y_all[idx]))
            optimizer.update(model, grads)
        else:
            loss = mx.array(0.0)
        mx.eval(model.parameters(), optimizer.state, loss)
        time.sleep(args.step_sleep)
        syncing = outer._steps_since + 1 >= outer.sync_every or outer._rounds.epoch_ends()
        for spec in list(armed):
            _, step, where = spec.split(":")
            if where == "sync" and at >= int(step) and syncing:
                kill_soon(0.002)
            if where == "presync" and at == int(step):
                kill_soon(0.0)
        outer.step(samples=len(idx))
        mesh.report(epoch=epoch, epochs=args.epochs, loss=float(loss), samples=len(idx))
    outer.flush()
    if mesh.is_main:
        print(f"epoch {epoch + 1} done", flush=True)
result = {
    "digest": state_digest({"params": model.parameters()}, mesh.step),
    "committed": mesh.step,
    "syncs": outer.syncs,
    "bytes_sent": outer.bytes_sent,
    "overlapped": outer.overlapped,
    "merges": outer._rounds.merges if outer._rounds is not None else 0,
    "velocity_at_start": velocity_at_start,
    "syncs_at_start": syncs_at_start,
}
with open(os.path.join(args.out, f"result-{me}.json"), "w") as f:
    json.dump(result, f)
mesh.close()
