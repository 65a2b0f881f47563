"""The dashboard's HTTP server (aiohttp): the page, its JSON, a server-sent event stream, cancel.

One task polls the source every POLL_S seconds into the `Board`; each open
page holds one SSE stream (`/api/events`) that is sent the board's view
whenever its version moves (everything first, then only what is new), so a
change reaches the browser within POLL_S plus a render. Server-sent events
rather than a WebSocket: the traffic is one way, EventSource reconnects by
itself, and it is plain HTTP that any proxy passes.

Routes (JSON unless said): GET / (the page), /static/* (the page's files,
uPlot included: no CDN), /api/session, POST /api/login, POST /api/logout,
GET /api/state, GET /api/jobs/{job}, GET /api/runs/{job} (a recorded job's
points, from the run store), GET /api/sweeps (the live tables of the sweeps
started on this machine, `$MESHTRAIN_HOME/sweeps/*.json`, read-only like the
other views; the stream carries them too, re-read every SWEEPS_EVERY_S: a few
small files), GET /api/events (SSE), POST
/api/jobs/{job}/cancel, POST /api/checkpoints/{run}/{step}/export, GET
/api/exports/{name} (the exported file). Security is `auth`'s: open on
loopback (Host header checked), a login everywhere else; cancel and export
always need the CSRF token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from importlib import resources
from typing import Any

from aiohttp import web

from meshtrain.dashboard.auth import (
    COOKIE,
    CSRF_HEADER,
    LoginLimiter,
    Session,
    Sessions,
    csrf_ok,
    is_loopback,
    loopback_host_header,
)
from meshtrain.dashboard.board import Board
from meshtrain.dashboard.exports import Exports
from meshtrain.dashboard.history import recorded_points, recorded_runs
from meshtrain.dashboard.source import Source, sweep_tables
from meshtrain.errors import UserError
from meshtrain.status import FINISHED_JOB_STATES

log = logging.getLogger("meshtrain.dashboard")

POLL_S = 0.25
CHECKPOINTS_EVERY_S = 5.0  # and the recorded runs: both are file reads, in a thread
SWEEPS_EVERY_S = 1.0  # a sweep rewrites its table on every trial event
HEARTBEAT_S = 15.0
STATIC_FILES = {
    "app.js": "application/javascript",
    "app.css": "text/css",
    "uPlot.iife.min.js": "application/javascript",
    "uPlot.min.css": "text/css",
    "uPlot.LICENSE": "text/plain",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _static(name: str) -> bytes:
    return resources.files("meshtrain.dashboard").joinpath("static", name).read_bytes()


def _json_safe(obj: Any) -> Any:
    """NaN and infinities are not JSON: a diverged loss shows as null, not a broken page."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _dumps(obj: Any) -> str:
    return json.dumps(_json_safe(obj), separators=(",", ":"))


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(text=_dumps(obj), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status=status)


