"""OuterOptimizer's overlap= arithmetic: what a sync in the background applies, and when.

The rounds object here stands in for meshtrain.worker.local_rounds (its reductions are the ring's,
tested with real agents in tests/test_local_sgd_elastic.py): it hands back a chosen mean, so the outer
step and the merge with the steps taken meanwhile are checked exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from meshtrain.checkpoints.store import CheckpointStore
from meshtrain.errors import UserError
from meshtrain.train.local_sgd import OuterOptimizer, check_overlap, outer_update


class Rounds:
    """The calls OuterOptimizer makes on a job's LocalRounds, with a scripted outcome per sync."""

    def __init__(self, outcomes: list[np.ndarray | None]) -> None:
        self.outcomes = outcomes
        self.started: list[tuple[np.ndarray, float]] = []
        self.foreground: list[tuple[np.ndarray, float]] = []
        self.broken = False
        self.joined = 0
        self.recoveries = 0
        self.last_sent_bytes = 10

    def can_overlap(self) -> bool:
        return True

    def epoch_ends(self) -> bool:
        return False

    def cut_now(self) -> bool:
        return False

    def start_sync(self, delta: np.ndarray, samples: float, wire: str, feedback: Any) -> None:
        self.started.append((delta.copy(), samples))

    def join_sync(self) -> tuple[np.ndarray, np.ndarray] | None:
        outcome = self.outcomes[self.joined]
        self.joined += 1
        self.broken = outcome is None
        return None if outcome is None else (outcome, np.zeros(6, np.float32))

    def ring_unusable(self) -> bool:
        return self.broken

    def sync(self, delta: np.ndarray, samples: float, wire: str, feedback: Any, timing: Any) -> Any:
        """A foreground sync (the members meet, the ring is formed anew): a zero mean."""
        self.foreground.append((delta.copy(), samples))
        self.broken = False
        return np.zeros_like(delta), np.zeros(6, np.float32)

    def finish(self) -> None:
        pass


class Mesh:
    size = 2

    def __init__(self, rounds: Rounds) -> None:
        self.rounds = rounds

    def local_sgd(self, outer: Any) -> Rounds:
        return self.rounds


def flat(model: nn.Module) -> np.ndarray:
    return np.concatenate([np.array(v).ravel() for _, v in tree_flatten(model.trainable_parameters())])


def nudge(model: nn.Module, amount: float) -> None:
    """One 'inner step': every parameter moves by `amount`."""
    model.update(
        {k: v + amount for k, v in model.trainable_parameters().items() if isinstance(v, mx.array)}
    )
    mx.eval(model.parameters())


def test_overlap_must_be_below_sync_every_and_a_non_negative_integer() -> None:
    check_overlap(0, 1)
    check_overlap(3, 4)
    check_overlap(9, "auto")  # capped at H - 1 once H is chosen
    check_overlap("auto", "auto")  # τ from the same probes
    with pytest.raises(UserError, match="sync_every"):
        check_overlap("auto", 8)
    for bad, every in [(4, 4), (1, 1), (-1, 4), (True, 4), (1.5, 4)]:
        with pytest.raises(UserError):
            check_overlap(bad, every)


def test_a_sync_in_the_background_applies_the_outer_step_and_keeps_the_steps_taken_meanwhile() -> None:
    mx.random.seed(0)
    model = nn.Linear(3, 2)
    mean = np.full(8, 0.25, np.float32)  # the "mesh's" averaged delta
    rounds = Rounds([mean])
    outer = OuterOptimizer(model, Mesh(rounds), sync_every=3, overlap=2, outer_lr=0.7, momentum=0.9)
    anchor0 = flat(model)
    for _ in range(3):  # H = 3 steps, then the sync starts in the background
        nudge(model, -0.1)
        outer.step(samples=4)
    assert len(rounds.started) == 1 and rounds.joined == 0
    delta, samples = rounds.started[0]
    np.testing.assert_allclose(delta, anchor0 - (anchor0 - 0.3), rtol=1e-5)
    assert samples == 12
    at_sync = flat(model)
    nudge(model, -0.1)
    outer.step(samples=4)  # 1 step after: still in flight
    assert rounds.joined == 0 and outer.syncs == 0
    nudge(model, -0.1)
    outer.step(samples=4)  # the 2nd: applied now
    assert rounds.joined == 1 and outer.syncs == 1 and outer.overlapped == 1
    velocity = np.zeros(8, np.float32)
    anchor, _ = outer_update(mx.array(anchor0), mx.array(velocity), mx.array(mean), 0.7, 0.9, True)
    expected = np.array(anchor) + (at_sync - 0.2 - at_sync)
    np.testing.assert_allclose(flat(model), expected, rtol=1e-5, atol=1e-6)
    got_anchor = np.concatenate([np.array(v).ravel() for v in outer._anchor.values()])
    np.testing.assert_allclose(got_anchor, np.array(anchor), rtol=1e-6)


