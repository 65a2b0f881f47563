"""Crash-safe file writing shared by the checkpoint store and its array files (no MLX here).

Everything is written under a temporary name in its final directory, fsynced, renamed into
place, and the directory fsynced: a crash leaves the old file or the whole new one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

TMP_PREFIX = ".tmp-"  # `CheckpointStore.clean` removes leftovers by this prefix


def temporary_name(path: Path) -> Path:
    """A fresh temporary sibling of `path` that keeps its name (and suffix) at the end."""
    return path.with_name(f"{TMP_PREFIX}{secrets.token_hex(4)}-{path.name}")


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
