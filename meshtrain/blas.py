"""Give MLX on a Linux CPU an optimized BLAS, without the user knowing.

The `mlx[cpu]` wheel for Linux links the reference netlib BLAS it bundles
(`mlx_cpu.libs/libblas-<hash>.so`): a 1024x1024 matmul runs at ~5 GFLOP/s
instead of ~170 with OpenBLAS. Symbols of a library named in `LD_PRELOAD`
win over the bundled ones, so a training process started with OpenBLAS
preloaded gets the fast kernels. The dynamic loader reads `LD_PRELOAD` only
at process start, hence `child_env` for processes meshtrain starts and
`ensure_fast_blas` (re-exec) for a script started plainly.

Set `MESHTRAIN_BLAS=reference` to keep the bundled BLAS (for comparisons), or
`MESHTRAIN_BLAS=/path/to/libblas.so` to preload a library of your choice.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import platform
import struct
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path

CHOICE_ENV = "MESHTRAIN_BLAS"
REEXEC_MARKER = "MESHTRAIN_BLAS_REEXEC"
WARNED_MARKER = "MESHTRAIN_BLAS_WARNED"
INSTALL_HINT = "apt-get install libopenblas0-pthread"

# Names in a mapped or preloaded path that mean an optimized BLAS is in the process.
FAST_BLAS_MARKERS = ("openblas", "libmkl", "libblis")
# numpy's own OpenBLAS has renamed (ILP64, suffixed) symbols: it never serves MLX.
NOT_FOR_MLX = ("scipy_openblas", "numpy.libs", "numpy/.libs")


def _multiarch() -> str:
    machine = platform.machine()
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(machine, f"{machine}-linux-gnu")


def openblas_candidates() -> list[Path]:
    """Known OpenBLAS locations, best first.

    Verified: Debian 12 `libopenblas0-pthread` (both paths below, x86_64). The
    openmp flavour has the same layout; `libopenblas.so.0` found through the
    loader cache covers other distributions that register it there.
    """
    arch = _multiarch()
    paths = [
        Path(f"/usr/lib/{arch}/openblas-pthread/libblas.so.3"),
        Path(f"/usr/lib/{arch}/openblas-openmp/libblas.so.3"),
    ]
    found = ctypes.util.find_library("openblas")
    if found:
        for libdir in (f"/usr/lib/{arch}", f"/lib/{arch}", "/usr/lib64", "/usr/lib"):
            paths.append(Path(libdir) / found)
    return paths


def find_openblas() -> str | None:
    """Path of an OpenBLAS to preload, or None (also None when the user chose `reference`)."""
    choice = os.environ.get(CHOICE_ENV, "")
    if choice == "reference":
        return None
    if choice:
        return choice if Path(choice).is_file() else None
    for path in openblas_candidates():
        if path.is_file():
            return str(path)
    return None


# ---------------------------------------------------------------- what MLX links


def _mlx_library() -> Path | None:
    """libmlx.so of the installed MLX, found without importing MLX (cheap, before a re-exec)."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "lib" / "libmlx.so"
        if candidate.is_file():
            return candidate
    return None


