"""The pure rules of `run --data` (meshtrain.data.distribute): the manifest names the bytes, a received
manifest is checked against the name asked for, paths stay inside, transfers resume, disks fill up."""

from __future__ import annotations

import hashlib

import pytest

from meshtrain.data.distribute import (
    DIRECTORY,
    FILE,
    LARGE_BYTES,
    Entry,
    Manifest,
    ManifestError,
    Progress,
    bytes_left,
    check_offsets,
    resume_offsets,
    space_problem,
    worker_relpath,
)

A = hashlib.sha256(b"a").hexdigest()
B = hashlib.sha256(b"bb").hexdigest()


def two_files() -> Manifest:
    return Manifest.build(DIRECTORY, [Entry("z/b.txt", 2, B), Entry("a.txt", 1, A)])


def test_the_digest_names_the_content_whatever_the_listing_order() -> None:
    one = two_files()
    other = Manifest.build(DIRECTORY, [Entry("a.txt", 1, A), Entry("z/b.txt", 2, B)])
    assert one.digest == other.digest and one.to_bytes() == other.to_bytes()
    assert [e.path for e in one.entries] == ["a.txt", "z/b.txt"]
    changed = Manifest.build(DIRECTORY, [Entry("a.txt", 1, B), Entry("z/b.txt", 2, B)])
    assert changed.digest != one.digest
    assert Manifest.from_bytes(one.to_bytes(), expected=one.digest) == one
    assert one.total_bytes == 3


def test_a_manifest_that_is_not_the_one_asked_for_is_refused() -> None:
    one = two_files()
    with pytest.raises(ManifestError, match="not that of data"):
        Manifest.from_bytes(one.to_bytes(), expected="0" * 64)
    with pytest.raises(ManifestError, match="malformed"):
        Manifest.from_bytes(b"{not json")


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", "a//b", "./a", "", "a\\b", "a/."])
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(ManifestError):
        Manifest.build(DIRECTORY, [Entry(path, 1, A)])


def test_a_path_cannot_be_a_file_and_a_directory_and_a_file_is_one_entry() -> None:
    with pytest.raises(ManifestError, match="both a file and a directory"):
        Manifest.build(DIRECTORY, [Entry("x", 1, A), Entry("x/y", 1, A)])
    assert Manifest.build(FILE, [Entry("", 1, A)]).kind == FILE
    with pytest.raises(ManifestError):
        Manifest.build(FILE, [Entry("a.txt", 1, A)])
    with pytest.raises(ManifestError, match="bad size or digest"):
        Manifest.build(DIRECTORY, [Entry("a", 1, "xyz")])


def test_the_data_keeps_its_relative_path_inside_the_current_directory() -> None:
    assert worker_relpath("corpus/train", "/home/u/proj") == "corpus/train"
    assert worker_relpath("./corpus/", "/home/u/proj") == "corpus"
    assert worker_relpath("/home/u/proj/text.txt", "/home/u/proj") == "text.txt"
    assert worker_relpath("/mnt/big/corpus", "/home/u/proj") == "corpus"  # outside: its last component
    assert worker_relpath("../other/data.npy", "/home/u/proj") == "data.npy"
    assert worker_relpath(".", "/home/u/proj") == "proj"


def test_a_cut_transfer_resumes_where_it_stopped() -> None:
    one = two_files()
    offsets = resume_offsets(one, {"a.txt": 1, "z/b.txt": 1})
    assert offsets == [1, 1] and bytes_left(one, offsets) == 1
    assert resume_offsets(one, {"z/b.txt": 7}) == [0, 0]  # longer than its entry: starts over
    assert check_offsets(one, []) == [0, 0]
    with pytest.raises(ManifestError):
        check_offsets(one, [0])
    with pytest.raises(ManifestError):
        check_offsets(one, [0, 3])


def test_a_node_out_of_disk_is_one_line() -> None:
    assert space_problem("node2", 10**6, 10**9, "/d") is None
    line = space_problem("node2", 2 * 10**9, 5 * 10**8, "/home/u/.local/state/meshtrain/data")
    assert line == (
        "node2 is out of disk space for the job's data: it needs 2.0 GB (and keeps 67.1 MB free), "
        "500.0 MB are free in "
        "/home/u/.local/state/meshtrain/data"
    )
    assert space_problem("n", 10**9, 10**9, "/d") is not None  # a margin is kept


def test_progress_only_for_large_transfers_and_not_too_often() -> None:
    small = Progress(1000, started=0.0)
    assert not small.due(100.0)
    big = Progress(2 * LARGE_BYTES, started=0.0, every_s=2.0)
    assert not big.due(1.0) and big.due(2.5) and not big.due(3.0) and big.due(4.6)
    assert big.line("data x from node1", LARGE_BYTES, 1.0).startswith(
        "data x from node1: 67.1 MB of 134.2 MB (50%"
    )
