"""The exactly-once global sampler and the debug sample ledger (pure, no I/O).

Every member of a job holds the same `GlobalSampler`: a deterministic
permutation of the data set per (seed, epoch) and a global cursor into it.
One training step consumes one *global batch* (the next `global_batch`
indices of the permutation, fewer at the end of an epoch) and every member
takes a contiguous slice of it sized by its share. Membership changes and
re-balancing only change how the current global batch is sliced, never the
cursor, so however members come and go every index of an epoch is consumed
exactly once. The cursor and the epoch are the whole state: that is what a
checkpoint stores and what a joining member receives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshtrain.errors import UserError

__all__ = ["GlobalSampler", "SampleLedger", "SamplerState", "LedgerViolation", "split_counts"]


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


@dataclass(frozen=True)
class SamplerState:
    """Everything that distinguishes one point of training from another, as far as data goes."""

    seed: int
    epoch: int
    cursor: int
    dataset_size: int
    global_batch: int

    def to_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "dataset_size": self.dataset_size,
            "global_batch": self.global_batch,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplerState:
        try:
            return cls(
                **{k: int(data[k]) for k in ("seed", "epoch", "cursor", "dataset_size", "global_batch")}
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad sampler state {dict(data)!r}") from exc


class GlobalSampler:
    """Seeded permutation per epoch + a global cursor advanced by one global batch per step.

    `shares` everywhere is a mapping member -> weight in *rank order* (dicts keep
    insertion order); the member first in order gets the first slice.
    """

    def __init__(
        self, dataset_size: int, global_batch: int, seed: int = 0, epoch: int = 0, cursor: int = 0
    ) -> None:
        if dataset_size <= 0:
            raise UserError(f"the data set is empty (size {dataset_size})")
        if global_batch <= 0:
            raise UserError(f"global batch size must be positive (got {global_batch})")
        if not 0 <= cursor < dataset_size or epoch < 0:
            raise ValueError(f"cursor {cursor} / epoch {epoch} outside a data set of {dataset_size}")
        self.dataset_size = dataset_size
        self.global_batch = global_batch
        self.seed = seed
        self.epoch = epoch
        self.cursor = cursor
        self._perm_epoch = -1
        self._perm = np.empty(0, np.int64)

    # --- state -------------------------------------------------------------------------
    @property
    def state(self) -> SamplerState:
        return SamplerState(self.seed, self.epoch, self.cursor, self.dataset_size, self.global_batch)

    @classmethod
    def from_state(cls, state: SamplerState | Mapping[str, Any]) -> GlobalSampler:
        s = state if isinstance(state, SamplerState) else SamplerState.from_dict(state)
        return cls(s.dataset_size, s.global_batch, s.seed, s.epoch, s.cursor)

    def load_state(self, state: SamplerState | Mapping[str, Any]) -> None:
        """Adopt another member's state (a joiner, or a member that was behind)."""
        s = state if isinstance(state, SamplerState) else SamplerState.from_dict(state)
        if (s.dataset_size, s.global_batch, s.seed) != (self.dataset_size, self.global_batch, self.seed):
            raise ValueError(f"sampler state {s} belongs to another data set, batch size or seed")
        self.epoch, self.cursor = s.epoch, s.cursor

    # --- the data ----------------------------------------------------------------------
    def permutation(self, epoch: int | None = None) -> np.ndarray:
        """The order of `epoch`: the same on every machine and numpy version (PCG64 of seed, epoch)."""
        epoch = self.epoch if epoch is None else epoch
        if epoch != self._perm_epoch:
            self._perm = epoch_permutation(self.seed, epoch, self.dataset_size)
            self._perm_epoch = epoch
        return self._perm

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.dataset_size // self.global_batch)

    def global_batch_indices(self) -> np.ndarray:
        """The indices of the current step's global batch (short at the end of an epoch)."""
        end = min(self.cursor + self.global_batch, self.dataset_size)
        return self.permutation()[self.cursor : end]

    def assignment(self, shares: Mapping[str, float]) -> dict[str, np.ndarray]:
        """Each member's slice of the current global batch; together they are the batch, no overlaps."""
        return split_by_shares(self.global_batch_indices(), shares)

    def slice_for(self, member: str, shares: Mapping[str, float]) -> np.ndarray:
        """This member's indices of the current global batch."""
        if member not in shares:
            raise KeyError(f"{member!r} has no share in this step")
        return self.assignment(shares)[member]

    def reassign_orphans(
        self, old_shares: Mapping[str, float], survivors: Mapping[str, float]
    ) -> dict[str, np.ndarray]:
        """Extra indices each survivor must compute when members were lost mid-step.

        The survivors keep the gradients of their old slices (same cursor, same
        global batch); the slices of the lost members are pooled in rank order and
        split among the survivors by their shares. Old slices plus extras cover
        the global batch exactly once.
        """
        missing = [m for m in survivors if m not in old_shares]
        if missing:
            raise ValueError(f"{missing} had no slice in the interrupted step (joiners take no orphans)")
        old = self.assignment(old_shares)
        lost = [old[m] for m in old_shares if m not in survivors]
        orphans = np.concatenate(lost) if lost else np.empty(0, np.int64)
        return split_by_shares(orphans, survivors)

    def advance(self) -> bool:
        """Commit the current global batch: move the cursor; True when an epoch just ended."""
        self.cursor = min(self.cursor + self.global_batch, self.dataset_size)
        if self.cursor >= self.dataset_size:
            self.epoch += 1
            self.cursor = 0
            return True
        return False


