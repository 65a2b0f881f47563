"""The user's data on every node (`meshtrain run --data PATH`): the manifest and the rules, pure.

The data is named by its content: a manifest lists every file of PATH (its
path inside PATH, size and sha256) in a canonical order, and the sha256 of the
manifest's canonical bytes is the data's name (`Manifest.digest`). Two nodes
holding the same name hold the same bytes, so a node that has a copy never
needs another (the cache in `$MESHTRAIN_HOME/data/<digest>`), any holder can
serve it, and a receiver checks every file against the manifest, and the
manifest against the name it asked for, so neither a broken link nor a
changed source can slip a wrong byte into training.

This module only decides (no I/O): what a manifest is and how it is checked,
where the data appears in a worker's directory, how much of a transfer is
left, whether a disk can hold it, how progress reads. meshtrain.agent.data_transfer
hashes, stores, serves and fetches.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

MANIFEST_VERSION = 1
FILE, DIRECTORY = "file", "dir"
LARGE_BYTES = 64 * 1024 * 1024  # transfers (and hashing) at least this big show progress
SPACE_MARGIN_BYTES = 64 * 1024 * 1024  # a disk is "full" before its last byte: keep this much free
SHORT = 12  # the digest's prefix shown to people


class ManifestError(ValueError):
    """A manifest that is malformed, unsafe, or not the one that was asked for."""


@dataclass(frozen=True)
class Entry:
    """One file of the data: `path` inside it (POSIX, relative; "" when the data is one file)."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What PATH holds, in canonical order; `digest` names it."""

    kind: str  # FILE or DIRECTORY
    entries: tuple[Entry, ...]

    @staticmethod
    def build(kind: str, entries: Iterable[Entry]) -> Manifest:
        ordered = tuple(sorted(entries, key=lambda e: e.path))
        manifest = Manifest(kind, ordered)
        manifest.check()
        return manifest

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def to_bytes(self) -> bytes:
        """Canonical JSON: the same data gives the same bytes (and so the same digest) everywhere."""
        body = {
            "version": MANIFEST_VERSION,
            "kind": self.kind,
            "files": [[e.path, e.size, e.sha256] for e in self.entries],
        }
        return json.dumps(body, separators=(",", ":"), sort_keys=True, ensure_ascii=True).encode()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @staticmethod
    def from_bytes(data: bytes, expected: str | None = None) -> Manifest:
        """Parse and check a manifest that came from the network (or disk): ManifestError if it is
        malformed, names an unsafe path, or (with `expected`) is not the data of that digest."""
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise ManifestError(f"the manifest received is not that of data {expected[:SHORT]}")
        try:
            body = json.loads(data)
            files = body["files"]
            manifest = Manifest(
                str(body["kind"]),
                tuple(Entry(str(p), int(s), str(h)) for p, s, h in files),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ManifestError(f"malformed data manifest ({exc})") from None
        if body.get("version") != MANIFEST_VERSION:
            raise ManifestError(f"data manifest version {body.get('version')!r} (this meshtrain reads 1)")
        manifest.check()
        if expected is not None and manifest.to_bytes() != data:
            raise ManifestError("the data manifest is not in canonical form")
        return manifest

    def check(self) -> None:
        """Every path safe to write under a directory, each once, sizes and digests well formed."""
        if self.kind not in (FILE, DIRECTORY):
            raise ManifestError(f"data kind {self.kind!r}")
        if self.kind == FILE and [e.path for e in self.entries] != [""]:
            raise ManifestError("a one-file data manifest lists exactly one entry, named ''")
        seen: set[str] = set()
        for e in self.entries:
            if self.kind == DIRECTORY:
                check_member_path(e.path)
            if e.path in seen:
                raise ManifestError(f"data path {e.path!r} listed twice")
            seen.add(e.path)
            if e.size < 0 or len(e.sha256) != 64 or any(c not in "0123456789abcdef" for c in e.sha256):
                raise ManifestError(f"bad size or digest for {e.path!r}")
        paths = sorted(seen)
        for a, b in zip(paths, paths[1:], strict=False):  # "x" a file and "x/y" another: cannot both exist
            if b.startswith(a + "/"):
                raise ManifestError(f"data path {a!r} is both a file and a directory")


def check_member_path(path: str) -> None:
    """A file's path inside the data: relative, POSIX, no `..`, no empty or `.` parts."""
    pure = PurePosixPath(path)
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
        or pure.is_absolute()
    ):
        raise ManifestError(f"unsafe path in data manifest: {path!r}")


