"""Stand-ins a `JobRunner` (agent/jobs.py) is driven with in unit tests: a membership and links.

No sockets: `FakeMesh` says which nodes are alive, `FakeLinks` records what the coordinator tells
workers (views, kills), so a test can check the coordinator's decisions by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from meshtrain import PROTOCOL_VERSION
from meshtrain.agent.placement import Candidate


class FakeMesh:
    """The nodes `nodes`, all alive until a test discards one from `alive`."""

    def __init__(self, nodes: Iterable[str]) -> None:
        self.nodes = tuple(nodes)
        self.alive = set(self.nodes)

    def candidates(self) -> list[Candidate]:
        return [Candidate(n, "alive" if n in self.alive else "dead", PROTOCOL_VERSION) for n in self.nodes]

    def endpoint(self, name: str) -> tuple[str, int] | None:
        return ("127.0.0.1", 1) if name in self.alive else None

    async def changed(self, timeout: float) -> None:
        await asyncio.sleep(timeout)


class FakeLinks:
    """Records every (node, op, fields) the coordinator tells; publishing is a no-op."""

    def __init__(self) -> None:
        self.told: list[tuple[str, str, dict[str, Any]]] = []

    def tell(self, node: str, op: str, **fields: Any) -> None:
        self.told.append((node, op, fields))

    async def publish(self, runner: Any) -> None:
        return None
