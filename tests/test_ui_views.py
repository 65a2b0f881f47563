"""The live views, rendered from snapshot dicts at 80 and 140 columns, and their plain-text forms."""

from __future__ import annotations

import asyncio
import io
import re
from typing import Any

import pytest
from rich.console import Console

from meshtrain.ui import (
    JobLog,
    JobView,
    LiveJob,
    LiveMesh,
    MeshLog,
    MeshView,
    preview,
    render_job_text,
    render_mesh_text,
    samples,
)
from meshtrain.ui import format as fmt
from meshtrain.ui.live import SCREEN_RESERVE, job_finished
from meshtrain.ui.plain import new_tail


def render(view: Any, width: int = 80) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), color_system="truecolor")
    console.print(view)
    return console.export_text()


def styled_cells(view: Any, width: int = 80) -> list[tuple[str, str]]:
    """(text, style) of every rendered segment, to check that colour carries meaning."""
    console = Console(width=width, file=io.StringIO(), color_system="truecolor")
    return [(seg.text, str(seg.style)) for seg in console.render(view) if seg.text.strip()]


def lines_of(text: str) -> list[str]:
    return text.rstrip("\n").split("\n")


# ---------------------------------------------------------------- mesh view


@pytest.mark.parametrize("width", [80, 140])
def test_mesh_view_shows_every_node_state_leader_and_events(width: int) -> None:
    out = render(MeshView(samples.mesh()), width)
    for name in ("mac1", "mac2", "linux-box", "old-laptop"):
        assert name in out
    for state in ("alive", "suspect", "dead"):
        assert state in out
    assert "10.77.0.3:7946" in out
    leader_row = next(line for line in lines_of(out) if "mac1" in line and "alive" in line)
    assert "★ mac1" in leader_row
    assert "mac2 (you)" in out
    assert "2 alive · 1 suspect · 1 dead" in out
    assert "leader ★ mac1" in out
    assert "suspicion timed out" in out  # an event detail
    assert "bad_tag 3" in out
    assert "job j7f3a" in out
    assert all(len(line) <= width for line in lines_of(out))


def test_mesh_view_wide_terminal_adds_platform_battery_cores() -> None:
    narrow, wide = render(MeshView(samples.mesh()), 80), render(MeshView(samples.mesh()), 140)
    assert "Darwin arm64" in wide and "Darwin arm64" not in narrow
    assert "battery" in wide and "64%" in wide
    assert "cores" in wide and "cores" not in narrow


def test_mesh_view_colours_mean_state() -> None:
    cells = styled_cells(MeshView(samples.mesh()))
    style_of = {text.strip(): style for text, style in cells}
    assert "green" in style_of["● alive"]
    assert "yellow" in style_of["◐ suspect"]
    assert "red" in style_of["✖ dead"]
    assert "magenta" in style_of["★"]


def test_empty_mesh_says_it_is_waiting() -> None:
    out = render(MeshView(samples.empty_mesh()))
    assert "no nodes yet" in out
    assert "leader none yet" in out
    assert "no events yet" in out


@pytest.mark.parametrize(
    "snapshot",
    [
        None,
        {},
        {"nodes": "garbage", "events": 3, "drops": []},
        {"nodes": [{"state": "alive"}, 5, {"name": "x", "load": "high"}]},
    ],
)
def test_mesh_view_survives_missing_and_malformed_fields(snapshot: Any) -> None:
    out = render(MeshView(snapshot))
    assert "meshtrain" in out


@pytest.mark.parametrize("height", [24, 40, 60])
def test_live_mesh_frame_keeps_its_height_as_events_arrive(height: int) -> None:
    few = samples.mesh()
    few["events"] = few["events"][:2]
    many = samples.mesh()
    many["events"] = many["events"] * 10
    heights = {len(lines_of(render(MeshView(snap, height=height)))) for snap in (few, many)}
    assert len(heights) == 1 and heights.pop() <= height
    assert len(lines_of(render(MeshView(samples.empty_mesh(), height=height)))) <= height
    with_note = render(MeshView(many, height=height, note="join from elsewhere: meshtrain join --seed H:1"))
    assert "--seed H:1" in with_note and len(lines_of(with_note)) <= height


