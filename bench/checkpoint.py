"""What a checkpoint costs: the training pause, time and bytes to write, commit, load and copy one.

    flock /tmp/meshtrain-bench.lock python bench/checkpoint.py [--models cnn,100m] [--dir DIR]

For each model (the MNIST CNN of examples/mnist.py with Adam; a synthetic
100M-parameter stack of 2048x2048 float32 matrices with Adam) it writes one
real checkpoint through `CheckpointStore` (safetensors, sha256, fsync, rename,
atomic manifest), loads it back, fetches it over loopback TCP into a second
store, and compares the write with a plain `write + fsync` of the same number
of bytes on the same filesystem (the disk's own limit).

The training pause, before and after checkpoint writes went asynchronous:
"before" is that synchronous `write_part` on the training thread (how workers
wrote until then: training waited for it); "after" is a real `WorkerCheckpoints`
given a Prepare: `at_boundary` freezes the state and returns, and the bench
trains on (real steps: the CNN on MNIST-shaped batches, Adam updates of the
100M state) until the background write has acknowledged. It prints the pause,
how long the part took to be durable, the steps trained meanwhile and their
time against steps without a write, the extra memory held while writing, and
whether the part holds the boundary's state bitwise (sha256 of every leaf).
Nothing is hard-coded: every figure printed is measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from meshtrain.checkpoints.arrays import flatten_tree, load_arrays
from meshtrain.checkpoints.options import CheckpointOptions
from meshtrain.checkpoints.store import CheckpointStore
from meshtrain.checkpoints.transfer import CheckpointServer, fetch_checkpoint
from meshtrain.leader.checkpoint import Prepare, to_wire
from meshtrain.worker.checkpointing import WorkerCheckpoints

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Workload:
    """A model's training state and one real training step that replaces it (as training does)."""

    state: Callable[[], dict[str, Any]]
    step: Callable[[], None]


def mnist_cnn() -> Workload:
    spec = importlib.util.spec_from_file_location("mnist_example", REPO / "examples" / "mnist.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mx.random.seed(0)
    model = module.CNN()
    opt = optim.Adam(learning_rate=3e-4)
    opt.init(model.trainable_parameters())
    loss_and_grad = nn.value_and_grad(model, module.loss_fn)
    x = mx.random.normal((64, 28, 28, 1))
    y = mx.random.randint(0, 10, (64,))

    def step() -> None:
        _, grads = loss_and_grad(model, x, y)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)

    step()
    return Workload(lambda: {"params": model.parameters(), "opt": opt.state}, step)


def synthetic_100m() -> Workload:
    """24 x (2048 x 2048) float32 = 100.7M parameters, plus Adam's m and v; a step is an Adam update."""
    mx.random.seed(0)
    params = {"blocks": [{"w": mx.random.normal((2048, 2048)) * 0.02} for _ in range(24)]}
    opt = optim.Adam(learning_rate=1e-4)
    opt.init(params)
    grad = mx.full((2048, 2048), 1e-3)  # one gradient for every block: no 400 MB of gradients to hold
    grads = {"blocks": [{"w": grad} for _ in range(24)]}

    def step() -> None:
        params.update(opt.apply_gradients(grads, params))
        mx.eval(params, opt.state)

    step()
    return Workload(lambda: {"params": params, "opt": opt.state}, step)


MODELS = {
    "cnn": ("MNIST CNN (examples/mnist.py) + Adam", mnist_cnn),
    "100m": ("synthetic 100M + Adam", synthetic_100m),
}


def raw_write(directory: Path, nbytes: int) -> float:
    """Seconds to write nbytes with plain writes and one fsync: the filesystem's own speed."""
    block = os.urandom(1 << 20)
    path = directory / "raw.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    took = time.perf_counter() - start
    path.unlink()
    return took


async def copy_over_loopback(source: CheckpointStore, target: CheckpointStore, run: str, step: int) -> float:
    server = CheckpointServer(source)
    port = await server.start()
    try:
        start = time.perf_counter()
        await fetch_checkpoint("127.0.0.1", port, run, step, store=target)
        return time.perf_counter() - start
    finally:
        await server.close()


def leaf_digests(tree: Any) -> dict[str, str]:
    out = {}
    for name, value in flatten_tree(tree).items():
        view: Any = value.reshape(-1)
        mx.eval(view)
        out[name] = hashlib.sha256(memoryview(view).cast("B")).hexdigest()
    return out


def active_memory() -> int:
    get = getattr(mx, "get_active_memory", None) or mx.metal.get_active_memory
    return int(get())


