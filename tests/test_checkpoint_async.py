"""Asynchronous checkpoint writes: frozen at the boundary, written by a background thread, exact.

Real parts throughout: real MLX models and optimizers (eager and compiled updates), a real on-disk
`CheckpointStore`, the real protocol (the pure `CheckpointCoordinator` as the leader), a real
tmpfs that fills up, a real child process that exits with a write in flight, a real pipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import msgpack
import numpy as np
import pytest

from meshtrain.checkpoints.arrays import flatten_tree
from meshtrain.checkpoints.options import CheckpointOptions
from meshtrain.checkpoints.store import CheckpointStore
from meshtrain.leader.checkpoint import (
    Abort,
    CheckpointCoordinator,
    CheckpointPolicy,
    Prepare,
    Send,
    message_from_wire,
    to_wire,
)
from meshtrain.worker.background_writer import write_part
from meshtrain.worker.checkpointing import JOB_ENDED, WorkerCheckpoints
from meshtrain.worker.reporter import Reporter
from meshtrain.worker.snapshot import freeze

ROOT = Path(__file__).resolve().parent.parent
RUN = "async"


def options(**extra: Any) -> CheckpointOptions:
    parsed = CheckpointOptions.from_dict({"run": RUN, "checkpoint_every": "5", "keep": 3, **extra})
    assert parsed is not None
    return parsed


class Leader:
    """The real (pure) coordinator behind the report pipe: acks in, Commits/Aborts back to the worker."""

    def __init__(self, worker: list[WorkerCheckpoints], writers: tuple[str, ...] = ("a",)) -> None:
        self.coordinator = CheckpointCoordinator(
            RUN, 1, "a", CheckpointPolicy.parse("5"), now=0.0, replicas=0
        )
        self.worker = worker
        self.writers = writers
        self.acks: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def report(self, message: dict[str, Any]) -> None:
        if "progress" in message:
            return
        with self.lock:  # acks come from the writer thread
            self.acks.append(message["msg"])
            self._deliver(self.coordinator.on_message(time.monotonic(), message_from_wire(message["msg"])))

    def prepare(self, step: int) -> None:
        with self.lock:
            self.coordinator.last_step = step - 5
            self._deliver(self.coordinator.progress(time.monotonic(), step - 1, self.writers))
            assert self.coordinator.round is not None and self.coordinator.round.step == step

    def _deliver(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Send):
                self.worker[0].on_message(to_wire(a.message))


def big_state(n: int = 4096) -> tuple[dict[str, Any], optim.Optimizer]:
    """A 64 MiB float32 matrix with Adam's m and v: 192 MiB, slow enough to write to see it overlap."""
    mx.random.seed(1)
    params = {"w": mx.random.normal((n, n)), "b": mx.zeros((n,), dtype=mx.bfloat16)}
    opt = optim.Adam(learning_rate=1e-3)
    opt.init(params)
    mx.eval(params, opt.state)
    return params, opt


def raw(array: Any) -> bytes:
    """An MLX array's exact bytes, copied out."""
    view: Any = array.reshape(-1)
    return bytes(memoryview(view).cast("B"))


def host_copy(tree: Any) -> dict[str, bytes]:
    """The exact bytes of every leaf (what the checkpoint must hold)."""
    return {k: raw(v) for k, v in flatten_tree(tree).items()}


def loaded_bytes(store: CheckpointStore, step: int) -> tuple[dict[str, bytes], dict[str, bytes]]:
    from meshtrain.checkpoints.arrays import load_arrays

    directory = store.step_dir(RUN, step)
    out = []
    for name in ("params.safetensors", "optimizer.safetensors"):
        arrays = load_arrays(directory / name)
        mx.eval(list(arrays.values()))
        out.append({k: raw(v) for k, v in arrays.items()})
    return out[0], out[1]


