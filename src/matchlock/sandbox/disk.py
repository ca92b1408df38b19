"""The per-sandbox writable layer: a sparse ext4 file copied from a cached empty template.

Formatting costs a subprocess (~25 ms); copying the template's few MiB of metadata with
SEEK_DATA/SEEK_HOLE costs a couple of milliseconds, so the template is made once per size.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
from pathlib import Path

from matchlock.errors import MatchlockError, SetupMissing
from matchlock.paths import cache_dir

MIN_DISK_MB = 64
MAX_DISK_MB = 1 << 20


def template(size_mb: int) -> Path:
    if not MIN_DISK_MB <= size_mb <= MAX_DISK_MB:
        raise MatchlockError(
            f"disk size {size_mb} MiB is out of range",
            hint=f"use --disk-size between {MIN_DISK_MB} and {MAX_DISK_MB}",
        )
    path = cache_dir() / "upper" / f"ext4-{size_mb}M.img"
    if path.exists():
        return path
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
    if mkfs is None:
        raise SetupMissing("mkfs.ext4 not found", hint="run `matchlock setup` (installs e2fsprogs)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            subprocess.run(
                [mkfs, "-q", "-F", "-O", "^has_journal", "-m", "0",
                 "-E", "lazy_itable_init=1,nodiscard", "-L", "upper", str(tmp), f"{size_mb}M"],
                check=True, capture_output=True,
            )
        except subprocess.CalledProcessError as e:
            tmp.unlink(missing_ok=True)
            msg = e.stderr.decode(errors="replace").strip().splitlines()
            raise MatchlockError(
                f"cannot create the writable layer: {msg[-1] if msg else e}",
                hint="check free space in " + str(path.parent),
            ) from None
        tmp.replace(path)
    return path


def sparse_copy(src: Path, dst: Path, mode: int = 0o666) -> None:
    """Copy the data regions of `src` to `dst`, a new file (`mode`, less the umask) or an
    existing one (its mode kept)."""
    def opener(path: str, flags: int) -> int:
        return os.open(path, flags, mode)

    with open(src, "rb") as fin, open(dst, "wb", opener=opener) as fout:
        size = os.fstat(fin.fileno()).st_size
        fout.truncate(size)
        copy_data(fin.fileno(), fout.fileno(), size)


def copy_data(src: int, dst: int, size: int) -> None:
    """Copy the data regions of the first `size` bytes of `src` to the same offsets of `dst`."""
    off = 0
    while off < size:
        try:
            start = os.lseek(src, off, os.SEEK_DATA)
        except OSError:
            break  # ENXIO: only a hole remains
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        _copy_range(src, dst, start, end)
        off = end


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        try:
            n = os.copy_file_range(src, dst, end - pos, pos, pos)
        except OSError as e:
            # Across file systems (a VMM's memfd to a disk file) the kernel refuses.
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            break
        if n == 0:
            return
        pos += n
    while pos < end:
        chunk = os.pread(src, min(1 << 20, end - pos), pos)
        if not chunk:
            return
        os.pwrite(dst, chunk, pos)
        pos += len(chunk)


def make_upper(dest: Path, size_mb: int) -> Path:
    sparse_copy(template(size_mb), dest)
    return dest
