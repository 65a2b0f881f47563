"""User mistakes on the command line: one line on stderr, non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshtrain import __version__ as meshtrain_version
from meshtrain.cli import build_parser, parse, split_run_args


def commands() -> str:
    """The registered commands as argparse lists them (others add theirs to cli/parser.py's COMMANDS)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    names = list(sub.choices)
    assert names[:7] == ["join", "run", "status", "leave", "checkpoints", "export", "doctor"]
    return ", ".join(repr(n) for n in names)


def meshtrain(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHTRAIN_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "no/such/script.py"], "meshtrain: no such script: no/such/script.py"),
        (["run", "--local", "0", "SCRIPT"], "meshtrain: argument --local: not a positive whole number: '0'"),
        (
            ["run", "--local", "2", "--nodes", "3", "SCRIPT"],
            "meshtrain: --local N makes its own mesh of N nodes: drop --nodes",
        ),
        (["run", "--nodes", "2", "--wait", "-1", "SCRIPT"], "meshtrain: --wait must be zero or more seconds"),
        (["join", "--seed", "host:port"], "meshtrain: argument --seed: not HOST:PORT: 'host:port'"),
        # issue 16, 7: node counts that cannot be met
        (["run", "--nodes", "0", "SCRIPT"], "meshtrain: --nodes 0: a job needs at least one node"),
        (
            ["run", "--nodes", "2", "--min-nodes", "5", "SCRIPT"],
            "meshtrain: --min-nodes 5 is more than the 2 nodes --nodes asks for",
        ),
        (
            ["run", "--nodes", "a,b", "--min-nodes", "3", "SCRIPT"],
            "meshtrain: --min-nodes 3 is more than the 2 nodes --nodes asks for",
        ),
        (
            ["run", "--local", "2", "--min-nodes", "3", "SCRIPT"],
            "meshtrain: --min-nodes 3 is more than the 2 nodes --local makes",
        ),
        # 8: ports out of range
        *(
            (
                ["join", "--port", bad],
                f"meshtrain: argument --port: not a port (1-65535, or 0 for any free one): '{bad}'",
            )
            for bad in ("70000", "-1", "65536", "x")
        ),
        (["join", "--seed", "h:70000"], "meshtrain: argument --seed: not HOST:PORT: 'h:70000'"),
        # 10: meshtrain's options go before SCRIPT
        (
            ["run", "--epochs", "3", "SCRIPT"],
            "meshtrain run: unknown option --epochs (meshtrain's options go before SCRIPT, the script's "
            "after it: meshtrain run [OPTIONS] SCRIPT [ARGS...])",
        ),
        # 13: the smaller ones
        (["run"], "meshtrain run: missing SCRIPT (meshtrain run [OPTIONS] SCRIPT [ARGS...])"),
        (["run", "--local", "2"], "meshtrain run: missing SCRIPT (meshtrain run [OPTIONS] SCRIPT [ARGS...])"),
        (
            ["join", "--log", "agent.log"],
            "meshtrain: --log FILE is for --detach (a foreground agent shows its log in the terminal)",
        ),
        (
            ["run", "DIR"],
            "meshtrain: DIR is a directory: name the script in it to run (meshtrain run DIR/train.py)",
        ),
        (["status"], "meshtrain: no agent is running on this machine: start one with `meshtrain join`"),
        (["leave"], "meshtrain: no agent is running on this machine: start one with `meshtrain join`"),
        (
            ["fly"],
            f"meshtrain: argument command: invalid choice: 'fly' (choose from {commands()})",
        ),
    ],
)
def test_one_line_and_non_zero(tmp_path: Path, args: list[str], expected: str) -> None:
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    swap = {"SCRIPT": str(script), "DIR": str(tmp_path)}
    out = meshtrain(tmp_path / "home", *[swap.get(a, a) for a in args])
    assert out.returncode != 0
    assert out.stderr.strip() == expected.replace("DIR", str(tmp_path))
    assert "Traceback" not in out.stderr


def test_options_go_before_the_script_and_everything_after_it_is_the_scripts() -> None:
    args = parse(["run", "--local", "2", "examples/mnist.py", "--local", "3", "--epochs", "1"])
    assert (args.script, args.local, args.script_args) == (
        "examples/mnist.py",
        2,
        ["--local", "3", "--epochs", "1"],
    )
    assert parse(["run", "t.py", "--", "--wait", "3"]).script_args == ["--wait", "3"]  # `--` still works
    assert parse(["run", "--nodes=a,b", "--", "-odd.py", "x"]).script == "-odd.py"
    assert split_run_args(["--nodes=a,b", "--min-nodes", "1", "t.py", "x", "--min-nodes", "-v"]) == (
        ["--nodes=a,b", "--min-nodes", "1", "--", "t.py"],  # `--`: a SCRIPT named -x.py is no option
        ["x", "--min-nodes", "-v"],
    )


def test_version() -> None:
    out = subprocess.run([sys.executable, "-m", "meshtrain", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"meshtrain {meshtrain_version}"


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
