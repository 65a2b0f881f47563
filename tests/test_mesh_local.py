"""`meshtrain run --local N SCRIPT`: an embedded mesh of N real local agents, just for the run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ACCURACY = re.compile(r"final test accuracy: ([\d.]+)%")


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHTRAIN_HOME": str(home)}
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_mnist_on_a_local_mesh_of_two_matches_one_node(tmp_path: Path) -> None:
    """Same global batch, same epochs: the 2-node mesh learns what one node learns."""
    common = ["--epochs", "1", "--train-limit", "6000"]
    mesh = run(tmp_path, "-m", "meshtrain", "run", "--local", "2", "examples/mnist.py", *common)
    assert mesh.returncode == 0, mesh.stdout[-2000:] + mesh.stderr[-2000:]
    assert "[node1] mlp on" in mesh.stdout and "world size 2" in mesh.stdout
    alone = run(tmp_path, "examples/mnist.py", *common)
    assert alone.returncode == 0, alone.stderr[-2000:]
    acc_mesh = float(ACCURACY.findall(mesh.stdout)[-1])
    acc_alone = float(ACCURACY.findall(alone.stdout)[-1])
    assert acc_alone > 80.0
    # a small set: MLX on CPU alone varies ~1 pt from run to run here; on the full set they agree to ±0.3 pt
    assert abs(acc_mesh - acc_alone) <= 2.0, (acc_mesh, acc_alone)
    assert re.search(r"job j\w+ done in .*: test accuracy [\d.]+%", mesh.stdout)


def test_a_crash_in_a_local_mesh_ends_the_run_with_its_traceback_once(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text(
        "import numpy as np\nimport meshtrain\nmesh = meshtrain.init()\n"
        "mesh.allreduce(np.ones(4, dtype=np.float32))\n"
        "if mesh.rank == 2:\n    {}['missing']\n"
        "mesh.allreduce(np.ones(4, dtype=np.float32))\n"
    )
    out = run(tmp_path, "-m", "meshtrain", "run", "--local", "3", str(script))
    assert out.returncode == 1
    assert out.stderr.count("Traceback") == 1 and "KeyError: 'missing'" in out.stderr
    assert (
        out.stderr.strip().splitlines()[-1]
        == "meshtrain: job failed: node3 (rank 2) failed: KeyError: 'missing'"
    )
