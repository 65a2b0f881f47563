"""The agent's one call per job: `watch_job(runner, sink)` -> (sink to use, call with the result).

The job's targets are its `--notify` options, else the config file's
defaults (read when the job starts, on the node that coordinates it). The
returned sink passes everything through to the real one and feeds the
snapshots to a `JobWatcher`; the notices go to the process's `Notifier`,
which sends them in the background. A job with no targets costs nothing.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshtrain.errors import UserError
from meshtrain.notify.config import NotifyConfig, load_config
from meshtrain.notify.deliver import Notifier
from meshtrain.notify.events import JobWatcher
from meshtrain.notify.targets import Target, parse_targets

log = logging.getLogger("meshtrain.notify")
OPTION = "notify"  # the job option: a list of target texts

_notifiers: weakref.WeakKeyDictionary[Any, Notifier] = weakref.WeakKeyDictionary()


def notifier_for_loop(config: NotifyConfig) -> Notifier:
    """One notifier per event loop (an agent process has one loop; `run --local` agents share it)."""
    import asyncio

    loop = asyncio.get_running_loop()
    notifier = _notifiers.get(loop)
    if notifier is None:
        notifier = _notifiers[loop] = Notifier(config)
    else:
        notifier.config = config  # the newest settings (a job started after the file changed)
    return notifier


def job_targets(options: dict[str, Any] | None) -> tuple[list[Target], NotifyConfig]:
    """(targets, config) for a job: its own --notify, else the config file's default targets."""
    try:
        config = load_config()
    except UserError as exc:
        log.warning("notifications: %s", exc)
        config = NotifyConfig()
    raw = (options or {}).get(OPTION)
    if isinstance(raw, list) and raw:
        try:
            return parse_targets([str(t) for t in raw]), config
        except UserError as exc:  # the CLI checked them; an older CLI or a hand-made request did not
            log.warning("notifications: %s", exc)
            return [], config
    return list(config.targets), config


class _WatchingSink:
    def __init__(self, inner: Any, watcher: JobWatcher, send: Callable[[Any], None]) -> None:
        self.inner = inner
        self.watcher = watcher
        self.send = send

    async def log(self, node: str, rank: int, stream: str, line: str) -> None:
        await self.inner.log(node, rank, stream, line)

    async def snapshot(self, snap: dict[str, Any]) -> None:
        for notice in self.watcher.observe(snap, time.time()):
            self.send(notice)
        await self.inner.snapshot(snap)


def watch_job(runner: Any, sink: Any) -> tuple[Any, Callable[[Any], None]]:
    """Wrap a job's sink; the second value takes the job's `JobResult` when it ends."""
    options = getattr(runner.request, "options", None) or {}
    targets, config = job_targets(options)
    if not targets:
        return sink, lambda result: None
    notifier = notifier_for_loop(config)
    script = str(runner.request.script)
    name = str(options.get("run") or Path(script).stem)
    watcher = JobWatcher(runner.job, name, script)

    def send(notice: Any) -> None:
        notifier.notify(targets, notice)

    def ended(result: Any) -> None:
        snap = runner.state.snapshot(time.time())
        notice = watcher.ended(result.state, result.message, result.traceback, snap, time.time())
        if notice is not None:
            send(notice)

    return _WatchingSink(sink, watcher, send), ended


async def drain(timeout: float) -> None:
    """Give this loop's pending notifications up to `timeout` seconds (an agent about to exit)."""
    import asyncio

    notifier = _notifiers.get(asyncio.get_running_loop())
    if notifier is not None and notifier.outbox.pending:
        await notifier.close(timeout)
