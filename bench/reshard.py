"""Re-sharding after a lost node, measured: how long a sharded job is stopped by its roll-back.

Each run is a real `meshtrain run --local N --checkpoint-every K` job of
tests/scripts/sharded_resume.py (a small MLP, AdamW, float32 wire) at stage 2 or 3, with one
worker SIGKILLed 2 ms into step S's forward (MESHTRAIN_FAULT). The survivors raise ShardLost, the
coordinator ends them and starts the job again from the newest complete checkpoint on the nodes
there are: the new plan re-cuts the shards and every member reads its new part. Rank 0 logs the
time of every step; the table gives

- stopped: from the last step before the kill to the first step of the new attempt (detection,
  teardown, new worker processes, MLX import, the checkpoint's parts read and re-sliced),
- of which restart: from the new worker's `meshtrain.init()` to its first step (the checkpoint read,
  the plan, the re-sliced state),
- steps redone: the steps after the checkpoint, trained again.

    python bench/reshard.py --stages 2,3 --n 3 --steps 14 --kill-at 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "sharded_resume.py"


def one(stage: int, args: argparse.Namespace) -> dict[str, float | int | str]:
    home = Path(tempfile.mkdtemp(prefix=f"reshard-s{stage}-"))
    times = home / "times.jsonl"
    cmd = [sys.executable, "-m", "meshtrain", "run", "--local", str(args.n), "--shares", "equal"]
    cmd += ["--name", f"rs{stage}", "--checkpoint-every", str(args.every), "--keep", "5"]
    cmd += [str(SCRIPT), "--out", str(home / "out"), "--stage", str(stage), "--steps", str(args.steps)]
    cmd += ["--sleep", str(args.sleep), "--times", str(times)]
    env = {**os.environ, "MESHTRAIN_HOME": str(home), "MESHTRAIN_FAULT": f"node2:{args.kill_at}:forward"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in times.read_text().splitlines()]
    starts = [i for i, r in enumerate(rows) if r["event"] == "started"]
    if len(starts) < 2:
        raise SystemExit(f"stage {stage}: the job did not roll back (one attempt in {times})")
    if "rolling back to the newest complete checkpoint" not in proc.stdout + proc.stderr:
        raise SystemExit(f"stage {stage}: no roll-back in the job's output")
    first, second = rows[: starts[1]], rows[starts[1] :]
    last_step = [r for r in first if r["event"] == "step"][-1]
    resumed = next(r for r in second if r["event"] == "step")
    started = second[0]
    registered = next(r for r in second if r["event"] == "registered")  # its step: the checkpoint's
    return {
        "stage": stage,
        "stopped_s": resumed["t"] - last_step["t"],
        "restart_s": resumed["t"] - started["t"],
        "from_step": last_step["step"],
        "resumed_at": registered["step"],
        "redone": last_step["step"] - registered["step"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--n", type=int, default=3, help="nodes (node2 is killed)")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--every", type=int, default=2, help="--checkpoint-every")
    ap.add_argument("--kill-at", type=int, default=10, help="the step whose forward node2 dies in")
    ap.add_argument("--sleep", type=float, default=0.3, help="seconds each step waits (checkpoints come due)")
    args = ap.parse_args()
    print(
        f"# re-sharding after a lost node: meshtrain run --local {args.n}, node2 SIGKILLed in step "
        f"{args.kill_at}'s forward, --checkpoint-every {args.every}, {os.cpu_count()} cores",
        flush=True,
    )
    head = f"{'stage':>5} {'stopped s':>10} {'restart s':>10} {'last step':>10} {'resumed at':>11}"
    print(f"{head} {'redone':>7}")
    for stage in [int(s) for s in args.stages.split(",")]:
        r = one(stage, args)
        print(
            f"{r['stage']:>5} {r['stopped_s']:10.2f} {r['restart_s']:10.2f} {r['from_step']:>10} "
            f"{r['resumed_at']:>11} {r['redone']:>7}",
            flush=True,
        )


if __name__ == "__main__":
    main()
