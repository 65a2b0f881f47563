"""`run --report-to`: the same metrics through tensorboard and MLflow (local stores), once per run;
a library missing here is one line; the record carries the script's git commit and dirty flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_tracking import SCRIPT


def mt(home: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHTRAIN_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


def test_report_to_tensorboard_and_mlflow_once_per_run(tmp_path: Path) -> None:
    pytest.importorskip("tensorboardX")
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    mlflow_client = pytest.importorskip("mlflow.tracking")
    work, home, reports = tmp_path / "work", tmp_path / "home", tmp_path / "reports"
    work.mkdir()
    (work / "train.py").write_text(SCRIPT)
    git(work, "init", "-q")
    git(work, "add", "train.py")
    git(work, "commit", "-q", "-m", "x")
    commit = git(work, "rev-parse", "HEAD").strip()
    out = mt(
        home,
        "run",
        "--local",
        "2",
        "--report-to",
        "tensorboard,mlflow",
        "--report-dir",
        str(reports),
        "train.py",
        "--lr",
        "0.2",
        cwd=work,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    rec = json.loads(mt(home, "runs", "show", "train", "--json", cwd=work).stdout)
    assert rec["git"]["commit"] == commit and rec["git"]["dirty"] is False
    # tensorboard: the main worker's values only (6 steps, not 12), read with tensorboard's own reader
    logdir = reports / "tensorboard" / f"train-{rec['id']}"
    acc = accumulator.EventAccumulator(str(logdir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(6))
    assert acc.Scalars("val_loss")[-1].value == pytest.approx(0.1)
    # mlflow: a finished run with the same metrics and the hyper-parameters
    client = mlflow_client.MlflowClient(tracking_uri=f"sqlite:///{reports / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert (
        run.info.status == "FINISHED" and run.data.params["lr"] == "0.2" and run.data.params["layers"] == "2"
    )
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(6))


def test_report_to_mistakes(tmp_path: Path) -> None:
    work = tmp_path
    (work / "train.py").write_text(SCRIPT)
    out = mt(tmp_path / "h", "run", "--local", "1", "--report-to", "neptune", "train.py", cwd=work)
    assert out.returncode == 2 and "--report-to 'neptune'" in out.stderr and out.stderr.count("\n") == 1
    (work / "train.py").write_text(SCRIPT + "\n# an edit not committed\n")
    missing = [n for n in ("wandb", "trackio") if __import__("importlib").util.find_spec(n) is None]
    if not missing:
        pytest.skip("wandb and trackio are both installed here")
    out = mt(tmp_path / "h", "run", "--local", "1", "--report-to", missing[0], "train.py", cwd=work)
    assert out.returncode == 0, out.stderr
    assert (
        sum(f"--report-to: {missing[0]} not installed here" in line for line in out.stderr.splitlines()) == 1
    )
