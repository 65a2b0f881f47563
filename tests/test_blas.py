"""Fast BLAS for MLX on Linux CPU: detection, the child environment, and the real re-exec."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meshtrain import blas

reference_mlx = pytest.mark.skipif(
    not blas.mlx_links_reference_blas(), reason="needs the Linux mlx[cpu] build with its reference BLAS"
)
has_openblas = pytest.mark.skipif(blas.find_openblas() is None, reason=f"no OpenBLAS: {blas.INSTALL_HINT}")

PROBE = textwrap.dedent(
    """
    import os, sys
    print("pid", os.getpid(), flush=True)
    from meshtrain import blas
    blas.ensure_fast_blas()
    import mlx.core as mx
    mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))
    print("describe", blas.describe())
    print("loaded", blas.fast_blas_loaded())
    """
)


def run_probe(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MESHTRAIN_BLAS") and k != "LD_PRELOAD"}
    return subprocess.run(
        [sys.executable, str(script)], env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


@reference_mlx
def test_mlx_library_is_seen_to_link_the_bundled_blas() -> None:
    assert any(name.startswith("libblas") for name in blas.mlx_links())
    assert not blas.mlx_uses_cuda()


def test_elf_reader_rejects_non_elf(tmp_path: Path) -> None:
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an elf file at all" * 4)
    assert blas.elf_needed(junk) == []
    assert blas.elf_needed(tmp_path / "missing.so") == []


def test_numpys_private_openblas_does_not_count() -> None:
    assert not blas._is_fast("/venv/lib/python3.11/site-packages/numpy.libs/libscipy_openblas64_-32a4.so")
    assert blas._is_fast("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
    if "LD_PRELOAD" not in os.environ:
        import numpy  # noqa: F401  (maps numpy's own OpenBLAS into this process)

        assert blas.fast_blas_loaded() is None


@reference_mlx
@has_openblas
def test_child_env_preloads_openblas_once_and_keeps_other_preloads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(blas.CHOICE_ENV, raising=False)
    base = {"PATH": "/usr/bin", "LD_PRELOAD": "/opt/other.so"}
    env = blas.child_env(base)
    openblas = blas.find_openblas()
    assert env["LD_PRELOAD"].split() == [openblas, "/opt/other.so"]
    assert blas.child_env(env) == env, "not idempotent"
    assert base["LD_PRELOAD"] == "/opt/other.so", "input mutated"
    user_choice = {"LD_PRELOAD": "/usr/lib/libopenblas.so.0"}
    assert blas.child_env(user_choice) == user_choice


@reference_mlx
def test_reference_choice_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(blas.CHOICE_ENV, "reference")
    assert blas.child_env({"A": "1"}) == {"A": "1"}
    assert not blas.needs_preload()
    assert blas.find_openblas() is None
    assert "MESHTRAIN_BLAS=reference" in blas.describe()


@reference_mlx
@has_openblas
def test_plain_script_is_re_executed_with_openblas(tmp_path: Path) -> None:
    result = run_probe(tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    pids = [line for line in lines if line.startswith("pid")]
    assert len(pids) == 2 and pids[0] == pids[1], "expected exactly one exec, same process"
    assert "describe OpenBLAS (preloaded from" in result.stdout
    assert "openblas" in lines[-1].lower()
    assert result.stderr == ""


@reference_mlx
@has_openblas
def test_script_from_stdin_is_not_re_executed(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MESHTRAIN_BLAS") and k != "LD_PRELOAD"}
    result = subprocess.run(
        [sys.executable, "-"], input=PROBE, env=clean, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("pid") == 1
    assert "describe OpenBLAS (preloaded into training processes" in result.stdout


@reference_mlx
def test_missing_openblas_warns_once_and_does_not_loop(tmp_path: Path) -> None:
    result = run_probe(tmp_path, MESHTRAIN_BLAS=str(tmp_path / "no-such-libblas.so"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("pid") == 1, "must not re-exec without a library"
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1 and blas.INSTALL_HINT in warnings[0]
    assert "describe reference BLAS (slow)" in result.stdout


def test_describe_is_one_line() -> None:
    line = blas.describe()
    assert line and "\n" not in line
