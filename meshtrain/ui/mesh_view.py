"""The `meshtrain join` / `meshtrain status` view: every node, the leader, jobs, events.

`MeshView(snapshot)` is a rich renderable. It sizes itself to the terminal:
on 80 columns it keeps the columns that matter (state, name, address, device,
memory, load, job) and drops the rest; on a wide terminal it shows platform,
cores, battery and incarnation too. The events log always takes the same
number of lines for a given terminal so the screen does not jump as events
arrive.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.panel import Panel
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from meshtrain.status import (
    integer,
    is_leader,
    is_self,
    items,
    leader_label,
    node_label,
    number,
    strings,
    text,
)
from meshtrain.ui import format as fmt
from meshtrain.ui import styles

WIDE = 110  # columns from which the extra node columns are shown
NARROW = 72  # below this the device column gives way
DEFAULT_EVENT_LINES = 8  # when the height is unknown (not live)
MAX_EVENT_LINES = 14  # a tall terminal gets a taller log, not a screen of blank lines


def state_counts(mesh: Mapping[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in items(mesh, "nodes"):
        state = text(node, "state", "unknown")
        counts[state] = counts.get(state, 0) + 1
    return counts


def summary_line(mesh: Mapping[str, Any]) -> Text:
    """`3 alive · 1 suspect · 1 dead   leader ★ mac1   you: mac2`"""
    line = Text()
    counts = state_counts(mesh)
    if not counts:
        line.append("no nodes yet — waiting for peers", style="yellow")
    else:
        order = ["alive", "suspect", "dead", "left"] + sorted(
            set(counts) - {"alive", "suspect", "dead", "left"}
        )
        parts = [(f"{counts[s]} {s}", styles.node_style(s)) for s in order if counts.get(s)]
        for i, (label, style) in enumerate(parts):
            if i:
                line.append(" · ", style="dim")
            line.append(label, style=style)
    leader = leader_label(mesh)
    line.append("   leader ", style="dim")
    if leader:
        line.append(f"{styles.LEADER_MARK} {leader}", style="bold magenta")
    else:
        line.append("none yet", style="yellow")
    me = _self_name(mesh)
    if me:
        line.append("   you: ", style="dim")
        line.append(me, style="bold")
    return line


def _self_name(mesh: Mapping[str, Any]) -> str:
    for node in items(mesh, "nodes"):
        if is_self(mesh, node):
            return node_label(node)
    return text(mesh, "self")


def load_cell(load: float | None, *, compact: bool = False) -> Text:
    """A 5-cell bar and percent (just the percent when compact), red above 85% so a busy
    machine stands out."""
    if load is None:
        return Text(fmt.MISSING, style="dim")
    style = "red" if load > 0.85 else "yellow" if load > 0.6 else "green"
    if compact:
        return Text(f"{fmt.percent(load):>4}", style=style)
    cell = Text(fmt.bar(load, 5), style=style)
    cell.append(f" {fmt.percent(load):>4}")
    return cell


def battery_cell(battery: Any) -> Text:
    if not isinstance(battery, Mapping):
        return Text("mains", style="dim")
    pct = number(battery, "percent")
    plugged = bool(battery.get("plugged"))
    label = f"{pct:.0f}%" if pct is not None else "?"
    style = "green" if plugged or (pct or 0) >= 50 else "yellow" if (pct or 0) >= 20 else "red"
    return Text(label + (" ⚡" if plugged else ""), style=style)


def node_table(mesh: Mapping[str, Any], width: int) -> Table:
    wide = width >= WIDE
    narrow = width < NARROW
    table = Table(
        box=box.SIMPLE_HEAD,
        expand=True,
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
        header_style="bold dim",
    )
    table.add_column("state", no_wrap=True, min_width=9)
    table.add_column("node", no_wrap=True, overflow="ellipsis", min_width=8)
    table.add_column("address", no_wrap=True, overflow="ellipsis", min_width=15)
    if not narrow:
        table.add_column("device", no_wrap=True, overflow="ellipsis", min_width=5)
    if wide:
        table.add_column("cores", justify="right", no_wrap=True)
    table.add_column("mem", justify="right", no_wrap=True, min_width=6)
    table.add_column("load", no_wrap=True, min_width=4 if narrow else 10)
    if wide:
        table.add_column("battery", no_wrap=True)
        table.add_column("up", justify="right", no_wrap=True, style="dim")
    table.add_column("job", no_wrap=True, overflow="ellipsis", min_width=7)  # a job id is 7 chars

    for node in items(mesh, "nodes"):
        state = text(node, "state", "unknown")
        style = styles.node_style(state)
        dead = state in ("dead", "left")
        name = Text()
        if is_leader(mesh, node):
            name.append(f"{styles.LEADER_MARK} ", style="bold magenta")
        name.append(node_label(node), style="dim" if dead else "bold")
        if is_self(mesh, node):
            name.append(" (you)", style="cyan")
        device = text(node, "device", fmt.MISSING)
        if wide and text(node, "platform"):
            device = f"{text(node, 'platform')} · {device}"
        job = text(node, "job")
        role = text(node, "role")
        job_cell = (
            Text(f"{job}" + (f" {role}" if role and wide else ""), style="cyan")
            if job
            else Text("idle", style="dim")
        )
        row: list[RenderableType] = [
            Text(f"{styles.node_glyph(state)} {state}", style=style),
            name,
            Text(text(node, "addr", fmt.MISSING), style="dim" if dead else ""),
        ]
        if not narrow:
            row.append(Text(device, style="dim" if dead else ""))
        if wide:
            cores = integer(node, "cores", 0)
            row.append(str(cores) if cores else fmt.MISSING)
        row.append(fmt.size_gb(number(node, "memory_gb")))
        row.append(Text("", style="dim") if dead else load_cell(number(node, "load"), compact=narrow))
        if wide:
            row.append(battery_cell(node.get("battery")))
            row.append(uptime_cell(integer(node, "incarnation")))
        row.append(job_cell)
        table.add_row(*row)
    return table


def uptime_cell(incarnation: int, now: float | None = None) -> str:
    """How long the node's agent has run: its first incarnation is its start time in milliseconds
    (meshtrain.gossip.node), so the raw 13-digit number says nothing a person can read."""
    if incarnation < 10**12:  # a small incarnation (an old agent, a test): show it as it is
        return str(incarnation)
    seconds = (time.time() if now is None else now) - incarnation / 1000
    return fmt.duration(max(0.0, seconds))


def job_lines(mesh: Mapping[str, Any]) -> list[Text]:
    """One line per job the mesh knows: id, script, state, progress, loss, accuracy."""
    lines = []
    for job in items(mesh, "jobs"):
        state = text(job, "state", "?")
        line = Text("job ", style="dim")
        line.append(text(job, "job", "?"), style="bold cyan")
        line.append(f" {text(job, 'script')} ")
        line.append(state, style=styles.job_style(state))
        epochs = integer(job, "epochs")
        if epochs:
            line.append(f" · epoch {integer(job, 'epoch')}/{epochs}")
        if number(job, "loss") is not None:
            line.append(f" · loss {fmt.loss(number(job, 'loss'))}")
        if number(job, "test_accuracy") is not None:
            line.append(" · acc ")
            line.append(fmt.accuracy(number(job, "test_accuracy")), style="bold")
        nodes = strings(job, "nodes")
        if nodes:  # last: the first thing to give way on a narrow terminal
            line.append(f" · on {', '.join(nodes)}", style="dim")
        line.no_wrap = True
        line.overflow = "ellipsis"
        lines.append(line)
    return lines


def section(title: str) -> Rule:
    """A one-line section heading: a dim rule with the title on the left."""
    return Rule(f"[bold]{title}[/]", align="left", style="dim", characters="─")


def event_line(event: Mapping[str, Any]) -> Text:
    """`01:02:03 + joined  mac3  10.77.0.3:7946`"""
    kind = text(event, "kind", "?")
    style = styles.event_style(kind)
    line = Text(fmt.clock(number(event, "t")), style="dim")
    line.append(f" {styles.event_glyph(kind)} {kind:<7} ", style=style)
    line.append(text(event, "node", "?"), style="bold")
    detail = text(event, "detail")
    if detail:
        line.append(f"  {detail}", style="dim")
    line.no_wrap = True
    line.overflow = "ellipsis"
    return line


def drops_line(mesh: Mapping[str, Any]) -> Text:
    drops = mesh.get("drops")
    counts = (
        {k: v for k, v in drops.items() if isinstance(v, int) and v} if isinstance(drops, Mapping) else {}
    )
    line = Text("dropped packets: ", style="dim")
    if not counts:
        line.append("none", style="dim")
    else:
        line.append(" · ".join(f"{k} {v:,}" for k, v in sorted(counts.items())), style="yellow")
    return line


def event_section(events: list[Mapping[str, Any]], lines: int, *, pad: bool = True) -> list[Text]:
    """The newest `lines` events; padded to exactly `lines` so a live screen never changes height."""
    shown = [event_line(e) for e in events[-lines:]] if lines > 0 else []
    if not events and lines > 0:
        shown = [Text("no events yet", style="dim")]
    return shown + [Text("")] * (lines - len(shown)) if pad else shown


class MeshView:
    """Rich renderable of a mesh snapshot; see the module docstring for layout rules."""

    def __init__(
        self, snapshot: Mapping[str, Any] | None, *, height: int | None = None, note: str | None = None
    ) -> None:
        """`height`: at most this many lines, the same whatever the events (the live helper passes
        the terminal's); None prints a compact one-shot view with the last few events.
        `note`: one line shown under the summary (e.g. how another machine joins)."""
        self.snapshot: Mapping[str, Any] = snapshot if isinstance(snapshot, Mapping) else {}
        self.height = height
        self.note = note

    def _event_budget(self, fixed: int) -> int:
        if self.height is None:
            return DEFAULT_EVENT_LINES
        return min(max(self.height - fixed, 1), MAX_EVENT_LINES)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        mesh = self.snapshot
        width = options.max_width
        nodes = items(mesh, "nodes")
        jobs = job_lines(mesh)
        # panel border 2 + summary 1 + (table header 2 + rows | placeholder 1) + jobs + events title + drops
        fixed = 2 + 1 + (2 + len(nodes) if nodes else 1) + len(jobs) + 1 + 1 + (1 if self.note else 0)
        budget = self._event_budget(fixed)
        body: list[RenderableType] = [summary_line(mesh)]
        if self.note:
            body.append(Text(self.note, style="cyan", no_wrap=True, overflow="ellipsis"))
        if nodes:
            body.append(node_table(mesh, width - 4))
        else:
            body.append(Text("  (this node has not seen any peer yet)", style="dim"))
        body.extend(jobs)
        body.append(section("events"))
        body.extend(event_section(items(mesh, "events"), budget, pad=self.height is not None))
        body.append(drops_line(mesh))
        version = text(mesh, "version")
        yield Panel(
            Group(*body),
            title="[bold]meshtrain[/] · mesh",
            title_align="left",
            subtitle=f"v{version}" if version else None,
            subtitle_align="right",
            border_style="blue",
            padding=(0, 1),
        )
