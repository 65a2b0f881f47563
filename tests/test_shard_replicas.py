"""`--shard-replicas`: each optimizer shard on R nodes, a lost node's shards taken over without a roll-back.

The placement and the moves after a change are pure (meshtrain.shard.replicas, hypothesis-tested
against brute force); the take-over itself runs on real local meshes (`meshtrain run --local 3`)
with a worker SIGKILLed mid-step: the job goes on, every sample once per epoch, every replica
bit-identical -- and, where no node came back before the end, bit-identical to unsharded elastic
data parallelism under the same loss.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrain.errors import UserError
from meshtrain.shard import replicas
from meshtrain.shard.plan import plan_shards
from tests.test_elastic_agents import ledger_steps
from tests.test_shard_local import max_diff
from tests.test_shard_local import results as results_of_ranks

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "tests/scripts/sharded_train.py"
SAMPLES = 256  # the script's data set


def test_the_default_is_two_copies_at_stage_1_on_three_nodes_or_more() -> None:
    assert replicas.resolve(None, 1, 3) == 2 and replicas.resolve(None, 1, 8) == 2
    assert replicas.resolve(None, 1, 2) == 1  # a backup on the other node would be the whole state
    assert replicas.resolve(None, 2, 4) == 1 and replicas.resolve(None, 3, 4) == 1
    assert replicas.resolve(3, 1, 2) == 2  # at most every node
    with pytest.raises(UserError, match="stage 1 only"):
        replicas.resolve(2, 2, 4)
    with pytest.raises(UserError, match=">= 1"):
        replicas.resolve(0, 1, 4)


def test_member_r_holds_its_shard_and_the_backups_of_the_ones_before_it() -> None:
    assert replicas.held_shards(0, 4, 2) == [0, 3]
    assert replicas.holders(3, 4, 2) == [3, 0]
    assert replicas.held_shards(1, 3, 3) == [1, 0, 2]


@settings(max_examples=300, deadline=None)
@given(
    leaves=st.lists(st.integers(1, 50), min_size=1, max_size=12),
    size=st.integers(2, 6),
    r=st.integers(1, 3),
    lost_mask=st.lists(st.booleans(), min_size=6, max_size=6),
    joiners=st.integers(0, 2),
)
def test_after_the_moves_every_holder_of_the_new_plan_has_its_leaves(
    leaves: list[int], size: int, r: int, lost_mask: list[bool], joiners: int
) -> None:
    members = [f"m{i}" for i in range(size)]
    old = plan_shards(leaves, members, [1 << 30] * size, stage=1, state_bytes=8.0)
    alive = [m for m, lost in zip(members, lost_mask, strict=False) if not lost]
    now = alive + [f"j{i}" for i in range(joiners)]
    if not alive or not now:
        return
    new = plan_shards(leaves, now, [1 << 30] * len(now), stage=1, state_bytes=8.0)
    # brute force: a shard is lost when none of the R members from its owner on survived
    gone = [
        members[k]
        for k in range(size)
        if old.leaf_ranges[k][0] < old.leaf_ranges[k][1]
        and all(members[(k + j) % size] not in alive for j in range(min(r, size)))
    ]
    if gone:
        with pytest.raises(replicas.ShardsLost, match="every node holding a copy"):
            replicas.moves(old, new, r)
        return
    held = {m: replicas.held_leaves(old, m, r) if m in members else set() for m in now}
    for move in replicas.moves(old, new, r):
        assert move.leaf in held[move.source]
        assert move.targets and all(move.leaf not in held[t] for t in move.targets)
        for t in move.targets:
            held[t].add(move.leaf)
    for m in now:
        assert replicas.held_leaves(new, m, r) <= held[m], m


def run(home: Path, out: Path, ledger: Path, stage: int, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "meshtrain", "run", "--local", "3", "--shares", "equal"]
    cmd += ["--ledger", str(ledger), SCRIPT, "--out", str(out), "--stage", str(stage), *extra]
    env = {**os.environ, "MESHTRAIN_HOME": str(home), "MESHTRAIN_FAULT": "node2:3:forward"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)


def check_once(steps: dict[tuple[int, int], dict[str, list[int]]], complete_epochs: int) -> None:
    for epoch in {e for e, _ in steps}:
        seen = Counter(i for (e, _), sl in steps.items() if e == epoch for v in sl.values() for i in v)
        assert max(seen.values()) == 1, f"epoch {epoch}: repeated {[i for i, c in seen.items() if c > 1]}"
        if epoch < complete_epochs:
            assert sorted(seen) == list(range(SAMPLES)), f"epoch {epoch}: missing samples"


def results(out: Path) -> list[tuple[dict[str, np.ndarray], dict]]:  # type: ignore[type-arg]
    """Every worker's final parameters and figures, however many finished (a joiner's too)."""
    return results_of_ranks(out, len(list(out.glob("result-*.npz"))))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", ["mid-step", "between-steps"])
def test_a_node_killed_mid_step_is_taken_over_and_a_joiner_gets_its_shards(
    tmp_path: Path, where: str
) -> None:
    """node2's worker SIGKILLed in step 3's forward: the two survivors re-plan from the copies and go
    on; its agent starts a new worker, which joins and is handed its shards. 48 steps (3 epochs of
    16), slowed down so the joiner is in well before the end. The joiner's view comes mid-step (it
    adds zeros to that step's reduction and takes part in its all-gather with an empty shard) or
    at a step boundary (it receives the parameters there), as the steps sleep."""
    ledger = tmp_path / "ledger"
    slow = ["--step-sleep", "0.05"] + (["--sleep-between"] if where == "between-steps" else [])
    proc = run(tmp_path, tmp_path / "o", ledger, 1, "--steps", "48", *slow)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "node2 left: the optimizer shards re-planned over 2 nodes" in log, log[-3000:]
    assert "node2~1 joined: the optimizer shards re-planned over 3 nodes" in log, log[-3000:]
    assert "rollback" not in log and "roll-back 1" not in log
    check_once(ledger_steps(ledger), complete_epochs=2)
    got = results(tmp_path / "o")
    assert len(got) == 3 and {m["size"] for _, m in got} == {3}
    assert all(m["plan_members"] == ["node1", "node3", "node2~1"] for _, m in got), [m for _, m in got]
    first = got[0][0]
    assert all(max_diff(first, params) == 0.0 for params, _ in got[1:])  # the joiner's too


@pytest.mark.timeout(300)
def test_the_take_over_trains_as_unsharded_elastic_data_parallelism(tmp_path: Path) -> None:
    """The same kill at stage 0 and at stage 1 (fp32 wire): the lost slice carried alike, the same
    survivors' mean; where no new worker came in before the end in both runs (the usual case: 8
    steps end before one starts), the parameters are bit-identical."""
    runs = {}
    for stage in (0, 1):
        ledger = tmp_path / f"ledger{stage}"
        # 10 ms of compute a step: the kill, 2 ms into step 3's forward, lands there in both runs
        proc = run(tmp_path, tmp_path / f"o{stage}", ledger, stage, "--steps", "8", "--step-sleep", "0.01")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        steps = ledger_steps(ledger)
        check_once(steps, complete_epochs=0)
        runs[stage] = (steps, results(tmp_path / f"o{stage}"))
    assert "node2 left: the optimizer shards re-planned over 2 nodes" in proc.stdout + proc.stderr
    (steps0, got0), (steps1, got1) = runs[0], runs[1]
    assert all(max_diff(got1[0][0], p) == 0.0 for p, _ in got1[1:])
    if steps0 != steps1:
        pytest.skip("a new worker joined in one run and not the other: the steps differ, nothing to compare")
    assert max_diff(got0[0][0], got1[0][0]) == 0.0


@pytest.mark.timeout(300)
def test_a_taken_over_job_checkpoints_under_its_new_plan_and_the_export_is_exact(tmp_path: Path) -> None:
    """Checkpoints every 2 steps, node2 killed in step 5: no roll-back, and the newest checkpoint,
    written by the survivors (and any joiner) under the re-planned shards, exports the parameters
    rank 0 held at that step bit for bit. (Before the checkpoint leader learnt that a node's worker
    was replaced, the round prepared for the killed worker waited out its 120 s ack timeout and no
    checkpoint of this job was ever written.)"""
    cmd = [sys.executable, "-m", "meshtrain", "run", "--local", "3", "--shares", "equal"]
    cmd += ["--name", "rr", "--checkpoint-every", "2", "--keep", "10", "tests/scripts/sharded_resume.py"]
    cmd += ["--out", str(tmp_path / "o"), "--stage", "1", "--steps", "12", "--sleep", "0.3"]
    cmd += ["--forward-sleep", "0.02"]  # the kill, 2 ms into the forward, lands there (not in the gather)
    env = {**os.environ, "MESHTRAIN_HOME": str(tmp_path), "MESHTRAIN_FAULT": "node2:5:forward"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "node2 left: the optimizer shards re-planned over 2 nodes" in log and "rolling back" not in log
    export = [sys.executable, "-m", "meshtrain", "export", "rr", str(tmp_path / "model.safetensors")]
    exported = subprocess.run(export, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert exported.returncode == 0, exported.stderr[-2000:]
    step = int(exported.stdout.strip().rsplit("step ", 1)[1])
    assert step >= 6, exported.stdout  # written after the take-over
    import mlx.core as mx

    got = {k: np.array(v) for k, v in mx.load(str(tmp_path / "model.safetensors")).items()}
    want = dict(np.load(tmp_path / "o" / f"params-{step}.npz"))
    assert max_diff(got, want) == 0.0
