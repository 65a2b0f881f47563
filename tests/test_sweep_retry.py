"""A sweep trial whose node is lost runs again on another node, from its newest checkpoint.

The decision (outcome.py) is unit-tested; the drill runs three real agents
(`meshtrain join` processes), a sweep of three trials from agent a, and
SIGKILLs node b (its agent and its worker) once the trial there has a
checkpoint replicated to a: the trial is retried on a live node, its new run
starts from that checkpoint (the script reports ``mesh.resumed_from``), the
sweep completes every trial, exports the best model, and its live table says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from meshtrain.errors import UserError
from meshtrain.sweep.outcome import LOST, decide, node_lost, recorded
from meshtrain.testing.agents import worker_pids_under

pytest.importorskip("optuna")

SCRIPT = textwrap.dedent(
    """
    import argparse, time
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import meshtrain

    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--sleep", type=float, default=0.1)
    p.add_argument("--fail", action="store_true")
    a = p.parse_args()
    mesh = meshtrain.init()
    model = nn.Linear(1, 1, bias=False)
    model.weight = mx.zeros((1, 1))
    opt = optim.SGD(learning_rate=a.lr)
    mesh.register(model, opt)  # what the checkpoints hold
    x, y = mx.ones((1, 1)), mx.full((1, 1), 3.0)
    grad_fn = nn.value_and_grad(model, lambda m: ((m(x) - y) ** 2).mean())
    for epoch in range(a.epochs):
        for idx in mesh.batches(5, 1, epoch=epoch):  # epochs a resumed run has done yield nothing
            loss, grads = grad_fn(model)
            grads = mesh.allreduce(grads, weight=len(idx))
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)
            time.sleep(a.sleep)
        if a.fail:
            raise RuntimeError("the script's own mistake")
        w = model.weight.item()
        resumed = -1 if mesh.resumed_from is None else mesh.resumed_from
        mesh.report(step=mesh.step, loss=0.1 + (w - 3.0) ** 2, val_loss=0.1 + (w - 3.0) ** 2, resumed=resumed)
    mesh.close()
    """
)


def test_which_endings_are_retried() -> None:
    lost = f"{LOST}; the last, b (rank 0): its node left the mesh"
    assert node_lost("failed", lost) and not node_lost("failed", "b (rank 0) failed: ValueError: x")
    assert decide("failed", lost, pruned=False, value=None, retries=0) == "retry"
    assert decide("failed", lost, pruned=False, value=None, retries=1) == "retry"
    assert decide("failed", lost, pruned=False, value=None, retries=2) == "fail"  # at most 2 retries
    raised = "b (rank 0) failed: RuntimeError: boom"  # the script's own exception: not retried
    assert decide("failed", raised, pruned=False, value=None, retries=0) == "fail"
    assert decide("failed", "b (rank 0) exited with code 3", pruned=False, value=None, retries=0) == "fail"
    assert decide("done", None, pruned=False, value=0.5, retries=1) == "complete"
    assert decide("done", None, pruned=False, value=None, retries=0) == "unreported"
    assert decide("cancelled", "pruned by the sweep", pruned=True, value=None, retries=0) == "pruned"
    assert decide("cancelled", "cancelled by the user", pruned=False, value=None, retries=0) == "fail"
    # the same verdicts read back from a run record (sweep --resume)
    assert recorded("done", None, 0.3) == "complete" and recorded("done", None, None) == "fail"
    assert recorded("cancelled", "pruned by the sweep", None) == "pruned"
    assert recorded("failed", "b (rank 0) failed: RuntimeError: boom", None) == "fail"
    for state, reason in (("failed", lost), ("cancelled", "the submitter went away"), ("running", None)):
        assert recorded(state, reason, None) == "unfinished"


class GoneJob:
    """A trial's job whose nodes are gone: it never ends by itself."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @property
    def run_id(self) -> str | None:
        return "j0b1"

    def cancel(self, reason: str) -> None:
        self.calls.append(f"cancel: {reason}")

    def abandon(self) -> None:
        self.calls.append("abandon")

    async def wait(self) -> tuple[str, str | None]:
        await asyncio.Event().wait()
        return "running", None


class GoneLauncher:
    """Only node a is left; the mesh-wide cancel is recorded, or refused."""

    nodes = ["a", "b"]

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.cancelled: list[tuple[str, str]] = []

    async def live_nodes(self) -> list[str]:
        return ["a"]

    async def mesh_cancel(self, job: str, reason: str) -> str:
        if self.refuse:
            raise UserError(f"no job {job} in the mesh (`meshtrain jobs` lists them)")
        self.cancelled.append((job, reason))
        return f"cancelling job {job}"


