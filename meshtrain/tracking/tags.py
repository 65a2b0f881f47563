"""Model versions: `meshtrain tag RUN@STEP NAME` names a checkpoint, and a named one is never pruned.

A tag lives in two places on every node that holds the checkpoint:

- ``checkpoints/RUN/.tags.json`` ({tag: step}) beside the checkpoints themselves, because the
  pruning (`CheckpointStore.prune`, run by each worker after each checkpoint with ``--keep``)
  must see it without opening anything else: tagged steps are kept and not counted in ``--keep``;
- the run store's ``tags`` table, so `meshtrain runs show` lists a run's model versions.

`meshtrain tag` writes every store of this machine that holds the checkpoint (the machine's and
those of a ``--local`` mesh's other nodes) and, when an agent runs here, asks it to tell every
live peer (``runs.tag``), whose agents tag their own copies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from meshtrain.errors import UserError

_TAG = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")


def check_tag(name: str) -> str:
    if not _TAG.match(name) or "@" in name:
        raise UserError(f"bad tag {name!r}: start with a letter; then letters, digits, '.', '_' and '-'")
    return name


def parse_target(text: str, runs: Any | None) -> tuple[str | None, str, int | None]:
    """``RUN@STEP`` -> (recorded run id or None, checkpoint run, step or None for the newest).

    RUN is a recorded run (id, prefix or name: its checkpoints are under its checkpoint run name)
    or a checkpoint run name as `meshtrain checkpoints` lists it.
    """
    from meshtrain.checkpoints.store import check_run_name

    run, sep, step_text = text.partition("@")
    step: int | None = None
    if sep:
        if not step_text.isdigit():
            raise UserError(f"{text!r}: the step after '@' must be a whole number (RUN@STEP)")
        step = int(step_text)
    record = None
    if runs is not None:
        try:
            record = runs.resolve(run)
        except UserError:
            record = None
    if record is not None and record.options.get("run"):
        return record.id, str(record.options["run"]), step
    check_run_name(run)
    if runs is not None:  # the newest recorded run that checkpointed under this name
        for candidate in reversed(runs.runs()):
            if candidate.options.get("run") == run and candidate.options.get("checkpoint_every"):
                return candidate.id, run, step
    return None, run, step


def write_tag(store: Any, ckpt_run: str, step: int, name: str) -> None:
    """Add `name` -> `step` to RUN/.tags.json of one checkpoint store (atomically)."""
    from meshtrain.checkpoints.store import TAGS, write_json_atomic

    tags = {k: v for k, v in store.tagged_steps(ckpt_run).items() if k != name}
    tags[name] = int(step)
    write_json_atomic(store.run_dir(ckpt_run) / TAGS, tags)


def drop_tag(store: Any, name: str) -> bool:
    from meshtrain.checkpoints.store import TAGS, write_json_atomic

    found = False
    for ckpt_run in store.runs():
        tags = store.tagged_steps(ckpt_run)
        if name in tags:
            del tags[name]
            write_json_atomic(store.run_dir(ckpt_run) / TAGS, tags)
            found = True
    return found


def find_tag(store: Any, name: str) -> tuple[str, int] | None:
    """(checkpoint run, step) that tag `name` names in `store`, or None."""
    for ckpt_run in store.runs():
        step = store.tagged_steps(ckpt_run).get(name)
        if step is not None:
            return ckpt_run, step
    return None


def machine_stores(home: Path) -> list[Any]:
    """Every checkpoint store of this machine: ``home/checkpoints`` and ``home/nodes/*/checkpoints``."""
    from meshtrain.checkpoints.store import CheckpointStore

    roots = [home / "checkpoints", *sorted((home / "nodes").glob("*/checkpoints"))]
    return [CheckpointStore(root) for root in roots if root.is_dir()]


def apply_tag(stores: Iterable[Any], ckpt_run: str, step: int | None, name: str) -> tuple[int, int]:
    """Tag the checkpoint in every store holding it: (its step, how many stores). UserError if none does."""
    stores = list(stores)
    if step is None:
        newest = [s.latest(ckpt_run) for s in stores]
        steps = [i.step for i in newest if i is not None]
        if not steps:
            raise UserError(f"no complete checkpoint of run {ckpt_run!r} on this machine")
        step = max(steps)
    holders = [s for s in stores if any(i.step == step for i in s.checkpoints(ckpt_run))]
    if not holders:
        if not stores:
            raise UserError(f"no complete checkpoint of run {ckpt_run!r} on this machine")
        stores[0].find(ckpt_run, step)  # raises the store's one line: what steps there are
        raise UserError(f"run {ckpt_run!r} has no complete checkpoint at step {step} on this machine")
    for store in holders:
        write_tag(store, ckpt_run, step, name)
    return step, len(holders)
