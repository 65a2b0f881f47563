"""The thin asyncio shell that sends notices: one background task over the pure outbox.

`Notifier.notify` only enqueues (it never awaits, so a job's coordinator
cannot be held up by a slow or dead target); the task sends what is due
concurrently -- HTTP and SMTP through the standard library in threads (no
dependency for the core install), commands as subprocesses -- and logs each
failure in one line with what happens next. The clock is injectable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import smtplib
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable

from meshtrain import __version__
from meshtrain.notify import message
from meshtrain.notify.config import NotifyConfig
from meshtrain.notify.events import Notice
from meshtrain.notify.retry import Delivery, Outbox, Outcome
from meshtrain.notify.targets import Target

log = logging.getLogger("meshtrain.notify")

HTTP_TIMEOUT_S = 10.0
SMTP_TIMEOUT_S = 20.0
COMMAND_TIMEOUT_S = 30.0


class DeliveryFailed(Exception):
    """One attempt did not get through; the message is the one-line reason."""


def _post_json(url: str, body: bytes) -> None:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": f"meshtrain/{__version__}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:  # noqa: S310 - user's URL
            response.read(4096)
    except urllib.error.HTTPError as exc:
        raise DeliveryFailed(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeliveryFailed(str(reason) or exc.__class__.__name__) from None


def _send_mail(config: NotifyConfig, notice: Notice, to: list[str]) -> None:
    smtp = config.smtp
    msg = message.email(notice, smtp.sender, to)
    try:
        with smtplib.SMTP(smtp.host, smtp.port, timeout=SMTP_TIMEOUT_S) as client:
            if smtp.starttls:
                client.starttls(context=ssl.create_default_context())
            if smtp.user and smtp.password:
                client.login(smtp.user, smtp.password)
            client.send_message(msg)
    except (smtplib.SMTPException, OSError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise DeliveryFailed(f"SMTP {smtp.host}:{smtp.port}: {text}") from None


async def _run_command(command: str, notice: Notice) -> None:
    body = message.encoded(message.json_body(notice))
    try:
        proc = await asyncio.create_subprocess_exec(
            *shlex.split(command),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **message.command_env(notice)},
        )
    except OSError as exc:
        raise DeliveryFailed(f"cannot start: {exc.strerror or exc}") from None
    try:
        _, err = await asyncio.wait_for(proc.communicate(body), COMMAND_TIMEOUT_S)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise DeliveryFailed(f"still running after {COMMAND_TIMEOUT_S:.0f}s; killed") from None
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
        raise DeliveryFailed(f"exit code {proc.returncode}" + (f": {tail[0]}" if tail else ""))


class Notifier:
    """Sends notices to targets in the background; `close()` waits (bounded) for what is pending."""

    def __init__(
        self,
        config: NotifyConfig | None = None,
        outbox: Outbox | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or NotifyConfig()
        self.outbox = outbox or Outbox()
        self.clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def notify(
        self,
        targets: Iterable[Target],
        notice: Notice,
        on_done: Callable[[Delivery, bool], None] | None = None,
    ) -> None:
        """Queue `notice` for each target; returns at once. `on_done(delivery, sent)` once per target."""
        for target in targets:
            if self.outbox.add(target, notice, self.clock(), on_done) is None:
                log.warning("notification dropped (outbox full): %s to %s", notice.kind, target.label)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            for delivery in self.outbox.due(self.clock()):
                task = asyncio.create_task(self._attempt(delivery))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
            if not self.outbox.pending:
                return
            nxt = self.outbox.next_due()
            timeout = None if nxt is None else max(0.0, nxt - self.clock())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _attempt(self, delivery: Delivery) -> None:
        outcome: Outcome | None = None
        try:
            await self.send(delivery.target, delivery.notice)
        except DeliveryFailed as exc:
            outcome = self.outbox.failed(delivery, self.clock())
            then = (
                f"retrying in {outcome.retry_in:g}s"
                if outcome.retry_in is not None
                else f"giving up after {delivery.attempts} attempts"
            )
            log.warning(
                "notification %s of job %s to %s failed (attempt %d/%d): %s; %s",
                delivery.notice.kind,
                delivery.notice.job,
                delivery.target.label,
                delivery.attempts,
                self.outbox.attempts_max,
                exc,
                then,
            )
        except Exception as exc:  # noqa: BLE001 - a bug here must not end the other deliveries
            outcome = self.outbox.failed(delivery, self.clock())
            log.warning("notification to %s failed: %r", delivery.target.label, exc)
        else:
            self.outbox.sent_ok(delivery)
        if delivery.on_done is not None and (outcome is None or outcome.retry_in is None):
            try:
                delivery.on_done(delivery, outcome is None)
            except Exception as exc:  # noqa: BLE001 - bookkeeping must not stop the sending
                log.warning("notification bookkeeping failed: %r", exc)
        self._wake.set()

    async def send(self, target: Target, notice: Notice) -> None:
        """One attempt; DeliveryFailed with the reason."""
        if target.kind == "slack":
            await asyncio.to_thread(_post_json, target.value, message.encoded(message.slack_body(notice)))
        elif target.kind == "webhook":
            await asyncio.to_thread(_post_json, target.value, message.encoded(message.json_body(notice)))
        elif target.kind == "mailto":
            await asyncio.to_thread(_send_mail, self.config, notice, target.addresses)
        elif target.kind == "command":
            await _run_command(target.value, notice)
        else:
            raise DeliveryFailed(f"unknown target kind {target.kind!r}")

    async def close(self, timeout: float = 5.0) -> None:
        """Give pending deliveries up to `timeout` seconds, then stop."""
        deadline = self.clock() + timeout
        while self.outbox.pending and self.clock() < deadline:
            await asyncio.sleep(0.05)
        if self._task is not None:
            self._task.cancel()
        for task in list(self._sending):
            task.cancel()


def dumps(notice: Notice) -> str:
    return json.dumps(message.json_body(notice))
