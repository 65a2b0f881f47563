"""What `meshtrain runs` prints: the run list, one run in full, runs side by side, a loss chart.

Pure functions from stored runs to rich renderables (and plain text for the chart), so the
CLI only opens the store and prints; the chart is a few rows of block characters, which any
terminal shows and no plotting library is needed for.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from meshtrain.tracking.store import Run

BLOCKS = " ▁▂▃▄▅▆▇█"
HIDDEN_FINAL = ("samples", "ring_mb_s")  # per-step bookkeeping, not results
PREFERRED = ("loss", "val_loss", "test_accuracy", "accuracy")


def fmt_value(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return "—" if value is None else str(value)


def fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "—"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{(seconds % 3600) // 60:02.0f}m"


def headline_keys(finals: Sequence[dict[str, float]], limit: int = 3) -> list[str]:
    """The metrics worth a column: loss-like and accuracy-like first, then the rest by name."""
    keys = sorted({k for f in finals for k in f if k not in HIDDEN_FINAL})
    ordered = [k for k in PREFERRED if k in keys] + [k for k in keys if k not in PREFERRED]
    return ordered[:limit]


def run_table(runs: Sequence[Run], finals: Sequence[dict[str, float]]) -> Table:
    keys = headline_keys(finals)
    cols = ("run", "name", "state", "started", "time", "nodes", *keys)
    rows = []
    for run, final in zip(runs, finals, strict=True):
        state = run.state + (f" ({run.sweep})" if run.sweep else "")
        started = time.strftime("%m-%d %H:%M", time.localtime(run.started)) if run.started else "—"
        nodes = str(len(run.mesh.get("nodes") or [])) or "—"
        cells = [run.id, run.name, state, started, fmt_duration(run.duration), nodes]
        cells += [fmt_value(final.get(k)) for k in keys]
        rows.append((cells, ", ".join(f"{k}={fmt_value(v)}" for k, v in sorted(run.params.items()))))
    table = Table(title=f"{len(runs)} run{'s' if len(runs) != 1 else ''}", title_justify="left")
    for i, col in enumerate(cols):  # the columns keep their width; the params column gives way
        width = max([len(col)] + [len(cells[i]) for cells, _ in rows])
        table.add_column(col, justify="right" if col in keys else "left", no_wrap=True, min_width=width)
    table.add_column("params", overflow="ellipsis", no_wrap=True)
    for cells, params in rows:
        table.add_row(*cells, params)
    return table


def chart(values: Sequence[float], *, width: int = 60, height: int = 6) -> list[str]:
    """A block-character chart of `values` (resampled to `width` columns), top row first."""
    points = [v for v in values if math.isfinite(v)]
    if not points:
        return []
    if len(points) > width:
        per = len(points) / width
        points = [
            sum(chunk) / len(chunk)
            for chunk in (
                points[int(i * per) : max(int(i * per) + 1, int((i + 1) * per))] for i in range(width)
            )
        ]
    lo, hi = min(points), max(points)
    span = hi - lo or 1.0
    levels = [round((v - lo) / span * (height * 8 - 1)) + 1 for v in points]  # 1..height*8
    rows = []
    for row in range(height - 1, -1, -1):
        base = row * 8
        rows.append("".join(BLOCKS[max(0, min(8, lvl - base))] for lvl in levels))
    return rows


def chart_text(key: str, series: Sequence[tuple[int, float, float]], width: int = 60) -> Text:
    """The chart of one metric with its range and steps."""
    values = [v for _, _, v in series]
    rows = chart(values, width=width)
    if not rows:
        return Text(f"{key}: no values by step")
    lo, hi = min(values), max(values)
    out = Text()
    out.append(f"{key} by step ({series[0][0]}…{series[-1][0]}, {len(series)} points)\n", style="bold")
    for i, row in enumerate(rows):
        label = fmt_value(hi) if i == 0 else (fmt_value(lo) if i == len(rows) - 1 else "")
        out.append(f"{label:>9} ", style="dim")
        out.append(row + "\n", style="cyan")
    return out


def settings(run: Run, tags: Sequence[str] = ()) -> dict[str, Any]:
    """The run's settings as flat key -> value (what `show` lists and `compare` diffs)."""
    out: dict[str, Any] = {
        "script": run.script,
        "args": " ".join(run.args),
        "bundle": run.bundle_hash[:12],
    }
    if run.git:
        out["git"] = f"{str(run.git.get('commit', ''))[:12]}{' (dirty)' if run.git.get('dirty') else ''}"
    for key, value in sorted(run.options.items()):
        if value not in (None, "", {}, []):
            out[f"option.{key}"] = value
    for key, value in sorted(run.params.items()):
        out[f"param.{key}"] = value
    out["nodes"] = ", ".join(run.mesh.get("nodes") or [])
    if run.mesh.get("mlx"):
        out["mlx"] = ", ".join(run.mesh["mlx"])
    if run.sweep:
        out["sweep"] = run.sweep
    if tags:
        out["tags"] = ", ".join(tags)
    return out


def show(
    run: Run,
    finals: dict[str, float],
    series: dict[str, list[tuple[int, float, float]]],
    tags: Sequence[str] = (),
) -> Group:
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column(overflow="fold")
    head.add_row("run", f"{run.id}  {run.name}")
    state = run.state + (f": {run.reason}" if run.reason else "")
    head.add_row("state", state)
    head.add_row(
        "started",
        f"{fmt_time(run.started)}  ({fmt_duration(run.duration)}, coordinated by {run.coordinator or '?'})",
    )
    for key, value in settings(run, tags).items():
        head.add_row(key, fmt_value(value))
    facts = run.mesh.get("node_facts") or {}
    for node in run.mesh.get("nodes") or []:
        f = facts.get(node) or {}
        head.add_row(f"  {node}", ", ".join(str(f[k]) for k in ("device", "platform") if f.get(k)) or "—")
    if run.checkpoints:
        head.add_row("checkpoints", ", ".join(f"{c['run']}@{c['step']}" for c in run.checkpoints))
    parts: list[Any] = [head]
    if finals:
        table = Table(title="final metrics", title_justify="left")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in finals.items():
            table.add_row(key, fmt_value(value))
        parts.append(table)
    for key, points in series.items():
        parts.append(chart_text(key, points))
    return Group(*parts)


def compare(
    runs: Sequence[Run], finals: Sequence[dict[str, float]], tags: Sequence[Sequence[str]] | None = None
) -> Group:
    """The settings that differ between `runs`, then every metric's final value side by side."""
    rows = [settings(r, (tags or [()] * len(runs))[i]) for i, r in enumerate(runs)]
    keys = sorted({k for row in rows for k in row})
    diff = Table(title="settings that differ", title_justify="left")
    diff.add_column("setting")
    for r in runs:
        diff.add_column(f"{r.id} {r.name}", overflow="fold")
    differing = [k for k in keys if len({json.dumps(row.get(k), sort_keys=True) for row in rows}) > 1]
    for key in differing:
        diff.add_row(key, *(fmt_value(row.get(key)) for row in rows))
    parts: list[Any] = [diff if differing else Text("the runs' settings are the same")]
    metric_keys = sorted({k for f in finals for k in f})
    side = Table(title="final metrics", title_justify="left")
    side.add_column("metric")
    for r in runs:
        side.add_column(r.id, justify="right")
    for key in metric_keys:
        side.add_row(key, *(fmt_value(f.get(key)) for f in finals))
    side.add_row("state", *(r.state for r in runs))
    side.add_row("time", *(fmt_duration(r.duration) for r in runs))
    parts.append(side)
    return Group(*parts)
