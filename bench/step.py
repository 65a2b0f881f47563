"""One training step through meshtrain (world size 1) vs the same step in a plain MLX loop.

Both variants run examples/mnist.py's own model and compiled step functions on
the same data. The meshtrain variant adds what a script pays for the mesh at
world size 1: `mesh.batches`, `mesh.allreduce(grads, weight=...)` and
`mesh.report(...)` every step. The variants alternate step by step (who goes
first flips each time) and the figure per variant is its median step time, so
drift and the bursts of other processes on a shared machine hit both alike.

    python bench/step.py --model mlp      # the CPU default
    python bench/step.py --model cnn      # the GPU default (slow on a CPU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
from mnist_example import load_example

import meshtrain
from meshtrain import blas
from meshtrain.datasets import mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["mlp", "cnn"], default=None, help="default: as the example")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--steps", type=int, default=20, help="steps per variant per round")
    parser.add_argument("--no-compile", action="store_true", help="eager MLX in both variants")
    args = parser.parse_args()

    mesh = meshtrain.init()  # also gives MLX the fast BLAS on a Linux CPU, for both variants
    example = load_example()
    import mlx.core as mx
    import mlx.optimizers as optim

    model_name = args.model or example.default_model()
    images, labels = mnist("train")
    x_all, y_all = example.prepare(images, model_name), mx.array(labels.astype(np.int32))
    n = len(labels)

    mx.random.seed(0)
    model = example.MODELS[model_name]()
    optimizer = optim.Adam(learning_rate=1e-3)
    loss_and_grad, apply_update = example.train_functions(model, optimizer, compile=not args.no_compile)
    mx.eval(model.parameters())

    def plain_batches() -> Iterator[np.ndarray]:
        epoch = 0
        while True:
            perm = np.random.default_rng([0, epoch]).permutation(n)
            for start in range(0, n - args.batch_size + 1, args.batch_size):
                yield perm[start : start + args.batch_size]
            epoch += 1

    def mesh_batches() -> Iterator[np.ndarray]:
        epoch = 0
        while True:
            yield from mesh.batches(n, args.batch_size, epoch=epoch, seed=0, drop_last=True)
            epoch += 1

    plain_source, mesh_source = plain_batches(), mesh_batches()

    def plain_step() -> None:
        idx = mx.array(next(plain_source))
        loss, grads = loss_and_grad(x_all[idx], y_all[idx])
        apply_update(grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        float(loss)

    step_number = 0

    def mesh_step() -> None:
        nonlocal step_number
        local = next(mesh_source)
        idx = mx.array(local)
        loss, grads = loss_and_grad(x_all[idx], y_all[idx])
        grads = mesh.allreduce(grads, weight=len(local))
        apply_update(grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        mesh.report(
            epoch=0,
            epochs=1,
            step=step_number,
            steps_per_epoch=n // args.batch_size,
            loss=float(loss),
            samples=len(local),
        )
        step_number += 1

    def timed(step: Callable[[], None]) -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    for _ in range(3):  # compile and warm both paths
        plain_step()
        mesh_step()
    plain_times: list[float] = []
    mesh_times: list[float] = []
    for r in range(args.rounds):
        for i in range(args.steps):  # alternate step by step; who goes first flips every step and round
            if (r + i) % 2 == 0:
                plain_times.append(timed(plain_step))
                mesh_times.append(timed(mesh_step))
            else:
                mesh_times.append(timed(mesh_step))
                plain_times.append(timed(plain_step))

    plain_ms = statistics.median(plain_times) * 1e3
    mesh_ms = statistics.median(mesh_times) * 1e3
    ratio = mesh_ms / plain_ms
    print("bench/step.py: one training step of examples/mnist.py, meshtrain (world size 1) vs plain MLX")
    print(
        f"  model {model_name}, global batch {args.batch_size}, real MNIST, "
        f"{'eager' if args.no_compile else 'mx.compile'} on both"
    )
    print(f"  device {mx.default_device()}, MLX {getattr(mx, '__version__', '?')}, BLAS: {blas.describe()}")
    print(f"  {args.rounds * args.steps} steps per variant, alternating step by step; median step time")
    print(f"  plain MLX step:          {plain_ms:8.3f} ms")
    print(f"  meshtrain step (size 1): {mesh_ms:8.3f} ms   (batches + allreduce + report)")
    verdict = "ok" if ratio <= 1.03 else "over target"
    print(f"  ratio meshtrain/plain:   {ratio:8.3f}   (target <= 1.03: {verdict})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
