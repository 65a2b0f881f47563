"""The ring schedule and per-member reduction, simulated in memory (no sockets).

N members exchange chunks through in-memory queues in a random order that
respects only what TCP and the schedule guarantee (FIFO per link, a send
waits for the receive it depends on), so every interleaving the real shell
could produce is fair game. The result must be the numpy weighted mean within
the wire dtype's tolerance, and bit-identical on every member.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrain.ring.reduction import RingReduction
from meshtrain.ring.schedule import RingSchedule, chunk_bounds, segment_bounds

EPS = {"float32": 2.0**-23, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def simulate(
    xs: list[np.ndarray], weights: list[float], wire: str, chunk_elems: int, seed: int
) -> list[np.ndarray]:
    n_members, count = len(xs), xs[0].size
    rng = np.random.default_rng(seed)
    reds = [
        RingReduction(
            RingSchedule(n_members, r, count, chunk_elems),
            xs[r] * np.float32(w),
            np.full(count, np.nan, np.float32),  # garbage where the result goes: nothing may read it first
            w,
            wire,
        )
        for r, w in enumerate(weights)
    ]
    links: list[list[tuple[float, bytes]]] = [[] for _ in range(n_members)]  # link r -> r+1
    sent, recvd = [0] * n_members, [0] * n_members
    while True:
        moves = []
        for r, red in enumerate(reds):
            sends, recvs = red.schedule.sends, red.schedule.recvs
            if sent[r] < len(sends) and recvd[r] > sends[sent[r]].after:
                moves.append(("send", r))
            if recvd[r] < len(recvs) and links[(r - 1) % n_members]:
                moves.append(("recv", r))
        if not moves:
            break
        kind, r = moves[rng.integers(len(moves))]
        red = reds[r]
        if kind == "send":
            payload = bytes(red.send_payload(sent[r]))
            links[r].append((red.send_weight(sent[r]), payload))
            sent[r] += 1
        else:
            weight, payload = links[(r - 1) % n_members].pop(0)
            target = red.recv_buffer(recvd[r])
            assert target.nbytes == len(payload) == red.recv_nbytes(recvd[r])
            target[:] = payload
            red.received(recvd[r], weight)
            recvd[r] += 1
    for r, red in enumerate(reds):
        assert sent[r] == len(red.schedule.sends) and recvd[r] == len(red.schedule.recvs), "deadlock"
    assert not any(links), "bytes left on a link"
    return [red.acc for red in reds]


@settings(max_examples=120, deadline=None)
@given(
    n_members=st.integers(2, 8),
    count=st.integers(0, 700),
    chunk_elems=st.integers(1, 97),
    wire=st.sampled_from(["float32", "float16", "bfloat16"]),
    seed=st.integers(0, 2**32 - 1),
    weighted=st.booleans(),
)
def test_ring_result_is_the_weighted_mean(
    n_members: int, count: int, chunk_elems: int, wire: str, seed: int, weighted: bool
) -> None:
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(count).astype(np.float32) for _ in range(n_members)]
    weights = [float(w) for w in rng.integers(1, 300, n_members)] if weighted else [1.0] * n_members
    outs = simulate(xs, weights, wire, chunk_elems, seed)
    expected = sum(np.float64(w) * x.astype(np.float64) for w, x in zip(weights, xs, strict=True)) / sum(
        weights
    )
    scale = sum(w * np.abs(x.astype(np.float64)) for w, x in zip(weights, xs, strict=True)) / sum(weights)
    tolerance = 4 * n_members * EPS[wire] * (scale + 1e-30)
    assert np.all(np.abs(outs[0] - expected) <= tolerance)
    for out in outs[1:]:
        assert np.array_equal(out, outs[0]), "members disagree"


def test_world_of_one_needs_no_schedule() -> None:
    with pytest.raises(ValueError):
        RingSchedule(1, 0, 10, 4)


@given(st.integers(0, 1000), st.integers(1, 9))
def test_segments_partition_the_buffer(count: int, size: int) -> None:
    bounds = segment_bounds(count, size)
    assert bounds[0][0] == 0 and bounds[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    lengths = [hi - lo for lo, hi in bounds]
    assert max(lengths) - min(lengths) <= 1


@given(st.integers(0, 500), st.integers(0, 500), st.integers(1, 64))
def test_chunks_cover_a_segment(start: int, length: int, chunk: int) -> None:
    chunks = chunk_bounds(start, start + length, chunk)
    assert chunks[0][0] == start and chunks[-1][1] == start + length
    assert all(0 <= hi - lo <= chunk for lo, hi in chunks)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))


@pytest.mark.parametrize("n_members", range(2, 9))
def test_each_send_forwards_what_was_received_one_phase_before(n_members: int) -> None:
    for rank in range(n_members):
        s = RingSchedule(n_members, rank, 1000 + rank, 37)
        assert len({t.phase for t in s.sends}) == s.phases == 2 * (n_members - 1)
        for t in s.sends:
            if t.phase == 0:
                assert t.after == -1 and t.segment == rank
            else:
                dep = s.recvs[t.after]
                assert (dep.phase, dep.segment, dep.start, dep.stop) == (
                    t.phase - 1,
                    t.segment,
                    t.start,
                    t.stop,
                )
        # after the reduce-scatter this member owns the segment it first sends in the all-gather
        gather = [t for t in s.sends if t.phase == s.first_gather_phase]
        assert {t.segment for t in gather} == {s.owned_segment}
        # what a member receives is what its left neighbour sends, chunk for chunk
        left = RingSchedule(n_members, (rank - 1) % n_members, 1000 + rank, 37)
        assert [(t.phase, t.start, t.stop) for t in s.recvs] == [
            (t.phase, t.start, t.stop) for t in left.sends
        ]
