"""The exactly-once sampler of elastic training: permutation + cursor + carried orphans (pure).

Every member holds an identical `StepSampler`. A step's *global batch* is
the carried indices first (slices of members lost in an interrupted step),
then fresh indices from the epoch's permutation, `global_batch` in all; each
member takes a contiguous slice by its share. `commit(orphans)` consumes the
batch and carries `orphans` (indices that did not make it into the reduction)
into the next step, so however members come and go, every index of an epoch
is in exactly one committed reduction. An epoch ends only when its
permutation is used up *and* nothing is carried: a lost slice in the last
step adds one short step to the epoch instead of leaking into the next one.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meshtrain.errors import UserError

__all__ = ["StepSampler", "epoch_permutation", "ledger_problem", "split_by_shares", "split_counts"]


def split_counts(total: int, weights: Sequence[float]) -> list[int]:
    """`total` items split by `weights`: largest remainder rounding, sums to `total` exactly.

    Ties in the remainders go to the earlier position, so every member computes
    the same split from the same weights. A zero weight gets nothing (unless
    all weights are zero, which is an error).
    """
    if total < 0:
        raise ValueError("cannot split a negative count")
    if not weights:
        raise ValueError("no shares to split among")
    if any(not (w >= 0) or w == float("inf") for w in weights):
        raise ValueError(f"shares must be finite and >= 0 (got {list(weights)})")
    norm = float(sum(weights))
    if norm <= 0:
        raise ValueError("at least one share must be positive")
    exact = [total * float(w) / norm for w in weights]
    counts = [int(e) for e in exact]
    short = total - sum(counts)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder:
        if short <= 0:
            break
        if weights[i] > 0:
            counts[i] += 1
            short -= 1
    return counts


def split_by_shares(indices: np.ndarray, shares: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Contiguous slices of `indices`, one per member in the mapping's order, sized by share."""
    counts = split_counts(len(indices), list(shares.values()))
    out: dict[str, np.ndarray] = {}
    start = 0
    for member, count in zip(shares, counts, strict=True):
        out[member] = indices[start : start + count]
        start += count
    return out


def epoch_permutation(seed: int, epoch: int, dataset_size: int) -> np.ndarray:
    """The order of an epoch: PCG64 of (seed, epoch), the same on every machine and numpy version."""
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    return rng.permutation(dataset_size).astype(np.int64)



class StepSampler:
    def __init__(
        self,
        dataset_size: int,
        global_batch: int,
        seed: int = 0,
        *,
        epoch: int = 0,
        cursor: int = 0,
        carry: Any = (),
    ) -> None:
        if dataset_size <= 0:
            raise UserError(f"the data set is empty (size {dataset_size})")
        if global_batch <= 0:
            raise UserError(f"the batch size must be positive (got {global_batch})")
        self.dataset_size = int(dataset_size)
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.cursor = int(cursor)
        self.carry = np.asarray(carry, np.int64).reshape(-1)
        self._perm_epoch = -1
        self._perm = np.empty(0, np.int64)

    # --- state (what a joiner receives and a checkpoint stores) ----------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset_size": self.dataset_size,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "carry": [int(i) for i in self.carry],
        }

    def load(self, data: Mapping[str, Any]) -> None:
        """Adopt another member's position; the data set, batch and seed must match this script's."""
        mine = (self.dataset_size, self.global_batch, self.seed)
        theirs = (int(data["dataset_size"]), int(data["global_batch"]), int(data["seed"]))
        if mine != theirs:
            raise UserError(
                f"this worker's data (size, batch, seed) {mine} differs from the job's {theirs}: "
                "every worker must run the same script with the same arguments"
            )
        self.epoch, self.cursor = int(data["epoch"]), int(data["cursor"])
        self.carry = np.asarray(data.get("carry", ()), np.int64).reshape(-1)

    # --- the data ----------------------------------------------------------------------------
    def permutation(self) -> np.ndarray:
        """The order of the current epoch: PCG64 of (seed, epoch), the same on every machine."""
        if self.epoch != self._perm_epoch:
            self._perm = epoch_permutation(self.seed, self.epoch, self.dataset_size)
            self._perm_epoch = self.epoch
        return self._perm

    def _parts(self) -> tuple[int, int]:
        take = min(len(self.carry), self.global_batch)
        fresh = min(self.global_batch - take, self.dataset_size - self.cursor)
        return take, fresh

    def batch(self) -> np.ndarray:
        """The current step's global batch: carried indices, then fresh ones."""
        take, fresh = self._parts()
        return np.concatenate([self.carry[:take], self.permutation()[self.cursor : self.cursor + fresh]])

    def assignment(self, shares: Mapping[str, float]) -> dict[str, np.ndarray]:
        """Each member's contiguous slice of the batch, by share (in the mapping's order)."""
        return split_by_shares(self.batch(), shares)

    def commit(self, orphans: Any = ()) -> bool:
        """Consume the batch, carry `orphans` into the next step; True when the epoch just ended."""
        take, fresh = self._parts()
        lost = np.asarray(orphans, np.int64).reshape(-1)
        self.carry = np.concatenate([self.carry[take:], lost])
        self.cursor += fresh
        if self.cursor >= self.dataset_size and len(self.carry) == 0:
            self.epoch += 1
            self.cursor = 0
            return True
        return False


def ledger_problem(ledger_dir: Path, dataset_size: int) -> str | None:
    """Check the debug ledger a job wrote (`run --ledger DIR`): None when every index of every epoch is
    in exactly one committed step and the members that logged a step agree on its slices; else why not."""
    steps: dict[tuple[int, int], dict[str, list[int]]] = {}
    for path in sorted(ledger_dir.glob("ledger-*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            key = (int(row["epoch"]), int(row["step"]))
            if steps.setdefault(key, row["slices"]) != row["slices"]:
                return f"members disagree on the slices of step {key}"
    for epoch in sorted({e for e, _ in steps}):
        seen = Counter(i for (e, _), sl in steps.items() if e == epoch for v in sl.values() for i in v)
        if sorted(seen) != list(range(dataset_size)) or max(seen.values()) != 1:
            return f"epoch {epoch}: not every index exactly once"
    return None
