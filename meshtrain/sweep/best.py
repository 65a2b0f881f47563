"""The best trial's model as one safetensors file, the way `meshtrain export RUN PATH` writes it.

A trial's checkpoints are filed under its run name (``NAME-tK``, resume.py),
so the best trial's newest checkpoint is found like any run's: in whichever
store given holds the newest complete one (a ``--local`` mesh has one store
per node, this machine's agent one for the machine), then exported by the
checkpoint store's own code (``CheckpointStore.export``, or the sharded
assembly for a sharded job), never a copy of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


def newest_store(stores: Iterable[Any], run: str) -> tuple[Any, int] | None:
    """(store, step) of the newest complete checkpoint of `run` among `stores`; None if none has one."""
    found = []
    for store in stores:
        info = store.latest(run)
        if info is not None:
            found.append((info.step, store))
    if not found:
        return None
    step, store = max(found, key=lambda f: f[0])
    return store, step


def export_best(stores: Iterable[Any], run: str, path: Path) -> tuple[Path, int] | None:
    """Write `run`'s newest checkpoint's model to `path`: (path, step), or None when it has none."""
    held = newest_store(stores, run)
    if held is None:
        return None
    store, step = held
    from meshtrain.shard.saving import export_sharded

    path.parent.mkdir(parents=True, exist_ok=True)
    info, written = export_sharded(store, run, step, path) or store.export(run, step, path)
    return Path(written), int(info.step)
