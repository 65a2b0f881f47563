"""What `--notify TARGET` (and the config file's `targets`) may name. Pure.

    https://hooks.slack.com/...     a Slack (or Slack-compatible) incoming webhook: {"text": ...}
    slack:https://chat.example/...  the same for a Slack-compatible server on another host
    https://... or http://...       a generic JSON webhook: the whole notice as a JSON object
    mailto:ADDRESS[,ADDRESS]        e-mail over SMTP (server settings: meshtrain.notify.config)
    exec:COMMAND                    a local command: the notice as JSON on stdin, MESHTRAIN_* variables

Webhook URLs carry their own secret (Slack's path is the credential), so
`Target.label` names a target without it, for logs and the dashboard.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from urllib.parse import urlsplit

from meshtrain.errors import UserError

KINDS = ("slack", "webhook", "mailto", "command")
SLACK_HOSTS = ("hooks.slack.com",)
_ADDRESS = re.compile(r"^[^@\s,]+@[^@\s,]+$")
HELP = "https://... (JSON webhook), slack:https://... (Slack webhook), mailto:ADDRESS or exec:COMMAND"


@dataclass(frozen=True)
class Target:
    """One place a notice goes: `kind` is one of KINDS, `value` the URL, addresses or command line."""

    kind: str
    value: str

    @property
    def label(self) -> str:
        """The target without its credential: scheme and host of a URL, the command's program."""
        if self.kind in ("slack", "webhook"):
            parts = urlsplit(self.value)
            port = f":{parts.port}" if parts.port else ""
            return f"{self.kind} {parts.scheme}://{parts.hostname or '?'}{port}"
        if self.kind == "command":
            return f"command {shlex.split(self.value)[0]}"
        return f"mail to {self.value}"

    @property
    def addresses(self) -> list[str]:
        return [a.strip() for a in self.value.split(",") if a.strip()] if self.kind == "mailto" else []

    def to_text(self) -> str:
        """The form `parse_target` reads back (how a target travels in a job's options)."""
        prefix = {"slack": "slack:", "webhook": "", "mailto": "mailto:", "command": "exec:"}[self.kind]
        return prefix + self.value


def _url(text: str, original: str) -> str:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise UserError(f"--notify {original!r}: not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--notify {original!r}: a webhook must be an http:// or https:// URL with a host")
    return text


def parse_target(text: str) -> Target:
    """A target from its text; UserError naming the accepted forms otherwise."""
    raw = text.strip()
    if not raw:
        raise UserError(f"--notify needs a target: {HELP}")
    scheme = raw.split(":", 1)[0].lower()
    rest = raw.split(":", 1)[1] if ":" in raw else ""
    if scheme == "slack":
        return Target("slack", _url(rest, text))
    if scheme in ("http", "https"):
        url = _url(raw, text)
        host = (urlsplit(url).hostname or "").lower()
        return Target("slack" if host in SLACK_HOSTS else "webhook", url)
    if scheme == "mailto":
        addresses = [a.strip() for a in rest.split("?", 1)[0].split(",") if a.strip()]
        if not addresses or not all(_ADDRESS.match(a) for a in addresses):
            raise UserError(f"--notify {text!r}: not an e-mail address (mailto:you@example.com)")
        return Target("mailto", ",".join(addresses))
    if scheme == "exec":
        try:
            argv = shlex.split(rest)
        except ValueError as exc:
            raise UserError(f"--notify {text!r}: cannot split the command: {exc}") from None
        if not argv:
            raise UserError(f"--notify {text!r}: exec: needs a command")
        return Target("command", rest.strip())
    raise UserError(f"--notify {text!r}: not a target; use {HELP}")


def parse_targets(texts: list[str] | tuple[str, ...]) -> list[Target]:
    """Several targets, duplicates dropped (a target named twice gets each notice once)."""
    out: list[Target] = []
    for text in texts:
        target = parse_target(text)
        if target not in out:
            out.append(target)
    return out
