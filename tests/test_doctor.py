"""`meshtrain doctor` as a user runs it, and the node facts gossip carries."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import msgpack
import pytest

from meshtrain import blas, netns, sysinfo


def doctor(prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHTRAIN_BLAS") and k != "LD_PRELOAD"}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "meshtrain", "doctor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_doctor_reports_mlx_blas_cores_and_interfaces() -> None:
    result = doctor()
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{sysinfo.mlx_version()}  device" in out
    assert "GFLOP/s" in out
    assert f"{os.cpu_count()} logical" in out
    assert "127.0.0.1" in out and "(loopback)" in out
    if blas.mlx_links_reference_blas() and blas.find_openblas() is not None:
        assert "OpenBLAS (preloaded from" in out, out
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not netns.available(), reason="needs root, ip and tc")
def test_doctor_shows_broadcast_address_of_a_lan() -> None:
    with netns.Cluster(1, prefix="mtA") as cluster:
        result = doctor(cluster.exec_prefix(0))
    assert result.returncode == 0, result.stderr
    assert "10.77.0.1" in result.stdout and "10.77.0.255" in result.stdout


def test_node_facts_fit_in_a_gossip_datagram_and_are_cheap() -> None:
    facts = sysinfo.node_facts()
    for key in (
        "platform",
        "machine",
        "mlx",
        "mlx_device",
        "mlx_backend",
        "blas",
        "cores",
        "memory_gb",
        "battery",
        "thermal",
    ):
        assert key in facts
    assert facts["mlx_device"] in ("cpu", "gpu", "none")
    assert facts["cores"] >= 1 and facts["memory_gb"] > 0
    assert len(msgpack.packb(facts)) < 800
    start = time.perf_counter()
    for _ in range(20):
        sysinfo.node_facts()
    assert (time.perf_counter() - start) / 20 < 0.01, "node_facts must stay cheap"


def test_interfaces_are_ipv4_and_up_with_broadcast() -> None:
    found = sysinfo.interfaces()
    loopback = [i for i in found if i["loopback"]]
    assert loopback and loopback[0]["address"].startswith("127.") and loopback[0]["broadcast"] is None
    for iface in found:
        assert set(iface) >= {"name", "address", "broadcast"}
        assert iface["address"].count(".") == 3


def test_broadcast_is_computed_when_the_os_does_not_say() -> None:
    assert sysinfo._broadcast("192.168.1.7", "255.255.255.0", None) == "192.168.1.255"
    assert sysinfo._broadcast("10.1.2.3", "255.255.0.0", "10.1.255.255") == "10.1.255.255"
    assert sysinfo._broadcast("10.0.0.1", "255.255.255.255", None) is None
