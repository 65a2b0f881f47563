"""Checkpoints of a sharded job: every tensor as flat pieces with offsets, re-sliced on resume (pure).

A sharded job's checkpoint is one part per member, each written by that member into its own node's
store under the usual two-phase protocol (leader/checkpoint.py: every member is a writer). A part
holds the pieces of tensors it owns, and its ``state.json`` records them under ``"shard"``:

    {"format": "meshtrain.shards/1", "index": 2, "holders": ["node1", ...], "stage": 2,
     "tensors": [{"name": "blocks.0.mlp.layers.0.weight.m", "group": "opt", "dtype": "F32",
                  "shape": [128, 32], "pieces": [[2, "blocks.0.mlp.layers.0.weight.m", 0, 4096]]}, ...]}

A piece ``[shard, key, start, stop]`` says: elements [start, stop) of the tensor, in row-major flat
order, are the array `key` of shard `shard`'s safetensors file of that group (params or opt), and
nothing else. The union of all parts' entries is the whole checkpoint; a tensor may be cut across
shards (stage 3, sharded parameters, will cut parameters that way) or held whole by one (stages 1
and 2: a shard is a run of whole parameter arrays, so each optimizer-state array is whole in one
part; the parameters are replicated and only shard 0 writes them). A tensor every shard holds whole
(an optimizer's ``step`` and ``learning_rate``) is taken from the lowest shard.

Why pieces with offsets rather than "shard i of N": a resume on M nodes cuts the state by a new
plan, and each new member then reads exactly the byte ranges it needs, from whichever old shard
files hold them (`read_range`: a seek and a read in a safetensors file, never the whole file), so
no node ever holds more than its new shard plus one tensor in flight.

The parts of the other members reach every node after the commit (the leader asks each node to
pull them: checkpoints/node.py), into ``STORE/.shards/HOLDER/RUN/STEP``; `find_parts` looks there
and in the store itself, by each part's recorded index, so which store directory a node claimed does
not matter. Nothing here imports MLX: numpy arrays in, numpy arrays out (bfloat16 as its raw uint16).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meshtrain.errors import UserError

__all__ = [
    "FORMAT",
    "SHARDS_DIR",
    "Piece",
    "ShardedCheckpoint",
    "TensorEntry",
    "cut_tensors",
    "find_parts",
    "merge_entries",
    "owner_of_state",
    "read_range",
    "read_tensor",
    "shard_record",
]

FORMAT = "meshtrain.shards/1"
SHARDS_DIR = ".shards"  # STORE/.shards/HOLDER/: the other members' parts, pulled after each commit
GROUP_FILES = {"params": "params.safetensors", "opt": "optimizer.safetensors"}
NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # raw bits: numpy has no bfloat16 (the MLX side views them back)
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "C64": np.complex64,
}


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of a tensor, stored as the array `key` of shard `shard`'s file."""

    shard: int
    key: str
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the checkpoint: its group ("params" or "opt"), safetensors dtype, shape, pieces."""

    name: str
    group: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "pieces": [[p.shard, p.key, p.start, p.stop] for p in self.pieces],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorEntry:
        pieces = tuple(Piece(int(s), str(k), int(a), int(b)) for s, k, a, b in data["pieces"])
        return cls(str(data["name"]), str(data["group"]), str(data["dtype"]), tuple(data["shape"]), pieces)


def cut_tensors(
    tensors: Sequence[tuple[str, str, str, tuple[int, ...]]], bounds: Sequence[tuple[int, int]]
) -> list[list[TensorEntry]]:
    """The entries each shard holds when the tensors, laid end to end, are cut at `bounds`.

    `tensors` are (name, group, dtype, shape) in order; `bounds[i]` = [lo, hi) is shard i's range of
    the concatenated flat vector (contiguous, covering it). A tensor crossing a bound is split into
    pieces; each piece's key is the tensor's name (one piece of a tensor per shard at most)."""
    out: list[list[TensorEntry]] = [[] for _ in bounds]
    offset = 0
    for name, group, dtype, shape in tensors:
        size = int(np.prod(shape)) if shape else 1
        for i, (lo, hi) in enumerate(bounds):
            a, b = max(lo, offset), min(hi, offset + size)
            if a < b:
                piece = Piece(i, name, a - offset, b - offset)
                out[i].append(TensorEntry(name, group, dtype, tuple(shape), (piece,)))
        offset += size
    return out


def merge_entries(parts: Iterable[Iterable[TensorEntry]]) -> dict[tuple[str, str], TensorEntry]:
    """All parts' entries as one layout: {(group, name): entry with every piece, in element order}.

    A tensor held whole by several shards keeps the lowest shard's copy. Raises `UserError` when a
    tensor's pieces do not tile it exactly (a part is missing, or two disagree)."""
    pieces: dict[tuple[str, str], list[Piece]] = {}
    heads: dict[tuple[str, str], TensorEntry] = {}
    for entries in parts:
        for e in entries:
            key = (e.group, e.name)
            head = heads.setdefault(key, e)
            if (head.dtype, head.shape) != (e.dtype, e.shape):
                raise UserError(f"the checkpoint's parts disagree on {e.group} {e.name}")
            pieces.setdefault(key, []).extend(e.pieces)
    merged: dict[tuple[str, str], TensorEntry] = {}
    for key, got in pieces.items():
        head = heads[key]
        whole = sorted((p for p in got if p.start == 0 and p.stop == head.size), key=lambda p: p.shard)
        chosen = whole[:1] or sorted(got, key=lambda p: (p.start, p.shard))
        at = 0
        for p in chosen:
            if p.start != at:
                raise UserError(f"the checkpoint lacks elements {at}..{p.start} of {key[0]} {key[1]}")
            at = p.stop
        if at != head.size:
            raise UserError(f"the checkpoint lacks elements {at}..{head.size} of {key[0]} {key[1]}")
        merged[key] = TensorEntry(head.name, head.group, head.dtype, head.shape, tuple(chosen))
    return merged


