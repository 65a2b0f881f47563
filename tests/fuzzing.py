"""Strategies and byte mutations shared by the fuzz tests of every decoder."""

from __future__ import annotations

import os

from hypothesis import strategies as st

plain = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=8),
        st.binary(max_size=8),
    ),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=30,
)
"""Any msgpack-able value: what a hostile peer can put in a field."""


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, byte) edits: 0 flip a byte, 1 insert, 2 delete, 3 truncate."""
    b = bytearray(data)
    for kind, pos, val in edits:
        if not b:
            break
        p = pos % len(b)
        if kind == 0:
            b[p] ^= val or 1
        elif kind == 1:
            b.insert(p, val)
        elif kind == 2:
            del b[p]
        else:
            del b[p:]
    return bytes(b)


def _run_at(count: int, pytest_args: list[str]) -> int:
    """Run fuzz test files with every hypothesis test at `count` examples, without the per-test timeout.

    Some fuzz files pin `max_examples` in their decorators (tests/test_gossip_fuzz.py);
    rebinding `hypothesis.settings` before pytest imports them makes every
    `@settings(...)` in them, nested ones included, ask for `count` cases. Usage:

        flock /tmp/meshtrain-bench.lock .venv/bin/python tests/fuzzing.py 100000 tests/test_gossip_fuzz.py -q
    """
    import hypothesis
    import pytest

    class AtCount(hypothesis.settings):
        def __init__(self, parent: hypothesis.settings | None = None, **kwargs: object) -> None:
            kwargs["max_examples"] = count
            super().__init__(parent, **kwargs)  # type: ignore[arg-type]

    hypothesis.settings = AtCount  # type: ignore[misc]
    os.environ["MESHTRAIN_FUZZ_EXAMPLES"] = str(count)
    return int(pytest.main(["-p", "no:randomly", "-p", "no:cacheprovider", "--timeout=0", *pytest_args]))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(_run_at(int(sys.argv[1]), sys.argv[2:]))
