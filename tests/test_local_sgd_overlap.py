"""OuterOptimizer's overlap= arithmetic: what a sync in the background applies, and when.

The rounds object here stands in for meshtrain.worker.local_rounds (its reductions are the ring's,
tested with real agents in tests/test_local_sgd_elastic.py): it hands back a chosen mean, so the outer
step and the merge with the steps taken meanwhile are checked exactly.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from meshtrain.errors import UserError
from meshtrain.train.local_sgd import OuterOptimizer, check_overlap, outer_update


class Rounds:
    """The calls OuterOptimizer makes on a job's LocalRounds, with a scripted outcome per sync."""

    def __init__(self, outcomes: list[np.ndarray | None]) -> None:
        self.outcomes = outcomes
        self.started: list[tuple[np.ndarray, float]] = []
        self.joined = 0
        self.recoveries = 0
        self.last_sent_bytes = 10

    def can_overlap(self) -> bool:
        return True

    def epoch_ends(self) -> bool:
        return False

    def start_sync(self, delta: np.ndarray, samples: float, wire: str, feedback: Any) -> None:
        self.started.append((delta.copy(), samples))

    def join_sync(self) -> tuple[np.ndarray, np.ndarray] | None:
        outcome = self.outcomes[self.joined]
        self.joined += 1
        return None if outcome is None else (outcome, np.zeros(5, np.float32))


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


def test_a_sync_the_ring_broke_under_leaves_its_samples_to_the_next_one() -> None:
    model = nn.Linear(3, 2)
    rounds = Rounds([None])  # the background reduction failed: the interval merges into the next
    outer = OuterOptimizer(model, Mesh(rounds), sync_every=2, overlap=1)
    before = flat(model)
    for _ in range(2):
        nudge(model, -0.1)
        outer.step(samples=5)
    nudge(model, -0.1)
    outer.step(samples=5)  # joined: nothing applied, the model untouched
    assert outer.syncs == 0 and rounds.joined == 1
    np.testing.assert_allclose(flat(model), before - 0.3, rtol=1e-5)
    nudge(model, -0.1)
    outer.step(samples=5)  # the next sync carries both intervals' delta and samples
    delta, samples = rounds.started[1]
    assert samples == 20
    np.testing.assert_allclose(delta, np.full(8, 0.4, np.float32), rtol=1e-4)
