"""Model versions: `meshtrain tag RUN@STEP NAME`, tagged checkpoints never pruned, `export NAME`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from meshtrain.checkpoints.store import CheckpointStore
from meshtrain.tracking.store import Run, RunStore


def mt(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHTRAIN_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A machine with checkpoints 10..40 of run `exp` (its record says so) and a --local node's copy."""
    for root in (tmp_path / "checkpoints", tmp_path / "nodes" / "node2" / "checkpoints"):
        store = CheckpointStore(root)
        for step in (10, 20, 30, 40):
            store.save("exp", step, {"w": mx.full((4,), float(step))})
    runs = RunStore(tmp_path / "runs.sqlite")
    runs.put_run(
        Run(id="jabc123", name="exp", state="done", options={"run": "exp", "checkpoint_every": "10"})
    )
    return tmp_path


def test_a_tagged_checkpoint_is_never_pruned(home: Path) -> None:
    out = mt(home, "tag", "jabc123@20", "best")
    assert out.returncode == 0, out.stderr
    assert "exp@20" in out.stdout and "2 stores here" in out.stdout
    for root in (home / "checkpoints", home / "nodes" / "node2" / "checkpoints"):
        store = CheckpointStore(root)
        assert store.prune("exp", 1) == [10, 30]  # keep 1 untagged (40) and the tagged one (20)
        assert [i.step for i in store.checkpoints("exp")] == [20, 40]
    assert "best" in mt(home, "tag").stdout
    shown = mt(home, "runs", "show", "jabc123")
    assert "best (exp@20)" in shown.stdout


def test_export_takes_a_tag(home: Path, tmp_path: Path) -> None:
    assert mt(home, "tag", "exp@30", "v1").returncode == 0  # the checkpoint run's own name works too
    target = tmp_path / "model"
    out = mt(home, "export", "v1", str(target))
    assert out.returncode == 0, out.stderr
    assert "step 30" in out.stdout
    params = mx.load(str(target) + ".safetensors")
    assert float(params["w"][0]) == 30.0


def test_untag_makes_it_prunable_again(home: Path) -> None:
    assert mt(home, "tag", "exp@10", "old").returncode == 0
    assert mt(home, "tag", "--rm", "old").returncode == 0
    assert CheckpointStore(home / "checkpoints").prune("exp", 1) == [10, 20, 30]


def test_bad_tags_are_one_line(home: Path) -> None:
    for args in (
        ("tag", "exp@99", "x"),  # no such step
        ("tag", "nope@10", "x"),  # no such run
        ("tag", "exp@ten", "x"),
        ("tag", "exp@10", "1bad"),
        ("tag", "exp@10"),
        ("tag", "--rm", "never"),
        ("export", "never-a-tag", "/tmp/x"),
    ):
        out = mt(home, *args)
        one_line = out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
        assert out.returncode == 2 and one_line, (args, out.stderr)