@pytest.mark.parametrize("refuse", [False, True])
def test_a_trial_given_up_on_lost_nodes_is_cancelled_in_the_mesh(
    refuse: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from meshtrain.sweep.driver import LOST_GRACE_S, Sweep, TrialRecord

    now = [0.0]
    sweep = Sweep("s1", [], [], "loss", "minimize", 1, clock=lambda: now[0], on_event=lambda _: None)
    launcher, job = GoneLauncher(refuse), GoneJob()

    async def go() -> Sequence[tuple[object, str, str]]:
        task = asyncio.ensure_future(job.wait())
        running = {task: (None, TrialRecord(0, {}, ["b"]), job)}
        assert await sweep._watch_nodes(launcher, running, set()) == []  # type: ignore[arg-type]
        now[0] = LOST_GRACE_S + 0.1
        lost = await sweep._watch_nodes(launcher, running, set())  # type: ignore[arg-type]
        await sweep.cancels_sent()
        return lost

    with caplog.at_level(logging.INFO, logger="meshtrain.sweep"):
        lost = asyncio.run(go())
    assert len(lost) == 1 and lost[0][1] == "failed" and LOST in lost[0][2], lost
    assert job.calls == ["cancel: its nodes left the mesh", "abandon"]  # its own stream, then let go
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    if refuse:  # best effort: one line, and the sweep goes on
        assert launcher.cancelled == [] and len(warnings) == 1, caplog.records
        assert "could not cancel trial 0's abandoned job j0b1: no job j0b1" in warnings[0].getMessage()
    else:
        assert launcher.cancelled == [("j0b1", "its nodes left the mesh (by the sweep)")] and not warnings


def test_the_mesh_cancel_of_an_agent_launcher_goes_to_its_socket(tmp_path: Path) -> None:
    from meshtrain.sweep.driver import mesh_cancel

    class NoAgent:  # AgentLauncher's shape: this machine's agent, at a socket nobody listens on
        nodes: list[str] = []
        socket = tmp_path / "agent.sock"

    with pytest.raises(OSError):
        asyncio.run(mesh_cancel(NoAgent(), "j0b1", "its nodes left the mesh"))  # type: ignore[arg-type]
    assert asyncio.run(mesh_cancel(object(), "j0b1", "x")) is None  # type: ignore[arg-type]  # --local


def worker_pids(proc: subprocess.Popen[str]) -> list[int]:
    return worker_pids_under(proc.pid)


def has_checkpoint(store: Path, run: str) -> bool:
    return any((store / run).glob("*/manifest.json"))


@pytest.mark.timeout(120)
def test_a_trial_on_a_lost_node_is_retried_from_its_checkpoint(tmp_path: Path) -> None:
    from meshtrain.testing.agents import AgentProcess, alive_names, meshtrain_cmd, wait_for
    from meshtrain.tracking.store import RunStore

    (tmp_path / "train.py").write_text(SCRIPT)
    a = AgentProcess(tmp_path / "a", "a")
    b = AgentProcess(tmp_path / "b", "b", token=a.token)
    c = AgentProcess(tmp_path / "c", "c", token=a.token)
    sweep: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: alive_names(a.home) == {"a", "b", "c"}, timeout=30)
        cmd = meshtrain_cmd(
            "sweep", str(tmp_path / "train.py"), "--param", "lr=choice:0.05", "--trials", "3",
            "--name", "drill", "--checkpoint-every", "3", "--args", "--epochs 8 --sleep 0.15",
        )  # fmt: skip
        env = {**os.environ, "MESHTRAIN_HOME": str(a.home), "COLUMNS": "150"}
        sweep = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # trial 1 runs on b (groups in name order); its checkpoints are replicated to a and c
        wait_for(lambda: has_checkpoint(a.home / "checkpoints", "drill-t1"), timeout=40)
        for pid in [b.proc.pid, *worker_pids(b.proc)]:  # the whole node, at once
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        stdout, stderr = sweep.communicate(timeout=80)
        took = time.monotonic() - killed
    finally:
        if sweep is not None and sweep.poll() is None:
            sweep.kill()
        for agent in (c, b, a):
            agent.stop()
    assert sweep.returncode == 0, stdout + stderr
    assert "trial 1 lost its node (every worker was lost" in stdout and "retry 1/2" in stdout, stdout
    assert "trial 1 on " in stdout.split("retry 1/2")[1] and "from its newest checkpoint" in stdout, stdout
    assert "failed" not in stdout.split("┏")[-1], stdout  # every trial completed in the summary
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("best model: ") and "checkpoint step" in last, last
    path = Path(last.removeprefix("best model: ").split(" (trial")[0])
    from safetensors.numpy import load_file

    assert path.is_file() and load_file(str(path))["weight"].shape == (1, 1)
    store = RunStore(a.home / "runs.sqlite")
    attempts = [r for r in store.runs(sweep="drill") if r.name == "drill-t1"]
    # the lost attempt is never closed by its coordinator (it waits for its node: a partition looks the
    # same); the retry is a run of its own, done
    assert len(attempts) == 2 and attempts[0].state != "done" and attempts[1].state == "done", attempts
    resumed = store.final_metrics(attempts[1].id)["resumed"]
    assert resumed >= 3, resumed  # the retry continued from a checkpoint, not from step 0
    assert "c" in attempts[1].options["nodes"] or "a" in attempts[1].options["nodes"]
    table = json.loads((a.home / "sweeps" / "drill.json").read_text())
    assert table["state"] == "done" and len(table["trials"]) == 3
    row = next(t for t in table["trials"] if t["trial"] == 1)
    assert row["retries"] == 1 and row["state"] == "complete" and len(row["runs"]) == 2
    print(f"retried trial finished {took:.1f}s after its node was killed (resumed from step {resumed:.0f})")
