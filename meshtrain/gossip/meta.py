"""What a node tells the mesh about itself, gathered from the machine (kept well under META_MAX_BYTES).

The agent passes this as `GossipNode(meta=...)` and keeps it current with
`node.update_meta(job=..., role=..., speed=..., battery=...)`; every change is
gossiped like any update, so the leader and the UI see the whole mesh's hardware.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import psutil


def battery() -> dict[str, Any] | None:
    """Charge and whether plugged in; None on machines without a battery (desktops, servers)."""
    try:
        b = psutil.sensors_battery()
    except Exception:  # not implemented on some platforms
        return None
    if b is None:
        return None
    return {"percent": round(float(b.percent)), "plugged": bool(b.power_plugged)}


def local_meta(
    *,
    control_port: int | None = None,
    ring_port: int | None = None,
    device: str | None = None,
    speed: float | None = None,
) -> dict[str, Any]:
    """Platform, cores, memory, battery and the ports other services listen on.

    `device` is the MLX device ("gpu", "cpu", "cuda") when the caller knows it; importing
    MLX here would cost the gossip daemon a second of start-up for one string.
    """
    meta: dict[str, Any] = {
        "platform": f"{platform.system().lower()}-{platform.machine().lower()}",
        "cores": os.cpu_count() or 1,
        "mem_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "device": device,
        "speed": speed,
        "battery": battery(),
        "job": None,
        "role": "idle",
    }
    if control_port is not None:
        meta["control"] = control_port
    if ring_port is not None:
        meta["ring"] = ring_port
    return meta
