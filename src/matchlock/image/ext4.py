"""Pack a directory tree into an ext4 image file with mkfs.ext4 -d (no mount, no loop device)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from matchlock.errors import ImageError, SetupMissing

MIB = 1 << 20
_BLOCK = 4096
_INODE_SIZE = 256
# Symlink targets shorter than this live inside the inode (ext4 "fast" symlinks).
_FAST_SYMLINK_MAX = 60
_SLACK = 64 * MIB
_SBIN_DIRS = ("/usr/sbin", "/sbin")


@dataclass(frozen=True)
class TreeUsage:
    bytes: int
    inodes: int


def _blocks(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def measure_tree(root: Path) -> TreeUsage:
    """Estimate the ext4 space a tree needs: data blocks, directory blocks, inode tables."""
    used = 0
    inodes = 1
    seen: set[tuple[int, int]] = set()
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue  # hard link: the data is counted once
                    seen.add(key)
                inodes += 1
                used += _INODE_SIZE
                if stat.S_ISDIR(st.st_mode):
                    used += max(_BLOCK, _blocks(st.st_size))
                    stack.append(entry.path)
                elif stat.S_ISREG(st.st_mode):
                    used += _blocks(st.st_size)
                elif stat.S_ISLNK(st.st_mode) and st.st_size >= _FAST_SYMLINK_MAX:
                    used += _BLOCK
    return TreeUsage(bytes=used, inodes=inodes)


def _mkfs() -> str:
    found = shutil.which("mkfs.ext4")
    if found is None:
        # Non-root shells often lack the sbin directories in PATH.
        found = shutil.which("mkfs.ext4", path=os.pathsep.join(_SBIN_DIRS))
    if found is None:
        raise SetupMissing(
            "mkfs.ext4 not found: it is needed to build image root filesystems",
            hint="install e2fsprogs (apt-get install e2fsprogs)",
        )
    return found


def make_ext4(source: Path, dest: Path, *, label: str = "rootfs") -> TreeUsage:
    """Create `dest` as an ext4 file holding a copy of `source` (owners, modes, xattrs kept).

    Sized at 1.2x the estimated use plus 64 MiB, with inodes for every file plus a margin;
    the guest mounts it read-only, so the slack only absorbs estimation error.
    """
    usage = measure_tree(source)
    size_mib = -(-(usage.bytes * 6 // 5 + _SLACK) // MIB)
    inodes = usage.inodes + max(1024, usage.inodes // 10)
    cmd = [
        _mkfs(),
        "-q",
        "-F",
        "-O",
        "^has_journal",
        "-E",
        "root_owner=0:0",
        "-L",
        label,
        # Without -b, mke2fs picks 1 KiB blocks for file systems under 512 MiB ("small").
        "-b",
        str(_BLOCK),
        "-N",
        str(inodes),
        "-d",
        str(source),
        str(dest),
        f"{size_mib}M",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        why = lines[-1] if lines else f"exit status {result.returncode}"
        raise ImageError(
            f"mkfs.ext4 could not build {dest.name}: {why}",
            hint=f"check free space under {dest.parent}",
        )
    return usage
