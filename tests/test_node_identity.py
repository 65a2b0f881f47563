"""Node identity and joining (issue 16 #2, #3): ids apart from names, name clashes, joins that fail.

Pure parts (the naming rule, the state machine after a leave), then real gossip nodes on loopback
(a clash renames or refuses; a wrong secret, another --encrypt setting or a dead seed is told apart
within seconds), then the real CLI: `meshtrain join --detach` with a wrong secret, a dead seed or a
name another machine holds exits non-zero with one line and leaves no agent behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from meshtrain.agent.agent import node_identity
from meshtrain.gossip import PROFILES, GossipNode
from meshtrain.gossip.member import ALIVE, DEAD, SUSPECT, Member
from meshtrain.gossip.membership import Membership
from meshtrain.gossip.messages import Alive
from meshtrain.gossip.names import NAMED_KEY, free_name, holder_of, must_yield
from meshtrain.security import Keyring, generate_secret
from tests.test_mesh_agents import AgentProcess, alive_names, cli, wait_for

LOCAL = PROFILES["local"]
pytestmark = pytest.mark.timeout(120)


def arun(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def m(node: str, name: str, named: int | None, state: str = ALIVE) -> Member:
    meta = {} if named is None else {NAMED_KEY: named}
    return Member(node, name, ("10.0.0.1", 7946), state, 1, meta)


# ------------------------------------------------------------------ the rule (pure)


def test_the_older_claim_keeps_a_name_and_only_a_live_holder_counts() -> None:
    early, late = m("id-b", "vm", 1000), m("id-a", "vm", 2000)
    assert must_yield(late, early) and not must_yield(early, late)  # time first, whatever the ids
    assert must_yield(m("id-b", "vm", 5), m("id-a", "vm", 5))  # a tie: the lower id keeps it
    assert not must_yield(late, m("id-b", "vm", 1000, state=SUSPECT))  # maybe the machine restarting
    assert not must_yield(late, m("id-b", "vm", 1000, state=DEAD))
    assert not must_yield(late, m("id-b", "other", 1000))
    assert not must_yield(late, m("id-a", "vm", 1))  # ourselves
    assert must_yield(m("new", "vm", 10), m("old", "vm", None)) is False  # an old version: newest
    members = [early, late, m("x", "vm-2", 1), m("y", "vm-3", 1, state=DEAD)]
    assert holder_of(late, members) == early and holder_of(early, members) is None
    assert free_name("vm", members) == "vm-3"  # vm-2 is held; a dead vm-3 does not hold it
    assert len(free_name("n" * 128, members)) == 128


def test_a_node_that_left_never_gossips_itself_alive_again() -> None:
    sm = Membership(Alive("a", "a", ("h", 1), 5, {}), LOCAL, random.Random(1), 0.0)
    sm.preload([Alive("b", "b", ("h", 2), 1, {})], 0.0)
    sm.leave(1.0)
    assert sm.update_meta(1.5, {"job": None}) == []  # e.g. a worker ended while the agent leaves
    assert sm.incarnation == 5 and sm.rename(1.6, "a-2", {}) == []
    assert sm.member("a").state == "left"  # type: ignore[union-attr]


def test_the_node_id_is_stored_per_name_and_survives_restarts(tmp_path: Path) -> None:
    first = node_identity(tmp_path, "vm")
    assert first.startswith("vm-") and node_identity(tmp_path, "vm") == first
    assert node_identity(tmp_path, "other") != first  # a --local mesh: several agents, one directory
    assert node_identity(tmp_path / "another-machine", "vm") != first  # same hostname, other machine
    assert node_identity(tmp_path, "a/b c").startswith("a_b_c-")


# ------------------------------------------------------------------ real gossip nodes on loopback


async def until(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def node(name: str, node_id: str, seed: int | None = None, **kw: Any) -> GossipNode:
    return GossipNode(
        name,
        profile=LOCAL,
        host="127.0.0.1",
        port=0,
        seeds=[("127.0.0.1", seed)] if seed is not None else [],
        discovery=False,
        node_id=node_id,
        **kw,
    )


def test_two_nodes_with_one_hostname_form_a_mesh_and_the_later_one_takes_a_suffix() -> None:
    async def main() -> None:
        a = node("vm", "vm-aaaa")
        await a.start()
        b = node("vm", "vm-bbbb", seed=a.port)
        events: list[str] = []
        b.subscribe(lambda ev: events.append(f"{ev.kind} {ev.member.name}"))
        await b.start()
        try:
            for n in (a, b):
                await until(lambda n=n: {x.name for x in n.alive_members()} == {"vm", "vm-2"}, 10)
            assert a.name == "vm" and b.name == "vm-2" and "renamed vm-2" in events
            assert {x.id: x.name for x in a.members()} == {"vm-aaaa": "vm", "vm-bbbb": "vm-2"}
            # the rename is an ordinary update at a higher incarnation: refutation still holds
            me = next(x for x in a.members() if x.id == "vm-bbbb")
            assert me.incarnation == b.incarnation and me.meta[NAMED_KEY] == b.meta[NAMED_KEY]
        finally:
            await b.leave()
            await a.leave()

    arun(main())


def test_a_refusing_node_is_told_who_holds_its_name() -> None:
    async def main() -> None:
        a = node("box-a", "box-a-1111")
        await a.start()
        b = node("box-a", "box-a-2222", seed=a.port, on_clash="refuse")
        taken = []
        b.subscribe(lambda ev: taken.append(ev.member) if ev.kind == "name_taken" else None)
        await b.start()
        try:
            await until(lambda: bool(taken), 10)
            assert taken[0].id == "box-a-1111" and taken[0].addr == ("127.0.0.1", a.port)
            assert b.name == "box-a" and b.name_taken_by is not None
            assert a.name == "box-a"  # the holder never moves
            await b.leave()
            await until(lambda: {x.id: x.state for x in a.members()}.get("box-a-2222") == "left", 5)
            assert a.name == "box-a" and a.alive_members()[0].id == "box-a-1111"
        finally:
            await b.leave()
            await a.leave()

    arun(main())


def test_a_join_through_a_seed_says_why_it_failed() -> None:
    mesh, other = Keyring([generate_secret()]), Keyring([generate_secret()])

    async def main() -> None:
        seed = node("seed", "seed", keyring=mesh)
        await seed.start()
        try:
            wrong = node("x", "x", seed=seed.port, keyring=other)
            t0 = time.monotonic()
            await wrong.start()
            assert time.monotonic() - t0 < 2.0
            assert wrong.join_refused and "another mesh's secret" in str(wrong.join_problem)
            assert f"127.0.0.1:{seed.port}" in str(wrong.join_problem)
            assert [x.id for x in seed.members()] == ["seed"]  # it learned nothing of us, we of it
            assert [x.id for x in wrong.members()] == ["x"]
            assert seed.drops.get("join_refused") == 1 and seed.security_drops.snapshot()["unknown_mesh"] >= 1
            await wrong.close()

            mode = node("y", "y", seed=seed.port, keyring=mesh.with_encrypt(True))
            await mode.start()
            assert mode.join_refused and "--encrypt" in str(mode.join_problem)
            await mode.close()

            dead = node("z", "z", seed=_free_port(), keyring=mesh)
            await dead.start()
            assert not dead.join_refused and "unreachable" in str(dead.join_problem)
            await dead.close()

            good = node("w", "w", seed=seed.port, keyring=mesh)
            await good.start()
            assert good.joined and good.join_problem is None
            await good.leave()
        finally:
            await seed.close()

    arun(main())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ the CLI, real processes


def _join_detached(home: Path, *args: str, env: dict[str, str] | None = None) -> tuple[float, Any]:
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "meshtrain", "join", "--detach", "--profile", "local"]
        + ["--host", "127.0.0.1", "--port", "0", "--no-discovery", *args],
        env={**os.environ, "MESHTRAIN_HOME": str(home), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return time.monotonic() - t0, out


def test_join_detached_with_a_wrong_secret_or_a_dead_seed_fails_within_seconds(tmp_path: Path) -> None:
    a = AgentProcess(tmp_path / "a", "a")
    try:
        seed = f"127.0.0.1:{a.port}"
        other = Keyring([generate_secret()]).to_text()
        took, out = _join_detached(
            tmp_path / "x", "--name", "x", "--seed", seed, env={"MESHTRAIN_SECRET": other}
        )
        assert out.returncode != 0 and took < 10, (took, out)
        assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert f"the seed {seed} refused this node" in out.stderr and "another mesh's secret" in out.stderr
        assert not (tmp_path / "x" / "agent.sock").exists()  # no agent left running alone
        snap = json.loads(cli(a.home, "status", "--json").stdout)
        assert snap["drops"].get("join_refused", 0) >= 1 and snap["drops"]["unknown_mesh"] >= 1
        assert [n["name"] for n in snap["nodes"]] == ["a"]

        dead = f"127.0.0.1:{_free_port()}"
        took, out = _join_detached(tmp_path / "y", "--name", "y", "--token", a.token or "", "--seed", dead)
        assert out.returncode == 0, out.stderr  # one of its seeds (the token's) answered
        cli(tmp_path / "y", "leave")
        took, out = _join_detached(
            tmp_path / "z", "--name", "z", "--seed", dead, env={"MESHTRAIN_SECRET": other}
        )
        assert out.returncode != 0 and took < 10, (took, out)
        assert f"the seed {dead} is unreachable" in out.stderr and len(out.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "z" / "agent.sock").exists()
    finally:
        a.stop()


def test_join_with_a_name_another_machine_holds_is_refused_naming_it(tmp_path: Path) -> None:
    a = AgentProcess(tmp_path / "a", "box-a")
    b = AgentProcess(tmp_path / "b", "b", token=a.token)
    try:
        wait_for(lambda: alive_names(a.home) == {"box-a", "b"})
        before = json.loads(cli(a.home, "status", "--json").stdout)
        took, out = _join_detached(tmp_path / "second", "--name", "box-a", "--token", a.token or "")
        assert out.returncode != 0 and took < 15, out
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert f"the name box-a is taken by the node at 127.0.0.1:{a.port}" in out.stderr
        assert not (tmp_path / "second" / "agent.sock").exists()
        time.sleep(1.0)
        after = json.loads(cli(b.home, "status", "--json").stdout)
        holder = next(n for n in after["nodes"] if n["id"] == before["self"])
        assert holder["name"] == "box-a" and holder["state"] == "alive"  # the original never "left"
        assert after["leader"] == before["leader"]  # and leadership did not move
    finally:
        b.stop()
        a.stop()


def test_two_agents_with_the_same_hostname_both_join(tmp_path: Path) -> None:
    """No --name: the hostname; the second machine called that becomes HOST-2 and both see 2 alive."""
    import socket

    host = socket.gethostname().split(".")[0]
    a = AgentProcess(tmp_path / "a", "a")  # only for its token: a mesh to join
    procs = []
    try:
        for i in range(2):
            env = {**os.environ, "MESHTRAIN_HOME": str(tmp_path / f"h{i}")}
            cmd = [sys.executable, "-m", "meshtrain", "join", "--profile", "local", "--host", "127.0.0.1"]
            cmd += ["--port", "0", "--no-discovery", "--token", a.token or ""]
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            )
            time.sleep(0.5)
        wait_for(lambda: alive_names(a.home) == {"a", host, f"{host}-2"}, timeout=30)
        wait_for(lambda: alive_names(tmp_path / "h0") == {"a", host, f"{host}-2"}, timeout=30)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        a.stop()
