"""End to end: real worker processes train a tiny MLX model over a real TCP ring; one is SIGKILLed in
its all-reduce, a new one joins; the survivors form the next generations, redo or catch up, and finish
with bit-identical parameters and a sample ledger that shows every index exactly once per epoch.

The workers are plain processes running `worker()` below -- a minimal runtime driving
ElasticController with Ring, gather_states, send_state/recv_state, GlobalSampler and SampleLedger (not
the agent). Membership is a view file the test rewrites, standing in for gossip.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest

N, BATCH, EPOCHS = 192, 24, 2
TARGET = EPOCHS * (N // BATCH)
KILL_AT = 3


# --- the worker --------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    while True:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.01)


def worker(workdir: Path, name: str, kill_at: int) -> None:  # noqa: C901 - a runtime in one page
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_map

    from meshtrain.errors import PeerLost, WireError
    from meshtrain.ring import Ring, RingListener
    from meshtrain.train import (
        Candidate,
        GlobalSampler,
        MemberState,
        SampleLedger,
        gather_states,
        recv_state,
        send_state,
        state_digest,
    )
    from meshtrain.train import elastic as el

    listener = RingListener.bind("127.0.0.1")
    state_server = socket.create_server(("127.0.0.1", 0))
    state_server.settimeout(20)
    _write_json(workdir / f"{name}.ports", {"ring": listener.port, "state": state_server.getsockname()[1]})

    rng = np.random.default_rng(123)
    x_all = rng.standard_normal((N, 16)).astype(np.float32)
    y_all = np.argmax(x_all @ rng.standard_normal((16, 4)).astype(np.float32), axis=1)
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(16, 384), nn.ReLU(), nn.Linear(384, 384), nn.ReLU(), nn.Linear(384, 4))
    opt = optim.Adam(learning_rate=1e-3)
    opt.init(model.trainable_parameters())
    mx.eval(model.parameters(), opt.state)
    sampler, ledger = GlobalSampler(N, BATCH, seed=1), SampleLedger()
    ctl = el.ElasticController(name)
    view_version = -1
    log: list[str] = []

    def note(line: str) -> None:
        log.append(line)
        with open(workdir / f"{name}.log", "a") as f:
            f.write(f"{time.monotonic():.3f} {line}\n")

    def state() -> dict[str, Any]:
        return {"params": model.parameters(), "opt": opt.state}

    def read_view(newer: bool = False) -> tuple[Candidate, ...]:
        nonlocal view_version
        deadline = time.monotonic() + 3
        while True:
            view = _read_json(workdir / "view.json")
            if not newer or view["version"] > view_version or time.monotonic() > deadline:
                break
            time.sleep(0.01)  # the "gossip" has not declared the loss yet
        view_version = view["version"]
        gens = {
            m: _read_json(workdir / f"{m}.gen") if (workdir / f"{m}.gen").exists() else -1
            for m in view["ports"]
        }
        return tuple(
            Candidate(m, ("127.0.0.1", p["ring"]), int(gens[m])) for m, p in sorted(view["ports"].items())
        )

    def grads_of(indices: np.ndarray) -> tuple[Any, int]:
        if len(indices) == 0:
            return tree_map(mx.zeros_like, model.trainable_parameters()), 0
        x, y = mx.array(x_all[indices]), mx.array(y_all[indices])
        _, grads = nn.value_and_grad(model, lambda m: nn.losses.cross_entropy(m(x), y).mean())(model)
        mx.eval(grads)
        return grads, len(indices)

    def reduce_and_apply(ring: Any, grads: Any, weight: int, step: int) -> None:
        if step == kill_at and ctl.roster is not None and ctl.roster.size > 1:
            # SIGKILL lands while this all-reduce is streaming (a real SIGKILL, from a timer thread)
            threading.Timer(0.002, os.kill, (os.getpid(), signal.SIGKILL)).start()
        reduced = ring.allreduce_tree(grads, step=step, weight=float(weight))
        opt.update(model, reduced)
        mx.eval(model.parameters(), opt.state)

    ring: Any = None
    held: tuple[Any, int] | None = None
    first = read_view()
    while name not in {c.member for c in first}:  # a node started early waits to be in the mesh
        first = read_view(newer=True)
    queue: deque[Any] = deque(ctl.handle(el.MembershipChanged(first)))
    while ctl.step < TARGET:
        action = queue.popleft()
        gen = ctl.roster.generation if ctl.roster else -1
        note(f"step {ctl.step}: {type(action).__name__} gen {gen} {ctl.roster.members if ctl.roster else ''}")
        events: list[Any] = []
        try:
            if isinstance(action, el.FormRing):
                if ring is not None:
                    ring.close()
                ring = Ring.connect(listener, action.rank, list(action.roster.addrs), "e2e", gen, timeout=3.0)
                _write_json(workdir / f"{name}.gen", gen)  # the "gossip" publishes the formed generation
                events = [el.RingFormed(gen)]
            elif isinstance(action, el.GatherStates):
                mine = MemberState(name, ctl.step, state_digest(state(), ctl.step), action.pending)
                mine = MemberState(
                    mine.member, mine.step, mine.digest, mine.pending, action.roster.fingerprint
                )
                events = [el.StatesGathered(gen, tuple(gather_states(ring, action.roster, mine)))]
            elif isinstance(action, el.SendState):
                conn, _ = state_server.accept()
                with conn:
                    conn.settimeout(20)
                    sent = {"step": ctl.step, "sampler": sampler.state.to_dict(), "ledger": ledger.to_rows()}
                    send_state(conn, state(), {**sent, "redo_shares": ctl.redo_shares()})
                note(f"sent state to {action.to} in generation {gen}")
                events = [el.StateSent(gen, action.to)]
            elif isinstance(action, el.ReceiveState):
                port = _read_json(workdir / f"{action.source}.ports")["state"]
                with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
                    tree, meta = recv_state(conn, state())
                model.update(tree["params"])
                opt.state = tree["opt"]
                sampler.load_state(meta["sampler"])
                ledger = SampleLedger.from_rows(meta["ledger"])
                digest = state_digest(state(), meta["step"])
                note(f"received state of step {meta['step']} from {action.source} in generation {gen}")
                events = [el.StateReceived(gen, meta["step"], digest, meta["redo_shares"])]
            elif isinstance(action, el.RunStep):
                held = grads_of(sampler.slice_for(name, action.shares))
                reduce_and_apply(ring, held[0], held[1], action.step)
                ledger.record(sampler.epoch, action.step, gen, sampler.assignment(action.shares))
                sampler.advance()
                events = [el.StepCommitted(gen, action.step)]
            elif isinstance(action, el.RedoStep):
                old = sampler.assignment(action.old_shares)
                extra = sampler.reassign_orphans(action.old_shares, action.survivors)
                if action.contribute:
                    assert held is not None
                    more, n_more = grads_of(extra[name])
                    (mine_g, n_mine), total = held, held[1] + n_more
                    grads = tree_map(lambda a, b, p=n_mine, q=n_more: (a * p + b * q) / (p + q), mine_g, more)
                else:
                    grads, total = grads_of(np.empty(0, np.int64))
                log.append(
                    f"redo of step {action.step} in generation {gen}: +{len(extra.get(name, []))} orphans"
                )
                reduce_and_apply(ring, grads, total, action.step)
                whole = {m: np.concatenate([old[m], extra[m]]) for m in action.survivors}
                ledger.record(sampler.epoch, action.step, gen, whole)
                sampler.advance()
                events = [el.StepCommitted(gen, action.step)]
            elif isinstance(action, el.Pause):
                events = [el.MembershipChanged(read_view(newer=True))]
        except (PeerLost, WireError, OSError) as exc:
            note(f"generation {gen} lost: {exc}")
            events = [el.MembershipChanged(read_view(newer=True)), el.RingLost(gen, str(exc))]
        for event in events:
            queue.extend(ctl.handle(event))
    result = {"step": ctl.step, "digest": state_digest(state(), ctl.step), "ledger": ledger.to_rows()}
    _write_json(workdir / f"{name}.result", {**result, "generation": ctl.generation, "log": log})
    if ring is not None:
        ring.close()


# --- the test ----------------------------------------------------------------------------------------


def spawn(workdir: Path, name: str, kill_at: int = -1) -> subprocess.Popen[bytes]:
    code = "import sys; from pathlib import Path; from tests.test_train_e2e import worker; "
    code += "worker(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))"
    root = Path(__file__).resolve().parent.parent
    return subprocess.Popen(
        [sys.executable, "-c", code, str(workdir), name, str(kill_at)], cwd=root, stderr=subprocess.PIPE
    )


def publish_view(workdir: Path, names: list[str], version: int) -> None:
    ports = {n: _read_json(workdir / f"{n}.ports") for n in names}
    _write_json(workdir / "view.json", {"version": version, "ports": ports})


@pytest.mark.timeout(60)
def test_kill_mid_allreduce_and_join_train_exactly_once(tmp_path: Path) -> None:
    from meshtrain.train import SampleLedger

    procs = {
        "w0": spawn(tmp_path, "w0"),
        "w1": spawn(tmp_path, "w1", kill_at=KILL_AT),
        "w2": spawn(tmp_path, "w2"),
        "w3": spawn(tmp_path, "w3"),  # started now; in the mesh only once w1 is gone
    }
    try:
        publish_view(tmp_path, ["w0", "w1", "w2"], 1)
        _read_json(tmp_path / "w3.ports")
        assert procs["w1"].wait(timeout=40) == -signal.SIGKILL
        publish_view(tmp_path, ["w0", "w2", "w3"], 2)  # gossip declares w1 dead, and w3 joins
        for name in ("w0", "w2", "w3"):
            try:
                _, err = procs[name].communicate(timeout=30)
            except subprocess.TimeoutExpired:
                procs[name].kill()
                _, err = procs[name].communicate()
            logs = {
                n: (tmp_path / f"{n}.log").read_text()[-1500:]
                for n in procs
                if (tmp_path / f"{n}.log").exists()
            }
            assert procs[name].returncode == 0, (err.decode()[-3000:], logs)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = {n: json.loads((tmp_path / f"{n}.result").read_text()) for n in ("w0", "w2", "w3")}
    assert {r["step"] for r in results.values()} == {TARGET}
    assert len({r["digest"] for r in results.values()}) == 1, "replicas diverged"
    story = " | ".join(line for r in results.values() for line in r["log"])
    assert "lost" in story and "received state" in story, story
    for result in results.values():
        ledger = SampleLedger.from_rows(result["ledger"])
        for epoch in range(EPOCHS):
            ledger.check_epoch(epoch, N)
