"""Notifications: tell the user when a job finishes, fails, is cancelled, pauses or loses a node.

Pure parts, each its own concept: `targets` (what `--notify TARGET` may say),
`events` (a job's snapshots and result in, `Notice`s out), `message` (a notice
as a Slack body, a JSON body, an e-mail, a command's input), `retry` (the
outbox and its retry schedule, on an injected clock) and `config` (the default
targets and SMTP settings from a file and the environment). `deliver` is the
thin asyncio shell that sends; `hook` is the one call the agent makes per job.

Delivery never blocks training: the agent only enqueues; sending runs in a
background task (blocking HTTP and SMTP in threads), failures are retried a
few times with backoff and logged in one line each.
"""

from meshtrain.notify.events import JobWatcher, Notice
from meshtrain.notify.targets import Target, parse_target

__all__ = ["JobWatcher", "Notice", "Target", "parse_target"]
