"""WorkerCheckpoints end to end: two in-process "workers" (data-parallel replicas of a tiny model, each
with its own real on-disk store) and a real `CheckpointLeader`, messages routed through the same
dict shapes the agents carry (stdin lines one way, report-pipe messages the other)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten

from meshtrain.checkpoints.arrays import restore_rng
from meshtrain.checkpoints.leading import CheckpointLeader
from meshtrain.checkpoints.options import CheckpointOptions
from meshtrain.checkpoints.store import CheckpointStore
from meshtrain.leader.checkpoint import TOO_LATE, Abort, CheckpointPolicy, Prepare, to_wire
from meshtrain.train.leaves import assign_leaves
from meshtrain.worker.checkpointing import ENV_CHECKPOINTS, WorkerCheckpoints

RUN = "tiny"
NODES = ("a", "b")
LEADER = "a"


def options(**extra: Any) -> CheckpointOptions:
    parsed = CheckpointOptions.from_dict({"run": RUN, "checkpoint_every": "5", "keep": 2, **extra})
    assert parsed is not None
    return parsed


class Replica:
    """One worker: its model, optimizer and checkpoint duties."""

    def __init__(
        self,
        node: str,
        store: CheckpointStore,
        outbox: list[tuple[str, dict[str, Any]]],
        resume: bool = False,
    ) -> None:
        mx.random.seed(7)  # same init on every replica, as a training script does
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.opt = optim.Adam(learning_rate=1e-2)
        self.opt.init(self.model.trainable_parameters())
        mx.eval(self.model.parameters(), self.opt.state)
        self.ck = WorkerCheckpoints(
            options(resume=resume),
            node=node,
            member=node,
            report=self.route,
            store=store,
        )

        self.node, self.outbox = node, outbox
        self.progress: list[dict[str, Any]] = []

    def route(self, message: dict[str, Any]) -> None:
        """The agent's side of the report pipe: progress for the coordinator, acks for the leader."""
        if "progress" in message:
            self.progress.append(message)
        else:
            self.outbox.append((self.node, message))

    def state(self) -> dict[str, Any]:
        return {"params": self.model.parameters(), "opt": self.opt.state}


