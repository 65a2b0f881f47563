"""Checkpoints on disk: a checkpoint exists only once its manifest does.

Layout under the state dir (``$MESHTRAIN_HOME`` or ``~/.local/state/meshtrain``)::

    checkpoints/RUN/STEP/params.safetensors      model parameters (flattened MLX tree)
                         optimizer.safetensors   optimizer state (flattened MLX tree)
                         state.json              step, cursor, RNG, hyperparameters, generation, metrics
                         part.json               the files above with their sizes and sha256
                         manifest.json           the commit record: written last, atomically
    checkpoints/RUN/.incoming-STEP-*/            a fetch or replication in progress

Every file is written under a temporary name, fsynced and renamed into place,
so a crash leaves either the old state or a whole file, never a torn one under
a real name. The manifest is written the same way and its directory fsynced:
only then is the checkpoint "complete". A directory without a manifest is the
remains of an aborted or crashed checkpoint and `clean` removes it; a manifest
whose files are missing or of the wrong size is not listed either.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshtrain.checkpoints.files import TMP_PREFIX, fsync_path, temporary_name
from meshtrain.errors import UserError

__all__ = [
    "MANIFEST",
    "PART_RECORD",
    "Checkpoint",
    "CheckpointInfo",
    "CheckpointStore",
    "checkpoints_root",
    "parse_target",
]

MANIFEST = "manifest.json"
PART_RECORD = "part.json"
PARAMS = "params.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
INCOMING_PREFIX = ".incoming-"
TAGS = ".tags.json"  # RUN/.tags.json: {tag: step}, model versions `meshtrain tag` names (never pruned)
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HASH_BLOCK = 4 * 1024 * 1024


def checkpoints_root() -> Path:
    """$MESHTRAIN_HOME/checkpoints, or ~/.local/state/meshtrain/checkpoints (the agent's state dir)."""
    from meshtrain.paths import state_home

    return state_home() / "checkpoints"


def check_run_name(run: str) -> str:
    if not isinstance(run, str) or not _RUN_NAME.match(run):
        raise UserError(f"bad run name {run!r}: use letters, digits, '.', '_' and '-'")
    return run


def parse_target(text: str) -> tuple[str, int | None]:
    """``RUN`` or ``RUN@STEP`` -> (run, step or None for the newest)."""
    run, sep, step = text.partition("@")
    check_run_name(run)
    if not sep:
        return run, None
    if not step.isdigit():
        raise UserError(f"bad checkpoint {text!r}: expected RUN@STEP with a whole-number step")
    return run, int(step)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write + fsync a temporary file, rename it over `path`, fsync the directory."""
    tmp = temporary_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint as listed: what `meshtrain checkpoints` shows."""

    run: str
    step: int
    path: Path
    time: float
    bytes: int
    metrics: dict[str, Any] = field(default_factory=dict)
    replicas: list[str] = field(default_factory=list)
    term: int | None = None

    @property
    def loss(self) -> float | None:
        value = self.metrics.get("loss")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def accuracy(self) -> float | None:
        for key in ("test_accuracy", "accuracy", "acc"):
            value = self.metrics.get(key)
            if isinstance(value, (int, float)):
                return float(value)
        return None


@dataclass
class Checkpoint:
    """A loaded checkpoint: flat parameter and optimizer dicts plus the JSON state."""

    info: CheckpointInfo
    params: dict[str, Any]  # path -> mx.array
    optimizer: dict[str, Any]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def params_tree(self) -> Any:
        from meshtrain.checkpoints.arrays import unflatten_tree

        return unflatten_tree(self.params)

    def optimizer_tree(self) -> Any:
        from meshtrain.checkpoints.arrays import unflatten_tree

        return unflatten_tree(self.optimizer)


class CheckpointStore:
    """This node's checkpoints for every run. All methods are synchronous file I/O
    (call them from a thread in an event loop)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else checkpoints_root()

    # ------------------------------------------------------------ paths

    def run_dir(self, run: str) -> Path:
        return self.root / check_run_name(run)

    def step_dir(self, run: str, step: int) -> Path:
        if not isinstance(step, int) or step < 0:
            raise UserError(f"bad checkpoint step {step!r}")
        return self.run_dir(run) / str(step)

    # ------------------------------------------------------------ phase 1: a part

    def write_part(
        self,
        run: str,
        step: int,
        params: Any,
        optimizer: Any = None,
        *,
        cursor: Any = None,
        rng: list[int] | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        generation: int = 0,
        metrics: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write this node's part of checkpoint (run, step); every file fsynced, nothing committed.

        Returns the part record (file -> bytes and sha256) the ack carries to the leader.
        """
        directory = self.step_dir(run, step)
        if (directory / MANIFEST).exists():
            raise UserError(f"checkpoint {run}@{step} is already committed")
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"run": run, "step": str(step)}
        from meshtrain.checkpoints.arrays import flatten_tree, rng_state, save_arrays_atomic

        with ThreadPoolExecutor(max_workers=1) as hasher:  # hash each file while the next is written
            save_arrays_atomic(directory / PARAMS, flatten_tree(params), meta)
            params_digest = hasher.submit(sha256_of, directory / PARAMS)
            save_arrays_atomic(
                directory / OPTIMIZER, flatten_tree(optimizer) if optimizer is not None else {}, meta
            )
            digests = {PARAMS: params_digest, OPTIMIZER: hasher.submit(sha256_of, directory / OPTIMIZER)}
            digests_done = {name: future.result() for name, future in digests.items()}
        state: dict[str, Any] = {
            "run": run,
            "step": step,
            "cursor": cursor,
            "rng": rng if rng is not None else rng_state(),
            "hyperparameters": dict(hyperparameters or {}),
            "generation": generation,
            "metrics": dict(metrics or {}),
            **dict(extra or {}),
        }
        write_json_atomic(directory / STATE, state)
        digests_done[STATE] = sha256_of(directory / STATE)
        files: dict[str, dict[str, Any]] = {
            name: {"bytes": (directory / name).stat().st_size, "sha256": digests_done[name]}
            for name in (PARAMS, OPTIMIZER, STATE)
        }
        total = sum(int(f["bytes"]) for f in files.values())
        record = {"run": run, "step": step, "files": files, "bytes": total}
        write_json_atomic(directory / PART_RECORD, record)
        return record

    # ------------------------------------------------------------ phase 2: commit or discard

    def commit(self, run: str, step: int, manifest: Mapping[str, Any] | None = None) -> CheckpointInfo:
        """Make (run, step) complete: write its manifest atomically. Needs this node's part on disk."""
        directory = self.step_dir(run, step)
        try:
            record = json.loads((directory / PART_RECORD).read_text())
            state = json.loads((directory / STATE).read_text())
        except (OSError, ValueError):
            raise UserError(f"checkpoint {run}@{step} has no complete part on this node") from None
        full = {
            "time": time.time(),
            "metrics": state.get("metrics", {}),
            "replicas": [],
            **dict(manifest or {}),
            "run": run,
            "step": step,
            "files": record["files"],
            "bytes": record["bytes"],
        }
        write_json_atomic(directory / MANIFEST, full)
        info = self._info(run, directory)
        assert info is not None
        return info

    def discard(self, run: str, step: int) -> bool:
        """Remove an uncommitted part (an aborted checkpoint). A committed one is left alone."""
        directory = self.step_dir(run, step)
        if not directory.exists() or (directory / MANIFEST).exists():
            return False
        shutil.rmtree(directory, ignore_errors=True)
        return True

    def save(self, run: str, step: int, params: Any, optimizer: Any = None, **kw: Any) -> CheckpointInfo:
        """One node alone: write the part and commit it at once."""
        manifest = kw.pop("manifest", None)
        self.write_part(run, step, params, optimizer, **kw)
        return self.commit(run, step, manifest)

    # ------------------------------------------------------------ reading

    def runs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _RUN_NAME.match(p.name))

    def checkpoints(self, run: str) -> list[CheckpointInfo]:
        """The complete checkpoints of `run`, oldest first (manifest present, every file whole)."""
        directory = self.run_dir(run)
        if not directory.is_dir():
            return []
        found = [self._info(run, p) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
        return sorted((i for i in found if i is not None), key=lambda i: i.step)

    def latest(self, run: str) -> CheckpointInfo | None:
        found = self.checkpoints(run)
        return found[-1] if found else None

    def find(self, run: str, step: int | None = None) -> CheckpointInfo:
        """The checkpoint `step` of `run` (newest complete with None), or a UserError."""
        found = self.checkpoints(run)
        if not found:
            known = ", ".join(self.runs()) or "none"
            raise UserError(f"no complete checkpoint of run {run!r} on this node (runs here: {known})")
        if step is None:
            return found[-1]
        for info in found:
            if info.step == step:
                return info
        steps = ", ".join(str(i.step) for i in found)
        raise UserError(f"run {run!r} has no complete checkpoint at step {step} (steps: {steps})")

    def load(self, run: str, step: int | None = None, *, verify: bool = False) -> Checkpoint:
        """Everything needed to resume: newest complete checkpoint unless `step` is given."""
        info = self.find(run, step)
        if verify:
            self.verify(info)
        from meshtrain.checkpoints.arrays import load_arrays

        params = load_arrays(info.path / PARAMS)
        optimizer = load_arrays(info.path / OPTIMIZER)
        state = json.loads((info.path / STATE).read_text())
        assert isinstance(params, dict) and isinstance(optimizer, dict)
        return Checkpoint(info=info, params=params, optimizer=optimizer, state=state)

    def verify(self, info: CheckpointInfo) -> None:
        """Check every file's sha256 against the manifest (sizes are checked by listing already)."""
        manifest = json.loads((info.path / MANIFEST).read_text())
        for name, entry in manifest["files"].items():
            if sha256_of(info.path / name) != entry["sha256"]:
                raise UserError(
                    f"checkpoint {info.run}@{info.step} is corrupt: {name} does not match its manifest"
                )

    def manifest(self, run: str, step: int) -> dict[str, Any]:
        return dict(json.loads((self.step_dir(run, step) / MANIFEST).read_text()))

    def _info(self, run: str, directory: Path) -> CheckpointInfo | None:
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
            files = manifest["files"]
            for name, entry in files.items():
                if "/" in name or name.startswith(".") or (directory / name).stat().st_size != entry["bytes"]:
                    return None
            return CheckpointInfo(
                run=run,
                step=int(manifest["step"]),
                path=directory,
                time=float(manifest.get("time", 0.0)),
                bytes=int(manifest.get("bytes", 0)),
                metrics=dict(manifest.get("metrics") or {}),
                replicas=[str(r) for r in manifest.get("replicas") or []],
                term=manifest.get("term"),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    # ------------------------------------------------------------ housekeeping

    def clean(
        self, run: str | None = None, *, keep_steps: Iterable[int] = (), incoming: bool = True
    ) -> list[Path]:
        """Remove what a crash or an abort left: parts without a manifest, torn complete ones, stray
        temp files and (with `incoming`) transfers that never finished. `keep_steps` (the parts in
        flight) are not touched at all; pass ``incoming=False`` while transfers may be running."""
        protect = {str(s) for s in keep_steps}
        removed: list[Path] = []
        for name in [run] if run is not None else self.runs():
            directory = self.run_dir(name)
            if not directory.is_dir():
                continue
            for p in directory.iterdir():
                if p.name.startswith(INCOMING_PREFIX):
                    if incoming:
                        shutil.rmtree(p, ignore_errors=True)
                        removed.append(p)
                elif not p.is_dir() or not p.name.isdigit() or p.name in protect:
                    continue
                elif self._info(name, p) is None:
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
                else:
                    for tmp in p.glob(f"{TMP_PREFIX}*"):
                        tmp.unlink(missing_ok=True)
                        removed.append(tmp)
        return removed

    def prune(self, run: str, keep: int) -> list[int]:
        """Delete all but the `keep` newest complete checkpoints; the manifest goes first, so a
        crash half-way leaves an incomplete directory (cleaned later), never a listed torn one."""
        if keep < 1:
            raise UserError("--keep must be at least 1")
        tagged = set(self.tagged_steps(run).values())  # kept, and not counted (meshtrain tag)
        doomed = [i for i in self.checkpoints(run) if i.step not in tagged][:-keep]
        for info in doomed:
            (info.path / MANIFEST).unlink(missing_ok=True)
            fsync_path(info.path)
            shutil.rmtree(info.path, ignore_errors=True)
        return [i.step for i in doomed]

    def tagged_steps(self, run: str) -> dict[str, int]:
        """{tag: step} of `run`'s tagged checkpoints (meshtrain.tracking.tags writes the file)."""
        try:
            raw = json.loads((self.run_dir(run) / TAGS).read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): int(v) for k, v in raw.items() if isinstance(v, int)} if isinstance(raw, dict) else {}

    def export(self, run: str, step: int | None, path: Path) -> tuple[CheckpointInfo, Path]:
        """Write the model parameters of RUN[@STEP] as one safetensors file at `path`."""
        info = self.find(run, step)
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        if not path.parent.is_dir():
            raise UserError(f"no such directory: {path.parent}")
        from meshtrain.checkpoints.arrays import load_arrays, save_arrays_atomic

        params = load_arrays(info.path / PARAMS)
        meta = {"format": "mlx", "run": run, "step": str(info.step)}
        save_arrays_atomic(path, params, meta)
        return info, path

    def incoming_dir(self, run: str, step: int) -> Path:
        """A fresh temporary directory for a checkpoint arriving from another node."""
        directory = self.run_dir(run)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{INCOMING_PREFIX}{step}-{secrets.token_hex(4)}"
        path.mkdir()
        return path

    def install(self, run: str, step: int, incoming: Path) -> CheckpointInfo:
        """Move a fully received and verified checkpoint directory into place (rename, fsync)."""
        final = self.step_dir(run, step)
        existing = self._info(run, final) if final.exists() else None
        if existing is not None:
            shutil.rmtree(incoming, ignore_errors=True)
            return existing
        if final.exists():  # an uncommitted or torn copy: the complete one replaces it
            shutil.rmtree(final)
        with contextlib.suppress(FileNotFoundError):
            for p in incoming.iterdir():
                fsync_path(p)
        os.replace(incoming, final)
        fsync_path(final.parent)
        info = self._info(run, final)
        if info is None:
            raise UserError(f"checkpoint {run}@{step} arrived incomplete")
        return info
