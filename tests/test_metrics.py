"""Any metric (issue 18): what `mesh.report` accepts, how the job snapshot folds it, what the views show."""

from __future__ import annotations

import io
import json
import math

import mlx.core as mx
import numpy as np
import pytest
from rich.console import Console

import meshtrain
from meshtrain.agent.jobstate import JobState
from meshtrain.errors import UserError
from meshtrain.metrics import MAX_NAMES, check, extras
from meshtrain.ui import samples
from meshtrain.ui.job_view import JobView
from meshtrain.ui.plain import JobLog, final_line, job_line, render_job_text


def test_scalars_of_every_kind_become_plain_numbers() -> None:
    got = check(
        {"loss": mx.array(1.5), "lr": np.float32(3e-4), "tokens": np.int64(4096), "ok": True, "step": 3.0}
    )
    assert got == {"loss": 1.5, "lr": pytest.approx(3e-4), "tokens": 4096, "ok": 1, "step": 3}
    assert type(got["tokens"]) is int and type(got["step"]) is int and type(got["loss"]) is float
    assert check({"val": mx.array([2.0])}) == {"val": 2.0}


@pytest.mark.parametrize(
    ("metrics", "needle"),
    [
        ({"val_loss": [1.0, 2.0]}, "a list is not a scalar"),
        ({"grads": mx.zeros((3, 2))}, "an array of shape (3, 2) is not a scalar"),
        ({"name": "run-7"}, "a str is not a scalar"),
        ({"share": 0.5}, "'share' is reported by meshtrain itself"),
        ({"__config__": 1}, "reported by meshtrain itself"),
        ({"step": 2.5}, "step counts, so it is a whole number"),
    ],
)
def test_a_bad_metric_is_one_clear_line(metrics: dict[str, object], needle: str) -> None:
    with pytest.raises(UserError) as excinfo:
        check(metrics)
    assert needle in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_world_size_one_checks_too_and_names_are_bounded() -> None:
    mesh = meshtrain.Mesh()
    mesh.report(val_loss=1.0, perplexity=mx.array(2.7))
    with pytest.raises(UserError, match="not a scalar"):
        mesh.report(val_loss=np.zeros(4))
    seen: set[str] = set()
    check({f"m{i}": 1.0 for i in range(MAX_NAMES)}, seen)
    check({"m0": 2.0, "loss": 1.0}, seen)  # known names and first-class ones are free
    with pytest.raises(UserError, match=f"more than {MAX_NAMES} metric names"):
        check({"one_more": 1.0}, seen)


def test_extras_keep_every_named_number_and_nothing_of_meshtrains() -> None:
    report = {"epoch": 0, "loss": 1.0, "val_loss": 2.0, "lr": 1e-3, "share": 0.5, "__env__": {"mlx": "0.3"}}
    assert extras({**report, "bad": math.nan}) == {"val_loss": 2.0, "lr": 1e-3, "bad": None}


def job_with_metrics() -> JobState:
    job = JobState(job="j1", script="shakespeare.py", started=0.0, state="running")
    job.assign(["mac1", "mac2"])
    for step in range(3):
        for rank in (0, 1):
            job.report(
                rank,
                step,
                {
                    "epoch": 0,
                    "epochs": 1,
                    "step": step,
                    "steps_per_epoch": 10,
                    "loss": 3.0 - step,
                    "samples": 16,
                    "lr": 1e-3 * (step + 1),
                    "tokens_per_s": 1000.0 + rank,
                },
            )
    job.report(1, 3.5, {"rank_only": 7.0, "step": 2})  # reported by rank 1 alone: still shown
    job.report(0, 4.0, {"epoch": 0, "epochs": 1, "val_loss": 2.5, "perplexity": math.exp(2.5)})
    return job


def test_job_state_folds_named_metrics_into_snapshot_history_and_summary() -> None:
    job = job_with_metrics()
    snap = json.loads(json.dumps(job.snapshot(5.0)))  # what `status --json` and the views get
    assert snap["metrics"] == {
        "lr": pytest.approx(3e-3),
        "tokens_per_s": 1000.0,
        "rank_only": 7.0,
        "val_loss": 2.5,
        "perplexity": pytest.approx(math.exp(2.5)),
    }
    assert snap["metric_history"]["lr"] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert snap["evaluations"] == 1 and snap["evaluated"] == {
        "val_loss": 2.5,
        "perplexity": pytest.approx(12.18, 0.01),
    }
    assert snap["loss"] == 1.0 and snap["loss_history"] == [3.0, 2.0, 1.0]  # first-class loss as before
    assert job.summary()["metrics"]["val_loss"] == 2.5


def test_views_show_every_metric() -> None:
    snap = job_with_metrics().snapshot(5.0)
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(JobView(snap))
    frame = out.getvalue()
    assert "val_loss 2.5" in frame and "perplexity 12.18" in frame and "lr 0.003" in frame
    text = render_job_text(snap)
    assert "metrics: lr 0.003 | tokens_per_s 1,000 | rank_only 7 | val_loss 2.5 | perplexity 12.18" in text
    assert "val_loss 2.5" in job_line(snap)
    log = JobLog()
    lines = log.feed(snap)
    assert any(line.startswith("evaluated (epoch 1/1): val_loss 2.5 | perplexity 12.18") for line in lines), (
        lines
    )
    assert not [line for line in log.feed(snap) if "evaluated" in line]  # once per evaluation
    snap.update(state="done")
    assert final_line(snap).endswith(
        "loss 1, lr 0.003, tokens_per_s 1,000, rank_only 7, val_loss 2.5, perplexity 12.18"
    )


@pytest.mark.parametrize("height", [23, 40])
def test_live_frame_keeps_its_height_with_a_metrics_row(height: int) -> None:
    plain, named = samples.running_job(), samples.running_job()
    named["metrics"] = {"val_loss": 1.52, "perplexity": 4.57, "lr": 3e-4}

    def lines(snapshot: dict[str, object]) -> int:
        out = io.StringIO()
        Console(file=out, width=80, height=height, color_system=None).print(JobView(snapshot, height=height))
        return len(out.getvalue().splitlines())

    assert lines(plain) == lines(named) <= height