def test_a_sync_the_ring_broke_under_is_merged_into_a_foreground_sync_at_once() -> None:
    model = nn.Linear(3, 2)
    rounds = Rounds([None])  # the background reduction failed: its interval merges into the open one
    outer = OuterOptimizer(model, Mesh(rounds), sync_every=2, overlap=1)
    before = flat(model)
    for _ in range(2):
        nudge(model, -0.1)
        outer.step(samples=5)
    assert len(rounds.started) == 1 and not rounds.foreground
    nudge(model, -0.1)
    outer.step(samples=5)  # joined, failed: the members meet now, with both intervals' delta and samples
    assert rounds.joined == 1 and len(rounds.foreground) == 1
    delta, samples = rounds.foreground[0]
    assert samples == 15
    np.testing.assert_allclose(delta, np.full(8, 0.3, np.float32), rtol=1e-4)
    assert outer.syncs == 1 and outer.overlapped == 0
    # a zero mean from the anchor: the model is the anchor again (the outer step of a zero delta)
    np.testing.assert_allclose(flat(model), before, rtol=1e-5, atol=1e-6)


SCRIPT = Path(__file__).parent / "scripts" / "elastic_local_sgd.py"


@pytest.mark.timeout(120)
def test_a_local_mesh_overlaps_most_syncs_and_ends_with_identical_replicas(tmp_path: Path) -> None:
    """A real 2-node job: most syncs run in the background (not the first, nor an epoch's last),
    and after the last (foreground) sync the replicas are bit-identical."""
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "meshtrain", "run", "--local", "2", str(SCRIPT), "--out", str(out)]
    cmd += ["--sync-every", "4", "--overlap", "2", "--epochs", "3", "--step-sleep", "0.02"]
    env = {**os.environ, "MESHTRAIN_HOME": str(tmp_path / "home")}
    job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert job.returncode == 0, job.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in out.glob("result-*.json")]
    assert len(results) == 2 and results[0]["digest"] == results[1]["digest"], results
    # 3 syncs an epoch of 12 steps: the 2nd (and the 1st after the first epoch) in the background
    assert all(r["syncs"] == 9 and r["overlapped"] >= 4 for r in results), results


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overlap", [0, 2])
def test_a_local_sgd_job_ends_an_interval_where_a_checkpoint_is_asked_for(
    tmp_path: Path, overlap: int
) -> None:
    """The leader names steps that are not interval starts (step + its lead): the writers say so in
    a sync's header and every member ends that interval there, so checkpoints are written."""
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "meshtrain", "run", "--local", "2"]
    cmd += ["--checkpoint-every", "10", "--keep", "9"]
    cmd += ["--name", "cut", str(SCRIPT), "--out", str(out), "--sync-every", "4", "--overlap", str(overlap)]
    cmd += ["--epochs", "5", "--step-sleep", "0.06"]
    env = {**os.environ, "MESHTRAIN_HOME": str(tmp_path / "home")}
    job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert job.returncode == 0, job.stderr[-3000:]
    store = CheckpointStore(tmp_path / "home" / "checkpoints")
    assert len(store.checkpoints("cut")) >= 2, job.stdout[-3000:]
    results = [json.loads(p.read_text()) for p in out.glob("result-*.json")]
    assert len(results) == 2 and results[0]["digest"] == results[1]["digest"], results
    # a resume takes the outer momentum and the sync count too, not only the model and inner optimizer
    saved = store.load("cut")
    velocity = [v for k, v in saved.optimizer.items() if k.startswith("meshtrain_outer.velocity.")]
    stored = float(sum(float(mx.abs(v).sum()) for v in velocity))
    assert len(velocity) == 6 and stored > 0  # 3 Linear layers, weight and bias
    for old in out.glob("result-*.json"):
        old.unlink()
    resumed = [*cmd[:4], "--resume", *cmd[4:-4], "--epochs", "6", "--step-sleep", "0.01"]
    job = subprocess.run(resumed, env=env, capture_output=True, text=True, timeout=110)
    assert job.returncode == 0, job.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in out.glob("result-*.json")]
    assert len(results) == 2, job.stdout[-3000:]
    for r in results:
        assert r["velocity_at_start"] == pytest.approx(stored, rel=1e-6), (r, stored)
        assert r["syncs_at_start"] == saved.state["meta"]["outer"]["syncs"] > 0
