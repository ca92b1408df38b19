"""`matchlock log [-f] ID`: a sandbox's guest console (kernel messages) and, for a detached
sandbox, its supervisor's log (the background command's output, why it stopped).

Everything here is guest output, so it is hostile: on a terminal, control characters other
than newline and tab are shown escaped (`\\x1b`), never interpreted; piped, the bytes pass as
they are.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import click

from matchlock.errors import MatchlockError

FILES = ("console.log", "supervisor.log")
POLL_S = 0.1
_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


def _escape(data: bytes) -> bytes:
    return _CONTROL.sub(lambda m: b"\\x%02x" % m.group()[0], data)


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset:
                    self.offset = 0  # truncated: start over, as `tail -F` does
                f.seek(self.offset)
                data = f.read(1 << 20)
        except OSError:
            return b""
        self.offset += len(data)
        return data


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the sandbox ends.")
@click.argument("sandbox_id")
def log(follow: bool, sandbox_id: str) -> None:
    """Print a sandbox's console and supervisor logs."""
    from matchlock.state import registry

    entry = registry.lookup(sandbox_id, include_removed=True)
    if not entry.path.is_dir():
        raise MatchlockError(f"sandbox {entry.owner.id} was removed; its logs went with it")
    out = sys.stdout.buffer
    tty = out.isatty()
    readers = [_Reader(entry.path / name) for name in FILES]

    def drain() -> None:
        for r in readers:
            while data := r.read():
                out.write(_escape(data) if tty else data)
            out.flush()

    stop = False

    def on_signal(signo: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    if follow:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, on_signal)
    drain()
    while follow and not stop:
        status = registry.lookup(entry.owner.id, include_removed=True).status
        if status not in registry.ACTIVE:
            drain()  # what it wrote while stopping
            break
        time.sleep(POLL_S)
        drain()
