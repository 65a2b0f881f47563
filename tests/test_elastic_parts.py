"""The pure parts of elastic training: the carrying sampler, the recovery plan, the status codec, the
membership views; and exact broadcasts over a real loopback ring."""

from __future__ import annotations

import io
import json
import threading
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrain.train.recovery import (
    MemberStatus,
    Unrecoverable,
    decode_statuses,
    encode_status,
    plan_recovery,
)
from meshtrain.train.step_sampler import StepSampler
from meshtrain.worker.views import View, ViewBoard

D1, D2 = "11" * 16, "22" * 16


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 200),
    batch=st.integers(1, 64),
    members=st.integers(1, 5),
    losses=st.lists(st.integers(0, 10_000), max_size=30),
)
def test_carrying_orphans_consumes_every_index_exactly_once_per_epoch(
    n: int, batch: int, members: int, losses: list[int]
) -> None:
    sampler = StepSampler(n, batch, seed=3)
    shares = {f"m{i}": 1.0 + i for i in range(members)}
    seen: Counter[int] = Counter()
    step = 0
    while sampler.epoch == 0:
        assignment = sampler.assignment(shares)
        assert sorted(np.concatenate(list(assignment.values())).tolist()) == sorted(sampler.batch().tolist())
        lost = losses[step] % (members + 1) if step < len(losses) else members  # members index: nobody lost
        orphans = assignment[f"m{lost}"] if lost < members else np.empty(0, np.int64)
        for m, idx in assignment.items():
            if lost >= members or m != f"m{lost}":
                seen.update(idx.tolist())
        sampler.commit(orphans)
        step += 1
        assert step < 10 * n + 10
    assert sorted(seen) == list(range(n)) and max(seen.values()) == 1


def test_sampler_state_round_trips_and_refuses_another_data_set() -> None:
    a = StepSampler(100, 10, seed=1)
    a.commit([5, 6])
    b = StepSampler(100, 10, seed=1)
    b.load(a.to_dict())
    assert b.batch().tolist() == a.batch().tolist() and b.batch()[:2].tolist() == [5, 6]
    with pytest.raises(Exception, match="differs from the job's"):
        StepSampler(100, 20, seed=1).load(a.to_dict())


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2**40), st.booleans(), st.booleans(), st.integers(-1, 60000), st.booleans()),
        min_size=1,
        max_size=6,
    )
)
def test_status_vector_round_trips(rows: list[tuple[int, bool, bool, int, bool]]) -> None:
    names = [f"w{i}" for i in range(len(rows))]
    statuses = [
        MemberStatus(n, c, D1 if has else "", p, last, g, g, "bfloat16" if p else "")
        for n, (c, p, last, g, has) in zip(names, rows, strict=True)
    ]
    summed = sum(encode_status(len(names), i, s) for i, s in enumerate(statuses))
    assert decode_statuses(names, np.asarray(summed)) == statuses


def test_plan_redo_when_nobody_completed_the_step() -> None:
    plan = plan_recovery(
        [
            MemberStatus("a", 7, D1, pending=True, has_last=True, slice_gen=3, wire="bfloat16"),
            MemberStatus("c", 7, D1, pending=True, has_last=True, slice_gen=3, wire="bfloat16"),
        ]
    )
    assert (plan.target, plan.holders, plan.pinned_gen, plan.behind, plan.zero) == (7, ("a", "c"), 3, (), ())


def test_plan_members_behind_take_the_completed_reduction() -> None:
    plan = plan_recovery(
        [
            MemberStatus("a", 8, D2, pending=True, has_last=True, slice_gen=3),
            MemberStatus("b", 7, D1, pending=True, has_last=True, slice_gen=3),
        ]
    )
    assert plan.behind == ("b",) and plan.r_source == "a" and plan.pinned_gen == 3


def test_plan_a_joiner_gets_state_now_or_after_the_pinned_step() -> None:
    idle = plan_recovery([MemberStatus("a", 9, D1), MemberStatus("j", 0, "")])
    assert idle.stale == ("j",) and idle.state_source == "a" and idle.state_now and idle.pinned_gen is None
    pinned = plan_recovery(
        [
            MemberStatus("a", 9, D1, pending=True, slice_gen=2, joined_gen=-1),
            MemberStatus("j", 0, "", joined_gen=-1),
        ]
    )
    assert pinned.zero == ("j",) and pinned.state_source == "a" and not pinned.state_now


