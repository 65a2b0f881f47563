"""Stage 3's units: which parameter arrays are gathered together, and each member's piece of one (pure).

At stage 3 no node keeps the whole parameter set. The model's trainable leaves (in `tree_flatten`
order, the plan's order) fall into units:

- one unit per layer the caller names (`layers=model.layers`): its leaves are gathered just before
  the layer runs, forward and again in the backward, and dropped right after;
- the root unit, every other leaf (embeddings, final norm, head): kept whole on every node for the
  step, as PyTorch FSDP keeps its root module's, and reduce-scattered then all-gathered around the
  update like stage 2.

The plan (meshtrain.shard.plan) still gives each member a contiguous run of whole leaves, so a
unit's leaves that one member owns are a contiguous run of the unit, and the members' runs come in
rank order: the unit's buffer (its leaves' elements, concatenated) is exactly the uneven ring
collectives' layout, with zero-sized pieces for members that own none of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshtrain.errors import UserError


@dataclass(frozen=True)
class Units:
    """Leaf indices (into the flat trainable leaves) of the root unit and of each layer unit."""

    root: tuple[int, ...]
    layers: tuple[tuple[int, ...], ...]


def group_leaves(paths: Sequence[str], layer_prefixes: Sequence[str]) -> Units:
    """Group the leaves at `paths` by the layer whose path prefix (``"layers.0"``) they fall under.

    A layer must hold trainable parameters and its leaves must be contiguous in the flat order (so
    its gather is one buffer); a layer inside another named layer is refused (it would be gathered
    twice)."""
    prefixes = [p.rstrip(".") for p in layer_prefixes]
    for i, a in enumerate(prefixes):
        for b in prefixes[i + 1 :]:
            if a == b or a.startswith(b + ".") or b.startswith(a + "."):
                raise UserError(f"stage 3 layers must not nest or repeat: {a!r} and {b!r}")
    owner: list[int | None] = []
    for path in paths:
        hits = [i for i, p in enumerate(prefixes) if path == p or path.startswith(p + ".")]
        owner.append(hits[0] if hits else None)
    layers: list[tuple[int, ...]] = []
    for i, prefix in enumerate(prefixes):
        leaves = tuple(k for k, o in enumerate(owner) if o == i)
        if not leaves:
            raise UserError(f"stage 3 layer {prefix!r} has no trainable parameters")
        if leaves != tuple(range(leaves[0], leaves[-1] + 1)):
            raise UserError(
                f"stage 3 layer {prefix!r}: its parameters are not contiguous in the model's order"
            )
        layers.append(leaves)
    root = tuple(k for k, o in enumerate(owner) if o is None)
    return Units(root, tuple(layers))


def owned_run(unit: Sequence[int], leaf_range: tuple[int, int]) -> tuple[int, int]:
    """[start, stop) positions within `unit` of the leaves a member with `leaf_range` owns."""
    lo, hi = leaf_range
    inside = [pos for pos, leaf in enumerate(unit) if lo <= leaf < hi]
    if not inside:
        start = sum(1 for leaf in unit if leaf < lo)
        return start, start
    return inside[0], inside[-1] + 1


def piece_sizes(
    unit: Sequence[int], leaf_elems: Sequence[int], leaf_ranges: Sequence[tuple[int, int]]
) -> list[int]:
    """Each member's piece of the unit's buffer, in elements, in rank order (sums to the unit's size)."""
    sizes = []
    for leaf_range in leaf_ranges:
        start, stop = owned_run(unit, leaf_range)
        sizes.append(int(sum(leaf_elems[leaf] for leaf in unit[start:stop])))
    return sizes
