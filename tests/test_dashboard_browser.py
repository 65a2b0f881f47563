"""The dashboard in a real browser (Debian's headless chromium driven by Playwright) on a real mesh.

Two `meshtrain join` processes on loopback, `meshtrain dashboard` processes as clients of the first
one's control socket, and real jobs (`meshtrain run tests/scripts/elastic_train.py`). The page must
list the nodes, a running job's loss chart must gain points while it trains, killing a worker must
show the loss and the new ring generation within 3 s, no request may leave the machine, and cancel
must need the login and the CSRF token on a non-loopback bind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshtrain.testing.agents import AgentProcess, alive_names, meshtrain_cmd, wait_for

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)

SCRIPT = Path(__file__).parent / "scripts" / "elastic_train.py"
pytestmark = pytest.mark.timeout(300)
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class DashboardProcess:
    """`meshtrain dashboard ADDRESS` against the agent in `home`; its URL (and login) from its output."""

    def __init__(self, home: Path, address: str) -> None:
        env = {**os.environ, "MESHTRAIN_HOME": str(home)}
        self.proc = subprocess.Popen(
            meshtrain_cmd("dashboard", address),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        self.banner = self.proc.stdout.readline()
        found = re.search(r"http://[\d.]+:(\d+)/", self.banner)
        assert found, self.banner
        self.url = f"http://127.0.0.1:{found.group(1)}/"
        secret = re.search(r"log in with ([0-9a-f]{32})", self.banner)
        self.login = secret.group(1) if secret else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_job(home: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "MESHTRAIN_HOME": str(home)}
    cmd = meshtrain_cmd(
        "run", str(SCRIPT), "--out", str(out), "--n", "4096", "--batch", "16", "--epochs", "20",
        "--step-sleep", "0.05", "--hidden", "16", *extra,
    )  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProcess, AgentProcess]]:
    root = tmp_path_factory.mktemp("dash")
    a = AgentProcess(root / "a", "a")
    b = AgentProcess(root / "b", "b", token=a.token)
    try:
        wait_for(lambda: alive_names(a.home) == {"a", "b"}, timeout=30)
        yield a, b
    finally:
        b.stop()
        a.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            yield b
        finally:
            b.close()


def points(page: object, metric: str = "loss") -> int:
    value = page.get_attribute(f'.chart[data-metric="{metric}"]', "data-points")  # type: ignore[attr-defined]
    return int(value or 0)


def wait_until(predicate, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout}s"
        time.sleep(0.05)
    return time.monotonic() - start


def worker_pids(agent: AgentProcess) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(agent.proc.pid).children(recursive=True)]


def test_live_page_nodes_loss_chart_and_a_killed_worker(
    mesh: tuple[AgentProcess, AgentProcess], browser: object, tmp_path: Path
) -> None:
    a, b = mesh
    dash = DashboardProcess(a.home, "127.0.0.1:0")
    job = None
    page = browser.new_page()  # type: ignore[attr-defined]
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("dialog", lambda d: d.accept())
    try:
        assert dash.login is None and "this machine only" in dash.banner
        page.goto(dash.url)
        page.wait_for_selector('#nodes tr[data-node="a"]', timeout=10_000)
        page.wait_for_selector('#nodes tr[data-node="b"]', timeout=10_000)
        assert page.inner_text('#nodes tr[data-node="b"] td[data-state]') == "alive"
        assert "leader" in page.inner_text("#nodes")

        job = start_job(a.home, tmp_path)
        page.wait_for_selector("#jobs tr[data-job]", timeout=60_000)
        page.wait_for_selector('#workers tr[data-worker="b"]', timeout=60_000)
        wait_until(lambda: points(page) >= 3, 60, "loss chart's first points")
        before = points(page)
        wait_until(lambda: points(page) > before + 2, 10, "loss chart gaining points while training")
        gens_before = page.locator("#generations li").count()

        victims = worker_pids(b)
        assert victims, "b runs no worker"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        took = wait_until(
            lambda: (
                "lost" in page.inner_text("#job-events")
                and page.locator("#generations li").count() > gens_before
            ),
            3.0,
            "the lost worker and the new generation on the page",
        )
        print(f"killed worker on b: event and generation {took:.2f}s later on the page")
        after_kill = points(page)
        wait_until(lambda: points(page) > after_kill, 15, "training going on with a alone")

        page.click("#cancel")
        page.wait_for_selector('#job-state[data-state="cancelled"]', timeout=20_000)
        assert job.wait(30) == 130
        origin = dash.url.rstrip("/")
        assert requests and all(u.startswith(origin + "/") for u in requests), [
            u for u in requests if not u.startswith(origin)
        ]
    finally:
        page.close()
        if job is not None and job.poll() is None:
            job.kill()
        dash.stop()


def test_cancel_needs_login_and_csrf_off_loopback(
    mesh: tuple[AgentProcess, AgentProcess], browser: object, tmp_path: Path
) -> None:
    a, _ = mesh
    dash = DashboardProcess(a.home, "0.0.0.0:0")
    job = None
    context = browser.new_context()  # type: ignore[attr-defined]
    page = context.new_page()
    page.on("dialog", lambda d: d.accept())
    try:
        assert dash.login is not None
        job = start_job(a.home, tmp_path)
        page.goto(dash.url)
        page.wait_for_selector("#login:not([hidden])")
        assert page.is_hidden("#main")

        def post(path: str, headers: dict[str, str] | None = None, body: str | None = None) -> int:
            return int(
                page.evaluate(
                    "async ([p, h, b]) => (await fetch(p, {method: 'POST', headers: h, body: b})).status",
                    [path, headers or {}, body],
                )
            )

        assert page.evaluate("async () => (await fetch('/api/state')).status") == 401  # read refused too
        assert post("/api/jobs/anything/cancel") == 401
        page.fill("#secret", "0" * 32)
        page.click("#login-btn")
        page.wait_for_selector("#login-error:text('wrong login secret')")
        page.fill("#secret", dash.login)
        page.click("#login-btn")
        page.wait_for_selector("#main:not([hidden])")
        page.wait_for_selector("#jobs tr[data-job]", timeout=60_000)
        page.wait_for_selector('#job-state[data-state="running"]', timeout=60_000)
        job_name = page.inner_text("#job-id")
        assert post(f"/api/jobs/{job_name}/cancel") == 403  # logged in, but no CSRF token
        assert post(f"/api/jobs/{job_name}/cancel", {"X-CSRF-Token": "forged"}) == 403
        assert post("/api/jobs/j000000/cancel", {"X-CSRF-Token": page.evaluate("S.csrf")}) == 404
        assert page.get_attribute("#job-state", "data-state") == "running"

        state = page.evaluate("async () => await (await fetch('/api/state')).text()")
        secret_file = (a.home / "secret").read_text().split()
        for secret in [*secret_file, a.token or "", dash.login]:
            assert secret and secret not in state and secret not in page.content()
        assert '"refused":1' in state  # the wrong login, counted

        page.click("#cancel")
        page.wait_for_selector('#job-state[data-state="cancelled"]', timeout=20_000)
        assert job.wait(30) == 130
    finally:
        context.close()
        if job is not None and job.poll() is None:
            job.kill()
        dash.stop()


def test_dashboard_bad_input(mesh: tuple[AgentProcess, AgentProcess]) -> None:
    a, _ = mesh
    dash = DashboardProcess(a.home, "127.0.0.1:0")
    try:
        port = dash.url.rsplit(":", 1)[1].strip("/")
        env = {**os.environ, "MESHTRAIN_HOME": str(a.home)}
        taken = subprocess.run(
            meshtrain_cmd("dashboard", f"127.0.0.1:{port}"),
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert taken.returncode != 0
        assert len(taken.stderr.strip().splitlines()) == 1 and "cannot serve the dashboard" in taken.stderr
        bad = subprocess.run(meshtrain_cmd("dashboard", "nope:x"), env=env, capture_output=True, text=True)
        assert bad.returncode == 2 and "not [HOST:]PORT" in bad.stderr
    finally:
        dash.stop()
    empty = subprocess.run(
        meshtrain_cmd("dashboard", "127.0.0.1:0"),
        env={**os.environ, "MESHTRAIN_HOME": str(a.home.parent / "nobody")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert empty.returncode == 2 and "no agent is running" in empty.stderr


def test_finished_job_history_time_axis_and_checkpoint_export(
    mesh: tuple[AgentProcess, AgentProcess], browser: object, tmp_path: Path
) -> None:
    """A dashboard started after the job ended draws its whole loss curve from the run store, and a
    checkpoint is exported and downloaded from the page: only after the login and with the CSRF token."""
    a, _ = mesh
    env = {**os.environ, "MESHTRAIN_HOME": str(a.home)}
    cmd = meshtrain_cmd(
        "run", "--checkpoint-every", "20", "--name", "dashck", str(SCRIPT), "--out", str(tmp_path),
        "--n", "1024", "--batch", "16", "--epochs", "3", "--hidden", "16", "--step-sleep", "0.03",
    )  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    dash = DashboardProcess(a.home, "0.0.0.0:0")
    context = browser.new_context(accept_downloads=True)  # type: ignore[attr-defined]
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    try:
        assert dash.login is not None
        page.goto(dash.url)
        page.wait_for_selector("#login:not([hidden])")

        def post(path: str, headers: dict[str, str] | None = None) -> int:
            return int(
                page.evaluate(
                    "async ([p, h]) => (await fetch(p, {method: 'POST', headers: h})).status",
                    [path, headers or {}],
                )
            )

        assert post("/api/checkpoints/dashck/20/export") == 401  # no login
        page.fill("#secret", dash.login)
        page.click("#login-btn")
        page.wait_for_selector("#main:not([hidden])")
        row = page.wait_for_selector("#history tr[data-run]", timeout=15_000)
        assert row is not None and "done" in row.inner_text()
        run_id = row.get_attribute("data-run")
        row.click()
        page.wait_for_selector(f'#job-id:text("{run_id}")')
        # the agent's own record of a finished job is its last snapshot (one point); the store has every step
        wait_until(lambda: points(page) >= 40, 10, "the finished job's whole loss curve from the run store")
        by_step = points(page)
        page.select_option("#xaxis", "time")
        wait_until(lambda: points(page) == by_step, 5, "the same points over time")

        ckpt = page.wait_for_selector("#checkpoints tr[data-checkpoint] button[data-export]", timeout=15_000)
        assert ckpt is not None
        target = str(ckpt.get_attribute("data-export"))
        run, step = target.split("@")
        assert run == "dashck"
        path = f"/api/checkpoints/{run}/{step}/export"
        assert post(path) == 403  # logged in, no CSRF token
        assert post(path, {"X-CSRF-Token": "forged"}) == 403
        assert post("/api/checkpoints/dashck/999999/export", {"X-CSRF-Token": page.evaluate("S.csrf")}) == 404
        assert page.locator("#exports li").count() == 0  # nothing was started by the refused requests
        ckpt.click()
        link = page.wait_for_selector(f'#exports a[data-download="{target}"]', timeout=30_000)
        assert link is not None
        with page.expect_download() as info:
            link.click()
        saved = tmp_path / "model.safetensors"
        info.value.save_as(saved)
        data = saved.read_bytes()
        header_len = int.from_bytes(data[:8], "little")
        header = data[8 : 8 + header_len].decode()
        assert '"run":"dashck"' in header.replace(" ", "") and f'"step":"{step}"' in header.replace(" ", "")
        assert len(data) > header_len + 8

        href = str(link.get_attribute("href"))
        other = browser.new_context()  # type: ignore[attr-defined]
        try:
            stranger = other.new_page()
            stranger.goto(dash.url)
            assert stranger.evaluate("async (h) => (await fetch(h)).status", href) == 401  # no session
        finally:
            other.close()
        assert page.evaluate("async () => (await fetch('/api/exports/../secret')).status") == 404
        origin = dash.url.rstrip("/")
        assert all(u.startswith(origin + "/") for u in requests), [
            u for u in requests if not u.startswith(origin)
        ]
    finally:
        context.close()
        dash.stop()
