"""Rings across network namespaces: members with the mesh secret reduce, a stranger is refused by all."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from meshtrain import netns
from meshtrain.security import Keyring, generate_secret

pytestmark = [
    pytest.mark.skipif(not netns.available(), reason="needs root, ip and tc for network namespaces"),
    pytest.mark.timeout(60),
]

N = 3
PORT = 29411
MEMBER = """
import sys, numpy as np
from meshtrain.errors import PeerLost
from meshtrain.ring import Ring, RingListener
from meshtrain.security import load_keyring
rank, n = int(sys.argv[1]), int(sys.argv[2])
addrs = [(f"10.77.0.{i + 1}", {port}) for i in range(n)]
keyring, _ = load_keyring(create=False)
with RingListener.bind(addrs[rank][0], addrs[rank][1]) as listener:
    try:
        with Ring.connect(listener, rank, addrs, job="sec", generation=1, timeout=3, keyring=keyring) as ring:
            out = ring.allreduce(np.full(200_000, float(rank), np.float32))
            print("OK", ring.authenticated, float(out[0]))
    except PeerLost as exc:
        print("LOST", exc.reason)
""".replace("{port}", str(PORT))


def run_ring(cluster: netns.Cluster, secrets: list[Keyring]) -> list[str]:
    procs = []
    for rank in range(N):
        env = {**os.environ, "MESHTRAIN_SECRET": secrets[rank].to_text()}
        cmd = [*cluster.exec_prefix(rank), sys.executable, "-c", MEMBER, str(rank), str(N)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    return [p.communicate(timeout=30)[0].strip() for p in procs]


def test_ring_across_hosts_needs_the_mesh_secret() -> None:
    mesh = Keyring([generate_secret()])
    with netns.Cluster(N, prefix="sct") as cluster:
        assert run_ring(cluster, [mesh] * N) == ["OK True 1.0"] * N
        stranger = Keyring([generate_secret()])
        lines = run_ring(cluster, [mesh, mesh, stranger])
    assert all(line.startswith("LOST") and "authentication failed" in line for line in lines), lines
