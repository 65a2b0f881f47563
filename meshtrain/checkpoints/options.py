"""A job's checkpoint options: what `meshtrain run` asked for, as the plain dict that travels with the job.

The dict goes CLI -> `JobRequest.options` -> the `job.prepare` header -> the
worker spec, so it holds only JSON/msgpack values. Keys (all optional):

    checkpoint_every  "200" (steps) or "30s"/"5m"/"1h" (a period); absent: no periodic checkpoints
    replicas          how many whole copies besides the first (`--checkpoint-replicas`, default 2)
    keep              how many complete checkpoints each node keeps (`--keep`, default 3)
    resume            continue from the run's newest complete checkpoint anywhere in the mesh
    run               the run's name: checkpoints are filed under it (default: the script's stem)

A job with neither ``checkpoint_every`` nor ``resume`` has no checkpointing at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshtrain.checkpoints.store import check_run_name
from meshtrain.errors import UserError
from meshtrain.leader.checkpoint import CheckpointPolicy

__all__ = ["DEFAULT_KEEP", "DEFAULT_REPLICAS", "CheckpointOptions", "default_run_name"]

DEFAULT_REPLICAS = 2
DEFAULT_KEEP = 3


def default_run_name(script: str) -> str:
    """The script's stem, made a valid run name (`examples/mnist.py` -> ``mnist``)."""
    stem = Path(script).stem
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).lstrip("._-")
    return cleaned[:128] or "run"


@dataclass(frozen=True)
class CheckpointOptions:
    """The parsed, validated form of the options dict (see the module docstring)."""

    run: str
    policy: CheckpointPolicy | None
    every: str | None
    replicas: int = DEFAULT_REPLICAS
    keep: int = DEFAULT_KEEP
    resume: bool = False

    @classmethod
    def build(
        cls,
        script: str,
        *,
        every: str | None = None,
        replicas: int = DEFAULT_REPLICAS,
        keep: int = DEFAULT_KEEP,
        resume: bool = False,
        name: str | None = None,
    ) -> CheckpointOptions:
        """From the CLI flags; every mistake is a one-line UserError before anything starts."""
        policy = CheckpointPolicy.parse(every) if every is not None else None
        if replicas < 0:
            raise UserError("--checkpoint-replicas must be zero or more")
        if keep < 1:
            raise UserError("--keep must be at least 1")
        run = check_run_name(name) if name is not None else default_run_name(script)
        return cls(run=run, policy=policy, every=every, replicas=replicas, keep=keep, resume=resume)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> CheckpointOptions | None:
        """None when the job has no checkpointing (neither ``checkpoint_every`` nor ``resume``)."""
        options = options or {}
        every = options.get("checkpoint_every")
        resume = bool(options.get("resume"))
        if every is None and not resume:
            return None
        run = check_run_name(str(options.get("run") or "run"))
        replicas = options.get("replicas", DEFAULT_REPLICAS)
        keep = options.get("keep", DEFAULT_KEEP)
        return cls(
            run=run,
            policy=CheckpointPolicy.parse(str(every)) if every is not None else None,
            every=str(every) if every is not None else None,
            replicas=int(replicas) if isinstance(replicas, int) else DEFAULT_REPLICAS,
            keep=max(1, int(keep)) if isinstance(keep, int) else DEFAULT_KEEP,
            resume=resume,
        )

    def to_dict(self) -> dict[str, Any]:
        """The options dict for `JobRequest.options` (empty when nothing is asked for)."""
        if self.policy is None and not self.resume:
            return {}
        out: dict[str, Any] = {"run": self.run, "replicas": self.replicas, "keep": self.keep}
        if self.every is not None:
            out["checkpoint_every"] = self.every
        if self.resume:
            out["resume"] = True
        return out
