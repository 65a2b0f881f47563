"""What a run record holds, built from the job request and the workers' reports (pure, no I/O).

The script needs no tracking code: the record is assembled from what a job
already carries. Its settings come from the request (script, arguments,
meshtrain options, the bundle's bytes), its metrics from the `mesh.report`
batches the coordinator receives, its hyper-parameters from three sources
in rising precedence: ``--key value`` pairs of the script's arguments, the
script's parsed argparse namespace (captured in the worker, see capture.py)
and `mesh.config(...)`.
"""

from __future__ import annotations

import hashlib
import math
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from meshtrain.tracking.store import MetricRow

CONFIG_KEY = "__config__"  # a report carrying `mesh.config(...)` hyper-parameters
ARGPARSE_KEY = "__argparse__"  # a report carrying the script's parsed argparse namespace
ENV_KEY = "__env__"  # a report carrying the worker's software (MLX, Python) and device
# Report keys that say where the worker is or how the mesh runs, not what the model does.
BOOKKEEPING = frozenset(
    {"epoch", "epochs", "step", "steps_per_epoch", "generation", "share", "share_why", "paused", "workers"}
)


def bundle_hash(bundle: bytes) -> str:
    """sha256 over the bundle's (path, content) pairs in path order: the same files give the same hash
    whatever order or msgpack layout they were packed in."""
    try:
        raw = msgpack.unpackb(bundle, raw=False)
        files = raw.get("files") if isinstance(raw, dict) else None
    except (ValueError, msgpack.UnpackException):
        files = None
    h = hashlib.sha256()
    if not isinstance(files, dict):
        h.update(bundle)
        return h.hexdigest()
    for name in sorted(files):
        data = bytes(files[name])
        h.update(str(name).encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def git_info(script: str | Path) -> dict[str, Any]:
    """{"commit", "dirty", "branch"} of the git repository holding `script`; {} outside one (or no git)."""
    where = str(Path(script).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", where, *args], capture_output=True, text=True, timeout=5, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status), "branch": git("rev-parse", "--abbrev-ref", "HEAD") or ""}


def scalar(text: str) -> Any:
    """'3' -> 3, '1e-3' -> 0.001, 'true' -> True, anything else stays text."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def params_from_args(args: Sequence[str]) -> dict[str, Any]:
    """Hyper-parameters from argparse-style arguments: ``--lr 1e-3 --layers=4 --no-compile``."""
    params: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            key = name.replace("-", "_")
            if eq:
                params[key] = scalar(value)
            elif i + 1 < len(args) and not (args[i + 1].startswith("--") and len(args[i + 1]) > 2):
                params[key] = scalar(args[i + 1])
                i += 1
            else:
                params[key] = True
        i += 1
    return params


def clean_params(raw: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-safe hyper-parameters: scalars kept, anything else as its text."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None or isinstance(value, (bool, int, str)):
            out[str(key)] = value
        elif isinstance(value, float):
            out[str(key)] = value if math.isfinite(value) else str(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            out[str(key)] = list(value)
        else:
            out[str(key)] = str(value)
    return out


@dataclass
class MetricFolder:
    """Turns report batches into metric rows with a global step, and sets aside config and env reports.

    The step of a row is the report's global step: ``epoch * steps_per_epoch + step`` when the script
    reports both, ``step`` alone otherwise; a report without a step (test accuracy after an epoch)
    takes the last step that worker reported, so it lands where it was measured.
    """

    seq: int = 0
    last_step: dict[str, int] = field(default_factory=dict)
    steps_per_epoch: dict[str, int] = field(default_factory=dict)

    def fold(
        self, member: str, t: float, metrics: Mapping[str, Any]
    ) -> tuple[list[MetricRow], dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(rows, mesh.config params, argparse params, worker env) of one report."""
        config = metrics.get(CONFIG_KEY)
        parsed = metrics.get(ARGPARSE_KEY)
        env = metrics.get(ENV_KEY)
        spe = metrics.get("steps_per_epoch")
        if isinstance(spe, int) and not isinstance(spe, bool) and spe > 0:
            self.steps_per_epoch[member] = spe
        step: int | None = None
        raw_step, epoch = metrics.get("step"), metrics.get("epoch")
        if isinstance(raw_step, int) and not isinstance(raw_step, bool):
            step = raw_step
            per = self.steps_per_epoch.get(member)
            if isinstance(epoch, int) and not isinstance(epoch, bool) and per:
                step += epoch * per
            self.last_step[member] = step
        else:
            step = self.last_step.get(member)
        rows: list[MetricRow] = []
        for key, value in metrics.items():
            if key in BOOKKEEPING or key.startswith("__") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(float(value)):
                rows.append(MetricRow(self.seq, member, step, float(t), str(key), float(value)))
                self.seq += 1
        return (
            rows,
            dict(config) if isinstance(config, dict) else {},
            dict(parsed) if isinstance(parsed, dict) else {},
            dict(env) if isinstance(env, dict) else {},
        )
