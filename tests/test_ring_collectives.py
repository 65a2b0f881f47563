"""Reduce-scatter and all-gather: the pure schedule simulated in memory, then real loopback rings.

The simulation delivers chunks in a random order that respects only what
TCP and the schedule guarantee (FIFO per link, a send waits for the receive
it depends on), with garbage wherever a result has not been written yet, so
every interleaving the real threads could produce is fair game.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ring_tcp import in_threads

from meshtrain.errors import PeerLost
from meshtrain.ring import Ring, RingListener
from meshtrain.ring.collectives import (
    ALL_GATHER,
    REDUCE_SCATTER,
    AllGather,
    CollectiveSchedule,
    ReduceScatter,
    shard_bounds,
)
from meshtrain.ring.tcp import RingPeerLost
from meshtrain.security import Keyring, generate_secret

EPS = {"float32": 2.0**-23, "float16": 2.0**-11, "bfloat16": 2.0**-8}
WIRES = ["float32", "float16", "bfloat16"]


def simulate(ops: list[Any], seed: int) -> None:
    """Run one collective's ops (one per member) to completion through in-memory links."""
    n = len(ops)
    rng = np.random.default_rng(seed)
    links: list[list[tuple[float, bytes]]] = [[] for _ in range(n)]  # link r -> r+1
    sent, recvd = [0] * n, [0] * n
    while True:
        moves = []
        for r, op in enumerate(ops):
            sends, recvs = op.schedule.sends, op.schedule.recvs
            if sent[r] < len(sends) and recvd[r] > sends[sent[r]].after:
                moves.append(("send", r))
            if recvd[r] < len(recvs) and links[(r - 1) % n]:
                moves.append(("recv", r))
        if not moves:
            break
        kind, r = moves[rng.integers(len(moves))]
        op = ops[r]
        if kind == "send":
            links[r].append((op.send_weight(sent[r]), bytes(op.send_payload(sent[r]))))
            sent[r] += 1
        else:
            weight, payload = links[(r - 1) % n].pop(0)
            target = op.recv_buffer(recvd[r])
            assert target.nbytes == len(payload) == op.recv_nbytes(recvd[r])
            target[:] = payload
            op.received(recvd[r], weight)
            recvd[r] += 1
    for r, op in enumerate(ops):
        assert sent[r] == len(op.schedule.sends) and recvd[r] == len(op.schedule.recvs), "deadlock"
    assert not any(links), "bytes left on a link"


sizes_st = st.integers(2, 6).flatmap(lambda n: st.lists(st.integers(0, 150), min_size=n, max_size=n))


@settings(max_examples=150, deadline=None)
@given(
    sizes=sizes_st,
    chunk_elems=st.integers(1, 40),
    wire=st.sampled_from(WIRES),
    seed=st.integers(0, 2**32 - 1),
    weighted=st.booleans(),
    in_place=st.booleans(),
)
def test_reduce_scatter_leaves_each_member_its_shard_of_the_weighted_mean(
    sizes: list[int], chunk_elems: int, wire: str, seed: int, weighted: bool, in_place: bool
) -> None:
    n, bounds = len(sizes), shard_bounds(sizes)
    count = bounds[-1][1]
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(count).astype(np.float32) for _ in range(n)]
    weights = [float(rng.integers(1, 9)) if weighted else 1.0 for _ in range(n)]
    outs = [np.full(hi - lo, np.nan, np.float32) for lo, hi in bounds]
    srcs = [xs[r] * np.float32(weights[r]) for r in range(n)]
    ops = [
        ReduceScatter(
            CollectiveSchedule(REDUCE_SCATTER, n, r, bounds, chunk_elems),
            srcs[r],
            outs[r],
            weights[r],
            wire,
            acc=None if in_place else np.full(count, np.nan, np.float32),  # garbage until written
        )
        for r in range(n)
    ]
    simulate(ops, seed)
    expected = sum(w * x.astype(np.float64) for w, x in zip(weights, xs, strict=True)) / sum(weights)
    tol = 4 * n * EPS[wire] * (1 + np.abs(expected).max(initial=0) * 4)
    for r, (lo, hi) in enumerate(bounds):
        assert np.allclose(outs[r], expected[lo:hi], rtol=0, atol=tol), (r, outs[r], expected[lo:hi])
        if not in_place:
            assert np.array_equal(srcs[r], xs[r] * np.float32(weights[r])), "src was written"


