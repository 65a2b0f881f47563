"""What a checkpoint costs: time and bytes to write, commit, load and copy one, against the disk's raw speed.

    flock /tmp/meshtrain-bench.lock python bench/checkpoint.py [--models cnn,100m] [--dir DIR]

For each model (the MNIST CNN of examples/mnist.py with Adam; a synthetic
100M-parameter stack of 2048x2048 float32 matrices with Adam) it writes one
real checkpoint through `CheckpointStore` (safetensors, sha256, fsync, rename,
atomic manifest), loads it back, fetches it over loopback TCP into a second
store, and compares the write with a plain `write + fsync` of the same number
of bytes on the same filesystem (the disk's own limit). Nothing is hard-coded:
every figure printed is measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim

from meshtrain.checkpoints.arrays import flatten_tree
from meshtrain.checkpoints.store import CheckpointStore
from meshtrain.checkpoints.transfer import CheckpointServer, fetch_checkpoint

REPO = Path(__file__).resolve().parents[1]


def mnist_cnn() -> tuple[Any, Any]:
    spec = importlib.util.spec_from_file_location("mnist_example", REPO / "examples" / "mnist.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.CNN()
    opt = optim.Adam(learning_rate=3e-4)
    opt.init(model.trainable_parameters())
    return model.parameters(), opt.state


def synthetic_100m() -> tuple[Any, Any]:
    """24 x (2048 x 2048) float32 = 100.7M parameters, plus Adam's m and v."""
    mx.random.seed(0)
    params = {"blocks": [{"w": mx.random.normal((2048, 2048)) * 0.02} for _ in range(24)]}
    opt = optim.Adam(learning_rate=1e-4)
    opt.init(params)
    mx.eval(params, opt.state)
    return params, opt.state


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


def measure(name: str, label: str, build: Any, base: Path) -> None:
    params, opt_state = build()
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
    t_copy = asyncio.run(copy_over_loopback(store, CheckpointStore(base / "b"), name, 100))
    t_raw = raw_write(base, info.bytes)
    mb = info.bytes / 1e6
    print(
        f"{label}: {n_params:,} parameters, checkpoint {info.bytes:,} bytes ({record['bytes']:,} in the part)"
    )
    print(f"  write part (safetensors + sha256 + fsync + rename): {t_write:.3f} s  ({mb / t_write:.0f} MB/s)")
    print(f"  commit manifest (write + fsync + rename + fsync dir): {t_commit * 1e3:.1f} ms")
    print(f"  load for resume:                                     {t_load:.3f} s  ({mb / t_load:.0f} MB/s)")
    print(f"  fetch over loopback TCP (verify + install):          {t_copy:.3f} s  ({mb / t_copy:.0f} MB/s)")
    print(f"  raw write + fsync of the same bytes:                 {t_raw:.3f} s  ({mb / t_raw:.0f} MB/s)")
    print(f"  checkpoint write / raw write = {(t_write + t_commit) / t_raw:.2f}x")


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
