"""The local terminal for `run` and `exec`: its size, raw mode and stdin (light: no sandbox
imports, so a fresh `matchlock exec` stays quick)."""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


def term_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdin.fileno())
        return max(1, size.lines), max(1, size.columns)
    except OSError:
        return 24, 80


class raw_terminal:  # lower case: used like the function it replaced
    """Raw mode on the local terminal for the `with` block, when enabled. A class, not a
    contextlib generator: contextlib costs a fresh `matchlock exec` ~1 ms."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._saved: list[Any] | None = None

    def __enter__(self) -> None:
        if not self._enabled:
            return
        import termios
        import tty

        fd = sys.stdin.fileno()
        self._saved = termios.tcgetattr(fd)
        tty.setraw(fd)

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved)
            self._saved = None


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
