"""Generation agreement: same view, same answer; the right members behind; redo only when nobody committed."""

from __future__ import annotations

import dataclasses
import random
import threading

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from meshtrain.ring import Ring, RingListener
from meshtrain.train.generation import (
    STATE_SLOTS,
    Candidate,
    MemberState,
    Roster,
    StatePlan,
    decode_state_vector,
    encode_state_vector,
    gather_states,
    next_roster,
    plan_state,
)

A, B = "a" * 32, "b" * 32


def cand(name: str, gen: int = 3, weight: float = 1.0) -> Candidate:
    return Candidate(name, ("10.77.0.1", 5000 + ord(name[0])), gen, weight)


def test_roster_is_the_same_whatever_order_the_view_arrives_in() -> None:
    view = [cand("n3"), cand("n1", weight=2.0), cand("n2"), cand("n9", gen=-1)]
    rosters = set()
    for seed in range(5):
        random.Random(seed).shuffle(view)
        rosters.add(next_roster(3, view))
    (roster,) = rosters
    assert roster.generation == 4 and roster.members == ("n1", "n2", "n3", "n9")
    assert roster.shares == {"n1": 2.0, "n2": 1.0, "n3": 1.0, "n9": 1.0} and roster.rank_of("n3") == 2


def test_generation_number_exceeds_every_generation_anyone_has_seen() -> None:
    # a member that already moved on to generation 7 (it saw a loss we have not) pulls the number up
    assert next_roster(3, [cand("n1", 3), cand("n2", 7)]).generation == 8
    assert next_roster(-1, [cand("n1", -1)]).generation == 0


def roster_of(*names: str) -> Roster:
    return next_roster(0, [cand(n, 0) for n in names])


def ms(member: str, step: int, digest: str, pending: tuple[int, int] | None = None) -> MemberState:
    """A member state reporting the roster every test here forms (members named as given)."""
    return MemberState(member, step, digest, pending)


def plan_for(names: tuple[str, ...], states: list[MemberState]) -> StatePlan:
    roster = roster_of(*names)
    return plan_state(roster, [dataclasses.replace(s, roster=roster.fingerprint) for s in states])


def test_members_that_formed_different_rosters_do_not_agree() -> None:
    # same generation, ranks and size (the handshake passes) but one saw another weight for "y"
    mine = roster_of("x", "y")
    theirs = next_roster(0, [cand("x", 0), cand("y", 0, weight=3.0)])
    states = [
        MemberState("x", 1, A, None, mine.fingerprint),
        MemberState("y", 1, A, None, theirs.fingerprint),
    ]
    assert not plan_state(mine, states).agreed
    assert plan_for(("x", "y"), [ms("x", 1, A), ms("y", 1, A)]).agreed


def test_everyone_in_step_means_nothing_to_do() -> None:
    plan = plan_for(
        (
            "x",
            "y",
        ),
        [ms("x", 10, A), ms("y", 10, A)],
    )
    assert plan.behind == () and plan.redo is None and plan.target_step == 10


def test_joiners_are_behind_and_spread_over_the_up_to_date() -> None:
    roster = roster_of("a1", "a2", "j1", "j2", "j3")
    states = [ms("a1", 50, A), ms("a2", 50, A)]
    states += [ms(j, 0, "0" * 32) for j in ("j1", "j2", "j3")]
    plan = plan_for(roster.members, states)
    assert plan.up_to_date == ("a1", "a2") and plan.behind == ("j1", "j2", "j3")
    assert plan.sources == {"j1": "a1", "j2": "a2", "j3": "a1"}
    assert plan.receivers_of("a1") == ["j1", "j3"]


def test_nobody_committed_the_interrupted_step_so_it_is_redone() -> None:
    states = [ms(m, 20, A, pending=(20, 5)) for m in ("p", "q")] + [ms("new", 0, B)]
    plan = plan_for(
        (
            "new",
            "p",
            "q",
        ),
        states,
    )
    assert plan.redo == (20, 5) and plan.redo_members == ("p", "q")
    assert plan.behind == ("new",)  # the joiner gets the state first, then joins the redo with weight 0


def test_a_member_committed_the_step_so_the_others_take_its_state_and_nothing_is_redone() -> None:
    # the all-gather completed on p before the ring broke; q still holds its gradients of step 20
    states = [ms("p", 21, B), ms("q", 20, A, pending=(20, 5))]
    plan = plan_for(
        (
            "p",
            "q",
        ),
        states,
    )
    assert plan.target_step == 21 and plan.behind == ("q",) and plan.sources == {"q": "p"}
    assert plan.redo is None


def test_a_diverged_member_is_behind_and_the_majority_digest_wins() -> None:
    states = [ms("a", 9, B), ms("b", 9, A), ms("c", 9, A)]
    plan = plan_for(
        (
            "a",
            "b",
            "c",
        ),
        states,
    )
    assert plan.target_digest == A and plan.behind == ("a",)
    tie = plan_for(
        (
            "a",
            "b",
        ),
        [ms("a", 9, B), ms("b", 9, A)],
    )
    assert tie.target_digest == B  # ties: the digest of the lowest member id, the same on every member


member_state = st.builds(
    MemberState,
    st.just("m"),
    st.integers(0, 2**40),
    st.binary(min_size=16, max_size=16).map(bytes.hex),
    st.none() | st.tuples(st.integers(0, 2**31), st.integers(0, 2**31)),
    st.integers(0, 2**64 - 1),
)


@given(st.lists(member_state, min_size=1, max_size=9))
def test_state_vectors_sum_to_an_exact_gather(states: list[MemberState]) -> None:
    roster = roster_of(*(f"m{i}" for i in range(len(states))))
    states = [MemberState(f"m{i}", s.step, s.digest, s.pending, s.roster) for i, s in enumerate(states)]
    total = np.zeros(roster.size * STATE_SLOTS, np.float32)
    for i, s in enumerate(states):
        total += encode_state_vector(roster.size, i, s)
    # what a float32 ring mean returns, scaled back by the size
    mean = (total * np.float32(1.0 / roster.size)).astype(np.float32)
    assert decode_state_vector(roster, mean.astype(np.float64) * roster.size) == states


def test_gather_states_over_a_real_ring() -> None:
    listeners = [RingListener.bind("127.0.0.1") for _ in range(3)]
    roster = next_roster(
        0, [Candidate(f"w{i}", ("127.0.0.1", lst.port), 0) for i, lst in enumerate(listeners)]
    )
    mine = [ms("w0", 7, A), ms("w1", 7, A, (7, 0)), ms("w2", 3, B)]
    results: dict[int, list[MemberState]] = {}

    def member(rank: int) -> None:
        with Ring.connect(listeners[rank], rank, list(roster.addrs), "job", roster.generation, 10) as ring:
            results[rank] = gather_states(ring, roster, mine[rank])

    threads = [threading.Thread(target=member, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for lst in listeners:
        lst.close()
    assert results == {0: mine, 1: mine, 2: mine}
