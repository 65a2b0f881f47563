"""Authenticated rings on real loopback sockets: right key, wrong key, replays, tampering."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from meshtrain.errors import PeerLost
from meshtrain.ring import Ring, RingListener
from meshtrain.ring.streams import FrameReader
from meshtrain.security import Keyring, generate_secret, handshake

MESH = Keyring([generate_secret()])
COUNT = 100_003


def run_ranks(bodies: list[Callable[[], Any]]) -> list[Any]:
    """Run each body in its own thread; results or the exceptions they raised."""
    results: list[Any] = [None] * len(bodies)

    def run(i: int) -> None:
        try:
            results[i] = bodies[i]()
        except BaseException as exc:  # noqa: B036 - handed back to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


class Tap:
    """A TCP relay in front of a listener: records what the client sends, can flip one byte of it."""

    def __init__(self, target: tuple[str, int], flip_at: int | None = None) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target, self.flip_at = target, flip_at
        self.recorded = bytearray()
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        client, _ = self.server.accept()
        upstream = socket.create_connection(self.target)
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)
        self.done.set()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if record:
                    start = len(self.recorded)
                    self.recorded += data
                    if self.flip_at is not None and start <= self.flip_at < len(self.recorded):
                        flipped = bytearray(data)
                        flipped[self.flip_at - start] ^= 0x01
                        data = bytes(flipped)
                dst.sendall(data)
        except OSError:
            pass
        for s in (dst,):
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def xs(rank: int) -> np.ndarray:
    return np.random.default_rng(rank).standard_normal(COUNT).astype(np.float32)


def member(
    listener: RingListener, rank: int, addrs: list[tuple[str, int]], keyring: Keyring | None, **kw: Any
) -> Callable[[], Any]:
    def body() -> Any:
        with Ring.connect(
            listener, rank, addrs, job="j", generation=2, keyring=keyring, chunk_bytes=64 << 10, **kw
        ) as ring:
            outs = [ring.allreduce(xs(rank) * (step + 1), step=step, weight=rank + 1.0) for step in range(2)]
            return outs, ring.authenticated

    return body


@pytest.mark.parametrize("n", [2, 3])
def test_ring_with_the_mesh_secret_computes_the_mean(n: int) -> None:
    listeners = [RingListener.bind("127.0.0.1") for _ in range(n)]
    addrs = [("127.0.0.1", lst.port) for lst in listeners]
    rotated = Keyring([MESH.primary, generate_secret()])  # a member mid-rotation still fits
    results = run_ranks([member(listeners[r], r, addrs, rotated if r == 0 else MESH) for r in range(n)])
    expected = sum((r + 1.0) * xs(r).astype(np.float64) for r in range(n)) / sum(r + 1.0 for r in range(n))
    for outs, authenticated in results:
        assert authenticated
        assert np.allclose(outs[1], 2 * expected, atol=1e-4) and np.array_equal(outs[0], results[0][0][0])
    for lst in listeners:
        lst.close()


@pytest.mark.parametrize("dialer_keyring", [Keyring([generate_secret()]), None], ids=["wrong-key", "no-key"])
def test_a_member_without_the_secret_fails_at_the_handshake(dialer_keyring: Keyring | None) -> None:
    listeners = [RingListener.bind("127.0.0.1") for _ in range(2)]
    addrs = [("127.0.0.1", lst.port) for lst in listeners]
    start = time.monotonic()
    results = run_ranks(
        [
            member(listeners[0], 0, addrs, dialer_keyring, timeout=1.5),
            member(listeners[1], 1, addrs, MESH, timeout=1.5),
        ]
    )
    assert all(isinstance(r, PeerLost) for r in results), results
    # both sides say why (not just "timed out"): the mesh secret does not match
    assert all("authentication failed" in r.reason for r in results), results
    assert results[0].peer == f"127.0.0.1:{addrs[1][1]}" and results[1].peer == f"127.0.0.1:{addrs[0][1]}"
    counted = listeners[1].drops.snapshot()
    assert counted["unknown_mesh" if dialer_keyring is not None else "bad_tag"] >= 1, counted
    assert time.monotonic() - start < 5
    for lst in listeners:
        lst.close()


def two_member_ring_through(tap_flip_at: int | None) -> tuple[list[Any], Tap, list[RingListener]]:
    """Rank 0 reaches rank 1 through a Tap; returns (results, tap, listeners)."""
    listeners = [RingListener.bind("127.0.0.1") for _ in range(2)]
    real = [("127.0.0.1", lst.port) for lst in listeners]
    tap = Tap(real[1], flip_at=tap_flip_at)
    via_tap = [real[0], ("127.0.0.1", tap.port)]
    results = run_ranks(
        [
            member(listeners[0], 0, via_tap, MESH, timeout=5),
            member(listeners[1], 1, real, MESH, timeout=5),
        ]
    )
    return results, tap, listeners


def test_a_tampered_chunk_is_detected_and_ends_the_ring() -> None:
    results, tap, listeners = two_member_ring_through(tap_flip_at=300 + 40_000)  # inside the first chunk
    assert all(isinstance(r, PeerLost) for r in results), results
    assert "frame authentication failed" in results[1].reason
    for lst in listeners:
        lst.close()


def test_a_captured_hello_and_frames_replayed_later_are_rejected() -> None:
    results, tap, listeners = two_member_ring_through(tap_flip_at=None)
    assert all(not isinstance(r, BaseException) for r in results), results
    assert tap.done.wait(5)
    captured = bytes(tap.recorded)  # rank 0's hello and all its authenticated chunk frames
    assert len(captured) > 2 * COUNT * 4 // 2

    def replay_into_rank1() -> None:
        with socket.create_connection(("127.0.0.1", listeners[1].port)) as s:
            s.sendall(captured)
            time.sleep(0.1)  # noqa: ASYNC251 - let the listener read before the close

    def honest_rank0_acceptor() -> bytes | None:
        """Plays rank 0's accepting side correctly (it holds the secret), so only the replay is at fault."""
        conn, _ = plain0.accept()
        reader = FrameReader(conn)
        conn.settimeout(5)
        hello = reader.read_header(max_payload=0)
        key = handshake.check_dial(MESH, hello, listeners[0].nonces, time.time())
        reply = handshake.accept_reply(
            key, hello, {"job": "j", "gen": 2, "rank": 0, "size": 2, "version": 1, "ok": True}
        )
        from meshtrain.ring.tcp import send_hello

        send_hello(conn, reply)
        try:
            while conn.recv(1 << 16):
                pass
        except OSError:
            pass
        conn.close()
        return None

    real = [("127.0.0.1", lst.port) for lst in listeners]
    listeners[0].close()  # its acceptor thread would take the connections: rank 0 is played by hand
    plain0 = socket.create_server(real[0])

    # 1. the listener that saw the hello refuses it when it comes again
    replay = threading.Thread(target=replay_into_rank1)
    replay.start()
    results = run_ranks([honest_rank0_acceptor, member(listeners[1], 1, real, MESH, timeout=1.5)])
    replay.join()
    # the listener's acceptor refuses the replay before the ring sees it (so a stranger can never take
    # a neighbour's slot): rank 1 finds no left neighbour, and the replay is counted
    assert isinstance(results[1], PeerLost), results
    assert "replayed hello" in results[1].reason or "did not connect" in results[1].reason, results
    assert listeners[1].drops.snapshot()["replay"] >= 1

    # 2. a restarted listener (no memory of the nonce) takes the hello, but every frame fails
    listeners[1].nonces = handshake.NonceMemory()
    replay = threading.Thread(target=replay_into_rank1)
    replay.start()
    results = run_ranks([honest_rank0_acceptor, member(listeners[1], 1, real, MESH, timeout=5)])
    replay.join()
    assert isinstance(results[1], PeerLost) and "frame authentication failed" in results[1].reason, results
    for lst in listeners:
        lst.close()
