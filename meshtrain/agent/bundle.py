"""The script and a small snapshot of its directory, shipped to every node of a job.

A script may import its siblings or read a small config next to it, so the
submitter packs the script's directory (bounded: no hidden or cache folders,
no big files) as a msgpack list of (relative path, bytes). Unpacking checks
every path stays inside the target: a bundle comes from the network.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import msgpack

from meshtrain.errors import UserError

MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_TOTAL_BYTES = 16 * 1024 * 1024
MAX_FILES = 500
SKIP_DIRS = {"__pycache__", "node_modules", "build", "dist"}


@dataclass(frozen=True)
class Bundle:
    """`script` is the entry point's path inside `files`."""

    script: str
    files: dict[str, bytes]

    def pack(self) -> bytes:
        return msgpack.packb({"script": self.script, "files": self.files}, use_bin_type=True)

    @staticmethod
    def unpack(data: bytes) -> Bundle:
        raw = msgpack.unpackb(data, raw=False)
        if not isinstance(raw, dict) or not isinstance(raw.get("files"), dict):
            raise ValueError("malformed bundle")
        files = {str(k): bytes(v) for k, v in raw["files"].items()}
        script = str(raw.get("script"))
        if script not in files:
            raise ValueError("bundle lacks its script")
        return Bundle(script=script, files=files)

    def extract(self, target: Path) -> Path:
        """Write the files under `target`; the script's path there."""
        root = target.resolve()
        for rel, data in self.files.items():
            pure = PurePosixPath(rel)
            if pure.is_absolute() or ".." in pure.parts or not pure.parts:
                raise ValueError(f"unsafe path in bundle: {rel!r}")
            dest = (root / Path(*pure.parts)).resolve()
            if root not in dest.parents:
                raise ValueError(f"unsafe path in bundle: {rel!r}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        return root / self.script


def snapshot(script: str) -> Bundle:
    """Pack `script` and what sits beside it (small files only); UserError if there is no script."""
    path = Path(script)
    if not path.is_file():
        raise UserError(f"no such script: {script}")
    base = path.resolve().parent
    files: dict[str, bytes] = {path.name: path.read_bytes()}
    total = len(files[path.name])
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and d not in SKIP_DIRS and not d.endswith(".egg-info")
        )
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(base).as_posix()
            if rel in files or name.startswith(".") or len(files) >= MAX_FILES:
                continue
            try:
                info = full.stat()
                if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_FILE_BYTES:
                    continue  # sockets, fifos, devices and big data files stay home
                if total + info.st_size > MAX_TOTAL_BYTES:
                    continue
                files[rel] = full.read_bytes()
            except OSError:
                continue
            total += info.st_size
    return Bundle(script=path.name, files=files)
