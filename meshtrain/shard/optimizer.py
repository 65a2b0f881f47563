"""`ShardedOptimizer`: any mlx.optimizers optimizer, its state split across the mesh (ZeRO 1 and 2).

    opt = mesh.shard(model, optim.AdamW(learning_rate=1e-3), stage=2, max_grad_norm=1.0)
    for idx in mesh.batches(n, batch, epoch=e):
        loss, grads = loss_and_grad(model, x[idx], y[idx])
        opt.update(model, grads, weight=len(idx))     # instead of mesh.allreduce + optimizer.update
        mx.eval(model.parameters(), opt.state)

Each member keeps the optimizer state of its shard only (a contiguous run of
whole parameter arrays, meshtrain.shard.plan) and updates only those
parameters; an all-gather then hands every member the others' updated
parameters, so the model stays replicated and the forward and backward are
unchanged.

- stage 1: the gradients are all-reduced whole (the mesh's step reduction,
  which survives a lost peer like any data-parallel step), and each member
  reads its shard out of them;
- stage 2: they are reduce-scattered: a member receives only its shard of the
  mean, never the whole averaged gradient.

Why the result equals unsharded data parallelism: every parameter array is
updated by the same optimizer code on the same averaged gradient (stage 1:
the very same all-reduce; stage 2: the same sum taken in another order, so
equal to float tolerance), and clipping by global norm uses the norm of the
whole averaged gradient (stage 2: the sum of every shard's squares, all-reduced
exactly as float32), with mlx.optimizers.clip_grad_norm's formula. The
parameters travel as float32, so the replicas stay bit-identical.

Losing a member loses its shard of the optimizer state (one copy of each
shard: replicas are not yet built); so does re-sharding for a joiner. The
update then raises `ShardLost`, one line naming the members, rather than
training on with state missing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from meshtrain.errors import PeerLost, UserError
from meshtrain.shard.plan import ShardPlan, plan_shards

MiB = 1 << 20


class ShardLost(UserError):
    """A member holding optimizer state left (or one joined): the sharded job cannot go on correctly.

    `rolls_back` tells the worker's runtime to ask the coordinator for a roll-back rather than a
    failure: a job with checkpoints starts again from its newest complete one (agent/jobs.py)."""

    rolls_back = True


class _Replicated:
    """What `mesh.register` sees of a sharded optimizer: no state (the shards differ by design).

    Registering it makes the replicas agree on the parameters, as in any job,
    without comparing or transferring optimizer state that each member holds a
    different part of."""

    _initialized = True
    state: dict[str, Any] = {}


def state_bytes_per_element(optimizer: Any) -> float:
    """Bytes of optimizer state per parameter element, probed on a copy (the optimizer is untouched)."""
    import mlx.core as mx

    probe = copy.copy(optimizer)
    probe._state = {k: v for k, v in optimizer.state.items() if not isinstance(v, dict)}
    probe._initialized = False
    side = 64
    probe.init({"probe": mx.zeros((side, side))})
    leaves = [v for _, v in _flat(probe.state["probe"]) if isinstance(v, mx.array)]
    return float(sum(v.nbytes for v in leaves)) / (side * side)


class ShardedOptimizer:
    """`optimizer` (from mlx.optimizers, or any with its apply_gradients/init/state) on this member's shard.

    `stage` 1 or 2 (3, sharding the parameters too, is not yet built).
    `max_grad_norm` clips by the global norm across shards. `wire_dtype`
    is what the gradients travel as ("auto": bfloat16 for float32 models,
    as `mesh.allreduce`; "float32" for sums equal to unsharded training);
    parameters always travel as float32. `free_memory` overrides this
    node's free memory in bytes (a number, or a callable) for the plan;
    `reserve` is what each node keeps outside the training state
    (activations, data), in bytes.
    """

    def __init__(
        self,
        optimizer: Any,
        mesh: Any = None,
        *,
        stage: int = 1,
        max_grad_norm: float | None = None,
        wire_dtype: str | None = "auto",
        free_memory: int | Callable[[], int] | None = None,
        reserve: int = 0,
    ) -> None:
        if stage == 3:
            raise UserError("shard stage 3 (sharded parameters, gathered layer by layer) is not yet built")
        if stage not in (1, 2):
            raise UserError(f"shard stage must be 1 or 2 (got {stage!r})")
        if max_grad_norm is not None and not max_grad_norm >= 0:
            raise UserError(f"max_grad_norm must be >= 0 (got {max_grad_norm})")
        if mesh is None:
            import meshtrain

            mesh = meshtrain.init()
        self.optimizer = optimizer
        self.mesh = mesh
        self.stage = stage
        self.max_grad_norm = max_grad_norm
        self.wire_dtype = wire_dtype
        self.free_memory = free_memory
        self.reserve = int(reserve)
        self.plan: ShardPlan | None = None
        self.grad_norm: float | None = None  # the global norm of the last update's averaged gradients
        self._paths: list[str] = []
        self._shapes: list[tuple[int, ...]] = []
        self._offsets: list[int] = [0]
        self._steps = 0

    # --- setting up --------------------------------------------------------------------
    def register(self, model: Any) -> ShardPlan:
        """Agree on the parameters with the other replicas, plan the shards, initialise this one's state.

        Raises `DoesNotFit` (one line, the numbers per node) before training
        starts when the state cannot fit the nodes' free memory.
        """
        import mlx.core as mx

        from meshtrain.shard import saving  # checkpoints: each member writes its shard

        saving.attach(self)
        self.mesh.register(model, _Replicated())
        leaves = [(p, v) for p, v in _flat(model.trainable_parameters()) if isinstance(v, mx.array)]
        self._paths = [p for p, _ in leaves]
        self._shapes = [tuple(v.shape) for _, v in leaves]
        self._offsets = [0]
        for _, v in leaves:
            self._offsets.append(self._offsets[-1] + v.size)
        members = tuple(self.mesh.roster)
        free = self._free_memory_of_all(len(members))
        self.plan = plan_shards(
            [v.size for _, v in leaves],
            members,
            free,
            stage=self.stage,
            state_bytes=state_bytes_per_element(self.optimizer),
            reserve=self.reserve,
        )
        mine = self._own_params(model)
        self.optimizer.init(mine)
        mx.eval(self.optimizer.state)
        saving.restore(self)  # a --resume: this member's new shard, re-sliced from the checkpoint's
        return self.plan

    def _free_memory_of_all(self, size: int) -> list[int]:
        """Every member's free memory (MiB granularity, exact in the float32 swap), in rank order."""
        if self.free_memory is None:
            import psutil

            mine = int(psutil.virtual_memory().available)
        else:
            mine = int(self.free_memory() if callable(self.free_memory) else self.free_memory)
        vec = np.zeros(size, np.float32)
        vec[self.mesh.rank] = float(min(mine // MiB, 2**24))
        summed = self.mesh.allreduce(vec, weight=1.0, wire_dtype="float32") * size
        return [int(round(float(v))) * MiB for v in summed]

    # --- what the loop calls --------------------------------------------------------------
    @property
    def state(self) -> Any:
        """This member's shard of the optimizer state (evaluate it with the parameters)."""
        return self.optimizer.state

    @property
    def learning_rate(self) -> Any:
        return self.optimizer.learning_rate

    def update(self, model: Any, grads: Any, weight: float = 1.0) -> None:
        """One data-parallel step: average `grads` over the mesh, update this shard, gather the rest.

        `weight` is this worker's share of the global batch (its local batch
        size makes the mean exact), as for `mesh.allreduce`.
        """
        import mlx.core as mx

        from meshtrain.ring import tensors
        from meshtrain.ring.codecs import resolve as resolve_wire_dtype

        if self.plan is None:
            self.register(model)
        plan = self.plan
        assert plan is not None
        self._check_members(plan)
        rank = self.mesh.rank
        lo_leaf, hi_leaf = plan.leaf_ranges[rank]
        wire = resolve_wire_dtype(grads, self.wire_dtype)
        try:
            if self.stage == 1:
                reduced = self.mesh.allreduce(grads, weight=weight, wire_dtype=wire)
                self._check_members(plan)
                flat_grads = [g for _, g in _flat(reduced)]
                if len(flat_grads) != len(self._paths):
                    raise UserError("the gradients must have the model's trainable parameters' structure")
                mine = {self._paths[i]: flat_grads[i] for i in range(lo_leaf, hi_leaf)}
                norm_sq = (
                    sum((_squared(g) for g in flat_grads), mx.array(0.0)) if self.max_grad_norm else None
                )
            else:
                flat, layout = tensors.flatten_tree(grads)
                if layout.count != plan.bounds[-1][1] or len(layout.shapes) != len(self._paths):
                    raise UserError("the gradients must have the model's trainable parameters' structure")
                shard = self.mesh.reduce_scatter(
                    flat, plan.sizes, weight=weight, wire_dtype=wire, overwrite=True
                )
                del flat
                mine = self._split(shard, plan, rank, layout.dtypes)
                norm_sq = None
                if self.max_grad_norm is not None:
                    vec = np.zeros(len(plan.members), np.float32)
                    wide = shard.astype(np.float64)
                    vec[rank] = float((wide * wide).sum())
                    total = self.mesh.allreduce(vec, weight=1.0, wire_dtype="float32") * len(plan.members)
                    norm_sq = mx.array(float(np.sum(total.astype(np.float64))), mx.float32)
            if norm_sq is not None:
                assert self.max_grad_norm is not None
                total_norm = mx.sqrt(norm_sq)
                normalizer = mx.minimum(self.max_grad_norm / (total_norm + 1e-6), 1.0)
                mine = {k: _scaled(g, normalizer) for k, g in mine.items()}
                self.grad_norm = cast(float, total_norm.item())
            params = self._own_params(model)
            updated = self.optimizer.apply_gradients(mine, params)
            self._gather(model, updated, plan, rank)
        except PeerLost as exc:
            raise self._lost(plan, exc) from None
        self._steps += 1

    # --- the pieces ------------------------------------------------------------------------
    def _own_params(self, model: Any) -> dict[str, Any]:

        assert self.plan is not None
        lo, hi = self.plan.leaf_ranges[self.mesh.rank]
        flat = dict(_flat(model.trainable_parameters()))
        return {p: flat[p] for p in self._paths[lo:hi]}

    def _split(
        self, shard: np.ndarray, plan: ShardPlan, rank: int, dtypes: tuple[Any, ...]
    ) -> dict[str, Any]:
        """This member's gradient shard (one flat buffer) as its parameter arrays, in their dtypes."""
        import mlx.core as mx

        lo_leaf, hi_leaf = plan.leaf_ranges[rank]
        fused = mx.array(shard)
        out, off = {}, 0
        for i in range(lo_leaf, hi_leaf):
            shape = self._shapes[i]
            size = int(np.prod(shape)) if shape else 1
            g = fused[off : off + size].reshape(shape)
            out[self._paths[i]] = g if dtypes[i] == mx.float32 else g.astype(dtypes[i])
            off += size
        return out

    def _gather(self, model: Any, updated: dict[str, Any], plan: ShardPlan, rank: int) -> None:
        """All-gather the updated shards (float32) and load the whole parameter set into the model."""
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        lo_leaf, hi_leaf = plan.leaf_ranges[rank]
        arrays = [updated[p] for p in self._paths[lo_leaf:hi_leaf]]
        mx.eval(arrays, self.optimizer.state)
        # gathered straight into MLX memory: a writable numpy view of an evaluated, contiguous MLX
        # buffer, so the whole parameter set exists once more in flight, not twice (numpy, then MLX)
        fused = mx.zeros((plan.bounds[-1][1],), mx.float32)
        mx.eval(fused)
        whole = np.array(fused, copy=False)
        if whole.strides != (4,) or not whole.flags.writeable:  # not a plain buffer: gather, then copy
            whole = np.empty(plan.bounds[-1][1], np.float32)
        lo, hi = plan.bounds[rank]
        off = lo
        for a in arrays:
            src = a if a.dtype == mx.float32 else a.astype(mx.float32)
            whole[off : off + a.size] = np.asarray(src).reshape(-1)
            off += a.size
        self.mesh.all_gather(whole[lo:hi], plan.sizes, wire_dtype="float32", out=whole)
        self._check_members(plan)
        if not np.shares_memory(whole, np.array(fused, copy=False)):
            fused = mx.array(whole)
        del whole
        current = dict(_leaf_dtypes(model))
        leaves = []
        for i, path in enumerate(self._paths):
            lo, hi = self._offsets[i], self._offsets[i + 1]
            leaf = fused[lo:hi].reshape(self._shapes[i])
            dtype = current[path]
            leaves.append((path, leaf if dtype == mx.float32 else leaf.astype(dtype)))
        model.update(tree_unflatten(leaves))
        mx.eval(model.parameters())

    def _check_members(self, plan: ShardPlan) -> None:
        now = tuple(self.mesh.roster)
        if now != plan.members:
            raise self._lost(plan, None, now)

    def _lost(self, plan: ShardPlan, exc: PeerLost | None, now: tuple[str, ...] | None = None) -> ShardLost:
        now = tuple(self.mesh.roster) if now is None else now
        gone = [m for m in plan.members if m not in now]
        new = [m for m in now if m not in plan.members]
        if gone:
            what = f"{', '.join(gone)} left the job"
        elif new:
            what = f"{', '.join(new)} joined the job"
        else:
            what = f"{exc.peer} was lost ({exc.reason})" if exc is not None else "the members changed"
        return ShardLost(
            f"sharded training (stage {self.stage}) stopped after {self._steps} steps: {what}; each shard "
            "of the optimizer state is held by one node (--shard-replicas is not yet built), so the job "
            "stops instead of training on without it (with --checkpoint-every it rolls back to its newest "
            "checkpoint and goes on)"
        )


def _squared(g: Any) -> Any:
    import mlx.core as mx

    if g.dtype == mx.float16:
        g = g.astype(mx.float32)
    return g.square().sum()


def _scaled(g: Any, normalizer: Any) -> Any:
    import mlx.core as mx

    if mx.issubdtype(g.dtype, mx.floating):
        return (g * normalizer).astype(g.dtype)
    return g * normalizer


def _leaf_dtypes(model: Any) -> list[tuple[str, Any]]:

    return [(p, v.dtype) for p, v in _flat(model.trainable_parameters()) if hasattr(v, "dtype")]


def _flat(tree: Any) -> list[tuple[str, Any]]:
    """mlx.utils.tree_flatten, typed: (dotted path, leaf) in traversal order."""
    from mlx.utils import tree_flatten

    return cast(list[tuple[str, Any]], tree_flatten(tree))
