"""The user's own data: text files, .npy/.npz arrays, memory-mapped token files; each bad input one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from meshtrain.datasets import arrays, text_files, token_file, write_tokens
from meshtrain.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def one_line(excinfo: pytest.ExceptionInfo[UserError]) -> str:
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_a_directory_of_text_files_is_a_corpus_split_per_file(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("".join(f"a{i}\n" for i in range(10)))
    (tmp_path / "b" / "c.txt").write_text("".join(f"c{i}\n" for i in range(10)))
    (tmp_path / "skip.md").write_text("not text by the pattern\n")
    corpus = text_files(tmp_path)
    assert corpus.titles == ("a.txt", "b/c.txt")
    assert corpus.validation == "a9\nc9\n" and corpus.train.startswith("a0\n") and "c8\n" in corpus.train
    assert text_files(tmp_path / "a.txt", validation=0.2).validation == "a8\na9\n"
    assert text_files(tmp_path) == corpus  # the same bytes every time, on every node


def test_bad_text_inputs_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError) as excinfo:
        text_files(tmp_path / "missing")
    assert "does not exist" in one_line(excinfo)
    with pytest.raises(UserError, match="no files matching"):
        text_files(tmp_path)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="not UTF-8"):
        text_files(tmp_path)
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0)
        try:
            with pytest.raises(UserError, match="not readable"):
                text_files(locked)
        finally:
            locked.chmod(0o700)


def test_token_files_round_trip_memory_mapped(tmp_path: Path) -> None:
    ids = np.arange(70_000) % 50_257
    path = write_tokens(tmp_path / "corpus.u16", ids)
    mapped = token_file(path)
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.uint16 and (mapped == ids).all()
    assert not mapped.flags.writeable
    starts = np.array([0, 100, 69_000])
    assert (mapped[starts[:, None] + np.arange(5)] == ids[starts[:, None] + np.arange(5)]).all()
    with pytest.raises(UserError, match="do not fit uint8"):
        write_tokens(tmp_path / "small.u8", ids, dtype="uint8")
    (tmp_path / "odd").write_bytes(b"\x00\x01\x02")
    with pytest.raises(UserError, match="not a whole number of uint16 tokens"):
        token_file(tmp_path / "odd")
    with pytest.raises(UserError, match="token dtype 'float32'"):
        token_file(path, dtype="float32")


def test_npy_and_npz(tmp_path: Path) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "xy.npz", x=x, y=np.arange(3))
    assert (arrays(tmp_path / "x.npy")["array"] == x).all()
    both = arrays(tmp_path / "xy.npz")
    assert set(both) == {"x", "y"} and (both["y"] == np.arange(3)).all()
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="not a readable numpy file"):
        arrays(tmp_path / "objects.npy")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(UserError, match="want a .npy or .npz"):
        arrays(tmp_path / "x.csv")


def test_the_language_model_trains_on_a_users_own_text(tmp_path: Path) -> None:
    text = tmp_path / "poems"
    text.mkdir()
    poem = "".join(f"line {i} of a short poem, with words\n" for i in range(400))
    (text / "one.txt").write_text(poem)
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "shakespeare.py"), "--text", str(text), "--max-steps", "2"]
        + ["--batch-size", "4", "--block-size", "32", "--eval-batches", "1", "--sample", "10"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "final validation loss" in result.stdout and f"(vocabulary {len(set(poem))})" in result.stdout, (
        result.stdout
    )
    missing = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "shakespeare.py"), "--text", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode != 0 and missing.stderr.strip().count("\n") == 0
    assert "does not exist" in missing.stderr
