"""The `meshtrain run` view: progress of one training job across the mesh.

Top: state, epoch bar, overall bar with ETA, loss with a sparkline of recent
values, test accuracy, total samples/s and ring bandwidth, and a row of every
other metric the script reports (val_loss, perplexity, lr ...). Then one row per
worker (share of the batch, samples/s as a bar, step, loss), then the mesh
events and the workers' log lines. With a known height (live) every section
keeps a fixed number of lines so nothing jumps while training runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from meshtrain.status import (
    FINISHED_JOB_STATES,
    epoch_fraction,
    integer,
    items,
    number,
    overall_fraction,
    scalars,
    shown_epoch,
    strings,
    text,
)
from meshtrain.ui import format as fmt
from meshtrain.ui import styles
from meshtrain.ui.mesh_view import event_section, section

ONE_SHOT_EVENTS = 5
ONE_SHOT_LOG = 10
MAX_EVENT_LINES = 6  # a tall terminal does not get a screen of blank lines
MAX_LOG_LINES = 12
LABEL_WIDTH = 12
HEADER_LINES = 4  # state/epoch, overall, loss/accuracy, throughput (+1 when other metrics are reported)
MAX_MESSAGE_LINES = 3


def loss_history_of(job: Mapping[str, Any], fallback: Sequence[float] | None) -> list[float]:
    values = job.get("loss_history")
    if isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return list(fallback or [])


class FractionBar:
    """A bar that fills its column: `━━━━━━━━╸────`, done part coloured, the rest thin and dim.

    Unlike rich's ProgressBar, done and remaining differ in shape as well as
    colour, so the bar still reads in a plain-text capture or without colour.
    """

    def __init__(self, fraction: float, style: str) -> None:
        self.fraction = min(max(fraction, 0.0), 1.0)
        self.style = style

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(4, options.max_width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(options.max_width, 1)
        halves = int(self.fraction * width * 2)
        full, half = divmod(halves, 2)
        bar = Text("━" * full, style=self.style)
        if half and full < width:
            bar.append("╸", style=self.style)
        bar.append("─" * (width - full - half), style="grey35")
        yield bar


def _bar(fraction: float, state: str) -> FractionBar:
    style = "red" if state in ("failed", "cancelled") else "yellow" if state == "paused" else "green"
    return FractionBar(fraction, "bold " + style if fraction >= 1.0 else style)


def bar_rows(job: Mapping[str, Any]) -> Table:
    """The epoch bar and the overall bar, labels on the left, numbers on the right."""
    state = text(job, "state", "?")
    grid = Table.grid(expand=True, padding=(0, 1))
    grid.add_column(no_wrap=True, width=LABEL_WIDTH)
    grid.add_column(ratio=1)
    grid.add_column(no_wrap=True, justify="right", min_width=24)

    epochs = integer(job, "epochs")
    steps = integer(job, "steps_per_epoch")
    step = integer(job, "step")
    if steps and step > steps:
        step %= steps
    glyph = "●" if state == "running" else "◌" if state in ("waiting", "starting") else "■"
    started = state not in ("waiting", "starting") or integer(job, "epoch") > 0
    epoch_label = f"epoch {shown_epoch(job)}/{epochs}" if epochs and started else "epoch —"
    grid.add_row(
        Text(f"{glyph} {state}", style=styles.job_style(state)),
        _bar(epoch_fraction(job), state),
        Text(f"{epoch_label}  step {step}/{steps}" if steps else epoch_label),
    )
    overall = overall_fraction(job)
    timing = Text(f"{fmt.percent(overall):>4}  ")
    if state not in FINISHED_JOB_STATES:
        timing.append("ETA ", style="dim")
        timing.append(fmt.duration(number(job, "eta_s")), style="bold")
        timing.append(" · ", style="dim")
    timing.append("elapsed ", style="dim")
    timing.append(fmt.duration(number(job, "elapsed_s")))
    grid.add_row(Text("overall", style="dim"), _bar(overall, state), timing)
    return grid


def metric_rows(job: Mapping[str, Any], history: Sequence[float]) -> Table:
    """Loss (with its recent trend), test accuracy, throughput, ring bandwidth, the message."""
    grid = Table.grid(expand=True, padding=(0, 1))
    grid.add_column(no_wrap=True, width=LABEL_WIDTH)
    grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")

    metrics = Text("loss ", style="dim")
    metrics.append(fmt.loss(number(job, "loss")), style="bold")
    spark = fmt.sparkline(history, 16, log_scale=True)
    if spark:
        metrics.append(f" {spark}", style="cyan")
    metrics.append("   test accuracy ", style="dim")
    acc = number(job, "test_accuracy")
    metrics.append(fmt.accuracy(acc), style="bold green" if acc is not None else "dim")
    grid.add_row(Text("training", style="dim"), metrics)

    workers = items(job, "workers")
    size = integer(job, "size") or len(workers)
    rate = number(job, "samples_per_s")
    if not rate and text(job, "state") in ("waiting", "starting"):
        rate = None  # nothing measured yet, rather than a misleading 0
    speed = Text(fmt.count(rate), style="bold")
    speed.append(" samples/s", style="dim")
    if size:
        speed.append(f" on {size} node{'s' if size != 1 else ''}")
    speed.append("   ring ", style="dim")
    speed.append(fmt.mb_per_s(number(job, "ring_mb_s")))
    grid.add_row(Text("throughput", style="dim"), speed)
    named = scalars(job, "metrics")
    if named:
        grid.add_row(Text("metrics", style="dim"), metrics_text(named))
    return grid


def metrics_text(named: Mapping[str, float | None]) -> Text:
    """`val_loss 1.523 · perplexity 4.586 · lr 3.00e-04`: names dim, values bold, in reported order."""
    line = Text()
    for i, (name, value) in enumerate(named.items()):
        if i:
            line.append(" · ", style="dim")
        line.append(f"{name} ", style="dim")
        line.append(fmt.metric(value), style="bold")
    return line


def header_lines(job: Mapping[str, Any]) -> int:
    return HEADER_LINES + (1 if scalars(job, "metrics") else 0)


def message_block(job: Mapping[str, Any], console: Console, width: int) -> Table:
    """The job's one-line message: a failure in red (wrapped, up to 3 lines, it is the whole
    explanation), waiting in yellow; an empty line when there is none, so the height holds."""
    state = text(job, "state")
    message = text(job, "message")
    grid = Table.grid(expand=True, padding=(0, 1))
    grid.add_column(no_wrap=True, width=LABEL_WIDTH)
    grid.add_column(ratio=1)
    if not message:
        grid.add_row(Text(""), Text(""))
        return grid
    failed = state == "failed"
    style = "bold red" if failed else "yellow" if state in ("waiting", "paused") else "default"
    lines = Text(message, style=style).wrap(console, max(width - LABEL_WIDTH - 1, 10))
    if not failed or len(lines) > MAX_MESSAGE_LINES:
        keep = 1 if not failed else MAX_MESSAGE_LINES
        shown = [line.copy() for line in lines[:keep]]
        shown[-1].append("…")
        shown[-1].truncate(max(width - LABEL_WIDTH - 1, 10), overflow="ellipsis")
    else:
        shown = list(lines)
    body = Text("\n").join(shown) if len(lines) > 1 else Text(message, style=style)
    grid.add_row(Text("error" if failed else "note", style=style), body)
    return grid


def message_height(job: Mapping[str, Any], console: Console, width: int) -> int:
    if text(job, "state") != "failed" or not text(job, "message"):
        return 1
    lines = Text(text(job, "message")).wrap(console, max(width - LABEL_WIDTH - 1, 10))
    return min(max(len(lines), 1), MAX_MESSAGE_LINES)


def worker_table(job: Mapping[str, Any], rows: int | None, width: int = 80) -> Table:
    workers = sorted(items(job, "workers"), key=lambda w: integer(w, "rank"))
    fastest = max((number(w, "samples_per_s") or 0.0 for w in workers), default=0.0) or 1.0
    table = Table(
        box=box.SIMPLE_HEAD,
        expand=True,
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
        header_style="bold dim",
    )
    table.add_column("node", no_wrap=True, overflow="ellipsis", ratio=2)
    table.add_column("rank", justify="right", no_wrap=True)
    table.add_column("share", justify="right", no_wrap=True)
    table.add_column("samples/s", no_wrap=True, ratio=3)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("loss", justify="right", no_wrap=True)
    why = any(text(w, "why") for w in workers)  # a column only once some share has a reason
    if why:
        table.add_column("why", no_wrap=True, overflow="ellipsis", ratio=2, style="dim")
    shown = workers if rows is None else workers[:rows]
    for w in shown:
        rate = number(w, "samples_per_s")
        rate_cell = Text(fmt.bar((rate or 0.0) / fastest, 10 if width >= 72 else 4), style="green")
        rate_cell.append(f" {fmt.count(rate):>7}")
        table.add_row(
            Text(text(w, "node", "?"), style="bold"),
            str(integer(w, "rank")),
            fmt.percent(number(w, "share")),
            rate_cell,
            str(integer(w, "step")),
            fmt.loss(number(w, "loss")),
            *([text(w, "why")] if why else []),
        )
    if rows is not None and len(workers) > rows:
        table.add_row(Text(f"… {len(workers) - rows} more", style="dim"), *[""] * (5 + why))
    if not workers:
        table.add_row(Text("no workers yet", style="dim"), "", "", "", "", "")
    return table


def log_section(lines: list[str], budget: int, *, pad: bool) -> list[Text]:
    shown = [Text(line, no_wrap=True, overflow="ellipsis") for line in lines[-budget:]] if budget > 0 else []
    if not lines and budget > 0:
        shown = [Text("no output yet", style="dim")]
    return shown + [Text("")] * (budget - len(shown)) if pad else shown


class JobView:
    """Rich renderable of a job snapshot; `height` (at most this many lines) fixes the layout
    for a live screen: for a given terminal and worker count, every frame has the same height."""

    def __init__(
        self,
        snapshot: Mapping[str, Any] | None,
        *,
        loss_history: Sequence[float] | None = None,
        height: int | None = None,
    ) -> None:
        self.snapshot: Mapping[str, Any] = snapshot if isinstance(snapshot, Mapping) else {}
        self.loss_history = loss_history_of(self.snapshot, loss_history)
        self.height = height

    def _budgets(self, workers: int, message_lines: int, header: int) -> tuple[int | None, int, int]:
        """(worker rows, event lines, log lines) for the height."""
        if self.height is None:
            return None, ONE_SHOT_EVENTS, ONE_SHOT_LOG
        # panel 2 + header + message + table head 2 + worker rows (+ "more") + 2 section titles
        worker_rows = min(max(workers, 1), max(self.height // 4, 1))
        more = 1 if workers > worker_rows else 0
        spare = self.height - (2 + header + message_lines + 2 + worker_rows + more + 2)
        spare = max(spare, 2)
        events = min(max(spare // 3, 1), MAX_EVENT_LINES)
        # a long failure message takes its lines from the log, so the frame's height holds
        # so does the metrics row: the frame's height is the same with it or without
        cap = MAX_LOG_LINES - (message_lines - 1) - (header - HEADER_LINES)
        return worker_rows, events, min(spare - events, cap)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        job = self.snapshot
        pad = self.height is not None
        inner = options.max_width - 4  # panel border and padding
        message_lines = message_height(job, console, inner)
        worker_rows, event_lines, log_lines = self._budgets(
            len(items(job, "workers")), message_lines, header_lines(job)
        )
        body: list[RenderableType] = [
            bar_rows(job),
            metric_rows(job, self.loss_history),
            message_block(job, console, inner),
            worker_table(job, worker_rows, inner),
        ]
        body.append(section("mesh events"))
        body.extend(event_section(items(job, "events"), event_lines, pad=pad))
        body.append(section("log"))
        body.extend(log_section(strings(job, "log"), log_lines, pad=pad))
        state = text(job, "state", "?")
        job_id = text(job, "job")
        yield Panel(
            Group(*body),
            title=f"[bold]meshtrain run[/] · {text(job, 'script', '?')}",
            title_align="left",
            subtitle=f"job {job_id}" if job_id else None,
            subtitle_align="right",
            border_style=styles.job_style(state) if state in FINISHED_JOB_STATES else "blue",
            padding=(0, 1),
        )
