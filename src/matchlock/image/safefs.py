"""Filesystem operations relative to a root directory fd that never follow symlinks.

Layer tars are untrusted: a symlink planted by one entry must never redirect a later entry
outside the root. Every path is walked one component at a time with openat(O_NOFOLLOW), so
a symlink anywhere in the parent chain is detected instead of followed.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable, Sequence

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(Exception):
    """An entry's path cannot be used without following a symlink or leaving the root."""


def split_relative(name: str, what: str) -> tuple[str, ...]:
    """Split an archive path into components, refusing absolute paths and `..`.

    `./` prefixes and doubled slashes are common in real tars and are harmless, so they are
    dropped. An empty result means the root itself.
    """
    if name.startswith("/"):
        raise UnsafePath(f"{what} {name!r} is an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafePath(f"{what} {name!r} contains a '..' component")
    return parts


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def open_dir(
    root_fd: int,
    parts: Sequence[str],
    *,
    create: bool,
    created: Callable[[tuple[str, ...]], None] | None = None,
) -> int | None:
    """Open the directory `parts` below `root_fd` without following any symlink.

    Missing directories are created (mode 0755, owned by us) when `create` is set, and
    reported through `created`; otherwise a missing or non-directory component gives None.
    A symlink component always raises UnsafePath. The caller closes the returned fd.
    """
    fd = os.dup(root_fd)
    try:
        for i, name in enumerate(parts):
            try:
                next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    return None
                os.mkdir(name, 0o755, dir_fd=fd)
                next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.fchmod(next_fd, 0o755)  # mkdir's mode is filtered by the umask
                if created is not None:
                    created(tuple(parts[: i + 1]))
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                path = "/".join(parts[: i + 1])
                st = lstat_at(fd, name)
                if st is not None and stat.S_ISLNK(st.st_mode):
                    raise UnsafePath(f"{path!r} is a symlink; refusing to follow it") from None
                if create:
                    raise UnsafePath(f"{path!r} is not a directory") from None
                os.close(fd)
                return None
            os.close(fd)
            fd = next_fd
        return fd
    except BaseException:
        os.close(fd)
        raise


def remove_at(dir_fd: int, name: str, st: os.stat_result | None = None) -> None:
    """Remove `name` (recursively if a directory) without following symlinks."""
    if st is None:
        st = lstat_at(dir_fd, name)
        if st is None:
            return
    if stat.S_ISDIR(st.st_mode):
        # rmtree with dir_fd uses the fd-based walk that is immune to symlink swaps.
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)
