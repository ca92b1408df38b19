"""Processes as tests see them through /proc: the fork servers of a state dir, a process's
parent, state and memory."""

from __future__ import annotations

import os
import time
from pathlib import Path


def pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def cmdline(pid: int) -> bytes:
    """NUL-separated arguments; b"" for a process that is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _stat(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def parent(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if fields else 0


def state(pid: int) -> str:
    """R, S, T, Z…; "" for a process that is gone."""
    fields = _stat(pid)
    return fields[0] if fields else ""


def gone(pid: int, timeout: float) -> bool:
    """Whether pid exits (or is a zombie) within timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state(pid) in ("", "Z"):
            return True
        time.sleep(0.05)
    return False


def fork_servers(under: Path) -> list[int]:
    """The fork servers (cli/forkserver.py) whose socket is below `under`. Not their forks:
    a run shows its server's command line too, but its parent is a server."""
    found = [p for p in pids() if b"matchlock.cli.forkserver" in (c := cmdline(p))
             and os.fsencode(under) in c]
    return [p for p in found if parent(p) not in found]


def memory(pid: int) -> bytes:
    """Every readable mapping of pid, concatenated (for looking for a value in it)."""
    chunks = []
    with open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            span, perms = line.split()[:2]
            if "r" not in perms or line.endswith(("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                chunks.append(mem.read(end - start))
            except (OSError, OverflowError, ValueError):
                continue
    return b"".join(chunks)
