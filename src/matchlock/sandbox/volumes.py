"""Named volumes: ext4 image files in `~/.matchlock/volumes/<name>.ext4` that outlive sandboxes.

A volume is data, so it lives in the state directory, not in the (rebuildable) cache where the
reference keeps it. The host only ever creates (mkfs), copies, locks and deletes these files;
it never mounts one, so a file system a guest damaged can hurt nothing but a guest.

Who uses a volume is decided by `flock` on the file: a sandbox holds LOCK_EX while it writes
and LOCK_SH while it reads (sandbox/disks.py); `rm` needs LOCK_EX and `cp` LOCK_SH, both
without waiting. Files appear complete or not at all: created and copied under a temporary
name, then linked into place (which fails if the name exists) so nothing half-made remains.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from matchlock.errors import MatchlockError, SetupMissing
from matchlock.paths import state_dir

SUFFIX = ".ext4"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
MAX_NAME = 128
DEFAULT_SIZE_MB = 10240
MIN_SIZE_MB = 16
MAX_SIZE_MB = 1 << 20  # 1 TiB: the capacity of a disk slot (sandbox/disks.py)
EXT4_MAGIC_OFFSET = 1080
EXT4_MAGIC = b"\x53\xef"


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    size_bytes: int
    path: Path

    @property
    def size(self) -> str:
        return f"{self.size_bytes / (1 << 20):.1f} MB"

    def as_json(self) -> dict[str, str]:
        # The SDK (VolumeInfo(name, size, path)) parses exactly these keys.
        return {"name": self.name, "size": self.size, "path": str(self.path)}


def volumes_dir(create: bool = False) -> Path:
    d = state_dir() / "volumes"
    if create:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def check_name(name: str) -> str:
    n = name.strip()
    if not n or len(n) > MAX_NAME or not _NAME.match(n):
        raise MatchlockError(f"invalid volume name {name!r}",
                             hint="use letters, digits, '_', '.' and '-', starting with a "
                             f"letter or digit, at most {MAX_NAME} characters")
    return n


def path_of(name: str) -> Path:
    return volumes_dir() / f"{check_name(name)}{SUFFIX}"


def check_size(size_mb: int) -> int:
    if not MIN_SIZE_MB <= size_mb <= MAX_SIZE_MB:
        raise MatchlockError(f"volume size {size_mb} MB is out of range",
                             hint=f"use --size between {MIN_SIZE_MB} and {MAX_SIZE_MB}")
    return size_mb


def _not_found(name: str) -> MatchlockError:
    return MatchlockError(f"named volume not found: {name}",
                          hint="see `matchlock volume ls`, or create it with "
                          f"`matchlock volume create {name}`")


def _mkfs() -> str:
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
    if mkfs is None:
        raise SetupMissing("mkfs.ext4 not found", hint="install e2fsprogs")
    return mkfs


@contextlib.contextmanager
def _temporary(final: Path) -> Iterator[Path]:
    """A temporary file next to `final`, removed unless it was linked into place."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, final: Path, name: str) -> None:
    try:
        os.link(tmp, final)  # atomic, and never replaces an existing volume
    except FileExistsError:
        raise MatchlockError(f"named volume already exists: {name}",
                             hint="pick another name, or `matchlock volume rm` it first") from None


