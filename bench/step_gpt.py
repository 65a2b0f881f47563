"""One transformer training step through meshtrain (world size 1) vs the same step in a plain MLX loop.

examples/shakespeare.py's GPT, its own compiled step functions, AdamW, on real Shakespeare tokens
(char-level) when `meshtrain[lm]` is installed, else on random tokens of the same vocabulary size
(it says which). The meshtrain variant adds what a script pays for the mesh at world size 1:
`mesh.batches`, `mesh.allreduce(grads, weight=...)` and `mesh.report(...)` every step. Variants
alternate step by step (who goes first flips each step), the figure per variant is its median.

    python bench/step_gpt.py --size small --batch 16           # on MLX's CUDA back end: the device recipe
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import meshtrain  # noqa: E402
from meshtrain import blas  # noqa: E402


def load_shakespeare_example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("shakespeare_example", ROOT / "examples" / "shakespeare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "small", "base"], default="small")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    mesh = meshtrain.init()
    ex = load_shakespeare_example()
    import mlx.core as mx
    from mlx.utils import tree_flatten

    try:
        _, train, _ = ex.load_tokens("char")
        vocab = int(train.max()) + 1
        data = "Shakespeare, char-level"
    except Exception as exc:  # noqa: BLE001 - the bench still times the step on random tokens
        vocab = 80
        train = np.random.default_rng(0).integers(0, vocab, 2_000_000).astype(np.int32)
        data = f"random tokens ({type(exc).__name__}: {str(exc)[:60]})"
    base = ex.SIZES[args.size]
    config = ex.GPTConfig(**{**base.__dict__, "vocab_size": vocab})
    block = config.block_size
    mx.random.seed(0)
    model = ex.GPT(config)
    optimizer = ex.make_optimizer(3e-4, 10_000, 100, 0.1)
    loss_and_grad, apply_update = ex.train_functions(model, optimizer, compile=not args.no_compile)
    mx.eval(model.parameters())
    n_windows = (len(train) - 1) // block - 1
    params = sum(v.size for _, v in tree_flatten(model.parameters()))

    def plain_batches() -> Iterator[np.ndarray]:
        epoch = 0
        while True:
            perm = np.random.default_rng([0, epoch]).permutation(n_windows)
            for start in range(0, n_windows - args.batch + 1, args.batch):
                yield perm[start : start + args.batch]
            epoch += 1

    def mesh_batches() -> Iterator[np.ndarray]:
        epoch = 0
        while True:
            yield from mesh.batches(n_windows, args.batch, epoch=epoch, seed=0, drop_last=True)
            epoch += 1

    plain_source, mesh_source = plain_batches(), mesh_batches()

    def plain_step() -> None:
        x, y = ex.windows(train, next(plain_source) * block, block)
        loss, grads = loss_and_grad(x, y)
        apply_update(grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        float(loss)

    step_number = 0

    def mesh_step() -> None:
        nonlocal step_number
        local = next(mesh_source)
        x, y = ex.windows(train, local * block, block)
        loss, grads = loss_and_grad(x, y)
        grads = mesh.allreduce(grads, weight=len(local))
        apply_update(grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        mesh.report(
            epoch=0,
            epochs=1,
            step=step_number,
            steps_per_epoch=n_windows // args.batch,
            loss=float(loss),
            samples=len(local),
        )
        step_number += 1

    def timed(step: Callable[[], None]) -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    for _ in range(3):
        plain_step()
        mesh_step()
    plain_times: list[float] = []
    mesh_times: list[float] = []
    for r in range(args.rounds):
        for i in range(args.steps):
            if (r + i) % 2 == 0:
                plain_times.append(timed(plain_step))
                mesh_times.append(timed(mesh_step))
            else:
                mesh_times.append(timed(mesh_step))
                plain_times.append(timed(plain_step))
    plain_ms = statistics.median(plain_times) * 1e3
    mesh_ms = statistics.median(mesh_times) * 1e3
    ratio = mesh_ms / plain_ms
    tokens = args.batch * block
    print(
        "bench/step_gpt.py: a training step of examples/shakespeare.py's GPT, meshtrain (size 1) vs plain MLX"
    )
    print(
        f"  size {args.size} ({params:,} parameters), {args.batch} x {block} tokens a step, data: {data}, "
        f"{'eager' if args.no_compile else 'mx.compile'} on both, AdamW"
    )
    print(f"  device {mx.default_device()}, MLX {getattr(mx, '__version__', '?')}, BLAS: {blas.describe()}")
    print(f"  {args.rounds * args.steps} steps per variant, alternating step by step; median step time")
    print(f"  plain MLX step:          {plain_ms:8.3f} ms  ({tokens / plain_ms * 1e3:,.0f} tokens/s)")
    print(f"  meshtrain step (size 1): {mesh_ms:8.3f} ms  ({tokens / mesh_ms * 1e3:,.0f} tokens/s)")
    verdict = "ok" if ratio <= 1.03 else "over target"
    print(f"  ratio meshtrain/plain:   {ratio:8.3f}   (target <= 1.03: {verdict})")


if __name__ == "__main__":
    main()
