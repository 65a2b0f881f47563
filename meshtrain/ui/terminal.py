"""Keep keystrokes from scribbling over a live view.

While a view redraws in place, the terminal's own echo of what the user types
(and the `^C` it prints for Ctrl-C) lands in the middle of the frame; at the
right margin it even wraps a line, so the next redraw starts one line too low
and leaves a stale copy of the frame's top behind. `quiet_input()` turns the
echo off for the duration (signals such as Ctrl-C still work) and restores the
exact previous settings afterwards. Elsewhere (no tty, Windows) it does nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
from collections.abc import Iterator
from typing import Any, TextIO


@contextlib.contextmanager
def quiet_input(stream: TextIO | None = None) -> Iterator[bool]:
    """Echo off on `stream` (stdin) while inside; yields whether anything was changed."""
    stream = stream or sys.stdin
    try:
        import termios

        fd = stream.fileno()
        if not stream.isatty():
            raise OSError("not a terminal")
        saved: list[Any] = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError, AttributeError):
        yield False
        return

    def restore() -> None:
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | getattr(termios, "ECHOCTL", 0))  # lflag
    try:
        termios.tcsetattr(fd, termios.TCSADRAIN, quiet)
    except (OSError, termios.error):
        yield False
        return
    atexit.register(restore)  # even if the process leaves without unwinding this block
    try:
        yield True
    finally:
        restore()
        atexit.unregister(restore)
