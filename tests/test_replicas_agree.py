"""Replicas that must be equal are equal, for any script (issue 16, defects 1 and 20).

- A script that never seeds MLX starts every worker from a different model; `mesh.register`
  makes them bit-identical before the first step, and the first step reduction refuses to go
  on if the script changed one replica after `register`.
- A transformer-like model (a list of blocks, each with a parameter-free `nn.Dropout`) survives
  a worker replaced mid-training and a `--resume`: state transfer and checkpoints put the state
  back leaf by leaf into the receiver's own trees, so empty subtrees the optimizer needs stay.

Real `meshtrain run --local N` meshes: agents, workers and rings on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "elastic_train.py"


def run(home: Path, *args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHTRAIN_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", "run", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def results(out: Path, prefix: str) -> dict[str, dict[str, float | str]]:
    return {p.stem.removeprefix(prefix): json.loads(p.read_text()) for p in out.glob(f"{prefix}*.json")}


@pytest.mark.timeout(160)
def test_unseeded_replicas_start_and_end_bit_identical(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    job = run(tmp_path, "--local", "2", str(SCRIPT), "--out", str(out), "--no-seed", "--checksum-out")
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
    starts = results(out, "start-")
    assert len(starts) == 2 and len({r["sum"] for r in starts.values()}) == 1, starts
    ends = results(out, "result-")
    assert len(ends) == 2 and len({r["digest"] for r in ends.values()}) == 1, ends


@pytest.mark.timeout(160)
def test_a_replica_changed_after_register_stops_the_job_with_the_reason(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    job = run(tmp_path, "--local", "2", str(SCRIPT), "--out", str(out), "--perturb-main")
    assert job.returncode != 0
    assert "the replicas differ at step 0" in job.stderr, job.stderr[-2000:]
    assert "Traceback" not in job.stderr, job.stderr[-2000:]  # a UserError: its one line says it all
    assert not results(out, "result-")  # nobody trained on


@pytest.mark.timeout(200)
def test_nested_model_survives_a_replaced_worker(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    args = ["--out", str(out), "--nested", "--epochs", "4", "--step-sleep", "0.03"]
    job = run(tmp_path, "--local", "3", str(SCRIPT), *args, "--die", "node2:8:allreduce", timeout=190)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]
    ends = results(out, "result-")
    assert "node2" not in ends and {"node1", "node3"} <= set(ends), ends
    assert len({r["digest"] for r in ends.values()}) == 1, ends


@pytest.mark.timeout(240)
def test_nested_model_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    common = ["--local", "2", "--name", "nested", "--checkpoint-every", "6"]
    first = run(tmp_path, *common, str(SCRIPT), "--out", str(out), "--nested", "--epochs", "2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    again = run(tmp_path, *common, "--resume", str(SCRIPT), "--out", str(out), "--nested", "--epochs", "3")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    ends = results(out, "result-")
    assert len({r["digest"] for r in ends.values()}) == 1, ends
    assert all(int(r["committed"]) == 3 * 12 for r in ends.values()), ends
