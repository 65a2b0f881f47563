"""README is the contract: every ```python snippet in it runs as written (plainly, world size 1),
and the training-script example also on a real `meshtrain run --local 2` mesh."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 2


@pytest.mark.timeout(180)
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_a_readme_snippet_runs_as_written(index: int, tmp_path: Path) -> None:
    script = tmp_path / f"snippet{index}.py"
    script.write_text(SNIPPETS[index])
    env = {**os.environ, "MESHTRAIN_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170
    )
    assert out.returncode == 0, f"README snippet {index}:\n{SNIPPETS[index]}\n{out.stderr[-2000:]}"


def run_on_a_local_mesh(snippet: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`meshtrain run --local 2` of a README snippet, as a user's own script (not one of examples/)."""
    script = tmp_path / "train.py"
    script.write_text(snippet)
    env = {**os.environ, "MESHTRAIN_HOME": str(tmp_path / "home")}
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", "run", "--local", "2", str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )


@pytest.mark.timeout(180)
def test_the_training_script_of_the_readme_trains_on_a_local_mesh(tmp_path: Path) -> None:
    snippet = next(s for s in SNIPPETS if "mesh.register(model, optimizer)" in s)  # the guide's first
    out = run_on_a_local_mesh(snippet, tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    accuracy = float(re.findall(r"test accuracy ([\d.]+)%", out.stdout)[-1])
    assert accuracy > 80.0, out.stdout[-2000:]
    assert list((tmp_path / "home" / "outputs").rglob("model.safetensors")), "the saved model was not kept"


@pytest.mark.timeout(180)
def test_the_local_sgd_script_of_the_readme_overlaps_its_syncs_on_a_local_mesh(tmp_path: Path) -> None:
    out = run_on_a_local_mesh(next(s for s in SNIPPETS if "OuterOptimizer(model, mesh" in s), tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    pattern = r"int8 deltas .* overlapped with the next 1 steps; (\d+) syncs, (\d+) in the background"
    found = re.search(pattern, out.stdout)
    assert found is not None, out.stdout[-2000:]
    assert int(found[2]) >= 1 and int(found[1]) > int(found[2]), out.stdout[-2000:]
