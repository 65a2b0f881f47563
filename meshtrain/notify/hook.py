"""The agent's hooks: `follow_notices` around every runner it drives, `record_notices` in every record it
publishes, `settle_final` for a finished job whose ender was lost.

The job's targets are its `--notify` options, else the config file's
defaults (read when the job starts, on the node that coordinates it); its
conditions are its `--notify-when` options. Whoever coordinates the job
watches it: `follow_notices` wraps each `JobRunner` coordination that
meshtrain.agent.mesh_jobs drives (the origin's and every successor's), a
background task feeds the job's snapshots (`runner.state`) to a
`JobWatcher`, and the notices go to the process's `Notifier`, which sends
them in the background. A job with no targets costs nothing.

Once per event by the mesh (meshtrain.notify.ledger): the coordinator's
`Ledger` travels in the job's record (`record_notices`); a delivery that got
through republishes the record at once, so the other nodes learn it within
one sync. A successor's watcher starts from the record's ledger: it tells
nothing already told and sends what its predecessor had not delivered. When
coordination moves away (`step_down`) the old coordinator forgets what it
had not sent yet; the new one sends it. The job's end is told by whoever
ends it; when that node is lost before the end got through, the node the
succession rule names among the live ones (the lowest-ranked live worker)
tells it from the final record (`settle_final`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

from meshtrain.errors import UserError
from meshtrain.notify.condition import Condition, parse_conditions
from meshtrain.notify.config import NotifyConfig, load_config
from meshtrain.notify.deliver import Notifier
from meshtrain.notify.events import JobWatcher, Notice
from meshtrain.notify.ledger import Ledger
from meshtrain.notify.retry import Delivery
from meshtrain.notify.targets import Target, parse_targets

log = logging.getLogger("meshtrain.notify")
OPTION = "notify"  # the job option: a list of target texts
WHEN_OPTION = "notify_when"  # the job option: a list of condition texts
RECORD_KEY = "notices"  # the job record's field holding the ledger
POLL_S = 0.5
T = TypeVar("T")

_notifiers: weakref.WeakKeyDictionary[Any, Notifier] = weakref.WeakKeyDictionary()
_followers: dict[int, _Follower] = {}  # id(runner) -> its watch (a JobRunner is not hashable)
_settling: set[tuple[str, str]] = set()  # (node, job): final notices this process is telling for a lost ender


def notifier_for_loop(config: NotifyConfig) -> Notifier:
    """One notifier per event loop (an agent process has one loop; `run --local` agents share it)."""
    loop = asyncio.get_running_loop()
    notifier = _notifiers.get(loop)
    if notifier is None:
        notifier = _notifiers[loop] = Notifier(config)
    else:
        notifier.config = config  # the newest settings (a job started after the file changed)
    return notifier


def _config() -> NotifyConfig:
    try:
        return load_config()
    except UserError as exc:
        log.warning("notifications: %s", exc)
        return NotifyConfig()


def _parsed_targets(texts: list[str]) -> list[Target]:
    try:
        return parse_targets(texts)
    except UserError as exc:  # the CLI checked them; an older CLI or a hand-made request did not
        log.warning("notifications: %s", exc)
        return []


def job_targets(options: dict[str, Any] | None) -> tuple[list[Target], NotifyConfig]:
    """(targets, config) for a job: its own --notify, else the config file's default targets."""
    config = _config()
    raw = (options or {}).get(OPTION)
    if isinstance(raw, (list, tuple)) and raw:
        return _parsed_targets([str(t) for t in raw]), config
    return list(config.targets), config


def job_conditions(options: dict[str, Any] | None) -> list[Condition]:
    raw = (options or {}).get(WHEN_OPTION)
    if not isinstance(raw, (list, tuple)) or not raw:
        return []
    try:
        return parse_conditions([str(c) for c in raw])
    except UserError as exc:  # the CLI checked them
        log.warning("notifications: %s", exc)
        return []


def _watcher(job: str, script: str, options: dict[str, Any], ledger: Ledger) -> JobWatcher:
    from meshtrain.checkpoints.options import default_run_name

    name = str(options.get("run") or Path(script).stem)
    run = str(options.get("run") or default_run_name(script))
    watcher = JobWatcher(job, name, script, job_conditions(options), checkpoint_run=run)
    watcher.restore(ledger.known, ledger.watch)
    return watcher