def test_live_mesh_frame_fills_an_80x24_terminal() -> None:
    height = 24 - SCREEN_RESERVE
    assert len(lines_of(render(MeshView(samples.mesh(), height=height)))) == height


# ---------------------------------------------------------------- job view


@pytest.mark.parametrize("width", [80, 140])
def test_running_job_shows_progress_metrics_and_workers(width: int) -> None:
    out = render(JobView(samples.running_job()), width)
    assert "running" in out
    assert "epoch 2/3" in out and "step 270/469" in out
    assert re.search(r"━{5,}╸?─{5,}", out)  # a bar part done, part to go
    assert "53%" in out  # overall: (1 + 270/469) / 3
    assert "ETA 42s" in out and "elapsed 1:13" in out
    assert "loss 0.0812" in out
    assert "test accuracy 97.84%" in out
    assert "12,340 samples/s on 3 nodes" in out
    assert "ring 812 MB/s" in out
    for worker in ("mac1", "mac2", "linux-box"):
        assert worker in out
    assert "5,120" in out
    assert "[mac1] epoch 1/3" in out
    assert all(len(line) <= width for line in lines_of(out))


def test_failed_job_shows_its_one_line_error_in_red_and_no_eta() -> None:
    view = JobView(samples.failed_job())
    out = render(view)
    assert "failed" in out
    assert "error" in out and "ZeroDivisionError: division by zero" in out
    assert "ETA" not in out
    cells = styled_cells(view)
    assert any("ZeroDivisionError" in text and "red" in style for text, style in cells)


def test_a_long_failure_wraps_so_the_whole_explanation_shows() -> None:
    job = samples.failed_job()
    job["message"] = "[mac2] ValueError: " + "a long explanation " * 6 + "END-OF-MESSAGE"
    out = render(JobView(job, height=24))
    assert "END-OF-MESSAGE" in out
    assert len(lines_of(out)) == 24


def test_waiting_job_says_who_it_waits_for() -> None:
    out = render(JobView(samples.waiting_job()))
    assert "waiting for 3 nodes: have mac1, mac2" in out
    assert "— samples/s on 2 nodes" in out and "step" not in out.split("\n")[1]
    assert "on 0 nodes" not in render(JobView(dict(samples.waiting_job(), size=0)))
    assert "epoch —" in out
    assert "no workers yet" in out


def test_done_job_shows_full_bar_and_final_accuracy() -> None:
    out = render(JobView(samples.done_job()))
    assert "100%" in out and "98.12%" in out and "done" in out
    assert "ETA" not in out


@pytest.mark.parametrize(
    "snapshot",
    [
        None,
        {"job": "j1"},
        {
            "state": "running",
            "loss": None,
            "test_accuracy": "bad",
            "workers": [{"node": "a"}, "junk"],
            "epochs": 2,
            "steps_per_epoch": 0,
            "log": "not a list",
            "eta_s": float("nan"),
        },
    ],
)
def test_job_view_survives_missing_and_malformed_fields(snapshot: Any) -> None:
    out = render(JobView(snapshot))
    assert "meshtrain run" in out
    assert fmt.MISSING in out


def test_global_step_counter_is_shown_inside_the_epoch() -> None:
    job = samples.running_job()
    job.update(step=469 + 100)
    assert "step 100/469" in render(JobView(job))


