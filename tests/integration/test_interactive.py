"""`run -it` driven through a real pseudo-terminal, as a person at a terminal would."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import termios
import time
from pathlib import Path

import pytest

from .conftest import MATCHLOCK, leftovers

pytestmark = pytest.mark.vm


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _expect(fd: int, needle: bytes, buf: bytearray, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} not seen; screen so far: {bytes(buf)!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                raise AssertionError(f"EOF before {needle!r}; screen: {bytes(buf)!r}")
            buf += chunk
    del buf[: buf.index(needle) + len(needle)]


def test_pty_session_prompt_input_resize(state_dir: Path) -> None:
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(MATCHLOCK, [MATCHLOCK, "run", "-it", "-e", "PS1=PROMPT> ", "--", "sh"])
    try:
        _set_size(fd, 30, 100)
        buf = bytearray()
        _expect(fd, b"PROMPT> ", buf)
        os.write(fd, b"stty size; tty\r")
        _expect(fd, b"30 100", buf)
        _expect(fd, b"/dev/pts/", buf)
        _expect(fd, b"PROMPT> ", buf)
        _set_size(fd, 40, 120)  # the kernel sends SIGWINCH to matchlock, which forwards it
        time.sleep(0.5)
        os.write(fd, b"stty size\r")
        _expect(fd, b"40 120", buf)
        _expect(fd, b"PROMPT> ", buf)
        os.write(fd, b"sleep 100\r")
        time.sleep(1)
        os.write(fd, b"\x03")  # Ctrl-C typed at the terminal interrupts the guest's sleep
        _expect(fd, b"PROMPT> ", buf)
        os.write(fd, b"exit 3\r")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 3
    finally:
        os.close(fd)
    assert leftovers(state_dir) == []
