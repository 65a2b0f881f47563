"""The mesh snapshot (schema: meshtrain.status, shared with every view), built from the membership view.

Pure: members, events, jobs and counters in, one plain msgpack/JSON-able dict
out. `meshtrain status --json` prints exactly this.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from meshtrain import __version__
from meshtrain.status import MeshSnapshot, Node

EVENTS_KEPT = 50

NODE_FACTS = ("platform", "device", "cores", "memory_gb", "load", "battery")


def node_entry(member: Any) -> Node:
    meta: Mapping[str, Any] = member.meta or {}
    entry: Node = {
        "id": member.id,
        "name": member.name,
        "addr": f"{member.addr[0]}:{member.addr[1]}",
        "state": member.state,
        "incarnation": member.incarnation,
    }
    for key in NODE_FACTS:
        entry[key] = meta.get(key)  # type: ignore[literal-required]  # NODE_FACTS are Node keys
    entry["job"] = meta.get("job")
    entry["role"] = meta.get("role")
    return entry


def mesh_snapshot(
    self_id: str,
    leader: str | None,
    members: Sequence[Any],
    events: Iterable[Any],
    jobs: Iterable[dict[str, Any]],
    drops: Mapping[str, int],
) -> MeshSnapshot:
    ordered = sorted(members, key=lambda m: (m.id != self_id, m.name))
    return {
        "version": __version__,
        "self": self_id,
        "leader": leader,
        "nodes": [node_entry(m) for m in ordered],
        "events": list(events),
        "jobs": list(jobs),
        "drops": dict(drops),
    }