class Dashboard:
    """`await start()` -> the URL; `await close()`. Login is needed unless `host` is loopback."""

    def __init__(
        self,
        source: Source,
        host: str = "127.0.0.1",
        port: int = 0,
        login_secret: str | None = None,
        poll_s: float = POLL_S,
        clock: Any = time.monotonic,
    ) -> None:
        self.source = source
        self.host = host
        self.port = port
        self.open = is_loopback(host)
        if not self.open and not login_secret:
            raise UserError("a dashboard on a non-loopback address needs the mesh secret for its login")
        self.login_secret = login_secret or ""
        self.poll_s = poll_s
        self.clock = clock
        self.board = Board()
        self.sessions = Sessions()
        self.limiter = LoginLimiter()
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._sse: set[web.StreamResponse] = set()
        self.exports = Exports(on_change=self._exports_changed)
        self._lists_now = asyncio.Event()  # wakes the checkpoint and run listing early
        self.app = self._make_app()

    # ------------------------------------------------------------------ lifecycle

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static_file)
        app.router.add_get("/api/session", self._session)
        app.router.add_post("/api/login", self._login)
        app.router.add_post("/api/logout", self._logout)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/jobs/{job}", self._job)
        app.router.add_post("/api/jobs/{job}/cancel", self._cancel)
        app.router.add_get("/api/runs/{job}", self._run_history)
        app.router.add_get("/api/sweeps", self._sweeps)
        app.router.add_post("/api/checkpoints/{run}/{step}/export", self._export)
        app.router.add_get("/api/exports/{name}", self._download)
        app.router.add_get("/api/events", self._events)
        return app

    async def start(self) -> str:
        await self.poll_once()
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, shutdown_timeout=1.0)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise UserError(
                f"cannot serve the dashboard on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        self._tasks.append(asyncio.create_task(self._poll_forever()))
        self._tasks.append(asyncio.create_task(self._checkpoints_forever()))
        self._tasks.append(asyncio.create_task(self._sweeps_forever()))
        return self.url

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for stream in list(self._sse):
            with contextlib.suppress(Exception):
                await stream.write_eof()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.exports.close()

    # ------------------------------------------------------------------ polling

    async def poll_once(self) -> None:
        try:
            mesh, jobs = await self.source.snapshots()
        except (UserError, OSError) as exc:
            changed = self.board.agent_unreachable(str(exc))
        else:
            changed = self.board.update(mesh, jobs, time.time())
        if changed:
            async with self._changed:
                self._changed.notify_all()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - one bad snapshot must not stop the page's updates
                log.exception("dashboard poll failed")

    async def _checkpoints_forever(self) -> None:
        seen_finished: set[str] = set()
        while True:
            try:
                runs = await self.source.checkpoints()
            except Exception as exc:  # noqa: BLE001 - a listing problem shows as no checkpoints
                log.debug("checkpoint listing failed: %r", exc)
                runs = []
            try:
                recorded = await asyncio.to_thread(recorded_runs, self.source.runs_db())
            except Exception as exc:  # noqa: BLE001 - an unreadable run store shows as no history
                log.debug("run store listing failed: %r", exc)
                recorded = []
            changed = self.board.set_checkpoints(runs)
            changed = self.board.set_runs(recorded) or changed
            if changed:
                async with self._changed:
                    self._changed.notify_all()
            finished = {j for j, r in self.board.jobs.items() if r.finished}
            if finished - seen_finished:
                seen_finished |= finished
                await asyncio.sleep(1.0)  # a job just ended: its record and checkpoints land within ~1 s
                continue
            self._lists_now.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._lists_now.wait(), CHECKPOINTS_EVERY_S)

    async def _sweeps_forever(self) -> None:
        while True:
            try:
                tables = await asyncio.to_thread(sweep_tables, self.source)
            except Exception as exc:  # noqa: BLE001 - an unreadable sweeps folder shows as no sweeps
                log.debug("sweep listing failed: %r", exc)
                tables = []
            if self.board.set_sweeps(tables):
                await self._notify()
            await asyncio.sleep(SWEEPS_EVERY_S)

    def _exports_changed(self) -> None:
        self.board.touch()
        self._lists_now.set()  # an export that found its checkpoint pruned: the table drops it now
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ security

    def _session_of(self, request: web.Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE), self.clock())

    def _authorised(self, request: web.Request) -> bool:
        if self.open:
            return True
        session = self._session_of(request)
        return session is not None and session.logged_in

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.open and not loopback_host_header(request.headers.get("Host")):
            return _error(421, "this dashboard answers only to a loopback host name")
        public = request.path in ("/", "/api/session", "/api/login") or request.path.startswith("/static/")
        if not public and not self._authorised(request):
            response: web.StreamResponse = _error(401, "log in first")
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = _error(exc.status, exc.reason)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    def _set_cookie(self, response: web.StreamResponse, session: Session) -> None:
        response.set_cookie(
            COOKIE, session.id, httponly=True, samesite="Strict", path="/", max_age=int(self.sessions.ttl)
        )

    # ------------------------------------------------------------------ pages

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=_static("index.html"), content_type="text/html", charset="utf-8")

    async def _static_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            return _error(404, "no such file")
        return web.Response(body=_static(name), content_type=STATIC_FILES[name])

    async def _session(self, request: web.Request) -> web.Response:
        """Whether a login is needed, whether this browser has one, and its CSRF token."""
        session = self._session_of(request)
        made = None
        if session is None and self.open:
            session = made = self.sessions.create(self.clock(), logged_in=False)
        usable = session is not None and (self.open or session.logged_in)
        response = _json(
            {
                "login_required": not self.open,
                "logged_in": bool(session and session.logged_in),
                "csrf": session.csrf if usable and session else None,
            }
        )
        if made is not None:
            self._set_cookie(response, made)
        return response

    async def _login(self, request: web.Request) -> web.Response:
        source = request.remote or "?"
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        offered = body.get("secret") if isinstance(body, dict) else None
        if not isinstance(offered, str):
            return _error(400, 'send {"secret": "..."}')
        if self.open:
            return _error(400, "this dashboard needs no login (it listens on loopback only)")
        verdict = self.limiter.check(source, self.login_secret, offered, self.clock())
        if verdict == "limited":
            return _error(429, "too many refused logins from this address; wait a minute")
        if verdict == "refused":
            return _error(403, "wrong login secret")
        self.sessions.end(request.cookies.get(COOKIE))
        session = self.sessions.create(self.clock(), logged_in=True)
        response = _json({"logged_in": True, "csrf": session.csrf})
        self._set_cookie(response, session)
        return response

    async def _logout(self, request: web.Request) -> web.Response:
        session = self._session_of(request)
        if not csrf_ok(session, request.headers.get(CSRF_HEADER)):
            return _error(403, "missing or wrong CSRF token")
        self.sessions.end(request.cookies.get(COOKIE))
        response = _json({"logged_in": False})
        response.del_cookie(COOKIE, path="/")
        return response

    def _extra(self) -> dict[str, Any]:
        return {
            "logins": {"refused": self.limiter.refused, "rate_limited": self.limiter.rate_limited},
            "open": self.open,
            "exports": self.exports.views(),
        }

    async def _state(self, request: web.Request) -> web.Response:
        body, _ = self.board.view(None, self._extra())
        return _json(body)

    async def _job(self, request: web.Request) -> web.Response:
        record = self.board.job(request.match_info["job"])
        if record is None:
            return _error(404, f"no job {request.match_info['job']!r} on this node")
        view, _ = record.view((0, 0))
        return _json(view)

    async def _cancel(self, request: web.Request) -> web.Response:
        job = request.match_info["job"]
        refused = self._may_act(request)
        if refused is not None:
            return refused
        record = self.board.job(job)
        if record is None:
            return _error(404, f"no job {job!r} on this node")
        if record.snap.get("state") in FINISHED_JOB_STATES:
            return _error(409, f"job {job} already ended ({record.snap.get('state')})")
        ok, message = await self.source.cancel(job, "cancelled from the dashboard")
        if not ok:
            return _error(409, message or f"job {job} cannot be cancelled from this node")
        log.warning("job %s cancelled from the dashboard by %s", job, request.remote)
        return _json({"ok": True, "message": message})

    def _may_act(self, request: web.Request) -> web.Response | None:
        """None when this request may change something (a login off loopback, and the CSRF token)."""
        session = self._session_of(request)
        if not self.open and (session is None or not session.logged_in):
            return _error(401, "log in first")
        if not csrf_ok(session, request.headers.get(CSRF_HEADER)):
            return _error(403, "missing or wrong CSRF token")
        return None

    async def _run_history(self, request: web.Request) -> web.Response:
        job = request.match_info["job"]
        try:
            found = await asyncio.to_thread(recorded_points, self.source.runs_db(), job)
        except (UserError, OSError) as exc:
            return _error(503, f"cannot read this node's run store: {exc}")
        if found is None:
            return _error(404, f"no recorded run {job!r} on this node")
        return _json(found)

    async def _sweeps(self, request: web.Request) -> web.Response:
        """The sweeps' tables as on disk now (not the board's copy, which is up to SWEEPS_EVERY_S old)."""
        try:
            tables = await asyncio.to_thread(sweep_tables, self.source)
        except (UserError, OSError) as exc:
            return _error(503, f"cannot read this machine's sweeps: {exc}")
        return _json({"sweeps": tables})

    async def _export(self, request: web.Request) -> web.Response:
        refused = self._may_act(request)
        if refused is not None:
            return refused
        run, step_text = request.match_info["run"], request.match_info["step"]
        if not step_text.isdigit():
            return _error(400, f"not a step: {step_text!r}")
        step = int(step_text)
        listed = {(r.get("run"), c.get("step")) for r in self.board.checkpoints for c in r["checkpoints"]}
        if (run, step) not in listed:
            return _error(404, f"no complete checkpoint {run}@{step} on this node")
        item = self.exports.start(self.source.checkpoint_root(), run, step)
        log.warning("export of %s@%d started from the dashboard by %s", run, step, request.remote)
        return _json({"ok": True, "export": item.view()})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = self.exports.path_of(name)
        if path is None:
            return _error(404, f"no finished export {name!r} here (start one from the checkpoints table)")
        return web.FileResponse(
            path,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Disposition": f'attachment; filename="{name}"',
            },
        )

    async def _wait_change(self, seen: int) -> None:
        """Until the board moves past version `seen`, or HEARTBEAT_S (a keep-alive is due)."""
        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.board.version != seen), HEARTBEAT_S
                )

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        await response.prepare(request)
        self._sse.add(response)
        cursor: dict[str, tuple[int, int]] = {}
        sent_version = -1
        try:
            while True:
                if self.board.version != sent_version:
                    sent_version = self.board.version
                    body, cursor = self.board.view(cursor, self._extra())
                    await response.write(f"data: {_dumps(body)}\n\n".encode())
                else:
                    await response.write(b": keep-alive\n\n")
                await self._wait_change(sent_version)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._sse.discard(response)
        return response