class LedgerViolation(AssertionError):
    """The ledger shows an index consumed twice, never, or assigned differently by two members."""


@dataclass(frozen=True)
class LedgerEntry:
    epoch: int
    index: int
    member: str
    generation: int
    step: int


class SampleLedger:
    """Debug record of which member consumed which index, in which generation and step.

    Every member records each committed step's *whole* assignment (so the
    slices of a member that dies later are not forgotten), and the ledger
    travels with the state (`to_rows()` in send_state's meta): a member's
    ledger is then the history of the state it holds. Work a member committed
    and took to its grave is not in the survivors' lineage, and is not in
    their ledgers either. Two records that disagree about an (epoch, index)
    are a double consumption; `check_epoch` proves exactly-once.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[int, int], LedgerEntry] = {}
        self._conflicts: list[tuple[LedgerEntry, LedgerEntry]] = []

    def record(self, epoch: int, step: int, generation: int, assignment: Mapping[str, Iterable[int]]) -> None:
        """Record one committed step: member -> indices it consumed (old slices and extras alike)."""
        for member, indices in assignment.items():
            for index in indices:
                self._add(LedgerEntry(int(epoch), int(index), member, int(generation), int(step)))

    def _add(self, entry: LedgerEntry) -> None:
        key = (entry.epoch, entry.index)
        known = self._entries.get(key)
        if known is None:
            self._entries[key] = entry
        elif known != entry:
            self._conflicts.append((known, entry))

    def merge(self, other: SampleLedger) -> None:
        for entry in other._entries.values():
            self._add(entry)
        self._conflicts.extend(other._conflicts)

    def entries(self) -> list[LedgerEntry]:
        return sorted(self._entries.values(), key=lambda e: (e.epoch, e.step, e.index))

    def to_rows(self) -> list[list[Any]]:
        """Plain rows [epoch, index, member, generation, step] (msgpack/JSON friendly)."""
        return [[e.epoch, e.index, e.member, e.generation, e.step] for e in self.entries()]

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[Any]]) -> SampleLedger:
        ledger = cls()
        for epoch, index, member, generation, step in rows:
            ledger._add(LedgerEntry(int(epoch), int(index), str(member), int(generation), int(step)))
        return ledger

    def check_epoch(self, epoch: int, dataset_size: int) -> None:
        """Raise LedgerViolation unless every index of `epoch` was consumed exactly once."""
        if self._conflicts:
            a, b = self._conflicts[0]
            raise LedgerViolation(f"index {a.index} of epoch {a.epoch} consumed twice: {a} and {b}")
        seen = {i for (e, i) in self._entries if e == epoch}
        if len(seen) != dataset_size or min(seen, default=0) < 0 or max(seen, default=-1) >= dataset_size:
            missing = sorted(set(range(dataset_size)) - seen)
            raise LedgerViolation(
                f"epoch {epoch}: {len(seen)} of {dataset_size} indices consumed; first missing {missing[:5]}"
            )
