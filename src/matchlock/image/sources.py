"""Read-only access to the files of an image archive: a directory or an uncompressed tar."""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Protocol

from matchlock.errors import ImageError
from matchlock.image.oci import MAX_DOCUMENT_BYTES, malformed
from matchlock.image.safefs import UnsafePath, split_relative

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class ArchiveSource(Protocol):
    """Files of an image archive, addressed by relative path (`blobs/sha256/<hex>`)."""

    description: str

    def exists(self, name: str) -> bool: ...

    def open(self, name: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...


def _clean(name: str, source: str) -> str:
    try:
        parts = split_relative(name, "path")
    except UnsafePath as exc:
        raise malformed(source, str(exc)) from None
    if not parts:
        raise malformed(source, f"path {name!r} names no file")
    return "/".join(parts)


def _missing(source: str, name: str) -> ImageError:
    return ImageError(
        f"{source} has no file {name!r}",
        hint="the image archive is incomplete; export it again",
    )


def read_document(source: ArchiveSource, name: str, what: str) -> bytes:
    """A small JSON document from the archive, with a size cap against hostile input."""
    with source.open(name) as f:
        raw = f.read(MAX_DOCUMENT_BYTES + 1)
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise malformed(what, f"it is larger than {MAX_DOCUMENT_BYTES >> 20} MiB")
    return raw


class DirSource:
    """An unpacked archive (e.g. an OCI image layout directory)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"image directory {root}"

    def _path(self, name: str) -> Path:
        return self.root / _clean(name, self.description)

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        path = self._path(name)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise _missing(self.description, name) from None
        except OSError as exc:
            raise ImageError(
                f"cannot read {path}: {exc.strerror or exc}",
                hint="check the file's permissions",
            ) from None
        with f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise malformed(self.description, f"{name!r} is not a regular file")
            yield f


class TarSource:
    """A tar archive (docker save output, or an OCI layout packed with tar)."""

    def __init__(self, path: Path, description: str | None = None) -> None:
        self.description = description or f"image archive {path}"
        try:
            with path.open("rb") as f:
                magic = f.read(4)
            if magic.startswith(_GZIP_MAGIC) or magic.startswith(_ZSTD_MAGIC):
                # Member access needs seeking, which a compressed stream cannot do cheaply.
                raise ImageError(
                    f"{self.description} is compressed",
                    hint="decompress it first, e.g. `gunzip -c FILE | matchlock image import "
                    "TAG -`",
                )
            # Kept open for the lifetime of the source; close() releases it.
            self._tar = tarfile.open(path, mode="r:")  # noqa: SIM115
            self._members: dict[str, tarfile.TarInfo] = {}
            for member in self._tar:
                with contextlib.suppress(ImageError):
                    self._members[_clean(member.name, self.description)] = member
        except (tarfile.TarError, EOFError, ValueError) as exc:
            raise ImageError(
                f"{self.description} is not a readable tar file ({exc})",
                hint="pass the output of `docker save`, an OCI layout directory or its tar",
            ) from None
        except OSError as exc:
            raise ImageError(
                f"cannot read {self.description}: {exc.strerror or exc}",
                hint="check the path and its permissions",
            ) from None

    def close(self) -> None:
        self._tar.close()

    def exists(self, name: str) -> bool:
        member = self._members.get(_clean(name, self.description))
        return member is not None and (member.isfile() or member.issym() or member.islnk())

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        member = self._members.get(_clean(name, self.description))
        if member is None:
            raise _missing(self.description, name)
        try:
            # tarfile resolves symlinks and hard links to other members of the archive (old
            # docker save links repeated layers that way), never to host files.
            f = self._tar.extractfile(member)
        except (tarfile.TarError, KeyError) as exc:
            raise malformed(self.description, f"cannot open {name!r} ({exc})") from None
        if f is None:
            raise malformed(self.description, f"{name!r} is not a regular file")
        with f:
            yield f
