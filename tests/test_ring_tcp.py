"""Real TCP rings on loopback: results, handshake, and the failure model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from meshtrain import wire
from meshtrain.errors import PeerLost
from meshtrain.ring import Ring, RingListener
from meshtrain.ring.tcp import RingPeerLost


def in_threads(n: int, body: Callable[[int, RingListener, list[tuple[str, int]]], Any]) -> list[Any]:
    """Run body(rank, listener, addrs) for every rank in its own thread; results or exceptions."""
    listeners = [RingListener.bind("127.0.0.1") for _ in range(n)]
    addrs = [("127.0.0.1", lst.port) for lst in listeners]
    results: list[Any] = [None] * n

    def run(rank: int) -> None:
        try:
            results[rank] = body(rank, listeners[rank], addrs)
        except BaseException as exc:  # noqa: B036 - handed back to the test
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for lst in listeners:
        lst.close()
    return results


def test_world_of_one_is_the_identity_without_sockets() -> None:
    with RingListener.bind("127.0.0.1") as listener:
        ring = Ring.connect(listener, rank=0, addrs=[("127.0.0.1", listener.port)], job="j", generation=0)
        buf = np.arange(5, dtype=np.float32)
        assert ring.allreduce(buf, step=0, weight=3.0) is buf
        tree = {"w": mx.ones((2, 2))}
        assert ring.allreduce_tree(tree, step=0, wire_dtype="bfloat16") is tree
        ring.close()
        with pytest.raises(PeerLost):
            ring.allreduce(buf)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("wire_dtype", [None, "bfloat16", "float16"])
def test_loopback_ring_computes_the_weighted_mean(n: int, wire_dtype: str | None) -> None:
    count = 300_007  # divisible neither by N nor by the chunk
    xs = [np.random.default_rng(r).standard_normal(count).astype(np.float32) for r in range(n)]
    weights = [float(10 * r + 1) for r in range(n)]

    def body(rank: int, listener: RingListener, addrs: list[tuple[str, int]]) -> list[np.ndarray]:
        ring = Ring.connect(listener, rank, addrs, job="j", generation=7, timeout=10, chunk_bytes=64 * 1024)
        outs = [
            ring.allreduce(xs[rank] * (step + 1), step=step, weight=weights[rank], wire_dtype=wire_dtype)
            for step in range(3)
        ]
        assert ring.last_stats["bytes"] == count * 4 and ring.last_stats["busbw"] > 0
        ring.close()
        return outs

    results = in_threads(n, body)
    expected = sum(w * x.astype(np.float64) for w, x in zip(weights, xs, strict=True)) / sum(weights)
    eps = {None: 1e-6, "float16": 2.0**-10, "bfloat16": 2.0**-7}[wire_dtype]
    for step in range(3):
        got = [res[step] for res in results]
        assert all(np.array_equal(g, got[0]) for g in got), "members disagree"
        assert np.allclose(got[0], expected * (step + 1), rtol=n * eps, atol=n * eps * (step + 1) * 3)


def test_loopback_ring_reduces_mlx_trees() -> None:
    def body(rank: int, listener: RingListener, addrs: list[tuple[str, int]]) -> Any:
        tree = {
            "w": mx.full((3, 5), float(rank)),
            "layers": [mx.array([rank, 2 * rank], dtype=mx.float32)],
            "half": mx.ones((4,), dtype=mx.bfloat16) * (rank + 1),
        }
        with Ring.connect(listener, rank, addrs, job="t", generation=1) as ring:
            return ring.allreduce_tree(tree, step=4, weight=1.0 + rank)

    results = in_threads(3, body)
    mean = (0 * 1 + 1 * 2 + 2 * 3) / 6
    for out in results:
        assert out["w"].shape == (3, 5) and np.allclose(np.array(out["w"]), mean)
        assert np.allclose(np.array(out["layers"][0]), [mean, 2 * mean])
        assert out["half"].dtype == mx.bfloat16
        assert np.allclose(np.array(out["half"].astype(mx.float32)), (1 * 1 + 2 * 2 + 3 * 3) / 6, rtol=1e-2)


def test_handshake_drops_strangers_and_old_generations() -> None:
    def body(rank: int, listener: RingListener, addrs: list[tuple[str, int]]) -> Any:
        if rank == 1:  # before the real left neighbour: garbage, another job, a stale generation
            for hello in (
                None,
                {"job": "other", "gen": 5, "rank": 0, "size": 2, "version": 1},
                {"job": "j", "gen": 4, "rank": 0, "size": 2, "version": 1},
            ):
                s = socket.create_connection(addrs[1])
                s.sendall(
                    b"\xff\xff\xff\xff"
                    if hello is None
                    else wire.encode_header({"kind": "hello", "nbytes": 0, **hello})
                )
                s.close()
        with Ring.connect(listener, rank, addrs, job="j", generation=5, timeout=5) as ring:
            return ring.allreduce(np.full(10, float(rank), np.float32), step=1)

    results = in_threads(2, body)
    assert all(isinstance(r, np.ndarray) and np.all(r == 0.5) for r in results), results


def test_missing_neighbour_is_peer_lost_after_the_timeout() -> None:
    with RingListener.bind("127.0.0.1") as listener, RingListener.bind("127.0.0.1") as absent:
        addrs = [("127.0.0.1", listener.port), ("127.0.0.1", absent.port)]
        start = time.monotonic()
        with pytest.raises(PeerLost) as info:
            Ring.connect(listener, 0, addrs, job="j", generation=3, timeout=0.5)
        assert time.monotonic() - start < 2.0
        assert info.value.generation == 3 and info.value.peer == f"127.0.0.1:{absent.port}"


def test_closing_member_makes_the_others_raise_peer_lost() -> None:
    addrs_of: list[list[tuple[str, int]]] = []

    def body(rank: int, listener: RingListener, addrs: list[tuple[str, int]]) -> Any:
        addrs_of.append(addrs)
        ring = Ring.connect(listener, rank, addrs, job="j", generation=9, timeout=5)
        ring.allreduce(np.ones(1000, np.float32), step=0)
        if rank == 2:
            ring.close()
            return "closed"
        start = time.monotonic()
        try:
            ring.allreduce(np.ones(1_000_000, np.float32), step=1)
        except PeerLost as exc:
            return exc, time.monotonic() - start
        return "no error"

    results = in_threads(4, body)
    assert results[2] == "closed"
    for rank in (0, 1, 3):
        exc, elapsed = results[rank]
        assert isinstance(exc, PeerLost) and exc.generation == 9 and elapsed < 2.0
        assert (
            isinstance(exc, RingPeerLost) and exc.rank == 2 and exc.peer == f"127.0.0.1:{addrs_of[0][2][1]}"
        )


def test_stalled_member_is_peer_lost_after_the_timeout() -> None:
    gone = threading.Event()

    def body(rank: int, listener: RingListener, addrs: list[tuple[str, int]]) -> Any:
        ring = Ring.connect(listener, rank, addrs, job="j", generation=2, timeout=0.4)
        if rank == 2:  # connected, then silent (a frozen process, a sleeping laptop)
            gone.wait(10)
            ring.close()
            return "stalled"
        start = time.monotonic()
        try:
            ring.allreduce(np.ones(100_000, np.float32), step=0)
        except PeerLost as exc:
            return exc, time.monotonic() - start
        finally:
            if rank == 0:
                gone.set()
        return "no error"

    results = in_threads(3, body)
    gone.set()
    assert "stalled" in results[0][0].reason and results[0][0].rank == 2
    for rank in (0, 1):
        exc, elapsed = results[rank]
        # rank 1's own wait on rank 0 may time out a hair before rank 0's abort arrives
        assert isinstance(exc, RingPeerLost) and exc.rank in (2, 0) and 0.3 < elapsed < 2.0


MEMBER = r"""
import sys, time
import numpy as np
from meshtrain.errors import PeerLost
from meshtrain.ring import Ring, RingListener
from meshtrain.ring.tcp import RingPeerLost
rank, n, port0 = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
addrs = [("127.0.0.1", port0 + i) for i in range(n)]
listener = RingListener(__import__("socket").socket())
listener.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_REUSEADDR, 1)
listener.sock.bind(addrs[rank]); listener.sock.listen(8)
ring = Ring.connect(listener, rank, addrs, job="kill", generation=11, timeout=10)
buf = np.ones(4_000_000, np.float32)
ring.allreduce(buf, step=0)
print("READY", flush=True)
step = 1
try:
    while True:
        ring.allreduce(buf, step=step)
        step += 1
except PeerLost as exc:
    print("LOST", time.time(), exc.generation, getattr(exc, "rank", -1), flush=True)
    ring.close()
"""


def test_sigkilled_member_makes_every_other_raise_peer_lost_within_2s() -> None:
    n = 4
    with socket.socket() as probe:  # a free block of ports is likely next to a free port
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
        time.sleep(0.05)  # let them get into the middle of an all-reduce
        killed_at = time.time()
        os.kill(procs[1].pid, signal.SIGKILL)
        for rank in (0, 2, 3):
            out, _ = procs[rank].communicate(timeout=10)
            word, when, generation, peer_rank = out.split()
            assert word == "LOST" and int(generation) == 11 and int(peer_rank) == 1
            assert float(when) - killed_at < 2.0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
