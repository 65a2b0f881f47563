"""Stage 3's pieces on one process: the unit grouping (pure, hypothesis), training at world size 1
equal to the plain optimizer, and one clear line for each way a script can get stage 3 wrong.

The sharded runs on real local meshes (equal to unsharded, the memory it saves) are in
tests/test_shard_local.py."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlx.utils import tree_flatten

from meshtrain.errors import UserError
from meshtrain.mesh import Mesh
from meshtrain.shard import ShardedOptimizer
from meshtrain.shard.units import group_leaves, owned_run, piece_sizes


def test_leaves_group_by_layer_prefix_and_the_rest_is_root() -> None:
    paths = ["embed.weight", "layers.0.a", "layers.0.b", "layers.1.a", "layers.10.a", "head.weight"]
    units = group_leaves(paths, ["layers.0", "layers.1", "layers.10"])
    assert units.layers == ((1, 2), (3,), (4,))  # "layers.1" is not a prefix of "layers.10.a"
    assert units.root == (0, 5)


def test_bad_layer_groupings_are_one_line() -> None:
    with pytest.raises(UserError, match="no trainable parameters"):
        group_leaves(["a.w"], ["b"])
    with pytest.raises(UserError, match="must not nest"):
        group_leaves(["a.b.w"], ["a", "a.b"])
    with pytest.raises(UserError, match="not contiguous"):
        group_leaves(["a.w", "c.w", "a.v"], ["a"])


@given(
    sizes=st.lists(st.integers(0, 50), min_size=1, max_size=12),
    cuts=st.lists(st.integers(0, 12), min_size=0, max_size=4),
    unit_bounds=st.tuples(st.integers(0, 12), st.integers(0, 12)),
)
def test_each_members_piece_of_a_unit_is_a_contiguous_run_in_rank_order(
    sizes: list[int], cuts: list[int], unit_bounds: tuple[int, int]
) -> None:
    n = len(sizes)
    points = sorted({0, n, *(min(c, n) for c in cuts)})
    ranges = list(zip(points[:-1], points[1:], strict=True))
    lo, hi = sorted(min(b, n) for b in unit_bounds)
    unit = list(range(lo, hi))
    pieces = piece_sizes(unit, sizes, ranges)
    assert sum(pieces) == sum(sizes[i] for i in unit)
    pos = 0
    for leaf_range in ranges:
        start, stop = owned_run(unit, leaf_range)
        assert start == pos or start == stop  # members' runs follow each other
        assert all(leaf_range[0] <= unit[p] < leaf_range[1] for p in range(start, stop))
        pos = stop if stop > start else pos


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a = nn.Linear(dim, 2 * dim)
        self.b = nn.Linear(2 * dim, dim)

    def __call__(self, x: mx.array, scale: float = 1.0) -> mx.array:
        return x + scale * self.b(nn.gelu(self.a(x)))


class Net(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.layers = [Block(dim) for _ in range(depth)]
        self.head = nn.Linear(dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, scale=0.5)
        return self.head(h)


def _loss(model: Net, x: mx.array, y: mx.array) -> mx.array:
    return ((model(x) - y) ** 2).mean()


def _train(stage3: bool, steps: int = 4) -> dict[str, np.ndarray]:
    mx.random.seed(3)
    model = Net()
    mesh = Mesh()
    opt: Any = optim.Adam(learning_rate=1e-2)
    if stage3:
        opt = ShardedOptimizer(opt, mesh, stage=3, max_grad_norm=0.1, wire_dtype="float32")
        opt.register(model)
    step = nn.value_and_grad(model, _loss)
    rng = np.random.default_rng(0)
    x, y = mx.array(rng.normal(size=(32, 4)).astype(np.float32)), mx.array(rng.normal(size=(32, 1)))
    for _ in range(steps):
        for idx in mesh.batches(32, 8):
            _, grads = step(model, x[mx.array(idx)], y[mx.array(idx)])
            if stage3:
                opt.update(model, grads)
            else:
                grads, _ = optim.clip_grad_norm(grads, 0.1)
                opt.update(model, grads)
            mx.eval(model.parameters())
    whole = opt.gather_parameters(model) if stage3 else dict(tree_flatten(model.trainable_parameters()))
    return {k: np.array(v) for k, v in whole.items()}


def test_stage_3_at_world_size_1_trains_as_the_plain_optimizer() -> None:
    plain, sharded = _train(False), _train(True)
    assert plain.keys() == sharded.keys()
    assert max(float(np.abs(plain[k] - sharded[k]).max()) for k in plain) <= 1e-6


def test_stage_3_needs_its_layers() -> None:
    class NoLayers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Linear(2, 2)

    with pytest.raises(UserError, match="layers=model.blocks"):
        ShardedOptimizer(optim.SGD(0.1), Mesh(), stage=3).register(NoLayers())
    with pytest.raises(UserError, match="sub-modules of the model"):
        ShardedOptimizer(optim.SGD(0.1), Mesh(), stage=3, layers=[nn.Linear(2, 2)]).register(Net())


def test_a_weight_other_than_the_batch_the_backward_used_is_refused() -> None:
    model, mesh = Net(), Mesh()
    opt = ShardedOptimizer(optim.SGD(0.1), mesh, stage=3)
    opt.register(model)
    step = nn.value_and_grad(model, _loss)
    for idx in mesh.batches(8, 4):
        _, grads = step(model, mx.ones((len(idx), 4)), mx.zeros((len(idx), 1)))
        with pytest.raises(UserError, match="leave weight out"):
            opt.update(model, grads, weight=len(idx) + 1)
        break


def test_stage_3_with_accumulation_is_one_line() -> None:
    model, mesh = Net(), Mesh()
    opt = ShardedOptimizer(optim.SGD(0.1), mesh, stage=3)
    opt.register(model)
    step = nn.value_and_grad(model, _loss)
    with pytest.raises(UserError, match="accumulate=K is not yet supported at stage 3"):
        for idx in mesh.batches(8, 4, accumulate=2):
            step(model, mx.ones((len(idx), 4)), mx.zeros((len(idx), 1)))


def test_a_stage_3_model_still_evaluates_and_keeps_its_paths() -> None:
    model = Net()
    paths = [p for p, _ in tree_flatten(model.parameters())]
    ShardedOptimizer(optim.SGD(0.1), Mesh(), stage=3).register(model)
    assert [p for p, _ in tree_flatten(model.parameters())] == paths
    assert model(mx.ones((2, 4))).shape == (2, 1)
    assert isinstance(model.layers[0], Block)


def test_an_mlx_lm_llama_shards_its_model_layers_by_default() -> None:
    """mlx-lm's models name their blocks `model.layers` and call them with a mask and a cache that
    are not arrays: stage 3 finds them and passes those through."""
    llama = pytest.importorskip("mlx_lm.models.llama")
    config = llama.ModelArgs(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        rms_norm_eps=1e-5,
        vocab_size=50,
        num_key_value_heads=2,
    )

    def train(stage3: bool) -> dict[str, np.ndarray]:
        mx.random.seed(0)
        model, mesh = llama.Model(config), Mesh()
        opt: Any = optim.AdamW(learning_rate=1e-3)
        if stage3:
            opt = ShardedOptimizer(opt, mesh, stage=3, wire_dtype="float32")
            opt.register(model)
        step = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y).mean())
        tokens = mx.array(np.random.default_rng(0).integers(0, 50, (8, 9)))
        for idx in mesh.batches(8, 4):
            batch = tokens[mx.array(idx)]
            _, grads = step(model, batch[:, :-1], batch[:, 1:])
            opt.update(model, grads)
            mx.eval(model.parameters())
        whole = opt.gather_parameters(model) if stage3 else dict(tree_flatten(model.trainable_parameters()))
        return {k: np.array(v) for k, v in whole.items()}

    plain, sharded = train(False), train(True)
    assert max(float(np.abs(plain[k] - sharded[k]).max()) for k in plain) <= 1e-6


def test_the_prefetch_schedule_is_the_first_pass_of_the_first_step() -> None:
    from meshtrain.shard.gathered import schedule

    assert schedule([0, 1, 2]) == {0: 1, 1: 2}
    assert schedule([0, 1, 2, 0, 1, 2]) == {0: 1, 1: 2}  # an evaluation forward, then the training one
    assert schedule([0, 1, 0, 2]) == {0: 1}  # a layer used twice: the pass ends there
    assert schedule([]) == {}


def test_a_gather_waited_for_says_why_it_may_be_stuck(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The other workers alive but not calling the model (a main-only evaluation) would leave a
    gather waiting with no word: every WAIT_WARN_S it says what every worker must do."""
    import threading
    from concurrent.futures import Future

    from meshtrain.shard import gathered

    monkeypatch.setattr(gathered, "WAIT_WARN_S", 0.05)
    future: Future[int] = Future()
    threading.Timer(0.3, future.set_result, (7,)).start()
    assert gathered.GatheredLayers(None)._result(future, "gather") == 7
    err = capsys.readouterr().err
    assert "stage 3 has waited" in err and "every worker must call the model the same number of times" in err
