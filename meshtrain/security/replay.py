"""Replay protection for datagrams: a per-sender sliding sequence window and a timestamp window.

Pure: no clock of its own (`now` is passed in) and no I/O. Every sender
picks a random session nonce when it starts and numbers its datagrams
0, 1, 2, ...; the receiver keeps, per session, the highest number seen and
a bitmap of the `window` numbers below it (RFC 4303's anti-replay window,
as IPsec does). A number seen before, or older than the window, is a replay.
A datagram whose timestamp is further than `max_skew` seconds from the
receiver's clock is stale: that bounds how long a captured datagram is
worth anything, also across a receiver restart or a session the receiver
forgot. Memory is bounded: `window` bits per session and at most
`max_senders` sessions, least recently used forgotten first (a forgotten
session's old datagrams are then still rejected by the timestamp window
unless they are fresh, and they can only be fresh within `max_skew`).

The receiver must only call this after the datagram's tag verified, so a
stranger cannot fill the table.
"""

from __future__ import annotations

from collections import OrderedDict

REPLAY = "replay"
STALE = "stale"


class SequenceWindow:
    """The anti-replay window of one session: accepts each sequence number at most once."""

    __slots__ = ("size", "highest", "_bits")

    def __init__(self, size: int = 1024) -> None:
        if size < 1:
            raise ValueError("window size must be >= 1")
        self.size = size
        self.highest = -1
        self._bits = 0  # bit i set: number highest - i was seen

    def seen_or_too_old(self, seq: int) -> bool:
        if seq > self.highest:
            return False
        offset = self.highest - seq
        return offset >= self.size or bool(self._bits >> offset & 1)

    def accept(self, seq: int) -> bool:
        """Record `seq`; False (and nothing recorded) when it is a replay or behind the window."""
        if seq < 0 or self.seen_or_too_old(seq):
            return False
        if seq > self.highest:
            shift = seq - self.highest
            self._bits = ((self._bits << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.highest = seq
        else:
            self._bits |= 1 << (self.highest - seq)
        return True


class ReplayGuard:
    """Per-sender windows for a receiving socket, bounded in senders and in bits per sender."""

    def __init__(self, max_senders: int = 4096, window: int = 1024, max_skew: float = 30.0) -> None:
        self.max_senders = max_senders
        self.window = window
        self.max_skew = max_skew
        self._sessions: OrderedDict[bytes, SequenceWindow] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def check(self, session: bytes, seq: int, timestamp: float, now: float) -> str | None:
        """None to accept (and record) the datagram, else the reason to drop it ("replay" or "stale")."""
        if not abs(timestamp - now) <= self.max_skew:  # also rejects NaN
            return STALE
        win = self._sessions.get(session)
        if win is None:
            win = SequenceWindow(self.window)
            self._sessions[session] = win
            if len(self._sessions) > self.max_senders:
                self._sessions.popitem(last=False)
        else:
            self._sessions.move_to_end(session)
        return None if win.accept(seq) else REPLAY
