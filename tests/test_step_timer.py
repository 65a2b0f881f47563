"""The worker's step timer for performance shares, on an injected clock (no MLX, no sleeps)."""

from __future__ import annotations

from meshtrain.train.shares import WARMUP
from meshtrain.worker.step_timer import MAX_CAP, StepTimer


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_step_is_its_compute_less_its_reduction() -> None:
    clock = Clock()
    timer = StepTimer(clock, free_memory=lambda: 10_000)
    for _ in range(WARMUP + 3):
        timer.handed_out(100)
        clock.t += 0.2  # forward + backward
        timer.gradients_ready(peak_bytes_above_base=500)
        clock.t += 5.0  # the reduction: not compute
        timer.reduced()
        clock.t += 0.05  # optimizer update
        timer.boundary()
    assert timer.rate() is not None and abs(timer.rate() - 100 / 0.25) < 1e-6
    assert timer.bytes_per_sample == 5.0 and timer.memory_cap() == 1_500  # 75% of 10,000 B at 5 B each


def test_an_interrupted_reduction_is_not_counted_and_a_local_step_is_timed_whole() -> None:
    clock = Clock()
    timer = StepTimer(clock)
    for _ in range(WARMUP + 3):
        timer.handed_out(10)
        clock.t += 0.1
        timer.gradients_ready()
        clock.t += 30.0  # the ring broke: recovery, not compute
        timer.boundary()  # no `reduced()`: nothing recorded
    assert timer.rate() is None
    for _ in range(WARMUP + 3):
        timer.handed_out(10)
        clock.t += 0.5
        timer.local_step_done()
    assert abs((timer.rate() or 0) - 20.0) < 1e-6
    assert timer.memory_cap() == -1  # no memory probe, no cap


def test_the_cap_is_bounded_for_the_float32_swap() -> None:
    timer = StepTimer(Clock(), free_memory=lambda: 10**15)
    timer.handed_out(1)
    timer.gradients_ready(peak_bytes_above_base=1)
    assert timer.memory_cap() == MAX_CAP
