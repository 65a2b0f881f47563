"""Experiment tracking: runs recorded with no tracking code in the script, read back by `meshtrain runs`.

The parts (store, folding reports, parsing arguments, the chart) on plain values; then real
`meshtrain run --local 2` jobs and real `meshtrain join` agents, read back through the CLI.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import msgpack
import pytest

from meshtrain.testing.agents import AgentProcess, alive_names, cli, wait_for
from meshtrain.tracking.record import MetricFolder, bundle_hash, params_from_args
from meshtrain.tracking.store import MetricRow, Run, RunStore
from meshtrain.tracking.views import chart

SCRIPT = textwrap.dedent(
    """
    import argparse
    import numpy as np
    import meshtrain
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--optimizer", default="sgd")
    args = p.parse_args()
    mesh = meshtrain.init()
    cfg = mesh.config(layers=2, width=16)
    for step in range(args.steps):
        out = mesh.allreduce(np.full(10, float(mesh.rank + 1), dtype=np.float32))
        mesh.report(epoch=0, epochs=1, step=step, steps_per_epoch=args.steps,
                    loss=args.lr / (step + 1), samples=10)
    if mesh.is_main:
        mesh.report(val_loss=args.lr * 0.5)
    mesh.close()
    """
)


# ----------------------------------------------------------------------------- parts


def test_params_from_args() -> None:
    got = params_from_args(["--lr", "1e-3", "--layers=4", "--no-compile", "--name", "mlp", "pos", "--x"])
    assert got == {"lr": 0.001, "layers": 4, "no_compile": True, "name": "mlp", "x": True}


def test_bundle_hash_is_content_only() -> None:
    a = msgpack.packb({"script": "s.py", "files": {"s.py": b"x", "b.py": b"y"}})
    b = msgpack.packb({"files": {"b.py": b"y", "s.py": b"x"}, "script": "s.py"})
    c = msgpack.packb({"script": "s.py", "files": {"s.py": b"x", "b.py": b"z"}})
    assert bundle_hash(a) == bundle_hash(b) != bundle_hash(c)


def test_folder_global_steps_and_reserved_keys() -> None:
    f = MetricFolder()
    rows, *_ = f.fold("n1", 1.0, {"epoch": 1, "step": 2, "steps_per_epoch": 10, "loss": 0.5, "share": 0.5})
    assert [(r.step, r.key, r.value) for r in rows] == [(12, "loss", 0.5)]
    rows, config, parsed, env = f.fold("n1", 2.0, {"test_accuracy": 0.9, "__config__": {"lr": 1}})
    assert [(r.step, r.key) for r in rows] == [(12, "test_accuracy")]  # where it was measured
    assert config == {"lr": 1} and parsed == {} and env == {}
    assert [r.seq for r in rows] == [1]


def test_store_replica_takes_newer_rows_only_and_dedups(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs.sqlite")
    run = Run(id="j1", name="a", state="running", updated=10.0)
    assert store.put_run(run)
    assert not store.put_run(Run(id="j1", name="a", state="waiting", updated=5.0))  # an older push
    assert store.get("j1").state == "running"
    rows = [MetricRow(i, "n1", i, float(i), "loss", 1.0 / (i + 1)) for i in range(5)]
    assert store.add_metrics("j1", rows) == 5
    assert store.add_metrics("j1", rows[2:]) == 0  # a retried push
    assert [s for s, _, _ in store.series("j1", "loss")] == [0, 1, 2, 3, 4]
    assert store.final_metrics("j1") == {"loss": 0.2}
    assert store.resolve("j").id == "j1" and store.resolve("a").id == "j1"
    with pytest.raises(Exception, match="no run 'zz'"):
        store.resolve("zz")


def test_chart_shape() -> None:
    rows = chart([3.0, 2.0, 1.0, 0.5], width=4, height=3)
    assert len(rows) == 3 and all(len(r) == 4 for r in rows)
    assert rows[0][0] == "█" and rows[-1][-1] != " "


# ----------------------------------------------------------------------------- real jobs


def mt(
    home: Path, *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHTRAIN_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """Two recorded runs of the same script on `--local 2` meshes, with different hyper-parameters."""
    root = tmp_path_factory.mktemp("trk")
    home, work = root / "home", root / "work"
    work.mkdir()
    (work / "train.py").write_text(SCRIPT)
    ids = []
    for lr in ("0.1", "0.02"):
        out = mt(home, "run", "--local", "2", "train.py", "--lr", lr, cwd=work)
        assert out.returncode == 0, out.stderr + out.stdout
        listing = json.loads(mt(home, "runs", "--json").stdout)
        ids.append(listing[-1]["id"])
    return home, work, ids


def test_run_is_recorded_without_tracking_code(local_runs: tuple[Path, Path, list[str]]) -> None:
    home, _, ids = local_runs
    out = mt(home, "runs", "show", ids[0], "--json")
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)
    assert rec["name"] == "train" and rec["state"] == "done" and rec["script"] == "train.py"
    assert rec["args"] == ["--lr", "0.1"]
    # argparse defaults the command line never showed, and mesh.config's declared values
    assert rec["params"] == {"lr": 0.1, "steps": 6, "optimizer": "sgd", "layers": 2, "width": 16}
    assert rec["mesh"]["nodes"] == ["node1", "node2"] and rec["mesh"]["mlx"]
    assert len(rec["bundle_hash"]) == 64 and rec["ended"] >= rec["started"] > 0
    assert rec["final"]["loss"] == pytest.approx(0.1 / 6) and rec["final"]["val_loss"] == pytest.approx(0.05)
    shown = mt(home, "runs", "show", ids[0])
    assert shown.returncode == 0 and "loss by step (0…5, 6 points)" in shown.stdout, shown.stdout


def test_every_node_of_the_job_keeps_a_copy(local_runs: tuple[Path, Path, list[str]]) -> None:
    home, _, ids = local_runs
    main, replica = RunStore(home / "runs.sqlite"), RunStore(home / "nodes" / "node2" / "runs.sqlite")
    for run_id in ids:
        assert replica.get(run_id).state == "done"
        assert [r.to_list() for r in replica.metrics(run_id)] == [r.to_list() for r in main.metrics(run_id)]


def test_list_filters_and_compare(local_runs: tuple[Path, Path, list[str]]) -> None:
    home, _, ids = local_runs
    out = mt(home, "runs", "--metric", "val_loss<0.02", "--json")
    assert [r["id"] for r in json.loads(out.stdout)] == [ids[1]]
    assert json.loads(mt(home, "runs", "--name", "nope*", "--json").stdout) == []
    cmp_ = mt(home, "runs", "compare", *ids)
    assert cmp_.returncode == 0, cmp_.stderr
    assert "param.lr" in cmp_.stdout and "param.steps" not in cmp_.stdout  # only what differs
    assert "val_loss" in cmp_.stdout


def test_export_csv_and_jsonl(local_runs: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    home, _, ids = local_runs
    out = mt(home, "runs", "export", ids[0], "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    losses = [r for r in rows if r["metric"] == "loss"]
    assert len(losses) == 12 and {r["member"] for r in losses} == {"node1", "node2"}  # 6 steps x 2 workers
    target = tmp_path / "m.jsonl"
    out = mt(home, "runs", "export", ids[0], "--format", "jsonl", "-o", str(target))
    assert out.returncode == 0 and "wrote" in out.stderr
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(lines) == len(rows) and lines[0].keys() == {"run", "step", "time", "member", "metric", "value"}


def test_export_tensorboard_reads_back(local_runs: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    pytest.importorskip("tensorboardX")
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    home, _, ids = local_runs
    logdir = tmp_path / "tb"
    out = mt(home, "runs", "export", ids[0], "--format", "tensorboard", "-o", str(logdir))
    assert out.returncode == 0, out.stderr
    acc = accumulator.EventAccumulator(str(logdir))
    acc.Reload()
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == list(range(6))
    assert loss[-1].value == pytest.approx(0.1 / 6, rel=1e-5)


def test_bad_input_is_one_line(local_runs: tuple[Path, Path, list[str]]) -> None:
    home, _, ids = local_runs
    for args in (
        ("runs", "show", "nope"),
        ("runs", "--metric", "loss<<1"),
        ("runs", "export", ids[0], "--format", "parquet"),
        ("runs", "show", ids[0], "--metric", "perplexity"),
        ("runs", "compare", ids[0]),
    ):
        out = mt(home, *args)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, args


def test_rm(local_runs: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    home, work, _ = local_runs
    out = mt(home, "run", "--local", "1", "train.py", "--steps", "2", cwd=work)
    assert out.returncode == 0, out.stderr
    run_id = json.loads(mt(home, "runs", "--json").stdout)[-1]["id"]
    assert mt(home, "runs", "rm", run_id).returncode == 0
    assert run_id not in mt(home, "runs", "--json").stdout


# ----------------------------------------------------------------------------- real agents


def test_record_survives_the_loss_of_the_node_that_ran_it(tmp_path: Path) -> None:
    """The coordinator pushes the record to the job's other node; kill the coordinator, read it there.
    A job on the coordinator alone is pushed to another agent too."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text(SCRIPT)
    a = AgentProcess(tmp_path / "a", "a")
    b = AgentProcess(tmp_path / "b", "b", token=a.token)
    try:
        wait_for(lambda: alive_names(a.home) == {"a", "b"})
        both = cli(a.home, "run", "--nodes", "2", str(work / "train.py"), "--lr", "0.3")
        assert both.returncode == 0, both.stderr
        alone = cli(a.home, "run", "--nodes", "a", str(work / "train.py"), "--lr", "0.4")
        assert alone.returncode == 0, alone.stderr
        on_a = json.loads(cli(a.home, "runs", "--json").stdout)
        assert len(on_a) == 2
        a.proc.kill()  # the node that coordinated (and ran) both jobs is gone
        a.proc.wait(10)
        on_b = json.loads(cli(b.home, "runs", "--json").stdout)
        assert [r["id"] for r in on_b] == [r["id"] for r in on_a]
        for mine, theirs in zip(on_a, on_b, strict=True):
            assert theirs["state"] == "done" and theirs["params"] == mine["params"]
            assert theirs["final"] == mine["final"]
        assert on_b[0]["mesh"]["nodes"] == ["a", "b"] and on_b[1]["mesh"]["nodes"] == ["a"]
    finally:
        b.stop()
        a.stop()
