"""`run --notify-when`: the condition parser (pure), a malformed one refused in one line before anything
starts, and a real job (`--local 1`) telling a met condition once, then its end."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshtrain.errors import UserError
from meshtrain.jobspec import JobOptions
from meshtrain.notify.condition import OPERATORS, parse_condition, parse_conditions
from tests.test_notify_jobs import receiver, run, settle  # noqa: F401 - receiver is a fixture


def test_conditions_parse() -> None:
    c = parse_condition(" val_loss < 1.6 ")
    assert (c.metric, c.op, c.value, c.text) == ("val_loss", "<", 1.6, "val_loss<1.6")
    assert c.holds(1.5) and not c.holds(1.6) and not c.holds(math.nan)
    assert parse_condition("test_accuracy>=0.98").holds(0.98)
    assert parse_condition("step==100").text == "step==100"
    assert parse_condition("eval/loss<=-2.5e-1").value == -0.25
    assert parse_condition("loss>.5").holds(0.6)
    assert len(parse_conditions(["loss<1", "loss < 1.0"])) == 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "val_loss",
        "val_loss<",
        "<1.6",
        "val_loss<<1.6",
        "val_loss=1.6",
        "val_loss!=1",
        "val_loss<abc",
        "1loss<2",
        "loss<1e999",
        "loss<nan",
        "loss<1;rm -rf /",
        "x" * 300 + "<1",
    ],
)
def test_malformed_conditions_are_one_line(text: str) -> None:
    with pytest.raises(UserError) as exc:
        parse_condition(text)
    assert "\n" not in str(exc.value) and "--notify-when" in str(exc.value)


names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_./-]{0,20}", fullmatch=True)
values = st.floats(allow_nan=False, allow_infinity=False, width=64)


@given(names, st.sampled_from(sorted(OPERATORS)), values, values)
def test_the_canonical_text_round_trips_and_means_the_same(
    name: str, op: str, value: float, x: float
) -> None:
    c = parse_condition(f"{name} {op} {value!r}")
    assert parse_condition(c.text) == c
    assert c.holds(x) == OPERATORS[op](x, value)


def test_the_option_travels() -> None:
    options = JobOptions(notify_when=("val_loss<1.6",))
    assert options.to_wire() == {"notify_when": ["val_loss<1.6"]}
    assert JobOptions.from_wire(options.to_wire()) == options
    assert "notify_when" not in JobOptions().to_wire()


def test_a_malformed_condition_stops_run_in_one_line(tmp_path: Path) -> None:
    out = run(tmp_path, "--notify-when", "val_loss<<1.6")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "--notify-when" in out.stderr and "Traceback" not in out.stderr


def test_a_met_condition_is_told_once(tmp_path: Path, receiver: tuple[str, list[dict[str, Any]]]) -> None:  # noqa: F811
    url, got = receiver
    out = run(tmp_path, "--notify", url, "--notify-when", "loss<0.6", "--notify-when", "val_loss>9")
    assert out.returncode == 0, out.stderr
    settle(got, 2)
    assert sorted(m["event"] for m in got) == ["finished", "metric"], got
    (metric,) = [m for m in got if m["event"] == "metric"]
    assert metric["metrics"] == {"loss": 0.5} and metric["detail"] == "loss<0.6"
    assert metric["id"] == f"{metric['job']}/metric:loss<0.6"
