"""What `mesh.report(**metrics)` accepts, defined once for the worker that checks it and the agent
that folds it into the job snapshot.

Any named scalar may be reported: `val_loss`, `perplexity`, `lr`, `tokens_per_s`, ...
The views show every one of them; a few names are first-class and keep their
own places (`loss` with its sparkline, `test_accuracy`, the epoch and step
bars, `samples` for samples/s). Nothing is dropped silently: a value that is
not a scalar, a name meshtrain itself reports, or too many names is a
`UserError` at the `report` call, in the script, where it can be fixed.

Why values are converted here rather than in the views: MLX and numpy
scalars (`loss` as an `mx.array`, `np.float32`) do not survive msgpack, and a
worker converting them once keeps every consumer down the line simple.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from meshtrain.errors import UserError

# The script's progress counters: whole numbers, loop indices as `range` gives them.
COUNTERS = ("epoch", "epochs", "step", "steps_per_epoch")
# Names with their own place in every view.
FIRST_CLASS = frozenset({*COUNTERS, "loss", "samples", "test_accuracy"})
# Names the worker runtime adds to every report itself (and any `__dunder__`, meshtrain.tracking's):
# a script may not use them.
RESERVED = frozenset({"generation", "share", "share_why", "ring_mb_s", "paused", "workers"})
MAX_NAMES = 32  # distinct extra names per job: the snapshot streamed to views stays small
MAX_NAME_LENGTH = 40

Scalar = int | float


def scalar(name: str, value: Any) -> Scalar:
    """`value` as a plain int or float; anything that is not one number is a UserError."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    size = getattr(value, "size", None)
    item = getattr(value, "item", None)
    if size == 1 and callable(item):  # numpy and MLX scalars, and one-element arrays
        result = item()
        if isinstance(result, (bool, int, float)):
            return int(result) if isinstance(result, bool) else result
    shape = getattr(value, "shape", None)
    what = f"an array of shape {tuple(shape)}" if shape is not None else f"a {type(value).__name__}"
    raise UserError(
        f"mesh.report({name}=...): {what} is not a scalar; report one number (float(x) or x.item())"
    )


def check(metrics: Mapping[str, Any], seen: set[str] | None = None) -> dict[str, Scalar]:
    """The metrics of one `report` call, validated and converted to plain numbers.

    `seen` (the extra names this worker reported before, updated in place)
    enforces `MAX_NAMES` over the job rather than per call.
    """
    out: dict[str, Scalar] = {}
    for name, value in metrics.items():
        if name in RESERVED or name.startswith("__"):
            raise UserError(f"mesh.report({name}=...): {name!r} is reported by meshtrain itself; rename it")
        if len(name) > MAX_NAME_LENGTH:
            raise UserError(f"mesh.report: metric name {name[:20]!r}... is longer than {MAX_NAME_LENGTH}")
        number = scalar(name, value)
        if name in COUNTERS:
            if not (isinstance(number, int) or (math.isfinite(number) and number == int(number))):
                raise UserError(f"mesh.report({name}={number!r}): {name} counts, so it is a whole number")
            number = int(number)
        elif seen is not None and name not in FIRST_CLASS and name not in seen:
            if len(seen) >= MAX_NAMES:
                raise UserError(
                    f"mesh.report({name}=...): more than {MAX_NAMES} metric names "
                    f"({', '.join(sorted(seen)[:4])}, ...); report fewer"
                )
            seen.add(name)
        out[name] = number
    return out


def extras(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The numeric metrics of a report that are neither first-class nor meshtrain's own.

    A non-finite value (a diverged loss) keeps its name with the value None,
    so the views say it is there and `status --json` stays valid JSON.
    """
    return {
        k: (float(v) if math.isfinite(v) else None)
        for k, v in metrics.items()
        if isinstance(k, str)
        and k not in FIRST_CLASS
        and k not in RESERVED
        and not k.startswith("__")
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
    }
