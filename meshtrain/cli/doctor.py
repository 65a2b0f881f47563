"""`meshtrain doctor`: what this machine brings to a mesh, and what to fix.

It first gives itself the fast BLAS exactly as a training process gets it
(meshtrain.blas), then times a small matmul, so the BLAS line and the GFLOP/s
figure are what training on this machine will see, not a guess.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from meshtrain import blas

MATMUL_N = 512


def add_parser(sub: Any) -> None:
    doctor = sub.add_parser("doctor", help="what this machine offers: MLX device, BLAS, cores, interfaces")
    doctor.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from meshtrain import sysinfo

    blas.ensure_fast_blas()  # re-execs `meshtrain doctor` once when that helps
    console = Console()
    facts = sysinfo.node_facts()
    gflops = matmul_gflops()

    table = Table(title="meshtrain doctor", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row(
        "host", f"{facts['hostname']}  ({facts['os']}, {facts['machine']}, Python {facts['python']})"
    )
    mlx = facts["mlx"] or "not installed: pip install meshtrain (pulls mlx)"
    table.add_row("MLX", f"{mlx}  device {facts['mlx_device']} ({facts['mlx_backend']})")
    table.add_row("BLAS", blas.describe())
    if gflops is not None:
        table.add_row("matmul", f"{gflops:.1f} GFLOP/s  ({MATMUL_N}x{MATMUL_N} float32, default device)")
    table.add_row("cores", f"{facts['cores']} logical, {facts['physical_cores']} physical")
    table.add_row("memory", f"{facts['memory_gb']} GiB total, {facts['memory_available_gb']} GiB available")
    table.add_row("battery", _battery_text(facts["battery"]))
    table.add_row("thermal", _thermal_text(facts["thermal"]))
    console.print(table)

    nets = Table(title="interfaces (IPv4, up)", title_justify="left")
    for column in ("name", "address", "broadcast"):
        nets.add_column(column)
    for iface in sysinfo.interfaces():
        broadcast = iface["broadcast"] or ("(loopback)" if iface["loopback"] else "none")
        nets.add_row(iface["name"], iface["address"], broadcast)
    console.print(nets)
    return 0


def matmul_gflops(n: int = MATMUL_N, repeats: int = 5) -> float | None:
    """Median GFLOP/s of an n x n float32 matmul on MLX's default device (None without MLX)."""
    try:
        import mlx.core as mx
    except ImportError:
        return None
    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e9


def _battery_text(battery: dict[str, Any] | None) -> str:
    if battery is None:
        return "none (mains powered)"
    source = "plugged in" if battery["plugged"] else "on battery"
    return f"{battery['percent']}%, {source}"


def _thermal_text(thermal: dict[str, Any] | None) -> str:
    if thermal is None:
        return "not exposed by this OS"
    if "max_celsius" in thermal:
        return f"{thermal['max_celsius']} °C hottest ({thermal['sensor']})"
    if "cpu_speed_limit_pct" in thermal:
        return f"CPU speed limit {thermal['cpu_speed_limit_pct']}%"
    return "throttled" if thermal.get("throttled") else "no thermal warning"
