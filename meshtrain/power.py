"""Is this node on battery or hot, and what should that do to its share of the work?

`probe()` reads the machine: psutil's battery sensor (Linux, Windows, macOS),
and on macOS `pmset -g batt` and `pmset -g therm` (psutil cannot see Apple's
thermal pressure, and `pmset` also knows a UPS). `power_factor()` turns a
`PowerState` and the node's `join --on-battery=continue|reduce|leave` policy
into a factor on its measured speed (1.0, 0.5 or 0.0) and a one-line reason
that the live view shows next to its share (meshtrain.train.shares).

Test hook: when the environment variable `MESHTRAIN_POWER_FILE` names a JSON
file that exists, e.g. `{"on_battery": true, "percent": 40}`, its contents
*are* the probe, read afresh on every call. Tests and benches switch a node to
"on battery" live by rewriting that file (`write_override` does it atomically,
so a reader never sees half a file). If the variable is set but the file is
absent, the real probe is used.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psutil

from meshtrain import env as env_names
from meshtrain.errors import UserError

__all__ = [
    "BATTERY_POLICIES",
    "DEFAULT_THRESHOLD",
    "OVERRIDE_ENV",
    "PowerState",
    "parse_pmset_batt",
    "parse_pmset_therm",
    "power_factor",
    "probe",
    "write_override",
]

OVERRIDE_ENV = env_names.POWER_FILE
BATTERY_POLICIES = ("continue", "reduce", "leave")
Policy = Literal["continue", "reduce", "leave"]
# On battery at or below this charge (%) the policy applies; 100 = whenever on battery.
DEFAULT_THRESHOLD = 100.0
THERMAL_LEVELS = ("nominal", "fair", "serious", "critical")  # Apple's ProcessInfo.ThermalState names
HOT = ("serious", "critical")  # thermal states that count as pressure, like a low battery
REDUCED_FACTOR = 0.5


@dataclass(frozen=True)
class PowerState:
    """What the machine says about its power; None = it cannot tell (a desktop, no sensor)."""

    on_battery: bool | None = None
    percent: float | None = None
    thermal: str | None = None  # one of THERMAL_LEVELS, or None

    def to_dict(self) -> dict[str, Any]:
        """Msgpack/JSON-friendly, for gossip metadata and the override file."""
        return {"on_battery": self.on_battery, "percent": self.percent, "thermal": self.thermal}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PowerState:
        """Lenient: a missing or mistyped field reads as unknown, never as an error."""
        on_battery = data.get("on_battery")
        percent = data.get("percent")
        thermal = data.get("thermal")
        return cls(
            on_battery=on_battery if isinstance(on_battery, bool) else None,
            percent=float(percent)
            if isinstance(percent, int | float) and not isinstance(percent, bool)
            else None,
            thermal=thermal if thermal in THERMAL_LEVELS else None,
        )


def probe(
    environ: Mapping[str, str] | None = None,
    platform: str | None = None,
    run: Callable[[list[str]], str] | None = None,
) -> PowerState:
    """This machine's power state now: the override file if there is one, else the sensors.

    `environ`, `platform` and `run` (a command -> its stdout) are injectable for tests.
    """
    env = os.environ if environ is None else environ
    override = _read_override(env.get(OVERRIDE_ENV))
    if override is not None:
        return override
    if (platform or sys.platform) == "darwin":
        runner = run or _run
        batt = parse_pmset_batt(runner(["pmset", "-g", "batt"]))
        return PowerState(batt.on_battery, batt.percent, parse_pmset_therm(runner(["pmset", "-g", "therm"])))
    return _psutil_battery()


def write_override(path: str | Path, state: PowerState) -> None:
    """Write the test hook's file atomically (a reader sees the old state or the new, never half)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state.to_dict()))
    os.replace(tmp, target)


