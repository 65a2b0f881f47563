"""The user's own data in the common formats: text files, `.npy`/`.npz` arrays, token files.

Each helper reads what is on this node's disk (with `meshtrain run --data`, the
same relative path on every node) and turns every way a file can be wrong into
one `UserError` naming it. Token files are memory-mapped, not read, so a
corpus larger than RAM trains: a batch touches only the pages its windows
need, and the operating system shares those pages between workers on one
machine.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from meshtrain.data.shakespeare import Corpus, split_play
from meshtrain.errors import UserError

TOKEN_DTYPES = ("uint8", "uint16", "int32", "uint32")


def text_files(path: str | os.PathLike[str], pattern: str = "*.txt", validation: float = 0.1) -> Corpus:
    """A text file, or every file matching `pattern` under a directory (sorted, recursive), as a Corpus:
    the last `validation` fraction of each file's lines is validation text, as for `shakespeare()`."""
    root = _existing(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob(pattern) if p.is_file())
    if not files:
        raise UserError(f"{root} holds no files matching {pattern!r}")
    if not 0.0 < validation < 1.0:
        raise UserError(f"validation fraction {validation} must be between 0 and 1")
    train, held, titles = [], [], []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{file} is not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise UserError(f"{file} is unreadable ({exc.strerror or exc})") from None
        head, tail = split_play(text if text.endswith("\n") else text + "\n", validation)
        train.append(head)
        held.append(tail)
        titles.append(str(file.relative_to(root)) if root.is_dir() else file.name)
    return Corpus(train="".join(train), validation="".join(held), titles=tuple(titles))


def arrays(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The arrays of a `.npy` (key "array", memory-mapped) or `.npz` file (read lazily, key by key).

    Pickled objects are refused (`allow_pickle=False`): an array file must not run code."""
    file = _existing(path)
    try:
        if file.suffix == ".npy":
            return {"array": np.load(file, mmap_mode="r", allow_pickle=False)}
        if file.suffix == ".npz":
            with np.load(file, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"{file} is not a readable numpy file ({exc})") from None
    raise UserError(f"{file}: want a .npy or .npz file")


def token_file(path: str | os.PathLike[str], dtype: str = "uint16") -> np.memmap:
    """A flat file of token ids (`write_tokens` makes one), memory-mapped read-only."""
    file = _existing(path)
    if dtype not in TOKEN_DTYPES:
        raise UserError(f"token dtype {dtype!r}: use one of {', '.join(TOKEN_DTYPES)}")
    size, item = file.stat().st_size, np.dtype(dtype).itemsize
    if size == 0 or size % item:
        raise UserError(f"{file} is {size} bytes, not a whole number of {dtype} tokens")
    try:
        return np.memmap(file, dtype=dtype, mode="r")
    except (OSError, ValueError) as exc:
        raise UserError(f"{file} cannot be mapped ({exc})") from None


def write_tokens(path: str | os.PathLike[str], ids: np.ndarray, dtype: str = "uint16") -> Path:
    """Write token ids as a flat `dtype` file, atomically (temp file + rename); ids must fit `dtype`."""
    if dtype not in TOKEN_DTYPES:
        raise UserError(f"token dtype {dtype!r}: use one of {', '.join(TOKEN_DTYPES)}")
    ids = np.asarray(ids)
    info = np.iinfo(dtype)
    if ids.size and (int(ids.min()) < info.min or int(ids.max()) > info.max):
        raise UserError(f"token ids {int(ids.min())}..{int(ids.max())} do not fit {dtype}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(np.ascontiguousarray(ids, dtype=dtype).tobytes())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _existing(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p} does not exist")
    if not os.access(p, os.R_OK):
        raise UserError(f"{p} is not readable (permissions)")
    return p