def format_image(path: Path, size_mb: int, label: str = "") -> None:
    """A new, empty ext4 file system in a new sparse file (the caller removes it on error)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    try:
        os.ftruncate(fd, size_mb << 20)
    except OSError as e:
        raise MatchlockError(f"cannot create the volume file {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    # A journal: a sandbox killed mid-write leaves a file system the next one recovers.
    # lazy_*_init: nothing to zero in a sparse file (the guest mounts with noinit_itable).
    argv = [_mkfs(), "-q", "-F", "-m", "0", "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard", str(path)]
    if label:
        argv[1:1] = ["-L", label[:16]]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines()
        raise MatchlockError(f"mkfs.ext4 failed: {lines[-1] if lines else r.returncode}",
                             hint=f"check free space in {path.parent}")


def create(name: str, size_mb: int = DEFAULT_SIZE_MB) -> VolumeInfo:
    name = check_name(name)
    check_size(size_mb)
    final = volumes_dir(create=True) / f"{name}{SUFFIX}"
    if final.exists():
        raise MatchlockError(f"named volume already exists: {name}",
                             hint="pick another name, or `matchlock volume rm` it first")
    with _temporary(final) as tmp:
        format_image(tmp, size_mb, label=name)
        _publish(tmp, final, name)
    return info(name)


def info(name: str) -> VolumeInfo:
    path = path_of(name)
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        raise _not_found(name) from None
    if not stat.S_ISREG(st.st_mode):
        raise MatchlockError(f"volume {name}: {path} is not a regular file")
    return VolumeInfo(check_name(name), st.st_size, path)


def list_volumes() -> list[VolumeInfo]:
    d = volumes_dir()
    out = []
    try:
        entries = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    for fname in entries:
        if not fname.endswith(SUFFIX) or fname.startswith("."):
            continue  # temporary files of a create or copy in progress
        name = fname[: -len(SUFFIX)]
        if not _NAME.match(name):
            continue
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(d / fname, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                out.append(VolumeInfo(name, st.st_size, d / fname))
    return out


def open_locked(path: Path, *, write: bool, what: str) -> int:
    """Open an image file and take its lock without waiting (exclusive to write, shared to
    read); fails with one line when another sandbox (or a cp/rm) holds it. Checks that the
    path still names the locked file (a concurrent rm could have unlinked it meanwhile)."""
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise MatchlockError(f"{what}: {path} does not exist") from None
    except OSError as e:
        raise MatchlockError(f"{what}: cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MatchlockError(f"{what}: {path} is not a regular file")
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if write else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            users = "a sandbox (or a volume cp/rm)" if write else "a sandbox writing it"
            raise MatchlockError(f"{what} is in use by {users}",
                                 hint="wait for it to stop, or attach it read-only (:ro) "
                                 "next to other readers") from None
        try:
            now = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise MatchlockError(f"{what}: {path} was removed or replaced while opening it")
        return fd
    except BaseException:
        os.close(fd)
        raise


def remove(name: str) -> None:
    path = info(name).path
    fd = open_locked(path, write=True, what=f"volume {check_name(name)}")
    try:
        path.unlink()  # while locked: no sandbox can be starting on it
    finally:
        os.close(fd)


def copy(src: str, dst: str) -> VolumeInfo:
    src, dst = check_name(src), check_name(dst)
    if src == dst:
        raise MatchlockError("copy named volume: source and destination must be different")
    source = info(src).path
    final = volumes_dir(create=True) / f"{dst}{SUFFIX}"
    if final.exists():
        raise MatchlockError(f"named volume already exists: {dst}",
                             hint="pick another name, or `matchlock volume rm` it first")
    from matchlock.sandbox.disk import sparse_copy

    fd = open_locked(source, write=False, what=f"volume {src}")  # no writer meanwhile
    try:
        st = os.fstat(fd)
        with _temporary(final) as tmp:
            try:
                sparse_copy(Path(f"/proc/self/fd/{fd}"), tmp, mode=0o600)
                os.chmod(tmp, stat.S_IMODE(st.st_mode))
                with contextlib.suppress(PermissionError):
                    os.chown(tmp, st.st_uid, st.st_gid)
                os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise MatchlockError(
                        f"copy volume {src}: no space left in {final.parent}") from None
                raise MatchlockError(f"copy volume {src}: {e.strerror or e}") from None
            _publish(tmp, final, dst)
    finally:
        os.close(fd)
    return info(dst)


def has_ext4_magic(fd: int) -> bool:
    return os.pread(fd, 2, EXT4_MAGIC_OFFSET) == EXT4_MAGIC
