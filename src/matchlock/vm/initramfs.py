"""A newc cpio writer: the initramfs holds only the guest agent as /init.

Written by hand rather than by `cpio` so the archive is byte-for-byte reproducible (fixed
inode numbers, owners and mtimes) and can be cached under a content key.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _record(ino: int, entry: Entry) -> bytes:
    name = entry.name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino, entry.mode, 0, 0, nlink, 0, len(entry.data),
        0, 0, entry.rdev_major, entry.rdev_minor, len(name), 0,
    )
    header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
    out = header + name + _pad4(len(header) + len(name))
    return out + entry.data + _pad4(len(entry.data))


def build(entries: list[Entry]) -> bytes:
    """Serialize entries (parents before children) into a newc archive."""
    parts = [_record(i + 1, e) for i, e in enumerate(entries)]
    parts.append(_record(0, Entry(_TRAILER, 0)))
    return b"".join(parts)


def agent_initramfs(agent: bytes) -> bytes:
    """The guest's whole initramfs: /dev/console for early kernel output, /init = the agent."""
    return build([
        Entry("dev", stat.S_IFDIR | 0o755),
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev_major=5, rdev_minor=1),
        Entry("mnt", stat.S_IFDIR | 0o755),
        Entry("init", stat.S_IFREG | 0o755, agent),
    ])
