"""Performance-based batch shares: who takes how much of each global batch, and why (pure, no I/O).

A mesh of uneven machines finishes a synchronous step only when its slowest
member does, so each member's share of the global batch should be
proportional to how fast it computes: then every member's compute part of a
step takes the same time. Three things bend that rule, and every member must
bend it the same way because each one computes the shares itself from the
same gossiped inputs (nothing here reads a clock, a sensor or a socket):

- a member's *power factor* (meshtrain.power.power_factor): 0.5 on battery
  with `--on-battery=reduce`, 0 for a member leaving the job;
- a *memory cap*: the most samples per step its free memory allows; a share
  never exceeds it;
- a *floor*: every member still in the job keeps a minimum share, so it keeps
  measuring its speed and a slow-but-useful machine is never starved to zero.

Re-planning is hysteretic: shares change only when some member's ideal share
is more than `drift` (relatively) away from its current one, when a cap or a
leaving member demands it, when the members changed, or when asked
(`force`). Measurement noise of a few per cent then moves nothing, and a real
change (a node on battery, a thermal throttle, a background job) moves shares
at the next re-balance.

Identical machines must not be split on noise (issue 20 measured two equal
workers read 1.1-1.5x apart from two timed steps, a 5/3 split of a batch of 8
that the wide band then kept for the epoch, ~10% slower than 4/4). Two rules:
the first re-plan waits for `MIN_MEASURED` timed steps (a median of six, not
of two), and speeds within `NOISE` (10%) of each other count as one speed, so
the ideal of a mesh of equals is equal shares. The second rule also undoes a
wrong first plan: once the members read as equals again, the ideal is equal
and a split that far from it is more than the band away.

When to re-balance (`rebalance_due`): at step `FIRST_CHECK` of the job,
every `CHECK_EVERY` global steps and at every epoch's end. The step count and
the sampler's epoch are the same on every member, so they all swap their
speeds at the same boundary and apply the same shares from the same step on.
The first check comes a few measured steps into the job, so an uneven mesh
does not run a whole epoch on equal shares; the checks every few steps catch
a drift within seconds. The first check and the epoch ends use a narrower
band (`drift_band`, 5% instead of 15%): the wide band keeps noise from moving
shares mid-epoch, but shares left 10% off (a first estimate that was off)
would cost up to 10% of the throughput for good. Not zero: every new split
is a new batch shape that each member's compiled step traces again (~0.1 s
on a slow CPU), worth paying for 5% of speed but not for 1%.

The gradient average stays exact whatever the shares: each member weights its
gradient by its local batch size (`Mesh.allreduce(weight=len(idx))`).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from meshtrain.train.step_sampler import split_counts

__all__ = [
    "CHECK_EVERY",
    "DEFAULT_DRIFT",
    "DEFAULT_FLOOR",
    "SETTLE_DRIFT",
    "FIRST_CHECK",
    "MIN_MEASURED",
    "NOISE",
    "WARMUP",
    "ShareDecision",
    "ThroughputMeter",
    "bytes_per_sample",
    "equal_shares",
    "memory_cap",
    "plan_shares",
    "drift_band",
    "rebalance_due",
]

DEFAULT_DRIFT = 0.15  # re-balance when an ideal share is >15% (relative) away from the current one
SETTLE_DRIFT = 0.05  # the band at the first check and at epoch ends (see drift_band)
DEFAULT_FLOOR = 0.02  # every member still in the job keeps at least 2% of the global batch
SAME_SPEED = 0.05  # rates within 5% of the slowest are reported as "same speed"
NOISE = 0.10  # speeds within 10% of each other are one speed: equal shares (see the module docstring)
WARMUP = 2  # steps the meter ignores at the start (graph compilation, caches)
MIN_MEASURED = 6  # timed steps behind the first re-plan: two read equal machines 1.5x apart
FIRST_CHECK = WARMUP + MIN_MEASURED  # the job's first re-plan: after the warm-up and six measured steps
CHECK_EVERY = 10  # global steps between drift checks (besides the first and every epoch's end)


def rebalance_due(step: int, epoch_ended: bool, every: int = CHECK_EVERY, first: int = FIRST_CHECK) -> bool:
    """Whether the boundary before global step `step` swaps speeds and re-plans the shares.

    At step `first`, every `every` steps (0 = never) and at every epoch's end.
    A pure function of numbers every member holds alike, so every member
    answers the same at the same boundary and the all-reduce of the speed
    table lines up.
    """
    if every < 0:
        raise ValueError("every must be >= 0")
    return epoch_ended or step == first or (every > 0 and step > 0 and step % every == 0)


def drift_band(step: int, epoch_ended: bool, first: int = FIRST_CHECK) -> float:
    """The relative drift that moves shares at this boundary's re-plan (plan_shares' `drift`).

    Narrow (SETTLE_DRIFT) at the job's first check (the equal starting shares
    are a guess, not a measurement) and at every epoch's end (many steps
    measured since); wide (DEFAULT_DRIFT) at the checks in between, which are
    there for real changes (a node on battery, a background job), not noise.
    """
    return SETTLE_DRIFT if epoch_ended or step == first else DEFAULT_DRIFT


class ThroughputMeter:
    """Samples per second of the compute part of this worker's steps, robust to hiccups.

    `record(samples, seconds)` once per step with the local batch size and the
    time of the whole local step less the all-reduce: forward, backward,
    optimizer update and the loop's own work, but not the wait for the other
    members, which is the same for everyone. Counting the fixed per-step costs
    (the optimizer touches every parameter whatever the batch) matters: with
    shares proportional to samples/(whole step), the only fixed point of
    re-planning is every member's step taking the same time, which is what a
    synchronous step needs. The first `warmup` recorded steps are ignored
    (graph compilation, caches, BLAS thread start), and the rate is the median
    per-step rate over the last `window` steps, so one garbage-collection pause
    or a swapped-out page does not move shares.
    """

    def __init__(self, warmup: int = 5, window: int = 32) -> None:
        if warmup < 0 or window < 1:
            raise ValueError("warmup must be >= 0 and window >= 1")
        self.warmup = warmup
        self._skipped = 0
        self._rates: deque[float] = deque(maxlen=window)

    def record(self, samples: int, seconds: float) -> None:
        """One step's local batch size and its compute seconds; empty or timeless steps say nothing."""
        if samples <= 0 or not (seconds > 0) or math.isinf(seconds):
            return
        if self._skipped < self.warmup:
            self._skipped += 1
            return
        self._rates.append(samples / seconds)

    def reset(self) -> None:
        """Forget everything, warm-up included (a new generation, a new device)."""
        self._skipped = 0
        self._rates.clear()

    @property
    def ready(self) -> bool:
        """True once at least one step past the warm-up has been measured."""
        return bool(self._rates)

    def rate(self) -> float | None:
        """Median samples/s of the recent steps, or None before any post-warm-up step.

        New shares do not reset it: their first step (a new batch shape, compiled
        again) is one outlier of the window, and a window that starts afresh at
        every re-plan measured a busy machine's noise (other processes come and
        go within a second) and chased it, moving shares every check.
        """
        return statistics.median(self._rates) if self._rates else None


