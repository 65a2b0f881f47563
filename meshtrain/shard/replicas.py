"""Which members hold a copy of each optimizer shard, and what moves when members are lost (pure).

With `--shard-replicas R` the shard of rank k (its optimizer state) is held
by members k, k+1, ..., k+R-1 (mod N): its owner and the next R-1 members
around the ring. So member r keeps its own shard and a backup of the shards
of the R-1 members before it. Each step a backup is brought up to date by
the same optimizer update its owner runs (stage 1: every member holds the
whole averaged gradient, so this costs compute, no traffic), which keeps it
bit-identical to the owner's.

A joiner holds nothing: the same re-plan hands it its shards (and only
those), from their holders.

When members are lost, every shard still has a holder unless all R of its
holders went together. The survivors cut a new plan (their own free memory,
as at the start: the shards are spread again evenly) and `moves` lists, leaf
by leaf, the state a new holder lacks and the surviving holder that sends
it; every member computes the same list from the same old plan, survivors
and new plan, so nothing about it is negotiated.

Why not simply hand the lost shard to the backup holder and move nothing?
That member would then hold two shards (twice the memory) for the rest of
the job, and the new backups must move anyway: re-planning costs a little
more traffic once and keeps every member's memory at 1/N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshtrain.errors import UserError
from meshtrain.shard.plan import ShardPlan

AUTO_NODES = 3  # auto: replicas where the mesh has this many nodes (with 2, a backup is the whole state)


class ShardsLost(UserError):
    """Every holder of some shard left at once: its optimizer state is gone."""


@dataclass(frozen=True)
class Move:
    """Leaf `leaf`'s optimizer state goes from member `source` to `targets` (who lack it)."""

    leaf: int
    source: str
    targets: tuple[str, ...]


def resolve(replicas: int | None, stage: int, size: int) -> int:
    """How many members hold each shard: `replicas` as asked (at most `size`), or by default 2 at
    stage 1 on AUTO_NODES or more members, else 1. Stages 2 and 3 have one copy (not yet built)."""
    if replicas is not None and replicas < 1:
        raise UserError(f"shard replicas must be >= 1 (got {replicas})")
    if replicas is not None and replicas > 1 and stage != 1:
        raise UserError(
            f"--shard-replicas {replicas} is built for shard stage 1 only (got stage {stage}); "
            "at stages 2 and 3 a lost node rolls the job back to its newest checkpoint"
        )
    if replicas is None:
        replicas = 2 if stage == 1 and size >= AUTO_NODES else 1
    return max(1, min(replicas, size))


def held_shards(rank: int, size: int, replicas: int) -> list[int]:
    """The shards member `rank` holds: its own first, then the backups of the members before it."""
    return [(rank - j) % size for j in range(min(replicas, size))]


def holders(shard: int, size: int, replicas: int) -> list[int]:
    """The ranks holding shard `shard`: its owner first."""
    return [(shard + j) % size for j in range(min(replicas, size))]


def held_leaves(plan: ShardPlan, member: str, replicas: int) -> set[int]:
    """Every leaf whose optimizer state `member` holds under `plan` (its shard and its backups)."""
    size, rank = len(plan.members), plan.members.index(member)
    out: set[int] = set()
    for k in held_shards(rank, size, replicas):
        out.update(range(*plan.leaf_ranges[k]))
    return out


def lost_shards(plan: ShardPlan, survivors: Sequence[str], replicas: int) -> list[str]:
    """The members whose shard has no surviving holder (empty: every shard survived)."""
    size, alive = len(plan.members), set(survivors)
    return [
        owner
        for k, owner in enumerate(plan.members)
        if plan.leaf_ranges[k][0] < plan.leaf_ranges[k][1]
        and not any(plan.members[h] in alive for h in holders(k, size, replicas))
    ]


def moves(old: ShardPlan, new: ShardPlan, replicas: int) -> list[Move]:
    """What must move so every holder under `new` has its leaves, from `old`'s surviving holders.

    `new.members` are the survivors of `old` and any joiners (which hold nothing). Raises
    ShardsLost when a shard lost every holder. The source of a leaf is its
    surviving holder of lowest rank in `new`, so every member agrees.
    """
    survivors = new.members  # and joiners, which hold nothing yet
    gone = lost_shards(old, survivors, replicas)
    if gone:
        raise ShardsLost(
            f"the optimizer state of {', '.join(gone)} is lost: every node holding a copy of it "
            f"(--shard-replicas {replicas}) left at once"
        )
    held = {m: held_leaves(old, m, replicas) if m in old.members else set() for m in survivors}
    size = len(survivors)
    out: list[Move] = []
    for k in range(size):
        need = [survivors[h] for h in holders(k, size, replicas)]
        for leaf in range(*new.leaf_ranges[k]):
            targets = tuple(m for m in need if leaf not in held[m])
            if targets:
                source = next(m for m in survivors if leaf in held[m])
                out.append(Move(leaf, source, targets))
    return out
