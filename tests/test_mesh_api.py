"""README's script API beyond the loop: the global step, resume, the output directory, spread
evaluation -- run plainly (world size 1) and on a real `--local 2` mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import meshtrain

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import meshtrain
    mesh = meshtrain.init()
    seen = []
    for epoch in range(2):
        for idx in mesh.batches(50, 10, epoch=epoch):
            mesh.allreduce(np.zeros(3, np.float32))
    sums = mesh.evaluate(103, lambda idx: {"count": len(idx), "total": float(idx.sum())})
    (mesh.output_dir / f"out-{mesh.rank}.json").write_text(json.dumps(
        {"step": mesh.step, "sums": sums, "resumed_from": mesh.resumed_from, "size": mesh.size}))
    print("wrote", mesh.output_dir, flush=True)
    mesh.close()
    """
)


def test_world_size_one_counts_steps_and_evaluates_everything() -> None:
    mesh = meshtrain.Mesh()
    for epoch in range(2):
        for _ in mesh.batches(50, 10, epoch=epoch):
            pass
    assert mesh.step == 10 and mesh.resumed_from is None and mesh.output_dir == Path.cwd()
    sums = mesh.evaluate(7, lambda idx: {"n": len(idx), "s": idx.sum()})
    assert sums == {"n": 7.0, "s": 21.0}


def test_on_a_mesh_the_step_is_global_evaluation_is_spread_and_outputs_are_kept(tmp_path: Path) -> None:
    script = tmp_path / "api.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "MESHTRAIN_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, "-m", "meshtrain", "run", "--local", "2", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "home").rglob("out-*.json")]
    assert len(results) == 2, list((tmp_path / "home").rglob("*"))
    for r in results:
        assert r["size"] == 2 and r["step"] == 10 and r["resumed_from"] is None
        assert r["sums"] == {"count": 103.0, "total": float(np.arange(103).sum())}


def test_a_file_written_with_a_relative_path_is_kept_and_named(tmp_path: Path) -> None:
    script = tmp_path / "writes.py"
    script.write_text('import meshtrain\nmesh = meshtrain.init()\nopen("model.txt", "w").write("weights")\n')
    env = {**os.environ, "MESHTRAIN_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, "-m", "meshtrain", "run", "--local", "1", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    kept = list((tmp_path / "home" / "outputs").rglob("model.txt"))
    assert len(kept) == 1 and kept[0].read_text() == "weights"
    assert f"kept in {kept[0].parent}" in out.stdout + out.stderr
    assert not (tmp_path / "model.txt").exists()  # never silently next to the script either
