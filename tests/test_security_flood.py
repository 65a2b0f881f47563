"""A real 2-node mesh trains MNIST while every port its processes listen on is flooded with garbage.

Two `meshtrain join` agents (subprocesses, one shared MESHTRAIN_SECRET, on
loopback) run `examples/mnist.py` back to back while a flooder sends random
and hostile bytes to every UDP and TCP port the agents and their workers
listen on (gossip UDP, push-pull/control TCP, the workers' ring listeners),
found from the processes themselves with psutil, refreshed as workers come
and go. The garbage comes from 127.0.0.2 (still loopback), as a stranger on
the LAN has its own address: the control listener's per-source rate limit
must cut the stranger off without starving the agents' own connections.

Every job must finish with exit 0 and a sane accuracy, both agents must stay
members, and the agents must have counted drops. Flood length:
MESHTRAIN_FLOOD_SECONDS (default 6; 30 for the issue's must-show run).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from meshtrain import netns
from meshtrain.agent.control import RATE_LIMITED, Conn, ConnectionLimiter, ControlServer, call
from meshtrain.gossip.codec import decode_beacon
from meshtrain.security import Keyring, generate_secret
from meshtrain.security.auth import ENVELOPE, TAG_BYTES

ROOT = Path(__file__).resolve().parent.parent
FLOOD_SECONDS = float(os.environ.get("MESHTRAIN_FLOOD_SECONDS", "6"))
STRANGER = "127.0.0.2"  # loopback, but not the agents' own source address
ACCURACY = re.compile(r"final test accuracy: ([\d.]+)%")
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"

pytestmark = pytest.mark.timeout(int(FLOOD_SECONDS * 4 + 150))


def agent_env(home: Path, secret: str) -> dict[str, str]:
    env = {**os.environ, "MESHTRAIN_HOME": str(home), "MESHTRAIN_SECRET": secret}
    if os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS
    return env


class Agent:
    """`meshtrain join` in the background, with its own state directory."""

    def __init__(self, home: Path, name: str, secret: str, seed: int | None = None) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home, self.name, self.env = home, name, agent_env(home, secret)
        args = ["join", "--name", name, "--profile", "local", "--host", "127.0.0.1", "--port", "0"]
        args += ["--no-discovery"] + (["--seed", f"127.0.0.1:{seed}"] if seed else [])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshtrain", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert "gossip port" in first, first
        self.port = int(first.split("gossip port ")[1].split(")")[0])
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshtrain", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )

    def status(self) -> dict:  # type: ignore[type-arg]
        out = self.cli("status", "--json", timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def listening_ports(pids: list[int]) -> set[tuple[str, int]]:
    """("udp"|"tcp", port) of every socket the processes and their children listen on at 127.0.0.1/any."""
    found: set[tuple[str, int]] = set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            try:
                conns = proc.net_connections(kind="inet4")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for c in conns:
                if not c.laddr or c.laddr.ip not in ("127.0.0.1", "0.0.0.0"):
                    continue
                if c.type == socket.SOCK_DGRAM:
                    found.add(("udp", c.laddr.port))
                elif c.status == psutil.CONN_LISTEN:
                    found.add(("tcp", c.laddr.port))
    return found


def garbage(rng: random.Random) -> bytes:
    """Random bytes, or hostile shapes: a sealed-envelope look-alike, huge length prefixes, fake frames."""
    shape = rng.randrange(6)
    if shape == 0:
        return b"MTd\x01" + rng.randbytes(rng.randrange(60, 300))
    if shape == 1:
        return struct.pack(">I", rng.choice([0, 0xFFFFFFFF, 1 << 20, 65536])) + rng.randbytes(64)
    if shape == 2:
        return b"\x00\x00\x00\x12\x82\xa4kind\xa5hello\xa6nbytes\xce\xff\xff\xff\xff"
    if shape == 3:
        return rng.randbytes(rng.randrange(1200, 9000))
    return rng.randbytes(rng.randrange(0, 1400))


class Flooder:
    """Sends garbage to every listening port of `pids` until stopped; bounded rate, loopback only."""

    def __init__(self, pids: list[int], seed: int = 1) -> None:
        self.pids = pids
        self.rng = random.Random(seed)
        self.sent: Counter[str] = Counter()
        self.ports: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self.current: set[tuple[str, int]] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._idle: list[socket.socket] = []  # slow connections that never say anything (bounded)

    def __enter__(self) -> Flooder:
        self.current = listening_ports(self.pids)
        self.ports |= self.current
        self._watcher.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self._watcher.join(30)
        for s in self._idle:
            s.close()

    def _watch(self) -> None:
        """Refresh the targets often: a worker's ring listener lives only as long as its job."""
        while not self._stop.wait(0.1):
            self.current = listening_ports(self.pids)
            self.ports |= self.current

    def _run(self) -> None:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((STRANGER, 0))
        try:
            while not self._stop.is_set():
                for kind, port in sorted(self.current):
                    if kind == "udp":
                        for _ in range(8):
                            try:
                                udp.sendto(garbage(self.rng)[:65000], ("127.0.0.1", port))
                                self.sent["udp"] += 1
                            except OSError:
                                self.sent["udp_error"] += 1
                    else:
                        self._tcp(port)
                self._stop.wait(0.04)
        finally:
            udp.close()

    def _tcp(self, port: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(0.5)
        try:
            s.bind((STRANGER, 0))
            s.connect(("127.0.0.1", port))
            self.sent["tcp_connect"] += 1
            if len(self._idle) < 16 and self.rng.random() < 0.1:
                self._idle.append(s)  # say nothing: the handshake timeout must reap it
                return
            s.sendall(garbage(self.rng))
            self.sent["tcp_garbage"] += 1
        except OSError:
            self.sent["tcp_refused"] += 1
        s.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Agent, Agent]]:
    root = tmp_path_factory.mktemp("flood")
    secret = Keyring([generate_secret()]).to_text()
    a = Agent(root / "a", "a", secret)
    b = Agent(root / "b", "b", secret, seed=a.port)
    try:
        deadline = time.monotonic() + 30
        while {n["name"] for n in a.status()["nodes"] if n["state"] == "alive"} != {"a", "b"}:
            assert time.monotonic() < deadline, "the two agents did not meet"
            time.sleep(0.2)
        yield a, b
    finally:
        b.stop()
        a.stop()


