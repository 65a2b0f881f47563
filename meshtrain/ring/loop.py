"""A private asyncio event loop (uvloop when installed) on a daemon thread.

The training loop is synchronous user code; the ring's I/O is asyncio. Rather
than make the user's script async, each process gets one background loop and
the sync facade hands it coroutines (`run_sync`). The handoff costs tens of
microseconds per all-reduce; at world size 1 the loop is never started.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # Windows, or a minimal install: the standard loop works too
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def background_loop() -> asyncio.AbstractEventLoop:
    """The process's ring loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = _new_loop()
            ready = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            threading.Thread(target=serve, name="meshtrain-ring-loop", daemon=True).start()
            ready.wait()
            _loop = loop
        return _loop


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on the background loop and wait for its result from a plain thread.

    If the waiting thread is interrupted (Ctrl-C), the coroutine is cancelled
    before the interruption propagates, so no half-finished I/O keeps running.
    """
    future = asyncio.run_coroutine_threadsafe(coro, background_loop())
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise
