"""`--encrypt`: AES-GCM on every layer, on real loopback sockets; nothing readable, nothing forgeable.

For each layer (gossip datagrams, control connections, ring frames) a known
plaintext is put through it and the bytes on the wire are searched for it:
found with authentication only (so the search can fail), absent with
encryption. A flipped ciphertext bit is refused, and a node whose --encrypt
setting differs from the mesh's is refused and counted as `mode_mismatch`.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_security_ring import Tap, run_ranks

from meshtrain.agent.control import MODE_MISMATCH, Conn, ControlServer, call
from meshtrain.cli.join import resolve_keyring
from meshtrain.errors import PeerLost, UserError
from meshtrain.gossip import PROFILES, GossipNode
from meshtrain.ring import Ring, RingListener
from meshtrain.security import DatagramOpener, DatagramSealer, Dropped, Keyring, generate_secret
from meshtrain.security.aead import AEAD_TAG_BYTES, FrameCipher, FrameGmac, derive_key
from meshtrain.security.auth import ENVELOPE
from meshtrain.security.channel import SEALED, dial_channel
from meshtrain.security.secret import (
    join_command,
    load_keyring,
    make_token,
    parse_token,
    read_secret_file,
    write_secret_file,
)
from meshtrain.wire import encode_header

pytestmark = pytest.mark.timeout(60)
NOW = 1_800_000_000.0
KEY = bytes(range(32))
PLAIN = Keyring([KEY])
SECRET = Keyring([KEY], encrypt=True)
MARKER = b"MESHTRAIN-KNOWN-PLAINTEXT"


# --- the setting travels with the secret --------------------------------------------------


def test_the_encrypt_flag_survives_file_variable_and_token(tmp_path: Path) -> None:
    rotated = Keyring([generate_secret(), KEY], encrypt=True)
    assert Keyring.from_text(rotated.to_text(), "env").encrypt
    assert Keyring.from_text(rotated.to_text(), "env").keys == rotated.keys
    assert not Keyring.from_text(PLAIN.to_text(), "env").encrypt
    write_secret_file(tmp_path / "secret", rotated)
    assert read_secret_file(tmp_path / "secret").encrypt
    env = {"MESHTRAIN_SECRET": rotated.to_text()}
    assert load_keyring(env=env, create=False)[0].encrypt  # how a worker inherits the mode
    token = parse_token(make_token(KEY, "10.0.0.1:7946", encrypt=True))
    assert (token.secret, token.seed, token.encrypt) == (KEY, "10.0.0.1:7946", True)
    plain = parse_token(make_token(KEY, "10.0.0.1:7946"))
    assert (plain.secret, plain.seed, plain.encrypt) == (KEY, "10.0.0.1:7946", False)
    assert parse_token(join_command(SECRET).split()[-1]).encrypt  # what the first `join --encrypt` prints


def test_join_encrypt_and_an_encrypted_token_set_the_mode_and_keep_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MESHTRAIN_SECRET", raising=False)
    monkeypatch.setenv("MESHTRAIN_HOME", str(tmp_path / "first"))
    first, created = resolve_keyring(argparse.Namespace(token=None, secret_file=None, seed=[], encrypt=True))
    assert created and first.encrypt
    again, _ = resolve_keyring(argparse.Namespace(token=None, secret_file=None, seed=[], encrypt=False))
    assert again.encrypt and again.keys == first.keys  # a later plain `join` keeps the mesh's setting
    token = join_command(first, seed="127.0.0.1:7946").split()[-1]
    monkeypatch.setenv("MESHTRAIN_HOME", str(tmp_path / "second"))
    args = argparse.Namespace(token=token, secret_file=None, seed=[], encrypt=False)
    joined, _ = resolve_keyring(args)
    assert joined.encrypt and joined.primary == first.primary and args.seed == [("127.0.0.1", 7946)]
    assert read_secret_file(tmp_path / "second" / "secret").encrypt


def test_keys_are_separate_per_purpose_and_direction() -> None:
    keys = {
        derive_key(KEY, p, c)
        for p, c in [(b"gossip", b""), (b"ring", b""), (b"control", b"a"), (b"control", b"b")]
    }
    assert len(keys) == 4 and KEY not in keys


# --- gossip datagrams ---------------------------------------------------------------------


def test_encrypted_datagrams_hide_the_body_and_refuse_tampering_replay_and_the_other_mode() -> None:
    sealer, opener = DatagramSealer(SECRET), DatagramOpener(SECRET)
    sealed = [sealer.seal(MARKER + bytes([i]), NOW) for i in range(3)]
    assert all(MARKER not in s for s in sealed)
    assert MARKER in DatagramSealer(PLAIN).seal(MARKER, NOW)  # authentication alone leaves it readable
    assert len(sealed[0]) == ENVELOPE.size + len(MARKER) + 1 + AEAD_TAG_BYTES
    assert opener.open(sealed[0], NOW) == MARKER + b"\x00"
    cases = {
        "replay": sealed[0],
        "bad_tag": sealed[1][:-20] + bytes([sealed[1][-20] ^ 1]) + sealed[1][-19:],  # a ciphertext bit
        "mode_mismatch": DatagramSealer(PLAIN).seal(MARKER, NOW),  # right key, no encryption
    }
    for reason, data in cases.items():
        with pytest.raises(Dropped) as info:
            opener.open(data, NOW)
        assert info.value.reason == reason
    assert DatagramOpener(PLAIN).open_or_none(sealed[2], NOW) is None  # and the other way round
    assert opener.open(sealed[1], NOW) == MARKER + b"\x01"  # the untouched original still opens
    head = bytearray(sealed[2])
    head[ENVELOPE.size - 1] ^= 1  # the timestamp is in the clear but authenticated (associated data)
    assert opener.open_or_none(bytes(head), NOW) is None
    assert opener.counters.snapshot()["bad_tag"] == 2


def test_a_datagram_sender_takes_a_new_nonce_space_before_its_counter_wraps() -> None:
    sealer, opener = DatagramSealer(SECRET), DatagramOpener(SECRET)
    first = sealer.session
    sealer.seq = (1 << 32) - 1
    last_of_first = sealer.seal(b"a", NOW)
    next_one = sealer.seal(b"b", NOW)
    assert sealer.session != first and sealer.seq == 1  # nonce = session | u32 seq: never reused
    assert opener.open(last_of_first, NOW) == b"a" and opener.open(next_one, NOW) == b"b"


class Eavesdropped(GossipNode):
    """A member whose every sealed datagram is kept, as a listener on the LAN would see it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wire: list[bytes] = []

    def seal(self, body: bytes) -> bytes:
        out = super().seal(body)
        self.wire.append(out)
        return out

    def _seal_tcp(self, body: bytes) -> bytes:  # push-pull and TCP-ping bodies
        out = super()._seal_tcp(body)
        self.wire.append(out)
        return out


