"""`python -m meshtrain.ui.preview [--width N] [--plain] [--live SECONDS]`: the views from example data.

Lets a person (and a reviewer) look at every view without running a mesh;
`--live` plays a made-up job through the real live helper (LiveJob), so the
redraw can be watched in a terminal too. Everything shown is labelled PREVIEW.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console, RenderableType
from rich.rule import Rule

from meshtrain.ui import samples
from meshtrain.ui.job_view import JobView
from meshtrain.ui.live import LiveJob
from meshtrain.ui.mesh_view import MeshView
from meshtrain.ui.plain import render_job_text, render_mesh_text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshtrain.ui.preview", description=__doc__)
    parser.add_argument("--width", type=int, default=None, help="render at this width (default: terminal)")
    parser.add_argument("--plain", action="store_true", help="show the plain-text (non-TTY) renderings")
    parser.add_argument(
        "--live", type=float, metavar="SECONDS", help="play an example job live for this long"
    )
    parser.add_argument("--cost", action="store_true", help="measure the time to render one live frame")
    args = parser.parse_args(argv)
    if args.cost:
        render_cost()
        return 0
    console = Console(width=args.width) if args.width else Console()
    if args.live:
        play(console, args.live)
        return 0
    views = [
        ("mesh (join / status)", MeshView(samples.mesh()), render_mesh_text(samples.mesh())),
        ("empty mesh", MeshView(samples.empty_mesh()), render_mesh_text(samples.empty_mesh())),
        ("job running", JobView(samples.running_job()), render_job_text(samples.running_job())),
        ("job waiting", JobView(samples.waiting_job()), render_job_text(samples.waiting_job())),
        ("job failed", JobView(samples.failed_job()), render_job_text(samples.failed_job())),
        ("job done", JobView(samples.done_job()), render_job_text(samples.done_job())),
    ]
    for title, view, plain in views:
        console.print(Rule(f"PREVIEW · {title} · example data, not a live mesh", style="dim"))
        if args.plain:
            console.print(plain, markup=False, highlight=False)
        else:
            console.print(view)
    return 0


def render_cost(frames: int = 200) -> None:
    """Milliseconds to render one live frame of each view: the CPU a live view costs at 4 frames/s."""
    import io

    for width, height in ((80, 21), (200, 50)):
        console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system="truecolor")
        views: list[tuple[str, RenderableType]] = [
            ("MeshView", MeshView(samples.mesh(), height=height)),
            ("JobView", JobView(samples.running_job(), height=height)),
        ]
        for name, view in views:
            for _ in range(5):
                console.print(view)
            start = time.perf_counter()
            for _ in range(frames):
                console.print(view)
            ms = (time.perf_counter() - start) / frames * 1000
            share = ms * 4 / 1000 * 100
            print(
                f"{name} {width}x{height}: {ms:.2f} ms/frame over {frames} frames"
                f" = {share:.1f}% of a core at 4 fps"
            )


def frames(seconds: float, fps: float = 8.0) -> list[dict[str, Any]]:
    """An example 2-epoch job from start to done, as the agent would stream it (made-up numbers)."""
    total = max(int(seconds * fps), 4)
    steps, epochs = 469, 2
    out = []
    for i in range(total + 1):
        done = i / total
        global_step = int(done * steps * epochs)
        epoch, step = min(global_step // steps + 1, epochs), global_step % steps if done < 1 else steps
        job = samples.running_job()
        loss = 2.3 * (0.02 + 0.98 * (1 - done) ** 4)
        job.update(
            job="preview",
            epochs=epochs,
            epoch=epoch,
            step=step,
            loss=loss,
            elapsed_s=done * 120,
            eta_s=(1 - done) * 120,
            test_accuracy=None if epoch == 1 else 0.9712,
            loss_history=None,
            state="done" if done >= 1 else "running",
            log=[f"[mac1] PREVIEW step {global_step}"],
        )
        if done >= 1:
            job["test_accuracy"] = 0.9806
        del job["loss_history"]
        out.append(job)
    return out


def play(console: Console, seconds: float) -> None:
    console.print("PREVIEW · example data played through LiveJob, not a live mesh")
    with LiveJob(console=console, refresh_per_second=8) as view:
        for job in frames(seconds):
            view.update(job)
            time.sleep(1 / 8)


if __name__ == "__main__":
    raise SystemExit(main())
