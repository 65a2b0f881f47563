"""The rules that let any node of a job coordinate it (meshtrain.agent.job_coordination), on plain data.

A simulation of a job's nodes, each with its own copy of the record and its own (possibly partitioned)
membership view, checks the properties the agents rely on: at most one coordinator per connected side,
the same successor named by every node that sees the same members, never two sides of a partition
issuing views, and the newer record (not the louder one) winning on heal. Also: a job's state survives
the round trip a successor restores it from.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrain.agent.job_coordination import (
    Seat,
    Succession,
    coordinator_of,
    has_quorum,
    record_coordinator,
    record_key,
)
from meshtrain.agent.jobstate import JobState

NAMES = [f"n{i}" for i in range(7)]


@st.composite
def jobs(draw: st.DrawFn) -> tuple[list[Seat], set[str]]:
    """Seats (ranks in placement order, some lost) and the live nodes one side of the mesh sees."""
    nodes = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=7, unique=True))
    seats = [Seat(node=n, rank=r, lost=draw(st.booleans())) for r, n in enumerate(nodes)]
    live = set(draw(st.lists(st.sampled_from(NAMES), max_size=7, unique=True)))
    return seats, live


@settings(max_examples=500, deadline=None)
@given(jobs())
def test_every_node_with_the_same_view_names_the_same_coordinator(job: tuple[list[Seat], set[str]]) -> None:
    seats, live = job
    named = {coordinator_of(list(reversed(seats)) if i % 2 else seats, live) for i in range(4)}
    assert len(named) == 1  # order of the seats does not matter, only ranks
    chosen = named.pop()
    eligible = [s for s in seats if not s.lost and s.node in live]
    assert chosen == (min(eligible, key=lambda s: s.rank).node if eligible else None)


def test_succession_passes_down_the_ranks_and_never_to_a_joiner() -> None:
    seats = [Seat("a", 0), Seat("b", 1), Seat("c", 2)]
    assert coordinator_of(seats, {"a", "b", "c"}) == "a"
    assert coordinator_of(seats, {"b", "c"}) == "b"  # a lost: b, on every node
    seats.append(Seat("a", 3, member="a~1"))  # a comes back as a joiner: b keeps coordinating
    assert coordinator_of([Seat("a", 0, lost=True), *seats[1:]], {"a", "b", "c"}) == "b"
    assert coordinator_of(seats, {"c"}) == "c"  # and then c, once b is lost too
    assert coordinator_of(seats, set(), started=True) is None
    assert coordinator_of(seats, {"z"}, origin="z", started=False) == "z"  # the origin places the job


def test_record_coordinator_reads_the_record() -> None:
    record = {
        "origin": "z",
        "state": {"state": "starting"},
        "parts": [{"name": "a", "rank": 0}, {"name": "b", "rank": 1}],
    }
    assert record_coordinator(record, {"z", "a", "b"}) == "z"
    record["state"] = {"state": "running"}
    assert record_coordinator(record, {"z", "a", "b"}) == "a"  # z only submitted it: a worker coordinates
    record["parts"][0]["lost"] = True
    assert record_coordinator(record, {"z", "a", "b"}) == "b"


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(st.sampled_from(NAMES), min_size=1, max_size=7, unique=True),
    st.sets(st.sampled_from(NAMES)),
    st.sets(st.sampled_from(NAMES)),
)
def test_two_sides_of_a_partition_never_both_issue_a_view(
    view: list[str], side: set[str], ended: set[str]
) -> None:
    other = set(view) - side
    assert not (has_quorum(view, side, ended) and has_quorum(view, other, ended))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(NAMES), min_size=1, max_size=7, unique=True), st.data())
def test_a_side_that_reaches_every_voter_has_a_quorum(view: list[str], data: st.DataObject) -> None:
    ended = set(data.draw(st.lists(st.sampled_from(view), unique=True, max_size=len(view) - 1)))
    assert has_quorum(view, set(view) - ended, ended)
    assert not has_quorum(view, set(view), set(view))  # nobody left to vote: no side may go on


def test_quorum_cases_the_agents_meet() -> None:
    four = ["a", "b", "c", "d"]
    assert has_quorum(four, {"b", "c", "d"})  # the submitter's link cut: the other three go on
    assert not has_quorum(four, {"a"})  # and the isolated submitter does not train alone
    assert has_quorum(["b", "c", "d"], {"c", "d"})  # the coordinator lost twice: still a majority
    assert has_quorum(["a", "b"], {"a"}) and not has_quorum(["a", "b"], {"b"})  # a tie: the lowest rank
    assert has_quorum(["a", "b"], {"b"}, ended={"a"})  # a's agent said its worker ended: no vote
    assert has_quorum(["a", "b", "c"], {"a", "b"}, ended={"c"})


def test_the_record_that_made_progress_wins() -> None:
    minority = {"view": {"version": 3}, "term": 5, "seq": 900}  # took over alone, kept publishing
    majority = {"view": {"version": 4}, "term": 1, "seq": 20}  # issued a new view: it made progress
    assert record_key(majority) > record_key(minority)
    final = {"view": {"version": 1}, "result": {"state": "done"}}
    assert record_key(final) > record_key(majority)


def test_a_successor_settles_before_it_numbers_a_view() -> None:
    s = Succession("b", settle=1.5)
    assert s.observe("a", 0.0) is None and not s.may_issue({"b", "c"}, 0.0)
    assert s.observe("b", 10.0) == "take"
    assert not s.may_issue({"b", "c"}, 10.1)  # c has not reported since the take-over
    s.hear("c")
    assert s.may_issue({"b", "c"}, 10.2)
    t = Succession("b", settle=1.5)
    t.observe("b", 0.0)
    assert not t.may_issue({"b", "c"}, 1.0) and t.may_issue({"b", "c"}, 1.6)  # or after settling
    assert t.observe("c", 2.0) == "step down" and not t.may_issue({"b"}, 3.0)
    first = Succession("a")
    first.observe("a", 0.0, first=True)
    assert first.may_issue({"a", "b"}, 0.0)  # the origin numbers the first view at once


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(NAMES[:4]), st.booleans()), min_size=1, max_size=12))
def test_a_simulated_job_always_has_one_coordinator_among_its_live_nodes(
    kills: list[tuple[str, bool]],
) -> None:
    """Nodes die (or come back as joiners) one at a time; every live node evaluates the rule."""
    seats = [Seat(n, r, member=n) for r, n in enumerate(NAMES[:4])]
    live = set(NAMES[:4])
    successions = {n: Succession(n) for n in NAMES[:4]}
    for node, comes_back in kills:
        if node in live:
            live.discard(node)
            seats = [Seat(s.node, s.rank, s.member, lost=s.lost or s.node == node) for s in seats]
        elif comes_back:
            live.add(node)
            seats.append(Seat(node, len(seats), member=f"{node}~{len(seats)}"))
        named = {n: coordinator_of(seats, live) for n in live}
        for n in live:
            successions[n].observe(named[n], 0.0)
        holders = [n for n in live if successions[n].coordinating]
        alive_seats = [s for s in seats if not s.lost and s.node in live]
        assert len(holders) == (1 if alive_seats else 0), (holders, seats, live)


def test_job_state_round_trips_for_a_successor() -> None:
    state = JobState(job="j1", script="train.py", started=100.0)
    state.assign(["a", "b"])
    state.set_state("running", None, 101.0)
    for i in range(6):
        t = 101.0 + i
        state.report(0, t, {"epoch": 0, "epochs": 2, "step": i, "steps_per_epoch": 10, "loss": 1.0 / (i + 1)})
        state.report(0, t, {"samples": 32})
        state.report(1, t, {"samples": 32, "share": 0.5, "share_why": "equal"})
    state.add_log("a", "epoch 1 done")
    state.add_event({"t": 102.0, "kind": "lost", "node": "c", "detail": "gone"})
    copy = JobState.from_record(state.to_record())
    assert copy.snapshot(107.0) == state.snapshot(107.0)
    assert copy.eta() == state.eta() and copy.average_rate() == state.average_rate()
    copy.report(0, 108.0, {"epoch": 0, "step": 6, "loss": 0.1})
    state.report(0, 108.0, {"epoch": 0, "step": 6, "loss": 0.1})
    assert copy.snapshot(108.0) == state.snapshot(108.0)  # and it carries on from the same numbers
