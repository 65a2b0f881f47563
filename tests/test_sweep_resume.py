"""`meshtrain sweep --resume NAME`: a sweep whose submitter died goes on from its recorded trials.

The sweep (a `--local 2` mesh, so its nodes die with it) is SIGKILLed once a
trial has completed; `--resume NAME` then keeps the completed trials (no new
run of them), runs the cut-short ones again with their own values, asks only
for the trials still missing, and exports the best model. Also: what the
dashboard reads (the sweep's file), and the one-line mistakes of --resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshtrain.sweep.outcome import PRUNED_REASON
from meshtrain.sweep.resume import SweepSpec, sweep_tables
from meshtrain.tracking.store import RunStore
from tests.test_sweep_retry import SCRIPT

pytest.importorskip("optuna")


def mt(home: Path, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHTRAIN_HOME": str(home), "COLUMNS": "150"}
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def trial_runs(home: Path, sweep: str) -> dict[str, list[tuple[float, str, str, str, list[str]]]]:
    """{run name: [(started, run id, state, reason, args)], oldest first} over the --local mesh's stores."""
    out: dict[str, dict[str, tuple[float, str, str, str, list[str]]]] = {}
    for db in [home / "runs.sqlite", *home.glob("nodes/*/runs.sqlite")]:
        for run in RunStore(db).runs(sweep=sweep):
            held = out.setdefault(run.name, {}).get(run.id)
            if held is None or held[2] == "running":
                out[run.name][run.id] = (run.started, run.id, run.state, run.reason or "", run.args)
    return {name: sorted(runs.values()) for name, runs in out.items()}


def ended(runs: list[tuple[float, str, str, str, list[str]]]) -> bool:
    """The trial ended for a reason of its own (done, or pruned): a resume keeps it."""
    return runs[-1][2] == "done" or runs[-1][3] == PRUNED_REASON


def test_a_killed_sweep_resumes_from_its_records(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(SCRIPT)
    home = tmp_path / "home"
    env = {**os.environ, "MESHTRAIN_HOME": str(home), "COLUMNS": "150"}
    cmd = [sys.executable, "-m", "meshtrain", "sweep", "train.py", "--param", "lr=loguniform:1e-2:0.3"]
    cmd += ["--trials", "4", "--local", "2", "--name", "again", "--checkpoint-every", "3"]
    cmd += ["--args", "--epochs 6 --sleep 0.1", "--seed", "3"]
    sweep = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    try:
        assert sweep.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = sweep.stdout.readline()
            lines.append(line)
            if " done: " in line or not line:
                break
        assert any(" done: " in line for line in lines), "".join(lines)
        time.sleep(1.5)  # the next trial is under way on the node the first one freed
        sweep.send_signal(signal.SIGKILL)  # the submitter and its whole --local mesh, gone at once
        sweep.wait(10)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    before = trial_runs(home, "again")
    done_before = {n for n, runs in before.items() if ended(runs)}
    assert done_before and set(before) - done_before and len(before) <= 4, before
    table = json.loads((home / "sweeps" / "again.json").read_text())
    assert table["state"] == "running" and table["spec"]["trials"] == 4  # it never closed: killed

    out = mt(home, "sweep", "--resume", "again", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(resumed: " in out.stdout, out.stdout
    after = trial_runs(home, "again")
    assert sorted(after) == [f"again-t{k}" for k in range(4)], after  # 4 trials in all, numbered on
    for name in done_before:
        assert after[name] == before[name], name  # a completed trial is not run again
    for name, runs in before.items():
        if name not in done_before:  # cut short: run again, with its own values
            assert len(after[name]) == len(runs) + 1 and ended(after[name]), after
            assert {tuple(r[4]) for r in after[name]} == {tuple(runs[0][4])}, after[name]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("best model: ") and Path(last.split()[2]).is_file(), last
    from meshtrain.dashboard.source import AgentSource
    from meshtrain.dashboard.source import sweep_tables as dashboard_tables

    tables = sweep_tables(home)
    assert (
        dashboard_tables(AgentSource(home / "agent.sock", home / "checkpoints")) == tables
    )  # the page's data
    assert [t["name"] for t in tables] == ["again"] and tables[0]["state"] == "done"
    assert {r["trial"] for r in tables[0]["trials"]} == {0, 1, 2, 3} and tables[0]["best"] is not None


def test_resume_mistakes_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(SCRIPT)
    home = tmp_path / "home"
    for args, words in (
        (("sweep", "--resume", "nosuch"), "no sweep of that name"),
        (
            ("sweep", "train.py", "--param", "lr=uniform:0:1", "--resume", "a", "--name", "b"),
            "leave out --name",
        ),
        (("sweep", "--param", "lr=uniform:0:1", "--local", "1"), "name the script"),
        (
            ("sweep", "train.py", "--param", "lr=uniform:0:1", "--checkpoint-every", "soon"),
            "checkpoint-every",
        ),
        (("sweep", "train.py", "--param", "lr=loguniform:1:x", "--local", "1"), "--param"),
    ):
        out = mt(home, *args, cwd=tmp_path)
        one_line = out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
        assert out.returncode == 2 and one_line and words in out.stderr, (args, out.stderr)


def test_the_resume_command_round_trips() -> None:
    spec = SweepSpec(
        script="train.py",
        params=["lr=loguniform:1e-4:1e-2", "act=choice:relu,gelu"],
        objective="accuracy:max",
        trials=12,
        nodes_per_trial=2,
        script_args=["--epochs", "5"],
        checkpoint_every="30s",
    )
    line = spec.command("s1")
    assert line == (
        "meshtrain sweep train.py --param lr=loguniform:1e-4:1e-2 --param act=choice:relu,gelu --trials 12 "
        "--objective accuracy:max --nodes-per-trial 2 --args '--epochs 5' --checkpoint-every 30s --resume s1"
    )
    import shlex

    from meshtrain.cli.parser import build_parser

    args = build_parser().parse_args(shlex.split(line)[1:])
    assert args.resume == "s1" and args.param == spec.params and args.nodes_per_trial == 2
    assert args.args == "--epochs 5" and args.checkpoint_every == "30s" and args.objective == "accuracy:max"
