"""Strategies and byte mutations shared by the fuzz tests of every decoder."""

from __future__ import annotations

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
