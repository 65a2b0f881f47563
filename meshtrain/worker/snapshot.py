"""A worker's training state frozen at a step boundary: its checkpoint is written while training goes on.

`freeze` runs on the training thread, at the boundary a Prepare named, and costs no copy: each array
leaf of the parameters and the optimizer state becomes a *new* MLX array object that shares the
leaf's memory (``leaf.reshape(-1)``: MLX gives a row-contiguous array the same buffer, and a
non-contiguous one, rare for parameters, a row-major copy of its own), evaluated there, and exposed
as a read-only byte `memoryview`. The background writer (background_writer.py) then reads only
those bytes: it never calls into MLX, whose evaluation is not thread-safe before 0.31.2 (and whose
streams belong to the thread that made them).

Why those bytes stay exactly the boundary's state while training runs on:

- MLX arrays are immutable values. `optimizer.update` (eager or inside ``mx.compile(...,
  inputs=state, outputs=state)``) and `model.update` put *new* arrays into the containers
  (`model.parameters()` dicts, ``optimizer.state``): the containers change, the old arrays do not.
  So the snapshot keeps its own flat dicts (never the live ``optimizer.state`` dict) of its own
  array objects.
- The only in-place writes in MLX's API, ``a[i] = v`` and ``a += v``, replace what *that Python
  object* refers to (MLX overwrites its descriptor with the result); they never write into memory
  another array still references. Our alias is another object, so it keeps the old value
  (tests/test_checkpoint_async.py checks both, and a compiled update).
- MLX reuses ("donates") an input's buffer for an output only when nothing else references it; the
  alias is such a reference, so no later step can overwrite the frozen buffers. The one way around
  all this is user code writing into an array's memory through a NumPy view of it, which no MLX
  program needs.
- The RNG key is copied as plain ints, and the meta (sampler position, members, metrics) is
  deep-copied: the mesh changes those in place as it trains.

Memory: the snapshot costs nothing when it is taken (shared buffers). As training replaces the
arrays, the old buffers live on until the write finishes, so a checkpoint in flight holds at most
one extra copy of the parameters and optimizer state; with one write in flight at a time
(WorkerCheckpoints waits for it before freezing the next), never more.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FrozenArray", "Snapshot", "freeze"]

# MLX's names in safetensors headers (mlx/io/safetensors.cpp), so MLX loads our files as its own
SAFETENSORS_DTYPES = {
    "float32": "F32",
    "bfloat16": "BF16",
    "float16": "F16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
    "complex64": "C64",
}


@dataclass(frozen=True)
class FrozenArray:
    """One leaf: its safetensors dtype and shape, and its bytes (row-major) in MLX's own memory."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview  # format "B"; holds the aliasing array alive

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


@dataclass
class Snapshot:
    """What one checkpoint part holds, as of the end of `step`."""

    step: int
    params: dict[str, FrozenArray]
    opt: dict[str, FrozenArray]
    rng: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.params.values(), *self.opt.values()))


def freeze(tree: Mapping[str, Any], meta: Mapping[str, Any], step: int) -> Snapshot:
    """Freeze ``{"params": ..., "opt": ...}`` (live MLX trees) and `meta` as of `step` (training thread)."""
    import mlx.core as mx

    from meshtrain.checkpoints.arrays import flatten_tree, rng_state

    opt = tree.get("opt")
    flats = (flatten_tree(tree["params"]), flatten_tree(opt) if opt is not None else {})
    aliases = [{name: value.reshape(-1) for name, value in flat.items()} for flat in flats]
    mx.eval([a for group in aliases for a in group.values()])  # here, not in the writer's thread
    frozen = [
        {name: _frozen(flat[name], alias) for name, alias in group.items()}
        for flat, group in zip(flats, aliases, strict=True)
    ]
    return Snapshot(step, frozen[0], frozen[1], rng_state(), copy.deepcopy(dict(meta)))


def _frozen(leaf: Any, alias: Any) -> FrozenArray:
    dtype = str(leaf.dtype).rpartition(".")[2]
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"cannot checkpoint an array of dtype {dtype}")
    view = memoryview(alias)
    if not view.c_contiguous:  # reshape(-1) always gives a row-major array; say so if MLX ever does not
        raise ValueError(f"MLX gave a non-contiguous buffer for an array of shape {tuple(leaf.shape)}")
    return FrozenArray(SAFETENSORS_DTYPES[dtype], tuple(int(d) for d in leaf.shape), view.cast("B"))
