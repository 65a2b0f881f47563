"""State transfer and checkpoints round-trip any MLX module tree exactly (issue 16, defect 20).

Generated trees: nested dicts and lists, empty dicts and lists (a parameter-free submodule's),
non-array leaves, arrays of several dtypes and shapes. Each goes through the same paths the
product uses -- the ring broadcast (over a stand-in reducer with the ring's arithmetic) and a
checkpoint written to and read from disk -- and is put back into a receiver's own tree of the
same structure: the result has that structure and bitwise the sender's arrays.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrain.checkpoints.store import CheckpointStore
from meshtrain.train.leaves import LeafMismatch, assign_leaves, flat_leaves
from meshtrain.train.ring_broadcast import broadcast_tree

DTYPES = [mx.float32, mx.bfloat16, mx.float16, mx.int32, mx.uint32]


class OneMemberRing:
    """The ring's arithmetic for the source alone: a weighted mean of one buffer (itself)."""

    def allreduce(
        self, buf: np.ndarray, step: int = 0, weight: float = 1.0, wire_dtype: str | None = None
    ) -> np.ndarray:
        return (buf.astype(np.float32) * weight) / max(weight, 1.0)


@st.composite
def arrays(draw: Any) -> mx.array:
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    data = np.random.default_rng(seed).standard_normal(shape or ()).astype(np.float32) * 100
    if dtype in (mx.int32, mx.uint32):
        data = np.abs(data)
    return mx.array(data).astype(dtype)


leaf = st.one_of(arrays(), st.integers(0, 9), st.just("relu"))
trees = st.recursive(
    leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from(["w", "b", "drop", "blocks", "attn", "0x"]), children, max_size=3),
    ),
    max_leaves=12,
).map(lambda t: {"root": t, "empty": {}, "none": []})


def like(tree: Any, fill: float) -> Any:
    """The receiver's own tree: the same structure, other values in every array."""
    if isinstance(tree, dict):
        return {k: like(v, fill) for k, v in tree.items()}
    if isinstance(tree, list):
        return [like(v, fill) for v in tree]
    if isinstance(tree, mx.array):
        return mx.full(tree.shape, fill).astype(tree.dtype)
    return tree


def same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    elif isinstance(a, mx.array):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(np.asarray(a.astype(mx.float32)), np.asarray(b.astype(mx.float32)))
    else:
        assert a == b


@settings(max_examples=60, deadline=None)
@given(trees)
def test_a_broadcast_tree_keeps_the_receivers_structure_and_the_senders_bits(tree: Any) -> None:
    got = broadcast_tree(OneMemberRing(), tree, True)
    same(got, tree)
    mine = like(tree, 7.0)
    same(assign_leaves(mine, flat_leaves(got)), tree)


@settings(max_examples=25, deadline=None)
@given(tree=trees)
def test_a_checkpoint_round_trips_into_the_receivers_tree(tree: Any) -> None:
    with tempfile.TemporaryDirectory() as root:
        store = CheckpointStore(Path(root))
        store.write_part("run", 3, params=tree, optimizer={"x": tree})
        store.commit("run", 3)
        loaded = store.load("run")
    floats = flat_leaves(tree)
    mine = like(tree, -1.0)
    same(assign_leaves(mine, dict(loaded.params)), tree)
    assert set(loaded.params) == set(floats)
    opt_mine = {"x": like(tree, 2.0)}
    same(assign_leaves(opt_mine, dict(loaded.optimizer)), {"x": tree})


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.1)


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = [Block(), Block()]
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)


def test_a_nested_model_and_its_adamw_state_restore_in_place() -> None:
    mx.random.seed(1)
    src, src_opt = Nested(), optim.AdamW(learning_rate=1e-3)
    src_opt.init(src.trainable_parameters())
    mx.random.seed(2)
    dst, dst_opt = Nested(), optim.AdamW(learning_rate=1e-3)
    dst_opt.init(dst.trainable_parameters())
    state_dict = dst_opt.state
    dst.update(assign_leaves(dst.parameters(), flat_leaves(src.parameters())))
    assign_leaves(dst_opt.state, flat_leaves(src_opt.state))
    assert dst_opt.state is state_dict and dst_opt.state["blocks"][0]["drop"] == {}
    same(dst.parameters(), src.parameters())
    grads = nn.value_and_grad(dst, lambda m, x: m.head(m.blocks[1].fc(x)).sum())(dst, mx.ones((1, 4)))[1]
    dst_opt.update(dst, grads)  # KeyError: 'drop' before the fix
    mx.eval(dst.parameters())


def test_a_mismatch_names_the_leaf() -> None:
    with pytest.raises(LeafMismatch, match="'a.w'"):
        assign_leaves({"a": {"w": mx.zeros((2,))}}, {})
    with pytest.raises(LeafMismatch, match="shape"):
        assign_leaves({"a": {"w": mx.zeros((2,))}}, {"a.w": mx.zeros((3,))})
    with pytest.raises(LeafMismatch, match="lacks"):
        assign_leaves({"a": {"w": mx.zeros((2,))}}, {"a.w": mx.zeros((2,)), "b": mx.zeros((1,))})