def elf_needed(path: Path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared object ([] if unreadable)."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    needed: list[str] = []
    for _name, sh_type, _flags, _addr, offset, size, link, _info, _align, _entsize in sections:
        if sh_type != 6:  # SHT_DYNAMIC
            continue
        strtab_offset = sections[link][4]
        for pos in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                start = strtab_offset + value
                needed.append(data[start : data.index(b"\0", start)].decode())
    return needed


@cache
def mlx_links() -> tuple[str, ...]:
    lib = _mlx_library()
    return tuple(elf_needed(lib)) if lib is not None else ()


def mlx_uses_cuda() -> bool:
    return any(name.startswith(("libcuda", "libcublas", "libcudart")) for name in mlx_links())


def mlx_links_reference_blas() -> bool:
    """True when MLX is the Linux CPU build that links the bundled netlib BLAS."""
    if sys.platform != "linux" or mlx_uses_cuda():
        return False
    return any(name.startswith("libblas") and not _is_fast(name) for name in mlx_links())


def _is_fast(path: str) -> bool:
    lowered = path.lower()
    if any(marker in lowered for marker in NOT_FOR_MLX):
        return False
    return any(marker in lowered for marker in FAST_BLAS_MARKERS)


def fast_blas_loaded() -> str | None:
    """Path of an optimized BLAS mapped into this process (from /proc/self/maps), if any."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and _is_fast(fields[5]):
            return fields[5]
    return None


def _preloaded(env: Mapping[str, str]) -> list[str]:
    return [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]


# ---------------------------------------------------------------- public


def needs_preload() -> bool:
    """True when this process runs MLX's reference BLAS and has no optimized one mapped."""
    if os.environ.get(CHOICE_ENV) == "reference":
        return False
    return mlx_links_reference_blas() and fast_blas_loaded() is None


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a subprocess that runs MLX, with OpenBLAS preloaded where that helps.

    Idempotent: a library already preloaded (by us or the user) is not added again.
    """
    result = dict(env)
    if result.get(CHOICE_ENV) == "reference" or not mlx_links_reference_blas():
        return result
    preloaded = _preloaded(result)
    if any(_is_fast(p) for p in preloaded):
        return result
    openblas = find_openblas()
    if openblas is None or openblas in preloaded:
        return result
    result["LD_PRELOAD"] = " ".join([openblas, *preloaded])
    return result


def ensure_fast_blas() -> None:
    """Re-exec this process with OpenBLAS preloaded when MLX would use the reference BLAS.

    Safe to call anywhere early (meshtrain.init() does): it does nothing when
    BLAS is already fast, off Linux, inside a REPL or a pytest run (a re-exec
    would lose state), or after one re-exec (the marker stops loops). When no
    OpenBLAS exists it prints one warning line, once per process tree.
    """
    if not needs_preload():
        os.environ.pop(REEXEC_MARKER, None)  # done its job; children start clean
        return
    openblas = find_openblas()
    if openblas is None or os.environ.get(REEXEC_MARKER):
        _warn_once()
        return
    if not _can_reexec():
        return
    env = child_env(os.environ)
    env[REEXEC_MARKER] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _can_reexec() -> bool:
    """False where running the command line again would not resume this program."""
    interactive = hasattr(sys, "ps1") or bool(sys.flags.interactive)
    from_stdin = bool(sys.argv) and sys.argv[0] in ("", "-")  # the script was read and is gone
    return bool(sys.orig_argv) and not interactive and not from_stdin and "_pytest" not in sys.modules


def _warn_once() -> None:
    if os.environ.get(WARNED_MARKER):
        return
    os.environ[WARNED_MARKER] = "1"  # inherited: child processes stay quiet
    message = f"meshtrain: MLX uses the slow reference BLAS; for ~30x faster training: {INSTALL_HINT}"
    print(message, file=sys.stderr)


def describe() -> str:
    """One line: the BLAS MLX uses in this process (for doctor and the live view)."""
    if sys.platform == "darwin":
        return "Accelerate"
    if mlx_uses_cuda():
        return "cuBLAS (CUDA)"
    loaded = fast_blas_loaded()
    if loaded is not None:
        named = [p for p in _preloaded(os.environ) if _is_fast(p)]
        source = named[0] if named else loaded
        name = "OpenBLAS" if "openblas" in loaded.lower() else Path(loaded).name
        return f"{name} (preloaded from {source})"
    if not mlx_links_reference_blas():
        links = [n for n in mlx_links() if "blas" in n]
        return f"system BLAS ({', '.join(links) or 'linked into MLX'})"
    if os.environ.get(CHOICE_ENV) == "reference":
        return "reference BLAS (slow; chosen with MESHTRAIN_BLAS=reference)"
    openblas = find_openblas()
    if openblas is not None:  # this process (an agent, a REPL) is not training; its workers get it
        return f"OpenBLAS (preloaded into training processes from {openblas})"
    return f"reference BLAS (slow): {INSTALL_HINT}"


def slow_warning() -> str | None:
    """The line `doctor` gives when MLX would train on its slow reference BLAS here (else None).

    `join` and `run` say it too, before training starts: a machine without
    OpenBLAS trains ~30x slower, which no throughput figure explains by itself.
    Not said when the user chose the reference BLAS (MESHTRAIN_BLAS=reference).
    """
    if os.environ.get(CHOICE_ENV) == "reference" or not mlx_links_reference_blas():
        return None
    if find_openblas() is not None:
        return None
    return f"meshtrain: MLX uses the slow reference BLAS; for ~30x faster training: {INSTALL_HINT}"
