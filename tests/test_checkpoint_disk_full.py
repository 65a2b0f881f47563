"""A full checkpoint disk fails that checkpoint round only; the job trains on and exits 0.

`meshtrain run --checkpoint-dir DIR` on a 3 MiB tmpfs: the first checkpoint of
a ~2.3 MiB state fits, the next ones cannot. MLX reports the failed write as
`RuntimeError: [write] Unable to write ...` (not OSError); before the fix that
ended the job with a traceback and a `--resume` hint. Now each failed round is
one warning line naming the path and "no space left", the partial files are
removed, training goes on, and the committed checkpoint stays intact.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshtrain.checkpoints.store import CheckpointStore

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import time
import mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim, numpy as np
import meshtrain

mesh = meshtrain.init()
mx.random.seed(0)
model = nn.Sequential(nn.Linear(64, 3000), nn.ReLU(), nn.Linear(3000, 4))  # ~0.8 MiB of parameters
opt = optim.Adam(learning_rate=1e-3)
mesh.register(model, opt)
rng = np.random.default_rng(0)
x = mx.array(rng.standard_normal((4096, 64)).astype(np.float32))
y = mx.array(rng.integers(0, 4, 4096).astype(np.int32))
loss_and_grad = nn.value_and_grad(model, lambda m, a, b: nn.losses.cross_entropy(m(a), b).mean())
for epoch in range(3):
    for idx in mesh.batches(4096, 64, epoch=epoch):
        loss, grads = loss_and_grad(model, x[mx.array(idx)], y[mx.array(idx)])
        grads = mesh.allreduce(grads, weight=len(idx))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        time.sleep(0.04)  # slow enough for the leader to aim at several checkpoint steps
print("TRAINED", flush=True)
"""


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.timeout(300)
def test_a_full_checkpoint_disk_fails_the_round_and_training_goes_on(
    tmp_path: Path, small_disk: Path
) -> None:
    script = tmp_path / "wide.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "MESHTRAIN_HOME": str(tmp_path / "home")}
    env.pop("MESHTRAIN_CHECKPOINT_DIR", None)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshtrain",
            "run",
            "--checkpoint-every",
            "20",
            "--checkpoint-dir",
            str(small_disk),
        ]
        + [str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    both = out.stdout + out.stderr
    assert out.returncode == 0, both[-3000:]
    assert "TRAINED" in out.stdout and "Traceback" not in both, both[-3000:]
    warnings = [line for line in both.splitlines() if "not written" in line]
    assert warnings, both[-3000:]
    assert all("no space left" in line and str(small_disk) in line for line in warnings), warnings
    store = CheckpointStore(small_disk)
    found = store.checkpoints("wide")
    assert found, list(small_disk.rglob("*"))
    for info in found:
        store.verify(info)  # every committed checkpoint intact (sizes and sha256)
    committed = {info.step for info in found}
    leftovers = [
        p.name for p in (small_disk / "wide").iterdir() if p.is_dir() and int(p.name) not in committed
    ]
    assert leftovers == [], leftovers  # the failed rounds' partial parts were removed


def test_the_resume_hint_needs_a_committed_checkpoint_here(tmp_path: Path) -> None:
    import mlx.core as mx

    from meshtrain.cli.run import _has_checkpoint

    assert not _has_checkpoint("wide", str(tmp_path))  # nothing committed: no --resume hint
    CheckpointStore(tmp_path / "nodes" / "node2").save("wide", 4, {"w": mx.zeros(3)})
    assert _has_checkpoint("wide", str(tmp_path))  # a --local node's store counts too
    CheckpointStore(tmp_path).write_part("other", 2, {"w": mx.zeros(3)})  # written, never committed
    assert not _has_checkpoint("other", str(tmp_path))


@pytest.mark.timeout(120)
def test_checkpoint_dir_is_refused_in_one_line_against_a_running_agent(tmp_path: Path) -> None:
    from meshtrain.testing.agents import AgentProcess

    agent = AgentProcess(tmp_path / "home", "solo-ckdir")
    try:
        script = tmp_path / "s.py"
        script.write_text("print('never runs')\n")
        env = {**os.environ, "MESHTRAIN_HOME": str(tmp_path / "home")}
        out = subprocess.run(
            [sys.executable, "-m", "meshtrain", "run", "--checkpoint-dir", str(tmp_path / "ck"), str(script)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        agent.stop()
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "--checkpoint-dir" in lines[0], out.stderr
    assert "MESHTRAIN_HOME" in lines[0] and "never runs" not in out.stdout