def worker_relpath(given: str, cwd: str) -> str:
    """Where the data appears in a worker's working directory, relative to it.

    `--data corpus/train` given from inside the current directory keeps that
    relative path (so a script reading `corpus/train` works plainly and in a
    job alike); a path outside it (absolute, or through `..`) becomes its last
    component."""
    full = posixpath.normpath(posixpath.join(cwd, given)) if not posixpath.isabs(given) else given
    full = posixpath.normpath(full)
    cwd_norm = posixpath.normpath(cwd)
    rel = posixpath.relpath(full, cwd_norm) if full.startswith(cwd_norm.rstrip("/") + "/") else ""
    if not rel or rel == "." or rel.startswith(".."):
        rel = posixpath.basename(full.rstrip("/")) or "data"
    check_member_path(rel)
    return rel


def resume_offsets(manifest: Manifest, held: dict[str, int]) -> list[int]:
    """For each entry, how many of its bytes a receiver already holds (a cut transfer resumes there):
    whole files held count in full, a part longer than its entry starts over."""
    offsets = []
    for e in manifest.entries:
        have = held.get(e.path, 0)
        offsets.append(have if 0 <= have <= e.size else 0)
    return offsets


def bytes_left(manifest: Manifest, offsets: Sequence[int]) -> int:
    return sum(e.size - off for e, off in zip(manifest.entries, offsets, strict=True))


def check_offsets(manifest: Manifest, offsets: Sequence[int]) -> list[int]:
    """A fetch request's offsets, as the server must trust them: one per entry, within its size."""
    if not offsets:
        return [0] * len(manifest.entries)
    if len(offsets) != len(manifest.entries):
        raise ManifestError("the fetch names a different number of files than the data holds")
    out = []
    for e, off in zip(manifest.entries, offsets, strict=True):
        if not isinstance(off, int) or isinstance(off, bool) or not 0 <= off <= e.size:
            raise ManifestError(f"offset {off!r} outside {e.path or 'the file'}")
        out.append(off)
    return out


def space_problem(node: str, needed: int, free: int, where: str) -> str | None:
    """The one line a node out of disk reports (None if `needed` bytes fit with a margin)."""
    if needed + SPACE_MARGIN_BYTES <= free:
        return None
    return (
        f"{node} is out of disk space for the job's data: it needs {human_bytes(needed)} "
        f"(and keeps {human_bytes(SPACE_MARGIN_BYTES)} free), {human_bytes(free)} are free in {where}"
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop returns


class Progress:
    """When a long transfer (or hashing) says how far it is: at most every `every_s` seconds, and
    only for `LARGE_BYTES` or more. Pure: the caller passes the clock."""

    def __init__(self, total: int, started: float, every_s: float = 2.0, large: int = LARGE_BYTES) -> None:
        self.total = total
        self.started = started
        self.every_s = every_s
        self.shows = total >= large
        self._next = started + every_s

    def due(self, now: float) -> bool:
        if not self.shows or now < self._next:
            return False
        self._next = now + self.every_s
        return True

    def line(self, what: str, done: int, now: float) -> str:
        rate = done / max(now - self.started, 1e-9)
        pct = 100.0 * done / self.total if self.total else 100.0
        return f"{what}: {human_bytes(done)} of {human_bytes(self.total)} ({pct:.0f}%, {human_bytes(rate)}/s)"
