"""User mistakes on the command line: one line on stderr, non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshtrain.cli import parse, split_run_args


def meshtrain(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHTRAIN_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "no/such/script.py"], "meshtrain: no such script: no/such/script.py"),
        (["run", "SCRIPT", "--local", "0"], "meshtrain: argument --local: not a positive whole number: '0'"),
        (
            ["run", "SCRIPT", "--local", "2", "--nodes", "3"],
            "meshtrain: --local N makes its own mesh of N nodes: drop --nodes",
        ),
        (["run", "SCRIPT", "--nodes", "2", "--wait", "-1"], "meshtrain: --wait must be zero or more seconds"),
        (["join", "--seed", "host:port"], "meshtrain: argument --seed: not HOST:PORT: 'host:port'"),
        (["status"], "meshtrain: no agent is running on this machine: start one with `meshtrain join`"),
        (["leave"], "meshtrain: no agent is running on this machine: start one with `meshtrain join`"),
        (
            ["fly"],
            "meshtrain: argument command: invalid choice: 'fly' "
            "(choose from 'join', 'run', 'status', 'leave', 'checkpoints', 'export', 'doctor')",
        ),
    ],
)
def test_one_line_and_non_zero(tmp_path: Path, args: list[str], expected: str) -> None:
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    out = meshtrain(tmp_path / "home", *[str(script) if a == "SCRIPT" else a for a in args])
    assert out.returncode != 0
    assert out.stderr.strip() == expected
    assert "Traceback" not in out.stderr


def test_run_flags_may_follow_the_script_and_the_rest_is_the_scripts() -> None:
    args = parse(["run", "examples/mnist.py", "--local", "2", "--epochs", "1", "--", "--wait", "3"])
    assert (args.script, args.local, args.script_args) == (
        "examples/mnist.py",
        2,
        ["--epochs", "1", "--wait", "3"],
    )
    assert split_run_args(["--nodes=a,b", "t.py", "x", "--min-nodes", "1", "-v"]) == (
        ["--nodes=a,b", "t.py", "--min-nodes", "1"],
        ["x", "-v"],
    )


def test_alone_without_an_agent_says_so_and_trains(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("import meshtrain\nm = meshtrain.init()\nprint(f'size {m.size} rank {m.rank}')\n")
    out = meshtrain(tmp_path / "home", "run", str(script))
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == (
        "no agent on this machine: training here alone "
        "(start `meshtrain join` on your machines to train on the mesh)"
    )
    assert "[node1] size 1 rank 0" in out.stdout
