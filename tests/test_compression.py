"""Compressed outer deltas (meshtrain.train.compression): the ring's integer sums are lossless, error
feedback carries what rounding left out, an N-replica local-SGD run with int8 deltas trains to the
loss of exact averaging, and on a real TCP ring the replicas stay bit-identical with half the bytes
of bf16."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten, tree_unflatten

from meshtrain.errors import UserError
from meshtrain.mesh import Mesh
from meshtrain.ring import codecs
from meshtrain.train.compression import (
    CHUNK,
    ErrorFeedback,
    levels,
    pack4,
    parse_compress,
    simulate_sync,
    sync_bits,
    unpack4,
)
from meshtrain.train.local_sgd import OuterOptimizer, outer_update, params_equal
from meshtrain.worker.mesh import WorkerMesh
from tests.test_local_sgd import nudge, on_ring, small_model


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 9),
    st.integers(1, 3 * CHUNK),
    st.floats(1e-6, 1e3),
    st.integers(0, 2**31 - 1),
)
def test_integer_partial_sums_never_leave_qint8_and_the_mean_is_close(
    members: int, count: int, scale: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    deltas = [(rng.standard_normal(count) * scale).astype(np.float32) for _ in range(members)]
    weights = [float(w) for w in rng.integers(0, 50, members)]
    weights[0] += 1.0  # somebody trained
    feedback = [ErrorFeedback() for _ in range(members)]
    mean, sent = simulate_sync(deltas, weights, feedback)  # asserts every partial sum is exact
    exact = sum(w * d.astype(np.float64) for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    bound = sum(w * np.abs(d).max() for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    # every member rounds once, by at most half a grid step of its chunk
    assert np.max(np.abs(mean - exact)) <= members * bound / levels(members) / 2 * 1.01 + 1e-30
    assert sent <= 2 * count + 64 * (count // CHUNK + 8)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 3 * CHUNK),
    st.floats(1e-6, 1e3),
    st.integers(0, 2**31 - 1),
)
def test_4_bit_integers_packed_two_to_an_item_sum_exactly_and_the_mean_is_close(
    members: int, count: int, scale: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    deltas = [(rng.standard_normal(count) * scale).astype(np.float32) for _ in range(members)]
    weights = [float(w) for w in rng.integers(0, 50, members)]
    weights[0] += 1.0
    feedback = [ErrorFeedback() for _ in range(members)]
    mean, sent = simulate_sync(deltas, weights, feedback, bits=4)  # asserts every digit's sum is exact
    exact = sum(w * d.astype(np.float64) for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    bound = sum(w * np.abs(d).max() for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    assert np.max(np.abs(mean - exact)) <= members * bound / levels(members, 4) / 2 * 1.01 + 1e-30
    assert sent <= count + 64 * (count // CHUNK + 8)  # half a byte an element, twice (the ring)


@given(st.lists(st.lists(st.integers(-7, 7), min_size=1, max_size=9), min_size=1, max_size=4))
def test_sums_of_packed_pairs_unpack_to_the_sums_of_the_digits(rows: list[list[int]]) -> None:
    width = max(len(r) for r in rows)
    qs = [np.array(r + [0] * (width - len(r)), np.float32) for r in rows]
    total = np.sum(qs, axis=0)
    if np.abs(total).max() > 7:  # outside the grid's guarantee
        return
    packed = sum((pack4(q) for q in qs), np.zeros((width + 1) // 2, np.float32))
    assert np.array_equal(unpack4(packed, width), total)


def test_int4_goes_as_int8_where_no_4_bit_grid_exists() -> None:
    assert levels(2, 4) == 6 and levels(4, 4) == 5 and levels(12, 4) == 1
    assert sync_bits("int4", 12) == 4 and sync_bits("int4", 13) == 8 and sync_bits("int8", 2) == 8


def test_error_feedback_carries_the_rounding_into_the_next_syncs() -> None:
    """Summed over syncs, the compressed means equal the exact means up to the last residuals, so
    the error does not pile up as it does when each sync forgets its rounding."""
    members, count, weights = 4, 5000, [32.0, 32.0, 16.0, 48.0]

    def run(keep: bool) -> tuple[np.ndarray, np.ndarray, list[ErrorFeedback]]:
        rng = np.random.default_rng(1)
        feedback = [ErrorFeedback() for _ in range(members)]
        total_exact, total_sent = np.zeros(count), np.zeros(count)
        for _ in range(30):
            deltas = [(rng.standard_normal(count) * 1e-3 + 2e-4).astype(np.float32) for _ in range(members)]
            if not keep:
                feedback = [ErrorFeedback() for _ in range(members)]
            mean, _ = simulate_sync(deltas, weights, feedback)
            total_exact += sum(w * d for w, d in zip(weights, deltas, strict=True)) / sum(weights)
            total_sent += mean
        return total_exact, total_sent, feedback

    exact, sent, feedback = run(keep=True)
    left = sum(w * fb.residual for w, fb in zip(weights, feedback, strict=True) if fb.residual is not None)
    np.testing.assert_allclose(sent + left / sum(weights), exact, atol=1e-6)
    _, forgetful, _ = run(keep=False)
    assert np.abs(sent - exact).mean() < 0.5 * np.abs(forgetful - exact).mean()


def test_compress_values() -> None:
    assert (
        parse_compress(None) is None and parse_compress("none") is None and parse_compress("int8") == "int8"
    )
    assert parse_compress("int4") == "int4"
    with pytest.raises(ValueError):
        parse_compress("int2")
    with pytest.raises(UserError):
        OuterOptimizer(small_model(), Mesh(), compress="fp4")
    with pytest.raises(UserError, match="internal"):  # the codec is not a wire dtype for gradients
        Mesh().allreduce({"w": mx.zeros((2,))}, wire_dtype="qint8")
    assert codecs.codec("qint8").storage == np.dtype(np.int8)


# --- the simulated N-replica outer loop -----------------------------------------------------------
def task(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2048, 16)).astype(np.float32)
    y = np.argmax(np.tanh(x @ rng.standard_normal((16, 8))) @ rng.standard_normal((8, 4)), axis=1)
    return x, y.astype(np.int32)


def train_replicas(compress: bool, members: int = 4, h: int = 8, syncs: int = 24, bits: int = 8) -> float:
    """N replicas of one MLP, each Adam on its shard for H steps, then the DiLoCo outer step on the
    weighted mean delta (exact, or int8 with error feedback); the final full-data loss."""
    x, y = task()
    mx.random.seed(0)
    shared = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    anchor = {k: np.array(v) for k, v in tree_flatten(shared.parameters())}
    velocity = {k: np.zeros_like(v) for k, v in anchor.items()}
    replicas, optimizers = [], []
    for _ in range(members):
        mx.random.seed(0)
        replicas.append(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)))
        optimizers.append(optim.Adam(learning_rate=3e-3))
    loss = nn.losses.cross_entropy
    grad_fns = [nn.value_and_grad(m, lambda m, a, b: loss(m(a), b).mean()) for m in replicas]
    feedback = [ErrorFeedback() for _ in range(members)]
    keys = list(anchor)
    rng = np.random.default_rng(5)
    for _ in range(syncs):
        deltas, weights = [], []
        for r, (model, opt, fn) in enumerate(zip(replicas, optimizers, grad_fns, strict=True)):
            model.update(tree_unflatten([(k, mx.array(v)) for k, v in anchor.items()]))
            batch = 16 * (r + 1)  # uneven shares: the weights matter
            for _ in range(h):
                idx = rng.integers(0, len(x), batch)
                _, grads = fn(model, mx.array(x[idx]), mx.array(y[idx]))
                opt.update(model, grads)
                mx.eval(model.parameters(), opt.state)
            now = dict(tree_flatten(model.parameters()))
            deltas.append(np.concatenate([(anchor[k] - np.array(now[k])).ravel() for k in keys]))
            weights.append(float(batch * h))
        if compress:
            mean, _ = simulate_sync(deltas, weights, feedback, bits=bits)
        else:
            mean = (sum(w * d for w, d in zip(weights, deltas, strict=True)) / sum(weights)).astype(
                np.float32
            )
        start = 0
        for k in keys:
            size = anchor[k].size
            d = mx.array(mean[start : start + size].reshape(anchor[k].shape))
            a, v = outer_update(mx.array(anchor[k]), mx.array(velocity[k]), d, 0.7, 0.5, True)
            anchor[k], velocity[k] = np.array(a), np.array(v)
            start += size
    shared.update(tree_unflatten([(k, mx.array(v)) for k, v in anchor.items()]))
    return float(loss(shared(mx.array(x)), mx.array(y)).mean())


def test_int8_deltas_train_to_the_loss_of_exact_averaging() -> None:
    exact, int8 = train_replicas(compress=False), train_replicas(compress=True)
    first = train_replicas(compress=False, syncs=1)
    assert exact < 0.6 * first  # it trained
    assert abs(int8 - exact) <= 0.03 * exact + 0.005, (int8, exact)
    int4 = train_replicas(compress=True, bits=4)
    print(f"final loss: exact {exact:.4f}, int8 {int8:.4f}, int4 {int4:.4f} (one sync: {first:.4f})")
    assert abs(int4 - exact) <= 0.05 * exact + 0.005, (int4, exact)


# --- a real ring -----------------------------------------------------------------------------------
def test_int8_on_a_real_ring_keeps_replicas_identical_with_half_the_bytes_of_bf16() -> None:
    h, syncs = 3, 3

    def body(compress: str | None, wire: str) -> Any:
        def run(mesh: WorkerMesh) -> tuple[Any, int, Any]:
            model = small_model(seed=0)
            outer = OuterOptimizer(model, mesh, sync_every=h, compress=compress, wire_dtype=wire)
            for step in range(h * syncs):
                nudge(model, mesh.rank, step)
                outer.step(samples=10 * (mesh.rank + 1))
            return model.parameters(), outer.bytes_sent, outer.feedback

        return run

    int8 = on_ring(3, body("int8", "auto"))
    int4 = on_ring(3, body("int4", "auto"))
    bf16 = on_ring(3, body(None, "bfloat16"))
    fp32 = on_ring(3, body(None, "float32"))
    for results in (int8, int4, bf16):
        assert params_equal(results[0][0], results[1][0]) and params_equal(results[0][0], results[2][0])
    assert all(r[2] is not None and r[2].residual is not None for r in int8)  # each keeps its own residual
    assert int8[0][1] < 0.55 * bf16[0][1] and bf16[0][1] < 0.55 * fp32[0][1]
    assert int4[0][1] < 0.6 * int8[0][1]
    exact4 = dict(tree_flatten(int4[0][0]))
    exact, got = dict(tree_flatten(fp32[0][0])), dict(tree_flatten(int8[0][0]))
    for k in exact:  # same trajectory within the int8 grid's rounding (nudges are N(0, 0.01))
        np.testing.assert_allclose(np.array(got[k]), np.array(exact[k]), atol=3e-3)
        np.testing.assert_allclose(np.array(exact4[k]), np.array(exact[k]), atol=3e-2)  # 5 levels, not 124