def owner_of_state(name: str, param_paths: Iterable[str]) -> str | None:
    """The parameter an optimizer-state array belongs to: the longest path `name` continues with a
    dot ("blocks.0.weight.m" -> "blocks.0.weight"); None for the optimizer's own (step, lr)."""
    best: str | None = None
    for p in param_paths:
        if name.startswith(p + ".") and (best is None or len(p) > len(best)):
            best = p
    return best


# ------------------------------------------------------------------ reading byte ranges


class _Header:
    """A safetensors file's header: {key: (dtype, shape, absolute byte offset of its data)}."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise UserError(f"{path} is not a safetensors file")
            (length,) = struct.unpack("<Q", head)
            try:
                header = json.loads(f.read(length))
            except ValueError:
                raise UserError(f"{path} is not a safetensors file") from None
        base = 8 + length
        self.arrays: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for key, v in header.items():
            if key == "__metadata__":
                continue
            lo, hi = v["data_offsets"]
            self.arrays[key] = (str(v["dtype"]), tuple(v["shape"]), base + int(lo), base + int(hi))


_HEADERS: dict[Path, _Header] = {}


def _header(path: Path) -> _Header:
    h = _HEADERS.get(path)
    if h is None:
        h = _HEADERS[path] = _Header(path)
        if len(_HEADERS) > 256:
            _HEADERS.pop(next(iter(_HEADERS)))
    return h


def read_range(path: Path, key: str, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of array `key` of the safetensors file at `path`, flat (a seek, a read)."""
    h = _header(Path(path))
    if key not in h.arrays:
        raise UserError(f"{path} has no array {key!r}")
    dtype, _, lo, hi = h.arrays[key]
    np_dtype = np.dtype(NUMPY_DTYPES[dtype])
    item = np_dtype.itemsize
    if not 0 <= start <= stop or lo + stop * item > hi:
        raise UserError(f"{path}: elements {start}..{stop} are outside {key!r}")
    with open(h.path, "rb") as f:
        f.seek(lo + start * item)
        data = f.read((stop - start) * item)
    if len(data) != (stop - start) * item:
        raise UserError(f"{path} is truncated")
    return np.frombuffer(data, dtype=np_dtype).copy()


