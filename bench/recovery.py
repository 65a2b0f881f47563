"""Elastic recovery on a namespaced LAN: how long training stops when a node dies, joins, or flaps.

    sudo python bench/recovery.py     # 1 Gbit/s links, 4 hosts: kill, join, flap 1 s, flap 10 s
    sudo python bench/recovery.py --profile wifi --scenarios flap1,flap10

Hosts 0-2 run `meshtrain join` (lan gossip profile) and train examples/mnist.py (MLP, bf16 wire)
with the debug sample ledger on (MESHTRAIN_LEDGER_DIR): every committed step is logged with its
time and ring generation. Scenarios, each on a fresh job:

- kill:  SIGKILL host 2's agent and worker at once; resume = first step committed in a newer
         generation minus the kill time (the dead agent's TCP connections reset: detected at once);
- silent: cut host 2's link for good (a machine powered off): only gossip can tell; resume as above;
- join:  start an agent on host 3 mid-training; join-to-first-step = its worker's first committed
         step minus the agent's start (agent start, gossip join, worker start, data load, state);
- flap S: take host 2's link down for S seconds, then up: shorter than the suspicion timeout, no
         generation change; longer, the job drops the node, goes on, and re-admits it on heal.

Every scenario also checks the ledger: every index of every epoch in exactly one committed step.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshtrain.netns import Cluster, available, stop_processes  # noqa: E402
from meshtrain.security.secret import Keyring, generate_secret  # noqa: E402
from meshtrain.train.step_sampler import ledger_problem  # noqa: E402

PORT = 7946
TRAIN_LIMIT = 20000


def env_for(home: Path, i: int, secret: str, ledger: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MESHTRAIN_HOME": str(home / f"h{i}"),
        "MESHTRAIN_SECRET": secret,
        "MESHTRAIN_LEDGER_DIR": str(ledger),
        "OPENBLAS_NUM_THREADS": "1",
    }


def start_agent(
    c: Cluster, i: int, home: Path, secret: str, ledger: Path, profile: str
) -> subprocess.Popen[bytes]:
    flags = ["--host", c.ip(i), "--port", str(PORT), "--no-discovery", "--profile", profile]
    if i:
        flags += ["--seed", f"{c.ip(0)}:{PORT}"]
    return c.join(i, home / f"agent{i}.log", env_for(home, i, secret, ledger), *flags)


def alive(c: Cluster, home: Path, secret: str, ledger: Path) -> int:
    out = subprocess.run(
        [*c.exec_prefix(0), sys.executable, "-m", "meshtrain", "status", "--json"],
        env=env_for(home, 0, secret, ledger),
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return 0
    return sum(1 for n in json.loads(out.stdout)["nodes"] if n["state"] == "alive")


def rows(ledger: Path) -> list[dict]:
    out = []
    for path in ledger.glob("ledger-*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                out.append({**json.loads(line), "member": path.stem.removeprefix("ledger-")})
            except ValueError:
                pass  # a line being written
    return out


def exactly_once(ledger: Path, n: int) -> str:
    problem = ledger_problem(ledger, n)
    return "exactly once in each epoch" if problem is None else f"VIOLATED: {problem}"


def worker_pids(pid: int) -> list[int]:
    try:
        return [
            p.pid
            for p in psutil.Process(pid).children(recursive=True)
            if "meshtrain.worker" in " ".join(p.cmdline())
        ]
    except psutil.NoSuchProcess:
        return []


def scenario(name: str, args: argparse.Namespace) -> dict[str, object]:
    home = Path(tempfile.mkdtemp(prefix=f"mt-recovery-{name}-"))
    ledger = home / "ledger"
    ledger.mkdir()
    secret = Keyring([generate_secret()]).to_text()
    result: dict[str, object] = {"scenario": name}
    with Cluster(4, prefix="mrc", rate=args.rate) as c:
        agents = {i: start_agent(c, i, home, secret, ledger, args.profile) for i in range(3)}
        try:
            deadline = time.monotonic() + 30
            while alive(c, home, secret, ledger) < 3:
                if time.monotonic() > deadline:
                    raise SystemExit(f"mesh did not form: see {home}")
                time.sleep(0.3)
            cmd = [
                *c.exec_prefix(0),
                sys.executable,
                "-m",
                "meshtrain",
                "run",
                str(ROOT / "examples" / "mnist.py"),
            ]
            cmd += ["--", "--model", "mlp", "--epochs", str(args.epochs), "--train-limit", str(TRAIN_LIMIT)]
            job = subprocess.Popen(
                cmd,
                env=env_for(home, 0, secret, ledger),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            while len([r for r in rows(ledger) if r["member"] == "host2"]) < args.warm_steps:
                if job.poll() is not None:
                    raise SystemExit(job.stdout.read() if job.stdout else "job ended early")
                time.sleep(0.05)
            gen_before = max(r["gen"] for r in rows(ledger))
            t0 = time.time()
            if name == "kill":
                for pid in [agents[2].pid, *worker_pids(agents[2].pid)]:
                    os.kill(pid, signal.SIGKILL)
            elif name == "silent":
                c.cut(2)  # a machine powered off: no RST, no FIN; only gossip can tell
            elif name == "join":
                agents[3] = start_agent(c, 3, home, secret, ledger, args.profile)
            elif name.startswith("flap"):
                c.cut(2)
                time.sleep(float(name.removeprefix("flap")))
                c.heal(2)
            output, _ = job.communicate(timeout=args.timeout)
            after = [r for r in rows(ledger) if r["t"] > t0]
            if name in ("kill", "silent") or name.startswith("flap"):
                newer = [
                    r["t"] for r in after if r["gen"] > gen_before and not r["member"].startswith("host2")
                ]
                result["resume_s"] = round(min(newer) - t0, 2) if newer else None
            elif name == "join":
                mine = [r["t"] for r in after if r["member"].startswith("host3")]
                result["join_to_first_step_s"] = round(min(mine) - t0, 2) if mine else None
            else:
                gens = sorted({r["gen"] for r in after})
                result["generation_changes"] = len([g for g in gens if g > gen_before])
                result["rejoined_as"] = sorted({r["member"] for r in after if "~" in r["member"]})
            final = [ln for ln in output.splitlines() if "final test accuracy" in ln]
            result["accuracy"] = final[-1].split(": ")[-1] if final else "(none) " + output[-300:]
            result["exit"] = job.returncode
            result["ledger"] = exactly_once(ledger, TRAIN_LIMIT)
        finally:
            stop_processes(agents.values())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default="kill,join,flap1,flap10")
    parser.add_argument("--rate", default="1gbit")
    parser.add_argument(
        "--profile", default="lan", help="gossip profile: lan (suspicion ~1 s), wifi (>= 2 s)"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warm-steps", type=int, default=30, help="steps of host2 before the event")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    if not available():
        raise SystemExit("needs root, ip and tc (network namespaces)")
    print(f"recovery on 3 namespaced hosts (+1 to join), links {args.rate}, gossip profile {args.profile};")
    print(f"examples/mnist.py --model mlp --train-limit {TRAIN_LIMIT} --epochs {args.epochs} (bf16 wire)")
    for name in args.scenarios.split(","):
        print(json.dumps(scenario(name, args)), flush=True)


if __name__ == "__main__":
    main()
