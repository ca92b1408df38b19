"""The local terminal for `run` and `exec`: its size, raw mode and stdin (light: no sandbox
imports, so a fresh `matchlock exec` stays quick)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def term_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdin.fileno())
        return max(1, size.lines), max(1, size.columns)
    except OSError:
        return 24, 80


@contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def pump_stdin(write: Callable[[bytes], None], close: Callable[[], None],
               gone: tuple[type[BaseException], ...] = (OSError,)) -> None:
    """Copy stdin to `write` until EOF, then `close()`; stop quietly when either side is
    `gone`. Runs on a thread of its own."""
    fd = sys.stdin.fileno()
    try:
        while data := os.read(fd, 65536):
            write(data)
        close()
    except gone:
        pass