class _Follower:
    """One coordinator's watch over one job: watcher, ledger, deliveries, republishing."""

    def __init__(self, runner: Any, saved: Any) -> None:
        self.runner = runner
        options = dict(runner.request.options.to_wire()) if hasattr(runner.request.options, "to_wire") else {}
        if isinstance(saved, dict) and isinstance(saved.get("targets"), list):
            config = _config()
            self.targets = _parsed_targets([str(t) for t in saved["targets"]])  # those the job started with
        else:
            self.targets, config = job_targets(options)
        self.ledger = Ledger.from_record(saved, [t.to_text() for t in self.targets])
        self.watcher = _watcher(runner.job, str(runner.request.script), options, self.ledger)
        self.notifier = notifier_for_loop(config) if self.targets else None
        self.task: asyncio.Task[None] | None = None
        self.ended = False
        self._publishing = False
        self._again = False
        self._stopped = False

    def start(self) -> None:
        assert self.notifier is not None
        for notice, owed in self.ledger.owed():  # what the lost predecessor had not delivered
            self._send(notice, [t for t in self.targets if t.to_text() in owed])
        self.task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            self.observe()

    def observe(self) -> None:
        notices = self.watcher.observe(self.runner.state.snapshot(time.time()), time.time())
        self.ledger.watch = self.watcher.saved()
        for notice in notices:
            self.give(notice)

    def give(self, notice: Notice) -> None:
        self.ledger.given(notice)
        self._send(notice, self.targets)

    def _send(self, notice: Notice, targets: list[Target]) -> None:
        if self.notifier is not None and targets:
            self.notifier.notify(targets, notice, self._delivered)

    def _delivered(self, delivery: Delivery, sent: bool) -> None:
        self.ledger.delivered(delivery.notice.key, delivery.target.to_text())
        if not self._stopped:
            self._republish()

    def _republish(self) -> None:
        """Publish the record now (coalesced): the other nodes learn of the delivery within one sync."""
        links = getattr(self.runner, "links", None)
        if links is None or not hasattr(links, "publish"):
            return
        if self._publishing:
            self._again = True  # one more publish after this one, with what changed meanwhile
            return
        self._publishing = True

        async def publish() -> None:
            try:
                while True:
                    self._again = False
                    await links.publish(self.runner)
                    if not self._again:
                        break
            finally:
                self._publishing = False
                if self.ended and not self.ledger.pending:  # all told, and the record says so
                    self.forget()

        asyncio.get_running_loop().create_task(publish())

    def forget(self) -> None:
        if _followers.get(id(self.runner)) is self:
            del _followers[id(self.runner)]

    def stop(self) -> None:
        """Coordination moved away: the successor sends what is still queued here."""
        self.forget()
        self._stopped = True
        if self.task is not None:
            self.task.cancel()
        if self.notifier is not None:
            self.notifier.outbox.drop(self.runner.job)

    def finish(self, result: Any) -> None:
        if self.task is not None:
            self.task.cancel()
        if result is None:
            self.stop()
            return
        self.observe()  # what happened since the last poll (a node lost just before the end)
        snap = self.runner.state.snapshot(time.time())
        notice = self.watcher.ended(result.state, result.message, result.traceback, snap, time.time())
        if notice is not None:
            self.give(notice)
        self.ended = True
        self._republish()


def record_notices(runner: Any) -> dict[str, Any] | None:
    """The job's ledger for its record (None when the job notifies nobody or is not watched here)."""
    follower = _followers.get(id(runner))
    if follower is None or follower.runner is not runner or follower._stopped:
        return None
    return follower.ledger.to_record()


async def follow_notices(runner: Any, body: Awaitable[T], saved: Any = None) -> T:
    """Drive `body` (a runner's coordination) with the job's notices sent from here while it runs.

    The hook of meshtrain.agent.mesh_jobs, like meshtrain.tracking's: every
    runner an agent drives passes through here; `saved` is the ledger in the
    record the runner was built from (a successor's). A result tells the end;
    None (coordination moved away) hands the rest to the successor.
    Notifications never fail a job.
    """
    follower: _Follower | None = None
    try:
        follower = _Follower(runner, saved)
        if follower.targets:
            _followers[id(runner)] = follower
            follower.start()
        else:
            follower = None
    except Exception as exc:  # noqa: BLE001 - a job runs even where nobody can be told about it
        log.warning("notifications: cannot follow job %s: %r", getattr(runner, "job", "?"), exc)
        follower = None
    try:
        result = await body
    except BaseException:
        if follower is not None:
            follower.stop()
        raise
    if follower is not None:
        with contextlib.suppress(Exception):
            follower.finish(result)
    return result


def settle_final(
    record: dict[str, Any], me: str, live: Collection[str], republish: Callable[[dict[str, Any]], None]
) -> None:
    """A finished job whose ender was lost before its notices got through: tell them from here.

    Every node holding the final record evaluates it alike: the ender (the
    record's coordinator) is not live, the ledger owes notices (the end not
    yet through, or never given), and the succession rule over the record
    names this node. The updated ledger goes out with `republish(record)`.
    """
    from meshtrain.agent.job_coordination import record_coordinator

    saved = record.get(RECORD_KEY)
    job = str(record.get("job") or "")
    if not isinstance(saved, dict) or (me, job) in _settling:
        return
    ledger = Ledger.from_record(saved)
    if not ledger.targets or (ledger.ended and not ledger.pending):
        return
    if str(record.get("coordinator") or "") in live or record_coordinator(record, live) != me:
        return
    _settling.add((me, job))
    spec = record.get("spec") or {}
    options = spec.get("options") if isinstance(spec.get("options"), dict) else {}
    script = str(spec.get("script") or "")
    watcher = _watcher(job, script, options or {}, ledger)
    targets = _parsed_targets(list(ledger.targets))
    notifier = notifier_for_loop(_config())
    result = record.get("result") or {}
    snap = record.get("snapshot") if isinstance(record.get("snapshot"), dict) else None
    state = str(result.get("state") or "failed")
    end = watcher.ended(state, result.get("message"), result.get("traceback"), snap, time.time())
    owed = ledger.owed()
    if end is not None:
        ledger.given(end)
        owed.append((end, list(ledger.targets)))
    log.info("notifications: job %s ended on a node since lost; telling its end from %s", job, me)
    current = {"record": record}

    def delivered(delivery: Delivery, sent: bool) -> None:
        ledger.delivered(delivery.notice.key, delivery.target.to_text())
        updated = dict(current["record"])
        updated[RECORD_KEY] = ledger.to_record()
        updated["coordinator"] = me
        updated["seq"] = int(updated.get("seq") or 0) + 1
        current["record"] = updated
        republish(updated)

    for notice, owes in owed:
        notifier.notify([t for t in targets if t.to_text() in owes], notice, delivered)


async def drain(timeout: float) -> None:
    """Give this loop's pending notifications up to `timeout` seconds (an agent about to exit)."""
    notifier = _notifiers.get(asyncio.get_running_loop())
    if notifier is not None and notifier.outbox.pending:
        await notifier.close(timeout)
