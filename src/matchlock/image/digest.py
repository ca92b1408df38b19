"""Content digests: validation, hashing while streaming, and verification."""

from __future__ import annotations

import hashlib
import io
import re
from typing import IO, TYPE_CHECKING

from matchlock.errors import ImageError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

# Only sha256 is accepted: it is what every registry and `docker save` produce, and a single
# algorithm keeps blob paths unambiguous.
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")

CHUNK = 1 << 20


def validate_digest(digest: str, what: str = "digest") -> str:
    """Return `digest` if it is `sha256:<64 lowercase hex>`, else raise ImageError."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise ImageError(
            f"invalid {what} {digest!r}: expected 'sha256:' followed by 64 lowercase hex digits",
            hint="the image metadata is malformed; re-export or re-pull the image",
        )
    return digest


def digest_hex(digest: str) -> str:
    """The hex part of a validated digest (safe to use as a file name)."""
    return validate_digest(digest)[len("sha256:") :]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_digest(actual: str, expected: str | None, what: str) -> None:
    """Raise ImageError unless `actual` equals `expected` (no-op when nothing is expected)."""
    if expected is not None and actual != expected:
        raise ImageError(
            f"{what} has digest {actual} but {expected} was expected: the data is corrupt "
            "or was tampered with",
            hint="re-export or re-pull the image from a trusted source",
        )


class DigestReader(io.RawIOBase):
    """A raw reader that hashes and counts every byte read from `source`.

    Wrap it in io.BufferedReader to get peek() and a BinaryIO for tarfile/gzip/zstd, so one
    pass over a stream both consumes and verifies it.
    """

    def __init__(self, source: IO[bytes]) -> None:
        super().__init__()
        self._source = source
        self._hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self._source.read(len(view))
        n = len(data)
        view[:n] = data
        self._hash.update(data)
        self.size += n
        return n

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def drain(self) -> None:
        """Read the source to its end so the digest covers all of it."""
        while True:
            data = self._source.read(CHUNK)
            if not data:
                return
            self._hash.update(data)
            self.size += len(data)
