"""Re-sharding after a lost node, measured: how long a sharded job is stopped by its roll-back.

Each run is a real `meshtrain run --local N --checkpoint-every K` job of
tests/scripts/sharded_resume.py (an MLP, AdamW, float32 wire) at stage 1, 2 or 3, with one
worker SIGKILLed 2 ms into step S's forward (MESHTRAIN_FAULT). The survivors raise ShardLost, the
coordinator ends them and starts the job again from the newest complete checkpoint on the nodes
there are: the new plan re-cuts the shards and every member reads its new part. Rank 0 logs the
time of every step; the table gives

- stopped: from the last step before the kill to the first step of the new attempt (detection,
  teardown, new worker processes, MLX import, the checkpoint's parts read and re-sliced),
- of which restart: from the new worker's `meshtrain.init()` to its first step (the checkpoint read,
  the plan, the re-sliced state),
- steps redone: the steps after the checkpoint, trained again.

Mode "1r" is stage 1 with --shard-replicas 2: no roll-back; the survivors redo the step's
all-reduce, re-plan the shards and move the lost node's from its copies (meshtrain.shard.replicas),
and "stopped" is from the last step before the kill to the interrupted step done again.

    python bench/reshard.py --stages 1r,1,2,3 --n 3 --steps 14 --kill-at 10 [--hidden 1024]
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


def one(mode: str, args: argparse.Namespace) -> dict[str, float | int | str]:
    """One job: `mode` "2", "3" or "1" (a roll-back) or "1r" (stage 1, --shard-replicas 2: a take-over)."""
    takeover = mode.endswith("r")
    stage = int(mode.rstrip("r"))
    home = Path(tempfile.mkdtemp(prefix=f"reshard-s{mode}-"))
    times = home / "times.jsonl"
    cmd = [sys.executable, "-m", "meshtrain", "run", "--local", str(args.n), "--shares", "equal"]
    cmd += ["--name", f"rs{mode}", "--checkpoint-every", str(args.every), "--keep", "5"]
    cmd += ["--shard-replicas", "2" if takeover else "1"]
    cmd += [str(SCRIPT), "--out", str(home / "out"), "--stage", str(stage), "--steps", str(args.steps)]
    cmd += ["--sleep", str(args.sleep), "--times", str(times), "--hidden", str(args.hidden)]
    cmd += ["--no-step-params", "--forward-sleep", "0.02"]  # the kill lands in the forward
    env = {**os.environ, "MESHTRAIN_HOME": str(home), "MESHTRAIN_FAULT": f"node2:{args.kill_at}:forward"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"stage {mode} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-2000:]}")
    log = proc.stdout + proc.stderr
    rows = [json.loads(line) for line in times.read_text().splitlines()]
    starts = [i for i, r in enumerate(rows) if r["event"] == "started"]
    steps = [r for r in rows if r["event"] == "step"]
    pairs = zip(steps, steps[1:], strict=False)
    gaps = sorted(b["t"] - a["t"] for a, b in pairs if b["step"] == a["step"] + 1)
    step_s = gaps[len(gaps) // 2] if gaps else float("nan")
    if takeover:
        if "rolling back" in log or "re-planned over" not in log:
            raise SystemExit(f"stage {mode}: no take-over (or a roll-back) in the job's output")
        last_step = next(r for r in steps if r["step"] == args.kill_at)  # the last before the kill
        resumed = next(r for r in steps if r["step"] > args.kill_at)
        return {
            "mode": f"{stage} take-over",
            "stopped_s": resumed["t"] - last_step["t"],
            "step_s": step_s,
            "restart_s": "-",
            "from_step": last_step["step"],
            "resumed_at": last_step["step"],
            "redone": 0,
        }
    if len(starts) < 2:
        raise SystemExit(f"stage {mode}: the job did not roll back (one attempt in {times})")
    if "rolling back to the newest complete checkpoint" not in log:
        raise SystemExit(f"stage {mode}: no roll-back in the job's output")
    first, second = rows[: starts[1]], rows[starts[1] :]
    last_step = [r for r in first if r["event"] == "step"][-1]
    resumed = next(r for r in second if r["event"] == "step")
    started = second[0]
    registered = next(r for r in second if r["event"] == "registered")  # its step: the checkpoint's
    return {
        "mode": f"{stage} roll-back",
        "stopped_s": resumed["t"] - last_step["t"],
        "step_s": step_s,
        "restart_s": f"{resumed['t'] - started['t']:.2f}",
        "from_step": last_step["step"],
        "resumed_at": registered["step"],
        "redone": last_step["step"] - registered["step"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="1r,1,2,3", help="1r: stage 1 with --shard-replicas 2 (a take-over)")
    ap.add_argument("--n", type=int, default=3, help="nodes (node2 is killed)")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--every", type=int, default=2, help="--checkpoint-every")
    ap.add_argument("--kill-at", type=int, default=10, help="the step whose forward node2 dies in")
    ap.add_argument("--sleep", type=float, default=0.3, help="seconds each step waits (checkpoints come due)")
    ap.add_argument("--hidden", type=int, default=48, help="the MLP's width (48: 3,270 parameters)")
    args = ap.parse_args()
    params = 12 * args.hidden + args.hidden + args.hidden * args.hidden + args.hidden + 6 * args.hidden + 6
    print(
        f"# re-sharding after a lost node: meshtrain run --local {args.n}, an MLP of {params:,} parameters "
        f"(AdamW), node2 SIGKILLed in step {args.kill_at}'s forward, --checkpoint-every {args.every}, "
        f"{os.cpu_count()} cores",
        flush=True,
    )
    head = f"{'stage':>13} {'stopped s':>10} {'a step s':>9} {'restart s':>10} {'last step':>10}"
    print(f"{head} {'resumed at':>11} {'redone':>7}")
    for mode in args.stages.split(","):
        r = one(mode.strip(), args)
        print(
            f"{r['mode']:>13} {r['stopped_s']:10.2f} {r['step_s']:9.2f} {r['restart_s']:>10} "
            f"{r['from_step']:>10} {r['resumed_at']:>11} {r['redone']:>7}",
            flush=True,
        )


if __name__ == "__main__":
    main()
