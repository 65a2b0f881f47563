"""`meshtrain run --data PATH`: the user's data hashed, cached, served and fetched between nodes.

The shell around meshtrain.data.distribute (the manifest and the rules):

- the submitter (`prepare_submission`, in the CLI) hashes PATH into a manifest
  (a per-file memo of (size, mtime, inode) -> sha256 makes the next run's hashing
  a stat per file), saves it under the state home and puts only the digest, the
  worker-relative path and PATH itself in the job's options;
- its agent (`NodeData.register`, at submit) serves PATH itself under that
  digest: no copy is made on the machine that has the data;
- before a worker starts, its node (`NodeData.prepare`) uses the source, or
  its cache `$MESHTRAIN_HOME/data/<digest>/content`, or fetches the data from
  a node that holds it, the submitter first, then any other member that has
  it cached. A joiner does the same before it takes a share.

Transfers ride the agents' control connections (meshtrain.agent.control):
authenticated with the mesh secret like every agent-to-agent request, and
AES-GCM encrypted on an `--encrypt` mesh, as checkpoint transfers are
(meshtrain.checkpoints.transfer, whose ideas this follows)::

    client -> request data.fetch {digest} + offsets     server -> reply {ok} + manifest bytes
                                                        server -> data.chunk {i, offset} + bytes ...
                                                        server -> data.end   (or data.error {message})

Files go as 1 MiB payloads read straight from disk. The receiver writes into
`.incoming-<digest>/`, hashes each file as it arrives and checks it (and the
manifest against the digest it asked for), and only then renames the
directory into place; a cut transfer keeps what arrived and its next attempt
(from the same node or another) asks only for the rest. A per-digest file lock
makes the nodes of one machine (a `--local` mesh shares one state home) fetch
once and find it cached after.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack

from meshtrain import wire
from meshtrain.data.distribute import (
    DIRECTORY,
    FILE,
    SHORT,
    Entry,
    Manifest,
    ManifestError,
    Progress,
    bytes_left,
    check_offsets,
    human_bytes,
    resume_offsets,
    space_problem,
    worker_relpath,
)
from meshtrain.errors import MeshtrainError, UserError, WireError

CHUNK_BYTES = 1 << 20
FRAME_TIMEOUT_S = 60.0  # a peer that sends nothing for this long has stalled: try the next holder
LOCK_POLL_S = 0.1
MEMO_FILE = "hashes.json"
MEMO_KEPT = 200_000  # files whose digest the memo remembers (the most recent ones)
MANIFESTS = "manifests"  # the submitted data's manifests (so the agent need not hash it again)
CONTENT = "content"
MANIFEST_FILE = "manifest.json"
VERIFIED_FILE = "verified"  # in an incoming directory: the entries already checked, one index a line
INCOMING = ".incoming-"
for _kind in ("data.chunk", "data.end", "data.error"):
    wire.register_kind(_kind)

Log = Callable[[str], Awaitable[None]]


class DataError(MeshtrainError):
    """The data could not be made available on this node (the message is the one line to show)."""


class TransferError(DataError):
    """One holder could not send it (refused, stalled, changed, corrupt): the next one is tried."""


# --------------------------------------------------------------------------- hashing (the submitter)


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            h.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return h.hexdigest()


class HashMemo:
    """(size, mtime_ns, inode) -> sha256 of the files hashed before, in `$MESHTRAIN_HOME/data/hashes.json`:
    submitting the same data again costs a stat per file, not a read of every byte."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.table: dict[str, list[Any]] = {}
        with contextlib.suppress(OSError, ValueError):
            raw = json.loads(path.read_text())
            if isinstance(raw, dict):
                self.table = raw
        self.dirty = False

    @staticmethod
    def _key(info: os.stat_result) -> list[int]:
        return [info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev]

    def get(self, path: Path, info: os.stat_result) -> str | None:
        row = self.table.get(str(path))
        if isinstance(row, list) and len(row) == 5 and row[:4] == self._key(info):
            return str(row[4])
        return None

    def put(self, path: Path, info: os.stat_result, digest: str) -> None:
        self.table.pop(str(path), None)
        self.table[str(path)] = [*self._key(info), digest]
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        rows = list(self.table.items())[-MEMO_KEPT:]
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(dict(rows)))
            os.replace(tmp, self.path)


def list_files(root: Path) -> list[tuple[str, Path]]:
    """(path inside the data, file) for every regular file under `root` (sorted; links to files are
    read, links to directories not followed); [("", root)] for a file."""
    if root.is_file():
        return [("", root)]
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            with contextlib.suppress(OSError):
                if stat.S_ISREG(full.stat().st_mode):
                    found.append((full.relative_to(root).as_posix(), full))
    return found