def memory_cap(free_bytes: float, bytes_per_sample: float, reserve: float = 0.25) -> int:
    """The most samples per step that fit in `free_bytes`, leaving `reserve` of it untouched.

    `reserve` is a fraction of the free memory kept for the OS, the data set
    and the step's fixed costs (parameters, optimizer state, all-reduce
    buffers), which `bytes_per_sample` does not count.
    """
    if not (bytes_per_sample > 0) or math.isinf(bytes_per_sample):
        raise ValueError(f"bytes_per_sample must be a positive number (got {bytes_per_sample})")
    if not 0 <= reserve < 1:
        raise ValueError(f"reserve must be in [0, 1) (got {reserve})")
    usable = max(0.0, float(free_bytes)) * (1.0 - reserve)
    return int(usable // bytes_per_sample)


def bytes_per_sample(peak_bytes: float, base_bytes: float, batch: int) -> float:
    """What one more sample costs in a step: (peak memory of a step - memory before it) / batch.

    With MLX: `base = mx.get_active_memory()` before a step, `peak =
    mx.get_peak_memory()` after it (reset with `mx.reset_peak_memory()`).
    """
    if batch <= 0:
        raise ValueError("batch must be positive")
    return max(float(peak_bytes) - float(base_bytes), 1.0) / batch


def equal_shares(members: Sequence[str]) -> dict[str, float]:
    """The starting point before anything is measured: 1/N each, in the given (rank) order."""
    if not members:
        raise ValueError("no members")
    return {m: 1.0 / len(members) for m in members}


@dataclass(frozen=True)
class ShareDecision:
    """The shares every member uses from now on, whether they changed, and why, per member.

    `shares` keeps the members' (rank) order of the `rates` mapping given to
    `plan_shares` and sums to 1; a leaving member has share 0 and stays listed
    so the view can say so. `reasons` is one short line per member for the live
    view ("2.0x faster", "on battery: halved", "memory cap 256").
    """

    shares: dict[str, float]
    changed: bool
    reasons: dict[str, str]
    why: str  # one line for the whole decision: "rebalanced: host1 2.0x faster" / "within 15% drift"
    caps: dict[str, int] = field(default_factory=dict)

    def counts(self, global_batch: int) -> dict[str, int]:
        """Local batch sizes for one global batch: largest-remainder split, never above a cap."""
        names = list(self.shares)
        counts = dict(zip(names, split_counts(global_batch, [self.shares[m] for m in names]), strict=True))
        surplus = 0
        for m, cap in self.caps.items():
            if m in counts and counts[m] > cap:
                surplus += counts[m] - cap
                counts[m] = cap
        # Rounding pushed someone over a cap: give the spare samples to whoever has the most room.
        while surplus > 0:
            room = [
                (self.caps.get(m, global_batch) - counts[m], self.shares[m], -i)
                for i, m in enumerate(names)
                if self.shares[m] > 0
            ]
            best = max(room)
            if best[0] <= 0:
                break  # the caps cannot hold the batch; plan_shares refuses that case already
            counts[names[-best[2]]] += 1
            surplus -= 1
        return counts


def plan_shares(
    rates: Mapping[str, float | None],
    current: Mapping[str, float] | None,
    *,
    caps: Mapping[str, int | None] | None = None,
    global_batch: int | None = None,
    factors: Mapping[str, tuple[float, str]] | None = None,
    drift: float = DEFAULT_DRIFT,
    floor: float = DEFAULT_FLOOR,
    force: bool = False,
    noise: float = NOISE,
) -> ShareDecision:
    """New shares proportional to measured speed, bent by power factors, memory caps and a floor.

    rates:   member -> measured samples/s (ThroughputMeter.rate()); None when not
             measured yet (it is taken as the median of the others). Its key order
             is the rank order of the result.
    current: member -> share in use now (None or {} = nothing yet: equal shares).
    caps:    member -> most samples per step its memory allows (memory_cap), None = no
             cap; needs `global_batch` to turn samples into shares.
    factors: member -> (power factor, reason) from meshtrain.power.power_factor;
             a factor of 0 takes the member out (share 0), 0.5 halves its speed.
    drift:   relative change of an ideal share that is worth a re-balance.
    floor:   minimum share of every member with a positive factor (lowered to
             1/members if it were larger).
    force:   re-balance even within the drift band.
    noise:   relative spread of the active members' speeds read as measurement noise:
             within it they all count as their median (equal machines, equal shares).

    Deterministic: the same inputs give the same shares on every member.
    """
    members = list(rates)
    if not members:
        raise ValueError("no members to share among")
    if len(set(members)) != len(members):
        raise ValueError("duplicate member names")
    if not 0 <= drift:
        raise ValueError("drift must be >= 0")
    if not 0 <= noise:
        raise ValueError("noise must be >= 0")
    caps = dict(caps or {})
    factors = dict(factors or {})
    ordered = sorted(members)  # sums in name order: the same floats whatever the rank order

    factor = {m: _factor(factors.get(m, (1.0, ""))[0]) for m in members}
    active = [m for m in ordered if factor[m] > 0]
    if not active:
        raise ValueError("every member is leaving: nobody to share the batch among")

    speed = _speeds(rates, ordered)
    alike = [speed[m] for m in active]
    if noise > 0 and max(alike) <= min(alike) * (1.0 + noise):
        typical = statistics.median(alike)
        speed = {m: typical for m in ordered}
    weight = {m: speed[m] * factor[m] for m in ordered}
    cap_share = _cap_shares(caps, global_batch, ordered)
    upper = {m: (cap_share.get(m, 1.0) if factor[m] > 0 else 0.0) for m in ordered}
    if math.fsum(upper[m] for m in active) < 1.0 - 1e-12:
        total = sum(caps[m] or 0 for m in active if caps.get(m) is not None)
        raise ValueError(
            f"the global batch of {global_batch} does not fit: the members' memory allows {total} per step"
        )
    low = min(floor, 1.0 / len(active)) if floor > 0 else 0.0
    lower = {m: (min(low, upper[m]) if factor[m] > 0 else 0.0) for m in ordered}
    ideal = _water_fill(weight, lower, upper, ordered)

    now = _normalised(current, members)
    trigger = _trigger(ideal, now, lower, upper, members, drift, force)
    shares = ideal if trigger or now is None else now
    reasons = {
        m: _reason(m, speed, factor, factors, shares, lower, upper, caps, active, cap_share) for m in members
    }
    if trigger:
        why = f"rebalanced: {trigger}"
    else:
        why = f"kept: every share within {drift:.0%} of its ideal"
    return ShareDecision(
        shares={m: shares[m] for m in members},
        changed=bool(trigger) and any(abs(shares[m] - (now or {}).get(m, -1.0)) > 1e-12 for m in members),
        reasons=reasons,
        why=why,
        caps={m: int(c) for m, c in caps.items() if c is not None and m in rates},
    )


def _factor(value: float) -> float:
    if not (value >= 0) or math.isinf(value):
        raise ValueError(f"power factors must be finite and >= 0 (got {value})")
    return float(value)


def _speeds(rates: Mapping[str, float | None], ordered: Sequence[str]) -> dict[str, float]:
    """Measured rates; an unmeasured member counts as the median of the measured ones (or 1)."""
    measured = {m: _valid_rate(rates[m]) for m in ordered}
    known = [r for r in measured.values() if r is not None]
    stand_in = statistics.median(known) if known else 1.0
    return {m: (r if r is not None else stand_in) for m, r in measured.items()}


def _valid_rate(rate: float | None) -> float | None:
    """The rate as a float if it is a usable measurement (positive, finite), else None."""
    if rate is None or not (rate > 0) or math.isinf(rate):
        return None
    return float(rate)


def _cap_shares(
    caps: Mapping[str, int | None], global_batch: int | None, ordered: Sequence[str]
) -> dict[str, float]:
    bounded = {m: c for m, c in caps.items() if c is not None and m in ordered}
    if not bounded:
        return {}
    if global_batch is None or global_batch <= 0:
        raise ValueError("memory caps need the global batch size to become shares")
    return {m: min(1.0, max(0, int(c)) / global_batch) for m, c in bounded.items()}


def _water_fill(
    weight: Mapping[str, float],
    lower: Mapping[str, float],
    upper: Mapping[str, float],
    ordered: Sequence[str],
) -> dict[str, float]:
    """Shares = clamp(lam * weight, lower, upper) with lam chosen so they sum to 1 (exactly solved).

    sum(clamp(lam * w)) is continuous, non-decreasing and piecewise linear in
    lam, so walking its breakpoints in order finds the segment where it
    crosses 1, and one division solves it there.
    """

    def total(lam: float) -> float:
        return math.fsum(min(max(lam * weight[m], lower[m]), upper[m]) for m in ordered)

    points = sorted({b / weight[m] for m in ordered if weight[m] > 0 for b in (lower[m], upper[m])} | {0.0})
    lam = points[-1]
    for left, right in zip(points, points[1:], strict=False):
        if total(right) >= 1.0:
            # Linear on [left, right]: the members strictly between their bounds grow with lam.
            fixed, mid = total(left), (left + right) / 2
            slope = math.fsum(weight[m] for m in ordered if lower[m] < mid * weight[m] < upper[m])
            lam = left + (1.0 - fixed) / slope if slope > 0 else right
            lam = min(max(lam, left), right)
            break
    shares = {m: min(max(lam * weight[m], lower[m]), upper[m]) for m in ordered}
    # The last ulp: push the rounding error onto the largest share that has room.
    error = 1.0 - math.fsum(shares.values())
    if error:
        roomy = [m for m in ordered if lower[m] <= shares[m] + error <= upper[m] and shares[m] > 0]
        if roomy:
            biggest = max(roomy, key=lambda m: (shares[m], m))
            shares[biggest] += error
    return shares


def _normalised(current: Mapping[str, float] | None, members: Sequence[str]) -> dict[str, float] | None:
    """The current shares of exactly these members, summing to 1; None if there are none to compare."""
    if not current or set(current) != set(members):
        return None
    total = math.fsum(max(0.0, float(current[m])) for m in sorted(members))
    if total <= 0:
        return None
    if abs(total - 1.0) <= 1e-9:  # already normalised: keep the very same floats
        return {m: max(0.0, float(current[m])) for m in members}
    return {m: max(0.0, float(current[m])) / total for m in members}


def _trigger(
    ideal: Mapping[str, float],
    now: Mapping[str, float] | None,
    lower: Mapping[str, float],
    upper: Mapping[str, float],
    members: Sequence[str],
    drift: float,
    force: bool,
) -> str:
    """Why shares must change now ("" = they need not)."""
    if now is None:
        return "members changed"
    for m in sorted(members):
        if upper[m] == 0.0 and now[m] > 0:
            return f"{m} leaving"
        if now[m] > upper[m] + 1e-12:
            return f"{m} over its memory cap"
        if now[m] < lower[m] - 1e-12:
            return f"{m} under the floor"
    if force:
        return "scheduled re-plan"
    for m in sorted(members):
        base = now[m]
        change = abs(ideal[m] - base) / base if base > 0 else (math.inf if ideal[m] > 0 else 0.0)
        if change > drift:
            return f"{m} drifted {change:.0%}"
    return ""


def _reason(
    m: str,
    speed: Mapping[str, float],
    factor: Mapping[str, float],
    factors: Mapping[str, tuple[float, str]],
    shares: Mapping[str, float],
    lower: Mapping[str, float],
    upper: Mapping[str, float],
    caps: Mapping[str, int | None],
    active: Sequence[str],
    cap_share: Mapping[str, float],
) -> str:
    """One short line: speed against the slowest active member, then power, memory and floor."""
    power_reason = factors.get(m, (1.0, ""))[1]
    if factor[m] == 0:
        return power_reason or "leaving"
    slowest = min(speed[a] for a in active)
    ratio = speed[m] / slowest
    smallest = min(shares[a] for a in active)
    even = max(shares[a] for a in active) - smallest < 1e-9
    # the words follow the split actually applied, so the column never contradicts itself: "slowest"
    # only for a member that got the smallest share of an uneven split, never at 50/50
    capped = m in cap_share and shares[m] >= upper[m] - 1e-12
    if even:
        if ratio >= 1 + SAME_SPEED:  # faster, yet an even split: its memory cap, or inside the drift band
            parts = [f"{ratio:.1f}x faster" + ("" if capped else ", within drift")]
        elif any(speed[a] >= slowest * (1 + SAME_SPEED) for a in active):
            parts = ["even split"]
        else:
            parts = ["same speed"]
    elif ratio >= 1 + SAME_SPEED and shares[m] > smallest + 1e-12:
        parts = [f"{ratio:.1f}x faster"]
    elif shares[m] <= smallest + 1e-12 and any(speed[a] >= slowest * (1 + SAME_SPEED) for a in active):
        parts = ["slowest"]  # the smallest share, and others really are faster
    else:
        parts = ["same speed"]  # its share differs for another reason: power, memory, the floor
    if factor[m] != 1.0 and power_reason:
        parts.append(power_reason)
    if capped:
        parts.append(f"memory cap {caps[m]}")
    elif shares[m] <= lower[m] + 1e-12 and lower[m] > 0 and len(active) > 1:
        parts.append("minimum share")
    return ", ".join(parts)
