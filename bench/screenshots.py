"""README's dashboard screenshots: a `--local 3` mesh training, its page in headless chromium, two PNGs.

    .venv/bin/python bench/screenshots.py            # writes docs/dashboard-mesh.png, docs/dashboard-job.png

What it does: starts the embedded mesh `meshtrain run --local 3` starts
(meshtrain.launcher.start_local_mesh, in a throwaway $MESHTRAIN_HOME), serves
the dashboard from its first node as `join --dashboard` does, submits
tests/scripts/elastic_train.py there with checkpoints every 40 steps, kills
one worker half-way (so the page shows the lost node's event and the second
ring generation), lets the job finish, exports its newest checkpoint from the page and
photographs the page twice: the mesh (nodes, jobs, recorded jobs) and the job
(charts, workers, generations, events, output, checkpoints). Needs the
`dashboard` extra, Playwright and Debian's chromium (/usr/bin/chromium); about
a minute on two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "elastic_train.py"
CHROMIUM = "/usr/bin/chromium"
WIDTH = 1280


class Quiet:
    """A job sink that keeps nothing: the page is the view."""

    async def log(self, node: str, rank: int, stream: str, line: str) -> None:
        pass

    async def snapshot(self, snap: dict[str, object]) -> None:
        pass


def request(epochs: int) -> object:
    from meshtrain.agent.bundle import snapshot as bundle_snapshot
    from meshtrain.agent.jobs import JobRequest
    from meshtrain.cli.parser import parse
    from meshtrain.cli.run import checkpoint_options
    from meshtrain.jobspec import JobOptions, JobSpec

    argv = ["run", "--local", "3", "--checkpoint-every", "40", "--name", "demo", str(SCRIPT)]
    argv += ["--out", tempfile.mkdtemp(), "--n", "3072", "--batch", "24", "--epochs", str(epochs)]
    argv += ["--step-sleep", "0.03", "--hidden", "32"]
    args = parse(argv)
    spec = JobSpec(
        script=SCRIPT.name,
        args=tuple(args.script_args),
        nodes="3",
        wait=20.0,
        options=JobOptions.from_wire(checkpoint_options(args)),
    )
    return JobRequest.of(spec, bundle_snapshot(str(SCRIPT)).pack())


def worker_pids() -> list[int]:
    import psutil

    me = psutil.Process()
    return [p.pid for p in me.children(recursive=True) if "python" in p.name().lower()]


async def shoot(out: Path, epochs: int) -> None:
    from playwright.async_api import async_playwright

    from meshtrain.dashboard.server import Dashboard
    from meshtrain.dashboard.source import InAgentSource
    from meshtrain.launcher import start_local_mesh, stop_local_mesh

    agents = await start_local_mesh(3)
    dash = Dashboard(InAgentSource(agents[0]), "127.0.0.1", 0)
    try:
        url = await dash.start()
        print(f"dashboard {url}; training on node1..node3", flush=True)
        job = asyncio.create_task(agents[0].submit(request(epochs), Quiet()))  # type: ignore[arg-type]
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = await browser.new_page(viewport={"width": WIDTH, "height": 900})
            await page.goto(url)
            await page.wait_for_selector('.chart[data-metric="loss"]', timeout=60_000)

            async def points() -> int:
                return int(await page.get_attribute('.chart[data-metric="loss"]', "data-points") or 0)

            while await points() < 60:
                await asyncio.sleep(0.2)
            victims = worker_pids()
            if victims:  # the newest worker: the page shows it lost and the ring's next generation
                os.kill(victims[-1], signal.SIGKILL)
                print(f"killed worker pid {victims[-1]}", flush=True)
            await page.wait_for_selector("#generations li:nth-child(2)", timeout=30_000)
            result = await job
            print(f"job {result.state}: {result.message or ''}", flush=True)
            # exported after the end (while it trains, --keep prunes old checkpoints), once the table
            # lists the final ones (the dashboard re-reads the stores about 1 s after a job ends)
            await asyncio.sleep(3.0)
            await page.wait_for_selector("#checkpoints button[data-export]:not([disabled])", timeout=60_000)
            await page.click("#checkpoints tr:last-child button[data-export]")
            try:
                await page.wait_for_selector("#exports a[data-download]", timeout=60_000)
            except Exception:
                listed = await page.inner_text("#exports")
                print(f"exports: {listed} {await page.inner_text('#export-msg')}", flush=True)
                raise
            await page.wait_for_selector("#history tr[data-run]", timeout=30_000)
            await asyncio.sleep(1.0)  # the last snapshot and listing on the page
            out.mkdir(parents=True, exist_ok=True)
            mesh_png, job_png = out / "dashboard-mesh.png", out / "dashboard-job.png"
            await page.evaluate("window.scrollTo(0, 0)")
            await page.screenshot(path=str(mesh_png), clip={"x": 0, "y": 0, "width": WIDTH, "height": 720})
            await page.locator("#job").screenshot(path=str(job_png))
            await browser.close()
        for png in (mesh_png, job_png):
            print(
                f"wrote {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png} "
                f"({png.stat().st_size / 1e3:.0f} kB)"
            )
    finally:
        await dash.close()
        await stop_local_mesh(agents)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go (docs/)")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    if not os.path.exists(CHROMIUM):
        print(f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)", file=sys.stderr)
        return 2
    home = tempfile.mkdtemp(prefix="meshtrain-screenshots-")
    os.environ["MESHTRAIN_HOME"] = home  # the mesh's checkpoints and run records: thrown away
    began = time.monotonic()
    asyncio.run(shoot(args.out, args.epochs))
    print(f"took {time.monotonic() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
