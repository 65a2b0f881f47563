"""`ShardedOptimizer`: any mlx.optimizers optimizer, its state split across the mesh (ZeRO 1, 2, 3).

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
  mean, never the whole averaged gradient;
- stage 3: the parameters are sharded too (a member's model holds only the
  layer arrays it owns, zero-sized placeholders for the rest): each named
  layer is gathered for its forward and its backward, whose custom VJP
  reduce-scatters the layer's gradient at once (meshtrain.shard.gathered);
  the root unit -- every array outside the layers -- stays whole on every
  node and goes through the update as at stage 2. No all-gather of the whole
  model follows the update.

Why the result equals unsharded data parallelism: every parameter array is
updated by the same optimizer code on the same averaged gradient (stage 1:
the very same all-reduce; stage 2: the same sum taken in another order, so
equal to float tolerance), and clipping by global norm uses the norm of the
whole averaged gradient (stage 2: the sum of every shard's squares, all-reduced
exactly as float32), with mlx.optimizers.clip_grad_norm's formula. The
parameters travel as float32, so the replicas stay bit-identical.

Losing a member: at stage 1 with `replicas` R >= 2 (the default on 3 or more
nodes, meshtrain.shard.replicas) every shard of the optimizer state is also
held by the next R-1 members, whose backups take the same update each step.
The step's reduction survives the loss like any data-parallel step's (the
lost member's slice is carried into the next step), and the survivors then
re-plan the shards among themselves, move the state each new holder lacks
from a surviving copy, and go on: no roll-back, every sample once. Otherwise
(stages 2 and 3, R = 1, a joiner, a loss inside the all-gather or the
take-over itself, or every holder of a shard lost at once) the update (stage
3: the next gather) raises `ShardLost`, one line naming the members, rather
than training on with state missing; a job with checkpoints rolls back to
its newest one.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import msgpack
import numpy as np

from meshtrain.errors import PeerLost, UserError
from meshtrain.ring.tensors import flatten_tree
from meshtrain.shard import replicas as placement
from meshtrain.shard.plan import DoesNotFit, ShardPlan, plan_shards
from meshtrain.shard.units import Units, group_leaves, owned_run, piece_sizes

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

    `stage` 1, 2 or 3 (the parameters sharded too: `layers`, default
    model.layers, are gathered one at a time, meshtrain.shard.gathered;
    `prefetch` starts the next layer's gather while one computes).
    `max_grad_norm` clips by the global norm across shards. `wire_dtype`
    is what the gradients travel as ("auto": bfloat16 for float32 models,
    as `mesh.allreduce`; "float32" for sums equal to unsharded training);
    parameters always travel as float32. `free_memory` overrides this
    node's free memory in bytes (a number, or a callable) for the plan;
    `reserve` is what each node keeps outside the training state
    (activations, data), in bytes. `replicas`: how many members hold each
    shard of the optimizer state (default: the job's --shard-replicas, else
    2 at stage 1 on 3 or more nodes where it fits, else 1).
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
        layers: Any = None,
        prefetch: bool = True,
        replicas: int | None = None,
    ) -> None:
        if stage not in (1, 2, 3):
            raise UserError(f"shard stage must be 1, 2 or 3 (got {stage!r})")
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
        self._elems: list[int] = []
        self._dtypes: list[Any] = []
        self._steps = 0
        self.layers = layers  # stage 3: the modules gathered one at a time (default: model.layers)
        self.prefetch = prefetch  # stage 3: the next layer's gather under way while this one computes
        self.units: Units | None = None
        self.gathered: Any = None  # stage 3: meshtrain.shard.gathered.GatheredLayers
        self._model: Any = None
        self.replicas_asked = replicas if replicas is not None else getattr(mesh, "shard_replicas", None)
        self.replicas = 1  # resolved at register (meshtrain.shard.replicas)
        self.backups: dict[int, Any] = {}  # shard index -> an optimizer over that shard's state (a copy)
        self.takeovers = 0
        self.joining = False  # a joiner whose shards come with its first update (a take-over)

    # --- setting up --------------------------------------------------------------------
    def register(self, model: Any) -> ShardPlan | None:
        """Agree on the parameters with the other replicas, plan the shards, initialise this one's state.

        Raises `DoesNotFit` (one line, the numbers per node) before training
        starts when the state cannot fit the nodes' free memory. At stage 3 the
        layers' parameters a member does not own are dropped from its model
        before they are ever evaluated (MLX initialises lazily), so a model
        built but not yet evaluated never exists whole on any node.
        """
        import mlx.core as mx

        from meshtrain.shard import saving  # checkpoints: each member writes its shard

        saving.attach(self)
        self._model = model
        leaves = [(p, v) for p, v in _flat(model.trainable_parameters()) if isinstance(v, mx.array)]
        self._paths = [p for p, _ in leaves]
        self._shapes = [tuple(v.shape) for _, v in leaves]
        self._elems = [int(v.size) for _, v in leaves]
        self._dtypes = [v.dtype for _, v in leaves]
        self._offsets = [0]
        for n in self._elems:
            self._offsets.append(self._offsets[-1] + n)
        layers: list[Any] = []
        prefixes: list[str] = []
        if self.stage == 3:
            layers, prefixes = _stage3_layers(model, self.layers)
            self.units = group_leaves(self._paths, prefixes)
            self.mesh.register(_RootView(model, prefixes), _Replicated())
        else:
            self.mesh.register(model, _Replicated())
        if self.stage == 1 and hasattr(self.mesh, "keep_ring_for_joins"):
            self.mesh.keep_ring_for_joins = True  # a join never re-forms the ring inside an update
        members = tuple(self.mesh.roster)
        if not members:  # a joiner, before its first ring: its shards come in its first update
            self._await_shards()
            return None
        free = self._free_memory_of_all(len(members))
        self.replicas = placement.resolve(self.replicas_asked, self.stage, len(members))
        try:
            self.plan = self._plan(members, free, self.replicas)
        except DoesNotFit:
            if self.replicas == 1 or self.replicas_asked is not None:
                raise
            self.replicas = 1  # auto: the backups do not fit, one copy does
            print(
                "meshtrain: sharded training keeps one copy of each optimizer shard (a backup on a "
                "second node does not fit in memory): a lost node rolls the job back",
                file=sys.stderr,
            )
            self.plan = self._plan(members, free, 1)
        if self.stage == 3:
            self._drop_unowned(model)
        mine = self._own_params(model)
        self.optimizer.init(mine)
        mx.eval(self.optimizer.state)
        self._init_backups(model)
        saving.restore(self)  # a --resume: this member's new shard, re-sliced from the checkpoint's
        if self.stage == 3:
            from meshtrain.shard.gathered import GatheredLayers

            self.gathered = GatheredLayers(self, prefetch=self.prefetch)
            self.gathered.install(layers, prefixes)
        return self.plan

    def _await_shards(self) -> None:
        """A joiner of a job already training: at stage 1 with replicas its first update takes part
        in the others' take-over, which hands it its shards (not the whole optimizer state); at
        stages 2 and 3 the job re-shards for it by a roll-back, which this asks for now."""
        if self.stage != 1:
            raise ShardLost(
                f"a node joined a job sharded at stage {self.stage}: it is given its shards by a roll-back "
                "(with --checkpoint-every the job starts again from its newest checkpoint on every node)"
            )
        self.joining = True
        if hasattr(self.mesh, "on_zero_step"):
            self.mesh.on_zero_step = self._zero_step

    def _plan(self, members: tuple[str, ...], free: Sequence[int], replicas: int) -> ShardPlan:
        """The shards by free memory; with replicas, each node's sharded state counts R times
        (its own shard and the backups of the R-1 before it, near-equal in an even plan)."""
        return plan_shards(
            self._elems,
            members,
            free,
            stage=self.stage,
            state_bytes=state_bytes_per_element(self.optimizer) * replicas,
            reserve=self.reserve + self._gathered_reserve(),
        )

    def _fresh_optimizer(self) -> Any:
        """A copy of the optimizer (its hyper-parameters and schedules) with no per-array state yet."""
        fresh = copy.copy(self.optimizer)
        fresh._state = {k: v for k, v in self.optimizer.state.items() if not isinstance(v, dict)}
        fresh._initialized = False
        return fresh

    def _init_backups(self, model: Any) -> None:
        """The backups this member holds (meshtrain.shard.replicas): the shards of the R-1 before it."""
        import mlx.core as mx

        assert self.plan is not None
        self.backups = {}
        size = len(self.plan.members)
        flat = dict(_flat(model.trainable_parameters()))
        for k in placement.held_shards(self.mesh.rank, size, self.replicas)[1:]:
            backup = self._fresh_optimizer()
            backup.init({self._paths[i]: flat[self._paths[i]] for i in range(*self.plan.leaf_ranges[k])})
            self.backups[k] = backup
        mx.eval([b.state for b in self.backups.values()])

    def _gathered_reserve(self) -> int:
        """Stage 3's memory outside the shards: the root unit whole (parameters, gradient, buffers:
        20 B an element) and the largest layer gathered with its recomputed gradient (16 B)."""
        if self.units is None:
            return 0
        root = sum(self._elems[i] for i in self.units.root)
        layer = max((sum(self._elems[i] for i in unit) for unit in self.units.layers), default=0)
        return 20 * root + 16 * layer

    def _drop_unowned(self, model: Any) -> None:
        """Stage 3: the layers' arrays this member does not own become zero-sized placeholders."""
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        assert self.plan is not None and self.units is not None
        lo, hi = self.plan.leaf_ranges[self.mesh.rank]
        root = set(self.units.root)
        dropped = [
            (self._paths[i], mx.zeros((0,), self._dtypes[i]))
            for i in range(len(self._paths))
            if i not in root and not lo <= i < hi
        ]
        if dropped:
            model.update(tree_unflatten(dropped), strict=False)
        mx.eval(list(self._own_params(model).values()))

    def _free_memory_of_all(self, size: int) -> list[int]:
        """Every member's free memory (MiB granularity, exact in the float32 swap), in rank order."""
        mine = self._free_here()
        vec = np.zeros(size, np.float32)
        vec[self.mesh.rank] = float(min(mine // MiB, 2**24))
        summed = self.mesh.allreduce(vec, weight=1.0, wire_dtype="float32") * size
        return [int(round(float(v))) * MiB for v in summed]

    def _free_here(self) -> int:
        """This node's free memory in bytes (psutil's `available`, or the `free_memory` given)."""
        if self.free_memory is None:
            import psutil

            return int(psutil.virtual_memory().available)
        return int(self.free_memory() if callable(self.free_memory) else self.free_memory)

    # --- what the loop calls --------------------------------------------------------------
    @property
    def state(self) -> Any:
        """This member's shard of the optimizer state (evaluate it with the parameters)."""
        return self.optimizer.state

    @property
    def learning_rate(self) -> Any:
        return self.optimizer.learning_rate

    def update(self, model: Any, grads: Any, weight: float | None = None) -> None:
        """One data-parallel step: average `grads` over the mesh, update this shard, gather the rest.

        `weight` is this worker's share of the global batch (its local batch
        size makes the mean exact; default 1), as for `mesh.allreduce`. At
        stage 3 the layers' gradients were already reduced in the backward,
        weighted by the slice `mesh.batches` handed out, so `weight` may be
        left out and must equal that slice's size when given.
        """
        import mlx.core as mx

        from meshtrain.ring import tensors
        from meshtrain.ring.codecs import resolve as resolve_wire_dtype

        if self.plan is None and not self.joining:
            self.register(model)
        plan = self.plan
        if self.stage != 1:
            assert plan is not None
            self._check_members(plan)  # stage 1: the step's all-reduce survives a change, then a take-over
        rank = self.mesh.rank
        lo_leaf, hi_leaf = plan.leaf_ranges[rank] if plan is not None else (0, 0)
        wire = resolve_wire_dtype(grads, self.wire_dtype)
        if self.stage == 3:
            weight = self._check_weight(weight)
            if self.gathered is not None:
                self.gathered.drain()  # nothing of the backward's still on the ring
        weight = 1.0 if weight is None else weight
        backup_grads: dict[int, dict[str, Any]] = {}
        try:
            if self.stage == 3:
                mine, norm_sq = self._stage3_gradients(grads, weight, wire)
            elif self.stage == 1 or plan is None:
                reduced = self.mesh.allreduce(grads, weight=weight, wire_dtype=wire)
                owed = getattr(self.mesh, "owed_state", ())
                if plan is not None and owed and set(self.mesh.roster) - set(plan.members) <= set(owed):
                    plan = self._padded(plan)  # joined in this step: their shards come in the next
                elif plan is None or tuple(self.mesh.roster) != plan.members:
                    plan = self._take_over(plan)  # the survivors' shards, from the copies
                    rank = self.mesh.rank
                    lo_leaf, hi_leaf = plan.leaf_ranges[rank]
                flat_grads = [g for _, g in _flat(reduced)]
                if len(flat_grads) != len(self._paths):
                    raise UserError("the gradients must have the model's trainable parameters' structure")
                mine = {self._paths[i]: flat_grads[i] for i in range(lo_leaf, hi_leaf)}
                held = self.plan  # the backups are of its shards (a joined step's padded plan renumbers)
                assert held is not None
                backup_grads = {
                    k: {self._paths[i]: flat_grads[i] for i in range(*held.leaf_ranges[k])}
                    for k in self.backups
                }
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
                    wide = shard.astype(np.float64)
                    norm_sq = self._global_norm_sq(float((wide * wide).sum()))
            if norm_sq is not None:
                assert self.max_grad_norm is not None
                total_norm = mx.sqrt(norm_sq)
                normalizer = mx.minimum(self.max_grad_norm / (total_norm + 1e-6), 1.0)
                mine = {k: _scaled(g, normalizer) for k, g in mine.items()}
                backup_grads = {
                    k: {p: _scaled(g, normalizer) for p, g in bg.items()} for k, bg in backup_grads.items()
                }
                self.grad_norm = cast(float, total_norm.item())
            flat_params = dict(_flat(model.trainable_parameters()))
            updated = self.optimizer.apply_gradients(mine, {p: flat_params[p] for p in mine})
            if backup_grads:
                self._update_backups(model, backup_grads)
            assert plan is not None
            if self.stage == 3:
                self._stage3_store(model, updated, plan, rank)
            else:
                self._gather(model, updated, plan, rank)
        except PeerLost as exc:
            raise self._lost(plan or _no_plan(tuple(self.mesh.roster), self.stage), exc) from None
        self._steps += 1

    # --- replicas (meshtrain.shard.replicas) ----------------------------------------------------
    def _update_backups(self, model: Any, grads: dict[int, dict[str, Any]]) -> None:
        """Each backup takes the update its owner takes, from the same averaged gradient (the updated
        parameters come from the owner through the all-gather; the backup's are dropped)."""
        import mlx.core as mx

        flat = dict(_flat(model.trainable_parameters()))
        for k, backup in self.backups.items():
            backup.apply_gradients(grads[k], {p: flat[p] for p in grads[k]})
        mx.eval([b.state for b in self.backups.values()])

    def _take_over(self, old: ShardPlan | None) -> ShardPlan:
        """The members changed since `old` (None: this member is a joiner): cut a new plan over the
        members there are now (each old one by the free memory it had at the start, a joiner by its
        own) and move the state each new holder lacks from a surviving copy
        (meshtrain.shard.replicas.moves). ShardLost where a shard lost every copy, or a peer is
        lost meanwhile. Stage 1, after the step's all-reduce: every member is here, in step."""
        import mlx.core as mx

        now, rank = tuple(self.mesh.roster), self.mesh.rank
        me = now[rank]
        started = time.monotonic()
        old, free = self._agree_on_old_plan(old, now)
        gone = [m for m in old.members if m not in now]
        joined = [m for m in now if m not in old.members]
        if placement.lost_shards(old, now, self.replicas):
            raise self._lost(old, None, now)
        try:
            new = self._plan(now, free, self.replicas)
            todo = placement.moves(old, new, self.replicas)
        except UserError as exc:  # DoesNotFit on fewer nodes
            raise self._lost(old, None, now, because=str(exc)) from None
        held: dict[int, Any] = {}  # leaf -> its optimizer state here
        if me in old.members:
            for k, opt in [(old.members.index(me), self.optimizer), *self.backups.items()]:
                for leaf in range(*old.leaf_ranges[k]):
                    held[leaf] = opt.state[self._paths[leaf]]
        moved = 0
        for source in new.members:  # every member walks the same list in the same order
            group = [m for m in todo if m.source == source]
            if not group:
                continue
            tree = {
                self._paths[m.leaf]: held[m.leaf] if source == me else self._state_template(m.leaf)
                for m in group
            }
            got = self.mesh.broadcast(tree, source == me)
            for m in group:
                if me in m.targets:
                    held[m.leaf] = got[self._paths[m.leaf]]
            moved += sum(self._elems[m.leaf] for m in group)
        scalars = {k: v for k, v in self.optimizer.state.items() if not isinstance(v, dict)}
        shards = placement.held_shards(rank, len(new.members), self.replicas)

        def state_of(k: int) -> dict[str, Any]:
            return {**scalars, **{self._paths[i]: held[i] for i in range(*new.leaf_ranges[k])}}

        self.optimizer.state = state_of(rank)
        backups = {}
        for k in shards[1:]:
            backup = self._fresh_optimizer()
            backup.state = state_of(k)
            backups[k] = backup
        self.backups = backups
        mx.eval(self.optimizer.state, [b.state for b in backups.values()])
        self.plan, self.joining = new, False
        self.takeovers += 1
        what = []
        if gone:
            what.append(f"{', '.join(gone)} left")
        if joined:
            what.append(f"{', '.join(joined)} joined")
        print(
            f"meshtrain: {' and '.join(what) or 'the members changed'}: the optimizer shards re-planned "
            f"over {len(now)} nodes (--shard-replicas {self.replicas}; {moved:,} elements moved in "
            f"{time.monotonic() - started:.2f} s); training goes on without a roll-back",
            file=sys.stderr,
            flush=True,
        )
        return new

    def _padded(self, plan: ShardPlan) -> ShardPlan:
        """Members joined in this very step (they added zeros to its reduction and have no state
        yet): this step still goes by `plan`, its all-gather on the new ring with an empty shard for
        each joiner, who takes part from its step boundary (`_zero_step`). Their shards come with
        their first update, a take-over. A member lost at the same time: ShardLost."""
        now = tuple(self.mesh.roster)
        if any(m not in now for m in plan.members):
            raise self._lost(plan, None, now, because="a node joined while another left")
        blob = None
        source = now.index(plan.members[0])
        if self.mesh.rank == source:
            blob = _plan_blob(plan, {"step": int(getattr(self.mesh, "step", 0))})
        self.mesh.broadcast_bytes(blob, self.mesh.rank == source)
        return _pad(plan, now)

    def _zero_step(self) -> None:
        """A joiner, at the boundary of the step it joined in: the all-gather the others run to end
        that step (with an empty shard of its own); the parameters come next with the job's state."""
        info = msgpack.unpackb(self.mesh.broadcast_bytes(None, False))
        padded = _pad(_plan_of(info, self.stage), tuple(self.mesh.roster))
        out = np.empty(padded.bounds[-1][1], np.float32)
        self.mesh.all_gather(
            np.empty(0, np.float32), padded.sizes, wire_dtype="float32", out=out, step=int(info["step"])
        )

    def _agree_on_old_plan(self, old: ShardPlan | None, now: tuple[str, ...]) -> tuple[ShardPlan, list[int]]:
        """The plan the members held before (a joiner receives it, with the replicas, the optimizer's
        scalars and the step count, from the first member that has it), and every member's free
        memory for the new one: an old member's as measured at the start, a joiner's now."""
        import mlx.core as mx

        size, rank = len(now), self.mesh.rank
        vec = np.zeros(2 * size, np.float32)
        vec[rank] = 1.0 if old is not None else 0.0
        if old is None:
            vec[size + rank] = float(min(self._free_here() // MiB, 2**24))
        summed = self.mesh.allreduce(vec, weight=1.0, wire_dtype="float32") * size
        has_plan = [bool(v > 0.5) for v in summed[:size]]
        if not any(has_plan):
            raise self._lost(old or _no_plan(now, self.stage), None, now, because="no member holds a shard")
        if not all(has_plan):
            source = has_plan.index(True)
            blob = None
            if rank == source:
                assert old is not None
                scalars = {
                    k: [str(np.asarray(v).dtype), np.asarray(v).tolist()]
                    for k, v in self.optimizer.state.items()
                    if isinstance(v, mx.array)
                }
                blob = _plan_blob(old, {"replicas": self.replicas, "steps": self._steps, "scalars": scalars})
            info = msgpack.unpackb(self.mesh.broadcast_bytes(blob, rank == source))
            if old is None:
                old = _plan_of(info, self.stage)
                self.replicas, self._steps = int(info["replicas"]), int(info["steps"])
                for k, (dtype, value) in info["scalars"].items():
                    self.optimizer.state[k] = mx.array(np.asarray(value, dtype=np.dtype(dtype)))
        assert old is not None
        free = [
            old.free[old.members.index(m)] if m in old.members else int(round(float(summed[size + i]))) * MiB
            for i, m in enumerate(now)
        ]
        return old, free

    def _state_template(self, i: int) -> Any:
        """The structure and shapes of leaf `i`'s optimizer state, as zeros (what a broadcast's
        receivers pass in: meshtrain.train.ring_broadcast)."""
        import mlx.core as mx

        path = self._paths[i]
        probe = self._fresh_optimizer()
        probe.init({path: mx.zeros(self._shapes[i], self._dtypes[i])})
        return probe.state[path]

    # --- stage 3 -----------------------------------------------------------------------------
    def _check_weight(self, weight: float | None) -> float:
        step_weight = self._step_weight()
        if weight is not None and abs(float(weight) - step_weight) > 1e-9 * max(1.0, step_weight):
            raise UserError(
                f"stage 3 reduced this step's gradients in the backward with weight {step_weight:g} (the "
                f"slice mesh.batches handed out), but update got weight={weight:g}: leave weight out"
            )
        return step_weight

    def _step_weight(self) -> float:
        """The weight of this step's reductions: the size of the slice mesh.batches handed out last."""
        if getattr(self.mesh, "accumulating", 1) != 1:
            raise UserError(
                "stage 3 reduces the gradients in each backward: accumulate=K is not yet supported at stage 3"
            )
        size = getattr(self.mesh, "local_batch_size", None)
        return 1.0 if size is None else float(size)

    def _global_norm_sq(self, mine: float) -> Any:
        """The squared global norm of the averaged gradient from each member's sum of squares (float32)."""
        import mlx.core as mx

        assert self.plan is not None
        vec = np.zeros(len(self.plan.members), np.float32)
        vec[self.mesh.rank] = mine
        total = self.mesh.allreduce(vec, weight=1.0, wire_dtype="float32") * len(self.plan.members)
        return mx.array(float(np.sum(total.astype(np.float64))), mx.float32)

    def _stage3_gradients(self, grads: Any, weight: float, wire: str) -> tuple[dict[str, Any], Any]:
        """This member's averaged gradients: the root's reduce-scattered now, the layers' as the
        backward left them (already reduced: meshtrain.shard.gathered), and the global norm."""
        import mlx.core as mx

        assert self.plan is not None and self.units is not None
        plan, rank = self.plan, self.mesh.rank
        flat = dict(_flat(grads))
        if set(flat) != set(self._paths):
            raise UserError("the gradients must have the model's trainable parameters' structure")
        root = self.units.root
        sizes = piece_sizes(root, self._elems, plan.leaf_ranges)
        buf, _ = flatten_tree([flat[self._paths[i]] for i in root])
        piece = self.mesh.reduce_scatter(buf, sizes, weight=weight, wire_dtype=wire, overwrite=True)
        del buf
        start, stop = owned_run(root, plan.leaf_ranges[rank])
        owned_root = root[start:stop]
        mine = dict(zip((self._paths[i] for i in owned_root), self.arrays(piece, owned_root), strict=True))
        lo, hi = plan.leaf_ranges[rank]
        in_root = set(root)
        for i in range(lo, hi):
            if i in in_root:
                continue
            g = flat[self._paths[i]]
            if tuple(g.shape) != self._shapes[i]:
                raise UserError(
                    f"stage 3: the gradient of {self._paths[i]!r} has shape {tuple(g.shape)}, not "
                    f"{self._shapes[i]}: take the gradients with nn.value_and_grad of the sharded model"
                )
            mine[self._paths[i]] = g
        norm_sq = None
        if self.max_grad_norm is not None:
            arrays = [mine[self._paths[i]] for i in range(lo, hi)]
            squares = sum((_squared(g) for g in arrays), mx.array(0.0))
            norm_sq = self._global_norm_sq(float(cast(Any, squares).item()))
        return {self._paths[i]: mine[self._paths[i]] for i in range(lo, hi)}, norm_sq

    def _stage3_store(self, model: Any, updated: dict[str, Any], plan: ShardPlan, rank: int) -> None:
        """The updated arrays back into the model: the owned layer arrays stay here, the root unit is
        all-gathered (float32) so every node holds it whole for the next step."""
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        assert self.units is not None
        mx.eval(list(updated.values()), self.optimizer.state)
        root = self.units.root
        sizes = piece_sizes(root, self._elems, plan.leaf_ranges)
        whole = np.empty(sum(sizes), np.float32)
        start, stop = owned_run(root, plan.leaf_ranges[rank])
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        flatten_tree([updated[self._paths[i]] for i in root[start:stop]], buffer=lambda n: whole[lo : lo + n])
        self.mesh.all_gather(whole[lo:hi], sizes, wire_dtype="float32", out=whole)
        self._check_members(plan)
        root_paths = [self._paths[i] for i in root]
        in_root = set(root_paths)
        leaves = [(p, a) for p, a in updated.items() if p not in in_root]
        leaves += list(zip(root_paths, self.arrays(whole, root), strict=True))
        model.update(tree_unflatten(leaves), strict=False)
        mx.eval(model.parameters())
        if self.gathered is not None:
            self.gathered.step_done()

    def arrays(self, buf: np.ndarray, leaves: Sequence[int]) -> list[Any]:
        """MLX arrays of `leaves` (their shapes and dtypes), cut in order out of the float32 `buf`:
        the inverse of meshtrain.ring.tensors.flatten_tree for a run of the model's leaves."""
        import mlx.core as mx

        out, off = [], 0
        for i in leaves:
            a = mx.array(buf[off : off + self._elems[i]]).reshape(self._shapes[i])
            out.append(a if self._dtypes[i] == mx.float32 else a.astype(self._dtypes[i]))
            off += self._elems[i]
        return out

    def owned_parameters(self) -> dict[str, Any]:
        """The whole arrays this member owns, by flat path (a stage-3 checkpoint part's parameters)."""
        assert self._model is not None
        return self._own_params(self._model)

    def gather_parameters(self, model: Any) -> dict[str, Any]:
        """Every trainable parameter whole, as a flat {path: array} (stage 3: gathered layer by layer,
        a collective every member must call; stages 1 and 2: the model's own, already whole)."""
        from mlx.utils import tree_flatten

        flat = dict(tree_flatten(model.trainable_parameters()))
        if self.stage != 3 or self.gathered is None:
            return flat
        assert self.units is not None
        self.gathered.drain()
        for u, unit in enumerate(self.units.layers):
            whole = self.gathered.gather(u, [flat[self._paths[i]] for i in unit])
            for i, a in zip(unit, whole, strict=True):
                flat[self._paths[i]] = a
        return flat

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

    def _lost(
        self,
        plan: ShardPlan,
        exc: PeerLost | None,
        now: tuple[str, ...] | None = None,
        because: str | None = None,
    ) -> ShardLost:
        now = tuple(self.mesh.roster) if now is None else now
        gone = [m for m in plan.members if m not in now]
        new = [m for m in now if m not in plan.members]
        if gone:
            what = f"{', '.join(gone)} left the job"
        elif new:
            what = f"{', '.join(new)} joined the job"
        else:
            what = f"{exc.peer} was lost ({exc.reason})" if exc is not None else "the members changed"
        if because is not None:
            why = because
        elif new and not gone:
            why = "a joiner is given its shards by a roll-back"
        elif self.replicas == 1:
            hint = " (--shard-replicas 2 keeps a second copy)" if self.stage == 1 else ""
            why = f"each shard of the optimizer state is held by one node{hint}"
        else:
            why = "it happened while the shards were being updated or moved, so their copies may differ"
        return ShardLost(
            f"sharded training (stage {self.stage}) stopped after {self._steps} steps: {what}; {why}, so "
            "the job stops instead of training on without it (with --checkpoint-every it rolls back to "
            "its newest checkpoint and goes on)"
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


class _RootView:
    """What `mesh.register` sees of a stage-3 model: the parameters outside its named layers.

    Those are replicated (the root unit), so the mesh agrees on them, digests them and checkpoints
    them as for any job; the layers' arrays are owned by one member each and never compared."""

    def __init__(self, model: Any, prefixes: list[str]) -> None:
        self.model = model
        self.prefixes = prefixes

    def _outside(self, tree: Any) -> Any:
        from mlx.utils import tree_unflatten

        keep = [(p, v) for p, v in _flat(tree) if not _under(p, self.prefixes)]
        return tree_unflatten(keep)

    def parameters(self) -> Any:
        return self._outside(self.model.parameters())

    def trainable_parameters(self) -> Any:
        return self._outside(self.model.trainable_parameters())

    def update(self, parameters: Any, strict: bool = False) -> Any:
        return self.model.update(parameters, strict=False)


def _stage3_layers(model: Any, layers: Any) -> tuple[list[Any], list[str]]:
    """The modules stage 3 gathers one at a time and their paths in the model (default model.layers,
    as nn.Sequential names its own); those without trainable parameters are called as they are."""
    import mlx.nn as nn

    chosen = layers if layers is not None else getattr(model, "layers", None)
    how = (
        "stage 3 gathers the model's layers one at a time: pass them, "
        "mesh.shard(model, optimizer, stage=3, layers=model.blocks) "
        "(a list of nn.Module; default model.layers)"
    )
    modules = isinstance(chosen, (list, tuple)) and all(isinstance(m, nn.Module) for m in chosen)
    if not chosen or not modules:
        raise UserError(how)
    names = {id(m): name for name, m in model.named_modules()}
    prefixes = []
    chosen = [m for m in chosen if _flat(m.trainable_parameters())]  # GELU and kin: nothing to gather
    for m in chosen:
        name = names.get(id(m))
        if not name:
            raise UserError(f"stage 3 layers must be sub-modules of the model ({how})")
        prefixes.append(name)
    return list(chosen), prefixes


def _under(path: str, prefixes: list[str]) -> bool:
    return any(path == q or path.startswith(q + ".") for q in prefixes)


def _no_plan(members: tuple[str, ...], stage: int) -> ShardPlan:
    """An empty plan, for the message of a change nobody can take over from."""
    empty = tuple((0, 0) for _ in members)
    return ShardPlan(members, stage, empty, empty, tuple(0 for _ in members), tuple(0 for _ in members))


def _plan_blob(plan: ShardPlan, extra: dict[str, Any]) -> bytes:
    """A plan as msgpack bytes (what a joiner receives), with `extra` fields."""
    return cast(
        bytes,
        msgpack.packb(
            {
                "members": list(plan.members),
                "leaf_ranges": [list(r) for r in plan.leaf_ranges],
                "bounds": [list(b) for b in plan.bounds],
                "needed": list(plan.needed),
                "free": list(plan.free),
                **extra,
            }
        ),
    )


def _plan_of(info: dict[str, Any], stage: int) -> ShardPlan:
    return ShardPlan(
        tuple(info["members"]),
        stage,
        tuple((int(a), int(b)) for a, b in info["leaf_ranges"]),
        tuple((int(a), int(b)) for a, b in info["bounds"]),
        tuple(int(n) for n in info["needed"]),
        tuple(int(n) for n in info["free"]),
    )


def _pad(plan: ShardPlan, members: tuple[str, ...]) -> ShardPlan:
    """`plan` over `members` (its own and joiners), each joiner with an empty shard: the layout of
    the joined step's all-gather on the new ring. ShardLost where the old members' shards would not
    stay in rank order (the ring collectives cut the buffer in rank order)."""
    ranges, bounds, needed, free = [], [], [], []
    leaf, elem = 0, 0
    for m in members:
        if m in plan.members:
            i = plan.members.index(m)
            if plan.bounds[i][0] != elem:
                raise ShardLost(
                    "sharded training: the ring's new order puts the old members' shards out of order; "
                    "the job re-shards by a roll-back"
                )
            ranges.append(plan.leaf_ranges[i])
            bounds.append(plan.bounds[i])
            needed.append(plan.needed[i])
            free.append(plan.free[i])
            leaf, elem = plan.leaf_ranges[i][1], plan.bounds[i][1]
        else:
            ranges.append((leaf, leaf))
            bounds.append((elem, elem))
            needed.append(0)
            free.append(0)
    return ShardPlan(members, plan.stage, tuple(ranges), tuple(bounds), tuple(needed), tuple(free))
