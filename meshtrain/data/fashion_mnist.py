"""Fashion-MNIST (Zalando, MIT) from Debian's `dataset-fashion-mnist` package, offline.

Ten classes of 28x28 grey clothing images, 60,000 for training and 10,000 for
testing, in MNIST's IDX format. No PyPI package ships it without a run-time
download, so the loader reads the files that `apt-get install -y
dataset-fashion-mnist` puts in /usr/share/datasets/fashion-mnist (or a
directory of the same four files anywhere: `data_dir=` or
$MESHTRAIN_FASHION_MNIST). Decoding both splits from gzip takes a fraction of
a second, so there is no cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from meshtrain.data.idx import IMAGES_MAGIC, LABELS_MAGIC, parse_idx, read_maybe_gz
from meshtrain.errors import UserError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_DIR = "MESHTRAIN_FASHION_MNIST"
SPLITS = ("train", "test")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
EXPECTED_COUNTS = {"train": 60_000, "test": 10_000}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MEAN, STD = 0.2860, 0.3530  # of the training pixels scaled to [0, 1]
KIND = "Fashion-MNIST"


def fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return Fashion-MNIST `split` as (images uint8 (n, 28, 28), labels uint8 (n,), classes 0..9)."""
    if split not in SPLITS:
        raise UserError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    directory = _directory(data_dir)
    paths = []
    for stem in FILES[split]:
        found = next((directory / n for n in (stem + ".gz", stem) if (directory / n).is_file()), None)
        if found is None:
            raise UserError(
                f"Fashion-MNIST not found ({directory / (stem + '.gz')} is missing): install it with "
                f"`apt-get install -y dataset-fashion-mnist`, or set ${ENV_DIR} to its IDX files' directory"
            )
        paths.append(found)
    images = parse_idx(read_maybe_gz(paths[0]), IMAGES_MAGIC, str(paths[0]), KIND)
    labels = parse_idx(read_maybe_gz(paths[1]), LABELS_MAGIC, str(paths[1]), KIND)
    if images.shape[1:] != (28, 28):
        raise UserError(f"{paths[0]}: images have shape {images.shape}, want (n, 28, 28)")
    if labels.shape != (images.shape[0],):
        raise UserError(f"{directory}: {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise UserError(f"{paths[1]}: labels go up to {int(labels.max())}, want classes 0..9")
    if directory == DEBIAN_DIR and len(labels) != EXPECTED_COUNTS[split]:
        raise UserError(
            f"{paths[0]}: {len(labels)} {split} images, want {EXPECTED_COUNTS[split]}; reinstall with "
            "`apt-get install --reinstall dataset-fashion-mnist`"
        )
    return images, labels


def _directory(data_dir: str | os.PathLike[str] | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else DEBIAN_DIR
