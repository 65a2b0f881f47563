"""Checkpoint exports started from the page, and the files the page downloads.

An export is what `meshtrain export RUN@STEP PATH` does (`CheckpointStore.export`:
the model parameters as one safetensors file), run as a child process
(`python -m meshtrain.dashboard.exports ROOT RUN STEP PATH`) for two reasons:
the store's array code imports MLX, which the agent (a network daemon that
may host this dashboard) never loads, and a large model's export must not
stall the event loop that serves the page and the mesh. One export at a
time; the files go to a directory of this dashboard's own, removed when it
stops, and are downloaded from ``/api/exports/NAME`` (only names it made).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

EXPORT_TIMEOUT_S = 600.0


@dataclass
class Export:
    id: str  # RUN@STEP
    run: str
    step: int
    state: str  # running | done | failed
    started: float
    file: str  # the download's name
    bytes: int = 0
    error: str | None = None
    took_s: float | None = None

    def view(self) -> dict[str, Any]:
        out = asdict(self)
        out["url"] = f"/api/exports/{self.file}" if self.state == "done" else None
        return out


class Exports:
    """The dashboard's exports: `start(root, run, step)`, `path_of(name)`, `close()`."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        self.items: dict[str, Export] = {}
        self._dir: Path | None = None
        self._lock = asyncio.Lock()  # one export at a time: each reads and writes the whole model
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def directory(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="meshtrain-dashboard-exports-"))
        return self._dir

    def views(self) -> list[dict[str, Any]]:
        return [e.view() for e in sorted(self.items.values(), key=lambda e: -e.started)]

    def start(self, root: Path | None, run: str, step: int) -> Export:
        """Begin exporting RUN@STEP (or give the export already made or under way)."""
        key = f"{run}@{step}"
        existing = self.items.get(key)
        if existing is not None and existing.state != "failed":
            return existing
        item = Export(key, run, step, "running", time.time(), f"{run}-step{step}.safetensors")
        self.items[key] = item
        task = asyncio.create_task(self._run(root, item))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.on_change()
        return item

    async def _run(self, root: Path | None, item: Export) -> None:
        target = self.directory / item.file
        async with self._lock:
            begun = time.monotonic()
            cmd = [sys.executable, "-m", __name__, str(root or ""), item.run, str(item.step), str(target)]
            try:
                proc = await asyncio.create_subprocess_exec(
                    *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
                )
                try:
                    _, err = await asyncio.wait_for(proc.communicate(), EXPORT_TIMEOUT_S)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()
                    raise TimeoutError(f"the export took over {EXPORT_TIMEOUT_S:.0f}s") from None
                if proc.returncode != 0:
                    lines = err.decode(errors="replace").strip().splitlines()
                    raise RuntimeError(lines[-1] if lines else f"export exited with {proc.returncode}")
                item.bytes = target.stat().st_size
                item.state = "done"
            except Exception as exc:  # noqa: BLE001 - any failure is shown on the page, nothing more
                item.state, item.error = "failed", str(exc) or exc.__class__.__name__
            finally:
                item.took_s = time.monotonic() - begun
                self.on_change()

    def path_of(self, name: str) -> Path | None:
        """The file of a finished export called `name`; None for anything this dashboard did not make."""
        for item in self.items.values():
            if item.file == name and item.state == "done" and self._dir is not None:
                path = self._dir / item.file
                return path if path.is_file() else None
        return None

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    """The child process: ROOT RUN STEP PATH -> the safetensors file; a mistake is one stderr line."""
    from meshtrain.checkpoints.store import CheckpointStore
    from meshtrain.errors import UserError

    root, run, step, path = argv
    try:
        CheckpointStore(Path(root) if root else None).export(run, int(step), Path(path))
    except (UserError, OSError, ValueError) as exc:
        print(str(exc) or exc.__class__.__name__, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
