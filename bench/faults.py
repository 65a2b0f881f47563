"""Does a fault change what the model learns? MNIST on 4 nodes, undisturbed vs SIGKILLs.

    python bench/faults.py [--epochs 3] [--train-limit 30000]

Four `meshtrain join` agents on loopback (one machine; this measures correctness, not speed)
train examples/mnist.py (MLP, bf16 wire, seed 0) four times:

- undisturbed;
- allreduce: host2's worker SIGKILLed 2 ms into the all-reduce of step 40 (MESHTRAIN_FAULT hook);
- forward:   host3's worker SIGKILLed 2 ms after its batch of step 60 is handed out;
- leader:    the checkpoint leader's node (its agent and worker) SIGKILLed at once, mid-training;
- submitter: the node the job was submitted from -- its agent, its worker (rank 0, so the job's
             coordinator too) and the `meshtrain run` client -- SIGKILLed at once, mid-training;
             the job's output and its final accuracy are then read with `meshtrain attach JOB`
             on another node, which shows the history from step 0 and follows the job to its end.

Each run must exit 0; the sample ledger (MESHTRAIN_LEDGER_DIR) must show every training index
exactly once per epoch; the table gives the final test accuracy and its distance from the
undisturbed run. A node whose worker was killed (its agent alive) gets a new worker that joins
mid-job, so those runs also exercise admission.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from meshtrain.train.step_sampler import ledger_problem  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("host0", "host1", "host2", "host3")


def agent(home: Path, name: str, env: dict[str, str], token: str | None) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "meshtrain", "join", "--name", name, "--profile", "local"]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--no-discovery"] + (["--token", token] if token else [])
    proc = subprocess.Popen(
        cmd,
        env={**env, "MESHTRAIN_HOME": str(home / name)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    hint = proc.stdout.readline() if token is None else ""
    return proc, hint.split("--token ")[1].strip() if "--token " in hint else (token or "")


def status(home: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "meshtrain", "status", "--json"],
        env={**os.environ, "MESHTRAIN_HOME": str(home)},
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout) if out.returncode == 0 else {"nodes": []}


def running_job(home: Path) -> str | None:
    out = subprocess.run(
        [sys.executable, "-m", "meshtrain", "jobs", "--json"],
        env={**os.environ, "MESHTRAIN_HOME": str(home)},
        capture_output=True,
        text=True,
    )
    rows = json.loads(out.stdout) if out.returncode == 0 else []
    return next((str(r["job"]) for r in rows if r.get("state") == "running"), None)


def kill_node(proc: subprocess.Popen[str], *more: int) -> None:
    """SIGKILL an agent, every process under it (its worker) and `more` pids, at once."""
    kids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    for pid in [proc.pid, *kids, *more]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_steps(ledger: Path, member: str, steps: int) -> None:
    path = ledger / f"ledger-{member}.jsonl"
    while not path.exists() or len(path.read_text().splitlines()) < steps:
        time.sleep(0.1)


def exactly_once(ledger: Path, n: int) -> str:
    problem = ledger_problem(ledger, n)
    return "exactly once" if problem is None else f"VIOLATED: {problem}"


def run(name: str, args: argparse.Namespace) -> dict[str, object]:
    home = Path(tempfile.mkdtemp(prefix=f"mt-faults-{name}-"))
    ledger = home / "ledger"
    ledger.mkdir()
    env = {**os.environ, "MESHTRAIN_LEDGER_DIR": str(ledger), "OPENBLAS_NUM_THREADS": "1"}
    if name == "allreduce":
        env["MESHTRAIN_FAULT"] = "host2:40:allreduce"
    elif name == "forward":
        env["MESHTRAIN_FAULT"] = "host3:60:forward"
    procs: dict[str, subprocess.Popen[str]] = {}
    token = None
    try:
        for n in NAMES:
            procs[n], token = agent(home, n, env, token)
        while sum(1 for x in status(home / "host0")["nodes"] if x["state"] == "alive") < 4:
            time.sleep(0.2)
        snap = status(home / "host0")
        leader = next((x["name"] for x in snap["nodes"] if x.get("id") == snap.get("leader")), None)
        submitter = next(n for n in reversed(NAMES) if n != leader)  # its node owns the live view
        cmd = [sys.executable, "-m", "meshtrain", "run", str(ROOT / "examples" / "mnist.py"), "--"]
        cmd += ["--model", "mlp", "--epochs", str(args.epochs), "--train-limit", str(args.train_limit)]
        started = time.monotonic()
        job = subprocess.Popen(
            cmd,
            env={**env, "MESHTRAIN_HOME": str(home / submitter)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        killed = leader if name == "leader" else env.get("MESHTRAIN_FAULT", "-")
        if name == "leader" and leader is not None:
            wait_steps(ledger, leader, 50)
            kill_node(procs[leader])
        if name == "submitter":
            watcher = next(n for n in NAMES if n not in (submitter, leader))
            job_id = None
            while job_id is None:
                job_id = running_job(home / watcher)
                time.sleep(0.2)
            wait_steps(ledger, submitter, 50)
            kill_node(procs[submitter], job.pid)
            job.communicate(timeout=30)
            killed = f"{submitter} (agent + rank-0 worker + run client); watched with attach on {watcher}"
            job = subprocess.Popen(  # its history from step 0, then the rest, from a node that never ran it
                [sys.executable, "-m", "meshtrain", "attach", job_id],
                env={**env, "MESHTRAIN_HOME": str(home / watcher)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        output, _ = job.communicate(timeout=args.timeout)
        final = [ln for ln in output.splitlines() if "final test accuracy" in ln]
        return {
            "run": name,
            "exit": job.returncode,
            "accuracy": float(final[-1].split(": ")[-1].rstrip("%")) if final else None,
            "seconds": round(time.monotonic() - started, 1),
            "ledger": exactly_once(ledger, args.train_limit),
            "killed": killed,
            "tail": "" if final else output[-500:],
        }
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="undisturbed,allreduce,forward,leader,submitter")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=30000)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    print(
        f"4 local agents (loopback), examples/mnist.py --model mlp --epochs {args.epochs} "
        f"--train-limit {args.train_limit} (bf16 wire, seed 0)",
        flush=True,
    )
    base = None
    for name in args.runs.split(","):
        result = run(name, args)
        acc = result["accuracy"]
        if name == "undisturbed":
            base = acc
        if isinstance(acc, float) and isinstance(base, float):
            result["delta_pt"] = round(acc - base, 2)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