def test_the_mesh_keeps_training_under_a_garbage_flood_on_every_port(mesh: tuple[Agent, Agent]) -> None:
    a, b = mesh
    job = ["run", "--nodes", "2", "examples/mnist.py", "--epochs", "1", "--train-limit", "4000"]
    accuracies: list[float] = []
    start = time.monotonic()
    with Flooder([a.proc.pid, b.proc.pid]) as flood:
        while not accuracies or time.monotonic() - start < FLOOD_SECONDS:
            out = a.cli(*job, timeout=FLOOD_SECONDS * 2 + 120)
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
            found = ACCURACY.findall(out.stdout)
            assert found, out.stdout[-2000:]
            accuracies.append(float(found[-1]))
        flooded_for = time.monotonic() - start
    ports = sorted(flood.ports)
    drops = {x.name: x.status()["drops"] for x in (a, b)}
    print(
        f"\n[flood] {flooded_for:.1f} s, {len(accuracies)} jobs, accuracies {accuracies}, "
        f"sent {dict(flood.sent)}, ports {ports}, drops {drops}"
    )
    assert all(acc > 70.0 for acc in accuracies), accuracies
    assert {kind for kind, _ in ports} == {"udp", "tcp"} and len(ports) >= 5, (
        ports
    )  # 2 gossip, 2 control, rings
    assert flood.sent["udp"] > 100 and flood.sent["tcp_garbage"] > 10, flood.sent
    for name, counts in drops.items():
        assert counts.get("malformed", 0) + counts.get("bad_tag", 0) + counts.get("unknown_mesh", 0) > 0, (
            name,
            counts,
        )
    for x in (a, b):
        alive = {n["name"] for n in x.status()["nodes"] if n["state"] == "alive"}
        assert alive == {"a", "b"} and x.proc.poll() is None


# --- the control listener's per-source rate limit and connection caps ---------------------------