@pytest.mark.parametrize("height", [23, 50])
def test_live_job_frame_has_one_height_whatever_the_content(height: int) -> None:
    long_log = samples.running_job()
    long_log["log"] = [f"[mac1] line {i}" for i in range(40)]
    no_events = dict(samples.running_job(), events=[], log=[])
    same_workers = (samples.running_job(), samples.failed_job(), long_log, no_events)
    heights = {len(lines_of(render(JobView(snap, height=height)))) for snap in same_workers}
    assert len(heights) == 1 and heights.pop() <= height
    many_workers = samples.running_job()
    many_workers["workers"] = [
        dict(w, node=f"n{i}", rank=i) for i, w in enumerate(many_workers["workers"] * 5)
    ]
    for snapshot in (samples.waiting_job(), many_workers):
        assert len(lines_of(render(JobView(snapshot, height=height)))) <= height
    assert "more" in render(JobView(many_workers, height=height))


def test_live_job_frame_fills_an_80x24_terminal() -> None:
    height = 24 - SCREEN_RESERVE
    assert len(lines_of(render(JobView(samples.running_job(), height=height)))) == height


def test_sparkline_comes_from_history_kept_by_the_live_helper() -> None:
    job = samples.running_job()
    del job["loss_history"]
    assert "loss 0.0812   test" in render(JobView(job))
    out = render(JobView(job, loss_history=[1.0, 0.5, 0.25, 0.1]))
    assert "█" in out.split("loss 0.0812")[1].split("test")[0]


# ---------------------------------------------------------------- plain text


def test_plain_mesh_text_is_escape_free_and_complete() -> None:
    out = render_mesh_text(samples.mesh())
    assert "\x1b" not in out
    assert "leader mac1" in out and "*mac1" in out and "mac2 (you)" in out
    assert "suspect" in out and "dead" in out and "Darwin arm64 Metal" in out and "64%" in out
    assert "events:" in out and "dead    old-laptop" in out
    assert render_mesh_text(None).startswith("meshtrain mesh: no nodes yet")


def test_plain_job_text_is_escape_free_and_complete() -> None:
    out = render_job_text(samples.failed_job())
    assert "\x1b" not in out
    assert "error: [mac2] ZeroDivisionError" in out
    assert "epoch 2/3 [" in out and "step 270/469" in out
    assert "test accuracy 97.84%" in out and "linux-box" in out
    assert render_job_text({}).startswith("job ?")


def test_job_log_writes_each_fact_once() -> None:
    log = JobLog()
    waiting = samples.waiting_job()
    running = samples.running_job()
    running.update(epoch=1, step=10, test_accuracy=None, log=["[mac1] loaded MNIST"], events=[])
    evaluated = dict(
        running, epoch=2, step=0, test_accuracy=0.9612, log=["[mac1] loaded MNIST", "[mac1] epoch 1/3"]
    )
    done = dict(samples.done_job(), log=evaluated["log"])
    out: list[str] = []
    for snap in (waiting, waiting, running, running, evaluated, evaluated, done, done):
        out += log.feed(snap)
    text = "\n".join(out)
    assert text.count("note: waiting for 3 nodes") == 1
    assert text.count("running on 3 nodes") == 1
    assert text.count("[mac1] loaded MNIST") == 1 and text.count("[mac1] epoch 1/3") == 1
    assert text.count("epoch 1/3 started") == 1 and text.count("epoch 2/3 started") == 1
    assert "test accuracy 96.12%" in text and "test accuracy 98.12%" in text
    assert out[-1] == "job j7f3a done in 1:58: test accuracy 98.12%, loss 0.052"
    assert "\x1b" not in text


def test_job_log_failure_ends_with_the_message() -> None:
    log = JobLog()
    log.feed(samples.running_job())
    out = log.feed(samples.failed_job())
    assert (
        out[-1]
        == "job j7f3a failed after 1:13: [mac2] ZeroDivisionError: division by zero (examples/mnist.py:88)"
    )