def build_manifest(
    root: Path, memo: HashMemo | None = None, on_bytes: Callable[[int, int], None] | None = None
) -> Manifest:
    """Hash every file of `root` (a file or a directory); `on_bytes(done, total)` as it goes."""
    files = list_files(root)
    infos = [(rel, path, path.stat()) for rel, path in files]
    total = sum(info.st_size for _, _, info in infos)
    done = 0
    entries = []
    for rel, path, info in infos:
        digest = memo.get(path, info) if memo is not None else None
        if digest is None:

            def step(n: int) -> None:
                nonlocal done
                done += n
                if on_bytes is not None:
                    on_bytes(done, total)

            digest = sha256_file(path, step)
            if memo is not None:
                memo.put(path, info, digest)
        else:
            done += info.st_size
        entries.append(Entry(rel, info.st_size, digest))
    return Manifest.build(FILE if root.is_file() else DIRECTORY, entries)


def prepare_submission(given: str, home: Path, cwd: str | None = None) -> dict[str, Any]:
    """`run --data PATH` on the submitting machine: the job's `data` option (digest, where workers
    find it, the source), the manifest saved for this machine's agent. One UserError line for a
    path that is missing or unreadable; hashing large data says how far it is on stderr."""
    path = Path(given).expanduser()
    if not path.exists():
        raise UserError(f"--data {given}: no such file or directory")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise UserError(f"--data {given}: not readable (permissions)")
    if not (path.is_file() or path.is_dir()):
        raise UserError(f"--data {given}: not a regular file or a directory")
    root = path.resolve()
    cache = DataCache(home / "data")
    memo = HashMemo(cache.root / MEMO_FILE)
    started = time.monotonic()
    progress: Progress | None = None

    def show(done: int, total: int) -> None:
        nonlocal progress
        progress = progress or Progress(total, started)
        now = time.monotonic()
        if progress.due(now):
            print(f"meshtrain: {progress.line(f'hashing {given}', done, now)}", file=sys.stderr, flush=True)

    try:
        manifest = build_manifest(root, memo, show)
    except PermissionError as exc:
        raise UserError(f"--data {given}: {exc.filename or 'a file'} is not readable (permissions)") from None
    except OSError as exc:
        raise UserError(
            f"--data {given}: cannot read {exc.filename or 'it'} ({exc.strerror or exc})"
        ) from None
    memo.save()
    try:
        cache.save_manifest(manifest)
    except OSError as exc:
        raise UserError(
            f"--data {given}: cannot write its manifest under {cache.root} ({exc.strerror})"
        ) from None
    return {
        "digest": manifest.digest,
        "path": worker_relpath(given, cwd or os.getcwd()),
        "source": str(root),
        "bytes": manifest.total_bytes,
        "files": len(manifest.entries),
    }


# --------------------------------------------------------------------------- the cache (every node)


class DataCache:
    """`$MESHTRAIN_HOME/data`: `<digest>/manifest.json` + `<digest>/content` (complete copies only),
    `.incoming-<digest>/` (a transfer in progress), `manifests/<digest>.json` (submitted data)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def entry(self, digest: str) -> Path:
        return self.root / digest

    def content(self, digest: str) -> Path | None:
        """The data's complete local copy, if this node has one."""
        entry = self.entry(digest)
        return entry / CONTENT if (entry / MANIFEST_FILE).is_file() else None

    def manifest(self, digest: str) -> Manifest | None:
        for path in (self.entry(digest) / MANIFEST_FILE, self.root / MANIFESTS / f"{digest}.json"):
            with contextlib.suppress(OSError, ManifestError):
                return Manifest.from_bytes(path.read_bytes(), expected=digest)
        return None

    def save_manifest(self, manifest: Manifest) -> None:
        folder = self.root / MANIFESTS
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{manifest.digest}.json"
        tmp = folder / f".{manifest.digest}.{os.getpid()}"
        tmp.write_bytes(manifest.to_bytes())
        os.replace(tmp, target)

    def incoming(self, digest: str) -> Path:
        return self.root / f"{INCOMING}{digest}"

    @contextlib.asynccontextmanager
    async def lock(self, digest: str) -> AsyncIterator[None]:
        """One fetch of a digest at a time on this machine (several agents may share one home)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f".{digest}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(LOCK_POLL_S)
            yield
        finally:
            os.close(fd)  # releases the lock


def data_file(base: Path, manifest: Manifest, entry: Entry) -> Path:
    """Where an entry's bytes live under a copy rooted at `base` (the content path itself for a file)."""
    return base if manifest.kind == FILE else base.joinpath(*entry.path.split("/"))