def test_connection_limiter_buckets_per_source_and_caps_open_connections() -> None:
    limiter = ConnectionLimiter(rate=2.0, burst=3, max_open_per_source=10, max_open=4, max_sources=2)
    assert [limiter.admit("x", 0.0) for _ in range(4)] == [True, True, True, False]  # burst of 3
    assert limiter.admit("x", 0.4) is False and limiter.admit("x", 0.6) is True  # 2 per second refill
    assert limiter.admit("y", 0.6) is False  # 4 open in all: the cap, whoever asks
    limiter.release("x")
    assert limiter.admit("y", 0.6) is True
    for source in ("z", "w", "v"):
        limiter.release("x")
        limiter.admit(source, 1.0)
    assert len(limiter._buckets) == 2  # the table of sources stays bounded
    per_source = ConnectionLimiter(rate=100.0, burst=100, max_open_per_source=2)
    assert [per_source.admit("x", 0.0) for _ in range(3)] == [True, True, False]
    assert per_source.admit("y", 0.0) is True


def test_control_server_closes_a_connection_flood_and_still_serves_others() -> None:
    ring = Keyring([generate_secret()])

    async def scenario() -> tuple[int, dict[str, object], list[bool]]:
        async def handle(header: dict[str, object], payload: bytes, conn: Conn) -> None:
            await conn.reply(True, op=header.get("op"))

        server = ControlServer(
            handle, keyring=ring, limiter=ConnectionLimiter(rate=1.0, burst=5, max_open_per_source=3)
        )
        port = await server.start_tcp("127.0.0.1", 0)
        held = []
        closed_at_once = []
        try:
            for _ in range(10):  # a stranger opens connections and says nothing
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(STRANGER, 0))
                held.append(writer)
                try:
                    data = await asyncio.wait_for(reader.read(1), 0.5)
                    closed_at_once.append(data == b"")
                except (asyncio.TimeoutError, ConnectionError):
                    closed_at_once.append(False)
            reply = await call(("127.0.0.1", port), "status", keyring=ring)  # another source still served
            return server.drops.snapshot()[RATE_LIMITED], reply, closed_at_once
        finally:
            for writer in held:
                writer.close()
            await server.close()

    limited, reply, closed_at_once = asyncio.run(scenario())
    assert closed_at_once == [False] * 3 + [True] * 7  # three held open (the cap), the rest cut at once
    assert limited == 7 and reply["ok"] is True


# --- what a LAN listener learns from a beacon ---------------------------------------------------

