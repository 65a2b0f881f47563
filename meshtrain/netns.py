"""A LAN of test hosts on one Linux machine, for tests and benches (needs root + iproute2).

Network namespaces on one bridge, each host's veth optionally shaped with a
rate (tbf) and delay (netem), so multi-host behaviour (broadcast discovery,
ring traffic over a 1 Gbit/s link, partitions) is exercised for real.

Some kernels are built without the netem qdisc (`tc qdisc add ... netem` says
"Specified qdisc kind is unknown"). A cluster asked for a delay there still
comes up: its links get the rate only, `Cluster.delay_applied` is False,
`Cluster.shaping` says so in words, and one line on stderr says so too, so a
bench never reports a delayed link it did not have. Each
cluster has its own name prefix so several can exist at once; hosts get
10.77.0.1..N inside their own namespaces (namespaces are isolated, so
clusters with different prefixes do not see each other).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def available() -> bool:
    """True when namespaces can be made here (root and the `ip` and `tc` tools)."""
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None


def _run(*args: str, check: bool = True) -> None:
    subprocess.run(args, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _try(*args: str) -> bool:
    """Run a command; False (not an exception) when it fails."""
    return subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def _shape(prefix_cmd: Sequence[str], dev: str, rate: str | None, delay: str | None) -> bool:
    """Shape `dev`; False when the delay was asked for but could not be applied (no netem)."""
    tc = [*prefix_cmd, "tc", "qdisc", "add", "dev", dev]
    tbf = ["tbf", "rate", str(rate), "burst", "256kb", "latency", "50ms"]
    if delay:
        if _try(*tc, "root", "handle", "1:", "netem", "delay", delay):
            if rate:
                _run(*tc, "parent", "1:", "handle", "2:", *tbf)
            return True
        if rate:  # no netem in this kernel: the rate alone
            _run(*tc, "root", *tbf)
        return False
    if rate:
        _run(*tc, "root", *tbf)
    return True


@dataclass
class Cluster:
    """N hosts `{prefix}0..` on bridge `{prefix}br0`; use as a context manager."""

    n: int
    prefix: str = "mt"
    rate: str | None = None
    delay: str | None = None
    delay_applied: bool = True  # False after `up` on a kernel without netem (the rate only)

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br0"

    def ns(self, i: int) -> str:
        return f"{self.prefix}{i}"

    def ip(self, i: int) -> str:
        return f"10.77.0.{i + 1}"

    def exec_prefix(self, i: int) -> list[str]:
        """Command prefix that runs a program inside host i."""
        return ["ip", "netns", "exec", self.ns(i)]

    def join(self, i: int, log: Path, env: Mapping[str, str], *flags: str) -> subprocess.Popen[bytes]:
        """Start `meshtrain join --name host{i} FLAGS` inside host i, its output going to `log`."""
        cmd = [*self.exec_prefix(i), sys.executable, "-m", "meshtrain", "join", "--name", f"host{i}", *flags]
        with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(
                cmd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def up(self) -> Cluster:
        self.down()
        self.delay_applied = True
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "link", "set", self.bridge, "up")
        for i in range(self.n):
            ns, host, peer = self.ns(i), f"{self.prefix}h{i}", f"{self.prefix}b{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
            _run("ip", "link", "set", host, "netns", ns)
            _run("ip", "link", "set", peer, "master", self.bridge, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "brd", "10.77.0.255", "dev", host)
            _run("ip", "-n", ns, "link", "set", host, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            applied = _shape(self.exec_prefix(i), host, self.rate, self.delay)
            applied = _shape([], peer, self.rate, self.delay) and applied
            self.delay_applied = self.delay_applied and applied
        if not self.delay_applied:
            print(f"meshtrain.netns: {self.shaping}", file=sys.stderr)
        return self

    @property
    def shaping(self) -> str:
        """The links as they are, in words (say it in a bench's output)."""
        rate = f"rate {self.rate}" if self.rate else "no rate limit"
        if not self.delay:
            return rate
        if self.delay_applied:
            return f"{rate}, delay {self.delay}"
        only = f"{rate} only" if self.rate else rate
        return f"{only}: the delay {self.delay} is NOT applied (this kernel has no netem qdisc)"

    def down(self) -> None:
        for i in range(self.n):
            # the bridge-side end too: the kernel frees a deleted namespace's veths lazily (seconds
            # under load), and a cluster brought up again at once could not add them meanwhile
            _run("ip", "link", "del", f"{self.prefix}b{i}", check=False)
            _run("ip", "netns", "del", self.ns(i), check=False)
        _run("ip", "link", "del", self.bridge, check=False)

    def cut(self, i: int) -> None:
        """Take host i's link down: a partition or a Wi-Fi drop."""
        _run("ip", "link", "set", f"{self.prefix}b{i}", "down")

    def heal(self, i: int) -> None:
        _run("ip", "link", "set", f"{self.prefix}b{i}", "up")

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM every process (agents leave gracefully on it), then SIGKILL those alive after `timeout`."""
    procs = list(procs)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
