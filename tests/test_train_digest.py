"""State digests: equal for bit-identical state, different for any change of bits, step, shape or dtype."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from meshtrain.train.digest import leaf_bytes, state_digest


def trained_state(seed: int = 0, steps: int = 2) -> dict:
    mx.random.seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = optim.Adam(learning_rate=1e-2)
    x, y = mx.random.normal((32, 8)), mx.random.randint(0, 3, (32,))

    def loss(m: nn.Module) -> mx.array:
        return nn.losses.cross_entropy(m(x), y).mean()

    for _ in range(steps):
        _, grads = nn.value_and_grad(model, loss)(model)
        opt.update(model, grads)
    mx.eval(model.parameters(), opt.state)
    return {"params": model.parameters(), "opt": opt.state}


def test_same_training_same_digest() -> None:
    assert state_digest(trained_state(), 2) == state_digest(trained_state(), 2)


def test_step_and_one_flipped_bit_change_the_digest() -> None:
    state = trained_state()
    base = state_digest(state, 2)
    assert state_digest(state, 3) != base
    w = np.array(state["params"]["layers"][0]["weight"])
    w.view(np.uint32)[1, 2] ^= 1  # the lowest mantissa bit of one weight
    state["params"]["layers"][0]["weight"] = mx.array(w)
    assert state_digest(state, 2) != base


def test_optimizer_state_is_covered() -> None:
    a, b = trained_state(steps=2), trained_state(steps=2)
    b["opt"] = tree_map(
        lambda v: v * 1.0001 if isinstance(v, mx.array) and v.dtype == mx.float32 else v, b["opt"]
    )
    assert state_digest(a, 2) != state_digest(b, 2)


def test_dtype_and_shape_are_part_of_the_digest() -> None:
    x = mx.zeros((4,), mx.float32)
    assert state_digest({"w": x}, 0) != state_digest({"w": x.reshape(2, 2)}, 0)
    assert state_digest({"w": mx.zeros((8,), mx.bfloat16)}, 0) != state_digest(
        {"w": mx.zeros((8,), mx.float16)}, 0
    )


def test_leaf_bytes_are_the_row_major_bytes() -> None:
    a = mx.arange(6, dtype=mx.float32).reshape(2, 3).T  # a transposed (non-contiguous) view
    assert bytes(leaf_bytes(a)) == np.array(a).tobytes()
    b = mx.array([1.5, -2.0], dtype=mx.bfloat16)
    assert bytes(leaf_bytes(b)) == bytes([0xC0, 0x3F, 0x00, 0xC0])