CAPTURE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("", 7947))
s.settimeout(20)
data, addr = s.recvfrom(65535)
sys.stdout.write(data.hex())
"""


@pytest.mark.skipif(not netns.available(), reason="needs network namespaces (root, iproute2)")
def test_a_beacon_names_no_node_only_that_one_exists_and_its_port(tmp_path: Path) -> None:
    name = "kitchen-imac-of-alice"
    env = {
        **os.environ,
        "MESHTRAIN_HOME": str(tmp_path / "h0"),
        "MESHTRAIN_SECRET": Keyring([generate_secret()]).to_text(),
    }
    with netns.Cluster(2, prefix="kb") as cluster:
        listener = subprocess.Popen(
            [*cluster.exec_prefix(1), sys.executable, "-c", CAPTURE], stdout=subprocess.PIPE, text=True
        )
        agent = subprocess.Popen(
            [*cluster.exec_prefix(0), sys.executable, "-m", "meshtrain", "join", "--name", name]
            + ["--port", "7946", "--profile", "local"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        try:
            captured = bytes.fromhex(listener.communicate(timeout=30)[0])
            status = subprocess.run(
                [*cluster.exec_prefix(0), sys.executable, "-m", "meshtrain", "status", "--json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
        finally:
            agent.terminate()
            agent.wait(10)
            listener.kill()
            listener.wait()
    node_id = json.loads(status.stdout)["self"]
    assert captured, "no beacon heard"
    assert name.encode() not in captured and node_id.encode() not in captured
    body = captured[ENVELOPE.size : -TAG_BYTES]  # the sealed envelope's body: authenticated, in clear
    beacon = decode_beacon(body, 1400)
    assert beacon.port == 7946 and beacon.node.startswith("b-") and name not in beacon.node


# --- the ring port: idle connections, garbage and stale hellos never hold up a real neighbour ----

RING_SECRET = Keyring([generate_secret()])


def _ring_members(listeners: list[Any], gen: int, timeout: float, cancel: Any = None) -> list[Any]:
    """Connect a ring of len(listeners) members in threads and all-reduce once; results or exceptions."""
    from meshtrain.ring import Ring

    addrs = [("127.0.0.1", lst.port) for lst in listeners]
    results: list[Any] = [None] * len(listeners)

    def body(rank: int) -> None:
        try:
            with Ring.connect(
                listeners[rank], rank, addrs, job="jf", generation=gen, timeout=timeout, keyring=RING_SECRET
            ) as ring:
                out = ring.allreduce(np.full(1000, float(rank), np.float32), step=0)
                results[rank] = float(out[0])
        except BaseException as exc:  # noqa: B036 - handed back to the test
            results[rank] = exc

    threads = [threading.Thread(target=body, args=(r,)) for r in range(len(listeners))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return results


class IdleFlood:
    """A stranger (127.0.0.2) that keeps `n` connections to a port open without a byte, reopening
    the ones the listener drops, plus some garbage; like the issue's ~66 idle connections."""

    def __init__(self, port: int, n: int = 120) -> None:
        self.port, self.n = port, n
        self.socks: list[socket.socket] = []
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> IdleFlood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self.socks:
            s.close()

    def _run(self) -> None:
        rng = random.Random(3)
        while not self._stop.is_set():
            alive = []
            for s in self.socks:
                try:
                    s.setblocking(False)
                    if s.recv(1) == b"":
                        s.close()
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    s.close()
                    continue
                alive.append(s)
            self.socks = alive
            while len(self.socks) < self.n and not self._stop.is_set():
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(0.2)
                try:
                    s.bind((STRANGER, 0))
                    s.connect(("127.0.0.1", self.port))
                    if rng.random() < 0.2:
                        s.sendall(garbage(rng))  # and some junk among the silent ones
                except OSError:
                    s.close()
                    break  # the backlog is full: try again on the next round
                self.opened += 1
                self.socks.append(s)
            self._stop.wait(0.05)


def test_idle_connections_on_the_ring_port_do_not_hold_up_the_ring() -> None:
    from meshtrain.ring import RingListener

    listeners = [RingListener.bind("127.0.0.1") for _ in range(3)]
    try:
        with IdleFlood(listeners[1].port) as flood, IdleFlood(listeners[2].port):
            time.sleep(1.0)  # the flood is in place before the ring forms (the backlog of 64 would be full)
            start = time.monotonic()
            results = _ring_members(listeners, gen=4, timeout=15)
            took = time.monotonic() - start
        assert results == [1.0, 1.0, 1.0], results
        print(f"\n[idle flood] the ring formed in {took:.2f}s through {flood.opened} idle connections")
        assert took < 10, took  # one at a time, 2 s per idle connection, it did not form within 15 s
        counted = listeners[1].drops.snapshot()
        assert flood.opened > 100 and counted["malformed"] + counted["rate_limited"] > 0, (
            flood.opened,
            counted,
        )
    finally:
        for lst in listeners:
            lst.close()


def test_a_leftover_hello_from_an_earlier_attempt_is_not_taken_for_the_neighbour() -> None:
    """The issue's permanent stall: a hello of the same job, generation and rank whose dialer gave up
    (closed) sits before the live one; the acceptor must take the live one, and the ring must work."""
    from meshtrain.ring import RingListener

    listeners = [RingListener.bind("127.0.0.1") for _ in range(2)]
    try:
        for _ in range(3):  # leftovers of rank 1's earlier attempts at generation 6, all closed
            stale = socket.create_connection(("127.0.0.1", listeners[0].port))
            hello = {"job": "jf", "gen": 6, "rank": 1, "size": 2, "version": 1, "attempt": os.urandom(8)}
            from meshtrain.ring.tcp import send_hello
            from meshtrain.security import handshake

            send_hello(stale, handshake.dial_hello(RING_SECRET, hello, time.time()))
            stale.close()
        time.sleep(0.3)
        results = _ring_members(listeners, gen=6, timeout=10)
        assert results == [0.5, 0.5], results
    finally:
        for lst in listeners:
            lst.close()