def read_tensor(
    entry: TensorEntry, files: Mapping[int, Path], start: int = 0, stop: int | None = None
) -> np.ndarray:
    """Elements [start, stop) of `entry` (flat), read from the shard files that hold them.

    `files[shard]` is that shard's file of the entry's group."""
    stop = entry.size if stop is None else stop
    out: np.ndarray = np.empty(stop - start, NUMPY_DTYPES[entry.dtype])
    for p in entry.pieces:
        a, b = max(start, p.start), min(stop, p.stop)
        if a < b:
            if p.shard not in files:
                raise UserError(f"shard {p.shard} of the checkpoint is not on this node")
            out[a - start : b - start] = read_range(files[p.shard], p.key, a - p.start, b - p.start)
    return out


# ------------------------------------------------------------------ a part's record, and finding the parts


def shard_record(
    index: int, holders: Sequence[str], stage: int, entries: Iterable[TensorEntry], **extra: Any
) -> dict[str, Any]:
    """What a part's state.json keeps under "shard" (see the module docstring)."""
    return {
        "format": FORMAT,
        "index": int(index),
        "holders": [str(h) for h in holders],
        "stage": int(stage),
        "tensors": [e.to_json() for e in entries],
        **extra,
    }


@dataclass
class ShardedCheckpoint:
    """Every part of one sharded checkpoint found on this node: directories by shard index, merged."""

    step: int
    holders: tuple[str, ...]
    stage: int
    dirs: dict[int, Path]
    tensors: dict[tuple[str, str], TensorEntry]
    records: dict[int, dict[str, Any]]

    def files(self, group: str) -> dict[int, Path]:
        return {i: d / GROUP_FILES[group] for i, d in self.dirs.items()}

    def names(self, group: str) -> list[str]:
        return [name for g, name in self.tensors if g == group]

    def read(self, group: str, name: str) -> np.ndarray:
        """Tensor `name` of `group`, whole, in its shape (numpy; bfloat16 as uint16)."""
        entry = self.tensors[(group, name)]
        return read_tensor(entry, self.files(group)).reshape(entry.shape)

    def dtype(self, group: str, name: str) -> str:
        return self.tensors[(group, name)].dtype


def shard_record_of(directory: Path) -> dict[str, Any] | None:
    """The "shard" record of the part in `directory` (None: not a sharded part, or unreadable)."""
    try:
        state = json.loads((directory / "state.json").read_text())
    except (OSError, ValueError):
        return None
    rec = state.get("shard") if isinstance(state, dict) else None
    return rec if isinstance(rec, dict) and rec.get("format") == FORMAT else None


def part_dirs(root: Path, run: str, step: int) -> list[Path]:
    """Where parts of RUN@STEP may be on this node: the store's own, then every pulled holder's."""
    found = [root / run / str(step)]
    shards = root / SHARDS_DIR
    if shards.is_dir():
        found += sorted(p / run / str(step) for p in shards.iterdir() if p.is_dir())
    return [d for d in found if (d / "manifest.json").is_file()]


def find_parts(root: Path, run: str, step: int) -> ShardedCheckpoint | None:
    """RUN@STEP's parts on this node, merged; None when it is not sharded. Raises `UserError` naming
    the holders whose parts are missing."""
    records: dict[int, dict[str, Any]] = {}
    dirs: dict[int, Path] = {}
    for d in part_dirs(Path(root), run, step):
        rec = shard_record_of(d)
        if rec is not None and int(rec["index"]) not in dirs:
            dirs[int(rec["index"])] = d
            records[int(rec["index"])] = rec
    if not records:
        return None
    first = next(iter(records.values()))
    holders = tuple(str(h) for h in first["holders"])
    missing = [h for i, h in enumerate(holders) if i not in dirs]
    if missing:
        raise UserError(
            f"checkpoint {run}@{step} is sharded across {', '.join(holders)}; the parts of "
            f"{', '.join(missing)} are not on this node"
        )
    entries = [[TensorEntry.from_json(t) for t in records[i]["tensors"]] for i in sorted(records)]
    return ShardedCheckpoint(step, holders, int(first.get("stage", 0)), dirs, merge_entries(entries), records)
