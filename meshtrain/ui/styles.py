"""Colour means something: one place maps states and event kinds to styles and glyphs.

Alive/joined is green, suspect yellow, dead/failed red, left/cancelled dim,
leader changes magenta with the ★ mark. Glyphs carry the same meaning without
colour (plain logs, colour-blind readers).
"""

from __future__ import annotations

LEADER_MARK = "★"

NODE_STATE_STYLE = {
    "alive": "bold green",
    "suspect": "bold yellow",
    "dead": "bold red",
    "left": "dim",
}
NODE_STATE_GLYPH = {"alive": "●", "suspect": "◐", "dead": "✖", "left": "○"}

EVENT_STYLE = {
    "joined": "green",
    "alive": "green",
    "suspect": "yellow",
    "dead": "red",
    "left": "dim",
    "leader": "magenta",
}
EVENT_GLYPH = {"joined": "+", "alive": "●", "suspect": "?", "dead": "✖", "left": "-", "leader": LEADER_MARK}

JOB_STATE_STYLE = {
    "waiting": "yellow",
    "starting": "cyan",
    "running": "bold green",
    "paused": "yellow",
    "done": "bold green",
    "failed": "bold red",
    "cancelled": "dim",
}

UNKNOWN_STYLE = "magenta"


def node_style(state: str) -> str:
    return NODE_STATE_STYLE.get(state, UNKNOWN_STYLE)


def node_glyph(state: str) -> str:
    return NODE_STATE_GLYPH.get(state, "·")


def event_style(kind: str) -> str:
    return EVENT_STYLE.get(kind, "default")


def event_glyph(kind: str) -> str:
    return EVENT_GLYPH.get(kind, "·")


def job_style(state: str) -> str:
    return JOB_STATE_STYLE.get(state, UNKNOWN_STYLE)
