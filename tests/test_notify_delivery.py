"""Notifications delivered for real: an aiosmtpd SMTP server, an aiohttp webhook receiver, a local
command, and a target that is down (retried, logged in one line, delaying nothing else)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import time
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest

from meshtrain.notify.config import NotifyConfig, SmtpSettings
from meshtrain.notify.deliver import Notifier
from meshtrain.notify.events import JobWatcher, Notice
from meshtrain.notify.retry import Outbox
from meshtrain.notify.targets import parse_target

aiohttp_web = pytest.importorskip("aiohttp.web")
aiosmtpd_controller = pytest.importorskip("aiosmtpd.controller")


def finished() -> Notice:
    snap = {
        "job": "j42",
        "state": "done",
        "loss": 0.125,
        "test_accuracy": 0.98,
        "elapsed_s": 61.0,
        "nodes": ["a"],
    }
    notice = JobWatcher("j42", "mnist", "mnist.py").ended("done", None, None, snap, time.time())
    assert notice is not None
    return notice


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        self.messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content)))
        return "250 OK"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def receiver(status: int = 200) -> tuple[Any, list[dict[str, Any]], int]:
    got: list[dict[str, Any]] = []

    async def hook(request: Any) -> Any:
        got.append(await request.json())
        return aiohttp_web.Response(status=status, text="ok")

    app = aiohttp_web.Application()
    app.router.add_post("/hook", hook)
    runner = aiohttp_web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await aiohttp_web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, got, port


async def until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not delivered in time"
        await asyncio.sleep(0.02)


def test_every_kind_of_target_gets_exactly_one_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mailbox = Mailbox()
    smtp = aiosmtpd_controller.Controller(mailbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    out = tmp_path / "cmd.json"
    script = tmp_path / "cmd.py"
    script.write_text(
        "import json, os, sys\n"
        f"open({str(out)!r}, 'a').write(json.dumps({{'stdin': json.load(sys.stdin), "
        "'event': os.environ['MESHTRAIN_EVENT'], 'job': os.environ['MESHTRAIN_JOB']}) + '\\n')\n"
    )

    async def go() -> None:
        runner, got, port = await receiver()
        slack_runner, slack_got, slack_port = await receiver()
        config = NotifyConfig(smtp=SmtpSettings(host="127.0.0.1", port=smtp.port, sender="mesh@example.com"))
        notifier = Notifier(config)
        targets = [
            parse_target(f"http://127.0.0.1:{port}/hook"),
            parse_target(f"slack:http://127.0.0.1:{slack_port}/hook"),
            parse_target("mailto:me@example.com,you@example.com"),
            parse_target(f"exec:{sys.executable} {script}"),
        ]
        start = time.monotonic()
        notifier.notify(targets, finished())
        assert time.monotonic() - start < 0.05  # enqueued, not sent, by the caller
        await until(lambda: notifier.outbox.sent == 4, 20)
        await asyncio.sleep(0.3)  # nothing more arrives
        assert len(got) == 1 and got[0]["event"] == "finished" and got[0]["job"] == "j42"
        assert (
            got[0]["name"] == "mnist" and got[0]["metrics"]["loss"] == 0.125 and got[0]["duration_s"] == 61.0
        )
        assert len(slack_got) == 1 and list(slack_got[0]) == ["text"]
        assert slack_got[0]["text"].startswith("meshtrain: job j42 (mnist) finished after 1m01s")
        await notifier.close()
        await runner.cleanup()
        await slack_runner.cleanup()

    try:
        asyncio.run(go())
    finally:
        smtp.stop()
    assert len(mailbox.messages) == 1
    rcpt, mail = mailbox.messages[0]
    assert rcpt == ["me@example.com", "you@example.com"]
    assert mail["Subject"] == "[meshtrain] job j42 (mnist) finished"
    assert "loss 0.125" in mail.get_payload()
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    ran = json.loads(lines[0])
    assert (
        ran["event"] == "finished"
        and ran["job"] == "j42"
        and ran["stdin"]["metrics"]["test_accuracy"] == 0.98
    )


def test_a_target_that_is_down_is_retried_logged_and_delays_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="meshtrain.notify")

    async def go() -> None:
        runner, got, port = await receiver()
        dead = free_port()  # nothing listens there
        broken_runner, broken_got, broken_port = await receiver(status=500)
        notifier = Notifier(outbox=Outbox(delays=(0.2, 0.2)))
        notifier.notify(
            [
                parse_target(f"http://127.0.0.1:{dead}/hook"),
                parse_target(f"http://127.0.0.1:{broken_port}/hook"),
                parse_target(f"http://127.0.0.1:{port}/hook"),
                parse_target("exec:/nonexistent/notifier"),
            ],
            finished(),
        )
        t0 = time.monotonic()
        await until(lambda: len(got) == 1, 5)
        assert time.monotonic() - t0 < 2.0  # the live target is not held up by the dead ones
        await until(lambda: notifier.outbox.pending == 0, 10)
        assert notifier.outbox.sent == 1 and notifier.outbox.given_up == 3
        assert len(broken_got) == 3  # the first attempt and two retries
        await notifier.close()
        await runner.cleanup()
        await broken_runner.cleanup()

    asyncio.run(go())
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 9 and all("\n" not in line for line in failures)
    assert any("HTTP 500" in line and "retrying in 0.2s" in line for line in failures)
    assert any("giving up after 3 attempts" in line for line in failures)
    assert any("cannot start" in line for line in failures)
