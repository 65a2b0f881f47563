"""The mesh secret in the running system, on loopback: strangers cannot join, be seen, or ask for work.

Real gossip nodes and agents with real sockets. A stranger is a node holding
another mesh's key (or none at all); what it sends must be refused before any
parsing and counted on the receiving node by reason. Replayed, stale and
tampered copies of a member's own datagrams are refused too.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from meshtrain.agent.agent import Agent
from meshtrain.agent.control import NO_SECRET, call, open_request
from meshtrain.cli.join import resolve_keyring
from meshtrain.errors import UserError, WireError
from meshtrain.gossip import PROFILES, GossipConfig, GossipNode
from meshtrain.gossip.node import REFUSED
from meshtrain.gossip.pushpull import frame
from meshtrain.security import DatagramSealer, Keyring, generate_secret, make_token

LOCAL = PROFILES["local"]
pytestmark = pytest.mark.timeout(60)


def arun(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


async def eventually(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Drop counters raise no event: look at them until `cond` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def node(name: str, keyring: Keyring | None, seed: int | None = None) -> GossipNode:
    seeds = [("127.0.0.1", seed)] if seed is not None else []
    return GossipNode(
        name, profile=LOCAL, host="127.0.0.1", port=0, seeds=seeds, discovery=False, keyring=keyring
    )


class RecordingNode(GossipNode):
    """A member that keeps what it put on the wire, as an eavesdropper on the LAN would."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sealed: list[bytes] = []
        self.sealed_tcp: list[bytes] = []  # push-pull and TCP-ping bodies
        self.sent = asyncio.Event()

    def seal(self, body: bytes) -> bytes:
        out = super().seal(body)
        self.sealed.append(out)
        self.sent.set()
        return out

    def _seal_tcp(self, body: bytes) -> bytes:
        out = super()._seal_tcp(body)
        self.sealed_tcp.append(out)
        return out


async def two_members(keyring: Keyring) -> tuple[GossipNode, RecordingNode]:
    a = node("a", keyring)
    await a.start()
    b = RecordingNode(
        "b",
        profile=LOCAL,
        host="127.0.0.1",
        port=0,
        seeds=[("127.0.0.1", a.port)],
        discovery=False,
        keyring=keyring,
    )
    await b.start()
    await eventually(lambda: {m.id for m in a.alive_members()} == {"a", "b"})
    return a, b


@pytest.mark.parametrize("stranger_key", ["other mesh", "no secret"])
def test_a_stranger_cannot_join_is_never_a_member_and_is_counted(stranger_key: str) -> None:
    mesh = Keyring([generate_secret()])
    other = Keyring([generate_secret()]) if stranger_key == "other mesh" else None
    reason = "unknown_mesh" if other is not None else "malformed"

    async def main() -> None:
        a, b = await two_members(mesh)
        stranger = node("stranger", other, seed=a.port)
        try:
            await stranger.start()  # its join push-pull to a is refused before a parses anything
            assert await stranger.join([("127.0.0.1", b.port)]) == 0
            assert a.security_drops.snapshot()[reason] >= 1 and b.security_drops.snapshot()[reason] >= 1
            # and a gossip datagram of the stranger's, straight at a member's UDP port
            datagram = DatagramSealer(other).seal(b"\x90", time.time()) if other else b"\x82\xa1x\x01"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                raw.sendto(datagram, ("127.0.0.1", a.port))
            await eventually(lambda: a.security_drops.snapshot()[reason] >= 2)
            assert {m.id for m in a.members()} == {"a", "b"} and {m.id for m in b.members()} == {"a", "b"}
            assert {m.id for m in stranger.members()} == {"stranger"}
        finally:
            await stranger.close()
            await b.close()
            await a.close()

    arun(main())