def loss_fn(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    return mx.mean((model(x) - y) ** 2)


def train_step(replicas: list[Replica], step: int) -> None:
    """One data-parallel step: the same averaged gradient everywhere; the RNG drives the data."""
    x = mx.random.normal((32, 8))  # consumes MLX's global key: resuming must restore it
    y = mx.sum(x, axis=1, keepdims=True)
    grads = [nn.value_and_grad(r.model, loss_fn)(r.model, x, y)[1] for r in replicas]
    for r, g in zip(replicas, grads, strict=True):
        r.opt.update(r.model, g)
        mx.eval(r.model.parameters(), r.opt.state)


def bits(model: nn.Module) -> dict[str, bytes]:
    flat: Any = tree_flatten(model.parameters())
    return {str(k): bytes(memoryview(v)) for k, v in flat}


async def drive(
    replicas: dict[str, Replica],
    outbox: list[tuple[str, dict[str, Any]]],
    leader: CheckpointLeader,
    start: int,
    stop: int,
    settle: bool = True,
) -> None:
    """Train steps start+1..stop; after each: boundaries, deliver, ack, progress (the agents' job).
    With `settle`, each boundary waits for the background writes it started (their acks are then
    in the outbox, as a synchronous write's were); without, training runs on while they write."""
    for step in range(start + 1, stop + 1):
        train_step(list(replicas.values()), step)
        for r in replicas.values():
            r.ck.at_boundary(
                step, r.state, {"epoch": 0, "cursor": step * 32, "carry": [], "metrics": {"loss": 0.5}}
            )
        if settle:
            for r in replicas.values():
                assert r.ck.wait(60)
        for _ in range(3):
            await asyncio.sleep(0)  # the leader's send tasks run
        while outbox:
            node, report = outbox.pop(0)
            assert report["k"] == "ckpt" and report["to"] == LEADER
            leader.on_message(report["msg"])
        leader.progress(step, list(replicas))
        for _ in range(3):
            await asyncio.sleep(0)


def make_leader(
    replicas: dict[str, Replica], term: int = 1, last_step: int = 0
) -> tuple[CheckpointLeader, list[int]]:
    committed: list[int] = []

    async def send(node: str, wire: dict[str, Any]) -> None:
        replicas[node].ck.on_message(wire)

    leader = CheckpointLeader(
        RUN,
        term,
        LEADER,
        CheckpointPolicy.parse("5"),
        send=send,
        on_commit=lambda run, step, manifest: committed.append(step),
        nodes=list(replicas),
        replicas=1,
        last_step=last_step,
    )
    return leader, committed


async def resume_and_train(stores: dict[str, CheckpointStore], newest: int) -> dict[str, bytes]:
    """Both replicas resume from the newest complete checkpoint (step `newest`) and train to 23."""
    outbox: list[tuple[str, dict[str, Any]]] = []
    replicas = {n: Replica(n, stores[n], outbox, resume=True) for n in NODES}
    mx.random.seed(999)  # a different key: only the checkpoint's RNG may make this match
    step = 0
    for r in replicas.values():
        found = r.ck.resume()
        assert found is not None
        tree, meta, step = found
        assert step == newest and meta["cursor"] == newest * 32 and meta["metrics"] == {"loss": 0.5}
        # as the worker does: leaf by leaf into its own trees (meshtrain.train.leaves)
        r.model.update(assign_leaves(r.model.parameters(), tree["params"]))
        r.opt.init(r.model.trainable_parameters())
        assign_leaves(r.opt.state, tree["opt"])
        restore_rng(meta["rng"])
    leader, _ = make_leader(replicas, term=2, last_step=step)
    await drive(replicas, outbox, leader, step, 23)
    await leader.close()
    return bits(replicas["b"].model)


def test_two_workers_checkpoint_and_a_resume_is_bitwise_equal(tmp_path: Path) -> None:
    stores = {n: CheckpointStore(tmp_path / n) for n in NODES}

    async def uninterrupted() -> tuple[dict[str, bytes], list[int]]:
        outbox: list[tuple[str, dict[str, Any]]] = []
        replicas = {n: Replica(n, stores[n], outbox) for n in NODES}
        mx.random.seed(123)
        leader, committed = make_leader(replicas)
        await drive(replicas, outbox, leader, 0, 23)
        await leader.close()
        return bits(replicas["a"].model), committed

    final, committed = asyncio.run(uninterrupted())
    assert len(committed) >= 3, committed
    for n in NODES:  # both writers hold every committed checkpoint; --keep 2 pruned the rest
        assert [i.step for i in stores[n].checkpoints(RUN)] == committed[-2:]
        assert not [p for p in (tmp_path / n / RUN).iterdir() if p.name.startswith(".")]
    newest = committed[-1]
    fresh = WorkerCheckpoints(options(), node="a", member="a", report=lambda m: None, store=stores["a"])
    joiner = WorkerCheckpoints(
        options(resume=True), node="a", member="a~1", report=lambda m: None, store=stores["a"], joiner=True
    )
    assert fresh.resume() is None and joiner.resume() is None  # only --resume, and never a joiner

    assert asyncio.run(resume_and_train(stores, newest)) == final


def test_a_resume_is_bitwise_equal_when_training_ran_on_while_the_parts_were_written(tmp_path: Path) -> None:
    """The same run with the writes in the background (no boundary waits for them): each checkpoint
    holds its boundary's state although the replicas trained on meanwhile, so resuming matches."""
    stores = {n: CheckpointStore(tmp_path / n) for n in NODES}

    async def uninterrupted() -> tuple[dict[str, bytes], list[int]]:
        outbox: list[tuple[str, dict[str, Any]]] = []
        replicas = {n: Replica(n, stores[n], outbox) for n in NODES}
        mx.random.seed(123)
        leader, committed = make_leader(replicas)
        await drive(replicas, outbox, leader, 0, 23, settle=False)
        for r in replicas.values():  # the job ends: a part still being written is finished ...
            assert await asyncio.to_thread(r.ck.wait, 60)
        while outbox:  # ... and acknowledged; the leader commits; close applies the Commit
            leader.on_message(outbox.pop(0)[1]["msg"])
        for _ in range(3):
            await asyncio.sleep(0)
        for r in replicas.values():
            await asyncio.to_thread(r.ck.close, 5.0)
        await leader.close()
        return bits(replicas["a"].model), committed

    final, committed = asyncio.run(uninterrupted())
    assert committed, "no checkpoint completed"
    for n in NODES:
        assert [i.step for i in stores[n].checkpoints(RUN)][-1] == committed[-1]
    assert asyncio.run(resume_and_train(stores, committed[-1])) == final


def test_no_checkpointing_unless_asked_and_the_agents_store_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert WorkerCheckpoints.create({}, node="a", member="a", report=lambda m: None) is None
    assert WorkerCheckpoints.create({"keep": 3}, node="a", member="a", report=lambda m: None) is None
    monkeypatch.setenv(ENV_CHECKPOINTS, str(tmp_path / "node-a"))
    ck = WorkerCheckpoints.create({"resume": True, "run": RUN}, node="a", member="a~1", report=lambda m: None)
    assert ck is not None and ck.store.root == tmp_path / "node-a" and ck.options.policy is None
    assert ck.resume() is None  # nothing stored yet: the mesh starts fresh


def test_a_prepare_that_arrives_late_fails_and_the_leader_aims_further(tmp_path: Path) -> None:
    async def go() -> None:
        outbox: list[tuple[str, dict[str, Any]]] = []
        replicas = {n: Replica(n, CheckpointStore(tmp_path / n), outbox) for n in NODES}
        leader, committed = make_leader(replicas)
        for r in replicas.values():  # the workers have run ahead: at step 9 already
            r.ck.at_boundary(9, r.state, {})
        replicas["a"].ck.on_message(to_wire(Prepare(RUN, 1, LEADER, 3, NODES)))
        replicas["a"].ck.at_boundary(10, replicas["a"].state, {})
        node, report = outbox.pop(0)
        assert report["msg"]["type"] == "failed" and report["msg"]["reason"] == TOO_LATE
        leader.progress(9, NODES)  # a real round at 10 ...
        await asyncio.sleep(0)
        leader.on_message(report["msg"])  # ... is not the stale one: ignored
        assert leader.coordinator.round is not None
        await leader.close()

    asyncio.run(go())


def test_a_new_leaders_abort_removes_a_written_uncommitted_part(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "a")
    outbox: list[tuple[str, dict[str, Any]]] = []
    r = Replica("a", store, outbox)
    r.ck.on_message(to_wire(Prepare(RUN, 1, LEADER, 4, ("a",))))
    r.ck.at_boundary(4, r.state, {"cursor": 1})
    assert r.ck.wait(60)  # the part is written in the background; its ack follows
    assert outbox[-1][1]["msg"]["type"] == "written"
    assert (tmp_path / "a" / RUN / "4" / "part.json").exists()
    assert store.checkpoints(RUN) == []  # written is not committed
    # the leader died before its Commit; its successor's first word is Abort(term 2, every older step)
    r.ck.on_message(to_wire(Abort(RUN, 2, None, "new leader")))
    r.ck.at_boundary(5, r.state, {})
    assert not (tmp_path / "a" / RUN / "4").exists()
    # the dead leader's late Commit changes nothing
    r.ck.on_message({"type": "commit", "run": RUN, "term": 1, "step": 4, "manifest": {}})
    r.ck.on_message({"type": "nonsense"})  # and a malformed line is dropped, not raised
    r.ck.at_boundary(6, r.state, {})
    assert store.checkpoints(RUN) == []


def test_a_failed_write_fails_the_round_and_training_goes_on(tmp_path: Path) -> None:
    outbox: list[tuple[str, dict[str, Any]]] = []
    r = Replica("a", CheckpointStore(tmp_path / "a"), outbox)

    def broken() -> dict[str, Any]:
        raise KeyError("params")

    r.ck.on_message(to_wire(Prepare(RUN, 1, LEADER, 2, ("a",))))
    r.ck.at_boundary(2, broken, {})
    msg = outbox[-1][1]["msg"]
    assert msg["type"] == "failed" and "KeyError" in msg["reason"]
    assert not (tmp_path / "a" / RUN / "2").exists()


def test_messages_may_come_from_another_thread(tmp_path: Path) -> None:
    outbox: list[tuple[str, dict[str, Any]]] = []
    r = Replica("a", CheckpointStore(tmp_path / "a"), outbox)
    threads = [
        threading.Thread(target=r.ck.on_message, args=(to_wire(Prepare(RUN, 1, LEADER, s, ("a",))),))
        for s in range(1, 9)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(r.ck.inbox) == 8
    r.ck.at_boundary(8, r.state, {})
    assert not r.ck.inbox


def test_the_lowest_member_reports_progress_twice_a_second(tmp_path: Path) -> None:
    outbox: list[tuple[str, dict[str, Any]]] = []
    a, b = (Replica(n, CheckpointStore(tmp_path / n), outbox) for n in NODES)
    for step in (1, 2, 3):
        for r in (a, b):
            r.ck.at_boundary(step, r.state, {"members": ["b", "a"]})
    assert a.progress == [{"k": "ckpt", "progress": 1, "members": ["b", "a"]}]  # then rate-limited
    assert b.progress == []  # "a" speaks for the job
    a.ck._progress_sent -= 1.0  # half a second later
    a.ck.at_boundary(4, a.state, {"members": ["a", "b"]})
    assert a.progress[-1]["progress"] == 4 and outbox == []