def ring_ports(pids: list[int]) -> set[int]:
    """The ring listeners of the workers under these agents (the LISTEN sockets of meshtrain.worker)."""
    found: set[int] = set()
    for pid in pids:
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for child in children:
            try:
                if "meshtrain.worker" not in " ".join(child.cmdline()):
                    continue
                conns = child.net_connections(kind="tcp4")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            found |= {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}
    return found


class RingFlood:
    """IdleFlood on every worker ring port of the agents, following workers as they come and go."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.floods: dict[int, IdleFlood] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RingFlood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for flood in self.floods.values():
            flood.__exit__()

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            for port in ring_ports(self.pids) - set(self.floods):
                self.floods[port] = IdleFlood(port, n=80).__enter__()


@pytest.mark.skipif(
    not os.environ.get("MESHTRAIN_DRILLS"),
    reason="a ~60 s drill (MESHTRAIN_DRILLS=1); the ring forming through 120 idle connections is the gate",
)
@pytest.mark.timeout(400)
def test_training_converges_after_an_idle_flood_of_the_ring_ports_with_a_worker_killed(
    tmp_path: Path,
) -> None:
    """The issue's drill: ~80 idle connections on every ring port, one worker SIGKILLed during the
    attack (its node's new worker must get into the ring through the flood), then the attack ends:
    training goes on and the job finishes, with the refusals counted in `status`."""
    from meshtrain.testing.agents import alive_names, cli, wait_for
    from tests.test_elastic_agents import finished_digests, run_job, start_agent, worker_pids

    ledger, out = tmp_path / "ledger", tmp_path / "out"
    ledger.mkdir()
    out.mkdir()
    agents = [start_agent(tmp_path, "a", None, ledger)]
    job = None
    try:
        for name in "bc":
            agents.append(start_agent(tmp_path, name, agents[0].token, ledger))
        wait_for(lambda: alive_names(agents[0].home) == set("abc"))
        job = run_job(agents[0].home, out, "--epochs", "80", "--step-sleep", "0.05")
        wait_for(lambda: (ledger / "ledger-c.jsonl").exists() and worker_pids(agents[2]) != [], timeout=90)
        with RingFlood([a.proc.pid for a in agents]) as flood:
            time.sleep(3)
            for pid in worker_pids(agents[2]):
                os.kill(pid, signal.SIGKILL)
            killed = time.time()
            time.sleep(20)
            drops = [json.loads(cli(a.home, "status", "--json").stdout)["drops"] for a in agents]
            ended = time.time()
        assert len(flood.floods) >= 3, flood.floods  # a, b and c's first worker at least
        stdout, stderr = job.communicate(timeout=200)
    finally:
        if job is not None and job.poll() is None:
            job.kill()
            job.communicate()
        for agent in agents:
            agent.stop()
    assert job.returncode == 0, stderr[-3000:]
    rows = [json.loads(x) for x in (ledger / "ledger-a.jsonl").read_text().splitlines()]
    during = [r for r in rows if killed < r["t"] < ended]
    rejoined = [r for r in during if "c~1" in r["slices"]]
    print(
        f"\n[ring flood] {len(during)} steps during the attack, c~1 in the ring after "
        f"{rejoined[0]['t'] - killed:.1f}s"
        if rejoined
        else "",
        f"{len(rows) - len(during)} other steps",
    )
    assert during and rejoined, "the ring did not re-form with the killed worker's replacement under attack"
    assert rows[-1]["t"] > ended or len(during) > 100, "training did not go on after the attack"
    digests = finished_digests(out)
    assert {"a", "b", "c~1"} <= set(digests) and len(set(digests.values())) == 1, digests
    refused = sum(d.get("malformed", 0) + d.get("rate_limited", 0) for d in drops)
    assert refused > 0, drops  # the ring ports' refusals reach `status`