@settings(max_examples=150, deadline=None)
@given(
    sizes=sizes_st,
    chunk_elems=st.integers(1, 40),
    wire=st.sampled_from(WIRES),
    seed=st.integers(0, 2**32 - 1),
)
def test_all_gather_gives_every_member_the_same_concatenation(
    sizes: list[int], chunk_elems: int, wire: str, seed: int
) -> None:
    n, bounds = len(sizes), shard_bounds(sizes)
    count = bounds[-1][1]
    rng = np.random.default_rng(seed)
    whole = rng.standard_normal(count).astype(np.float32)
    outs = []
    for lo, hi in bounds:
        out = np.full(count, np.nan, np.float32)
        out[lo:hi] = whole[lo:hi]
        outs.append(out)
    ops = [
        AllGather(CollectiveSchedule(ALL_GATHER, n, r, bounds, chunk_elems), outs[r], wire) for r in range(n)
    ]
    simulate(ops, seed)
    for out in outs:
        assert np.array_equal(out, outs[0]), "members disagree"
    from meshtrain.ring.tensors import round_trip

    assert np.array_equal(outs[0], round_trip(whole, wire))


@settings(max_examples=60, deadline=None)
@given(sizes=sizes_st, chunk_elems=st.integers(1, 40))
def test_schedules_send_what_the_right_neighbour_expects(sizes: list[int], chunk_elems: int) -> None:
    n, bounds = len(sizes), shard_bounds(sizes)
    for kind in (REDUCE_SCATTER, ALL_GATHER):
        scheds = [CollectiveSchedule(kind, n, r, bounds, chunk_elems) for r in range(n)]
        for r, s in enumerate(scheds):
            right = scheds[(r + 1) % n]
            assert [(t.phase, t.chunk, t.start, t.stop) for t in s.sends] == [
                (t.phase, t.chunk, t.start, t.stop) for t in right.recvs
            ]
            assert s.phases == n - 1
            received = {t.segment for t in s.recvs}
            if kind == REDUCE_SCATTER:  # the last shard received is the member's own
                assert s.recvs[-1].segment == r and len(received) == n - 1 and (r - 1) % n not in received
            else:  # every shard but its own arrives once
                assert received == set(range(n)) - {r}
            for t in s.sends:  # pipelining: a forwarded chunk waits only for its own receive
                if t.after >= 0:
                    got = s.recvs[t.after]
                    assert (got.start, got.stop, got.phase) == (t.start, t.stop, t.phase - 1)


def test_bad_shards_are_refused() -> None:
    with pytest.raises(ValueError):
        shard_bounds([3, -1])
    with pytest.raises(ValueError):
        CollectiveSchedule(REDUCE_SCATTER, 2, 0, [(0, 3), (4, 5)], 8)  # a gap
    with pytest.raises(ValueError):
        CollectiveSchedule(ALL_GATHER, 1, 0, [(0, 3)], 8)


# --- real rings on loopback --------------------------------------------------------------


def _ring(listener: RingListener, rank: int, addrs: list[tuple[str, int]], **kw: Any) -> Ring:
    return Ring.connect(listener, rank, addrs, job="c", generation=3, timeout=10, chunk_bytes=32 << 10, **kw)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("wire", [None, "bfloat16"])
def test_loopback_collectives_equal_numpy_on_uneven_shards(n: int, wire: str | None) -> None:
    sizes = [50_003 * (r + 1) + (7 if r % 2 else 0) for r in range(n)]
    if n > 2:
        sizes[1] = 0  # a member that holds nothing still takes part
    bounds, count = shard_bounds(sizes), sum(sizes)
    xs = [np.random.default_rng(r).standard_normal(count).astype(np.float32) for r in range(n)]
    weights = [float(3 * r + 1) for r in range(n)]

    def body(rank: int, listener: RingListener, addrs: list[tuple[str, int]]) -> Any:
        with _ring(listener, rank, addrs) as ring:
            mine = ring.reduce_scatter(xs[rank], sizes, step=1, weight=weights[rank], wire_dtype=wire)
            stats = dict(ring.last_stats)
            gathered = ring.all_gather(mine, sizes, step=2, wire_dtype=wire)
            again = ring.allreduce(xs[rank], step=3)  # the ring still works for the all-reduce after
            return mine, gathered, stats, again

    results = in_threads(n, body)
    expected = sum(w * x.astype(np.float64) for w, x in zip(weights, xs, strict=True)) / sum(weights)
    eps = EPS["float32" if wire is None else wire] * 4 * n
    for rank, res in enumerate(results):
        assert not isinstance(res, BaseException), res
        mine, gathered, stats, again = res
        lo, hi = bounds[rank]
        assert mine.shape == (hi - lo,) and np.allclose(mine, expected[lo:hi], rtol=eps, atol=eps * 4)
        assert np.array_equal(gathered, results[0][1]), "members disagree after all-gather"
        assert np.allclose(again, np.mean(xs, axis=0), atol=1e-5)
        if n > 1:
            assert stats["bytes"] == count * 4 and stats["busbw"] > 0
    assert np.allclose(results[0][1], expected, rtol=eps, atol=eps * 4)


