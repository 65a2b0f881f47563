"""Power probe: pmset parsers on real-shaped outputs, the override file hook, the policy factors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshtrain.errors import UserError
from meshtrain.power import (
    OVERRIDE_ENV,
    PowerState,
    parse_pmset_batt,
    parse_pmset_therm,
    power_factor,
    probe,
    write_override,
)
from meshtrain.train.shares import plan_shares

BATT_DISCHARGING = (
    "Now drawing from 'Battery Power'\n"
    " -InternalBattery-0 (id=4653155)\t76%; discharging; 4:32 remaining present: true\n"
)
BATT_CHARGED = (
    "Now drawing from 'AC Power'\n"
    " -InternalBattery-0 (id=4653155)\t100%; charged; 0:00 remaining present: true\n"
)
BATT_NOT_CHARGING = (
    "Now drawing from 'AC Power'\n"
    " -InternalBattery-0 (id=8716387)\t80%; AC attached; not charging present: true\n"
)
BATT_DESKTOP = "Now drawing from 'AC Power'\n"
BATT_UPS = (
    "Now drawing from 'UPS Power'\n -CyberPower (id=1)\t63%; discharging; (no estimate) present: true\n"
)

THERM_APPLE_SILICON = (
    "Note: No thermal warning level has been recorded\n"
    "Note: No performance warning level has been recorded\n"
    "Note: No CPU power status has been recorded\n"
)
THERM_INTEL_OK = "CPU_Scheduler_Limit \t= 100\nCPU_Available_CPUs \t= 8\nCPU_Speed_Limit \t= 100\n"
THERM_INTEL_THROTTLED = "CPU_Scheduler_Limit \t= 100\nCPU_Available_CPUs \t= 8\nCPU_Speed_Limit \t= 58\n"
THERM_WARNING = "Thermal warning level set to 5.\nNote: No performance warning level has been recorded\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BATT_DISCHARGING, PowerState(True, 76.0)),
        (BATT_CHARGED, PowerState(False, 100.0)),
        (BATT_NOT_CHARGING, PowerState(False, 80.0)),
        (BATT_DESKTOP, PowerState(False, None)),
        (BATT_UPS, PowerState(True, 63.0)),
        ("", PowerState(None, None)),
    ],
)
def test_parse_pmset_batt(text: str, expected: PowerState) -> None:
    assert parse_pmset_batt(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (THERM_APPLE_SILICON, "nominal"),
        (THERM_INTEL_OK, "nominal"),
        (THERM_INTEL_THROTTLED, "serious"),
        ("CPU_Speed_Limit = 90", "fair"),
        ("CPU_Speed_Limit = 30", "critical"),
        (THERM_WARNING, "serious"),
        ("Thermal warning level set to 10.", "critical"),
        ("", None),
    ],
)
def test_parse_pmset_therm(text: str, expected: str | None) -> None:
    assert parse_pmset_therm(text) == expected


def test_macos_probe_runs_both_pmset_commands() -> None:
    outputs = {"batt": BATT_DISCHARGING, "therm": THERM_INTEL_THROTTLED}
    calls: list[list[str]] = []

    def run(cmd: list[str]) -> str:
        calls.append(cmd)
        return outputs[cmd[-1]]

    state = probe(environ={}, platform="darwin", run=run)
    assert state == PowerState(True, 76.0, "serious")
    assert calls == [["pmset", "-g", "batt"], ["pmset", "-g", "therm"]]


def test_override_file_switches_the_probe_live(tmp_path: Path) -> None:
    hook = tmp_path / "power.json"
    env = {OVERRIDE_ENV: str(hook)}
    assert probe(environ=env) == probe(environ={})  # absent file: the real sensors
    write_override(hook, PowerState(on_battery=False, percent=100.0))
    assert probe(environ=env) == PowerState(False, 100.0, None)
    write_override(hook, PowerState(on_battery=True, percent=40.0, thermal="fair"))
    assert probe(environ=env) == PowerState(True, 40.0, "fair")
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write leaves nothing behind


def test_override_file_is_lenient(tmp_path: Path) -> None:
    hook = tmp_path / "power.json"
    hook.write_text(json.dumps({"on_battery": "yes", "percent": True, "thermal": "lava"}))
    assert probe(environ={OVERRIDE_ENV: str(hook)}) == PowerState()
    hook.write_text("{not json")
    assert probe(environ={OVERRIDE_ENV: str(hook)}) == PowerState()


def test_override_reaches_a_child_process(tmp_path: Path) -> None:
    """The hook works across processes, as an agent in another namespace would read it."""
    hook = tmp_path / "power.json"
    write_override(hook, PowerState(on_battery=True, percent=15.0))
    code = "from meshtrain.power import probe; s = probe(); print(s.on_battery, s.percent)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, OVERRIDE_ENV: str(hook)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["True", "15.0"]


@pytest.mark.parametrize(
    ("state", "policy", "expected"),
    [
        (PowerState(False, 100.0), "reduce", (1.0, "")),
        (PowerState(None, None), "leave", (1.0, "")),
        (PowerState(True, 55.0), "continue", (1.0, "on battery 55%: continuing")),
        (PowerState(True, 55.0), "reduce", (0.5, "on battery 55%: halved")),
        (PowerState(True, 55.0), "leave", (0.0, "on battery 55%: leaving")),
        (PowerState(True, None), "reduce", (0.5, "on battery: halved")),
        (PowerState(False, 100.0, "serious"), "reduce", (0.5, "thermal serious: halved")),
        (PowerState(False, 100.0, "fair"), "leave", (1.0, "")),
        (PowerState(True, 10.0, "critical"), "leave", (0.0, "on battery 10%, thermal critical: leaving")),
    ],
)
def test_power_factor(state: PowerState, policy: str, expected: tuple[float, str]) -> None:
    assert power_factor(state, policy) == expected


def test_threshold_spares_a_full_battery() -> None:
    assert power_factor(PowerState(True, 80.0), "leave", threshold=30) == (1.0, "on battery")
    assert power_factor(PowerState(True, 30.0), "leave", threshold=30)[0] == 0.0


def test_bad_policy_is_a_user_error() -> None:
    with pytest.raises(UserError, match="continue, reduce, leave"):
        power_factor(PowerState(), "sometimes")
    with pytest.raises(UserError):
        power_factor(PowerState(), "reduce", threshold=150)


def test_switching_to_battery_lowers_the_share_within_one_rebalance(tmp_path: Path) -> None:
    """The must-show end to end in one process: hook file -> probe -> factor -> shares."""
    hook = tmp_path / "power.json"
    env = {OVERRIDE_ENV: str(hook)}
    rates = {"mac": 1000.0, "air": 1000.0}
    write_override(hook, PowerState(on_battery=False, percent=100.0))
    before = plan_shares(rates, None, factors={"air": power_factor(probe(environ=env), "reduce")})
    assert before.shares == pytest.approx({"mac": 0.5, "air": 0.5})
    write_override(hook, PowerState(on_battery=True, percent=70.0))
    after = plan_shares(rates, before.shares, factors={"air": power_factor(probe(environ=env), "reduce")})
    assert after.changed and after.shares["air"] == pytest.approx(1 / 3)
    assert after.reasons["air"] == "same speed, on battery 70%: halved"