def test_replayed_stale_and_tampered_datagrams_are_refused_by_reason() -> None:
    mesh = Keyring([generate_secret()])

    async def main() -> None:
        a, b = await two_members(mesh)
        try:
            b.sealed.clear()
            b.sent.clear()
            await asyncio.wait_for(b.sent.wait(), 5.0)  # b's next gossip datagram, already sent to a
            captured = next(d for d in b.sealed if len(d) <= LOCAL.max_datagram)
            stale = DatagramSealer(mesh).seal(captured[28:-32], time.time() - 600)  # valid tag, old time
            tampered = bytearray(captured)
            tampered[-40] ^= 0x01
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                for data in (captured, captured, stale, bytes(tampered)):
                    raw.sendto(data, ("127.0.0.1", a.port))
            await eventually(lambda: a.security_drops.snapshot()["bad_tag"] >= 1)
            drops = a.security_drops.snapshot()
            assert drops["replay"] >= 3 and drops["bad_tag"] >= 1  # two replays and the stale one
            # b's join push-pull (a TCP body a already answered), replayed on a fresh connection
            join_body = b.sealed_tcp[0]
            replays = a.security_drops.snapshot()["replay"]
            reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
            writer.write(frame(join_body))
            assert await reader.read() == frame(REFUSED + b"clock")  # only why it was refused, no table
            writer.close()
            assert a.security_drops.snapshot()["replay"] == replays + 1
            assert {m.state for m in a.members()} == {"alive"}  # and the mesh goes on
        finally:
            await b.close()
            await a.close()

    arun(main())


def agent(name: str, keyring: Keyring | None, tmp: Path, seed: int | None = None) -> Agent:
    return Agent(
        name=name,
        gossip=GossipConfig(
            profile="local",
            host="127.0.0.1",
            port=0,
            seeds=(("127.0.0.1", seed),) if seed is not None else (),
            discovery=False,
        ),
        home=tmp / name,
        unix_socket=False,
        keyring=keyring,
    )


def test_an_agent_without_the_secret_cannot_join_or_ask_for_a_job(tmp_path: Path) -> None:
    mesh = Keyring([generate_secret()])
    other = Keyring([generate_secret()])

    async def main() -> None:
        a = agent("a", mesh, tmp_path)
        await a.start()
        b = agent("b", mesh, tmp_path, seed=a.gossip_port)
        stranger = agent("stranger", other, tmp_path, seed=a.gossip_port)
        try:
            await b.start()
            with pytest.raises(UserError, match="another mesh's secret"):  # the seed refused it: it says so
                await stranger.start()
            await eventually(lambda: {m.name for m in a.members()} == {"a", "b"})
            assert {m.name for m in stranger.members()} == {"stranger"}
            assert a.mesh_snapshot()["drops"]["unknown_mesh"] >= 1

            target = ("127.0.0.1", a.control_port)
            assert (await call(target, "ping", keyring=mesh))["name"] == "a"  # a member may ask
            for keyring in (other, None):  # another mesh's agent, or a client with no secret
                with pytest.raises(UserError) as refused:
                    await call(
                        target, "job.prepare", who="agent a", keyring=keyring, job="j1", rank=0, size=1
                    )
                assert str(refused.value) == f"agent a: {NO_SECRET}"
            with pytest.raises(WireError, match="authentication failed"):
                await open_request(target, "job.prepare", b"x", keyring=other, job="j2", rank=0, size=1)
            snap = a.mesh_snapshot()["drops"]
            assert snap["unknown_mesh"] >= 3 and snap["malformed"] + snap["bad_tag"] >= 1
            assert not a.hosted  # no worker was started for any of them
        finally:
            await stranger.leave()
            await b.leave()
            await a.leave()

    arun(main())


def test_join_token_stores_the_secret_and_adds_its_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHTRAIN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MESHTRAIN_SECRET", raising=False)
    secret = generate_secret()
    args = argparse.Namespace(token=make_token(secret, "10.0.0.5:7946"), secret_file=None, seed=[])
    keyring, created = resolve_keyring(args)
    assert keyring.primary == secret and not created and args.seed == [("10.0.0.5", 7946)]
    stored = tmp_path / "home" / "secret"
    assert stored.stat().st_mode & 0o777 == 0o600
    again, created = resolve_keyring(argparse.Namespace(token=None, secret_file=None, seed=[]))
    assert again.primary == secret and not created  # the next plain `join` uses the joined mesh
    with pytest.raises(UserError, match="the join token is damaged"):
        resolve_keyring(argparse.Namespace(token=args.token[:-3] + "AAA", secret_file=None, seed=[]))


def test_seed_without_the_secret_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHTRAIN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MESHTRAIN_SECRET", raising=False)
    args = argparse.Namespace(token=None, secret_file=None, seed=[("10.0.0.5", 7946)])
    with pytest.raises(UserError, match=r"does not hold the secret of the mesh at 10\.0\.0\.5:7946"):
        resolve_keyring(args)
    assert not (tmp_path / "home" / "secret").exists()  # no unrelated mesh was created
    keyring, created = resolve_keyring(argparse.Namespace(token=None, secret_file=None, seed=[]))
    assert created and (tmp_path / "home" / "secret").exists()  # the very first join creates one
