"""The sampler's pure parts: exact splits by share, the per-(seed, epoch) permutation.

Exactly-once under membership changes is tested on StepSampler in tests/test_elastic_parts.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshtrain.train.step_sampler import epoch_permutation, split_by_shares, split_counts


@given(st.integers(0, 10_000), st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=12))
def test_split_counts_sum_exactly_and_follow_weights(total: int, weights: list[float]) -> None:
    if sum(weights) <= 0:
        with pytest.raises(ValueError):
            split_counts(total, weights)
        return
    counts = split_counts(total, weights)
    assert sum(counts) == total
    norm = sum(weights)
    for c, w in zip(counts, weights, strict=True):
        assert abs(c - total * w / norm) < 1.0 + 1e-9
        if w == 0:
            assert c == 0


def test_permutation_is_deterministic_per_seed_and_epoch() -> None:
    a, b = epoch_permutation(7, 3, 1000), epoch_permutation(7, 3, 1000)
    assert np.array_equal(a, b)
    assert not np.array_equal(epoch_permutation(7, 0, 1000), epoch_permutation(7, 1, 1000))
    assert not np.array_equal(epoch_permutation(7, 0, 1000), epoch_permutation(8, 0, 1000))
    assert sorted(epoch_permutation(7, 2, 1000).tolist()) == list(range(1000))


@given(st.integers(0, 500), st.dictionaries(st.sampled_from("abcdef"), st.floats(0.01, 10), min_size=1))
def test_slices_by_share_are_contiguous_and_cover_the_batch(n: int, shares: dict[str, float]) -> None:
    indices = np.arange(n, dtype=np.int64) * 3
    slices = split_by_shares(indices, shares)
    assert list(slices) == list(shares)
    assert np.array_equal(np.concatenate(list(slices.values())), indices)
