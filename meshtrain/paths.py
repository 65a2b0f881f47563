"""Where a node keeps its state, defined once: the agent's socket, checkpoints, run records, outputs.

``$MESHTRAIN_HOME`` if set (tests and several agents on one machine use it), else
``~/.local/state/meshtrain`` (XDG's state directory: kept across reboots, not a cache).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from meshtrain import env as env_names

HOME_ENV = env_names.HOME
_SAFE = re.compile(r"[^A-Za-z0-9._~-]")


def state_home() -> Path:
    home = os.environ.get(HOME_ENV)
    return Path(home) if home else Path.home() / ".local" / "state" / "meshtrain"


def outputs_dir(job: str, member: str | None = None) -> Path:
    """A job's output directory on this node (`mesh.output_dir`), and one worker's part of it."""
    base = state_home() / "outputs" / _SAFE.sub("_", job)
    return base / _SAFE.sub("_", member) if member else base