def test_encrypted_gossip_forms_a_mesh_that_a_plain_node_cannot_join() -> None:
    profile = PROFILES["local"]

    def node(cls: type[GossipNode], name: str, keyring: Keyring, seed: int | None) -> GossipNode:
        seeds = [("127.0.0.1", seed)] if seed else []
        return cls(
            name, profile=profile, host="127.0.0.1", port=0, seeds=seeds, discovery=False, keyring=keyring
        )

    async def main() -> None:
        a = node(Eavesdropped, "alpha-secret-name", SECRET, None)
        await a.start()
        b = node(GossipNode, "bravo", SECRET, a.port)
        plain = node(GossipNode, "plain", PLAIN, a.port)  # the mesh's key, without --encrypt
        await b.start()
        await plain.start()
        try:
            deadline = time.monotonic() + 10
            while {m.id for m in a.members() if m.state == "alive"} != {"alpha-secret-name", "bravo"} or (
                a.security_drops.snapshot()["mode_mismatch"] == 0 or not getattr(a, "wire", None)
            ):
                assert time.monotonic() < deadline, (a.members(), a.security_drops.snapshot())
                await asyncio.sleep(0.02)
            assert {m.id for m in plain.members()} == {"plain"}
            assert (
                plain.security_drops.snapshot()["mode_mismatch"]
                + a.security_drops.snapshot()["mode_mismatch"]
                >= 1
            )
            assert isinstance(a, Eavesdropped) and a.wire
            assert not any(b"alpha-secret-name" in d for d in a.wire)  # its own name is in every body
        finally:
            await plain.close()
            await b.close()
            await a.close()

    asyncio.run(main())


# --- control connections ------------------------------------------------------------------


class Control:
    """A ControlServer on loopback that records what its handler was asked."""

    def __init__(self, keyring: Keyring) -> None:
        self.asked: list[dict[str, Any]] = []
        self.server = ControlServer(self._handle, protocol=1, keyring=keyring)

    async def _handle(self, header: dict[str, Any], payload: bytes, conn: Conn) -> None:
        self.asked.append({**header, "payload": payload})
        await conn.reply(True, echo=str(header.get("secret", "")), size=len(payload))


