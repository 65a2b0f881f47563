"""The global sampler: exactly-once under random membership changes, exact splits, state round trips."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrain.errors import UserError
from meshtrain.train.sampler import GlobalSampler, LedgerViolation, SampleLedger, SamplerState, split_counts


@given(st.integers(0, 10_000), st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=12))
def test_split_counts_sum_exactly_and_follow_weights(total: int, weights: list[float]) -> None:
    if sum(weights) <= 0:
        with pytest.raises(ValueError):
            split_counts(total, weights)
        return
    counts = split_counts(total, weights)
    assert sum(counts) == total
    norm = sum(weights)
    for c, w in zip(counts, weights, strict=True):
        assert abs(c - total * w / norm) < 1.0 + 1e-9
        if w == 0:
            assert c == 0


def test_permutation_is_deterministic_per_seed_and_epoch() -> None:
    a, b = GlobalSampler(1000, 32, seed=7), GlobalSampler(1000, 32, seed=7)
    assert np.array_equal(a.permutation(3), b.permutation(3))
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    assert not np.array_equal(a.permutation(0), GlobalSampler(1000, 32, seed=8).permutation(0))
    assert sorted(a.permutation(2).tolist()) == list(range(1000))


def test_state_round_trip_and_wrong_state_refused() -> None:
    s = GlobalSampler(100, 8, seed=3)
    for _ in range(20):
        s.advance()
    state = s.state
    assert (state.epoch, state.cursor) == (1, 56)  # 13 steps per epoch (the last one short), then 7 more
    t = GlobalSampler.from_state(SamplerState.from_dict(state.to_dict()))
    assert np.array_equal(t.global_batch_indices(), s.global_batch_indices())
    with pytest.raises(ValueError):
        GlobalSampler(100, 16, seed=3).load_state(state)
    with pytest.raises(UserError):
        GlobalSampler(0, 8)


def test_ledger_catches_double_and_missing_consumption() -> None:
    s = GlobalSampler(10, 4)
    ledger = SampleLedger()
    ledger.record(0, 0, 0, s.assignment({"a": 1.0, "b": 1.0}))
    with pytest.raises(LedgerViolation, match="4 of 10"):
        ledger.check_epoch(0, 10)
    # a bug that forgets to advance the cursor consumes the same batch again at the next step
    ledger.record(0, 1, 0, s.assignment({"a": 1.0, "b": 1.0}))
    with pytest.raises(LedgerViolation, match="twice"):
        ledger.check_epoch(0, 10)


# --- random membership changes between (and inside) steps ------------------------------------------------

event = st.one_of(
    st.tuples(st.just("step")),
    st.tuples(st.just("join"), st.floats(0.1, 10)),
    st.tuples(st.just("leave"), st.integers(0, 50)),
    st.tuples(st.just("lose_mid_step"), st.integers(0, 50)),
    st.tuples(st.just("rebalance"), st.integers(0, 50), st.floats(0.1, 10)),
)


@settings(max_examples=60, deadline=None)
@given(
    dataset_size=st.integers(1, 300),
    global_batch=st.integers(1, 40),
    seed=st.integers(0, 2**31),
    events=st.lists(event, min_size=1, max_size=120),
)
def test_every_index_exactly_once_under_random_membership(
    dataset_size: int, global_batch: int, seed: int, events: list[tuple]
) -> None:
    """Members join, leave at a boundary, die mid-step (orphans re-split), re-balance; each member keeps
    its own sampler copy (a joiner starts from a copy of the state): still exactly once per epoch."""
    names = iter(f"m{i}" for i in range(10_000))
    first = next(names)
    samplers: dict[str, GlobalSampler] = {first: GlobalSampler(dataset_size, global_batch, seed)}
    shares: dict[str, float] = {first: 1.0}
    ledgers: dict[str, SampleLedger] = {first: SampleLedger()}
    generation = 0
    completed_epochs = 0

    def commit(assignment: dict[str, np.ndarray]) -> None:
        nonlocal completed_epochs
        epochs = {s.epoch for s in samplers.values()}
        assert len(epochs) == 1 and len({s.cursor for s in samplers.values()}) == 1
        for member, sampler in samplers.items():
            ledgers[member].record(sampler.epoch, step, generation, assignment)
            ended = sampler.advance()
        completed_epochs += int(ended)

    step = 0
    for ev in events + [("step",)] * (2 * -(-dataset_size // global_batch)):
        if ev[0] == "step":
            me = next(iter(samplers))
            commit(samplers[me].assignment(shares))
            step += 1
        elif ev[0] == "join" and len(shares) < 8:
            name, donor = next(names), next(iter(samplers))
            samplers[name] = GlobalSampler.from_state(samplers[donor].state)  # the state transfer
            shares[name] = ev[1]
            ledgers[name] = SampleLedger()
            generation += 1
        elif ev[0] == "leave" and len(shares) > 1:
            gone = list(shares)[ev[1] % len(shares)]
            del shares[gone], samplers[gone]
            generation += 1
        elif ev[0] == "lose_mid_step" and len(shares) > 1:
            gone = list(shares)[ev[1] % len(shares)]
            old = dict(shares)
            del shares[gone], samplers[gone]
            me = next(iter(samplers))
            held = samplers[me].assignment(old)
            extra = samplers[me].reassign_orphans(old, shares)
            generation += 1
            assignment = {m: np.concatenate([held[m], extra[m]]) for m in shares}
            assert sorted(np.concatenate(list(assignment.values())).tolist()) == sorted(
                samplers[me].global_batch_indices().tolist()
            )
            commit(assignment)
            step += 1
        elif ev[0] == "rebalance":
            member = list(shares)[ev[1] % len(shares)]
            shares[member] = ev[2]
    merged = SampleLedger()
    for ledger in ledgers.values():  # includes ledgers of members that left: they hold their history
        merged.merge(ledger)
    assert completed_epochs >= 2
    for epoch in range(completed_epochs):
        merged.check_epoch(epoch, dataset_size)
