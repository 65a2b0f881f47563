"""A job's automatic roll-back (agent/jobs.py), driven by hand: no sockets, no processes.

A worker's crash that asks for a roll-back (meshtrain.shard's `ShardLost`) ends every worker and
starts the job again from its newest checkpoint -- only when the job checkpoints, at most
MAX_ROLLBACKS within ROLLBACK_WINDOW_S, with member ids never reused. The real thing, with
processes SIGKILLed: tests/test_shard_rollback.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from meshtrain.agent.jobs import MAX_ROLLBACKS, ROLLBACK_WINDOW_S, JobRequest, JobRunner, _Participant
from meshtrain.jobspec import JobOptions
from meshtrain.testing.coordinator import FakeLinks, FakeMesh

NODES = ("h0", "h1", "h2")
CHECKPOINTS = JobOptions(checkpoint_every="2", run="rb")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def runner_of(options: JobOptions, clock: Clock | None = None) -> tuple[JobRunner, FakeMesh, FakeLinks]:
    mesh, links = FakeMesh(NODES), FakeLinks()
    runner = JobRunner(
        request=JobRequest("s.py", [], b"", options=options),
        membership=mesh,
        links=links,
        me="h0",
        origin="h0",
        clock=clock or Clock(),
    )
    runner._parts = [
        _Participant(name=n, rank=i, host="127.0.0.1", control_port=1, member=n, in_view=True)
        for i, n in enumerate(NODES)
    ]
    runner.state.assign(list(NODES))
    assert runner._send_view()
    return runner, mesh, links


SHARD_LOST = {"kind": "event", "type": "crash", "summary": "ShardLost: h2 was lost", "rollback": True}


def exit_frame(code: int) -> dict[str, Any]:
    return {"kind": "event", "type": "exit", "code": code}


def test_a_roll_back_crash_fails_a_job_without_checkpoints() -> None:
    runner, _, _ = runner_of(JobOptions())
    runner._handle(runner._parts[0], SHARD_LOST, [])
    assert runner._rollback is None and len(runner._failures) == 1
    assert "ShardLost: h2 was lost" in runner._verdict().message  # type: ignore[operator]


def test_roll_backs_are_limited_within_the_window_and_allowed_again_after_it() -> None:
    clock = Clock()
    runner, _, _ = runner_of(CHECKPOINTS, clock)
    for _ in range(MAX_ROLLBACKS):
        assert runner._may_roll_back()
        runner._rollback_times.append(clock())
        clock.t += 1.0
    assert not runner._may_roll_back()  # a job whose every attempt fails stops
    runner._handle(runner._parts[0], SHARD_LOST, [])
    assert runner._rollback is None and runner._failures
    clock.t += ROLLBACK_WINDOW_S
    assert runner._may_roll_back()  # laptops that sleep at night: the job goes on


def test_member_ids_are_never_reused_across_attempts_and_admissions_in_flight() -> None:
    runner, _, _ = runner_of(CHECKPOINTS)
    assert runner._next_member("h1") == "h1~1"  # an admission in flight holds h1~1
    runner._retired, runner._parts = runner._parts, []
    assert runner._next_member("h1") == "h1~2"
    assert runner._next_member("h0") == "h0~1"


def test_the_job_rolls_back_on_the_nodes_there_are_and_finishes() -> None:
    async def body() -> None:
        runner, mesh, links = runner_of(CHECKPOINTS)
        prepared: list[list[str]] = []

        async def prepare(nodes: list[str]) -> str | None:  # stands in for job.prepare on each node
            prepared.append(list(nodes))
            for rank, name in enumerate(nodes):
                member = runner._next_member(name)
                runner._parts.append(_Participant(name, rank, "127.0.0.1", 1, member=member))
            return None

        runner._prepare = prepare  # type: ignore[method-assign]
        following = asyncio.create_task(runner.follow())
        await asyncio.sleep(0.05)  # following: it waits for reports
        h0, h1, h2 = runner._parts
        mesh.alive.discard("h2")
        runner.deliver("h2", "h2", 1, [[1, exit_frame(-9)]])  # h2's worker SIGKILLed: lost
        runner.deliver("h0", "h0", 1, [[1, SHARD_LOST]])  # the others find its shard gone
        runner.deliver("h1", "h1", 1, [[1, SHARD_LOST]])
        await asyncio.sleep(0.3)
        kills = {f["member"] for _, op, f in links.told if op == "job.kill"}
        assert {"h0", "h1"} <= kills  # every worker of the attempt is ended
        assert not prepared  # ... before any new one starts
        runner.deliver("h0", "h0", 2, [[2, exit_frame(1)]])
        runner.deliver("h1", "h1", 2, [[2, exit_frame(-15)]])
        for _ in range(50):
            if prepared:
                break
            await asyncio.sleep(0.05)
        assert prepared == [["h0", "h1"]]  # on the nodes there are now
        assert runner.request.options.resume  # the new attempt is the job's own --resume
        assert [p.member for p in runner._parts] == ["h0~1", "h1~1"]
        assert [m[0] for m in (runner._view or {})["members"]] == ["h0~1", "h1~1"]
        assert any(e.get("kind") == "rollback" for e in runner.state.events)
        for p in runner._parts:
            runner.deliver(p.name, p.member, 1, [[1, exit_frame(0)]])
        result = await asyncio.wait_for(following, 10)
        assert result is not None and result.state == "done", result
        assert runner.rollbacks == 1 and {p.member for p in runner._retired} == {"h0", "h1", "h2"}
        assert h0.killed and h1.killed and h2.lost

    asyncio.run(body())


OOM = {"kind": "event", "type": "exit", "code": -9, "oom": True}


def _orphaned(options: JobOptions) -> tuple[JobRunner, Clock]:
    """h0..h2 started; h1~1 joined; then every starter died of memory before h1~1 had the state."""
    clock = Clock()
    runner, _, _ = runner_of(options, clock)
    runner._parts.append(
        _Participant(name="h1", rank=3, host="127.0.0.1", control_port=1, member="h1~1", joiner=True)
    )
    for p in runner._parts[:3]:
        runner._handle(p, OOM, [])
    assert "out-of-memory killer" in runner._parts[2].why
    return runner, clock


def test_joiners_left_without_the_state_fail_the_job_after_a_grace_not_a_hang() -> None:
    runner, clock = _orphaned(JobOptions())
    runner._check_orphans()
    assert not runner._failures  # the joiner's "adopted" may be on its way
    clock.t += 6.0
    runner._check_orphans()
    message = runner._verdict().message or ""
    assert message.startswith("every worker holding the training state was lost; the last, h2 (rank 2): ")
    assert "out-of-memory killer" in message and "(h1~1) have no state to go on from" in message


def test_a_joiner_that_adopted_the_state_carries_the_job_on() -> None:
    runner, clock = _orphaned(JobOptions())
    runner._check_orphans()
    runner._handle(runner._parts[3], {"kind": "event", "type": "adopted"}, [])
    clock.t += 6.0
    runner._check_orphans()
    assert not runner._failures and runner._rollback is None


def test_orphaned_joiners_of_a_checkpointing_job_roll_it_back() -> None:
    runner, clock = _orphaned(CHECKPOINTS)
    runner._check_orphans()
    clock.t += 6.0
    runner._check_orphans()
    assert not runner._failures and (runner._rollback or "").startswith("every worker holding the training")