@pytest.mark.parametrize("encrypt", [False, True], ids=["auth", "encrypted"])
def test_collectives_on_an_authenticated_ring(encrypt: bool) -> None:
    keyring = Keyring([generate_secret()]).with_encrypt(encrypt)
    sizes = [70_001, 30_000, 100]
    xs = [np.full(sum(sizes), float(r), np.float32) for r in range(3)]

    def body(rank: int, listener: RingListener, addrs: list[tuple[str, int]]) -> Any:
        with _ring(listener, rank, addrs, keyring=keyring) as ring:
            assert ring.authenticated
            mine = ring.reduce_scatter(xs[rank], sizes, step=0)
            return ring.all_gather(mine, sizes, step=0)

    for res in in_threads(3, body):
        assert isinstance(res, np.ndarray) and np.all(res == 1.0), res


def test_mismatched_shard_sizes_are_refused_before_any_byte_moves() -> None:
    with RingListener.bind("127.0.0.1") as listener:
        ring = Ring.connect(listener, rank=0, addrs=[("127.0.0.1", listener.port)], job="j", generation=0)
        with pytest.raises(ValueError, match="sum to"):
            ring.reduce_scatter(np.ones(10, np.float32), [4])
        with pytest.raises(ValueError, match="shard of 3"):
            ring.all_gather(np.ones(2, np.float32), [3])
        assert np.array_equal(ring.reduce_scatter(np.arange(4, dtype=np.float32), weight=5.0), np.arange(4))
        ring.close()


def test_a_member_closing_mid_collective_is_peer_lost_for_the_others() -> None:
    def body(rank: int, listener: RingListener, addrs: list[tuple[str, int]]) -> Any:
        ring = _ring(listener, rank, addrs)
        big = np.ones(2_000_000, np.float32)
        ring.all_gather(big[:1000], step=0)
        if rank == 1:
            ring.close()
            return "closed"
        start = time.monotonic()
        try:
            ring.reduce_scatter(big, step=1)
        except PeerLost as exc:
            return exc, time.monotonic() - start
        finally:
            ring.close()
        return "no error"

    results = in_threads(3, body)
    for rank in (0, 2):
        exc, elapsed = results[rank]
        assert isinstance(exc, RingPeerLost) and exc.rank == 1 and exc.generation == 3 and elapsed < 3.0


MEMBER = r"""
import socket, sys, time
import numpy as np
from meshtrain.errors import PeerLost
from meshtrain.ring import Ring, RingListener
rank, n, port0 = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
addrs = [("127.0.0.1", port0 + i) for i in range(n)]
sock = socket.socket(); sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(addrs[rank]); sock.listen(8)
ring = Ring.connect(RingListener(sock), rank, addrs, job="kill", generation=5, timeout=10)
buf = np.ones(4_000_000, np.float32)
shards = [1_000_000, 2_500_000, 500_000][:n]
mine = ring.reduce_scatter(buf, shards, step=0)
print("READY", flush=True)
step = 1
try:
    while True:
        mine = ring.reduce_scatter(buf, shards, step=step)
        ring.all_gather(mine, shards, step=step)
        step += 1
except PeerLost as exc:
    print("LOST", time.time(), exc.generation, getattr(exc, "rank", -1), flush=True)
    ring.close()
"""


def test_sigkilled_member_mid_collective_is_peer_lost_within_2s() -> None:
    n = 3
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port0 = probe.getsockname()[1] + 1
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MEMBER, str(r), str(n), str(port0)], stdout=subprocess.PIPE, text=True
        )
        for r in range(n)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "READY"
        time.sleep(0.05)
        killed_at = time.time()
        os.kill(procs[2].pid, signal.SIGKILL)
        for rank in (0, 1):
            out, _ = procs[rank].communicate(timeout=15)
            word, when, generation, peer_rank = out.split()
            assert word == "LOST" and int(generation) == 5 and int(peer_rank) == 2
            assert float(when) - killed_at < 2.0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
