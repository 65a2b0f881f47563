"""The IDX format (MNIST, Fashion-MNIST): a big-endian header, then raw uint8 values.

Shared by every loader of that family so each reports a broken file the same
way: a `UserError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from meshtrain.errors import UserError

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


def read_maybe_gz(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is named `.gz`."""
    data = path.read_bytes()
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path} is not a valid gzip file ({exc}); download it again") from None


def parse_idx(data: bytes, magic: int, origin: str, kind: str = "MNIST") -> np.ndarray:
    """Decode one IDX file (big-endian header, then raw uint8 payload) without copying."""
    ndim = magic & 0xFF
    header = struct.Struct(f">I{ndim}I")
    found_magic = int.from_bytes(data[:4], "big")
    if len(data) >= 4 and found_magic != magic:
        article = "an" if kind[:1] in "AEIMOU" else "a"  # "an MNIST", "a Fashion-MNIST"
        raise UserError(
            f"{origin} is not {article} {kind} IDX file (magic {found_magic:#010x}, want {magic:#010x})"
        )
    if len(data) < header.size:
        raise UserError(f"{origin} is truncated: {len(data)} bytes, shorter than its header")
    _, *dims = header.unpack_from(data)
    payload = len(data) - header.size
    want = int(np.prod(dims))
    if payload != want:
        state = "truncated" if payload < want else "longer than its header says"
        raise UserError(f"{origin} is {state}: {payload} data bytes for shape {tuple(dims)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header.size).reshape(dims)


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (for tests, mirrors and users)."""
    magic = 0x0800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + np.ascontiguousarray(array).tobytes()
