"""A sharded job that loses a shard holder rolls back to its newest checkpoint and goes on (R=1).

Real processes: `meshtrain run --local 3` trains tests/scripts/sharded_resume.py at stage 3 (the
parameters sharded too: the survivors' next gather, in the forward, is where they notice) with
checkpoints every 2 steps; node2's worker is SIGKILLed in step 10's forward. Every worker then raises
`ShardLost`, the coordinator ends them all and starts the job again on the nodes there are, from the
newest complete checkpoint (agent/jobs.py `_roll_back`). The job must end where one uninterrupted
unsharded run of the same global batches ends (float tolerance), every replica identical, and say
in its events that it rolled back. Without checkpoints the loss stays one clear line
(tests/test_shard_local.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "tests/scripts/sharded_resume.py"


def train(
    home: Path,
    n: int,
    out: Path,
    *script_args: str,
    opts: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "meshtrain", "run", "--local", str(n), "--shares", "equal", *opts, SCRIPT]
    cmd += ["--out", str(out), *script_args]
    full_env = {**os.environ, "MESHTRAIN_HOME": str(home), **(env or {})}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def final(out: Path, rank: int) -> tuple[dict[str, np.ndarray], dict]:
    z = np.load(out / f"result-{rank}.npz")
    return {k: z[k] for k in z.files if k != "meta"}, json.loads(str(z["meta"]))


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.timeout(600)
def test_losing_a_shard_holder_rolls_back_to_the_newest_checkpoint_and_finishes(tmp_path: Path) -> None:
    opts = ("--name", "rb", "--checkpoint-every", "2", "--keep", "5")
    proc = train(
        tmp_path,
        3,
        tmp_path / "a",
        "--stage",
        "3",
        "--steps",
        "14",
        "--sleep",
        "0.3",
        opts=opts,
        env={"MESHTRAIN_FAULT": "node2:10:forward"},  # SIGKILL node2's worker in step 10's forward
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shown = proc.stdout + proc.stderr
    assert "rolling back to the newest complete checkpoint of rb" in shown, shown[-3000:]
    results = [final(tmp_path / "a", rank) for rank in range(3)]
    params, meta = results[0]
    assert meta["step"] == 14 and meta["size"] == 3, meta
    assert meta["resumed_from"] in (2, 4, 6, 8), meta  # the second attempt began at a checkpoint
    for other, _ in results[1:]:
        assert max_diff(other, params) == 0.0, "the gathered parameters differ"

    # the same job uninterrupted: the same global batches, the same reduction order
    same = train(tmp_path, 3, tmp_path / "same", "--stage", "3", "--steps", "14")
    assert same.returncode == 0, same.stderr[-3000:]
    reference, _ = final(tmp_path / "same", 0)
    scale = max(float(np.abs(v).max()) for v in reference.values())
    print(f"rolled back vs uninterrupted: {max_diff(params, reference):.3g} (largest parameter {scale:.3g})")
    assert max_diff(params, reference) <= 1e-6 * scale
