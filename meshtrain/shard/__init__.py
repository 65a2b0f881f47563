"""Sharded data-parallel training (ZeRO stages 1, 2 and 3) over the ring.

    opt = mesh.shard(model, optim.AdamW(learning_rate=1e-3), stage=2)   # a ShardedOptimizer
    ...
    opt.update(model, grads, weight=len(idx))

plan.py is pure (which parameters each node holds, by free memory), and so is units.py (stage 3:
which arrays are gathered together, each member's piece), and replicas.py (--shard-replicas: which
members hold a copy of each shard, and what moves when members are lost or join); gathered.py
runs stage 3's layers on parameters gathered for them (a custom VJP that reduce-scatters the
gradient at once); optimizer.py drives the mesh's collectives around any mlx.optimizers optimizer.
checkpoint.py is pure too (a sharded checkpoint's layout: every tensor as flat pieces with offsets,
re-sliced on resume by byte ranges); saving.py is its worker side (what each member writes, how a
resume on any number of nodes restores its shard, export).
"""

from meshtrain.shard.optimizer import ShardedOptimizer, ShardLost
from meshtrain.shard.plan import DoesNotFit, ShardPlan, plan_shards

__all__ = ["DoesNotFit", "ShardLost", "ShardPlan", "ShardedOptimizer", "plan_shards"]
