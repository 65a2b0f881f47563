"""Training state as array leaves by path, put back into the receiver's own tree.

State travels (to a joiner, into a checkpoint) as a flat list of `path -> array`
leaves, because that is what safetensors and the ring carry. Rebuilding a tree
from those paths alone loses what has no array in it: the empty dict a
parameter-free submodule (`nn.Dropout`, an activation) leaves in
`model.parameters()` and in the optimizer's state, and an empty list. Restoring
such a rebuilt tree by replacing subtrees then drops keys the optimizer needs
(`KeyError: 'drop'` at the first update of a nested transformer).

So the receiver never rebuilds: every replica runs the same script, so it
already holds a tree of the same structure, and `assign_leaves` writes each
received leaf into that structure at its path, in place, keeping every
container (and non-array leaf) the receiver has. A leaf that is missing, extra,
or of another shape is a mismatch between the replicas' scripts and is said so.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["LeafMismatch", "array_paths", "assign_leaves", "flat_leaves"]


class LeafMismatch(ValueError):
    """The received leaves do not fit the receiver's tree (the replicas' models or optimizers differ)."""


def _walk(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any, Any]]:
    """(path, container, key, value) for every leaf, in tree_flatten's order and path spelling."""
    if isinstance(tree, Mapping):
        items: Any = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return
    for key, value in items:
        path = f"{prefix}{key}"
        if isinstance(value, (Mapping, list, tuple)):
            yield from _walk(value, path + ".")
        else:
            yield path, tree, key, value


def _is_array(value: Any) -> bool:
    import mlx.core as mx

    return isinstance(value, mx.array)


def flat_leaves(tree: Any) -> dict[str, Any]:
    """{"blocks.0.attn.weight": array, ...}: every array leaf of `tree` by its tree_flatten path."""
    return {path: value for path, _, _, value in _walk(tree) if _is_array(value)}


def array_paths(tree: Any) -> list[str]:
    """The paths of `tree`'s array leaves, in order (what a sender and receiver must agree on)."""
    return list(flat_leaves(tree))


def assign_leaves(tree: Any, leaves: Mapping[str, Any], *, what: str = "state") -> Any:
    """Write `leaves` into `tree` at their paths, in place; returns `tree`.

    Every array leaf of `tree` must be in `leaves` with the same shape, and
    every entry of `leaves` must have an array leaf in `tree` to go to;
    containers, empty ones included, and non-array leaves stay as they are.
    Tuples, being immutable, cannot be assigned into and are refused.
    """
    seen = 0
    for path, container, key, value in list(_walk(tree)):
        if not _is_array(value):
            continue
        if path not in leaves:
            raise LeafMismatch(
                f"{what}: the received state has no {path!r} (do the replicas' models differ?)"
            )
        new = leaves[path]
        if tuple(new.shape) != tuple(value.shape):
            raise LeafMismatch(
                f"{what}: {path!r} has shape {tuple(new.shape)} in the received state, "
                f"{tuple(value.shape)} here (do the replicas' models differ?)"
            )
        if isinstance(container, tuple):
            raise LeafMismatch(f"{what}: {path!r} sits in a tuple, which cannot be assigned in place")
        if new.dtype != value.dtype:
            new = new.astype(value.dtype)
        container[key] = new
        seen += 1
    if seen != len(leaves):
        here = set(flat_leaves(tree))
        extra = sorted(p for p in leaves if p not in here)
        raise LeafMismatch(f"{what}: the received state has leaves this replica lacks: {extra[:3]}")
    return tree