# --------------------------------------------------------------------------- serving


async def serve_fetch(
    header: dict[str, Any], payload: bytes, conn: Any, find: Callable[[str], tuple[Path, Manifest] | None]
) -> int:
    """Answer one `data.fetch` on `conn`; the bytes sent. `find(digest)` is this node's copy."""
    digest = str(header.get("digest", ""))
    held = find(digest)
    if held is None:
        await conn.reply(False, error="data", message=f"data {digest[:SHORT]} is not on this node")
        return 0
    base, manifest = held
    try:
        raw = msgpack.unpackb(payload, raw=False) if payload else []
        offsets = check_offsets(manifest, raw if isinstance(raw, list) else [])
    except (ManifestError, ValueError, msgpack.UnpackException) as exc:
        await conn.reply(False, error="data", message=f"bad data.fetch: {exc}")
        return 0
    await conn.send("reply", {"ok": True, "bytes": bytes_left(manifest, offsets)}, manifest.to_bytes())
    sent = 0
    for i, (entry, offset) in enumerate(zip(manifest.entries, offsets, strict=True)):
        if offset >= entry.size:
            continue
        path = data_file(base, manifest, entry)
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except OSError as exc:
            await conn.send("data.error", {"message": f"{entry.path or path.name} is gone ({exc.strerror})"})
            return sent
        try:
            if (await asyncio.to_thread(os.fstat, f.fileno())).st_size != entry.size:
                await conn.send(
                    "data.error",
                    {"message": f"{entry.path or path.name} changed since the job was submitted"},
                )
                return sent
            f.seek(offset)
            while offset < entry.size:
                block = await asyncio.to_thread(f.read, min(CHUNK_BYTES, entry.size - offset))
                if not block:
                    await conn.send("data.error", {"message": f"{entry.path or path.name} was truncated"})
                    return sent
                await conn.send("data.chunk", {"i": i, "offset": offset}, block)
                offset += len(block)
                sent += len(block)
        finally:
            f.close()
    await conn.send("data.end", {})
    return sent


# --------------------------------------------------------------------------- fetching


