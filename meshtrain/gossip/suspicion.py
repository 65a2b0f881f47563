"""Lifeguard suspicion timer: the more members independently suspect a node, the sooner it is dead.

A lone suspicion waits `maximum` (a refutation has time to arrive); each new
independent confirmation shrinks the timeout logarithmically towards `minimum`,
reached after `expected` confirmations. A true crash is seen by many probers, so it
is declared quickly; a false one is usually seen by one.
"""

from __future__ import annotations

import math


class Suspicion:
    __slots__ = ("start", "minimum", "maximum", "expected", "confirmers", "deadline")

    def __init__(self, start: float, minimum: float, maximum: float, expected: int, by: str) -> None:
        self.start = start
        self.minimum = minimum
        self.maximum = maximum
        self.expected = expected
        self.confirmers = {by}
        self.deadline = start + (minimum if expected < 1 else maximum)

    def confirm(self, by: str) -> bool:
        """Count `by` once; True when it was new (then the caller re-gossips the suspicion)."""
        if by in self.confirmers or len(self.confirmers) > self.expected:
            return False
        self.confirmers.add(by)
        n = len(self.confirmers) - 1
        frac = math.log(n + 1) / math.log(self.expected + 1)
        timeout = max(self.minimum, self.maximum - (self.maximum - self.minimum) * frac)
        self.deadline = self.start + timeout
        return True