def _read_override(path: str | None) -> PowerState | None:
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return PowerState()  # present but unreadable: say "unknown" rather than guess from sensors
    return PowerState.from_dict(data) if isinstance(data, dict) else PowerState()


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=2).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _psutil_battery() -> PowerState:
    sensor = getattr(psutil, "sensors_battery", None)
    try:
        battery = sensor() if sensor is not None else None
    except (OSError, RuntimeError):
        battery = None
    if battery is None:
        return PowerState()
    plugged = battery.power_plugged
    return PowerState(
        on_battery=None if plugged is None else not plugged,
        percent=round(float(battery.percent), 1),
        thermal=None,
    )


_DRAWING = re.compile(r"Now drawing from '([^']+)'")
_PERCENT = re.compile(r"(\d{1,3})%;")
_SPEED_LIMIT = re.compile(r"CPU_Speed_Limit\s*=\s*(\d+)")
_WARNING_LEVEL = re.compile(r"(?:thermal|performance) warning level\D*?(\d+)", re.IGNORECASE)


def parse_pmset_batt(text: str) -> PowerState:
    """`pmset -g batt`: the power source line and the internal battery's charge, if any.

    Now drawing from 'Battery Power'
     -InternalBattery-0 (id=4653155)\t76%; discharging; 4:32 remaining present: true
    """
    source = _DRAWING.search(text)
    on_battery = None if source is None else source.group(1) in ("Battery Power", "UPS Power")
    percent = _PERCENT.search(text)
    return PowerState(on_battery=on_battery, percent=float(percent.group(1)) if percent else None)


def parse_pmset_therm(text: str) -> str | None:
    """`pmset -g therm` as a thermal level: nominal, fair, serious, critical; None if it says nothing.

    Intel Macs report `CPU_Speed_Limit = N` (percent of full clock); Apple
    silicon reports a warning level (0 normal, 5 danger, 10 crisis in IOKit's
    terms) or notes that none "has been recorded".
    """
    worst = -1
    limit = _SPEED_LIMIT.search(text)
    if limit is not None:
        pct = int(limit.group(1))
        worst = max(worst, 0 if pct >= 100 else 1 if pct >= 80 else 2 if pct >= 50 else 3)
    for match in _WARNING_LEVEL.finditer(text):
        level = int(match.group(1))
        worst = max(worst, 0 if level == 0 else 1 if level < 5 else 2 if level < 10 else 3)
    if worst < 0 and re.search(r"No (?:thermal|performance) warning level has been recorded", text):
        worst = 0
    return THERMAL_LEVELS[worst] if worst >= 0 else None


def check_policy(policy: str) -> Policy:
    """The `--on-battery` value, or a UserError naming the choices."""
    if policy not in BATTERY_POLICIES:
        raise UserError(f"--on-battery must be one of {', '.join(BATTERY_POLICIES)} (got {policy!r})")
    return policy  # type: ignore[return-value]


def power_factor(
    state: PowerState, policy: str = "reduce", threshold: float = DEFAULT_THRESHOLD
) -> tuple[float, str]:
    """(factor on this node's speed, reason): 1.0 as normal, 0.5 reduced, 0.0 leave the job.

    The policy applies when the node is on battery with at most `threshold`
    percent left (unknown charge counts as low), or when it is under thermal
    pressure (serious or critical). `continue` keeps the full share and says so.
    """
    chosen = check_policy(policy)
    if not 0 <= threshold <= 100:
        raise UserError(f"the battery threshold must be a percentage (got {threshold})")
    pressures = []
    if state.on_battery and (state.percent is None or state.percent <= threshold):
        pressures.append("on battery" + (f" {state.percent:.0f}%" if state.percent is not None else ""))
    if state.thermal in HOT:
        pressures.append(f"thermal {state.thermal}")
    if not pressures:
        return 1.0, "on battery" if state.on_battery else ""
    what = ", ".join(pressures)
    if chosen == "continue":
        return 1.0, f"{what}: continuing"
    if chosen == "reduce":
        return REDUCED_FACTOR, f"{what}: halved"
    return 0.0, f"{what}: leaving"
