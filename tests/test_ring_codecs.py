"""The wire codec registry: one definition per codec, used by the ring, recovery and the Mesh API."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from meshtrain.errors import UserError
from meshtrain.mesh import resolve_wire_dtype
from meshtrain.ring import codecs
from meshtrain.train.recovery import MemberStatus, decode_statuses, encode_status

finite = st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32)


@given(arrays(np.float32, st.integers(0, 64), elements=finite))
def test_each_codec_round_trips_within_its_precision(x: np.ndarray) -> None:
    for c in (codecs.codec(n) for n in ("float32", "bfloat16", "float16")):  # the float codecs
        wire, back = np.empty(x.size, c.storage), np.empty(x.size, np.float32)
        with np.errstate(over="ignore"):  # float16 saturates to inf outside its range
            c.encode(x, wire)
        c.decode(wire, back)
        if c.exact:
            assert np.array_equal(back, x)
        elif c.name == "qint8":  # integers on an agreed grid (meshtrain.train.compression): rounds, saturates
            assert np.array_equal(back, np.clip(np.rint(x), -127, 127))
        elif c.name == "bfloat16":
            assert np.allclose(back, x, rtol=2**-8, atol=1e-38)  # float32 subnormals may flush
        else:  # float16 saturates outside its range
            small = np.abs(x) < 6e4
            assert np.allclose(back[small], x[small], rtol=2**-10, atol=2**-14)


@given(arrays(np.float32, st.integers(0, 64), elements=st.integers(-127, 127).map(float)))
def test_qint8_is_exact_on_the_integers_it_is_made_for(x: np.ndarray) -> None:
    c = codecs.codec("qint8")
    wire, back = np.empty(x.size, c.storage), np.empty(x.size, np.float32)
    c.encode(x, wire)
    c.decode(wire, back)
    assert np.array_equal(back, x)


def test_names_codes_and_bad_names() -> None:
    assert codecs.names()[:3] == ("float32", "bfloat16", "float16")
    assert codecs.codec(None).name == "float32" and codecs.codec("mlx.core.bfloat16").name == "bfloat16"
    assert {codecs.by_code(c.code) for c in codecs.CODECS.values()} == set(codecs.CODECS.values())
    with pytest.raises(UserError, match="wire_dtype must be one of float32, bfloat16, float16"):
        codecs.codec("int3")
    with pytest.raises(UserError):
        resolve_wire_dtype({}, "int3")
    with pytest.raises(ValueError, match="clashes"):
        codecs.register(codecs.CODECS["float16"])


@pytest.mark.parametrize("wire", ["", *codecs.names()])
def test_recoverys_status_vector_carries_every_codec(wire: str) -> None:
    status = MemberStatus("a", 5, "ab" * 16, pending=bool(wire), wire=wire)
    (back,) = decode_statuses(["a"], encode_status(1, 0, status))
    assert back.wire == wire
