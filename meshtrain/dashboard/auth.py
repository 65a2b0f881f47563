"""Who may look and who may act: the login secret, sessions, CSRF tokens, refused-login limits. Pure.

On a loopback address the page is open (only this machine's users reach
it), yet cancelling still needs the session's CSRF token, so a web page in
the same browser cannot post to it. On any other address everything but
the login form needs a session, made by logging in with the *login secret*:
HMAC-SHA256 of the mesh secret with a purpose label, so it is the same on
every node of the mesh, it unlocks nothing else (not gossip, not the
control channel), and knowing it reveals nothing about the mesh secret.

Refused logins are counted, and each source address has a token bucket:
a few tries at once, then one every RETRY_S seconds; an address that has
used its tries is refused (HTTP 429) even with the right secret until the
bucket refills. `now` is injected everywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections import OrderedDict
from dataclasses import dataclass

LOGIN_PURPOSE = b"meshtrain dashboard login v1"
LOGIN_SECRET_CHARS = 32
SESSION_TTL_S = 12 * 3600.0
MAX_SESSIONS = 1000
LOGIN_BURST = 5
RETRY_S = 12.0  # one more try per 12 s once the burst is spent: 5 a minute
MAX_SOURCES = 4096
COOKIE = "meshtrain_session"
CSRF_HEADER = "X-CSRF-Token"


def login_secret(mesh_key: bytes) -> str:
    """The dashboard's login secret for a mesh: HMAC(mesh secret, purpose label), 32 hex digits."""
    return hmac.new(mesh_key, LOGIN_PURPOSE, hashlib.sha256).hexdigest()[:LOGIN_SECRET_CHARS]


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the page on this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def loopback_host_header(host_header: str | None) -> bool:
    """A loopback page answers only requests that name a loopback host: no DNS rebinding."""
    if not host_header:
        return False
    if host_header.startswith("["):
        host = host_header[1 : host_header.find("]")]
    else:
        host = host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header
    return is_loopback(host)


@dataclass
class Session:
    id: str
    csrf: str
    expires: float
    logged_in: bool  # False: an open loopback page's session, which only carries a CSRF token


class Sessions:
    def __init__(self, ttl: float = SESSION_TTL_S, max_sessions: int = MAX_SESSIONS) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def create(self, now: float, logged_in: bool) -> Session:
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + self.ttl, logged_in)
        self._by_id[session.id] = session
        while len(self._by_id) > self.max_sessions:
            self._by_id.popitem(last=False)
        return session

    def get(self, session_id: str | None, now: float) -> Session | None:
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        if session.expires <= now:
            del self._by_id[session_id]
            return None
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._by_id.pop(session_id, None)


def csrf_ok(session: Session | None, offered: str | None) -> bool:
    return session is not None and bool(offered) and hmac.compare_digest(session.csrf, offered or "")


class LoginLimiter:
    """Login attempts per source address: a token bucket spent by refused attempts."""

    def __init__(self, burst: int = LOGIN_BURST, retry_s: float = RETRY_S, max_sources: int = MAX_SOURCES):
        self.burst = burst
        self.retry_s = retry_s
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (tokens, at)
        self.refused = 0
        self.rate_limited = 0

    def _tokens(self, source: str, now: float) -> float:
        tokens, at = self._buckets.get(source, (float(self.burst), now))
        return min(float(self.burst), tokens + max(0.0, now - at) / self.retry_s)

    def check(self, source: str, secret: str, offered: str, now: float) -> str:
        """'ok', 'refused' (wrong secret) or 'limited' (too many refusals from this source)."""
        tokens = self._tokens(source, now)
        if tokens < 1.0:
            self.rate_limited += 1
            self._remember(source, tokens, now)
            return "limited"
        if hmac.compare_digest(secret.encode(), offered.strip().encode()):
            self._remember(source, tokens, now)
            return "ok"
        self.refused += 1
        self._remember(source, tokens - 1.0, now)
        return "refused"

    def _remember(self, source: str, tokens: float, now: float) -> None:
        self._buckets.pop(source, None)
        self._buckets[source] = (tokens, now)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
