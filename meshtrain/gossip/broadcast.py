"""The piggy-back queue: updates waiting to ride on gossip, pings and acks.

One update per member (a newer one replaces the older), each sent at most
`limit(N)` = retransmit_mult * ceil(log10(N+1)) times; the least-sent, newest
updates go first, packed into whatever room a datagram has left.
"""

from __future__ import annotations

from meshtrain.gossip.messages import Update


class _Item:
    __slots__ = ("transmits", "order", "message", "size")

    def __init__(self, transmits: int, order: int, message: Update, size: int) -> None:
        self.transmits = transmits
        self.order = order
        self.message = message
        self.size = size


class BroadcastQueue:
    def __init__(self) -> None:
        self._items: dict[str, _Item] = {}
        self._order = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def push(self, key: str, message: Update, size: int) -> None:
        self._order += 1
        self._items[key] = _Item(0, self._order, message, size)

    def take(self, budget: int, limit: int) -> list[Update]:
        """Updates that fit in `budget` bytes; each taken one counts a transmission."""
        if not self._items:
            return []
        items = self._items
        if len(items) == 1:
            ordered = list(items.items())
        else:
            ordered = sorted(items.items(), key=lambda kv: (kv[1].transmits, -kv[1].order))
        out: list[Update] = []
        for key, item in ordered:
            cost = item.size + 1
            if cost > budget:
                continue
            budget -= cost
            out.append(item.message)
            item.transmits += 1
            if item.transmits >= limit:
                del items[key]
            if budget < 16:
                break
        return out
