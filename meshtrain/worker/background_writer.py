"""Writing a checkpoint part off the training thread: one write at a time, on a thread of its own.

`write_part` lays a frozen `Snapshot` (snapshot.py) out exactly as `CheckpointStore.write_part`
does (params.safetensors, optimizer.safetensors, state.json, part.json; each under a temporary
name, fsynced, renamed; the part record last), so `commit`, `load`, listing and transfer see no
difference (tests/test_checkpoint_async.py compares the two). It differs in one way that is the
point: it never calls into MLX. The safetensors files are written here from the snapshot's byte
views (an 8-byte header length, the JSON header MLX writes, padded to 8 bytes as the format
allows, then the raw bytes), hashed as they are written, so the training thread can keep
evaluating MLX graphs meanwhile; the GIL is released in every ``write``, ``fsync`` and sha256
update of a large block, so the training thread runs while the disk works.

`BackgroundWriter` runs one such job on a fresh non-daemon thread and tells whether one is still
running. Non-daemon on purpose: if the training thread ends without `WorkerCheckpoints.close`, the
interpreter still waits for the write to end before it exits, so no part is cut off half-way (and
even a SIGKILL leaves only temporary names and no part record, which nothing lists or loads).
A write can be cancelled (its round was aborted): it stops at the next 8 MiB block.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from meshtrain.checkpoints.files import temporary_name
from meshtrain.checkpoints.store import (
    MANIFEST,
    OPTIMIZER,
    PARAMS,
    PART_RECORD,
    STATE,
    CheckpointStore,
    sha256_of,
    write_json_atomic,
)
from meshtrain.errors import UserError
from meshtrain.worker.snapshot import FrozenArray, Snapshot

__all__ = ["BackgroundWriter", "WriteCancelled", "save_safetensors_atomic", "write_part"]

BLOCK = 8 * 1024 * 1024  # write and hash in blocks this big; a cancel is seen between two


class WriteCancelled(Exception):
    """The part's round was aborted while it was being written: its files are to be removed."""


def save_safetensors_atomic(
    path: Path,
    arrays: Mapping[str, FrozenArray],
    metadata: Mapping[str, str] | None = None,
    *,
    cancel: threading.Event | None = None,
) -> str:
    """Write `arrays` as a safetensors file at `path` (temporary name, fsync, rename); its sha256."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name in sorted(arrays):
        array = arrays[name]
        if array.nbytes == 0:  # as MLX refuses it: mx.load could not read it back
            raise ValueError(f"cannot checkpoint the empty array {name!r}")
        header[name] = {
            "dtype": array.dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format allows trailing spaces; the data then starts aligned
    digest = hashlib.sha256()
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            for chunk in _chunks(struct.pack("<Q", len(text)) + text, arrays):
                if cancel is not None and cancel.is_set():
                    raise WriteCancelled(str(path))
                f.write(chunk)
                digest.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def _chunks(head: bytes, arrays: Mapping[str, FrozenArray]) -> Any:
    yield head
    for name in sorted(arrays):
        data = arrays[name].data
        for start in range(0, data.nbytes, BLOCK):
            yield data[start : start + BLOCK]


def write_part(
    store: CheckpointStore,
    run: str,
    snapshot: Snapshot,
    *,
    extra: Mapping[str, Any] | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """This node's part of checkpoint (run, snapshot.step), every file fsynced, nothing committed;
    the part record the ack carries. The layout and state.json are `CheckpointStore.write_part`'s."""
    step = snapshot.step
    directory = store.step_dir(run, step)
    if (directory / MANIFEST).exists():
        raise UserError(f"checkpoint {run}@{step} is already committed")
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"run": run, "step": str(step)}
    digests = {
        PARAMS: save_safetensors_atomic(directory / PARAMS, snapshot.params, meta, cancel=cancel),
        OPTIMIZER: save_safetensors_atomic(directory / OPTIMIZER, snapshot.opt, meta, cancel=cancel),
    }
    m = snapshot.meta
    state: dict[str, Any] = {
        "run": run,
        "step": step,
        "cursor": m.get("cursor"),
        "rng": list(snapshot.rng),
        "hyperparameters": {},
        "generation": int(m.get("generation") or 0),
        "metrics": dict(m.get("metrics") or {}),
        **dict(extra or {}),
    }
    write_json_atomic(directory / STATE, state)  # also fsyncs the directory: the renames above are durable
    digests[STATE] = sha256_of(directory / STATE)
    files: dict[str, dict[str, Any]] = {
        name: {"bytes": (directory / name).stat().st_size, "sha256": digests[name]}
        for name in (PARAMS, OPTIMIZER, STATE)
    }
    record = {"run": run, "step": step, "files": files, "bytes": sum(int(f["bytes"]) for f in files.values())}
    if cancel is not None and cancel.is_set():
        raise WriteCancelled(str(directory))
    write_json_atomic(directory / PART_RECORD, record)
    return record


class BackgroundWriter:
    """Runs one write job at a time on its own thread; `busy` while it runs, `wait` for it to end."""

    def __init__(self, name: str = "meshtrain-checkpoint-writer") -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, job: Callable[[threading.Event], None]) -> None:
        """Run ``job(cancel)`` now on a new thread; the caller makes sure none is running."""
        if self.busy:
            raise RuntimeError("a checkpoint write is already in flight")
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=job, args=(self._cancel,), name=self.name, daemon=False)
        self._thread.start()

    def cancel(self) -> None:
        """Ask the running job to stop at its next block (it removes its own files)."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no job runs (or `timeout` passes); True when none runs."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return not self.busy
