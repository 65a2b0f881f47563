"""Gradient accumulation: `mesh.batches(..., accumulate=K)` yields K micro-batches per global batch
(the exactly-once sampler sees one step each), and `Accumulation` makes the K summed gradients the
step's mean: on a real 2-member ring, K=4 trains to the parameters of K=1."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from meshtrain.errors import UserError
from meshtrain.mesh import Mesh
from meshtrain.ring import RingListener
from meshtrain.train.accumulate import Accumulation, check_accumulate
from meshtrain.train.step_sampler import ledger_problem
from meshtrain.worker.mesh import WorkerMesh
from meshtrain.worker.reporter import Reporter
from meshtrain.worker.views import ViewBoard

N, BATCH, K = 200, 32, 4


def test_micro_batches_split_each_global_batch_and_count_one_step() -> None:
    mesh = Mesh()
    whole = list(mesh.batches(N, BATCH, epoch=1, seed=3))
    micro = list(Mesh().batches(N, BATCH, epoch=1, seed=3, accumulate=K))
    assert len(micro) == K * len(whole)
    for i, slice_ in enumerate(whole):
        parts = micro[K * i : K * (i + 1)]
        assert np.array_equal(np.concatenate(parts), slice_)  # contiguous, in order, nothing lost
    counted = Mesh()
    for _ in counted.batches(N, BATCH, accumulate=K):
        pass
    assert counted.step == len(whole)  # one step per global batch
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(UserError):
            check_accumulate(bad)
    with pytest.raises(UserError):
        list(Mesh().batches(N, BATCH, accumulate=0))


def test_accumulation_is_the_sample_weighted_mean_and_zeros_for_an_empty_step() -> None:
    acc = Accumulation(3)
    g = [{"w": mx.array([1.0, 2.0])}, None, {"w": mx.array([4.0, 8.0])}]
    assert acc.add(g[0], 1) is False and acc.add(g[1], 0) is False and acc.add(g[2], 3) is True
    assert acc.samples == 4 and np.allclose(np.array(acc.mean()["w"]), [13 / 4, 26 / 4])
    for _ in range(3):
        done = acc.add(None, 0)
    assert done and acc.samples == 0
    assert np.array_equal(np.array(acc.mean(like={"w": mx.ones((2,))})["w"]), [0.0, 0.0])
    with pytest.raises(UserError):
        acc.mean()


def on_ring_with_ledger(n: int, ledger: Path, body: Any) -> list[Any]:
    listeners = [RingListener.bind("127.0.0.1") for _ in range(n)]
    view = {"version": 1, "members": [[f"n{r}", "127.0.0.1", lst.port] for r, lst in enumerate(listeners)]}
    results: list[Any] = [None] * n

    def run(rank: int) -> None:
        mesh = None
        try:
            views = ViewBoard(io.StringIO(""))
            views.feed(json.dumps({"view": view}))
            mesh = WorkerMesh(
                member=f"n{rank}",
                job="jacc",
                node=f"n{rank}",
                listener=listeners[rank],
                views=views,
                reporter=Reporter(None),
                ledger_dir=str(ledger),
                share_mode="equal",
            )
            mesh.connect(10.0)
            results[rank] = body(mesh)
        except BaseException as exc:  # noqa: B036 - handed back to the test
            results[rank] = exc
        finally:
            if mesh is not None:
                mesh.close()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for lst in listeners:
        lst.close()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def train(accumulate: int, ledger: Path) -> list[Any]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 8)).astype(np.float32)
    y = (x @ rng.standard_normal((8, 3))).argmax(axis=1).astype(np.int32)

    def body(mesh: WorkerMesh) -> Any:
        mx.random.seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        optimizer = optim.SGD(learning_rate=0.1)
        mesh.register(model, optimizer)
        loss_and_grad = nn.value_and_grad(model, lambda m, a, b: nn.losses.cross_entropy(m(a), b).mean())
        acc = Accumulation(accumulate)
        micro_sizes: list[int] = []
        for epoch in range(2):
            for idx in mesh.batches(N, BATCH, epoch=epoch, seed=1, accumulate=accumulate):
                micro_sizes.append(len(idx))
                grads = loss_and_grad(model, mx.array(x[idx]), mx.array(y[idx]))[1] if len(idx) else None
                if acc.add(grads, len(idx)):
                    mean = acc.mean(like=model.trainable_parameters())
                    reduced = mesh.allreduce(mean, weight=acc.samples, wire_dtype="float32")
                    optimizer.update(model, reduced)
                    mx.eval(model.parameters(), optimizer.state)
        return {k: np.array(v) for k, v in tree_flatten(model.parameters())}, mesh.step, micro_sizes

    return on_ring_with_ledger(2, ledger, body)


def test_accumulating_k_micro_batches_trains_like_one_batch_on_a_real_ring(tmp_path: Path) -> None:
    plain = train(1, tmp_path / "plain")
    accumulated = train(K, tmp_path / "accumulated")
    steps = 2 * -(-N // BATCH)
    for _, step, sizes in accumulated:
        assert step == steps and len(sizes) == K * steps
    (p0, _, _), (p1, _, _) = accumulated
    assert all(np.array_equal(p0[k], p1[k]) for k in p0)  # replicas identical
    for k in p0:
        np.testing.assert_allclose(p0[k], plain[0][0][k], rtol=1e-4, atol=1e-5)
    assert ledger_problem(tmp_path / "accumulated", N) is None  # every index once per epoch
    rows = (tmp_path / "accumulated" / "ledger-n0.jsonl").read_text().splitlines()
    assert len(rows) == steps  # one committed step per global batch, not per micro-batch
