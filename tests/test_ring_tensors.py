"""Tensor fusion of MLX trees and the 16-bit wire casts."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from meshtrain.errors import UserError
from meshtrain.ring import tensors


def test_bfloat16_matches_mlx_except_exact_ties() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            rng.standard_normal(50_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 50_000),
            np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 3.4e38, 1e-45], np.float32),
        ]
    ).astype(np.float32)
    ours = np.empty(x.size, np.uint16)
    tensors.encode(x, ours, "bfloat16")
    theirs = np.array(mx.array(x).astype(mx.bfloat16).view(mx.uint16))
    ties = (x.view(np.uint32) & 0xFFFF) == 0x8000
    assert np.array_equal(ours[~ties], theirs[~ties])
    back = np.empty(x.size, np.float32)
    tensors.decode(ours, back, "bfloat16")
    widened = np.array(mx.array(ours).view(mx.bfloat16).astype(mx.float32))
    assert np.array_equal(back.view(np.uint32), widened.view(np.uint32))
    finite = np.isfinite(x) & (np.abs(x) < 3e38)
    assert np.all(np.abs(back[finite] - x[finite]) <= np.abs(x[finite]) * 2.0**-8 + 1e-40)


@settings(max_examples=50, deadline=None)
@given(
    hnp.arrays(np.float32, st.integers(0, 300), elements=st.floats(-1e4, 1e4, width=32)),
    st.sampled_from(["float32", "float16", "bfloat16"]),
)
def test_wire_round_trip_is_within_the_dtype_precision(x: np.ndarray, name: str) -> None:
    eps = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}[name]
    back = tensors.round_trip(x, name)
    assert back.dtype == np.float32 and back.shape == x.shape
    tiny = {"float32": 0.0, "float16": 6e-8, "bfloat16": 1e-40}[name]  # subnormals: absolute error
    assert np.all(np.abs(back - x) <= np.abs(x) * eps + tiny)


def test_wire_dtype_names() -> None:
    assert tensors.wire_dtype_name(None) == "float32"
    assert tensors.wire_dtype_name("bfloat16") == "bfloat16"
    assert tensors.wire_dtype_name(mx.float16) == "float16"
    with pytest.raises(UserError):
        tensors.wire_dtype_name("int8")


def test_tree_flattens_to_one_buffer_and_back() -> None:
    tree: dict[str, Any] = {
        "layers": [
            {"weight": mx.arange(12, dtype=mx.float32).reshape(3, 4), "bias": mx.ones((4,))},
            {"weight": mx.full((2, 2), 0.5, dtype=mx.bfloat16), "bias": mx.array(7.0, dtype=mx.float16)},
        ],
        "scale": mx.array([2.0]),
        "name": "not an array",
    }
    flat, layout = tensors.flatten_tree(tree)
    assert flat.dtype == np.float32 and flat.size == layout.count == 12 + 4 + 4 + 1 + 1
    assert flat[:12].tolist() == list(range(12)) and flat[-1] == 2.0
    back = tensors.unflatten_tree(tree, flat * 2, layout)
    assert back["name"] == "not an array"
    assert back["layers"][0]["weight"].shape == (3, 4)
    assert back["layers"][1]["weight"].dtype == mx.bfloat16
    assert back["layers"][1]["bias"].dtype == mx.float16 and back["layers"][1]["bias"].shape == ()
    assert mx.array_equal(back["layers"][0]["weight"], tree["layers"][0]["weight"] * 2).item()
    assert back["layers"][1]["bias"].item() == 14.0
    with pytest.raises(ValueError):
        tensors.unflatten_tree(tree, flat[:-1], layout)


def test_empty_tree() -> None:
    flat, layout = tensors.flatten_tree({})
    assert flat.size == 0
    assert tensors.unflatten_tree({}, flat, layout) == {}