def test_the_snapshot_keeps_the_boundarys_bytes_whatever_training_does_next(tmp_path: Path) -> None:
    """Eager and compiled optimizer updates, a[...] = v, a += v: none reaches the frozen state."""
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = optim.Adam(learning_rate=1e-1)
    opt.init(model.trainable_parameters())
    x, y = mx.random.normal((32, 8)), mx.random.normal((32, 4))
    loss_and_grad = nn.value_and_grad(model, lambda m, a, b: mx.mean((m(a) - b) ** 2))

    def eager() -> None:
        _, grads = loss_and_grad(model, x, y)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)

    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def compiled() -> mx.array:
        loss, grads = loss_and_grad(model, x, y)
        opt.update(model, grads)
        return loss

    eager()
    live = {"params": model.parameters(), "opt": opt.state}
    expected = (host_copy(live["params"]), host_copy(live["opt"]))
    snapshot = freeze(live, {"cursor": 7, "carry": [1, 2]}, 3)
    rng_at_boundary = list(snapshot.rng)
    live_meta_carry = snapshot.meta["carry"]
    for _ in range(3):
        eager()
        compiled()
        mx.eval(state)
    weight = model.layers[0].weight
    weight[0, 0] = 1234.5  # in place, as MLX spells it: the array object now holds the new value
    weight += 1.0
    opt.state["step"] += 10
    mx.random.normal((4,))  # the global key moves on
    mx.eval(model.parameters(), opt.state)
    live_meta_carry.append(3)  # our own copy: the caller's meta was deep-copied at the boundary
    assert host_copy(model.parameters()) != expected[0]  # training did change the live state

    store = CheckpointStore(tmp_path)
    write_part(store, RUN, snapshot, extra={"term": 1, "meta": {"cursor": 7}, "member": "a"})
    assert loaded_bytes(store, 3) == expected
    saved = json.loads((store.step_dir(RUN, 3) / "state.json").read_text())
    assert saved["rng"] == rng_at_boundary and saved["cursor"] == 7


def test_the_background_part_is_the_stores_part(tmp_path: Path) -> None:
    """Same files, same state.json, same arrays and dtypes as CheckpointStore.write_part; it commits,
    verifies (sha256 of what was written) and loads like one."""
    params = {
        "w": mx.random.normal((33, 7)),
        "t": mx.random.normal((7, 33)).T,  # not row-contiguous: frozen as a row-major copy
        "h": mx.ones((5,), dtype=mx.float16),
        "bf": mx.arange(9).astype(mx.bfloat16),
        "i": mx.array([1, -2, 3], dtype=mx.int32),
        "mask": mx.array([True, False]),
        "blocks": [{"w": mx.ones((2, 2))}, {}],
    }
    opt = {"step": mx.array(4, dtype=mx.uint64), "lr": mx.array(0.5)}
    mx.eval(params, opt)
    meta = {"cursor": {"epoch": 1, "index": 64}, "generation": 3, "metrics": {"loss": 0.25}}
    theirs, ours = CheckpointStore(tmp_path / "store"), CheckpointStore(tmp_path / "ours")
    snapshot = freeze({"params": params, "opt": opt}, meta, 12)
    extra = {"term": 2, "meta": meta, "member": "a"}
    record = write_part(ours, RUN, snapshot, extra=extra)
    theirs.write_part(
        RUN,
        12,
        params,
        opt,
        cursor=meta["cursor"],
        generation=3,
        metrics={"loss": 0.25},
        rng=snapshot.rng,
        extra=extra,
    )
    a, b = theirs.step_dir(RUN, 12), ours.step_dir(RUN, 12)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert json.loads((a / "state.json").read_text()) == json.loads((b / "state.json").read_text())
    assert set(json.loads((b / "part.json").read_text())["files"]) == {
        "params.safetensors",
        "optimizer.safetensors",
        "state.json",
    }
    assert loaded_bytes(theirs, 12) == loaded_bytes(ours, 12)
    for name in ("params.safetensors", "optimizer.safetensors"):
        x, y = mx.load(str(a / name)), mx.load(str(b / name))
        assert isinstance(x, dict) and isinstance(y, dict)
        assert {k: (v.dtype, v.shape) for k, v in x.items()} == {k: (v.dtype, v.shape) for k, v in y.items()}
    info = ours.commit(RUN, 12, {"replicas": ["a"]})
    assert info.bytes == record["bytes"]
    ours.verify(info)
    loaded = ours.load(RUN)
    assert loaded.step == 12 and np.array_equal(np.array(loaded.params["t"]), np.array(params["t"]))


