"""A real LAN in network namespaces: seedless broadcast discovery, partition -> dead, heal -> alive.

Four `python -m meshtrain.gossip` processes, one per namespace host, no seeds; each
prints its membership events as JSON lines, from which the test keeps every host's view.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from meshtrain import netns

pytestmark = [
    pytest.mark.skipif(not netns.available(), reason="needs root, ip and tc for network namespaces"),
    pytest.mark.timeout(90),
]
N = 4
STATE_OF_EVENT = {"joined": "alive", "alive": "alive", "suspect": "suspect", "dead": "dead", "left": "left"}


class Host:
    def __init__(self, i: int, proc: asyncio.subprocess.Process, changed: asyncio.Event) -> None:
        self.name = f"h{i}"
        self.proc = proc
        self.view: dict[str, str] = {}
        self.changed = changed

    async def follow(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            ev = json.loads(line)
            if ev["event"] in STATE_OF_EVENT and ev["member"] != self.name:
                self.view[ev["member"]] = STATE_OF_EVENT[ev["event"]]
            self.changed.set()


async def until(changed: asyncio.Event, cond: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()

    async def loop() -> None:
        while not cond():
            changed.clear()
            await changed.wait()

    await asyncio.wait_for(loop(), timeout)
    return time.monotonic() - start


def test_broadcast_discovery_partition_and_heal() -> None:
    async def main(cluster: netns.Cluster) -> None:
        changed = asyncio.Event()
        hosts: list[Host] = []
        for i in range(N):
            cmd = [*cluster.exec_prefix(i), sys.executable, "-m", "meshtrain.gossip", "--name", f"h{i}"]
            cmd += ["--port", "7946", "--profile", "local"]  # no --seed: discovery only
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE)
            hosts.append(Host(i, proc, changed))
        followers = [asyncio.ensure_future(h.follow()) for h in hosts]
        names = {h.name for h in hosts}

        def everyone_alive() -> bool:
            return all(h.view == {n: "alive" for n in names - {h.name}} for h in hosts)

        def others_see_h3(state: str) -> Callable[[], bool]:
            return lambda: all(h.view.get("h3") == state for h in hosts[:3])

        try:
            took = await until(changed, everyone_alive, 20)
            print(f"\n4 seedless hosts discovered each other by broadcast in {took:.2f} s")
            cluster.cut(3)
            took = await until(changed, others_see_h3("dead"), 15)
            print(f"cut h3 -> dead on the other 3 in {took:.2f} s")
            await until(changed, lambda: set(hosts[3].view.values()) == {"dead"}, 15)  # a full split
            cluster.heal(3)
            took = await until(changed, everyone_alive, 25)
            print(f"heal h3 -> everyone alive everywhere again in {took:.2f} s")
        finally:
            for h in hosts:
                if h.proc.returncode is None:
                    h.proc.kill()
                await h.proc.wait()
            for f in followers:
                f.cancel()

    with netns.Cluster(N, prefix="gs") as cluster:
        asyncio.run(main(cluster))
