"""A checkpoint's arrays: MLX trees to flat safetensors files and back, and MLX's RNG key.

Kept apart from the store's layout (meshtrain/checkpoints/store.py) so that
listing, committing, pruning and transferring checkpoints -- all the agent
does -- never imports MLX: the agent is a network daemon, and only workers
(and `meshtrain export`) touch arrays.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from meshtrain.checkpoints.files import fsync_path, temporary_name

__all__ = ["flatten_tree", "load_arrays", "restore_rng", "rng_state", "save_arrays_atomic", "unflatten_tree"]


def flatten_tree(tree: Any) -> dict[str, mx.array]:
    """A nested dict/list of MLX arrays (module parameters, optimizer state) as {"a.b.0": array}."""
    if isinstance(tree, Mapping) and all(isinstance(v, mx.array) for v in tree.values()):
        return dict(tree)  # already flat
    flat: Any = tree_flatten(tree)
    return {k: v for k, v in flat if isinstance(v, mx.array)}


def unflatten_tree(flat: Mapping[str, mx.array]) -> Any:
    """The inverse of `flatten_tree` for inspection and export. Restoring into a live model goes
    leaf by leaf instead (meshtrain.train.leaves): this tree lacks empty containers."""
    return tree_unflatten(list(flat.items())) if flat else {}


def rng_state() -> list[int]:
    """MLX's global PRNG key as plain ints (JSON-able)."""
    key: Any = mx.random.state[0]  # type: ignore[index]
    return [int(x) for x in key.tolist()]


def restore_rng(state: Iterable[int]) -> None:
    """Put a key saved by `rng_state` back. MLX has no setter; the key array is assigned in place."""
    key: Any = mx.random.state[0]  # type: ignore[index]
    key[:] = mx.array(list(state), dtype=mx.uint32)


def save_arrays_atomic(
    path: Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None
) -> None:
    """Write + fsync under a temporary name (keeping .safetensors: MLX appends it otherwise), rename."""
    tmp = temporary_name(path)
    mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
    fsync_path(tmp)
    os.replace(tmp, path)


def load_arrays(path: Path) -> dict[str, mx.array]:
    arrays = mx.load(str(path))
    assert isinstance(arrays, dict)
    return arrays