def test_training_runs_on_while_the_part_is_written_and_the_part_is_the_boundarys(tmp_path: Path) -> None:
    params, opt = big_state()
    box: list[WorkerCheckpoints] = []
    leader = Leader(box)
    ck = WorkerCheckpoints(
        options(), node="a", member="a", report=leader.report, store=CheckpointStore(tmp_path)
    )
    box.append(ck)
    leader.prepare(5)

    def state() -> dict[str, Any]:
        return {"params": params, "opt": opt.state}

    def train() -> None:
        grads = {"w": mx.ones_like(params["w"]), "b": mx.ones_like(params["b"])}
        params.update(opt.apply_gradients(grads, params))
        mx.eval(params, opt.state)

    ck.at_boundary(4, state, {"members": ["a"]})
    train()
    expected = (host_copy(params), host_copy(opt.state))
    started = time.perf_counter()
    ck.at_boundary(5, state, {"members": ["a"], "cursor": 5})
    returned = time.perf_counter() - started
    assert ck.writing == 5 and leader.acks == []  # back to training before the part is on disk
    steps_meanwhile = 0
    while ck.writing is not None:
        train()
        steps_meanwhile += 1
        ck.at_boundary(5 + steps_meanwhile, state, {"members": ["a"]})
    assert ck.wait(120)
    written_after = time.perf_counter() - started
    print(f"pause {returned * 1e3:.1f} ms, part written after {written_after:.2f} s, {steps_meanwhile} steps")
    assert steps_meanwhile >= 1
    assert ck.pauses and ck.pauses[0] < written_after / 2
    assert [m["type"] for m in leader.acks] == ["written"]
    ck.at_boundary(6 + steps_meanwhile, state, {"members": ["a"]})  # the Commit is applied here
    assert ck.committed == [5]
    assert loaded_bytes(ck.store, 5) == expected  # not the state of the steps trained meanwhile
    assert ck.store.latest(RUN) is not None and ck.store.latest(RUN).step == 5  # type: ignore[union-attr]


def test_one_write_in_flight_an_abort_cancels_it_and_the_next_prepare_waits_its_turn(tmp_path: Path) -> None:
    params, opt = big_state()
    box: list[WorkerCheckpoints] = []
    leader = Leader(box)
    ck = WorkerCheckpoints(
        options(), node="a", member="a", report=leader.report, store=CheckpointStore(tmp_path)
    )
    box.append(ck)

    def state() -> dict[str, Any]:
        return {"params": params, "opt": opt.state}

    leader.prepare(5)
    ck.at_boundary(5, state, {})
    assert ck.writing == 5
    # the round is aborted (it timed out, say) while our part is being written ...
    with leader.lock:
        leader._deliver(leader.coordinator.poll(float("inf")))
    # ... and the leader's next round names the very next step: it must not be refused
    leader.prepare(6)
    ck.at_boundary(6, state, {})
    assert ck.wait(120)
    ck.at_boundary(7, state, {})
    acks = [(m["type"], m["step"]) for m in leader.acks]
    print("acks:", acks)  # [("written", 6)]: step 5's write was cancelled (unless it had just ended)
    assert (
        acks[-1] == ("written", 6)
        and ("written", 5) not in acks[:-1]
        or acks == [("written", 5), ("written", 6)]
    )
    assert ck.committed == [6] and ck.failures == []
    assert not ck.store.step_dir(RUN, 5).exists()  # the cancelled part left nothing behind
    assert [i.step for i in ck.store.checkpoints(RUN)] == [6]
    assert not [p for p in (tmp_path / RUN).rglob(".tmp-*")]


