"""Human-readable numbers for the views: sizes, rates, durations, ages, sparklines.

Every formatter accepts `None` (an optional snapshot field that is missing)
and returns a short placeholder instead of raising, so a view never crashes
on a partial snapshot.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

MISSING = "—"
_SPARK_BLOCKS = "▁▂▃▄▅▆▇█"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def size_gb(value: float | None) -> str:
    """Memory in GB: `16 GB`, `7.5 GB`, `512 MB`."""
    if not _is_number(value):
        return MISSING
    assert value is not None
    if value < 1:
        return f"{value * 1024:.0f} MB"
    if value < 10:
        return f"{value:.1f} GB"
    return f"{value:.0f} GB"


def count(value: float | None) -> str:
    """A count or rate with thousands separators: `12,345`; compact above a million."""
    if not _is_number(value):
        return MISSING
    assert value is not None
    if abs(value) >= 1e6:
        return f"{value / 1e6:.1f}M"
    return f"{value:,.0f}"


def mb_per_s(value: float | None) -> str:
    """Bandwidth given in MB/s: `812 MB/s`, `1.2 GB/s`, `3.4 MB/s`."""
    if not _is_number(value):
        return MISSING
    assert value is not None
    if value >= 1000:
        return f"{value / 1000:.1f} GB/s"
    if value >= 10:
        return f"{value:.0f} MB/s"
    return f"{value:.1f} MB/s"


def percent(fraction: float | None, digits: int = 0) -> str:
    """A fraction 0..1 as a percentage: `0.9784` -> `97.84%` with digits=2."""
    if not _is_number(fraction):
        return MISSING
    assert fraction is not None
    return f"{fraction * 100:.{digits}f}%"


def accuracy(fraction: float | None) -> str:
    """Test accuracy with two decimals, the precision people compare runs at.

    The schema says a fraction 0..1; a script that reports percent (97.8) is
    shown as such rather than as 9780%.
    """
    if _is_number(fraction) and fraction is not None and 1.0 < fraction <= 100.0:
        fraction /= 100.0
    return percent(fraction, 2)


def loss(value: float | None) -> str:
    """Loss with four significant digits."""
    if not _is_number(value):
        return MISSING
    assert value is not None
    return f"{value:.4g}"


def metric(value: float | None) -> str:
    """Any named metric: `1.523`, `3.00e-04` (a learning rate), `12,345`, `1.4M` (counts, rates)."""
    if not _is_number(value):
        return MISSING
    assert value is not None
    if abs(value) >= 1000:
        return count(value)
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4g}"


def duration(seconds: float | None) -> str:
    """`42s`, `3:07`, `1:02:03`; `—` when unknown or negative."""
    if not _is_number(seconds) or seconds is None or seconds < 0:
        return MISSING
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    if minutes:
        return f"{minutes}:{secs:02d}"
    return f"{secs}s"


def clock(unix_seconds: float | None) -> str:
    """Local wall-clock time of an event, `HH:MM:SS`."""
    if not _is_number(unix_seconds):
        return "--:--:--"
    assert unix_seconds is not None
    return time.strftime("%H:%M:%S", time.localtime(unix_seconds))


def sparkline(values: Sequence[float | None], width: int = 12, *, log_scale: bool = False) -> str:
    """The trend of `values` in at most `width` block characters, scaled between min and max.

    A longer history is averaged into `width` equal buckets, so the line shows
    the whole run's trend rather than the noise of the last few steps.
    `log_scale` (for losses, which fall over orders of magnitude) keeps late,
    small improvements visible instead of flattening them under the first steps.
    """
    clean = [float(v) for v in values if _is_number(v)]  # type: ignore[arg-type]
    if not clean or width <= 0:
        return ""
    if log_scale and all(v > 0 for v in clean):
        clean = [math.log(v) for v in clean]
    if len(clean) > width:
        edges = [round(i * len(clean) / width) for i in range(width + 1)]
        clean = [sum(clean[a:b]) / (b - a) for a, b in zip(edges, edges[1:], strict=False) if b > a]
    low, high = min(clean), max(clean)
    span = (high - low) or 1.0
    top = len(_SPARK_BLOCKS) - 1
    return "".join(_SPARK_BLOCKS[round((v - low) / span * top)] for v in clean)


def bar(fraction: float | None, width: int) -> str:
    """A plain-text bar of `width` cells: `██████░░░░`."""
    frac = min(max(fraction, 0.0), 1.0) if _is_number(fraction) and fraction is not None else 0.0
    filled = round(frac * width)
    return "█" * filled + "░" * (width - filled)


def ascii_bar(fraction: float | None, width: int) -> str:
    """The same bar in ASCII for plain logs: `[######----]`."""
    frac = min(max(fraction, 0.0), 1.0) if _is_number(fraction) and fraction is not None else 0.0
    filled = round(frac * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"
