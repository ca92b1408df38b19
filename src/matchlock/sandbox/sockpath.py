"""Unix socket paths under the kernel's 108-byte limit. A module of its own (os only) so that
a fresh `matchlock exec` can use it without pathlib or the control client."""

from __future__ import annotations

import os


def sock_path(path: str | os.PathLike[str]) -> str:
    """A path for bind/connect under the 108-byte limit (via /proc/self/fd when long)."""
    s = os.fspath(path)
    if len(s.encode()) < 100:
        return s
    parent, name = os.path.split(s.rstrip("/"))
    fd = os.open(parent or ".", os.O_PATH | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{name}"  # fd kept open for the life of the process
