"""`Ring`: the synchronous all-reduce a worker calls.

Each call builds the pure schedule and reduction for this buffer and streams
it over the two neighbour sockets (meshtrain.ring.streams): the calling
thread receives and reduces, a persistent sender thread writes. Any failure
ends the ring's generation: an abort naming the lost peer runs around the
ring, every survivor raises PeerLost (peer "host:port", `.rank`, generation)
within milliseconds, and every later call on the broken ring raises it again.
The worker then closes the ring and forms generation g+1.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from meshtrain.errors import PeerLost
from meshtrain.ring import codecs, tensors
from meshtrain.ring.reduction import RingReduction
from meshtrain.ring.schedule import RingSchedule
from meshtrain.ring.streams import LinkFailed, RingLink
from meshtrain.ring.tcp import Neighbours, RingListener, connect_neighbours, peer_lost
from meshtrain.security.secret import Keyring

DEFAULT_CHUNK_BYTES = 1 << 20


class Ring:
    """A connected ring of `size` members in which this process is `rank`."""

    def __init__(
        self,
        rank: int,
        addrs: list[tuple[str, int]],
        job: str,
        generation: int,
        timeout: float,
        sockets: tuple[socket.socket, socket.socket] | Neighbours | None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.rank = rank
        self.size = len(addrs)
        self.addrs = addrs
        self.job = job
        self.generation = generation
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        if isinstance(sockets, tuple):
            sockets = Neighbours(*sockets)
        self.authenticated = sockets is not None and sockets.right_key is not None
        self._link = (
            RingLink(sockets.left, sockets.right, timeout, sockets.left_key, sockets.right_key)
            if sockets is not None
            else None
        )
        self._broken: PeerLost | None = None
        self._buffers: dict[str, np.ndarray] = {}
        self.last_stats: dict[str, float] = {}

    @classmethod
    def connect(
        cls,
        listener: RingListener,
        rank: int,
        addrs: list[tuple[str, int]],
        job: str,
        generation: int,
        timeout: float = 10.0,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        sockbuf: int | None = None,
        keyring: Keyring | None = None,
        cancel: threading.Event | None = None,
    ) -> Ring:
        """Form the ring (blocking): connect right, accept left, both checked for job and generation.

        With `keyring` (the mesh secret) both neighbours must prove they hold it, and
        every frame carries an HMAC-SHA256 tag under a per-connection session key; a
        neighbour without the secret is PeerLost ("authentication failed: ...").
        `cancel` set (a newer membership view) ends the attempt at once (ConnectCancelled).
        """
        addrs = [(str(h), int(p)) for h, p in addrs]
        if not 0 <= rank < len(addrs):
            raise ValueError(f"rank {rank} outside a ring of {len(addrs)}")
        if len(addrs) == 1:
            return cls(rank, addrs, job, generation, timeout, None, chunk_bytes)
        neighbours = connect_neighbours(
            listener, rank, addrs, job, generation, timeout, sockbuf, keyring, cancel=cancel
        )
        return cls(rank, addrs, job, generation, timeout, neighbours, chunk_bytes)

    # --- public all-reduce -----------------------------------------------------------
    def allreduce(
        self, buf: np.ndarray, step: int = 0, weight: float = 1.0, wire_dtype: str | None = None
    ) -> np.ndarray:
        """sum(w_i * x_i) / sum(w_i) over the ring, identical on every member, in a new array.

        `buf` (1-D float32) is only read; at world size 1 it is returned as is.
        """
        name = tensors.wire_dtype_name(wire_dtype)
        x = np.ascontiguousarray(buf)
        if x.ndim != 1 or x.dtype != np.float32:
            raise ValueError("allreduce takes a 1-D float32 numpy array")
        self._check_alive()
        if self.size == 1:
            return x
        src = x if weight == 1.0 else np.multiply(x, np.float32(weight))
        out = np.empty_like(x)
        self.reduce_into(src, out, step=step, weight=weight, wire_dtype=name)
        return out

    def allreduce_tree(
        self, tree: Any, step: int = 0, weight: float = 1.0, wire_dtype: str | None = None
    ) -> Any:
        """Weighted mean of an MLX array tree, fused into one buffer; same structure (and dtypes) back."""
        name = tensors.wire_dtype_name(wire_dtype)
        self._check_alive()
        if self.size == 1:
            return tree
        flat, layout = tensors.flatten_tree(tree, lambda n: self._cached("flat", n, np.dtype(np.float32)))
        if weight != 1.0:
            flat *= np.float32(weight)
        out = self._cached("out", flat.size, np.dtype(np.float32))  # unflatten copies it into MLX
        self.reduce_into(flat, out, step=step, weight=weight, wire_dtype=name)
        return tensors.unflatten_tree(tree, out, layout)

    def reduce_into(
        self,
        src: np.ndarray,
        out: np.ndarray,
        step: int = 0,
        weight: float = 1.0,
        wire_dtype: str = "float32",
    ) -> np.ndarray:
        """The core call: `out` = weighted mean, where `src` is this member's buffer already times `weight`.

        `src` is only read; `out` is a different float32 buffer of the same length.
        """
        self._check_alive()
        if not weight >= 0:
            raise ValueError(f"all-reduce weight must be >= 0 (got {weight})")
        if self.size == 1:
            np.multiply(src, np.float32(1.0 / weight), out=out)
            return out
        wire_codec = codecs.codec(wire_dtype)
        name, wire_type = wire_codec.name, wire_codec.storage
        schedule = RingSchedule(
            self.size, self.rank, src.size, max(1, self.chunk_bytes // wire_type.itemsize)
        )
        wire = None if wire_codec.exact else self._cached("wire", src.size, wire_type)
        reduction = RingReduction(schedule, src, out, weight, name, wire)
        started = time.perf_counter()
        self._stream(reduction, step)
        seconds = time.perf_counter() - started
        nbytes = src.nbytes
        self.last_stats = {
            "bytes": float(nbytes),
            "wire_bytes": float(src.size * wire_type.itemsize),
            "seconds": seconds,
            "busbw": 2 * (self.size - 1) / self.size * nbytes / seconds if seconds > 0 else 0.0,
            "step": float(step),
        }
        return out

    def _cached(self, role: str, size: int, dtype: np.dtype) -> np.ndarray:
        """A buffer reused across steps (no page faults per call), kept per role."""
        buf = self._buffers.get(role)
        if buf is None or buf.size != size or buf.dtype != dtype:
            buf = self._buffers[role] = np.empty(size, dtype)
        return buf

    # --- reduce-scatter and all-gather (meshtrain.ring.collectives) ---------------------
    def reduce_scatter(
        self,
        buf: np.ndarray,
        shards: Sequence[int] | None = None,
        step: int = 0,
        weight: float = 1.0,
        wire_dtype: str | None = None,
        *,
        overwrite: bool = False,
    ) -> np.ndarray:
        """This member's shard of sum(w_i * x_i) / sum(w_i) over the ring, in a new array.

        `buf` is 1-D float32, the whole buffer (the same length on every member);
        `shards` the shard sizes in rank order (default: near-equal). With
        `overwrite` the partial sums accumulate in `buf` itself (no copy of it).
        """
        from meshtrain.ring.collectives import REDUCE_SCATTER, CollectiveSchedule, ReduceScatter

        name = tensors.wire_dtype_name(wire_dtype)
        x, bounds = self._collective_args(buf, shards, buf.size if isinstance(buf, np.ndarray) else -1)
        self._check_alive()
        if not weight >= 0:
            raise ValueError(f"reduce-scatter weight must be >= 0 (got {weight})")
        lo, hi = bounds[self.rank]
        if self.size == 1:
            return x[lo:hi].copy()
        # the partial sums land in `buf` itself (overwrite) or in a buffer kept across calls
        work = x if overwrite else self._cached("scatter", x.size, np.dtype(np.float32))
        src = x
        if weight != 1.0:
            src = np.multiply(x, np.float32(weight), out=work)
        chunk = max(1, self.chunk_bytes // tensors.wire_numpy_dtype(name).itemsize)
        schedule = CollectiveSchedule(REDUCE_SCATTER, self.size, self.rank, bounds, chunk)
        out = np.empty(hi - lo, np.float32)
        op = ReduceScatter(schedule, src, out, weight, name, acc=work)
        self._run_collective(op, step, x.nbytes, name)
        return out

    def all_gather(
        self,
        shard: np.ndarray,
        shards: Sequence[int] | None = None,
        step: int = 0,
        wire_dtype: str | None = None,
        *,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Every member's shard, concatenated in rank order (identical on every member).

        `shard` is this member's 1-D float32 piece; `shards` the sizes in rank
        order (default: all equal to this one's). `out` (float32, the total
        length) is written instead of a new array.
        """
        from meshtrain.ring.collectives import ALL_GATHER, AllGather, CollectiveSchedule

        name = tensors.wire_dtype_name(wire_dtype)
        x = np.ascontiguousarray(shard)
        sizes = list(shards) if shards is not None else [x.size] * self.size
        total = sum(int(s) for s in sizes)
        _, bounds = self._collective_args(np.empty(0, np.float32), sizes, total)
        if x.ndim != 1 or x.dtype != np.float32 or x.size != sizes[self.rank]:
            raise ValueError(
                f"all_gather takes this member's 1-D float32 shard of {sizes[self.rank]} elements"
            )
        self._check_alive()
        if out is None:
            out = np.empty(total, np.float32)
        elif out.dtype != np.float32 or out.ndim != 1 or out.size != total or not out.flags.c_contiguous:
            raise ValueError(f"all_gather's out must be a contiguous 1-D float32 buffer of {total} elements")
        lo, hi = bounds[self.rank]
        out[lo:hi] = x
        if self.size == 1:
            return out
        chunk = max(1, self.chunk_bytes // tensors.wire_numpy_dtype(name).itemsize)
        schedule = CollectiveSchedule(ALL_GATHER, self.size, self.rank, bounds, chunk)
        self._run_collective(AllGather(schedule, out, name), step, out.nbytes, name)
        return out

    def _collective_args(
        self, buf: np.ndarray, shards: Sequence[int] | None, count: int
    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        from meshtrain.ring.collectives import shard_bounds
        from meshtrain.ring.schedule import segment_bounds

        x = np.ascontiguousarray(buf)
        if x.ndim != 1 or x.dtype != np.float32:
            raise ValueError("ring collectives take 1-D float32 numpy arrays")
        if shards is None:
            return x, segment_bounds(x.size, self.size)
        if len(shards) != self.size:
            raise ValueError(f"{len(shards)} shard sizes for a ring of {self.size}")
        bounds = shard_bounds(shards)
        if bounds[-1][1] != count:
            raise ValueError(f"shard sizes sum to {bounds[-1][1]}, the buffer has {count} elements")
        return x, bounds

    def _run_collective(self, op: Any, step: int, nbytes: int, wire_dtype: str) -> None:
        """Stream a reduce-scatter or all-gather; busbw = (N-1)/N * bytes / time (NCCL's convention)."""
        started = time.perf_counter()
        # the streaming shell only uses the schedule/payload/receive interface RingReduction shares
        self._stream(cast(RingReduction, op), step)
        seconds = time.perf_counter() - started
        itemsize = tensors.wire_numpy_dtype(wire_dtype).itemsize
        self.last_stats = {
            "bytes": float(nbytes),
            "wire_bytes": float(nbytes // 4 * itemsize),
            "seconds": seconds,
            "busbw": (self.size - 1) / self.size * nbytes / seconds if seconds > 0 else 0.0,
            "step": float(step),
        }

    def close(self) -> None:
        """Leave the ring: the neighbours see end of stream (PeerLost if they are mid all-reduce)."""
        if self._broken is None:
            self._broken = PeerLost("self", self.generation, "ring closed")
        if self._link is not None:
            self._link.close()
            self._link = None

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the I/O of one all-reduce --------------------------------------------------------
    def _check_alive(self) -> None:
        if self._broken is not None:
            raise self._broken

    def _blame(self, exc: LinkFailed) -> tuple[str, int]:
        """(address, rank) of the neighbour on the side that failed."""
        rank = (self.rank - 1) % self.size if exc.side == "left" else (self.rank + 1) % self.size
        host, port = self.addrs[rank]
        return f"{host}:{port}", rank

    def _stream(self, reduction: RingReduction, step: int) -> None:
        link = self._link
        if link is None:  # closed from another thread (a new membership view) since _check_alive
            raise self._broken or PeerLost("self", self.generation, "ring closed")
        base = {"kind": "chunk", "job": self.job, "gen": self.generation, "step": step}
        base["dtype"] = reduction.wire_dtype
        try:
            link.run_allreduce(reduction, base, self._blame)
        except LinkFailed as exc:
            peer, rank = exc.origin or self._blame(exc)
            reason = f"stalled for more than {self.timeout:g}s" if exc.reason == "stalled" else exc.reason
            if exc.origin is not None:
                reason = f"{reason} (reported around the ring)"
            self._broken = peer_lost(peer, rank, self.generation, reason)
            raise self._broken from None
        except BaseException:
            # interrupted (Ctrl-C) mid-stream: the ring's byte stream is no longer in step
            self._broken = PeerLost("self", self.generation, "all-reduce interrupted")
            self.close()
            raise
