"""Lifeguard's local health multiplier: a node that misses acks suspects itself first.

When our own probes keep failing (or relays' nacks do not come back), the likeliest
cause is us: an overloaded CPU or a bad link. Scaling our probe timeouts by
(score + 1) stops a sick node from falsely accusing healthy ones.
"""

from __future__ import annotations


class Awareness:
    def __init__(self, max_multiplier: int) -> None:
        self.max_multiplier = max_multiplier
        self.score = 0

    def apply(self, delta: int) -> None:
        self.score = min(max(self.score + delta, 0), self.max_multiplier - 1)

    @property
    def multiplier(self) -> int:
        return self.score + 1

    def scale(self, timeout: float) -> float:
        return timeout * (self.score + 1)
