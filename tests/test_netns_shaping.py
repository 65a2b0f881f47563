"""meshtrain.netns on a kernel without the netem qdisc: a delay asked for is dropped, said, not fatal.

This machine's kernel has no sch_netem (`tc qdisc add ... netem` says "Specified
qdisc kind is unknown"); a cluster asked for a rate and a delay must still come
up with the rate shaped, and say in `shaping` (and on stderr) that the delay is
not applied. Where netem exists, the delay is applied and said so.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from meshtrain import netns

pytestmark = pytest.mark.skipif(not netns.available(), reason="needs network namespaces (root, iproute2)")


def _qdiscs(cluster: netns.Cluster, i: int) -> str:
    out = subprocess.run(
        [*cluster.exec_prefix(i), "tc", "qdisc", "show", "dev", f"{cluster.prefix}h{i}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def test_a_delay_without_netem_shapes_the_rate_only_and_says_so(capfd: pytest.CaptureFixture[str]) -> None:
    with netns.Cluster(2, prefix="nq", rate="200mbit", delay="5ms") as cluster:
        serve = "import socket; s = socket.create_server(('0.0.0.0', 7300)); s.accept()[0].sendall(b'ok')"
        server = subprocess.Popen([*cluster.exec_prefix(1), sys.executable, "-c", serve])
        dial = (
            "import socket, sys, time\n"
            "for _ in range(50):\n"
            "    try: print(socket.create_connection((sys.argv[1], 7300), 2).recv(2).decode()); break\n"
            "    except OSError: time.sleep(0.1)\n"
        )
        ping = subprocess.run(
            [*cluster.exec_prefix(0), sys.executable, "-c", dial, cluster.ip(1)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        server.wait(10)
        qdiscs = _qdiscs(cluster, 0)
        assert ping.stdout.strip() == "ok", ping.stdout + ping.stderr  # the hosts reach each other
        assert "tbf" in qdiscs, qdiscs  # the rate is shaped either way
        err = capfd.readouterr().err
        if cluster.delay_applied:
            assert "netem" in qdiscs and cluster.shaping == "rate 200mbit, delay 5ms"
        else:
            assert "netem" not in qdiscs
            assert "NOT applied" in cluster.shaping and "no netem" in cluster.shaping
            assert "delay 5ms is NOT applied" in err, err
    assert cluster.shaping.startswith("rate 200mbit")


def test_a_delay_alone_without_netem_leaves_the_link_unshaped() -> None:
    with netns.Cluster(1, prefix="nr", delay="2ms") as cluster:
        qdiscs = _qdiscs(cluster, 0)
        if not cluster.delay_applied:
            assert "netem" not in qdiscs and "tbf" not in qdiscs
            assert cluster.shaping.startswith("no rate limit: the delay 2ms is NOT applied")