def test_close_finishes_the_write_in_flight_and_applies_the_commit(tmp_path: Path) -> None:
    params, opt = big_state()
    box: list[WorkerCheckpoints] = []
    leader = Leader(box)
    ck = WorkerCheckpoints(
        options(), node="a", member="a", report=leader.report, store=CheckpointStore(tmp_path)
    )
    box.append(ck)
    leader.prepare(5)
    ck.at_boundary(5, lambda: {"params": params, "opt": opt.state}, {})
    assert ck.writing == 5
    ck.close()  # the job ended at step 5: its part is finished, acked, and its Commit applied
    assert ck.writing is None and ck.committed == [5]
    assert [i.step for i in ck.store.checkpoints(RUN)] == [5]


def test_close_without_a_verdict_leaves_a_whole_uncommitted_part(tmp_path: Path) -> None:
    sent: list[dict[str, Any]] = []
    ck = WorkerCheckpoints(
        options(),
        node="a",
        member="a",
        report=lambda m: sent.append(m) if "msg" in m else None,
        store=CheckpointStore(tmp_path),
    )
    params, opt = big_state()
    ck.on_message(to_wire(Prepare(RUN, 1, "a", 5, ("a",))))
    ck.at_boundary(5, lambda: {"params": params, "opt": opt.state}, {})
    started = time.monotonic()
    ck.close(verdict_s=0.3)  # the leader never answers (it died): close gives up after 0.3 s
    assert time.monotonic() - started >= 0.3
    assert [(s["msg"]["type"], s["msg"]["step"]) for s in sent] == [("written", 5)]
    assert (ck.store.step_dir(RUN, 5) / "part.json").exists() and ck.store.checkpoints(RUN) == []


def test_close_fails_the_parts_still_owed_so_the_leader_aborts_at_once(tmp_path: Path) -> None:
    sent: list[dict[str, Any]] = []
    ck = WorkerCheckpoints(
        options(),
        node="a",
        member="a",
        report=lambda m: sent.append(m) if "msg" in m else None,
        store=CheckpointStore(tmp_path),
    )
    ck.at_boundary(5, lambda: {}, {})
    ck.on_message(to_wire(Prepare(RUN, 2, "b", 9, ("a",))))  # a round for a step this job never reaches
    ck.close()
    assert [(s["to"], s["msg"]["type"], s["msg"]["step"], s["msg"]["reason"]) for s in sent] == [
        ("b", "failed", 9, JOB_ENDED)
    ]


