"""Exact broadcasts over a ring all-reduce: one member's bytes or arrays to every member.

A weighted mean where the source weighs 1 and everyone else adds zeros with
weight 0 is the source's buffer, bit for bit, in float32 (x*1 + 0 + ... = x,
then /1). So state transfer rides the data plane the job already has: the
ring's chunked, pipelined, authenticated links, with no extra port, socket or
handshake. Floating leaves travel as float32 (a widening cast, exact for
bf16/fp16); any other leaf (integer counters, say) and raw bytes travel as
16-bit words, which float32 holds exactly.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

__all__ = ["broadcast_bytes", "broadcast_tree"]

BROADCAST_STEP = -2  # the step label of broadcast frames (never a training step)


class _Reducer(Protocol):
    def allreduce(
        self, buf: np.ndarray, step: int = 0, weight: float = 1.0, wire_dtype: str | None = None
    ) -> np.ndarray: ...


def _exact(ring: _Reducer, buf: np.ndarray, source: bool) -> np.ndarray:
    send = buf if source else np.zeros_like(buf)
    return ring.allreduce(send, step=BROADCAST_STEP, weight=1.0 if source else 0.0, wire_dtype="float32")


def broadcast_bytes(ring: _Reducer, data: bytes | None, source: bool) -> bytes:
    """The source's `data` on every member (the others pass None)."""
    length = len(data) if source and data is not None else 0
    head = np.array([length & 0xFFFF, (length >> 16) & 0xFFFF, (length >> 32) & 0xFFFF], np.float32)
    words = np.rint(_exact(ring, head, source)).astype(np.int64)
    n = int(words[0]) | int(words[1]) << 16 | int(words[2]) << 32
    padded = (data or b"") + b"\0" * (n % 2) if source else bytes(n + n % 2)
    body = np.frombuffer(padded, np.uint16).astype(np.float32)
    out = np.rint(_exact(ring, body, source)).astype(np.uint16)
    return out.tobytes()[:n]


def broadcast_tree(ring: _Reducer, tree: Any, source: bool) -> Any:
    """The source's MLX array tree on every member; `tree` is each member's own (same structure)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map_with_path

    every: list[tuple[str, Any]] = list(tree_flatten(tree))  # type: ignore[arg-type]
    leaves = [(k, v) for k, v in every if isinstance(v, mx.array)]  # other leaves stay the member's own
    floats = [(k, v) for k, v in leaves if mx.issubdtype(v.dtype, mx.floating)]
    others = [(k, v) for k, v in leaves if not mx.issubdtype(v.dtype, mx.floating)]
    out: dict[str, Any] = {}
    if floats:
        flat = np.concatenate([np.asarray(v.astype(mx.float32)).reshape(-1) for _, v in floats])
        got = _exact(ring, np.ascontiguousarray(flat, np.float32), source)
        start = 0
        for k, v in floats:
            out[k] = mx.array(got[start : start + v.size].reshape(v.shape)).astype(v.dtype)
            start += v.size
    if others:
        raw = b"".join(np.asarray(v).tobytes() for _, v in others)
        got_raw = broadcast_bytes(ring, raw, source)
        start = 0
        for k, v in others:
            n = np.asarray(v).nbytes
            arr = np.frombuffer(got_raw[start : start + n], np.asarray(v).dtype).reshape(v.shape)
            out[k] = mx.array(arr)
            start += n
    # in the member's own structure (tree_map keeps empty dicts and lists; an unflatten of the
    # leaves would lose them, and with them a parameter-free submodule's optimizer state)
    return tree_map_with_path(lambda path, leaf: out.get(path, leaf), tree)
