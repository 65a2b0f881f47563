"""Which parameters each node's shard holds, sized by its free memory (pure).

A shard is a contiguous run of whole parameter arrays (leaves, in the
model's `tree_flatten` order), so every optimizer in `mlx.optimizers` sees
the very arrays it would see unsharded -- Adafactor factors a matrix's
second moment by its shape, Muon orthogonalises matrices -- and the fused
buffer of a shard is one contiguous range, which is what the uneven ring
reduce-scatter and all-gather move. The price is granularity: the smallest
unit of placement is one parameter array.

Memory per node, in bytes per parameter element (float32 training):

    stage 1: replicated 20 (parameters 4, MLX's gradients 4, the fused
             gradient buffer and its all-reduced copy 8, the all-gathered
             parameters 4); sharded: the optimizer state (AdamW: 8)
    stage 2: replicated 16 (no all-reduced copy of the whole gradient);
             sharded: the optimizer state and the gradient shard (4)
    stage 3: replicated 0; sharded: the optimizer state, the parameters (4)
             and their gradient (4); the caller's reserve holds the root unit
             and one gathered layer (meshtrain.shard.units)
    stage 0, for comparison: 20 + the optimizer state, all replicated

plus what the caller reserves (activations, the data). A node's capacity
for its shard is its free memory less the replicated part; shards are cut in
proportion to those capacities (a 16 GB machine takes less than a 64 GB
one). A plan that cannot fit raises `DoesNotFit` whose message has the
numbers: needed against available on every node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshtrain.errors import UserError

REPLICATED_BYTES = {0: 20, 1: 20, 2: 16, 3: 0}  # per parameter element, see the module docstring
SHARDED_GRAD_BYTES = {0: 0, 1: 0, 2: 4, 3: 8}  # stage 3: the gradient and the parameter itself
STAGES = (1, 2, 3)


class DoesNotFit(UserError):
    """The job's training state does not fit in the nodes' free memory (the message says by how much)."""


@dataclass(frozen=True)
class ShardPlan:
    """Member i holds leaves leaf_ranges[i] = [first, stop), which are elements bounds[i] = [start, stop)."""

    members: tuple[str, ...]
    stage: int
    leaf_ranges: tuple[tuple[int, int], ...]
    bounds: tuple[tuple[int, int], ...]
    needed: tuple[int, ...]  # bytes per member under this plan (replicated + its shard + reserve)
    free: tuple[int, ...]

    @property
    def sizes(self) -> list[int]:
        """Shard sizes in elements, in rank order (what the ring collectives take)."""
        return [hi - lo for lo, hi in self.bounds]

    def owner_of(self, leaf: int) -> int:
        return next(i for i, (lo, hi) in enumerate(self.leaf_ranges) if lo <= leaf < hi)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def per_element(stage: int, state_bytes: float) -> tuple[float, float]:
    """(replicated, sharded) bytes per parameter element at `stage`."""
    if stage not in REPLICATED_BYTES:
        raise UserError(f"shard stage must be one of {', '.join(map(str, STAGES))} (got {stage!r})")
    if stage == 0:
        return REPLICATED_BYTES[0] + state_bytes, 0.0
    return float(REPLICATED_BYTES[stage]), state_bytes + SHARDED_GRAD_BYTES[stage]


def plan_shards(
    leaf_elems: Sequence[int],
    members: Sequence[str],
    free: Sequence[int],
    *,
    stage: int,
    state_bytes: float,
    reserve: int = 0,
) -> ShardPlan:
    """Cut the leaves into one contiguous shard per member, in proportion to each one's spare memory.

    `free[i]` is member i's free memory in bytes, `state_bytes` the optimizer
    state per parameter element, `reserve` what each node keeps for itself
    (activations, data). Deterministic: every member computes the same plan
    from the same inputs.
    """
    if len(members) != len(free) or not members:
        raise ValueError("one free-memory figure per member")
    if any(n < 0 for n in leaf_elems):
        raise ValueError("leaf sizes must be >= 0")
    replicated, sharded = per_element(stage, state_bytes)
    total = int(sum(leaf_elems))
    fixed = int(replicated * total) + int(reserve)
    caps = [f - fixed for f in free]
    need_sharded = sharded * total
    ranges = _cut(leaf_elems, caps, sharded) if min(caps) >= 0 else None
    if ranges is None:
        raise DoesNotFit(_does_not_fit(stage, members, free, total, fixed, need_sharded, replicated, sharded))
    offsets = [0]
    for n in leaf_elems:
        offsets.append(offsets[-1] + int(n))
    bounds = tuple((offsets[lo], offsets[hi]) for lo, hi in ranges)
    needed = tuple(fixed + int(sharded * (hi - lo)) for lo, hi in bounds)
    return ShardPlan(tuple(members), stage, tuple(ranges), bounds, needed, tuple(int(f) for f in free))


def _cut(leaf_elems: Sequence[int], caps: Sequence[int], sharded: float) -> list[tuple[int, int]] | None:
    """Contiguous leaf ranges whose shards fit the capacities: proportional cuts, else fill in order."""
    n, count = len(caps), len(leaf_elems)
    total = sum(leaf_elems)
    weights = [max(c, 0) for c in caps]
    if sharded == 0 or total == 0:
        weights = [1] * n
    if sum(weights) == 0:
        return None
    prefix = [0]
    for e in leaf_elems:
        prefix.append(prefix[-1] + e)
    cuts, acc = [0], 0.0
    for w in weights[:-1]:
        acc += w
        target = total * acc / sum(weights)
        # the leaf boundary nearest the target, never before the previous cut
        best = min(range(cuts[-1], count + 1), key=lambda i: (abs(prefix[i] - target), i))
        cuts.append(best)
    cuts.append(count)
    ranges = [(cuts[i], cuts[i + 1]) for i in range(n)]
    if _fits(ranges, prefix, caps, sharded):
        return ranges
    # greedy: each member in rank order takes leaves while they fit (the last takes the rest)
    ranges, start = [], 0
    for i, cap in enumerate(caps):
        stop = start
        if i == n - 1:
            stop = count
        else:
            while stop < count and sharded * (prefix[stop + 1] - prefix[start]) <= cap:
                stop += 1
        ranges.append((start, stop))
        start = stop
    return ranges if _fits(ranges, prefix, caps, sharded) else None


def _fits(ranges: list[tuple[int, int]], prefix: list[int], caps: Sequence[int], sharded: float) -> bool:
    return all(sharded * (prefix[hi] - prefix[lo]) <= cap for (lo, hi), cap in zip(ranges, caps, strict=True))


def _does_not_fit(
    stage: int,
    members: Sequence[str],
    free: Sequence[int],
    total: int,
    fixed: int,
    need_sharded: float,
    replicated: float,
    sharded: float,
) -> str:
    even = fixed + need_sharded / len(members)
    nodes = "; ".join(f"{m} needs {gb(even)}, has {gb(f)} free" for m, f in zip(members, free, strict=True))
    hint = {1: " (stage 2 also shards the gradients)", 2: " (stage 3 also shards the parameters)"}.get(
        stage, ""
    )
    return (
        f"the training state does not fit in memory at shard stage {stage}{hint}: "
        f"{total / 1e6:.1f}M parameters need {gb(fixed)} on every node (replicated: {replicated:g} B each, "
        f"with the reserve) plus {gb(need_sharded)} sharded across {len(members)} nodes "
        f"({sharded:g} B each); {nodes}"
    )
