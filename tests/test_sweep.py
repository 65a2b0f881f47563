"""`meshtrain sweep`: Optuna's search over real jobs on a real `--local 3` mesh.

The script is a tiny gradient descent whose final loss is known in closed form
(0.1 + 9 (1 - 2 lr)^100), so the sweep's best can be held against a full grid
of the same range, computed here with the same formula.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meshtrain.errors import UserError
from meshtrain.sweep.space import parse_objective, parse_param, parse_params, trial_args

pytest.importorskip("optuna")

SCRIPT = textwrap.dedent(
    """
    import argparse, time
    import meshtrain
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--epochs", type=int, default=10)
    a = p.parse_args()
    mesh = meshtrain.init()
    w = 0.0
    for epoch in range(a.epochs):
        for step in range(5):
            w -= a.lr * 2 * (w - 3.0)
        time.sleep(0.25)  # an epoch's work
        loss = 0.1 + (w - 3.0) ** 2
        mesh.report(epoch=epoch, step=epoch, loss=loss, val_loss=loss)
    """
)


def final_loss(lr: float, epochs: int = 10) -> float:
    w = 0.0
    for _ in range(epochs * 5):
        w -= lr * 2 * (w - 3.0)
    return 0.1 + (w - 3.0) ** 2


def mt(home: Path, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHTRAIN_HOME": str(home), "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_param_and_objective_forms() -> None:
    lr = parse_param("lr=loguniform:1e-4:1e-2")
    assert (lr.kind, lr.low, lr.high) == ("loguniform", 1e-4, 1e-2)
    assert parse_param("layers=choice:2,4,6").choices == (2, 4, 6)
    assert parse_param("act=choice:relu,gelu").choices == ("relu", "gelu")
    assert parse_param("depth=int:1:8").distribution().high == 8
    assert parse_objective("val_loss:min") == ("val_loss", "minimize")
    assert parse_objective("accuracy:max") == ("accuracy", "maximize")
    assert trial_args({"lr": 0.001, "batch_size": 64}) == ["--lr", "0.001", "--batch-size", "64"]
    for bad in ("lr", "lr=loguniform:0:1", "lr=uniform:2:1", "lr=normal:0:1", "lr=int:1.5:3", "x y=choice:1"):
        with pytest.raises(UserError, match="--param"):
            parse_param(bad)
    with pytest.raises(UserError, match="twice"):
        parse_params(["lr=uniform:0:1", "lr=uniform:0:2"])
    with pytest.raises(UserError, match="objective"):
        parse_objective("loss:lowest")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    (root / "train.py").write_text(SCRIPT)
    return root


def sweep_lr(home: Path, work: Path, name: str) -> tuple[str, int]:
    out = mt(
        home,
        "sweep",
        "train.py",
        "--param",
        "lr=loguniform:1e-3:1",
        "--trials",
        "8",
        "--local",
        "3",
        "--objective",
        "val_loss:min",
        "--name",
        name,
        "--seed",
        "2",
        cwd=work,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    return out.stdout, int(re.search(r"nodes busy (\d+)%", out.stdout).group(1))  # type: ignore[union-attr]


def test_a_sweep_keeps_the_nodes_busy_prunes_and_finds_a_good_rate(work: Path) -> None:
    home = work / "home"
    stdout, busy = sweep_lr(home, work, "lrsearch")
    if busy < 80:  # a machine shared with other test runs slows the trials' starts: measure once more
        _, busy = sweep_lr(home, work, "lrsearch-again")
    assert busy >= 80, stdout
    assert stdout.count(" pruned at step ") >= 1, stdout
    best = float(re.search(r"best: trial \d+ \(\w+\) val_loss (\S+)", stdout).group(1))  # type: ignore[union-attr]
    grid = min(final_loss(10 ** (-3 + 3 * i / 49)) for i in range(50))  # 50 log-spaced rates, same range
    assert best <= grid * 1.05, (best, grid)
    runs = json.loads(mt(home, "runs", "--sweep", "lrsearch", "--json", cwd=work).stdout)
    assert len(runs) == 8 and {r["sweep"] for r in runs} == {"lrsearch"}
    assert all(math.isclose(r["params"]["lr"], float(r["args"][-1])) for r in runs)  # the trial's own value
    states = sorted(r["state"] for r in runs)
    assert "cancelled" in states and "done" in states  # pruned trials were stopped, not run out


def test_an_objective_never_reported_stops_after_the_first_trial(work: Path) -> None:
    out = mt(
        work / "home2",
        "sweep",
        "train.py",
        "--param",
        "lr=loguniform:1e-3:1",
        "--trials",
        "6",
        "--local",
        "2",
        "--objective",
        "accuracy:max",
        cwd=work,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "never reports the objective 'accuracy'" in out.stderr and "loss, val_loss" in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stdout.count(" done: ") + out.stdout.count(" failed") <= 2  # not the other 4 blind


def test_bad_sweep_input_is_one_line(work: Path) -> None:
    for args in (
        ("sweep", "train.py", "--param", "lr=logunif:1:2", "--local", "1"),
        ("sweep", "train.py", "--local", "1"),  # nothing to search
        ("sweep", "missing.py", "--param", "lr=uniform:0:1", "--local", "1"),
        ("sweep", "train.py", "--param", "lr=uniform:0:1", "--local", "1", "--nodes-per-trial", "2"),
    ):
        out = mt(work / "home3", *args, cwd=work, timeout=120)
        one_line = out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
        assert out.returncode == 2 and one_line, (args, out.stderr)


def test_a_sweep_on_real_agents(work: Path) -> None:
    """Without --local the trials go to this machine's agent, pinned to the mesh's nodes."""
    from meshtrain.testing.agents import AgentProcess, alive_names, cli, wait_for

    a = AgentProcess(work / "ag-a", "a")
    b = AgentProcess(work / "ag-b", "b", token=a.token)
    try:
        wait_for(lambda: alive_names(a.home) == {"a", "b"})
        args = ["sweep", str(work / "train.py"), "--param", "lr=loguniform:1e-3:1", "--trials", "4"]
        out = cli(a.home, *args, "--args", "--epochs 4", "--name", "onagents", timeout=240)
        assert out.returncode == 0, out.stdout + out.stderr
        assert " on a: " in out.stdout and " on b: " in out.stdout  # both nodes ran trials
        assert "failed" not in out.stdout, out.stdout
        runs = json.loads(cli(a.home, "runs", "--sweep", "onagents", "--json").stdout)
        assert len(runs) == 4 and all(r["args"][:2] == ["--epochs", "4"] for r in runs)
    finally:
        b.stop()
        a.stop()