def test_mesh_log_summary_once_then_one_line_per_new_event() -> None:
    log = MeshLog()
    mesh = samples.mesh()
    first = log.feed(mesh)
    assert len(first) == 1 and "leader mac1" in first[0]
    assert log.feed(mesh) == []
    mesh["events"] = mesh["events"] + [
        {"t": samples.T0 + 120, "kind": "alive", "node": "linux-box", "detail": "refuted"}
    ]
    mesh["jobs"][0]["state"] = "done"
    out = log.feed(mesh)
    assert len(out) == 2 and "alive   linux-box  refuted" in out[0] and "done" in out[1]


def test_new_tail_of_a_sliding_window() -> None:
    assert new_tail(["a", "b", "c"], ["b", "c", "d", "e"]) == ["d", "e"]
    assert new_tail([], ["a"]) == ["a"]
    assert new_tail(["a", "b"], ["a", "b"]) == []
    assert new_tail(["x"], ["y", "z"]) == ["y", "z"]


# ---------------------------------------------------------------- formats


def test_formats() -> None:
    assert fmt.duration(42) == "42s" and fmt.duration(187) == "3:07" and fmt.duration(3723) == "1:02:03"
    assert fmt.duration(None) == fmt.duration(-1) == fmt.MISSING
    assert fmt.size_gb(16) == "16 GB" and fmt.size_gb(7.5) == "7.5 GB" and fmt.size_gb(0.5) == "512 MB"
    assert (
        fmt.mb_per_s(812.5) == "812 MB/s"
        and fmt.mb_per_s(1250) == "1.2 GB/s"
        and fmt.mb_per_s(3.44) == "3.4 MB/s"
    )
    assert fmt.count(12340) == "12,340" and fmt.count(2_500_000) == "2.5M"
    assert fmt.accuracy(0.9784) == "97.84%" == fmt.accuracy(97.84) and fmt.loss(0.081234) == "0.08123"
    assert (
        fmt.sparkline([3, 2, 1]) == "█▅▁"
        and fmt.sparkline([9, 9, 5, 5, 1, 1], 3) == "█▅▁"
        and fmt.sparkline([]) == ""
        and fmt.sparkline([1, 1]) == "▁▁"
    )
    assert fmt.ascii_bar(0.5, 4) == "[##--]" and fmt.bar(2.0, 3) == "███"


# ---------------------------------------------------------------- live helpers


def test_live_job_in_a_pipe_writes_plain_lines() -> None:
    out = io.StringIO()
    with LiveJob(file=out) as view:
        assert view.plain
        view.update(samples.running_job())
        view.update(samples.done_job())
    text = out.getvalue()
    assert "\x1b" not in text
    assert "running on 3 nodes" in text and text.rstrip().endswith("test accuracy 98.12%, loss 0.052")


def test_live_job_on_a_terminal_leaves_the_final_frame() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80, height=24, color_system="truecolor")
    job = samples.running_job()
    del job["loss_history"]
    with LiveJob(console=console, refresh_per_second=20) as view:
        assert not view.plain
        for step, loss in ((10, 0.9), (20, 0.5), (30, 0.3)):
            view.update(dict(job, step=step, loss=loss))
        view.update(samples.done_job())
    text = out.getvalue()
    assert "\x1b[" in text  # drawn with colour and cursor control
    assert "98.12%" in text and "100%" in text
    assert view.loss_history[:3] == [0.9, 0.5, 0.3]


def test_live_mesh_print_once_plain_and_terminal() -> None:
    pipe = io.StringIO()
    LiveMesh(file=pipe).print_once(samples.mesh())
    assert pipe.getvalue().startswith("meshtrain mesh v0.1.0") and "\x1b" not in pipe.getvalue()
    tty = io.StringIO()
    LiveMesh(console=Console(file=tty, force_terminal=True, width=100)).print_once(samples.mesh())
    assert "╭" in tty.getvalue() and "linux-box" in tty.getvalue()


