"""State transfer over real loopback TCP: bit-identical arrival, chunked, refused when it does not fit."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest

from meshtrain.errors import WireError
from meshtrain.train.digest import state_digest
from meshtrain.train.state_transfer import recv_state, send_state


def make_state(seed: int) -> dict[str, Any]:
    mx.random.seed(seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
    model.set_dtype(mx.float32)
    opt = optim.Adam(learning_rate=1e-3)
    x, y = mx.random.normal((16, 20)), mx.random.randint(0, 10, (16,))
    _, grads = nn.value_and_grad(model, lambda m: nn.losses.cross_entropy(m(x), y).mean())(model)
    opt.update(model, grads)
    extra = {
        "half": mx.random.normal((33,)).astype(mx.bfloat16),
        "mask": mx.array([True, False, True]),
        "n": 7,
    }
    state = {"params": model.parameters(), "opt": opt.state, "extra": extra}
    mx.eval(state)  # evaluated on this thread: the sender thread reads the memory in place
    return state


@contextmanager
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A real TCP connection over 127.0.0.1 (ephemeral port): (sender side, receiver side)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client = socket.create_connection(server.getsockname(), timeout=10)
        conn, _ = server.accept()
        conn.settimeout(10)
        try:
            yield client, conn
        finally:
            client.close()
            conn.close()


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.parametrize("chunk_bytes", [1000, 1 << 20])
def test_state_arrives_bit_identical(chunk_bytes: int) -> None:
    ahead, behind = make_state(1), make_state(2)
    assert state_digest(ahead, 5) != state_digest(behind, 5)
    meta = {"step": 5, "sampler": {"epoch": 1, "cursor": 64}}
    with tcp_pair() as (tx, rx):
        thread, errors = in_thread(lambda: send_state(tx, ahead, meta, chunk_bytes=chunk_bytes))
        tree, got_meta = recv_state(rx, behind)
        thread.join(10)
    assert not errors
    assert got_meta == meta
    assert state_digest(tree, 5) == state_digest(ahead, 5)
    assert tree["extra"]["n"] == 7 and tree["extra"]["half"].dtype == mx.bfloat16


def test_state_of_another_model_is_refused_before_bulk_bytes() -> None:
    ahead = make_state(1)
    other = {"params": {"w": mx.zeros((3, 3))}}
    with tcp_pair() as (tx, rx):
        thread, _ = in_thread(lambda: send_state(tx, ahead, {}))
        with pytest.raises(WireError, match="does not match"):
            recv_state(rx, other)
        rx.close()
        thread.join(10)


class Recorder:
    """Collects what send_state writes, so a test can replay part of a real stream."""

    def __init__(self) -> None:
        self.data = bytearray()

    def sendall(self, data: bytes | memoryview) -> None:
        self.data += data


def test_truncated_stream_is_an_error() -> None:
    recorder = Recorder()
    send_state(recorder, make_state(1), {"step": 1}, chunk_bytes=4096)  # type: ignore[arg-type]
    with tcp_pair() as (tx, rx):
        tx.sendall(recorder.data[: len(recorder.data) // 2])
        tx.shutdown(socket.SHUT_WR)
        with pytest.raises(WireError, match="ended early"):
            recv_state(rx, make_state(2))


def test_corrupted_byte_is_caught_by_the_stream_hash() -> None:
    recorder = Recorder()
    send_state(recorder, make_state(1), {"step": 1}, chunk_bytes=4096)  # type: ignore[arg-type]
    recorder.data[len(recorder.data) // 2] ^= 0x01  # inside a data payload: no frame is malformed
    with tcp_pair() as (tx, rx):
        tx.sendall(recorder.data)
        tx.shutdown(socket.SHUT_WR)
        with pytest.raises(WireError, match="corrupted"):
            recv_state(rx, make_state(2))


def test_wrong_key_is_refused() -> None:
    ahead = make_state(1)
    with tcp_pair() as (tx, rx):
        thread, _ = in_thread(lambda: send_state(tx, ahead, {}, key=b"k" * 32))
        with pytest.raises(WireError, match="authentication"):
            recv_state(rx, make_state(2), key=b"x" * 32)
        rx.close()
        thread.join(10)


def test_right_key_round_trips() -> None:
    ahead = make_state(3)
    with tcp_pair() as (tx, rx):
        thread, errors = in_thread(
            lambda: send_state(tx, ahead, {"step": 9}, chunk_bytes=2048, key=b"k" * 32)
        )
        tree, meta = recv_state(rx, make_state(4), key=b"k" * 32)
        thread.join(10)
    assert not errors and meta == {"step": 9}
    assert state_digest(tree, 9) == state_digest(ahead, 9)
