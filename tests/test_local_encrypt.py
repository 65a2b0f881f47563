"""`meshtrain run --local N --encrypt`: the run's own mesh seals its ring traffic; an agent's mesh is
encrypted from its creation, so asking for it on `run` there is one line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import meshtrain
    mesh = meshtrain.init()
    out = mesh.allreduce(np.full(8, float(mesh.rank + 1), np.float32))
    print(f"rank {mesh.rank} authenticated {mesh.ring_authenticated} encrypted {mesh.ring_encrypted} "
          f"mean {out[0]}", flush=True)
    mesh.close()
    """
)


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "enc.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "MESHTRAIN_HOME": str(tmp_path / "home")}
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", "run", *args, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_a_local_mesh_with_encrypt_seals_the_ring(tmp_path: Path) -> None:
    out = run(tmp_path, "--local", "2", "--encrypt")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.count("authenticated True encrypted True mean 1.5") == 2, out.stdout
    plain = run(tmp_path, "--local", "2")
    assert plain.returncode == 0 and plain.stdout.count("encrypted False mean 1.5") == 2, plain.stdout