def test_a_new_leaders_abort_during_the_write_cancels_it_without_a_false_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sent: list[dict[str, Any]] = []
    store = CheckpointStore(tmp_path)
    ck = WorkerCheckpoints(
        options(), node="a", member="a", report=lambda m: sent.append(m) if "msg" in m else None, store=store
    )
    params, opt = big_state()
    ck.on_message(to_wire(Prepare(RUN, 1, "a", 5, ("a",))))
    ck.at_boundary(5, lambda: {"params": params, "opt": opt.state}, {})
    assert ck.writing == 5
    # the leader died; its successor's first word drops every older term's part and sweeps the store,
    # which must not pull the directory from under the write (it is cancelled and cleans up itself)
    ck.on_message(to_wire(Abort(RUN, 2, None, "new leader")))
    ck.at_boundary(6, lambda: {"params": params, "opt": opt.state}, {})
    assert ck.wait(120)
    assert [m["msg"]["type"] for m in sent] in ([], ["written"])  # written only if it had just ended
    assert ck.failures == [] and "not written" not in capsys.readouterr().err
    assert not store.step_dir(RUN, 5).exists()


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_in_the_background_fails_that_round_only(
    small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    box: list[WorkerCheckpoints] = []
    leader = Leader(box)
    store = CheckpointStore(small_disk)
    ck = WorkerCheckpoints(options(), node="a", member="a", report=leader.report, store=store)
    box.append(ck)
    small = {"w": mx.ones((64, 64))}
    leader.prepare(5)
    ck.at_boundary(5, lambda: {"params": small, "opt": {}}, {})
    assert ck.wait(60)
    ck.at_boundary(6, lambda: {"params": small, "opt": {}}, {})
    assert ck.committed == [5]
    huge = {"w": mx.ones((1024, 1024))}  # 4 MiB: does not fit in what is left
    mx.eval(huge)
    leader.prepare(10)
    ck.at_boundary(10, lambda: {"params": huge, "opt": {}}, {})
    assert ck.wait(60)
    ck.at_boundary(11, lambda: {"params": huge, "opt": {}}, {})  # training goes on
    assert [m["type"] for m in leader.acks] == ["written", "failed"]
    assert "no space left" in leader.acks[-1]["reason"]
    assert leader.coordinator.round is None  # the round was aborted, the leader can start the next
    assert not store.step_dir(RUN, 10).exists()
    assert [i.step for i in store.checkpoints(RUN)] == [5]
    store.verify(store.find(RUN, 5))
    err = capsys.readouterr().err
    assert err.count("not written") == 1 and "no space left on the device of" in err


CHILD = """
import sys, mlx.core as mx, mlx.optimizers as optim
from meshtrain.checkpoints.options import CheckpointOptions
from meshtrain.checkpoints.store import CheckpointStore
from meshtrain.leader.checkpoint import Prepare, to_wire
from meshtrain.worker.checkpointing import WorkerCheckpoints
params = {"w": mx.random.normal((4096, 4096))}
opt = optim.Adam(learning_rate=1e-3)
opt.init(params)
mx.eval(params, opt.state)
options = CheckpointOptions.from_dict({"run": "async", "checkpoint_every": "5"})
store = CheckpointStore(sys.argv[1])
ck = WorkerCheckpoints(options, node="a", member="a", report=lambda m: None, store=store)
ck.on_message(to_wire(Prepare("async", 1, "a", 5, ("a",))))
ck.at_boundary(5, lambda: {"params": params, "opt": opt.state}, {})
print("WRITING" if ck.writing == 5 else "DONE", flush=True)
sys.exit(0)  # no close(): the interpreter still lets the write finish
"""


def test_a_process_that_exits_mid_write_still_leaves_a_whole_part(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "WRITING"
    directory = tmp_path / RUN / "5"
    record = json.loads((directory / "part.json").read_text())
    for name, entry in record["files"].items():
        assert (directory / name).stat().st_size == entry["bytes"]
    assert not list(directory.glob(".tmp-*"))
    info = CheckpointStore(tmp_path).commit(RUN, 5)
    CheckpointStore(tmp_path).verify(info)


def test_the_writer_threads_acks_and_the_training_threads_reports_share_the_pipe(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    reporter = Reporter(write_fd, interval=0.0)
    received: list[Any] = []

    def reader() -> None:
        unpacker = msgpack.Unpacker(raw=False)
        with os.fdopen(read_fd, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                unpacker.feed(chunk)
                received.extend(unpacker)

    thread = threading.Thread(target=reader)
    thread.start()

    def send_acks() -> None:
        for i in range(2000):
            reporter.send({"k": "ckpt", "n": i})

    acks = threading.Thread(target=send_acks)
    acks.start()
    for i in range(20000):
        reporter.report({"step": i, "pad": "x" * 50})
    acks.join()
    reporter.close()
    os.close(write_fd)
    thread.join(30)
    assert [m["n"] for m in received if m.get("k") == "ckpt"] == list(range(2000))
    steps = [entry[1]["step"] for m in received if m.get("k") == "m" for entry in m["batch"]]
    assert steps == list(range(20000))
