"""The shard planner (pure): contiguous whole-leaf shards, sized by free memory, or the numbers why not."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrain.errors import UserError
from meshtrain.shard.plan import REPLICATED_BYTES, DoesNotFit, per_element, plan_shards

GB = 10**9
ADAMW = 8.0


def test_shards_follow_free_memory() -> None:
    leaves = [1_000_000] * 100  # 100M parameters
    fixed = REPLICATED_BYTES[1] * 100_000_000
    free = [fixed + 1 * GB, fixed + 3 * GB]  # spare: 1 GB vs 3 GB
    plan = plan_shards(leaves, ["small", "big"], free, stage=1, state_bytes=ADAMW)
    assert plan.sizes == [25_000_000, 75_000_000]
    assert plan.leaf_ranges == ((0, 25), (25, 100))
    assert all(n <= f for n, f in zip(plan.needed, plan.free, strict=True))


def test_a_job_that_cannot_fit_says_so_with_the_numbers_per_node() -> None:
    leaves = [10_000_000] * 30  # 300M parameters: 6 GB replicated at stage 1, 2.4 GB of AdamW state
    with pytest.raises(DoesNotFit) as info:
        plan_shards(leaves, ["node1", "node2"], [7 * GB, 5 * GB], stage=1, state_bytes=ADAMW)
    msg = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in msg
    assert "300.0M parameters need 6.00 GB on every node" in msg and "2.40 GB sharded" in msg
    assert "node1 needs 7.20 GB, has 7.00 GB free" in msg and "node2 needs 7.20 GB, has 5.00 GB free" in msg
    assert "stage 2 also shards the gradients" in msg


def test_stage_2_fits_where_stage_1_does_not() -> None:
    leaves = [10_000_000] * 30
    free = [7 * GB, 7 * GB]  # stage 1 needs 7.2 GB a node, stage 2 6.6 GB
    with pytest.raises(DoesNotFit):
        plan_shards(leaves, ["a", "b"], free, stage=1, state_bytes=ADAMW)
    plan = plan_shards(leaves, ["a", "b"], free, stage=2, state_bytes=ADAMW)
    assert plan.sizes == [150_000_000, 150_000_000]


def test_when_proportional_cuts_overflow_a_node_the_plan_fills_in_order() -> None:
    # proportional cuts give the middle node leaves 6+2 > its 7; filling in order fits everyone
    unit = 1_000_000
    leaves = [5 * unit, 6 * unit, 2 * unit, 3 * unit, 3 * unit]
    replicated, sharded = per_element(2, ADAMW)
    fixed = int(replicated * sum(leaves))
    free = [fixed + int(c * unit * sharded) for c in (9, 7, 8)]
    plan = plan_shards(leaves, ["a", "b", "c"], free, stage=2, state_bytes=ADAMW)
    assert plan.leaf_ranges == ((0, 1), (1, 2), (2, 5))
    assert all(n <= f for n, f in zip(plan.needed, plan.free, strict=True)), plan


def test_bad_stage_and_inputs() -> None:
    with pytest.raises(UserError, match="stage"):
        per_element(4, ADAMW)
    with pytest.raises(ValueError):
        plan_shards([1], ["a"], [1, 2], stage=1, state_bytes=ADAMW)


def feasible(leaves: list[int], caps: list[int], sharded: float) -> bool:
    """Brute force: can members in rank order take contiguous runs of leaves within their caps?"""
    reach = {0}
    for cap in caps:
        reach = {
            stop
            for start in reach
            for stop in range(start, len(leaves) + 1)
            if sharded * sum(leaves[start:stop]) <= cap
        }
    return len(leaves) in reach


@settings(max_examples=200, deadline=None)
@given(
    leaves=st.lists(st.integers(0, 5000), min_size=1, max_size=30),
    spare=st.lists(st.integers(0, 200_000), min_size=1, max_size=6),
    stage=st.sampled_from([1, 2, 3]),
    reserve=st.integers(0, 1000),
)
def test_plans_partition_the_leaves_and_fit_or_refuse(
    leaves: list[int], spare: list[int], stage: int, reserve: int
) -> None:
    members = [f"n{i}" for i in range(len(spare))]
    replicated, sharded = per_element(stage, ADAMW)
    fixed = int(replicated * sum(leaves)) + reserve
    free = [fixed + s for s in spare]
    try:
        plan = plan_shards(leaves, members, free, stage=stage, state_bytes=ADAMW, reserve=reserve)
    except DoesNotFit as exc:
        assert all(m in str(exc) for m in members)
        assert not feasible(leaves, spare, sharded), "refused a job that some contiguous split fits"
        return
    assert plan.leaf_ranges[0][0] == 0 and plan.leaf_ranges[-1][1] == len(leaves)
    for (_, hi), (lo, _) in zip(plan.leaf_ranges, plan.leaf_ranges[1:], strict=False):
        assert hi == lo
    assert sum(plan.sizes) == sum(leaves)
    assert all(n <= f for n, f in zip(plan.needed, plan.free, strict=True))
    again = plan_shards(leaves, members, free, stage=stage, state_bytes=ADAMW, reserve=reserve)
    assert again == plan  # every member computes the same plan