def test_plan_idle_replicas_that_differ_take_the_majority_state_ties_to_the_lowest_rank() -> None:
    """What makes unseeded replicas equal at `register`: every member idle at step 0, digests differ."""
    D3 = "33" * 16
    tie = plan_recovery([MemberStatus("a", 0, D1), MemberStatus("b", 0, D2), MemberStatus("c", 0, D3)])
    assert tie.stale == ("b", "c") and tie.state_source == "a" and tie.state_now
    most = plan_recovery([MemberStatus("a", 0, D1), MemberStatus("b", 0, D2), MemberStatus("c", 0, D2)])
    assert most.stale == ("a",) and most.state_source == "b"
    same = plan_recovery([MemberStatus("a", 0, D1), MemberStatus("b", 0, D1)])
    assert same.stale == () and same.state_source is None


def test_plan_refuses_what_cannot_be_reconciled() -> None:
    with pytest.raises(Unrecoverable):
        plan_recovery([MemberStatus("a", 9, D1, pending=True), MemberStatus("b", 9, D2, pending=True)][::-1])
    with pytest.raises(Unrecoverable):
        plan_recovery([MemberStatus("a", 9, D1), MemberStatus("b", 5, D1, pending=True)])
    with pytest.raises(Unrecoverable):
        plan_recovery([MemberStatus("j", 0, "")])


def test_views_are_newest_first_and_a_change_aborts() -> None:
    aborted: list[int] = []
    board = ViewBoard(io.StringIO(""))
    board.on_change(lambda v: aborted.append(v.version))
    board.feed(
        json.dumps({"view": {"version": 2, "members": [["b", "h", 2], ["a", "h", 1]], "min_nodes": 2}})
    )
    board.feed(json.dumps({"view": {"version": 1, "members": [["a", "h", 1]]}}))  # older: ignored
    board.feed("not json")
    board.feed(json.dumps({"view": {"version": 3, "members": [["a", "h", 1], ["a", "h", 1]]}}))  # duplicate
    view = board.latest()
    assert view == View(2, ("b", "a"), (("h", 2), ("h", 1)), 2) and view.rank_of("a") == 1
    assert aborted == [2] and board.wait_newer(2, 0.01) is None


def test_broadcast_is_exact_for_every_dtype_over_a_real_ring() -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from meshtrain.ring import Ring, RingListener
    from meshtrain.train.ring_broadcast import broadcast_bytes, broadcast_tree

    listeners = [RingListener.bind("127.0.0.1") for _ in range(3)]
    addrs = [("127.0.0.1", lst.port) for lst in listeners]
    rng = np.random.default_rng(0)
    source_tree = {
        "w": mx.array(rng.standard_normal((33, 7)).astype(np.float32)),
        "h": mx.array(rng.standard_normal(5).astype(np.float32)).astype(mx.bfloat16),
        "step": mx.array(2**40 + 3, dtype=mx.uint64),
        "layers": [{"b": mx.array(rng.standard_normal(3).astype(np.float32)).astype(mx.float16)}],
    }
    mx.eval(source_tree)  # lazy casts would run on the main thread's stream, unknown to the others
    results: list[Any] = [None] * 3

    def member(rank: int) -> None:
        mx.set_default_stream(mx.new_stream(mx.cpu))  # MLX streams are per thread
        ring = Ring.connect(listeners[rank], rank=rank, addrs=addrs, job="b", generation=1, timeout=10)
        try:
            mine = (
                source_tree
                if rank == 1
                else {
                    "w": mx.zeros((33, 7)),
                    "h": mx.zeros(5, mx.bfloat16),
                    "step": mx.array(0, dtype=mx.uint64),
                    "layers": [{"b": mx.zeros(3, mx.float16)}],
                }
            )
            tree = broadcast_tree(ring, mine, rank == 1)
            blob = broadcast_bytes(ring, b"odd-length blob\x00\xff" if rank == 1 else None, rank == 1)
            flat = {
                k: (str(v.dtype), np.asarray(v.astype(mx.float32) if k != "step" else v))
                for k, v in tree_flatten(tree)
            }
            results[rank] = (flat, blob)
        finally:
            ring.close()

    threads = [threading.Thread(target=member, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for lst in listeners:
        lst.close()
    want = {
        k: (str(v.dtype), np.asarray(v.astype(mx.float32) if k != "step" else v))
        for k, v in tree_flatten(source_tree)
    }
    for flat, blob in results:
        assert blob == b"odd-length blob\x00\xff"
        for key, (dtype, value) in want.items():
            assert flat[key][0] == dtype and np.array_equal(flat[key][1], value), key
