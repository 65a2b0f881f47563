"""The agent's one call per job: `ended = watch_job(runner)`, then `ended(result)` when it is over.

The job's targets are its `--notify` options, else the config file's
defaults (read when the job starts, on the node that coordinates it). A
background task feeds the job's snapshots (`runner.state`) to a
`JobWatcher`; the notices go to the process's `Notifier`, which sends them
in the background. A job with no targets costs nothing.
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
POLL_S = 0.5

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


def watch_job(runner: Any) -> Callable[[Any], None]:
    """Follow a job's `runner.state` in the background; call the result with its `JobResult` at the end.

    Polling the state (as the run recorder does) rather than wrapping the
    live view's sink keeps this independent of who streams the job where.
    """
    import asyncio

    options = getattr(runner.request, "options", None) or {}
    targets, config = job_targets(options)
    if not targets:
        return lambda result: None
    notifier = notifier_for_loop(config)
    script = str(runner.request.script)
    name = str(options.get("run") or Path(script).stem)
    watcher = JobWatcher(runner.job, name, script)

    def observe() -> None:
        for notice in watcher.observe(runner.state.snapshot(time.time()), time.time()):
            notifier.notify(targets, notice)

    async def follow() -> None:
        while True:
            await asyncio.sleep(POLL_S)
            observe()

    task = asyncio.get_running_loop().create_task(follow())

    def ended(result: Any) -> None:
        task.cancel()
        observe()  # what happened since the last poll (a node lost just before the end)
        if result is None:  # coordination moved to another node: it tells the end
            return
        snap = runner.state.snapshot(time.time())
        notice = watcher.ended(result.state, result.message, result.traceback, snap, time.time())
        if notice is not None:
            notifier.notify(targets, notice)

    return ended


async def drain(timeout: float) -> None:
    """Give this loop's pending notifications up to `timeout` seconds (an agent about to exit)."""
    import asyncio

    notifier = _notifiers.get(asyncio.get_running_loop())
    if notifier is not None and notifier.outbox.pending:
        await notifier.close(timeout)
