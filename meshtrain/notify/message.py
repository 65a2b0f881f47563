"""A notice in each target's format: Slack body, JSON body, e-mail, a command's input. Pure."""

from __future__ import annotations

import json
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from meshtrain.notify.events import Notice, duration, metrics_text

SUBJECTS = {
    "finished": "finished",
    "failed": "FAILED",
    "cancelled": "cancelled",
    "paused": "paused",
    "node_lost": "lost a node",
    "node_joined": "gained a node",
    "checkpoint_failed": "checkpoint FAILED",
    "metric": "reached a condition",
}


def slack_body(notice: Notice) -> dict[str, Any]:
    """Slack's incoming-webhook payload (Mattermost, Rocket.Chat and Discord's /slack accept it too)."""
    return {"text": f"meshtrain: {notice.summary}"}


def json_body(notice: Notice) -> dict[str, Any]:
    """The whole notice for a generic webhook; `text` is the one line, for receivers that only show that."""
    return {"source": "meshtrain", **notice.to_dict()}


def encoded(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True).encode("utf-8")


def subject(notice: Notice) -> str:
    return f"[meshtrain] job {notice.job} ({notice.name}) {SUBJECTS.get(notice.kind, notice.kind)}"


def email(notice: Notice, sender: str, to: list[str]) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = subject(notice)
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Date"] = formatdate(notice.t, localtime=True)
    msg["Message-ID"] = make_msgid("meshtrain")
    lines = [notice.summary, "", f"job:      {notice.job}", f"name:     {notice.name}"]
    lines.append(f"script:   {notice.script}")
    if notice.nodes:
        lines.append(f"nodes:    {', '.join(notice.nodes)}")
    if notice.duration_s is not None:
        lines.append(f"duration: {duration(notice.duration_s)}")
    if notice.metrics:
        lines.append(f"metrics:  {metrics_text(notice.metrics)}")
    if notice.detail:
        lines.append(f"detail:   {notice.detail}")
    msg.set_content("\n".join(lines) + "\n")
    return msg


def command_env(notice: Notice) -> dict[str, str]:
    """Environment variables a notification command reads (the JSON body arrives on stdin)."""
    env = {
        "MESHTRAIN_EVENT": notice.kind,
        "MESHTRAIN_JOB": notice.job,
        "MESHTRAIN_JOB_NAME": notice.name,
        "MESHTRAIN_TEXT": notice.summary,
    }
    if notice.duration_s is not None:
        env["MESHTRAIN_DURATION_S"] = f"{notice.duration_s:.1f}"
    return env
