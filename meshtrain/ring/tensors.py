"""Gradient trees to one contiguous float32 buffer and back; the wire casts (meshtrain.ring.codecs).

Tensor fusion: a model's gradients are many small arrays; one all-reduce of
one buffer costs one ring round instead of hundreds. Reduction always happens
in float32; `wire_dtype` only changes what travels (bfloat16 or float16 halve
the bytes); the casts work chunk by chunk (ring/codecs.py), so their
temporaries are one chunk, never the buffer.

Memory: an all-reduce of a tree of P float32 parameters holds, besides the
caller's gradients, the fused input (4P bytes), the float32 result (4P) and,
with a 16-bit wire, the wire buffer (2P) -- all three reused across steps --
and returns the result as MLX arrays viewing one copy of it (4P, which
replaces the gradients the caller drops). bench/allreduce_memory.py measures it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from meshtrain.ring import codecs

WIRE_DTYPES = codecs.names()


def wire_dtype_name(wire_dtype: object) -> str:
    """Normalise the user's wire_dtype (None means float32); UserError if unsupported."""
    return codecs.codec(wire_dtype).name


def wire_numpy_dtype(name: str) -> np.dtype:
    """The numpy storage type of a wire dtype (bfloat16 travels as raw uint16 bits)."""
    return codecs.codec(name).storage


def encode(src: np.ndarray, out: np.ndarray, name: str) -> None:
    """Cast float32 `src` into the wire buffer `out` (same length) with the codec `name`."""
    codecs.codec(name).encode(src, out)


def decode(src: np.ndarray, out: np.ndarray, name: str) -> None:
    """Widen the wire buffer `src` into float32 `out` (same length)."""
    codecs.codec(name).decode(src, out)


def round_trip(x: np.ndarray, name: str) -> np.ndarray:
    """`x` rounded to the wire dtype and back (what a receiver would see)."""
    wire = np.empty(x.shape, wire_numpy_dtype(name))
    out = np.empty(x.shape, np.float32)
    encode(np.ascontiguousarray(x, np.float32), wire, name)
    decode(wire, out, name)
    return out


@dataclass(frozen=True)
class TreeLayout:
    """Where each array leaf of a tree lives in the fused buffer, to rebuild the same tree."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    offsets: tuple[int, ...]
    count: int


def _is_array(leaf: Any) -> bool:
    import mlx.core as mx

    return isinstance(leaf, mx.array)


def flatten_tree(
    tree: Any, buffer: Callable[[int], np.ndarray] | None = None
) -> tuple[np.ndarray, TreeLayout]:
    """One float32 buffer holding every mx.array leaf of `tree`, in traversal order.

    `buffer(n)` supplies it (the ring reuses one across steps: no page faults, no churn);
    without it the buffer is new."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    leaves = cast(list[tuple[str, Any]], tree_flatten(tree))
    arrays: list[Any] = [leaf for _, leaf in leaves if _is_array(leaf)]
    mx.eval(arrays)
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += a.size
    flat = buffer(total) if buffer is not None else np.empty(total, np.float32)
    for a, off in zip(arrays, offsets, strict=True):
        src = a if a.dtype == mx.float32 else a.astype(mx.float32)
        flat[off : off + a.size] = np.asarray(src).reshape(-1)
    layout = TreeLayout(
        shapes=tuple(tuple(a.shape) for a in arrays),
        dtypes=tuple(a.dtype for a in arrays),
        offsets=tuple(offsets),
        count=total,
    )
    return flat, layout


def unflatten_tree(tree: Any, flat: np.ndarray, layout: TreeLayout) -> Any:
    """A tree shaped like `tree` whose array leaves are slices of `flat` (one copy into MLX)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    if flat.size != layout.count:
        raise ValueError(f"buffer of {flat.size} elements does not match layout of {layout.count}")
    fused = mx.array(flat)
    position = iter(range(len(layout.shapes)))
    built: list[Any] = []

    def rebuild(leaf: Any) -> Any:
        if not _is_array(leaf):
            return leaf
        i = next(position)
        off, shape, dtype = layout.offsets[i], layout.shapes[i], layout.dtypes[i]
        size = int(np.prod(shape)) if shape else 1
        out = fused[off : off + size].reshape(shape)
        built.append(out if dtype == mx.float32 else out.astype(dtype))
        return built[-1]

    result = tree_map(rebuild, tree)
    # evaluated here, on the caller's thread and stream: the views are cheap, and a lazy
    # graph would tie the leaves to this thread's MLX stream
    mx.eval(built)
    return result
