"""What a node offers: platform, MLX device, BLAS, cores, memory, power, heat, interfaces.

`node_facts()` feeds gossip metadata (so every value is a msgpack-friendly
primitive and the whole dict stays a few hundred bytes) and `meshtrain
doctor`. The agent calls it every few seconds, so the parts that cannot
change while the process lives (platform, MLX build, BLAS) are computed once,
and MLX itself is never imported here: the agent does not train.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import os
import platform
import re
import socket
import subprocess
import sys
import time
from functools import cache
from typing import Any

import psutil

from meshtrain import blas

THERMAL_TTL_S = 30.0  # `pmset -g therm` is a subprocess: ask at most this often
_thermal_cache: tuple[float, dict[str, Any] | None] | None = None


def node_facts() -> dict[str, Any]:
    """Static facts (cached) plus the live ones: free memory, load, battery, thermal."""
    facts = dict(_static_facts())
    memory = psutil.virtual_memory()
    facts["memory_available_gb"] = round(memory.available / 2**30, 1)
    facts["load1"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    facts["battery"] = battery()
    facts["thermal"] = thermal()
    return facts


@cache
def _static_facts() -> dict[str, Any]:
    device, backend = mlx_device()
    return {
        "hostname": socket.gethostname(),
        "platform": sys.platform,
        "os": platform.platform(terse=True),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "mlx": mlx_version(),
        "mlx_device": device,
        "mlx_backend": backend,
        "blas": blas.describe(),
        "cores": os.cpu_count() or 1,
        "physical_cores": psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


def mlx_version() -> str | None:
    try:
        return importlib.metadata.version("mlx")
    except importlib.metadata.PackageNotFoundError:
        return None


def mlx_device() -> tuple[str, str]:
    """("gpu", "Metal"|"CUDA") or ("cpu", "CPU"): asks MLX if the process already loaded it."""
    core = sys.modules.get("mlx.core")
    if core is not None:
        if core.metal.is_available():
            return "gpu", "Metal"
        cuda = getattr(core, "cuda", None)
        if cuda is not None and cuda.is_available():
            return "gpu", "CUDA"
        return "cpu", "CPU"
    if mlx_version() is None:
        return "none", "MLX not installed"
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "gpu", "Metal"
    if blas.mlx_uses_cuda():
        return "gpu", "CUDA"
    return "cpu", "CPU"


def battery() -> dict[str, Any] | None:
    """{percent, plugged} on machines with a battery, else None."""
    sensor = getattr(psutil, "sensors_battery", None)
    try:
        state = sensor() if sensor is not None else None
    except (OSError, RuntimeError):
        return None
    if state is None:
        return None
    return {"percent": round(float(state.percent), 1), "plugged": bool(state.power_plugged)}


def thermal() -> dict[str, Any] | None:
    """Hottest sensor on Linux (psutil); the CPU speed limit on macOS (`pmset -g therm`)."""
    global _thermal_cache
    now = time.monotonic()
    if _thermal_cache is not None and now - _thermal_cache[0] < THERMAL_TTL_S:
        return _thermal_cache[1]
    reading = _pmset_thermal() if sys.platform == "darwin" else _psutil_thermal()
    _thermal_cache = (now, reading)
    return reading


def _psutil_thermal() -> dict[str, Any] | None:
    sensor = getattr(psutil, "sensors_temperatures", None)
    try:
        groups = sensor() if sensor is not None else {}
    except (OSError, RuntimeError):
        return None
    readings = [
        (entry.current, f"{name}/{entry.label or name}")
        for name, entries in groups.items()
        for entry in entries
        if entry.current
    ]
    if not readings:
        return None
    celsius, source = max(readings)
    return {"max_celsius": round(float(celsius), 1), "sensor": source}


def _pmset_thermal() -> dict[str, Any] | None:
    try:
        out = subprocess.run(["pmset", "-g", "therm"], capture_output=True, text=True, timeout=2).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"CPU_Speed_Limit\s*=\s*(\d+)", out)
    if match is None:
        return {"throttled": False} if "No thermal warning" in out else None
    limit = int(match.group(1))
    return {"cpu_speed_limit_pct": limit, "throttled": limit < 100}


def interfaces() -> list[dict[str, Any]]:
    """IPv4 interfaces that are up: name, address, broadcast (None on loopback), loopback."""
    stats = psutil.net_if_stats()
    result: list[dict[str, Any]] = []
    for name, addresses in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for addr in addresses:
            if addr.family != socket.AF_INET:
                continue
            loopback = ipaddress.ip_address(addr.address).is_loopback
            result.append(
                {
                    "name": name,
                    "address": addr.address,
                    "netmask": addr.netmask,
                    "broadcast": None if loopback else _broadcast(addr.address, addr.netmask, addr.broadcast),
                    "loopback": loopback,
                }
            )
    return result


def _broadcast(address: str, netmask: str | None, reported: str | None) -> str | None:
    if reported:
        return reported
    if not netmask:
        return None
    network = ipaddress.ip_network(f"{address}/{netmask}", strict=False)
    return str(network.broadcast_address) if network.prefixlen < 31 else None


def oom_kills() -> int | None:
    """How many processes the kernel's out-of-memory killer has killed since boot (/proc/vmstat
    ``oom_kill``, cgroup limits' kills included); None where the kernel does not say.

    A worker that died by SIGKILL while this count rose was, almost surely, killed for memory: the
    agent says so instead of a bare "signal 9"."""
    try:
        with open("/proc/vmstat", encoding="ascii") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None