def timed_steps(work: Workload, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        work.step()
        times.append(time.perf_counter() - start)
    return times


def measure_pause(name: str, work: Workload, base: Path) -> None:
    """The training pause of one checkpoint with the worker's asynchronous writes, and what follows it."""
    acked: list[float] = []
    options = CheckpointOptions.from_dict({"run": name, "checkpoint_every": "100"})
    assert options is not None

    def report(message: dict[str, Any]) -> None:
        if message.get("msg", {}).get("type") == "written":
            acked.append(time.perf_counter())

    ck = WorkerCheckpoints(
        options, node="a", member="a", report=report, store=CheckpointStore(base / "async")
    )
    alone = timed_steps(work, 5)
    memory_before = active_memory()
    expected = {k: leaf_digests(v) for k, v in work.state().items()}
    ck.on_message(to_wire(Prepare(name, 1, "a", 200, ("a",))))
    start = time.perf_counter()
    ck.at_boundary(200, work.state, {"members": ["a"], "cursor": {"epoch": 0, "index": 12800}})
    pause = time.perf_counter() - start
    during: list[float] = []
    memory_during = 0
    step = 200
    while ck.writing is not None:
        during += timed_steps(work, 1)
        if ck.writing is not None:  # the frozen state is still held: what it costs on top of training
            memory_during = max(memory_during, active_memory())
        step += 1
        ck.at_boundary(step, work.state, {"members": ["a"]})
    assert ck.wait(600) and acked, ck.failures
    durable = acked[0] - start
    directory = ck.store.step_dir(name, 200)
    got = {
        "params": leaf_digests(load_arrays(directory / "params.safetensors")),
        "opt": leaf_digests(load_arrays(directory / "optimizer.safetensors")),
    }
    state_mb = sum(v.nbytes for t in work.state().values() for v in flatten_tree(t).values()) / 1e6
    print(f"  training pause, after (freeze at the boundary, write in the background): {pause * 1e3:.1f} ms")
    print(f"  background write until acknowledged:                 {durable:.3f} s")
    if during:
        slower = statistics.median(during) / statistics.median(alone)
        print(
            f"  steps trained meanwhile: {len(during)}, median {statistics.median(during) * 1e3:.1f} ms "
            f"({slower:.2f}x a step without a write, {statistics.median(alone) * 1e3:.1f} ms)"
        )
    if memory_during:
        extra = (memory_during - memory_before) / 1e6
        print(f"  extra MLX memory held while writing: {extra:.0f} MB (the state: {state_mb:.0f} MB)")
    print(f"  the part holds the boundary's state bitwise: {got == expected}")


def measure(name: str, label: str, build: Any, base: Path) -> None:
    work = build()
    state = work.state()
    params, opt_state = state["params"], state["opt"]
    n_params = sum(v.size for v in flatten_tree(params).values())
    store = CheckpointStore(base / "a")
    start = time.perf_counter()
    record = store.write_part(name, 100, params, opt_state, cursor={"epoch": 0, "index": 6400})
    t_write = time.perf_counter() - start
    start = time.perf_counter()
    info = store.commit(name, 100, {"replicas": ["a"]})
    t_commit = time.perf_counter() - start
    start = time.perf_counter()
    loaded = store.load(name, 100)
    mx.eval(list(loaded.params.values()), list(loaded.optimizer.values()))
    t_load = time.perf_counter() - start
    del loaded
    t_copy = asyncio.run(copy_over_loopback(store, CheckpointStore(base / "b"), name, 100))
    t_raw = raw_write(base, info.bytes)
    mb = info.bytes / 1e6
    print(
        f"{label}: {n_params:,} parameters, checkpoint {info.bytes:,} bytes ({record['bytes']:,} in the part)"
    )
    print(f"  write part (safetensors + sha256 + fsync + rename): {t_write:.3f} s  ({mb / t_write:.0f} MB/s)")
    print(f"  training pause, before (that write, synchronous):    {t_write:.3f} s")
    print(f"  commit manifest (write + fsync + rename + fsync dir): {t_commit * 1e3:.1f} ms")
    print(f"  load for resume:                                     {t_load:.3f} s  ({mb / t_load:.0f} MB/s)")
    print(f"  fetch over loopback TCP (verify + install):          {t_copy:.3f} s  ({mb / t_copy:.0f} MB/s)")
    print(f"  raw write + fsync of the same bytes:                 {t_raw:.3f} s  ({mb / t_raw:.0f} MB/s)")
    print(f"  checkpoint write / raw write = {(t_write + t_commit) / t_raw:.2f}x")
    shutil.rmtree(base / "a", ignore_errors=True)
    shutil.rmtree(base / "b", ignore_errors=True)
    measure_pause(name, work, base)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="cnn,100m")
    parser.add_argument("--dir", help="filesystem to measure on (default: a temp dir)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="meshtrain-ckpt-cost-", dir=args.dir))
    print(f"MLX {importlib.metadata.version('mlx')} on {mx.default_device()}, files under {base}")
    try:
        for name in args.models.split(","):
            label, build = MODELS[name]
            measure(name, label, build, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
