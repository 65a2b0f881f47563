"""A sharded job's checkpoints on the worker: what a member writes, how a resume re-slices, export.

meshtrain.shard.checkpoint is the pure format (pieces with offsets, merging, byte-range reads);
this module is its MLX side, called from three places:

- `attach(opt)`: `ShardedOptimizer.register` hands itself to the worker's checkpointing before the
  mesh registers the (replicated) model, so the checkpoint parts and the resume know the job is
  sharded.
- `part_state` / `part_record`: at a checkpoint boundary each member freezes the parameters (rank 0
  only: they are replicated at stages 1 and 2) and its shard of the optimizer state, and records
  which tensors it holds in its state.json ("shard").
- `load_newest` then `restore(opt)`: a resume finds the newest checkpoint whose parts are all on
  this node, returns the whole parameters for the mesh to adopt, and keeps a reader; once the new
  plan exists (any number of nodes), `restore` reads exactly this member's new shard of the
  optimizer state, tensor by tensor, from whichever old parts hold it. An unsharded job resuming a
  sharded checkpoint gets the whole optimizer state assembled; a sharded job resuming an unsharded
  checkpoint takes its shard out of the whole one.
- `export_sharded`: `meshtrain export` of a sharded checkpoint assembles the parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from meshtrain.errors import UserError
from meshtrain.shard.checkpoint import (
    Piece,
    ShardedCheckpoint,
    TensorEntry,
    find_parts,
    shard_record,
    shard_record_of,
)

__all__ = ["attach", "export_sharded", "load_newest", "part_record", "part_state", "restore", "resume_part"]

Source = Callable[[str], Any]  # optimizer-state name -> mx.array (KeyError when absent)


def attach(opt: Any) -> None:
    """Tell the worker's checkpointing (if the job has any) that `opt` shards the optimizer state.

    The mesh keeps its WorkerCheckpoints as ``_checkpoints`` (worker/mesh.py has no public accessor
    yet); a mesh without one (tests, a single process) has nothing to attach to."""
    checkpoints = getattr(opt.mesh, "_checkpoints", None)
    if checkpoints is not None and hasattr(checkpoints, "sharded"):
        checkpoints.sharded = opt
        opt._checkpoints = checkpoints


def part_state(opt: Any, member: str, tree: Mapping[str, Any]) -> dict[str, Any]:
    """The arrays this member's part holds: the parameters on rank 0 only (stage 3: the ones it
    owns), its optimizer shard."""
    plan = opt.plan
    if plan is None or tuple(opt.mesh.roster) != plan.members:
        # a joiner before its shards, or members changed since the plan (its next update re-plans):
        # a part written now would name holders that are not there; this round fails, the next one
        # is written under the new plan
        raise UserError("the optimizer shards are being re-planned (a node left or joined): not this step")
    index = plan.members.index(member) if member in plan.members else 0
    if opt.stage == 3:  # nobody holds them all: each part has the arrays its member owns
        from mlx.utils import tree_unflatten

        return {"params": tree_unflatten(list(opt.owned_parameters().items())), "opt": opt.optimizer.state}
    return {"params": tree["params"] if index == 0 else {}, "opt": opt.optimizer.state}


def part_record(opt: Any, member: str, snapshot: Any) -> dict[str, Any]:
    """The "shard" record of the part frozen in `snapshot` (meshtrain.shard.checkpoint's format)."""
    plan = opt.plan
    index = plan.members.index(member) if plan is not None and member in plan.members else 0
    entries = []
    for group, arrays in (("params", snapshot.params), ("opt", snapshot.opt)):
        for name, a in arrays.items():
            size = 1
            for d in a.shape:
                size *= int(d)
            entries.append(TensorEntry(name, group, a.dtype, tuple(a.shape), (Piece(index, name, 0, size),)))
    holders = plan.members if plan is not None else (member,)
    bounds = [list(b) for b in plan.bounds] if plan is not None else []
    return shard_record(index, holders, opt.stage, entries, bounds=bounds)


def to_mx(array: Any, dtype: str) -> Any:
    import mlx.core as mx

    out = mx.array(array)
    return out.view(mx.bfloat16) if dtype == "BF16" else out


def load_newest(store: Any, run: str) -> tuple[str, Any] | None:
    """The newest checkpoint of `run` usable here: ("plain", step), or ("sharded", ShardedCheckpoint)
    when every part of it is on this node (an older one when the newest's parts are not all here).
    None when there is none; `UserError` when only sharded ones with missing parts exist."""
    first_error: UserError | None = None
    for info in reversed(store.checkpoints(run)):
        if shard_record_of(info.path) is None:
            return "plain", info.step
        try:
            found = find_parts(store.root, run, info.step)
        except UserError as exc:
            first_error = first_error or exc
            continue
        if found is not None:
            return "sharded", found
    if first_error is not None:
        raise first_error
    return None


def assemble(found: ShardedCheckpoint, group: str) -> dict[str, Any]:
    """Every tensor of `group`, whole, as MLX arrays by flat name."""
    return {name: to_mx(found.read(group, name), found.dtype(group, name)) for name in found.names(group)}


def sharded_source(found: ShardedCheckpoint) -> Source:
    def read(name: str) -> Any:
        if ("opt", name) not in found.tensors:
            raise KeyError(name)
        return to_mx(found.read("opt", name), found.dtype("opt", name))

    return read


def restore(opt: Any) -> bool:
    """After the plan: load this member's new shard of the optimizer state from the resumed
    checkpoint (tensor by tensor, each from the old parts that hold it). False with nothing to load."""
    import mlx.core as mx

    from meshtrain.train.leaves import assign_leaves, flat_leaves

    checkpoints: Any = getattr(opt, "_checkpoints", None)
    if checkpoints is None or not checkpoints.options.resume or checkpoints.joiner:
        return False
    _same_step_everywhere(opt, getattr(checkpoints, "resumed_step", None))
    _restore_owned_params(opt, checkpoints)
    source: Source | None = getattr(checkpoints, "resumed_opt", None)
    if source is None:
        return False
    # this member's shard, and the backups it holds of the shards before it (meshtrain.shard.replicas)
    for state in [opt.optimizer.state, *(b.state for b in getattr(opt, "backups", {}).values())]:
        wanted = flat_leaves(state)
        arrays = {}
        for name, current in wanted.items():
            try:
                arrays[name] = source(name)
            except KeyError:
                raise UserError(
                    f"the checkpoint has no optimizer state {name!r}: resume with the optimizer it was "
                    "saved with"
                ) from None
            if tuple(arrays[name].shape) != tuple(current.shape):
                raise UserError(
                    f"the checkpoint's optimizer state {name!r} has shape {tuple(arrays[name].shape)}, "
                    f"the optimizer's {tuple(current.shape)}: resume with the optimizer it was saved with"
                )
        assign_leaves(state, arrays, what="optimizer state")
        mx.eval(state)
    checkpoints.resumed_opt = None
    return True


def _restore_owned_params(opt: Any, checkpoints: Any) -> None:
    """Stage 3: the layers' arrays this member owns under the new plan, read by name from the
    checkpoint (the mesh adopted only the root unit's, which every node holds)."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    source: Source | None = getattr(checkpoints, "resumed_params", None)
    if source is None or opt.stage != 3:
        return
    lo, hi = opt.plan.leaf_ranges[opt.mesh.rank]
    root = set(opt.units.root)
    loaded = []
    for i in range(lo, hi):
        if i in root:
            continue
        name = opt._paths[i]
        try:
            array = source(name)
        except KeyError:
            raise UserError(
                f"the checkpoint has no parameter {name!r}: resume with the model it was saved with"
            ) from None
        if tuple(array.shape) != opt._shapes[i]:
            raise UserError(
                f"the checkpoint's parameter {name!r} has shape {tuple(array.shape)}, the model's "
                f"{opt._shapes[i]}: resume with the model it was saved with"
            )
        loaded.append((name, array.astype(opt._dtypes[i])))
    if loaded:
        opt._model.update(tree_unflatten(loaded), strict=False)
        mx.eval([a for _, a in loaded])
    checkpoints.resumed_params = None


def _same_step_everywhere(opt: Any, step: int | None) -> None:
    """Every member must have resumed from the same checkpoint: the mesh made the parameters agree,
    but each shard of the optimizer state comes from the step its node found complete."""
    import numpy as np

    mesh = opt.mesh
    size = len(opt.plan.members)
    if size < 2:
        return
    vec = np.zeros(size, np.float32)
    vec[mesh.rank] = float(step if step is not None else -1)
    steps = [int(round(float(v))) for v in mesh.allreduce(vec, weight=1.0, wire_dtype="float32") * size]
    if len(set(steps)) > 1:
        shown = ", ".join(
            f"{m} {'none' if s < 0 else s}" for m, s in zip(opt.plan.members, steps, strict=True)
        )
        raise UserError(
            f"the nodes resumed a sharded job from different checkpoints ({shown}): the newest one's "
            "parts are not on every node yet; resume again once they are, or from an older step"
        )


def export_sharded(store: Any, run: str, step: int | None, path: Path) -> tuple[Any, Path] | None:
    """`meshtrain export` of a sharded checkpoint: the parameters assembled from its parts into one
    safetensors file. None when RUN[@STEP] is not sharded (the store exports it as before)."""
    info = store.find(run, step)
    if shard_record_of(info.path) is None:
        return None
    if step is None:  # the newest whose parts are all here
        newest = load_newest(store, run)
        if newest is not None and newest[0] == "plain":
            return None
        found = newest[1] if newest is not None else None
    else:
        found = find_parts(store.root, run, info.step)
    assert found is not None
    info = store.find(run, found.step)
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    if not path.parent.is_dir():
        raise UserError(f"no such directory: {path.parent}")
    from meshtrain.checkpoints.arrays import save_arrays_atomic

    params = assemble(found, "params")
    if not params:
        raise UserError(f"checkpoint {run}@{info.step} holds no parameters")
    save_arrays_atomic(path, params, {"format": "mlx", "run": run, "step": str(info.step)})
    return info, path


def _split_root(opt: Any, params: dict[str, Any], found: Any, kind: str) -> tuple[dict[str, Any], Source]:
    """(the root unit's parameters, a reader of the rest by name) for a stage-3 resume."""
    root = {opt._paths[i] for i in opt.units.root}
    if kind == "plain":
        rest = {k: v for k, v in params.items() if k not in root}
        return {k: v for k, v in params.items() if k in root}, rest.__getitem__

    def read(name: str) -> Any:
        if ("params", name) not in found.tensors:
            raise KeyError(name)
        return to_mx(found.read("params", name), found.dtype("params", name))

    return {k: v for k, v in params.items() if k in root}, read


def resume_part(checkpoints: Any) -> tuple[dict[str, Any], dict[str, Any], int] | None:
    """WorkerCheckpoints.resume for what involves sharding; None leaves the plain resume to it.

    Returns (state tree {"params", "opt"} of flat dicts, meta with "rng", step), as resume does; a
    sharded job's "opt" is empty (its optimizer registers nothing with the mesh), the reader waits in
    ``checkpoints.resumed_opt`` for `restore`."""
    store, run = checkpoints.store, checkpoints.run
    newest = load_newest(store, run)
    if newest is None:
        return None
    kind, found = newest
    if kind == "plain":
        latest = store.latest(run)
        if checkpoints.sharded is None and latest is not None and latest.step == found:
            return None  # nothing sharded about it: the plain resume
        checkpoint = store.load(run, found)
        saved, step = checkpoint.state, checkpoint.step
        params, whole = dict(checkpoint.params), dict(checkpoint.optimizer)
        opt: dict[str, Any] = whole
        source: Source = whole.__getitem__
    else:
        import json

        saved = json.loads((found.dirs[0] / "state.json").read_text())
        step = found.step
        wanted = checkpoints.sharded
        if wanted is not None and wanted.stage == 3:  # the root unit only: restore() reads the rest
            root = {wanted._paths[i] for i in wanted.units.root}
            params = {
                n: to_mx(found.read("params", n), found.dtype("params", n))
                for n in root
                if ("params", n) in found.tensors
            }
        else:
            params = assemble(found, "params")
        source = sharded_source(found)
        opt = assemble(found, "opt") if checkpoints.sharded is None else {}
    checkpoints.resumed_step = step
    if checkpoints.sharded is not None:
        opt = {}
        checkpoints.resumed_opt = source
        if checkpoints.sharded.stage == 3:  # the mesh adopts the root unit; restore() the owned layers
            params, checkpoints.resumed_params = _split_root(checkpoints.sharded, params, found, kind)
    meta = dict(saved.get("meta") or {})
    meta.setdefault("cursor", saved.get("cursor"))
    meta.setdefault("generation", saved.get("generation", 0))
    meta.setdefault("metrics", saved.get("metrics") or {})
    if saved.get("rng"):
        meta["rng"] = [int(x) for x in saved["rng"]]
    checkpoints.participant.step = step
    return {"params": params, "opt": opt}, meta, step
