"""Which nodes a job runs on: a pure decision over the membership view.

`meshtrain run --nodes N|a,b --min-nodes M` is answered here, without I/O,
so every rule (who counts as usable, what "missing" means, when to give up
waiting) is testable on plain data. The job coordinator calls `place` again
each time membership changes until it says `ready`, or the wait runs out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    """One member as placement sees it."""

    name: str
    state: str  # alive | suspect | dead | left
    protocol: int | None  # None: not an agent (no control port in its metadata)
    is_self: bool = False


@dataclass(frozen=True)
class Request:
    """What the user asked for: all usable nodes, a count, or names."""

    count: int | None = None
    names: tuple[str, ...] = ()
    min_nodes: int | None = None

    @staticmethod
    def parse(nodes: str | None, min_nodes: int | None) -> Request:
        """`--nodes` is either a positive count or comma-separated names."""
        if nodes is None or nodes.strip() == "":
            return Request(min_nodes=min_nodes)
        text = nodes.strip()
        if text.isdigit():
            return Request(count=int(text), min_nodes=min_nodes)
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        return Request(names=names, min_nodes=min_nodes)


@dataclass(frozen=True)
class Decision:
    """`kind` is ready (run on `nodes`), wait (not yet: `message` says why) or error (never)."""

    kind: str
    nodes: tuple[str, ...] = ()
    message: str = ""
    missing: tuple[str, ...] = field(default=())


def _usable(c: Candidate, protocol: int) -> bool:
    return c.state == "alive" and c.protocol == protocol


def _why_not(c: Candidate, protocol: int) -> str:
    if c.protocol is None:
        return f"{c.name} runs no meshtrain agent"
    if c.protocol != protocol:
        return f"{c.name} runs meshtrain protocol {c.protocol} (this is {protocol}): upgrade it"
    if c.state != "alive":
        return f"{c.name} is {c.state}"
    return f"{c.name} is usable"


def _ordered(cands: Sequence[Candidate]) -> list[Candidate]:
    """The submitting node first (it has the script already), then by name: deterministic ranks."""
    return sorted(cands, key=lambda c: (not c.is_self, c.name))


def place(cands: Sequence[Candidate], req: Request, protocol: int, *, timed_out: bool = False) -> Decision:
    """Decide where the job runs now; `timed_out` turns a wait into a final answer."""
    if req.names:
        return _place_named(cands, req, protocol, timed_out)
    usable = [c for c in _ordered(cands) if _usable(c, protocol)]
    unusable = [c for c in _ordered(cands) if not _usable(c, protocol)]
    want = req.count if req.count is not None else max(1, req.min_nodes or 1)
    if req.count is not None and len(usable) >= req.count:
        return Decision("ready", tuple(c.name for c in usable[: req.count]))
    if req.count is None and len(usable) >= want:
        return Decision("ready", tuple(c.name for c in usable))
    floor = req.min_nodes if req.min_nodes is not None else want
    if timed_out and usable and len(usable) >= floor:
        return Decision("ready", tuple(c.name for c in usable[:want]))
    have = ", ".join(c.name for c in usable) or "none"
    reasons = "; ".join(_why_not(c, protocol) for c in unusable)
    text = f"waiting for {want} nodes: have {have}" + (f" ({reasons})" if reasons else "")
    missing = tuple(c.name for c in unusable)
    if timed_out:
        text = f"only {len(usable)} of {want} nodes reachable: have {have}" + (
            f"; missing: {reasons}" if reasons else "; no other node has joined the mesh"
        )
        return Decision("error", message=text, missing=missing)
    return Decision("wait", message=text, missing=missing)


def _place_named(cands: Sequence[Candidate], req: Request, protocol: int, timed_out: bool) -> Decision:
    by_name = {c.name: c for c in cands}
    unknown = [n for n in req.names if n not in by_name]
    if unknown:
        known = ", ".join(sorted(by_name)) or "none"
        return Decision("error", message=f"unknown node {unknown[0]!r}; the mesh has: {known}")
    for n in req.names:
        c = by_name[n]
        if c.protocol is not None and c.protocol != protocol:
            return Decision("error", message=_why_not(c, protocol), missing=(n,))
    chosen = [by_name[n] for n in dict.fromkeys(req.names)]
    ready = [c for c in chosen if _usable(c, protocol)]
    not_ready = [c for c in chosen if not _usable(c, protocol)]
    if not not_ready:
        return Decision("ready", tuple(c.name for c in chosen))
    floor = req.min_nodes if req.min_nodes is not None else len(chosen)
    if timed_out and ready and len(ready) >= floor:
        return Decision("ready", tuple(c.name for c in ready))
    reasons = "; ".join(_why_not(c, protocol) for c in not_ready)
    missing = tuple(c.name for c in not_ready)
    if timed_out:
        return Decision("error", message=f"nodes not reachable: {reasons}", missing=missing)
    return Decision("wait", message=f"waiting for {', '.join(missing)}: {reasons}", missing=missing)