def test_follow_polls_until_the_job_finishes() -> None:
    frames = iter(
        [samples.waiting_job(), None, samples.running_job(), samples.done_job(), samples.running_job()]
    )

    async def fetch() -> dict[str, Any] | None:
        return next(frames)

    out = io.StringIO()
    last = asyncio.run(LiveJob(file=out).follow(fetch, interval=0.001, done=job_finished))
    assert last is not None and last["state"] == "done"
    assert "note: waiting for 3 nodes" in out.getvalue() and "done in 1:58" in out.getvalue()


def test_preview_renders_every_view_labelled(capsys: pytest.CaptureFixture[str]) -> None:
    assert preview.main(["--width", "80"]) == 0
    out = capsys.readouterr().out
    assert out.count("PREVIEW") == 6 and "ZeroDivisionError" in out and "old-laptop" in out
    assert preview.main(["--plain", "--width", "80"]) == 0
    assert "[" in capsys.readouterr().out


def test_fraction_bar_reads_without_colour() -> None:
    from meshtrain.ui.job_view import FractionBar

    assert render(FractionBar(0.5, "green"), 20).strip() == "━" * 10 + "─" * 10
    assert render(FractionBar(0.525, "green"), 20).strip() == "━" * 10 + "╸" + "─" * 9
    assert render(FractionBar(1.7, "green"), 8).strip() == "━" * 8
    assert render(FractionBar(0.0, "green"), 8).strip() == "─" * 8


def test_live_mesh_note_stays_in_the_frame_or_is_logged_once() -> None:
    note = "other machines: meshtrain join --seed 10.0.0.5:7946"
    pipe = io.StringIO()
    with LiveMesh(file=pipe, note=note) as view:
        view.update(samples.mesh())
        view.update(samples.mesh())
    assert pipe.getvalue().count(note) == 1 and "leader mac1" in pipe.getvalue()
    tty = io.StringIO()
    with LiveMesh(console=Console(file=tty, force_terminal=True, width=80, height=24), note=note) as view:
        view.update(samples.mesh())
    assert note in tty.getvalue() and "old-laptop" in tty.getvalue()


def test_update_copies_the_snapshot() -> None:
    view = LiveJob(file=io.StringIO())
    job = samples.running_job()
    view.update(job)
    job["workers"].clear()
    assert view.snapshot is not None and len(view.snapshot["workers"]) == 3


def test_quiet_input_turns_echo_off_and_restores_it() -> None:
    import os
    import pty
    import termios

    from meshtrain.ui.terminal import quiet_input

    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "r", closefd=False) as stream:
            before = termios.tcgetattr(slave)
            assert before[3] & termios.ECHO
            with quiet_input(stream) as changed:
                assert changed
                assert not termios.tcgetattr(slave)[3] & termios.ECHO
            assert termios.tcgetattr(slave) == before
        with quiet_input(io.StringIO()) as changed:  # not a terminal: nothing to do
            assert not changed
    finally:
        os.close(master)
        os.close(slave)


def test_narrow_terminal_keeps_state_address_and_load() -> None:
    out = render(MeshView(samples.mesh()), 60)
    assert all(len(line) <= 60 for line in lines_of(out))
    assert "10.77.0.3:7946" in out and "✖ dead" in out and "91%" in out
    job = render(JobView(samples.running_job()), 60)
    assert all(len(line) <= 60 for line in lines_of(job)) and "5,120" in job


def test_the_up_column_reads_the_incarnation_as_a_start_time() -> None:
    from meshtrain.ui.mesh_view import uptime_cell

    started_ms = 1_764_000_000_000  # a 13-digit incarnation: the agent's start in ms
    assert uptime_cell(started_ms, now=started_ms / 1000 + 125) == uptime_cell(
        started_ms + 3, now=1_764_000_125.003
    )
    assert "13" not in uptime_cell(started_ms, now=started_ms / 1000 + 125)
    assert uptime_cell(7) == "7"