@pytest.mark.parametrize("keyring", [PLAIN, SECRET], ids=["auth-only", "encrypted"])
def test_control_requests_are_unreadable_on_the_wire_when_encrypted(keyring: Keyring) -> None:
    async def main() -> tuple[dict[str, Any], bytes, Control]:
        control = Control(keyring)
        port = await control.server.start_tcp("127.0.0.1", 0)
        tap = Tap(("127.0.0.1", port))
        try:
            reply = await call(
                ("127.0.0.1", tap.port), "status", keyring=keyring, secret=MARKER.decode(), proto=1
            )
        finally:
            await control.server.close()
        await asyncio.get_running_loop().run_in_executor(None, tap.done.wait, 5)
        return reply, bytes(tap.recorded), control

    reply, recorded, control = asyncio.run(main())
    assert reply["ok"] and reply["echo"] == MARKER.decode()
    assert control.asked[0]["secret"] == MARKER.decode()
    assert (MARKER in recorded) is (not keyring.encrypt)
    assert (b"status" in recorded) is (not keyring.encrypt)  # the op itself is hidden too


@pytest.mark.parametrize(("server_ring", "client_ring"), [(SECRET, PLAIN), (PLAIN, SECRET)])
def test_control_with_the_other_mode_is_one_clear_line_and_counted(
    server_ring: Keyring, client_ring: Keyring
) -> None:
    async def main() -> tuple[Control, str]:
        control = Control(server_ring)
        port = await control.server.start_tcp("127.0.0.1", 0)
        try:
            with pytest.raises(UserError) as refused:
                await call(("127.0.0.1", port), "status", who="agent a", keyring=client_ring)
        finally:
            await control.server.close()
        return control, str(refused.value)

    control, message = asyncio.run(main())
    assert message == f"agent a: {MODE_MISMATCH}"
    assert control.server.drops.snapshot()["mode_mismatch"] == 1  # the acceptor checks the hello's mode
    assert not control.asked


