"""Download one blob into the store: verified while it streams, resumable, one writer at a time.

The bytes go to `tmp/pull-<hex>.partial`, hashed as they arrive. If the connection drops, the
download continues from the partial file with an HTTP Range request (in this process, or in
a later pull if this one was killed). When the server ignores Range, or the finished file
does not match its digest after a resume, the partial is discarded and the blob is fetched
again from the start; a fresh download that does not match is an error, and its bytes are
deleted. Only a verified file is renamed into the store.

Two pulls that need the same blob serialise on `tmp/pull-<hex>.lock`: the second waits, then
finds the blob in the store.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx

from matchlock.errors import ImageError
from matchlock.image.digest import CHUNK, digest_hex
from matchlock.image.oci import Descriptor
from matchlock.image.progress import PullProgress
from matchlock.image.registry import RangeNotSatisfiable, RegistryClient
from matchlock.image.store import ImageStore

RETRIES = 4  # attempts after the first, for dropped connections and timeouts
_BACKOFF_S = 0.25


class Cancelled(Exception):
    """Another download of the same pull failed; stop early."""


class DiskFull(ImageError):
    """No space left for a download; the partial files of the pull are removed too."""


class Control:
    """Shared by the downloads of one pull: stop them, and say whether to keep partials.

    Partial files are kept for a later pull to resume (network failures, Ctrl-C), except
    when the disk is full: then they are what is filling it.
    """

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.discard = threading.Event()


@contextlib.contextmanager
def exclusive_file_lock(path: Path) -> Iterator[None]:
    """An flock on `path` that is removed when released.

    A waiter may acquire the lock on a file the previous holder has just unlinked; it then
    sees that the path no longer names its inode and tries again with the new file.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _hash_file(path: Path, limit: int) -> tuple[hashlib._Hash, int]:
    """Hash a partial download (at most `limit` bytes of it)."""
    hasher = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as f:
            while size < limit and (chunk := f.read(min(CHUNK, limit - size))):
                hasher.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        return hasher, 0
    return hasher, size


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobDownload:
    """Fetch `desc` from `client` into `store` (hold `store.lease()` around `run`)."""

    def __init__(
        self,
        store: ImageStore,
        client: RegistryClient,
        desc: Descriptor,
        what: str,
        progress: PullProgress,
        control: Control | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.desc = desc
        self.what = what
        self.progress = progress
        self.control = control or Control()
        hex_digest = digest_hex(desc.digest)
        self.partial = store.tmp_dir / f"pull-{hex_digest}.partial"
        self.lock = store.tmp_dir / f"pull-{hex_digest}.lock"

    def run(self) -> None:
        if self.store.has_blob(self.desc.digest):
            self.progress.finished(self.desc.digest)
            return
        try:
            with exclusive_file_lock(self.lock):
                if not self.store.has_blob(self.desc.digest):  # another pull may have won
                    try:
                        self._download()
                    except Cancelled:
                        if self.control.discard.is_set():
                            self.partial.unlink(missing_ok=True)
                        raise
        except OSError as exc:
            # The lock file itself, or writing the partial: most likely a full disk.
            self.partial.unlink(missing_ok=True)
            raise self._disk_error(exc) from None
        self.progress.finished(self.desc.digest)

    def _disk_error(self, exc: OSError) -> ImageError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskFull(
                f"disk full while downloading {self.what} into {self.store.root}",
                hint="free some space (`matchlock image gc` removes unused images) and pull "
                "again",
            )
        return ImageError(
            f"cannot write {self.what} under {self.store.tmp_dir}: {exc.strerror or exc}",
            hint="check free disk space and permissions of the cache directory",
        )

    def _download(self) -> None:
        failures = 0
        clean_retry_used = False
        resumed = False  # did the bytes on disk come from more than one response?
        while True:
            with contextlib.suppress(FileNotFoundError):
                if self.partial.stat().st_size > self.desc.size:
                    self._discard()  # cannot be a prefix of this blob
            hasher, offset = _hash_file(self.partial, self.desc.size)
            if offset:
                resumed = True
                self.progress.resumed(self.desc.digest, offset)
            try:
                if offset < self.desc.size:  # else: complete already, only verify it
                    hasher, offset = self._fetch_into(hasher, offset)
            except (httpx.TransportError, RangeNotSatisfiable) as exc:
                if isinstance(exc, RangeNotSatisfiable):
                    self._discard()  # what we have is not a prefix of this blob
                    self.progress.restarted(self.desc.digest)
                failures += 1
                if failures > RETRIES:
                    raise ImageError(
                        f"downloading {self.what} from {self.client.registry} failed "
                        f"{failures} times; last error: {exc or type(exc).__name__}",
                        hint="check the network and pull again (the download resumes)",
                    ) from None
                if self.control.cancel.wait(_BACKOFF_S * failures):
                    raise Cancelled() from None
                continue
            except ImageError:
                self._discard()
                raise
            if offset < self.desc.size:
                failures += 1  # the body ended early without a transport error
                if failures > RETRIES:
                    raise ImageError(
                        f"{self.what} from {self.client.registry} keeps ending early "
                        f"({offset} of {self.desc.size} bytes)",
                        hint="check the network and pull again (the download resumes)",
                    )
                continue
            digest = "sha256:" + hasher.hexdigest()
            if digest == self.desc.digest:
                _fsync(self.partial)  # the store only ever holds durable blobs
                self.store.add_verified_blob(self.partial, self.desc.digest)
                return
            self._discard()
            if resumed and not clean_retry_used:
                # The earlier partial may have been the corrupt part: one clean attempt.
                clean_retry_used, resumed = True, False
                self.progress.restarted(self.desc.digest)
                continue
            raise ImageError(
                f"{self.what} from {self.client.registry} has digest {digest} but "
                f"{self.desc.digest} was expected: the data is corrupt or was tampered with; "
                "it was discarded",
                hint="do not use this registry's copy; try again or contact its operator",
            )

    def _fetch_into(self, hasher: hashlib._Hash, offset: int) -> tuple[hashlib._Hash, int]:
        """Append the blob from `offset` to the partial file; returns the hash and length."""
        size = self.desc.size
        with self.client.blob(self.desc.digest, offset, self.what) as response:
            if response.start != offset:  # Range ignored: the body is the whole blob
                hasher, offset = hashlib.sha256(), 0
                self.progress.restarted(self.desc.digest)
            with self.partial.open("ab" if offset else "wb") as out:
                try:
                    for chunk in response.chunks:
                        if self.control.cancel.is_set():
                            raise Cancelled()
                        if offset + len(chunk) > size:
                            raise ImageError(
                                f"{self.what} from {self.client.registry} is larger than the "
                                f"{size} bytes its manifest says: refusing it",
                                hint="the registry's copy is corrupt or was tampered with",
                            )
                        hasher.update(chunk)
                        out.write(chunk)
                        offset += len(chunk)
                        self.progress.advance(self.desc.digest, len(chunk))
                finally:
                    out.flush()
        return hasher, offset

    def _discard(self) -> None:
        self.partial.unlink(missing_ok=True)
