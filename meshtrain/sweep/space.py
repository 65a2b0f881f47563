"""A sweep's search space and objective, from the command line (pure).

``--param lr=loguniform:1e-4:1e-2``, ``--param dropout=uniform:0:0.5``,
``--param layers=int:2:8``, ``--param act=choice:relu,gelu`` and
``--objective val_loss:min`` become Optuna distributions and a direction; a
malformed one is a UserError naming the spec and the forms that work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshtrain.errors import UserError
from meshtrain.tracking.record import scalar

KINDS = ("loguniform", "uniform", "int", "choice")
FORMS = "NAME=loguniform:LO:HI, uniform:LO:HI, int:LO:HI or choice:A,B,C"


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    def distribution(self) -> Any:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high))
        return FloatDistribution(self.low, self.high, log=self.kind == "loguniform")

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name} in {{{', '.join(map(str, self.choices))}}}"
        return f"{self.name} {self.kind} [{self.low:g}, {self.high:g}]"


def _number(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--param {spec!r}: {text!r} is not a number ({FORMS})") from None


def parse_param(spec: str) -> Param:
    name, eq, rest = spec.partition("=")
    kind, colon, body = rest.partition(":")
    if not eq or not name.isidentifier() or not colon or kind not in KINDS or not body:
        raise UserError(f"--param {spec!r}: write it as {FORMS}")
    if kind == "choice":
        values = [v for v in body.split(",") if v != ""]
        if len(values) < 1:
            raise UserError(f"--param {spec!r}: choice needs at least one value")
        choices = tuple(dict.fromkeys(scalar(v) for v in values))  # '2' -> 2, '1e-3' -> 0.001, 'relu' stays
        return Param(name, kind, choices=choices)
    parts = body.split(":")
    if len(parts) != 2:
        raise UserError(f"--param {spec!r}: {kind} needs LO:HI ({FORMS})")
    low, high = _number(parts[0], spec), _number(parts[1], spec)
    if not low < high:
        raise UserError(f"--param {spec!r}: LO must be below HI")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"--param {spec!r}: loguniform needs LO > 0")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise UserError(f"--param {spec!r}: int needs whole numbers")
    return Param(name, kind, low, high)


def parse_params(specs: list[str]) -> list[Param]:
    params = [parse_param(s) for s in specs]
    names = [p.name for p in params]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"--param {dupes[0]} is given twice")
    if not params:
        raise UserError("a sweep needs at least one --param NAME=KIND:... to search")
    return params


def parse_objective(text: str) -> tuple[str, str]:
    """``val_loss:min`` -> ("val_loss", "minimize"); ``accuracy:max`` -> ("accuracy", "maximize")."""
    metric, _, way = text.partition(":")
    way = way or "min"
    if not metric or way not in ("min", "max"):
        raise UserError(f"--objective {text!r}: write it as METRIC:min or METRIC:max (val_loss:min)")
    return metric, "minimize" if way == "min" else "maximize"


def trial_args(values: dict[str, Any]) -> list[str]:
    """A trial's values as the script's arguments: ``--lr 0.003 --layers 4``."""
    out: list[str] = []
    for name, value in values.items():
        out += [f"--{name.replace('_', '-')}", repr(value) if isinstance(value, float) else str(value)]
    return out
