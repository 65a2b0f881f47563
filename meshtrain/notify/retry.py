"""The outbox: which deliveries are due, and when a failed one is tried again. Pure.

Every (target, notice) pair is one `Delivery`. The shell asks `due(now)` for
what to send, reports each outcome with `sent` or `failed`, and sleeps until
`next_due()`. A failure is retried after each delay of the schedule in turn
(1 s, 5 s, 30 s: a webhook restarting, a mail server greylisting), then
given up. `now` is injected, so the schedule is tested without sleeping.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from meshtrain.notify.events import Notice
from meshtrain.notify.targets import Target

RETRY_DELAYS_S: tuple[float, ...] = (1.0, 5.0, 30.0)
MAX_PENDING = 1000  # a mesh with a dead target and a flapping node must not grow without bound


@dataclass
class Delivery:
    id: int
    target: Target
    notice: Notice
    due: float
    attempts: int = 0  # attempts made so far
    on_done: Callable[[Delivery, bool], None] | None = None  # told once: sent (True) or given up (False)


@dataclass(frozen=True)
class Outcome:
    """What became of a failed attempt: `retry_in` seconds, or None when given up."""

    delivery: Delivery
    retry_in: float | None

    @property
    def attempts_allowed(self) -> int:
        return self.delivery.attempts + (1 if self.retry_in is not None else 0)


class Outbox:
    def __init__(self, delays: tuple[float, ...] = RETRY_DELAYS_S, max_pending: int = MAX_PENDING) -> None:
        self.delays = tuple(delays)
        self.max_pending = max_pending
        self._ids = itertools.count(1)
        self._waiting: dict[int, Delivery] = {}
        self._in_flight: dict[int, Delivery] = {}
        self.sent = 0
        self.given_up = 0
        self.dropped = 0  # refused because the outbox was full

    @property
    def attempts_max(self) -> int:
        return 1 + len(self.delays)

    def add(
        self,
        target: Target,
        notice: Notice,
        now: float,
        on_done: Callable[[Delivery, bool], None] | None = None,
    ) -> Delivery | None:
        if len(self._waiting) + len(self._in_flight) >= self.max_pending:
            self.dropped += 1
            return None
        delivery = Delivery(next(self._ids), target, notice, due=now, on_done=on_done)
        self._waiting[delivery.id] = delivery
        return delivery

    def due(self, now: float) -> list[Delivery]:
        """The deliveries to attempt now (oldest first); each is in flight until `sent`/`failed`."""
        ready = sorted((d for d in self._waiting.values() if d.due <= now), key=lambda d: (d.due, d.id))
        for d in ready:
            del self._waiting[d.id]
            d.attempts += 1
            self._in_flight[d.id] = d
        return ready

    def next_due(self) -> float | None:
        return min((d.due for d in self._waiting.values()), default=None)

    def sent_ok(self, delivery: Delivery) -> None:
        self._in_flight.pop(delivery.id, None)
        self.sent += 1

    def failed(self, delivery: Delivery, now: float) -> Outcome:
        self._in_flight.pop(delivery.id, None)
        if delivery.attempts > len(self.delays):
            self.given_up += 1
            return Outcome(delivery, None)
        delay = self.delays[delivery.attempts - 1]
        delivery.due = now + delay
        self._waiting[delivery.id] = delivery
        return Outcome(delivery, delay)

    def drop(self, job: str) -> list[Delivery]:
        """Forget the job's deliveries still waiting (its coordination moved: the successor sends them);
        those in flight finish."""
        gone = [d for d in self._waiting.values() if d.notice.job == job]
        for d in gone:
            del self._waiting[d.id]
        return gone

    @property
    def pending(self) -> int:
        return len(self._waiting) + len(self._in_flight)
