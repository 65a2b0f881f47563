"""The pure security parts: secret storage, join tokens, datagram envelope, replay window, handshake."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrain.errors import UserError
from meshtrain.security import (
    DROP_REASONS,
    DatagramOpener,
    DatagramSealer,
    DropCounters,
    Dropped,
    Keyring,
    ReplayGuard,
    SequenceWindow,
    generate_secret,
    handshake,
    load_keyring,
    make_token,
    parse_token,
)
from meshtrain.security.secret import encode_key, join_command, store_joined_secret

NOW = 1_800_000_000.0
FUZZ = int(os.environ.get("MESHTRAIN_FUZZ_EXAMPLES", "2000"))  # 100000 for the fuzz run
KEY = bytes(range(32))
secrets_st = st.binary(min_size=32, max_size=32)
seeds_st = st.one_of(st.none(), st.text(min_size=1, max_size=60).filter(lambda s: len(s.encode()) <= 255))


# --- secret and keyring ---------------------------------------------------------------


def test_first_use_creates_a_private_secret_then_reuses_it(tmp_path: Path) -> None:
    env = {"MESHTRAIN_HOME": str(tmp_path / "home")}
    keyring, created = load_keyring(env=env)
    path = tmp_path / "home" / "secret"
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created_again = load_keyring(env=env)
    assert not created_again and again.keys == keyring.keys
    assert join_command(keyring).startswith("meshtrain join --token mt1.")


def test_sources_in_order_and_readable_by_others_refused(tmp_path: Path) -> None:
    other = generate_secret()
    secret_file = tmp_path / "s"
    secret_file.write_text(encode_key(KEY) + "\n" + encode_key(other) + "\n")
    os.chmod(secret_file, 0o600)
    env = {"MESHTRAIN_HOME": str(tmp_path / "h"), "MESHTRAIN_SECRET": encode_key(other)}
    assert load_keyring(secret_file, env=env)[0].keys == (KEY, other)  # --secret-file first
    assert load_keyring(env=env)[0].keys == (other,)  # then the variable
    os.chmod(secret_file, 0o644)
    with pytest.raises(UserError, match="chmod 600"):
        load_keyring(secret_file, env=env)
    with pytest.raises(UserError, match="no mesh secret"):
        load_keyring(env={"MESHTRAIN_HOME": str(tmp_path / "none")}, create=False)
    with pytest.raises(UserError, match="mk1"):
        load_keyring(env={"MESHTRAIN_SECRET": "hunter2"})


def test_keyring_sends_with_first_accepts_any_and_survives_the_environment(tmp_path: Path) -> None:
    old, new = generate_secret(), generate_secret()
    ring = Keyring([new, old])
    assert ring.primary == new and ring.lookup(handshake_kid(old)) == old and ring.lookup(b"zzzz") is None
    assert Keyring.from_text(ring.to_text(), "env").keys == ring.keys
    assert "Keyring(2 keys" in repr(ring) and new.hex() not in repr(ring)
    stored = store_joined_secret(Keyring([old]), new, env={"MESHTRAIN_HOME": str(tmp_path)})
    assert stored.keys == (new, old) and load_keyring(env={"MESHTRAIN_HOME": str(tmp_path)})[0].keys == (
        new,
        old,
    )


def handshake_kid(key: bytes) -> bytes:
    return Keyring([key]).primary_id


@settings(max_examples=300, deadline=None)
@given(secrets_st, seeds_st)
def test_token_round_trips(secret: bytes, seed: str | None) -> None:
    token = make_token(secret, seed)
    assert token.isascii() and " " not in token
    parsed = parse_token("  " + token + "\n")
    assert parsed.secret == secret and parsed.seed == seed


@settings(max_examples=500, deadline=None)
@given(secrets_st, st.integers(min_value=4, max_value=200), st.sampled_from("AbZ09-_x"))
def test_a_mangled_token_is_a_user_error_never_another_secret(secret: bytes, pos: int, char: str) -> None:
    token = make_token(secret, "10.0.0.1:7946")
    pos = pos % len(token)
    mangled = token[:pos] + char + token[pos + 1 :]
    if mangled == token:
        return
    with pytest.raises(UserError) as info:
        parse_token(mangled)
    assert "\n" not in str(info.value)


@settings(max_examples=FUZZ // 4, deadline=None)
@given(st.text(max_size=300))
def test_garbage_tokens_are_one_line_user_errors(text: str) -> None:
    try:
        parse_token(text)
    except UserError as exc:
        assert "\n" not in str(exc)


# --- replay window ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=3000), max_size=400), st.integers(1, 128))
def test_window_never_accepts_a_number_twice(seqs: list[int], size: int) -> None:
    win = SequenceWindow(size)
    accepted: set[int] = set()
    for seq in seqs:
        if win.accept(seq):
            assert seq not in accepted
            accepted.add(seq)
            assert seq > win.highest - size
    assert win._bits < (1 << size)  # bounded memory: at most `size` bits


@settings(max_examples=200, deadline=None)
@given(st.permutations(list(range(64))))
def test_window_accepts_any_reordering_within_it(order: list[int]) -> None:
    win = SequenceWindow(64)
    assert all(win.accept(seq) for seq in order)
    assert not any(win.accept(seq) for seq in order)


def test_guard_rejects_stale_and_bounds_its_senders() -> None:
    guard = ReplayGuard(max_senders=8, window=32, max_skew=30)
    assert guard.check(b"s", 0, NOW - 31, NOW) == "stale"
    assert guard.check(b"s", 0, float("nan"), NOW) == "stale"
    assert guard.check(b"s", 0, NOW, NOW) is None and guard.check(b"s", 0, NOW, NOW) == "replay"
    for i in range(100):
        assert guard.check(i.to_bytes(8, "big"), 0, NOW, NOW) is None
    assert len(guard) == 8


# --- datagram envelope -----------------------------------------------------------------


def test_datagrams_authenticate_and_each_drop_has_its_reason() -> None:
    ring = Keyring([KEY])
    sealer, opener = DatagramSealer(ring), DatagramOpener(ring)
    first = sealer.seal(b"ping", NOW)
    assert opener.open(first, NOW) == b"ping"
    cases = {
        "replay": first,
        "bad_tag": first[:-1] + bytes([first[-1] ^ 1]),
        "malformed": b"MTd\x01short",
        "oversized": b"x" * 70000,
        "unknown_mesh": DatagramSealer(Keyring([generate_secret()])).seal(b"hi", NOW),
        "mode_mismatch": DatagramSealer(Keyring([KEY], encrypt=True)).seal(b"hi", NOW),
    }
    for reason, data in cases.items():
        with pytest.raises(Dropped) as info:
            opener.open(data, NOW)
        assert info.value.reason == reason
    assert opener.open_or_none(sealer.seal(b"old", NOW - 120), NOW) is None  # stale counts as replay
    assert opener.counters.snapshot() == {
        "bad_tag": 1,
        "replay": 2,
        "malformed": 1,
        "oversized": 1,
        "unknown_mesh": 1,
        "rate_limited": 0,
        "mode_mismatch": 1,
    }


def test_rotation_old_key_still_opens_new_key_sends() -> None:
    old, new = generate_secret(), generate_secret()
    receiver = DatagramOpener(Keyring([new, old]))
    assert receiver.open(DatagramSealer(Keyring([old])).seal(b"a", NOW), NOW) == b"a"
    assert receiver.open(DatagramSealer(Keyring([new, old])).seal(b"b", NOW), NOW) == b"b"


@settings(max_examples=FUZZ, deadline=None)
@given(st.binary(max_size=200))
def test_opening_garbage_never_raises_anything_but_a_drop(data: bytes) -> None:
    opener = DatagramOpener(Keyring([KEY]))
    assert opener.open_or_none(data, NOW) is None
    assert opener.counters.total == 1


def test_drop_counters_merge_into_one_shape() -> None:
    a, b = DropCounters(), DropCounters()
    a.count("bad_tag", 2)
    b.count("bad_tag")
    b.count("replay")
    merged = DropCounters.merge([a.snapshot(), b.snapshot()])
    assert tuple(merged) == DROP_REASONS and merged["bad_tag"] == 3 and merged["replay"] == 1
    with pytest.raises(ValueError):
        a.count("bogus")


# --- handshake -------------------------------------------------------------------------


def test_handshake_both_sides_derive_the_same_fresh_session_key() -> None:
    ring = Keyring([KEY])
    memory = handshake.NonceMemory()
    hello = handshake.dial_hello(ring, {"job": "j", "gen": 1}, NOW)
    key = handshake.check_dial(ring, hello, memory, NOW)
    reply = handshake.accept_reply(key, hello, {"ok": True})
    assert handshake.check_accept(ring, hello, reply) == KEY
    session = handshake.session_key(KEY, hello, reply)
    with pytest.raises(handshake.HandshakeError, match="replayed hello"):
        handshake.check_dial(ring, hello, memory, NOW + 1)
    with pytest.raises(handshake.HandshakeError, match="timestamp"):
        handshake.check_dial(ring, hello, handshake.NonceMemory(), NOW + 600)
    other = handshake.accept_reply(key, hello, {"ok": True})
    assert handshake.session_key(KEY, hello, other) != session


def test_handshake_refuses_strangers_and_tampering() -> None:
    ring, stranger = Keyring([KEY]), Keyring([generate_secret()])
    memory = handshake.NonceMemory()
    with pytest.raises(handshake.HandshakeError, match="another mesh"):
        handshake.check_dial(ring, handshake.dial_hello(stranger, {"gen": 1}, NOW), memory, NOW)
    forged = {**handshake.dial_hello(stranger, {"gen": 1}, NOW), "kid": ring.primary_id}
    with pytest.raises(handshake.HandshakeError, match="proof"):
        handshake.check_dial(ring, forged, memory, NOW)
    with pytest.raises(handshake.HandshakeError, match="no mesh secret"):
        handshake.check_dial(ring, {"gen": 1}, memory, NOW)
    hello = handshake.dial_hello(ring, {"gen": 1}, NOW)
    changed = {**hello, "gen": 2}
    with pytest.raises(handshake.HandshakeError, match="proof"):
        handshake.check_dial(ring, changed, memory, NOW)
    reply = handshake.accept_reply(stranger.primary, hello, {"ok": True})
    with pytest.raises(handshake.HandshakeError, match="answer proof"):
        handshake.check_accept(ring, hello, reply)


def test_frame_mac_binds_sequence_header_and_payload() -> None:
    send, recv = handshake.FrameMac(KEY), handshake.FrameMac(KEY)
    tags = [send.tag(b"head", b"payload") for _ in range(2)]
    assert tags[0] != tags[1]  # same frame, next sequence number: another tag
    assert recv.check(b"head", b"payload", tags[0])
    assert not recv.check(b"head", b"payload", tags[0])  # replayed in the stream
    assert not handshake.FrameMac(KEY).check(b"head", b"payloaD", tags[0])


hello_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
hello_keys = (
    st.sampled_from(["kid", "nonce", "ts", "proof", "gen", "job"])
    | st.text(max_size=5)
    | st.binary(max_size=4)
)


@settings(max_examples=FUZZ // 10, deadline=None)
@given(st.dictionaries(hello_keys, hello_values, max_size=8), st.booleans())
def test_hostile_hellos_are_handshake_errors_only(hello: dict, known_kid: bool) -> None:  # type: ignore[type-arg]
    ring = Keyring([KEY])
    if known_kid:
        hello["kid"] = ring.primary_id  # the key id is public: a stranger can copy it
    with pytest.raises(handshake.HandshakeError):
        handshake.check_dial(ring, hello, handshake.NonceMemory(), NOW)
    with pytest.raises(handshake.HandshakeError):
        handshake.check_accept(ring, handshake.dial_hello(ring, {}, NOW), hello)
