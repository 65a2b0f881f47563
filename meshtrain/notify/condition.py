"""`run --notify-when 'val_loss<1.6'`: a condition on a reported metric. Pure.

A condition is ``METRIC OP NUMBER``: METRIC any name the script passes to
`mesh.report` (``loss``, ``val_loss``, ``test_accuracy``...; letters,
digits, ``_ . - /``), OP one of ``< <= > >= ==``, NUMBER a finite decimal
(``1.6``, ``-3``, ``2e-3``); spaces around each part are allowed. The text
is checked where the user typed it (`meshtrain run`, before the script is
read): a malformed one is one `UserError` line naming --notify-when. The
job's coordinator sends one `metric` notice the first time a reported
value satisfies it (meshtrain.notify.events.JobWatcher).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshtrain.errors import UserError

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "<": operator.lt,
    ">": operator.gt,
}
_PATTERN = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][A-Za-z0-9_./-]*)\s*(?P<op><=|>=|==|<|>)\s*"
    r"(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$"
)
MAX_TEXT = 200


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str  # one of OPERATORS
    value: float

    @property
    def text(self) -> str:
        """The canonical form (``val_loss<1.6``): the condition's key in its job, and what travels."""
        shown = (
            str(int(self.value)) if self.value.is_integer() and abs(self.value) < 1e15 else repr(self.value)
        )
        return f"{self.metric}{self.op}{shown}"

    def holds(self, value: float) -> bool:
        return math.isfinite(value) and OPERATORS[self.op](value, self.value)


def parse_condition(text: str) -> Condition:
    """``METRIC OP NUMBER`` -> Condition; UserError (one line) for anything else."""
    shown = text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "..."
    match = _PATTERN.match(text) if len(text) <= MAX_TEXT else None
    if match is None:
        raise UserError(
            f"--notify-when {shown!r}: expected METRIC OP NUMBER with OP one of < <= > >= == "
            "(for example 'val_loss<1.6')"
        )
    value = float(match.group("value"))
    if not math.isfinite(value):
        raise UserError(f"--notify-when {shown!r}: {match.group('value')} is not a finite number")
    return Condition(match.group("metric"), match.group("op"), value)


def parse_conditions(texts: Iterable[str]) -> list[Condition]:
    """Each text parsed; the same condition twice counts once."""
    out: list[Condition] = []
    for text in texts:
        condition = parse_condition(str(text))
        if condition not in out:
            out.append(condition)
    return out