class _Incoming:
    """A transfer into `.incoming-<digest>/`: what is held, each file hashed as it arrives."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder = folder
        self.manifest = manifest
        self.base = folder / CONTENT
        self.verified: set[int] = set()
        with contextlib.suppress(OSError, ValueError):
            self.verified = {int(x) for x in (folder / VERIFIED_FILE).read_text().split()}
        self._open: tuple[int, Any, Any] | None = None  # (index, file, hasher)

    def offsets(self) -> list[int]:
        held: dict[str, int] = {}
        for i, entry in enumerate(self.manifest.entries):
            if i in self.verified:
                held[entry.path] = entry.size
                continue
            with contextlib.suppress(OSError):
                held[entry.path] = data_file(self.base, self.manifest, entry).stat().st_size
        return resume_offsets(self.manifest, held)

    def write(self, i: int, offset: int, block: bytes) -> None:
        """Blocking (run in a thread): append `block` to entry i at `offset`, check it once complete."""
        entries = self.manifest.entries
        if not 0 <= i < len(entries) or offset + len(block) > entries[i].size:
            raise TransferError("a chunk outside the data's files arrived")
        if self._open is None or self._open[0] != i:
            self._close()
            path = data_file(self.base, self.manifest, entries[i])
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "r+b" if path.exists() else "wb")  # noqa: SIM115 - closed by _close
            f.truncate(offset)
            hasher = hashlib.sha256()
            f.seek(0)
            while f.tell() < offset:  # a resumed file: its first part is hashed from disk
                hasher.update(f.read(min(CHUNK_BYTES, offset - f.tell())))
            self._open = (i, f, hasher)
        index, f, hasher = self._open
        if f.tell() != offset:
            raise TransferError(f"data for {entries[i].path or 'the file'} arrived out of order")
        f.write(block)
        hasher.update(block)
        if f.tell() == entries[i].size:
            self._finish(i, f, hasher)

    def _finish(self, i: int, f: Any, hasher: Any) -> None:
        f.close()
        self._open = None
        entry = self.manifest.entries[i]
        if hasher.hexdigest() != entry.sha256:
            data_file(self.base, self.manifest, entry).unlink(missing_ok=True)  # refetched next attempt
            raise TransferError(f"{entry.path or 'the file'} arrived corrupt (its sha256 differs)")
        self.verified.add(i)
        with open(self.folder / VERIFIED_FILE, "a") as log:
            log.write(f"{i}\n")

    def empty_files(self) -> None:
        """Files of 0 bytes get no chunk: create them."""
        for i, entry in enumerate(self.manifest.entries):
            if entry.size == 0 and i not in self.verified:
                path = data_file(self.base, self.manifest, entry)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"")
                if entry.sha256 != hashlib.sha256(b"").hexdigest():
                    raise TransferError(f"{entry.path or 'the file'}: an empty file with a non-empty digest")
                self.verified.add(i)

    def _close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def close(self) -> None:
        self._close()

    def complete(self) -> bool:
        return len(self.verified) == len(self.manifest.entries)


async def fetch_from(
    endpoint: tuple[str, int],
    who: str,
    digest: str,
    cache: DataCache,
    *,
    node: str,
    keyring: Any = None,
    log: Log | None = None,
) -> tuple[Path, int]:
    """Fetch data `digest` from the agent at `endpoint` into `cache`; (its content path, bytes received).

    DataError (not retried elsewhere) when this node's disk cannot hold it; TransferError when `who`
    could not send it (what arrived is kept for the next attempt)."""
    from meshtrain.agent.control import open_request

    folder = cache.incoming(digest)
    known: Manifest | None = None
    with contextlib.suppress(OSError, ManifestError):
        known = Manifest.from_bytes((folder / MANIFEST_FILE).read_bytes(), expected=digest)
    incoming = _Incoming(folder, known) if known is not None else None
    offsets = incoming.offsets() if incoming is not None else []
    try:
        conn = await asyncio.wait_for(
            open_request(endpoint, "data.fetch", msgpack.packb(offsets), keyring=keyring, digest=digest),
            FRAME_TIMEOUT_S,
        )
    except (OSError, WireError, asyncio.TimeoutError) as exc:
        raise TransferError(f"{who} is unreachable ({exc.__class__.__name__}: {exc})") from None
    received = 0
    try:
        header, payload = await _recv(conn, who)
        if header.get("kind") != "reply" or not header.get("ok"):
            raise TransferError(f"{who}: {header.get('message') or header.get('reason') or 'refused'}")
        try:
            manifest = Manifest.from_bytes(payload, expected=digest)
        except ManifestError as exc:
            raise TransferError(f"{who}: {exc}") from None
        if incoming is None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / MANIFEST_FILE).write_bytes(payload)
            incoming = _Incoming(folder, manifest)
            if manifest.kind == DIRECTORY:
                incoming.base.mkdir(parents=True, exist_ok=True)  # an empty directory is data too
            if any(offsets):
                raise TransferError("resume offsets without a manifest")  # pragma: no cover - defensive
        left = int(header.get("bytes", bytes_left(manifest, incoming.offsets())))
        free = shutil.disk_usage(cache.root).free
        problem = space_problem(node, left, free, str(cache.root))
        if problem is not None:
            raise DataError(problem)
        started = time.monotonic()
        progress = Progress(left, started)
        what = f"data {digest[:SHORT]} from {who}"
        try:
            incoming.empty_files()
            while True:
                header, payload = await _recv(conn, who)
                kind = header.get("kind")
                if kind == "data.end":
                    break
                if kind == "data.error":
                    raise TransferError(f"{who}: {header.get('message')}")
                if kind != "data.chunk":
                    raise TransferError(f"{who} sent an unexpected {kind!r} frame")
                i, offset = header.get("i"), header.get("offset")
                if not isinstance(i, int) or not isinstance(offset, int):
                    raise TransferError(f"{who} sent a malformed chunk")
                await asyncio.to_thread(incoming.write, i, offset, payload)
                received += len(payload)
                now = time.monotonic()
                if log is not None and progress.due(now):
                    await log(progress.line(what, received, now))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(cache.root).free
                raise DataError(
                    space_problem(node, left, min(free, left), str(cache.root)) or str(exc)
                ) from None
            raise
        finally:
            incoming.close()
        if not incoming.complete():
            raise TransferError(f"{who} ended the transfer before every file arrived")
        entry = cache.entry(digest)
        if entry.exists():  # another agent of this machine finished it first (it held no lock?)
            shutil.rmtree(folder, ignore_errors=True)
        else:
            (folder / VERIFIED_FILE).unlink(missing_ok=True)
            os.replace(folder, entry)
        return entry / CONTENT, received
    finally:
        await conn.close()


async def _recv(conn: Any, who: str) -> tuple[dict[str, Any], bytes]:
    try:
        header, payload = await asyncio.wait_for(conn.recv(), FRAME_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise TransferError(f"{who} sent nothing for {FRAME_TIMEOUT_S:.0f}s") from None
    except (WireError, ConnectionError, asyncio.IncompleteReadError) as exc:
        raise TransferError(f"{who}: the connection broke ({exc.__class__.__name__}: {exc})") from None
    if header.get("error") == "authentication failed":
        raise TransferError(f"{who} refused this node: {header.get('reason', 'authentication failed')}")
    return header, payload


def link_into(workdir: Path, rel: str, target: Path) -> Path:
    """Make the data appear at `workdir/rel` (a symbolic link to this node's copy); that path."""
    where = workdir.joinpath(*rel.split("/"))
    where.parent.mkdir(parents=True, exist_ok=True)
    if where.is_symlink() or where.is_file():
        where.unlink()
    elif where.is_dir():  # a small copy shipped in the script's bundle: the data wins
        shutil.rmtree(where)
    where.symlink_to(target, target_is_directory=target.is_dir())
    return where


# --------------------------------------------------------------------------- the agent's part


class NodeData:
    """One agent's data: the sources submitted here, its cache, serving and fetching.

    `agent` offers `name`, `home`, `keyring`, `members()` and `endpoint(name)` (meshtrain.agent.agent.Agent).
    """

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.sources: dict[str, tuple[Path, Manifest]] = {}
        self.sent_bytes = 0  # served to other nodes (tests read it)
        self.received_bytes = 0

    @property
    def cache(self) -> DataCache:
        return DataCache(Path(self.agent.home) / "data")

    async def register(self, options: dict[str, Any]) -> None:
        """A job submitted on this node: serve its `--data` source from here, and say it is the origin."""
        data = options.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("digest"), str):
            return
        digest, source = data["digest"], Path(str(data.get("source", "")))
        manifest = self.cache.manifest(digest)
        if manifest is None and source.exists():  # not hashed by this machine's CLI: hash it here
            with contextlib.suppress(OSError, ManifestError):
                manifest = await asyncio.to_thread(build_manifest, source)
        if manifest is not None and manifest.digest == digest and source.exists():
            self.sources[digest] = (source, manifest)
        options["data"] = {**data, "origin": self.agent.name}

    def find(self, digest: str) -> tuple[Path, Manifest] | None:
        if digest in self.sources:
            return self.sources[digest]
        content = self.cache.content(digest)
        manifest = self.cache.manifest(digest) if content is not None else None
        return (content, manifest) if content is not None and manifest is not None else None

    async def serve(self, header: dict[str, Any], payload: bytes, conn: Any) -> None:
        self.sent_bytes += await serve_fetch(header, payload, conn, self.find)

    def holders(self, origin: str | None) -> list[tuple[str, tuple[str, int]]]:
        """The other live nodes, the job's origin (the submitter) first: who to ask for the data."""
        me = self.agent.name
        names = [m.name for m in self.agent.members() if m.state == "alive" and m.name != me]
        ordered = sorted(dict.fromkeys(names), key=lambda n: n != origin)
        found = [(n, self.agent.endpoint(n)) for n in ordered]
        return [(n, e) for n, e in found if e is not None]

    async def prepare(self, options: dict[str, Any], log: Log) -> Path | None:
        """Before a worker of a job with `--data` starts here: this node's copy of the data (fetched
        if it has none), or None for a job without data. DataError with the one line to show."""
        data = options.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("digest"), str):
            return None
        digest = data["digest"]
        size = f"{human_bytes(int(data.get('bytes') or 0))} in {int(data.get('files') or 0)} file(s)"
        if digest in self.sources and self.sources[digest][0].exists():
            return self.sources[digest][0]
        cache = self.cache
        async with cache.lock(digest):
            content = cache.content(digest)
            if content is not None:
                await log(f"data {digest[:SHORT]} ({size}): cached on {self.agent.name}, nothing fetched")
                return content
            problems = []
            for who, endpoint in self.holders(data.get("origin")):
                started = time.monotonic()
                try:
                    content, got = await fetch_from(
                        endpoint,
                        who,
                        digest,
                        cache,
                        node=self.agent.name,
                        keyring=getattr(self.agent, "keyring", None),
                        log=log,
                    )
                except TransferError as exc:
                    problems.append(str(exc))
                    continue
                self.received_bytes += got
                took = time.monotonic() - started
                await log(
                    f"data {digest[:SHORT]} ({size}): fetched {human_bytes(got)} from {who} in {took:.1f}s "
                    f"({human_bytes(got / max(took, 1e-6))}/s)"
                )
                return content
        why = "; ".join(problems) if problems else "no other node is up"
        raise DataError(f"{self.agent.name} cannot get the job's data {digest[:SHORT]}: {why}")
