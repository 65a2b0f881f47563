"""Real sockets on loopback: convergence, meta, leave, SIGKILL detection, restart at a higher incarnation."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from meshtrain.gossip import PROFILES, GossipNode, MemberEvent

LOCAL = PROFILES["local"]
pytestmark = pytest.mark.timeout(60)


def arun(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


async def until(nodes: list[GossipNode], cond: Callable[[], bool], timeout: float) -> float:
    """Wait (woken by membership events, not by polling) until cond() holds; return seconds waited."""
    start = time.monotonic()
    changed = asyncio.Event()
    unsubscribe = [n.subscribe(lambda ev: changed.set()) for n in nodes]

    async def loop() -> None:
        while not cond():
            changed.clear()
            await changed.wait()

    try:
        await asyncio.wait_for(loop(), timeout)
    finally:
        for u in unsubscribe:
            u()
    return time.monotonic() - start


def states(node: GossipNode) -> dict[str, str]:
    return {m.id: m.state for m in node.members()}


async def start_mesh(n: int) -> list[GossipNode]:
    first = GossipNode("node-0", profile=LOCAL, host="127.0.0.1", port=0, discovery=False)
    await first.start()
    nodes = [first]
    for i in range(1, n):
        node = GossipNode(
            f"node-{i}",
            profile=LOCAL,
            host="127.0.0.1",
            port=0,
            seeds=[("127.0.0.1", first.port)],
            discovery=False,
        )
        await node.start()
        nodes.append(node)
    return nodes


def test_five_nodes_converge_share_meta_and_leave() -> None:
    async def main() -> None:
        nodes = await start_mesh(5)
        ids = {n.id for n in nodes}
        try:
            took = await until(
                nodes, lambda: all(states(n) == dict.fromkeys(ids, "alive") for n in nodes), 10
            )
            print(f"\n5 loopback nodes converged (all see 5 alive) {took:.3f} s after the last start")
            events: list[MemberEvent] = []
            nodes[0].subscribe(events.append)
            nodes[3].update_meta(job="abc", role="worker")

            def meta_everywhere() -> bool:
                return all(
                    next(m for m in n.members() if m.id == "node-3").meta.get("job") == "abc" for n in nodes
                )

            await until(nodes, meta_everywhere, 10)
            assert any(e.kind == "updated" and e.member.id == "node-3" for e in events)
            await nodes[4].leave()
            await until(nodes[:4], lambda: all(states(n)["node-4"] == "left" for n in nodes[:4]), 10)
            # Nothing we sent was rejected (an ICMP error from the node that left may count as "socket").
            bad = {"malformed", "oversized", "unknown", "version", "error"}
            assert all(not bad & set(n.drops) for n in nodes), [n.drops for n in nodes]
        finally:
            for n in nodes:
                await n.close()

    arun(main())


async def _started(proc: asyncio.subprocess.Process, timeout: float = 10) -> dict[str, Any]:
    """The child's "started" line (join events may be printed before it)."""
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        assert line, "gossip child exited"
        if json.loads(line)["event"] == "started":
            return dict(json.loads(line))


async def _spawn(seed_port: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshtrain.gossip",
        "--name",
        "child",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--no-discovery",
        "--profile",
        "local",
        "--seed",
        f"127.0.0.1:{seed_port}",
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_sigkilled_node_is_declared_dead_then_rejoins_with_higher_incarnation() -> None:
    async def main() -> None:
        nodes = await start_mesh(4)
        proc = await _spawn(nodes[0].port)
        try:
            started = await _started(proc)
            first_incarnation = started["incarnation"]

            def child_is(state: str) -> Callable[[], bool]:
                return lambda: all(states(n).get("child") == state for n in nodes)

            await until(nodes, child_is("alive"), 10)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            bound = LOCAL.detection_bound(5)
            took = await until(nodes, child_is("dead"), bound * 3)
            print(f"SIGKILL -> dead on all 4 survivors in {took:.2f} s (local profile bound {bound:.2f} s)")
            assert took <= bound

            proc = await _spawn(nodes[2].port)
            restarted = await _started(proc)
            assert restarted["incarnation"] > first_incarnation
            took = await until(nodes, child_is("alive"), 10)
            print(f"restarted child alive again everywhere in {took:.2f} s")
            for n in nodes:
                child = next(m for m in n.members() if m.id == "child")
                assert child.incarnation >= restarted["incarnation"] > first_incarnation
                assert child.addr == tuple(restarted["addr"])
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            for n in nodes:
                await n.close()

    arun(main())


def test_user_mistakes_are_user_errors() -> None:
    from meshtrain.errors import UserError

    with pytest.raises(UserError):
        GossipNode("x", meta={"blob": "x" * 4000})
    with pytest.raises(UserError):
        GossipNode("x", meta={"bad": object()})

    async def main() -> None:
        node = GossipNode("x", host="127.0.0.1", port=0, interface="no-such-if0", discovery=True)
        with pytest.raises(UserError):
            await node.start()
        await node.close()

    arun(main())
