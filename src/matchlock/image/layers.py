"""Apply one image layer (a tar stream, optionally gzip/zstd compressed) onto a directory.

Semantics follow the OCI image spec's changeset rules: `.wh.NAME` deletes NAME from lower
layers, `.wh..wh..opq` empties a directory of lower-layer content, everything else is
created with its owner, mode, xattrs and mtime. The tar is untrusted: no entry may write
outside the root, and symlinks are created as-is but never followed while extracting.

Run as root: owners, device nodes and setuid bits cannot be reproduced otherwise. On error
the target directory is left half-applied, so extract into a scratch directory.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import math
import os
import shutil
import stat
import tarfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO, Protocol

import zstandard

from matchlock.errors import ImageError
from matchlock.image.digest import CHUNK, DigestReader, verify_digest
from matchlock.image.safefs import UnsafePath, lstat_at, open_dir, remove_at, split_relative

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown
_MAX_MTIME_S = float(2**34)  # far beyond year 2500; keeps hostile values representable

# Xattrs worth carrying into a guest root filesystem. trusted.* (overlayfs metadata among
# others) and the LSM labels under security.* are host policy, not image content.
_XATTR_PREFIXES = ("user.", "security.capability", "system.posix_acl_")
_PAX_XATTR = "SCHILY.xattr."

# OSError covers gzip.BadGzipFile and read errors; filesystem errors are reported per entry.
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError, ValueError, OSError)
_NO_XATTR_SUPPORT = (errno.ENOTSUP, errno.EOPNOTSUPP)


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


class _Reader(io.RawIOBase):
    """Adapts any object with read(n) to RawIOBase so it can be buffered and peeked."""

    def __init__(self, source: _Readable) -> None:
        super().__init__()
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self._source.read(len(view))
        view[: len(data)] = data
        return len(data)


@contextlib.contextmanager
def _decompressed(tap: DigestReader) -> Iterator[io.BufferedReader]:
    compressed = io.BufferedReader(tap, buffer_size=CHUNK)
    magic = compressed.peek(4)[:4]
    source: _Readable
    if magic.startswith(_GZIP_MAGIC):
        source = gzip.GzipFile(fileobj=compressed, mode="rb")
    elif magic.startswith(_ZSTD_MAGIC):
        source = zstandard.ZstdDecompressor().stream_reader(
            compressed, read_across_frames=True, closefd=False
        )
    else:
        source = compressed
    try:
        yield io.BufferedReader(_Reader(source), buffer_size=CHUNK)
    finally:
        if isinstance(source, gzip.GzipFile | zstandard.ZstdDecompressionReader):
            source.close()  # neither closes the underlying stream


def _drain(stream: BinaryIO) -> None:
    while stream.read(CHUNK):
        pass


def apply_layer(
    stream: IO[bytes],
    root: Path,
    *,
    expected_digest: str | None = None,
    label: str | None = None,
) -> None:
    """Apply the layer read from `stream` onto `root`, verifying the blob's digest if given.

    The stream is read once, in chunks; the digest covers every byte of it (the blob as
    stored, i.e. compressed). Raises ImageError for malformed, hostile or mismatching layers.
    """
    label = label or expected_digest or "layer"
    tap = DigestReader(stream)
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(
            f"cannot open {root} to apply layer {label}: {exc.strerror or exc}",
            hint="check that the directory exists and is writable",
        ) from None
    try:
        with _decompressed(tap) as plain:
            if plain.peek(1):
                _extract(plain, _Extractor(root_fd, label))
            _drain(plain)
        tap.drain()
    except UnsafePath as exc:
        raise ImageError(
            f"refusing layer {label}: {exc}",
            hint="the image is malformed or hostile; do not use it",
        ) from None
    except _TAR_ERRORS as exc:
        # A tampered blob usually fails to parse first; say so rather than "corrupt".
        with contextlib.suppress(OSError):
            tap.drain()
            verify_digest(tap.digest, expected_digest, f"layer {label}")
        raise ImageError(
            f"cannot read layer {label}: not a valid (gzip/zstd-compressed) tar ({exc})",
            hint="the image is corrupt; re-export or re-pull it",
        ) from None
    finally:
        os.close(root_fd)
    verify_digest(tap.digest, expected_digest, f"layer {label}")


def _extract(plain: BinaryIO, extractor: _Extractor) -> None:
    try:
        with tarfile.open(fileobj=plain, mode="r|") as tar:
            while (member := tar.next()) is not None:
                # Stream mode keeps every header in tar.members; a layer with millions of
                # entries would pin them all, and nothing here looks back at old members.
                tar.members.clear()  # type: ignore[attr-defined]
                data = tar.extractfile(member) if member.isreg() else None
                extractor.entry(member, data)
        extractor.finish()
    finally:
        extractor.close()


def _mtime_ns(member: tarfile.TarInfo) -> int:
    mtime = float(member.mtime)
    if not math.isfinite(mtime):  # PAX headers can say "inf" or "nan"
        return 0
    # Clamp before scaling: a huge PAX value times 1e9 would overflow to infinity.
    return int(min(max(mtime, 0.0), _MAX_MTIME_S) * 10**9)


def _xattrs(member: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    out = []
    for key, value in member.pax_headers.items():
        if key.startswith(_PAX_XATTR):
            name = key[len(_PAX_XATTR) :]
            if name.startswith(_XATTR_PREFIXES):
                # tarfile decodes PAX values with surrogateescape; this restores the bytes.
                out.append((name, value.encode("utf-8", "surrogateescape")))
    return out


def _set_xattrs(fd: int, member: tarfile.TarInfo) -> None:
    for name, value in _xattrs(member):
        try:
            os.setxattr(fd, name, value)
        except OSError as exc:
            # The scratch filesystem may lack xattr support; the image still works without.
            if exc.errno not in _NO_XATTR_SUPPORT:
                raise


class _DirCache:
    """Open fds of recently used parent directories, by path below the root.

    Entries of a layer come grouped by directory, and walking every entry's path from the
    root (one openat per component) dominated extraction time. Directories are only ever
    opened through `open_dir` (no symlink followed), and every removal drops the fds at and
    below the removed path, so a cached fd always names the directory now at its path.
    """

    _MAX = 64

    def __init__(self, root_fd: int) -> None:
        self._root_fd = root_fd
        self._fds: OrderedDict[tuple[str, ...], int] = OrderedDict()

    def get(self, parts: tuple[str, ...], created: Callable[[tuple[str, ...]], None]) -> int:
        """The directory `parts`, created as needed (not to be closed by the caller)."""
        if not parts:
            return self._root_fd
        fd = self._fds.get(parts)
        if fd is not None:
            self._fds.move_to_end(parts)
            return fd
        base, start = self._root_fd, 0
        for i in range(len(parts) - 1, 0, -1):  # walk on from the longest cached prefix
            prefix_fd = self._fds.get(parts[:i])
            if prefix_fd is not None:
                base, start = prefix_fd, i
                break
        found = open_dir(base, parts[start:], create=True,
                         created=lambda sub: created(parts[:start] + sub))
        assert found is not None  # create=True never yields None
        self._fds[parts] = found
        if len(self._fds) > self._MAX:
            os.close(self._fds.popitem(last=False)[1])
        return found

    def forget(self, path: tuple[str, ...], *, below_only: bool = False) -> None:
        """Drop the fds of `path` and everything below it (before `path` is removed)."""
        n = len(path)
        for key in [k for k in self._fds if k[:n] == path and (len(k) > n or not below_only)]:
            os.close(self._fds.pop(key))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _Extractor:
    """Per-layer extraction state."""

    def __init__(self, root_fd: int, label: str) -> None:
        self._root_fd = root_fd
        self._label = label
        self._parents = _DirCache(root_fd)
        # Paths this layer created, and their ancestors: whiteouts and opaque markers only
        # hide lower layers' content, never entries of the same layer.
        self._seen: set[tuple[str, ...]] = set()
        self._ancestors: set[tuple[str, ...]] = set()
        # Directory mode and mtime are applied last: adding children would bump the
        # mtime, and a read-only mode would be applied before its contents exist.
        self._dirs: dict[tuple[str, ...], tuple[int, int]] = {}

    def entry(self, member: tarfile.TarInfo, data: IO[bytes] | None) -> None:
        parts = split_relative(member.name, "entry")
        try:
            if parts and parts[-1].startswith(WHITEOUT_PREFIX):
                self._whiteout(parts)
            else:
                self._create(parts, member, data)
        except OSError as exc:
            raise ImageError(
                f"cannot extract {member.name!r} from layer {self._label}: {exc.strerror or exc}",
                hint="check free space and that matchlock runs as root",
            ) from None

    def close(self) -> None:
        self._parents.close()

    def finish(self) -> None:
        try:
            self._restore_dirs()
        except OSError as exc:
            raise ImageError(
                f"cannot set directory metadata from layer {self._label}: {exc.strerror or exc}",
                hint="check that matchlock runs as root",
            ) from None

    def _restore_dirs(self) -> None:
        for parts in sorted(self._dirs, key=len, reverse=True):
            mode, mtime_ns = self._dirs[parts]
            try:
                fd = open_dir(self._root_fd, parts, create=False)
            except UnsafePath:
                continue  # replaced by a symlink later in the layer: nothing to restore
            if fd is None:
                continue
            try:
                os.fchmod(fd, mode)
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)

    def _mark(self, parts: tuple[str, ...]) -> None:
        self._seen.add(parts)
        for i in range(1, len(parts)):
            self._ancestors.add(parts[:i])

    def _whiteout(self, parts: tuple[str, ...]) -> None:
        parent, marker = parts[:-1], parts[-1]
        target = marker[len(WHITEOUT_PREFIX) :]
        if marker != OPAQUE_MARKER and target in ("", ".", ".."):
            raise UnsafePath(f"whiteout {'/'.join(parts)!r} names no file")
        dir_fd = open_dir(self._root_fd, parent, create=False)
        if dir_fd is None:
            return  # nothing below to hide
        try:
            if marker == OPAQUE_MARKER:
                self._parents.forget(parent, below_only=True)
                self._clear_lower(dir_fd, parent)
            elif (*parent, target) not in self._seen:
                self._parents.forget((*parent, target))
                remove_at(dir_fd, target)
        finally:
            os.close(dir_fd)

    def _clear_lower(self, dir_fd: int, parent: tuple[str, ...]) -> None:
        for name in os.listdir(dir_fd):
            path = (*parent, name)
            if path not in self._seen and path not in self._ancestors:
                remove_at(dir_fd, name)
                continue
            st = lstat_at(dir_fd, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                child = open_dir(dir_fd, (name,), create=False)
                if child is not None:
                    try:
                        self._clear_lower(child, path)
                    finally:
                        os.close(child)

    def _create(
        self, parts: tuple[str, ...], member: tarfile.TarInfo, data: IO[bytes] | None
    ) -> None:
        if not 0 <= member.uid <= _MAX_ID or not 0 <= member.gid <= _MAX_ID:
            raise UnsafePath(f"entry {member.name!r} has an out-of-range owner")
        if not parts:  # "./": the root directory's own metadata
            if member.isdir():
                os.fchown(self._root_fd, member.uid, member.gid)
                self._dirs[()] = (member.mode & 0o7777, _mtime_ns(member))
            return
        parent, leaf = parts[:-1], parts[-1]
        dir_fd = self._parents.get(parent, self._mark)
        existing = lstat_at(dir_fd, leaf)
        keep_dir = existing is not None and member.isdir() and stat.S_ISDIR(existing.st_mode)
        if member.islnk():
            self._hardlink(dir_fd, parts, member, existing)
        else:
            if existing is not None and not keep_dir:
                # Replace, never write through: the old name may be a symlink or share
                # an inode with other hard links.
                self._parents.forget(parts)
                remove_at(dir_fd, leaf, existing)
            self._make(dir_fd, parts, member, data, keep_dir)
        self._mark(parts)

    def _make(
        self,
        dir_fd: int,
        parts: tuple[str, ...],
        member: tarfile.TarInfo,
        data: IO[bytes] | None,
        keep_dir: bool,
    ) -> None:
        leaf = parts[-1]
        mode = member.mode & 0o7777
        mtime = _mtime_ns(member)
        if member.isdir():
            if not keep_dir:
                os.mkdir(leaf, 0o700, dir_fd=dir_fd)
            fd = os.open(leaf, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                os.fchown(fd, member.uid, member.gid)
                _set_xattrs(fd, member)
            finally:
                os.close(fd)
            self._dirs[parts] = (mode, mtime)
        elif member.isreg():
            fd = os.open(leaf, _FILE_FLAGS, 0o600, dir_fd=dir_fd)
            with open(fd, "wb", closefd=True) as out:
                if data is not None:
                    shutil.copyfileobj(data, out, CHUNK)
                out.flush()
                # chown clears setuid/setgid and file capabilities, so it goes first.
                os.fchown(fd, member.uid, member.gid)
                os.fchmod(fd, mode)
                _set_xattrs(fd, member)
                os.utime(fd, ns=(mtime, mtime))
        elif member.issym():
            os.symlink(member.linkname, leaf, dir_fd=dir_fd)
            os.chown(leaf, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)
            os.utime(leaf, ns=(mtime, mtime), dir_fd=dir_fd, follow_symlinks=False)
        elif member.ischr() or member.isblk() or member.isfifo():
            if member.isfifo():
                os.mkfifo(leaf, 0o600, dir_fd=dir_fd)
            else:
                kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                device = os.makedev(member.devmajor, member.devminor)
                os.mknod(leaf, kind | 0o600, device, dir_fd=dir_fd)
            os.chown(leaf, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)
            # fchmodat follows symlinks, but this name was created just above in a directory
            # nothing else writes to, so it is the node we made.
            os.chmod(leaf, mode, dir_fd=dir_fd)
            os.utime(leaf, ns=(mtime, mtime), dir_fd=dir_fd, follow_symlinks=False)
        else:
            raise UnsafePath(f"entry {member.name!r} has unsupported tar type {member.type!r}")

    def _hardlink(
        self,
        dir_fd: int,
        parts: tuple[str, ...],
        member: tarfile.TarInfo,
        existing: os.stat_result | None,
    ) -> None:
        target = split_relative(member.linkname, f"hard link target of {member.name!r}")
        if not target:
            raise UnsafePath(f"hard link {member.name!r} points at the root directory")
        if target == parts:
            return  # a link to itself: the file is already in place
        target_fd = open_dir(self._root_fd, target[:-1], create=False)
        target_st = lstat_at(target_fd, target[-1]) if target_fd is not None else None
        try:
            if target_fd is None or target_st is None:
                raise UnsafePath(
                    f"hard link {member.name!r} points at {member.linkname!r}, which does not "
                    "exist in the image"
                )
            if stat.S_ISDIR(target_st.st_mode):
                raise UnsafePath(f"hard link {member.name!r} points at a directory")
            if existing is not None:
                self._parents.forget(parts)
                remove_at(dir_fd, parts[-1], existing)
            os.link(
                target[-1],
                parts[-1],
                src_dir_fd=target_fd,
                dst_dir_fd=dir_fd,
                follow_symlinks=False,
            )
        finally:
            if target_fd is not None:
                os.close(target_fd)
