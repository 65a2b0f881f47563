"""Kill every node mid-run, lose one node's checkpoints, `--resume`: the final parameters must be bitwise
those of an uninterrupted run.

    flock /tmp/meshtrain-bench.lock python bench/checkpoint_resume.py [--nodes 2] [--steps 120] [--every 20]

Everything is the real product: `meshtrain join` agent processes on loopback
(gossip, election, control TCP, checkpoint servers, one state directory each),
`meshtrain run` submitting a small MLP training script (synthetic data, dropout
so the RNG matters, Adam) to the first agent. Three runs of the same seed:

1. reference: uninterrupted, the script saves its final parameters;
2. interrupted: `--checkpoint-every N`; once a complete checkpoint past half
   the steps exists, every agent, worker and the CLI get SIGKILL; then the run's
   checkpoint directory of node 1 is deleted;
3. the agents restart (same state directories), `meshtrain run ... --resume`:
   node 1 fetches the newest complete checkpoint from a replica, every worker
   restores params, optimizer state, sampler cursor and RNG, and training
   finishes; the script saves its final parameters.

Printed: the step killed at, the checkpoint resumed from (and from where), the
steps trained after the resume, and whether the final parameters are bitwise equal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import psutil

from meshtrain.security import Keyring, generate_secret

PROBE = textwrap.dedent(
    """
    import argparse, time
    import mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten, tree_map
    import meshtrain

    mesh = meshtrain.init()
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pace", type=float, default=0.05)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    rng = np.random.default_rng(0)
    n = args.steps * args.batch // 2  # two epochs
    x = mx.array(rng.standard_normal((n, 32)).astype(np.float32))
    y = mx.array((rng.standard_normal((n,)) > 0).astype(np.int32))
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 2))
    opt = optim.Adam(learning_rate=1e-3)
    mesh.register(model, opt)

    def loss_fn(m, xb, yb):
        return nn.losses.cross_entropy(m(xb), yb, reduction="mean")

    grad_fn = nn.value_and_grad(model, loss_fn)
    trained = 0
    for epoch in range(2):
        for i, idx in enumerate(mesh.batches(n, args.batch, epoch=epoch, seed=0)):
            if len(idx):
                b = mx.array(idx)
                loss, grads = grad_fn(model, x[b], y[b])
            else:
                loss = mx.array(0.0)
                grads = tree_map(mx.zeros_like, model.trainable_parameters())
            grads = mesh.allreduce(grads, weight=len(idx))
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)
            trained += 1
            spe = args.steps // 2
            mesh.report(epoch=epoch, epochs=2, step=i, steps_per_epoch=spe, loss=float(loss))
            time.sleep(args.pace)
    if mesh.is_main:
        mx.save_safetensors(args.out, dict(tree_flatten(model.parameters())))
        print(f"trained {trained} steps in this run", flush=True)
        print(f"ring generations: {getattr(mesh, '_history', '?')}", flush=True)
    mesh.close()
    """
)


class Agents:
    """N `meshtrain join` processes, each with its own state directory, sharing one mesh secret."""

    def __init__(self, base: Path, n: int, secret: str) -> None:
        self.base, self.n, self.secret = base, n, secret
        self.procs: list[subprocess.Popen[bytes]] = []

    def home(self, i: int) -> Path:
        return self.base / f"n{i + 1}"

    def env(self, i: int) -> dict[str, str]:
        # equal shares: performance-based ones follow measured speed, so two runs would split (and
        # round) batches differently; the checkpoint carries the shares, an independent run cannot
        return {
            **os.environ,
            "MESHTRAIN_HOME": str(self.home(i)),
            "MESHTRAIN_SECRET": self.secret,
            "MESHTRAIN_SHARES": "equal",
        }

    def start(self) -> None:
        port = None
        for i in range(self.n):
            self.home(i).mkdir(parents=True, exist_ok=True)
            log = self.home(i) / "agent.log"
            args = ["join", "--name", f"n{i + 1}", "--profile", "local", "--host", "127.0.0.1"]
            args += ["--port", "0", "--no-discovery"] + (["--seed", f"127.0.0.1:{port}"] if port else [])
            with open(log, "wb") as out:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "meshtrain", *args], env=self.env(i), stdout=out, stderr=out
                    )
                )
            if port is None:
                port = wait_for_port(log)
        deadline = time.monotonic() + 30
        while self.alive() < self.n:
            if time.monotonic() > deadline:
                raise SystemExit("the agents did not form a mesh in 30 s")
            time.sleep(0.2)

    def alive(self) -> int:
        out = subprocess.run(
            [sys.executable, "-m", "meshtrain", "status", "--json"],
            env=self.env(0),
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            return 0
        snap = json.loads(out.stdout)
        return sum(1 for node in snap["nodes"] if node["state"] == "alive")

    def resume_events(self, job: subprocess.Popen[str]) -> list[str]:
        """What the agents said about fetching the checkpoint to resume from (their event log)."""
        found: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while len(found) < self.n and job.poll() is None and time.monotonic() < deadline:
            for i in range(self.n):
                out = subprocess.run(
                    [sys.executable, "-m", "meshtrain", "status", "--json"],
                    env=self.env(i),
                    capture_output=True,
                    text=True,
                )
                if out.returncode == 0:
                    for event in json.loads(out.stdout).get("events", []):
                        if "resume of" in str(event.get("detail")) and event.get("node") == f"n{i + 1}":
                            found[f"n{i + 1}"] = f"n{i + 1}: {event['detail']}"
            time.sleep(0.2)
        return sorted(found.values())

    def run(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "meshtrain", "run", *args],
            env=self.env(0),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def kill_all(self) -> None:
        """SIGKILL every agent and every process under it (the workers run in their own sessions)."""
        victims: list[psutil.Process] = []
        for proc in self.procs:
            try:
                parent = psutil.Process(proc.pid)
                victims += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for v in victims:
            try:
                v.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=10)
        self.procs = []

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs = []


def wait_for_port(log: Path) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "gossip port " in text:
            return int(text.split("gossip port ")[1].split(")")[0])
        time.sleep(0.1)
    raise SystemExit(f"the agent did not start: {log.read_text(errors='replace')[-500:]}")


def complete_steps(home: Path, run: str) -> list[int]:
    directory = home / "checkpoints" / run
    if not directory.is_dir():
        return []
    return sorted(
        int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "manifest.json").exists()
    )


def finish(proc: subprocess.Popen[str], what: str, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{out[-3000:]}")
    return out


def same_bits(a: Path, b: Path) -> tuple[bool, int]:
    left: Any = mx.load(str(a))
    right: Any = mx.load(str(b))
    equal = left.keys() == right.keys() and all(
        bytes(memoryview(left[k])) == bytes(memoryview(right[k])) for k in left
    )
    return equal, sum(v.size for v in left.values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=120, help="total steps of the run (two epochs)")
    parser.add_argument("--every", type=int, default=20, help="--checkpoint-every STEPS")
    parser.add_argument("--pace", type=float, default=0.05, help="seconds the script sleeps per step")
    parser.add_argument("--keep-dir", action="store_true", help="leave the temp dir for inspection")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="meshtrain-resume-"))
    secret = Keyring([generate_secret()]).to_text()
    script = base / "work" / "probe.py"
    script.parent.mkdir()
    script.write_text(PROBE)
    common = ["--nodes", str(args.nodes), "--wait", "30", str(script), "--"]
    probe = ["--steps", str(args.steps), "--pace", str(args.pace)]
    print(
        f"{args.nodes} agents on loopback, {args.steps} steps, checkpoint every {args.every}; "
        f"files under {base}"
    )
    try:
        ref = Agents(base / "reference", args.nodes, secret)
        ref.start()
        t0 = time.monotonic()
        finish(ref.run(*common, *probe, "--out", str(base / "reference.safetensors")), "the reference run")
        print(f"reference run: {time.monotonic() - t0:.1f} s")
        ref.stop()

        mesh = Agents(base / "interrupted", args.nodes, secret)
        mesh.start()
        ckpt = ["--checkpoint-every", str(args.every), "--name", "probe"]
        out = str(base / "resumed.safetensors")
        job = mesh.run(*ckpt, *common, *probe, "--out", out)
        deadline = time.monotonic() + 600
        while True:
            steps = [complete_steps(mesh.home(i), "probe") for i in range(args.nodes)]
            if all(s and s[-1] >= args.steps // 2 for s in steps):
                break
            if job.poll() is not None or time.monotonic() > deadline:
                tail = job.stdout.read() if job.stdout else ""
                raise SystemExit(f"no checkpoint past step {args.steps // 2} before the job ended:\n{tail}")
            time.sleep(0.05)
        mesh.kill_all()
        job.kill()
        job.wait()
        steps = [complete_steps(mesh.home(i), "probe") for i in range(args.nodes)]
        killed_after = max(max(s) for s in steps)
        print(f"killed every agent, worker and the CLI; complete checkpoints per node: {steps}")
        doomed = mesh.home(0) / "checkpoints" / "probe"
        shutil.rmtree(doomed)
        print(f"deleted {doomed} (node n1 has no checkpoint of the run now)")

        mesh.start()
        t0 = time.monotonic()
        job = mesh.run(*ckpt, "--resume", *common, *probe, "--out", out)
        said = mesh.resume_events(job)
        text = finish(job, "the resumed run")
        trained = next((line for line in text.splitlines() if "steps in this run" in line), "?")
        print(f"resumed run: {time.monotonic() - t0:.1f} s; {trained.strip()}")
        for line in said:
            print(f"  agent event: {line}")
        mesh.stop()
        equal, n_params = same_bits(base / "reference.safetensors", Path(out))
        print(
            f"newest complete checkpoint when killed: step {killed_after}; "
            f"final parameters ({n_params:,} values) bitwise equal to the uninterrupted run: {equal}"
        )
        if not equal:
            sys.exit(1)
    finally:
        if not args.keep_dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
