"""The quorum counts the last *formed* view: a cut-off coordinator cannot shrink its way to training alone.

A JobRunner driven by hand (no sockets): four workers, the first view formed, then the coordinator's
gossip declares its peers dead one at a time, as it does on a host whose link was cut. Counting
against the newest issued view, it issued 3 of 4, 2 of 3, then (a tie it holds the lowest rank of)
1 of 2 -- a view of itself alone, a ring of one that commits steps nobody else saw (found by
tests/test_jobs_netns.py). Counting against the formed view it stops at 2 of 4 and pauses; the
majority side still shrinks view by view as its rings form.
"""

from __future__ import annotations

import asyncio
from typing import Any

from meshtrain import PROTOCOL_VERSION
from meshtrain.agent.job_coordination import record_key
from meshtrain.agent.jobs import JobRequest, JobRunner, _Participant
from meshtrain.agent.placement import Candidate

NODES = ("h0", "h1", "h2", "h3")


class Mesh:
    def __init__(self) -> None:
        self.alive = set(NODES)

    def candidates(self) -> list[Candidate]:
        return [Candidate(n, "alive" if n in self.alive else "dead", PROTOCOL_VERSION) for n in NODES]

    def endpoint(self, name: str) -> tuple[str, int] | None:
        return ("127.0.0.1", 1)

    async def changed(self, timeout: float) -> None:
        await asyncio.sleep(timeout)


class Links:
    def __init__(self) -> None:
        self.told: list[tuple[str, str, dict[str, Any]]] = []

    def tell(self, node: str, op: str, **fields: Any) -> None:
        self.told.append((node, op, fields))

    async def publish(self, runner: JobRunner) -> None:
        return None


def four_workers(me: str) -> tuple[JobRunner, Mesh]:
    mesh = Mesh()
    runner = JobRunner(
        request=JobRequest("s.py", [], b""), membership=mesh, links=Links(), me=me, origin="h0"
    )
    runner._parts = [
        _Participant(name=n, rank=i, host="127.0.0.1", control_port=1, member=n, in_view=True)
        for i, n in enumerate(NODES)
    ]
    runner.state.assign(list(NODES))
    assert runner._send_view()
    runner._saw_formed(1, None)  # every worker formed the ring of view 1
    return runner, mesh


def members(runner: JobRunner) -> list[str]:
    return [str(m[0]) for m in (runner._view or {}).get("members") or []]


def lose(runner: JobRunner, mesh: Mesh, node: str) -> None:
    mesh.alive.discard(node)
    runner._watch_membership()
    runner._update_view()


def test_a_cut_off_coordinator_stops_at_half_of_the_formed_view_and_pauses() -> None:
    async def body() -> None:
        runner, mesh = four_workers("h0")
        lose(runner, mesh, "h2")  # 3 of 4: a view the others never see (they are cut off), never formed
        assert members(runner) == ["h0", "h1", "h3"]
        lose(runner, mesh, "h3")  # 2 of 4 with the lowest rank: issued, and it can never form either
        assert members(runner) == ["h0", "h1"]
        lose(runner, mesh, "h1")  # 1 of 4: no quorum over the formed view
        assert members(runner) == ["h0", "h1"] and runner.state.state == "paused"
        assert "lost contact with most of the job's nodes" in str(runner.state.message)
        views = [f["view"]["members"] for _, op, f in runner.links.told if op == "job.view"]  # type: ignore[attr-defined]
        assert all(len(v) > 1 for v in views), views  # never a view of itself alone

    asyncio.run(body())


def test_the_majority_side_shrinks_as_its_rings_form() -> None:
    async def body() -> None:
        runner, mesh = four_workers("h1")
        lose(runner, mesh, "h0")
        assert members(runner) == ["h1", "h2", "h3"]
        runner._saw_formed(2, ["h1", "h2", "h3"])  # its ring formed: the new base
        lose(runner, mesh, "h2")  # 2 of 3 of the formed view
        assert members(runner) == ["h1", "h3"]
        record = runner.record()
        assert record["formed"] == {"version": 2, "members": ["h1", "h2", "h3"]}

    asyncio.run(body())


def test_the_record_with_the_newer_formed_view_wins_over_more_issued_views() -> None:
    alone = {"view": {"version": 4}, "formed": {"version": 1}, "term": 0, "seq": 900}  # issued alone
    majority = {"view": {"version": 2}, "formed": {"version": 2}, "term": 1, "seq": 30}  # trained on
    assert record_key(majority) > record_key(alone)


def test_a_joiner_that_never_formed_a_ring_is_ended_when_the_job_finishes() -> None:
    async def body() -> None:
        runner, _ = four_workers("h0")
        late = _Participant(name="h0", rank=4, host="127.0.0.1", control_port=1, member="h0~1", in_view=True)
        runner._parts.append(late)
        assert runner._send_view()  # view 2 holds the joiner; its ring never forms: the others finish
        for p in runner._parts[:4]:
            runner._handle(p, {"kind": "event", "type": "exit", "code": 0}, [])
        runner._end_stragglers()
        kills = [(n, f["member"]) for n, op, f in runner.links.told if op == "job.kill"]  # type: ignore[attr-defined]
        assert kills == [("h0", "h0~1")] and late.killed
        runner._handle(late, {"kind": "event", "type": "exit", "code": -15}, [])
        assert runner._verdict().state == "done"  # its end is ours, not a failure

    asyncio.run(body())


def test_a_replaced_coordinators_request_is_refused_and_a_live_ones_never() -> None:
    from meshtrain.agent.job_coordination import superseded

    healed = {"coordinator": "h0", "term": 0, "formed": {"version": 1}, "view": {"version": 4}, "seq": 900}
    majority = {"coordinator": "h1", "term": 1, "formed": {"version": 3}, "view": {"version": 3}, "seq": 40}
    assert superseded(healed, majority)  # the far side of a healed partition: refused
    assert not superseded(majority, healed)  # a stale holder accepts the live coordinator's request
    overtaken = {**majority, "seq": 39, "view": {"version": 2}, "formed": {"version": 2}}
    assert not superseded(overtaken, majority)  # its own later publish arrived first: still its own
    rival = {"coordinator": "h2", "term": 1, "formed": {"version": 2}}  # took over on the minority side too
    assert superseded(rival, majority) and not superseded(majority, rival)
    assert superseded(majority, {**majority, "result": {"state": "done"}})  # over: nothing to start
