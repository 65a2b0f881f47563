"""Copying a complete checkpoint between nodes over TCP, in meshtrain.wire frames.

One connection, one request, one checkpoint::

    client -> ckpt.fetch {run, step|None}                 server -> ckpt.offer {run, step, files}
                                                          server -> ckpt.data {name, offset} + bytes ...
                                                          server -> ckpt.end
    client -> ckpt.push {run, step, files}
    client -> ckpt.data ... ckpt.end                      server -> ckpt.ok | ckpt.error {message}
    client -> ckpt.list {run}                             server -> ckpt.ok {steps}

Files travel as 1 MiB payloads read straight from disk (never through
msgpack). With the mesh secret (a `Keyring`), every connection starts with the
challenge-response handshake of meshtrain.security.channel and every frame is
tagged under that connection's own session key -- or, in an `--encrypt` mesh,
sealed with AES-256-GCM -- so a checkpoint is no easier to read, forge or
replay than a gradient. Without one (tests, a store on one machine) frames are
plain. The receiver writes into a fresh ``.incoming-*`` directory, checks
every size and sha256 against the manifest it received, and only then renames
the directory into place: an interrupted transfer leaves nothing that is
listed, and the next attempt simply starts over (`CheckpointStore.clean`
removes the leftovers). The manifest is sent last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from meshtrain import wire
from meshtrain.checkpoints.store import MANIFEST, PART_RECORD, CheckpointInfo, CheckpointStore, sha256_of
from meshtrain.errors import MeshtrainError, UserError, WireError
from meshtrain.security.channel import accept_channel, dial_channel
from meshtrain.security.handshake import NonceMemory
from meshtrain.security.secret import Keyring

__all__ = [
    "CHUNK_BYTES",
    "CheckpointServer",
    "TransferError",
    "fetch_checkpoint",
    "fetch_newest",
    "list_remote",
    "replicate_checkpoint",
]

CHUNK_BYTES = 1 << 20
KINDS = (
    "ckpt.fetch",
    "ckpt.push",
    "ckpt.list",
    "ckpt.offer",
    "ckpt.data",
    "ckpt.end",
    "ckpt.ok",
    "ckpt.error",
)
for _kind in KINDS:
    wire.register_kind(_kind)


class TransferError(MeshtrainError):
    """The other side refused, or the bytes that arrived do not match their manifest."""


class Link(Protocol):
    """How frames go over one transfer connection: an authenticated Channel, or plain."""

    async def write(
        self,
        writer: asyncio.StreamWriter,
        header: dict[str, Any],
        payload: bytes | bytearray | memoryview = b"",
    ) -> None: ...

    async def read(self, reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]: ...


class _Plain:
    """No secret: untagged frames (a store on one machine, tests)."""

    async def write(
        self,
        writer: asyncio.StreamWriter,
        header: dict[str, Any],
        payload: bytes | bytearray | memoryview = b"",
    ) -> None:
        await wire.write_frame(writer, header, payload)

    async def read(self, reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
        return await wire.read_frame(reader)


async def _dial(host: str, port: int, keyring: Keyring | None) -> tuple[Any, asyncio.StreamWriter, Link]:
    reader, writer = await asyncio.open_connection(host, port)
    if keyring is None:
        return reader, writer, _Plain()
    try:
        return reader, writer, await dial_channel(reader, writer, keyring, {"role": "ckpt"})
    except BaseException:
        writer.close()
        raise


def _file_list(info: CheckpointInfo) -> dict[str, int]:
    """Every file of a checkpoint directory, manifest last (so it lands only after the data)."""
    manifest = json.loads((info.path / MANIFEST).read_text())
    names = [*manifest["files"], PART_RECORD, MANIFEST]
    return {name: (info.path / name).stat().st_size for name in names if (info.path / name).exists()}


async def _send_files(
    writer: asyncio.StreamWriter, directory: Path, files: dict[str, int], link: Link
) -> None:
    for name in files:
        with open(directory / name, "rb") as f:
            offset = 0
            # a fresh buffer per chunk: from Python 3.12 the transport keeps (does not copy) what it has
            # not sent yet, and drain() returns below its high-water mark, so a reused one is overwritten
            while chunk := f.read(CHUNK_BYTES):
                await link.write(writer, {"kind": "ckpt.data", "name": name, "offset": offset}, chunk)
                offset += len(chunk)
    await link.write(writer, {"kind": "ckpt.end"})


def _check_files(files: Any) -> dict[str, int]:
    if not isinstance(files, dict) or MANIFEST not in files:
        raise TransferError("offer without a manifest")
    for name, size in files.items():
        if (
            not isinstance(name, str)
            or "/" in name
            or "\\" in name
            or name.startswith(".")
            or not isinstance(size, int)
        ):
            raise TransferError(f"bad file entry {name!r}")
    return files


async def _receive_files(
    reader: asyncio.StreamReader,
    store: CheckpointStore,
    run: str,
    step: int,
    files: dict[str, int],
    link: Link,
) -> CheckpointInfo:
    incoming = store.incoming_dir(run, step)
    handles: dict[str, Any] = {}
    try:
        while True:
            header, payload = await link.read(reader)
            if header["kind"] == "ckpt.end":
                break
            if header["kind"] != "ckpt.data":
                raise TransferError(f"unexpected {header['kind']} frame in a checkpoint transfer")
            name, offset = header.get("name"), header.get("offset")
            if name not in files or not isinstance(offset, int) or offset + len(payload) > files[name]:
                raise TransferError(f"data for {name!r} outside its offered size")
            f = handles.get(name)
            if f is None:
                f = handles[name] = open(incoming / name, "wb")  # noqa: SIM115 - closed in finally
            if f.tell() != offset:
                raise TransferError(f"data for {name!r} out of order")
            f.write(payload)
        for f in handles.values():
            f.close()
        _verify_incoming(incoming, files)
        return await asyncio.to_thread(store.install, run, step, incoming)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    finally:
        for f in handles.values():
            f.close()


def _verify_incoming(incoming: Path, files: dict[str, int]) -> None:
    for name, size in files.items():
        path = incoming / name
        if not path.exists() and size == 0:
            path.touch()
        if not path.exists() or path.stat().st_size != size:
            raise TransferError(f"{name} arrived truncated")
    manifest = json.loads((incoming / MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        if name not in files or sha256_of(incoming / name) != entry["sha256"]:
            raise TransferError(f"{name} does not match its manifest")


class CheckpointServer:
    """Serves this node's complete checkpoints and accepts replicas pushed to it."""

    def __init__(self, store: CheckpointStore, *, keyring: Keyring | None = None) -> None:
        self.store = store
        self.keyring = keyring
        self._nonces = NonceMemory()  # one per listening socket: a replayed hello is refused
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link: Link = _Plain()
        try:
            if self.keyring is not None:
                link = await accept_channel(reader, writer, self.keyring, self._nonces)
            header, _ = await link.read(reader)
            kind = header["kind"]
            run, step = header.get("run"), header.get("step")
            if kind == "ckpt.list":
                steps = [i.step for i in await asyncio.to_thread(self.store.checkpoints, str(run))]
                await link.write(writer, {"kind": "ckpt.ok", "steps": steps})
            elif kind == "ckpt.fetch":
                info = await asyncio.to_thread(
                    self.store.find, str(run), step if isinstance(step, int) else None
                )
                files = await asyncio.to_thread(_file_list, info)
                offer = {"kind": "ckpt.offer", "run": info.run, "step": info.step, "files": files}
                await link.write(writer, offer)
                await _send_files(writer, info.path, files, link)
            elif kind == "ckpt.push" and isinstance(step, int):
                files = _check_files(header.get("files"))
                info = await _receive_files(reader, self.store, str(run), step, files, link)
                await link.write(writer, {"kind": "ckpt.ok", "steps": [info.step]})
            else:
                raise TransferError(f"unexpected request {kind!r}")
        except (UserError, TransferError) as exc:
            with contextlib.suppress(ConnectionError, WireError):
                await link.write(writer, {"kind": "ckpt.error", "message": str(exc)})
        except (WireError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            # a stranger or a forged frame: the handshake already answered a refusal
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _expect(reader: asyncio.StreamReader, kind: str, link: Link) -> dict[str, Any]:
    header, _ = await link.read(reader)
    if header["kind"] == "ckpt.error":
        raise TransferError(str(header.get("message", "refused")))
    if header["kind"] == wire.FrameKind.HELLO and header.get("error"):  # we came without the secret
        raise WireError(f"authentication failed: {header.get('reason', 'the node requires the mesh secret')}")
    if header["kind"] != kind:
        raise TransferError(f"expected {kind}, got {header['kind']}")
    return header


async def list_remote(host: str, port: int, run: str, *, keyring: Keyring | None = None) -> list[int]:
    """The complete checkpoint steps of `run` on the node at host:port."""
    reader, writer, link = await _dial(host, port, keyring)
    try:
        await link.write(writer, {"kind": "ckpt.list", "run": run})
        reply = await _expect(reader, "ckpt.ok", link)
        return [int(s) for s in reply.get("steps", [])]
    finally:
        writer.close()


async def fetch_checkpoint(
    host: str,
    port: int,
    run: str,
    step: int | None,
    *,
    store: CheckpointStore,
    keyring: Keyring | None = None,
) -> CheckpointInfo:
    """Copy RUN@STEP (the newest with None) from the node at host:port into `store`."""
    reader, writer, link = await _dial(host, port, keyring)
    try:
        await link.write(writer, {"kind": "ckpt.fetch", "run": run, "step": step})
        offer = await _expect(reader, "ckpt.offer", link)
        files = _check_files(offer.get("files"))
        got_step = offer.get("step")
        if (
            offer.get("run") != run
            or not isinstance(got_step, int)
            or (step is not None and got_step != step)
        ):
            raise TransferError("the offer does not match the request")
        return await _receive_files(reader, store, run, got_step, files, link)
    finally:
        writer.close()


async def replicate_checkpoint(
    host: str, port: int, run: str, step: int, *, store: CheckpointStore, keyring: Keyring | None = None
) -> None:
    """Push our complete RUN@STEP to the node at host:port (which keeps it as a replica)."""
    info = await asyncio.to_thread(store.find, run, step)
    files = await asyncio.to_thread(_file_list, info)
    reader, writer, link = await _dial(host, port, keyring)
    try:
        await link.write(writer, {"kind": "ckpt.push", "run": run, "step": step, "files": files})
        await _send_files(writer, info.path, files, link)
        await _expect(reader, "ckpt.ok", link)
    finally:
        writer.close()


async def fetch_newest(
    peers: Iterable[tuple[str, int]], run: str, *, store: CheckpointStore, keyring: Keyring | None = None
) -> CheckpointInfo | None:
    """Resume support: the newest complete checkpoint of `run` among this node and `peers`,
    fetched here if another node has a newer one. Unreachable peers are skipped; a failed
    fetch falls back to the next-best copy (another replica, or an older checkpoint)."""
    local = store.latest(run)
    offers: list[tuple[int, tuple[str, int]]] = []
    for host, port in peers:
        try:
            steps = await asyncio.wait_for(list_remote(host, port, run, keyring=keyring), 10.0)
        except (OSError, MeshtrainError, asyncio.TimeoutError):
            continue
        if steps:
            offers.append((max(steps), (host, port)))
    for step, (host, port) in sorted(offers, key=lambda o: -o[0]):
        if local is not None and local.step >= step:
            break
        try:
            return await fetch_checkpoint(host, port, run, step, store=store, keyring=keyring)
        except (OSError, MeshtrainError, asyncio.TimeoutError):
            continue
    return local
