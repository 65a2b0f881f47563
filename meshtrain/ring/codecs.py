"""The wire codecs: how a float32 buffer travels between ring members, one definition each.

A codec has a name (what users pass as `wire_dtype`), a code (what the recovery
status vector and frame headers carry), the numpy storage type of its bytes on
the wire, and encode/decode between float32 and that storage. Sums are always
taken in float32: a codec only changes what travels. Every side that needs to
know about wire formats -- the fused-buffer casts, the reduction, recovery's
status vector, the Mesh API's "auto" choice -- asks this registry, so a new
codec (int8 with a scale, 4-bit) is one `register` call, not six edits.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshtrain.errors import UserError

__all__ = ["CODECS", "WIRE_AUTO", "WireCodec", "by_code", "codec", "names", "register", "resolve"]

WIRE_AUTO = "auto"

_LITTLE_ENDIAN = sys.byteorder == "little"

Cast = Callable[[np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class WireCodec:
    name: str
    code: int  # 1..255; 0 means "none" in recovery's status vector
    storage: np.dtype
    encode: Cast  # float32 src -> storage out (same length)
    decode: Cast  # storage src -> float32 out (same length)
    exact: bool = False  # float32 itself: sends go straight from the accumulator

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize


def _narrow(src: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, src, casting="same_kind")


def _widen(src: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, src)


def _bf16_encode(src: np.ndarray, out: np.ndarray) -> None:
    """The high half of each float32 after adding half an ulp (round to nearest, ties away from
    zero): two passes, twice as fast as exact round-half-to-even, the same except on exact ties."""
    rounded = np.add(src.view(np.uint32), np.uint32(0x8000))
    high = rounded.view(np.uint16)[1::2] if _LITTLE_ENDIAN else rounded.view(np.uint16)[0::2]
    np.copyto(out, high)


def _bf16_decode(src: np.ndarray, out: np.ndarray) -> None:
    bits = out.view(np.uint32)
    np.copyto(bits, src, casting="unsafe")
    bits <<= 16


CODECS: dict[str, WireCodec] = {}
_BY_CODE: dict[int, WireCodec] = {}


def register(c: WireCodec) -> WireCodec:
    if c.name in CODECS or c.code in _BY_CODE or not 0 < c.code < 256:
        raise ValueError(f"codec {c.name!r} (code {c.code}) clashes or has a code outside 1..255")
    CODECS[c.name] = c
    _BY_CODE[c.code] = c
    return c


register(WireCodec("float32", 1, np.dtype(np.float32), _narrow, _widen, exact=True))
register(WireCodec("bfloat16", 2, np.dtype(np.uint16), _bf16_encode, _bf16_decode))  # numpy has no bf16
register(WireCodec("float16", 3, np.dtype(np.float16), _narrow, _widen))


def names() -> tuple[str, ...]:
    return tuple(CODECS)


def codec(wire_dtype: object) -> WireCodec:
    """The codec a user's `wire_dtype` names (None: float32; an mx.Dtype works); UserError if none."""
    name = "float32" if wire_dtype is None else str(wire_dtype).replace("mlx.core.", "")
    found = CODECS.get(name)
    if found is None:
        raise UserError(f"wire_dtype must be one of {', '.join(CODECS)} (got {wire_dtype!r})")
    return found


def by_code(code: int) -> WireCodec | None:
    return _BY_CODE.get(code)


def resolve(tree: Any, wire_dtype: object) -> str:
    """The wire dtype an all-reduce of `tree` uses; "auto" decides by what is reduced.

    Why bfloat16 for fp32 models: gradients and parameter deltas keep their
    float32 range in bf16 and lose only mantissa bits that SGD noise swamps,
    while the bytes on the wire halve (the sum itself stays float32). "auto"
    therefore means bfloat16 for an MLX array tree whose floating leaves are
    all float32 or bfloat16, float16 for an all-float16 tree, and float32
    for anything else, including a raw numpy buffer, the low-level path for
    exact sums (metrics, counters). A name outside float32, bfloat16,
    float16 and auto is a UserError.
    """
    if wire_dtype != WIRE_AUTO:
        return codec(wire_dtype).name
    if isinstance(tree, np.ndarray):
        return "float32"
    kinds = {str(leaf.dtype).replace("mlx.core.", "") for leaf in _leaves(tree) if hasattr(leaf, "dtype")}
    kinds = {k for k in kinds if k.startswith(("float", "bfloat"))}
    if kinds and kinds <= {"float32", "bfloat16"}:
        return "bfloat16"
    if kinds == {"float16"}:
        return "float16"
    return "float32"


def _leaves(tree: Any) -> Iterator[Any]:
    """The leaves of a nested dict/list/tuple tree (MLX's tree shape), without importing MLX."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree


# --- qint8: pre-scaled integers (meshtrain.train.compression), for local SGD's compressed outer sync ---
def _qint8_encode(src: np.ndarray, out: np.ndarray) -> None:
    """Round to the nearest integer and saturate at +-127. Exact for the integers it is made for:
    each member sends integers on a grid the members agreed on, whose partial sums stay inside +-127,
    so every hop of the ring (a sum of integers, re-encoded) is lossless."""
    np.copyto(out, np.clip(np.rint(src), -127.0, 127.0), casting="unsafe")


def _qint8_decode(src: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, src, casting="unsafe")


register(WireCodec("qint8", 4, np.dtype(np.int8), _qint8_encode, _qint8_decode))
