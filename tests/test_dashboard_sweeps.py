"""The dashboard's Sweeps section: the live tables `meshtrain sweep` writes to $MESHTRAIN_HOME/sweeps/*.json.

A sweep's table file (written as the sweep writes it: resume.table_data + write_sweep_file) in a temp
MESHTRAIN_HOME, the dashboard served in process from a source whose run store is in that home: the JSON
endpoint returns it, a real browser (Debian's headless chromium through Playwright) draws one table per
sweep with the best trial highlighted and follows a rewrite of the file live, and off loopback the
endpoint needs the login like every other view.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from meshtrain.dashboard.board import Board
from meshtrain.sweep.resume import SweepSpec, sweep_file, table_data, write_sweep_file

pytest.importorskip("aiohttp")
pytestmark = pytest.mark.timeout(60)
CHROMIUM = "/usr/bin/chromium"
T = TypeVar("T")


class HomeSource:
    """A source with one live node and no jobs, whose run store (and so its sweeps folder) is in `home`."""

    def __init__(self, home: Path) -> None:
        self.home = home

    async def snapshots(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return {
            "self": "a",
            "leader": "a",
            "nodes": [{"id": "a", "name": "a", "state": "alive"}],
            "jobs": [],
        }, []

    async def cancel(self, job: str, reason: str) -> tuple[bool, str]:
        return False, "no jobs here"

    async def checkpoints(self) -> list[dict[str, Any]]:
        return []

    def checkpoint_root(self) -> Path | None:
        return self.home / "checkpoints"

    def runs_db(self) -> Path:
        return self.home / "runs.sqlite"


class Served:
    """A Dashboard on its own event loop in a thread (the browser is driven from the test's thread)."""

    def __init__(self, home: Path, host: str = "127.0.0.1", login_secret: str | None = None) -> None:
        from meshtrain.dashboard.server import Dashboard

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make() -> Dashboard:
            return Dashboard(HomeSource(home), host, 0, login_secret=login_secret)

        self.dash = self.call(make())
        self.url = self.call(self.dash.start())

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(15)

    def close(self) -> None:
        self.call(self.dash.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def trial(n: int, lr: float, state: str, value: float | None, node: str, **extra: Any) -> dict[str, Any]:
    return {
        "trial": n, "run": f"j00{n}", "runs": [f"j00{n}"], "nodes": [node],
        "params": {"lr": lr, "layers": 2 + n},
        "value": value, "state": state, "retries": 0, "message": None, "step": 9 if value is not None else 3,
        **extra,
    }  # fmt: skip


def write_sweep(home: Path, name: str, state: str, rows: list[dict[str, Any]], best: int | None) -> None:
    spec = SweepSpec(script="train.py", params=["lr=loguniform:1e-4:1e-1", "layers=choice:2,3,4"],
                     objective="val_loss:min", trials=4)  # fmt: skip
    data = table_data(name, spec, state, rows, metric="val_loss", direction="minimize", best=best)
    write_sweep_file(sweep_file(home, name), data)


def get_json(url: str, opener: urllib.request.OpenerDirector | None = None) -> tuple[int, Any]:
    try:
        with (opener or urllib.request.build_opener()).open(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    write_sweep(home, "lrs", "running", [
        trial(0, 0.003, "complete", 0.31, "a"),
        trial(1, 0.01, "complete", 0.12, "b"),
        trial(2, 0.05, "running", None, "c"),
        trial(3, 0.2, "failed", None, "a", message="it never reported val_loss"),
    ], best=1)  # fmt: skip
    return home


@pytest.fixture
def served(home: Path) -> Iterator[Served]:
    s = Served(home)
    try:
        yield s
    finally:
        s.close()


def test_board_sends_the_sweeps_only_when_they_change() -> None:
    board = Board()
    assert board.set_sweeps([{"name": "s", "trials": []}])
    first, cursor = board.view()
    assert first["sweeps"] == [{"name": "s", "trials": []}] and "checkpoints" in first
    again, cursor = board.view(cursor)
    assert "sweeps" not in again and "checkpoints" not in again
    assert not board.set_sweeps([{"name": "s", "trials": []}])
    assert board.set_sweeps([{"name": "s", "trials": [{"trial": 0}]}])
    moved, _ = board.view(cursor)
    assert moved["sweeps"][0]["trials"] == [{"trial": 0}] and "checkpoints" not in moved  # its own version


def test_the_sweeps_endpoint_returns_the_live_tables(served: Served, home: Path) -> None:
    status, body = get_json(served.url + "api/sweeps")
    assert status == 200, body
    (sweep,) = body["sweeps"]
    assert sweep["name"] == "lrs" and sweep["best"] == 1 and sweep["metric"] == "val_loss"
    assert [t["trial"] for t in sweep["trials"]] == [0, 1, 2, 3]
    assert sweep["trials"][1]["params"] == {"lr": 0.01, "layers": 3} and sweep["trials"][1]["value"] == 0.12
    # the stream's first view carries them too (the board reads the folder every SWEEPS_EVERY_S)
    first, _ = served.dash.board.view(None)
    assert first["sweeps"] and first["sweeps"][0]["name"] == "lrs"
    write_sweep(home, "newer", "done", [trial(0, 0.1, "complete", 0.5, "a")], best=0)
    _, body = get_json(served.url + "api/sweeps")
    assert [s["name"] for s in body["sweeps"]] == ["newer", "lrs"]  # newest first, read from disk now


def test_off_loopback_the_sweeps_need_the_login(home: Path) -> None:
    served = Served(home, host="0.0.0.0", login_secret="s3cret-login")
    try:
        status, body = get_json(served.url + "api/sweeps")
        assert status == 401, body
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        login = urllib.request.Request(
            served.url + "api/login", data=b'{"secret": "s3cret-login"}',
            headers={"Content-Type": "application/json"}, method="POST",
        )  # fmt: skip
        with opener.open(login, timeout=10) as r:
            assert r.status == 200
        status, body = get_json(served.url + "api/sweeps", opener)
        assert status == 200 and body["sweeps"][0]["name"] == "lrs", body
    finally:
        served.close()


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed")
def test_the_page_draws_each_sweep_with_its_best_trial(served: Served, home: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            outside: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(served.url) else outside.append(r.url))
            page.goto(served.url)
            table = '#sweeps table[data-sweep="lrs"]'
            page.wait_for_selector(f'{table} tr[data-trial="3"]', timeout=10_000)
            assert page.locator(f"{table} tbody tr").count() == 4
            heads = page.locator(f"{table} th").all_inner_texts()
            assert heads == ["trial", "lr", "layers", "state", "val_loss", "node", "run"], heads
            best = page.locator(f'{table} tr[data-best="1"]')
            assert best.count() == 1 and best.get_attribute("data-trial") == "1"
            assert "best" in (best.get_attribute("class") or "")
            cells = best.locator("td").all_inner_texts()
            assert cells[:6] == ["1", "0.01000", "3", "complete", "0.1200", "b"], cells
            assert page.locator(f'{table} tr[data-trial="2"] td[data-state="running"]').count() == 1
            assert page.locator(f'{table} tr[data-trial="3"] td[data-state="failed"]').count() == 1
            heading = page.locator('#sweeps .sweep[data-sweep="lrs"] h3').inner_text()
            assert "lrs" in heading and "best: trial 1" in heading and "running" in heading, heading
            assert page.locator("#no-sweeps").is_hidden()
            # the sweep moves on (trial 2 finishes, the new best): the page follows without a reload
            write_sweep(home, "lrs", "done", [
                trial(0, 0.003, "complete", 0.31, "a"),
                trial(1, 0.01, "complete", 0.12, "b"),
                trial(2, 0.05, "complete", 0.05, "c"),
                trial(3, 0.2, "failed", None, "a", message="it never reported val_loss"),
            ], best=2)  # fmt: skip
            page.wait_for_selector(f'{table} tr[data-best="1"][data-trial="2"]', timeout=8_000)
            assert page.locator(f'{table} tr[data-best="1"]').count() == 1
            assert page.locator('#sweeps .sweep[data-sweep="lrs"] h3 [data-state="done"]').count() == 1
            assert not outside, outside
        finally:
            browser.close()
