"""Hand a full training state to a member that is behind, over one TCP socket.

    send_state(sock, {"params": ..., "opt": ...}, {"step": s, "sampler": ...})   # the member ahead
    tree, meta = recv_state(sock, template_tree)                                    # the member behind

The stream is meshtrain.wire frames of kind ``state``: a ``begin`` header
(meta and the layout of every array leaf), ``data`` frames of at most
`chunk_bytes` whose payloads go to the socket straight from the arrays'
memory and land in one buffer preallocated from the receiver's *template*
(so a hostile or confused sender can never make it allocate more than its own
model's size), and an ``end`` frame carrying a blake2b of all bytes sent.
Never one giant msgpack. Blocking sockets: call it from a worker thread.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from typing import Any, cast

import numpy as np

from meshtrain import wire
from meshtrain.errors import WireError
from meshtrain.train.digest import array_leaves, leaf_bytes

__all__ = ["send_state", "recv_state", "DEFAULT_CHUNK_BYTES", "MAX_BEGIN_HEADER"]

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_BEGIN_HEADER = 8 << 20  # the begin header lists every leaf; big models have thousands
KIND = wire.FrameKind.STATE


def _send_frame(
    sock: socket.socket, header: dict[str, Any], payload: memoryview | bytes, key: bytes | None
) -> None:
    header = {**header, "kind": KIND, "nbytes": memoryview(payload).nbytes}
    if key is not None:
        header["tag"] = wire.payload_tag(key, header, payload)
    sock.sendall(wire.encode_header(header))
    if header["nbytes"]:
        sock.sendall(payload)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise WireError("state stream ended early")
        got += n


def _recv_header(sock: socket.socket, max_header: int, max_payload: int) -> dict[str, Any]:
    prefix = bytearray(wire.LENGTH_PREFIX.size)
    _recv_into(sock, memoryview(prefix))
    length = wire.header_length(prefix, max_header=max_header)
    raw = bytearray(length)
    _recv_into(sock, memoryview(raw))
    header = wire.decode_header(raw, max_payload=max_payload)
    if header["kind"] != KIND:
        raise WireError(f"expected a state frame, got {header['kind']!r}")
    return header


def _chunks(view: memoryview, chunk_bytes: int) -> Iterator[memoryview]:
    for start in range(0, view.nbytes, chunk_bytes):
        yield view[start : start + chunk_bytes]


def _layout(tree: Any) -> list[tuple[str, Any, list[int], int]]:
    return [(path, leaf, list(leaf.shape), leaf.nbytes) for path, leaf in array_leaves(tree)]


def send_state(
    sock: socket.socket,
    tree: Any,
    meta: dict[str, Any],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    key: bytes | None = None,
) -> int:
    """Stream every array leaf of `tree` plus `meta` (msgpack-able) to `sock`; returns bytes sent."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    layout = _layout(tree)
    leaves = [[path, str(leaf.dtype), shape, nbytes] for path, leaf, shape, nbytes in layout]
    total = sum(nbytes for *_, nbytes in layout)
    _send_frame(sock, {"part": "begin", "meta": meta, "leaves": leaves, "total": total}, b"", key)
    h = hashlib.blake2b(digest_size=16)
    seq = 0
    for _, leaf, _, _ in layout:
        for chunk in _chunks(leaf_bytes(leaf), chunk_bytes):
            h.update(chunk)
            _send_frame(sock, {"part": "data", "seq": seq}, chunk, key)
            seq += 1
    _send_frame(sock, {"part": "end", "seq": seq, "hash": h.digest()}, b"", key)
    return total


def recv_state(
    sock: socket.socket,
    template_tree: Any,
    *,
    max_chunk_bytes: int = 64 << 20,
    key: bytes | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Receive a state sent by `send_state` into a tree shaped like `template_tree`: (tree, meta).

    The sender's leaves must match the template's paths, dtypes and shapes
    (same model, same optimizer), else WireError before any bulk byte is read.
    """
    import mlx.core as mx
    from mlx.utils import tree_map

    begin = _recv_header(sock, MAX_BEGIN_HEADER, 0)
    if key is not None:
        wire.check_tag(key, begin)
    layout = _layout(template_tree)
    expected = [[path, str(leaf.dtype), shape, nbytes] for path, leaf, shape, nbytes in layout]
    if begin.get("part") != "begin" or begin.get("leaves") != expected:
        raise WireError(
            "state stream does not match this model and optimizer (different leaves, shapes or dtypes)"
        )
    total = sum(nbytes for *_, nbytes in layout)
    buf = np.empty(total, np.uint8)
    view = memoryview(cast(Any, buf))
    h = hashlib.blake2b(digest_size=16)
    offset, seq = 0, 0
    while True:
        header = _recv_header(sock, wire.DEFAULT_MAX_HEADER, max_chunk_bytes)
        n = header["nbytes"]
        if header.get("part") == "end":
            if key is not None:
                wire.check_tag(key, header)
            break
        if header.get("part") != "data" or header.get("seq") != seq or offset + n > total:
            raise WireError(
                f"unexpected state frame {header.get('part')!r} #{header.get('seq')} at byte {offset}"
            )
        target = view[offset : offset + n]
        _recv_into(sock, target)
        if key is not None:
            wire.check_tag(key, header, target)
        h.update(target)
        offset, seq = offset + n, seq + 1
    if offset != total or header.get("seq") != seq or header.get("hash") != h.digest():
        raise WireError(f"state stream incomplete or corrupted ({offset} of {total} bytes)")

    arrays: list[Any] = []
    start = 0
    for _, leaf, shape, nbytes in layout:
        raw = mx.array(buf[start : start + nbytes])
        start += nbytes
        if leaf.dtype == mx.bool_:
            arr = raw.reshape(shape).astype(mx.bool_)
        else:
            arr = raw.view(leaf.dtype).reshape(shape) if nbytes else mx.zeros(shape, leaf.dtype)
        arrays.append(arr)
    mx.eval(arrays)
    position = iter(arrays)

    def rebuild(leaf: Any) -> Any:
        return next(position) if isinstance(leaf, mx.array) else leaf

    return tree_map(rebuild, template_tree), dict(begin.get("meta") or {})
