"""The pure parts of notifications: targets, notices from job snapshots, messages, the retry schedule,
the config file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshtrain.errors import UserError
from meshtrain.notify import message
from meshtrain.notify.config import load_config
from meshtrain.notify.events import JobWatcher
from meshtrain.notify.retry import Outbox
from meshtrain.notify.targets import Target, parse_target, parse_targets


def test_targets_parse_and_hide_their_credentials() -> None:
    slack = parse_target("https://hooks.slack.com/services/T0/B0/SECRETPART")
    assert slack.kind == "slack" and "SECRETPART" not in slack.label
    assert parse_target("slack:https://chat.example.org/hooks/abc").kind == "slack"
    hook = parse_target("http://127.0.0.1:8080/hook?token=abc")
    assert hook == Target("webhook", "http://127.0.0.1:8080/hook?token=abc") and "abc" not in hook.label
    assert parse_target("mailto:a@example.com, b@example.org").addresses == ["a@example.com", "b@example.org"]
    cmd = parse_target("exec:notify-send 'meshtrain job'")
    assert cmd.kind == "command" and cmd.label == "command notify-send"
    for target in (slack, hook, cmd, parse_target("mailto:a@example.com")):
        assert parse_target(target.to_text()) == target
    assert len(parse_targets(["mailto:a@b.c", "mailto:a@b.c"])) == 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "bogus",
        "ftp://x/y",
        "https://",
        "mailto:",
        "mailto:nobody",
        "exec:",
        "exec:'unclosed",
        "http://h:99x/",
    ],
)
def test_bad_targets_are_one_line(text: str) -> None:
    with pytest.raises(UserError) as exc:
        parse_target(text)
    assert "\n" not in str(exc.value) and "--notify" in str(exc.value)


def snap(state: str = "running", **fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "job": "j1",
        "script": "mnist.py",
        "state": state,
        "nodes": ["a", "b"],
        "loss": 0.25,
        "test_accuracy": 0.97,
        "avg_samples_per_s": 1234.0,
        "elapsed_s": 75.0,
        "metrics": {"val_loss": 0.31, "bad": float("nan")},
        "events": [],
    }
    base.update(fields)
    return base


def test_watcher_one_notice_per_event() -> None:
    w = JobWatcher("j1", "mnist", "mnist.py")
    assert w.observe(snap(), 1.0) == []
    paused = w.observe(snap("paused", message="paused: 1 of the 2 nodes --min-nodes asks for"), 2.0)
    assert [n.kind for n in paused] == ["paused"] and "1 of the 2" in paused[0].summary
    assert w.observe(snap("paused"), 3.0) == []  # still paused: nothing new
    lost = {"t": 4.0, "kind": "lost", "node": "b", "detail": "its worker was killed (signal 9)"}
    joined = {"t": 4.5, "kind": "joined", "node": "c", "detail": "worker c"}
    first = w.observe(snap(events=[lost, joined]), 5.0)
    assert [(n.kind, n.node) for n in first] == [("node_lost", "b"), ("node_joined", "c")]
    assert w.observe(snap(events=[lost, joined]), 6.0) == []
    done = w.ended("done", None, None, snap("done"), 7.0)
    assert done is not None and done.kind == "finished" and done.duration_s == 75.0
    assert done.metrics == {
        "val_loss": 0.31,
        "loss": 0.25,
        "test_accuracy": 0.97,
        "avg_samples_per_s": 1234.0,
    }
    assert "j1" in done.summary and "mnist" in done.summary and "1m15s" in done.summary
    assert w.ended("done", None, None, None, 8.0) is None  # once


def test_failed_and_cancelled_notices() -> None:
    tb = 'Traceback (most recent call last):\n  File "x.py", line 3\nValueError: boom on rank 1\n\n'
    failed = JobWatcher("j2", "x", "x.py").ended(
        "failed", "b (rank 1) failed: ValueError", tb, snap("failed"), 1.0
    )
    assert failed is not None and failed.detail == "ValueError: boom on rank 1"
    cancelled = JobWatcher("j3", "x", "x.py").ended(
        "cancelled", "cancelled from the dashboard", None, {}, 1.0
    )
    assert cancelled is not None and cancelled.kind == "cancelled" and "dashboard" in cancelled.summary


def test_messages() -> None:
    notice = JobWatcher("j1", "mnist", "mnist.py").ended("done", None, None, snap("done"), 1_700_000_000.0)
    assert notice is not None
    assert message.slack_body(notice)["text"].startswith("meshtrain: job j1 (mnist) finished")
    body = json.loads(message.encoded(message.json_body(notice)))
    assert body["event"] == "finished" and body["job"] == "j1" and body["metrics"]["loss"] == 0.25
    mail = message.email(notice, "mesh@example.com", ["me@example.com"])
    assert (
        mail["Subject"] == "[meshtrain] job j1 (mnist) finished"
        and "test_accuracy 97.00%" in mail.get_content()
    )
    assert message.command_env(notice)["MESHTRAIN_EVENT"] == "finished"


def test_outbox_retries_on_its_schedule_then_gives_up() -> None:
    notice = JobWatcher("j1", "n", "n.py").ended("done", None, None, snap("done"), 0.0)
    assert notice is not None
    box = Outbox(delays=(1.0, 5.0))
    box.add(Target("webhook", "http://x/"), notice, now=10.0)
    assert box.next_due() == 10.0
    (d,) = box.due(10.0)
    assert box.due(10.0) == [] and box.pending == 1  # in flight, not due twice
    assert box.failed(d, 10.5).retry_in == 1.0
    assert box.due(11.0) == [] and box.due(11.5) == [d]
    assert box.failed(d, 11.6).retry_in == 5.0
    assert box.due(16.0) == [] and box.due(16.6) == [d] and d.attempts == 3
    assert box.failed(d, 17.0).retry_in is None and box.given_up == 1 and box.pending == 0
    box.add(Target("webhook", "http://y/"), notice, now=20.0)
    (e,) = box.due(20.0)
    box.sent_ok(e)
    assert box.sent == 1 and box.pending == 0 and box.next_due() is None


def test_outbox_is_bounded() -> None:
    notice = JobWatcher("j", "n", "n.py").ended("done", None, None, {}, 0.0)
    assert notice is not None
    box = Outbox(max_pending=2)
    assert all(box.add(Target("webhook", f"http://h/{i}"), notice, 0.0) for i in range(2))
    assert box.add(Target("webhook", "http://h/3"), notice, 0.0) is None and box.dropped == 1


def test_config_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "notify.ini"
    assert load_config({}, path).targets == ()  # no file: nothing configured
    path.write_text(
        "[notify]\ntargets = mailto:me@example.com\n  http://127.0.0.1:9/hook\n"
        "[smtp]\nhost = mail.example.com\nstarttls = yes\nuser = me\npassword = pw\n"
    )
    config = load_config({"MESHTRAIN_SMTP_PASSWORD": "from-env"}, path)
    assert [t.kind for t in config.targets] == ["mailto", "webhook"]
    assert config.smtp.port == 587 and config.smtp.starttls and config.smtp.password == "from-env"
    assert "from-env" not in repr(config.smtp)
    path.write_text("[smtp]\nport = many\n")
    with pytest.raises(UserError, match="port"):
        load_config({}, path)
    path.write_text("[notify]\ntargets = nonsense\n")
    with pytest.raises(UserError, match="notify.ini"):
        load_config({}, path)