def test_a_tampered_sealed_control_frame_is_refused_and_counted() -> None:
    async def main() -> Control:
        control = Control(SECRET)
        port = await control.server.start_tcp("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            channel = await dial_channel(reader, writer, SECRET)
            assert channel.encrypted and channel.seal is not None
            inner = encode_header({"kind": "request", "op": "status", "proto": 1, "nbytes": 0})
            head = encode_header({"kind": SEALED, "nbytes": len(inner) + AEAD_TAG_BYTES})
            sealed = bytearray(channel.seal.seal(head, inner))
            sealed[3] ^= 0x40  # one ciphertext bit
            writer.write(head + bytes(sealed))
            await writer.drain()
            assert await reader.read() == b""  # the server only closes the connection
            writer.close()
        finally:
            await control.server.close()
        return control

    control = asyncio.run(main())
    assert not control.asked
    assert control.server.drops.snapshot()["bad_tag"] == 1


def test_ring_gmac_tags_bind_header_payload_and_order() -> None:
    send, recv = FrameGmac(KEY), FrameGmac(KEY)
    tags = [send.tag(b"head%d" % i, b"payload %d" % i) for i in range(3)]
    assert all(len(t) == AEAD_TAG_BYTES for t in tags) and len(set(tags)) == 3
    assert recv.check(b"head0", b"payload 0", tags[0])
    assert not recv.check(b"head2", b"payload 2", tags[2])  # frame 1 skipped
    assert not FrameGmac(KEY).check(b"head0", b"payload 1", tags[0])  # payload altered
    assert not FrameGmac(KEY).check(b"head1", b"payload 0", tags[0])  # header altered


def test_frame_cipher_binds_header_and_order() -> None:
    send, recv = FrameCipher(KEY), FrameCipher(KEY)
    frames = [send.seal(b"head%d" % i, b"payload %d" % i) for i in range(3)]
    assert recv.open(b"head0", frames[0]) == b"payload 0"
    assert recv.open(b"head2", frames[2]) is None  # frame 1 skipped: wrong implicit number
    fresh = FrameCipher(KEY)
    assert fresh.open(b"HEAD0", frames[0]) is None  # the header is authenticated


# --- ring frames --------------------------------------------------------------------------

COUNT = 40_000
PATTERN = np.frombuffer((MARKER * (COUNT * 4 // len(MARKER) + 1))[: COUNT * 4], dtype=np.float32).copy()


def xs(rank: int) -> np.ndarray:
    return np.random.default_rng(rank).standard_normal(COUNT).astype(np.float32)


def member(
    listener: RingListener,
    rank: int,
    addrs: list[tuple[str, int]],
    keyring: Keyring | None,
    timeout: float = 5,
) -> Any:
    def body() -> Any:
        with Ring.connect(
            listener,
            rank,
            addrs,
            job="j",
            generation=1,
            keyring=keyring,
            timeout=timeout,
            chunk_bytes=32 << 10,
        ) as ring:
            known = ring.allreduce(PATTERN, step=0, wire_dtype="float32")  # the same bytes from every rank
            mean = ring.allreduce(xs(rank), step=1, weight=rank + 1.0, wire_dtype="float32")
            return known, mean, ring._link is not None and ring._link.encrypted

    return body


@pytest.mark.parametrize("n", [2, 3])
def test_an_encrypted_ring_computes_the_weighted_mean(n: int) -> None:
    listeners = [RingListener.bind("127.0.0.1") for _ in range(n)]
    addrs = [("127.0.0.1", lst.port) for lst in listeners]
    results = run_ranks([member(listeners[r], r, addrs, SECRET) for r in range(n)])
    expected = sum((r + 1.0) * xs(r).astype(np.float64) for r in range(n)) / sum(r + 1.0 for r in range(n))
    for result in results:
        assert not isinstance(result, BaseException), result
        known, mean, encrypted = result
        assert encrypted
        assert np.allclose(known, PATTERN, rtol=1e-6)  # the mean of n copies of one vector
        assert np.allclose(mean, expected, atol=1e-5) and np.array_equal(mean, results[0][1])
    for lst in listeners:
        lst.close()


def ring_through_tap(keyring: Keyring, flip_at: int | None = None) -> tuple[list[Any], bytes]:
    """Rank 0 sends to rank 1 through a Tap; (results, what rank 0 put on the wire)."""
    listeners = [RingListener.bind("127.0.0.1") for _ in range(2)]
    real = [("127.0.0.1", lst.port) for lst in listeners]
    tap = Tap(real[1], flip_at=flip_at)
    results = run_ranks(
        [
            member(listeners[0], 0, [real[0], ("127.0.0.1", tap.port)], keyring),
            member(listeners[1], 1, real, keyring),
        ]
    )
    tap.done.wait(5)
    for lst in listeners:
        lst.close()
    return results, bytes(tap.recorded)


@pytest.mark.parametrize("keyring", [PLAIN, SECRET], ids=["auth-only", "encrypted"])
def test_ring_payloads_are_unreadable_on_the_wire_when_encrypted(keyring: Keyring) -> None:
    results, recorded = ring_through_tap(keyring)
    assert all(not isinstance(r, BaseException) for r in results), results
    assert len(recorded) > COUNT * 4  # rank 0's half of each all-reduce, twice, went through the tap
    assert (MARKER in recorded) is (not keyring.encrypt)


def test_a_flipped_ciphertext_bit_ends_the_ring() -> None:
    results, _ = ring_through_tap(SECRET, flip_at=400 + 20_000)  # inside the first chunk's ciphertext
    assert all(isinstance(r, PeerLost) for r in results), results
    assert "frame authentication failed" in results[1].reason
    assert "reported around the ring" in results[0].reason  # rank 1's sealed abort opened at rank 0


def test_a_ring_member_with_the_other_mode_is_refused_and_counted() -> None:
    listeners = [RingListener.bind("127.0.0.1") for _ in range(2)]
    addrs = [("127.0.0.1", lst.port) for lst in listeners]
    results = run_ranks(
        [member(listeners[0], 0, addrs, PLAIN, 1.5), member(listeners[1], 1, addrs, SECRET, 1.5)]
    )
    assert all(isinstance(r, PeerLost) and "authentication failed" in r.reason for r in results), results
    assert any("--encrypt" in r.reason for r in results), results
    assert (
        listeners[0].drops.snapshot()["mode_mismatch"] + listeners[1].drops.snapshot()["mode_mismatch"] >= 1
    )
    for lst in listeners:
        lst.close()


def test_the_abort_frame_is_sealed_too() -> None:
    """An abort is a frame without payload: 16 bytes of GCM tag follow its header, and it verifies."""
    cipher, check = FrameCipher(KEY), FrameCipher(KEY)
    head = encode_header({"kind": "abort", "gen": 1, "peer": "x", "rank": 0, "reason": "r", "nbytes": 0})
    tag = cipher.seal(head)
    assert len(tag) == AEAD_TAG_BYTES and check.open(head, tag) == b""
    assert struct.unpack(">I", head[:4])[0] == len(head) - 4
