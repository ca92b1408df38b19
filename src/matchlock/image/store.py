"""The local, content-addressed image store.

Layout under `cache_dir()/images`:
    blobs/sha256/<hex>     manifests, configs and layers exactly as imported (verified)
    images.db              SQLite: image name -> manifest, config and layer digests
    rootfs/<hex>.ext4      the flattened root filesystem of manifest <hex>, built on demand,
                           shared read-only by every sandbox of that image
    tmp/                   scratch space on the same file system (atomic renames)

Concurrency: writers that add blobs and then tag them hold `lease()` (a shared lock) so that
`gc()` (exclusive) never deletes blobs between the two steps; rootfs builds hold a
per-image lock so each image is built once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from matchlock.errors import ImageError
from matchlock.image.config import ImageConfig, parse_image_config
from matchlock.image.digest import CHUNK, digest_hex, verify_digest
from matchlock.image.ext4 import MIB, make_ext4
from matchlock.image.oci import MAX_DOCUMENT_BYTES, malformed
from matchlock.image.reference import parse_reference
from matchlock.paths import cache_dir

Log = Callable[[str], None]

# Every root filesystem is presented to the guest at this capacity (the file is sparse).
ROOTFS_DEVICE_BYTES = 64 << 30

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    canonical       TEXT PRIMARY KEY,   -- docker.io/library/busybox:latest
    name            TEXT NOT NULL,      -- as the user wrote it: busybox
    manifest_digest TEXT NOT NULL,
    config_digest   TEXT NOT NULL,
    layers          TEXT NOT NULL,      -- JSON list of layer digests, base first
    size            INTEGER NOT NULL,   -- bytes of layer blobs as stored
    created         TEXT NOT NULL       -- ISO 8601 UTC, when the name was (re)tagged
)
"""
_COLUMNS = "name, manifest_digest, config_digest, layers, size, created"


def _quiet(_line: str) -> None:
    pass


@dataclass(frozen=True)
class StoredImage:
    """An image known to the store under `name` (digests are `sha256:<hex>`, base layer first)."""

    name: str
    manifest_digest: str
    config_digest: str
    layers: tuple[str, ...]
    size: int
    created: datetime

    @property
    def canonical(self) -> str:
        return parse_reference(self.name).canonical


@contextlib.contextmanager
def _flock(path: Path, *, exclusive: bool) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _allocated(path: Path) -> int:
    try:
        return path.lstat().st_blocks * 512
    except FileNotFoundError:
        return 0


def _tree_allocated(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return _allocated(path)
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            total += _allocated(Path(dirpath, name))
    return total + _allocated(path)


class ImageStore:
    """Blobs, image names and built root filesystems under one directory."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else cache_dir() / "images"
        self._blobs = self.root / "blobs" / "sha256"
        self._rootfs = self.root / "rootfs"
        self._db_path = self.root / "images.db"
        try:
            for directory in (self._blobs, self._rootfs, self.tmp_dir):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ImageError(
                f"cannot create the image store at {self.root}: {exc.strerror or exc}",
                hint="set MATCHLOCK_CACHE_DIR to a writable directory",
            ) from None
        with self._db() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise ImageError(
                    f"the image database {self._db_path} was written by a newer matchlock",
                    hint="upgrade matchlock, or delete the file and re-import your images",
                )
            if version < _SCHEMA_VERSION:
                # Only a new database is written to here: every `run` opens the store, and
                # a write per run would cost a synced journal commit.
                db.execute(_SCHEMA)
                db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    @property
    def tmp_dir(self) -> Path:
        """Scratch space on the store's file system; `gc()` empties it."""
        return self.root / "tmp"

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self._db_path, timeout=30)
        except sqlite3.Error as exc:
            raise self._db_error(exc) from None
        try:
            with conn:  # one transaction: commit on success, roll back on error
                yield conn
        except sqlite3.Error as exc:
            raise self._db_error(exc) from None
        finally:
            conn.close()

    def _db_error(self, exc: sqlite3.Error) -> ImageError:
        return ImageError(
            f"the image database {self._db_path} is unusable: {exc}",
            hint="delete it and re-import your images",
        )

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        """Hold off `gc()` while adding blobs that are not tagged yet (or reading them)."""
        with _flock(self.root / "store.lock", exclusive=False):
            yield

    # -- blobs ---------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self._blobs / digest_hex(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def put_blob_stream(
        self, stream: IO[bytes], expected_digest: str | None = None, *, what: str = "blob"
    ) -> str:
        """Store the bytes of `stream` and return their digest.

        With `expected_digest`, a mismatch raises ImageError and stores nothing, and a blob
        already present is not read again (the stream is then left unconsumed). Hold
        `lease()` until the blob is tagged, or `gc()` may delete it again.
        """
        if expected_digest is not None and self.has_blob(expected_digest):
            return expected_digest
        with self.lease():  # gc() must not remove the temp file while it is written
            return self._put_blob(stream, expected_digest, what)

    def _put_blob(self, stream: IO[bytes], expected_digest: str | None, what: str) -> str:
        hasher = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp_dir, prefix="blob-")
        tmp = Path(tmp_name)
        try:
            with open(fd, "wb") as out:
                while chunk := stream.read(CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = "sha256:" + hasher.hexdigest()
            verify_digest(digest, expected_digest, what)
            tmp.chmod(0o644)
            tmp.replace(self.blob_path(digest))
            _fsync_dir(self._blobs)
            return digest
        except OSError as exc:
            raise ImageError(
                f"cannot store {what} under {self._blobs}: {exc.strerror or exc}",
                hint="check free disk space and permissions of the cache directory",
            ) from None
        finally:
            tmp.unlink(missing_ok=True)

    def add_verified_blob(self, path: Path, digest: str) -> None:
        """Move the file `path` (under `tmp_dir`) into the store as blob `digest`.

        For writers that hash while they write (resumable downloads): the caller has checked
        that the file's bytes have this digest, and has fsynced it. Hold `lease()`.
        """
        try:
            path.chmod(0o644)
            path.replace(self.blob_path(digest))
            _fsync_dir(self._blobs)
        except OSError as exc:
            raise ImageError(
                f"cannot store blob {digest} under {self._blobs}: {exc.strerror or exc}",
                hint="check free disk space and permissions of the cache directory",
            ) from None

    def _read_document(self, digest: str, what: str) -> bytes:
        try:
            with self.blob_path(digest).open("rb") as f:
                raw = f.read(MAX_DOCUMENT_BYTES + 1)
        except FileNotFoundError:
            raise ImageError(
                f"{what} {digest} is missing from the image store",
                hint="re-import the image",
            ) from None
        if len(raw) > MAX_DOCUMENT_BYTES:
            raise malformed(what, f"it is larger than {MAX_DOCUMENT_BYTES >> 20} MiB")
        return raw

    # -- names ---------------------------------------------------------------------------

    def tag(
        self,
        name: str,
        manifest_digest: str,
        config_digest: str,
        layers: list[str],
        *,
        allow_digest: bool = False,
    ) -> StoredImage:
        """Point `name` at an image whose blobs are all in the store (replacing any old one).

        `allow_digest` admits `NAME@sha256:...` names: a pull by digest is cached under the
        reference the user gave, which no later push can move.
        """
        ref = parse_reference(name)
        if ref.digest is not None and not allow_digest:
            raise ImageError(
                f"cannot name an image {name!r}: a name must not contain a digest",
                hint="use NAME[:TAG]",
            )
        for digest in (manifest_digest, config_digest, *layers):
            if not self.has_blob(digest):
                raise ImageError(
                    f"cannot tag {name}: blob {digest} is not in the image store",
                    hint="import the image again",
                )
        size = sum(self.blob_path(d).stat().st_size for d in layers)
        image = StoredImage(
            name=name,
            manifest_digest=manifest_digest,
            config_digest=config_digest,
            layers=tuple(layers),
            size=size,
            created=datetime.now(UTC),
        )
        with self._db() as db:
            db.execute(
                f"INSERT OR REPLACE INTO images (canonical, {_COLUMNS}) VALUES (?,?,?,?,?,?,?)",
                (
                    ref.canonical,
                    name,
                    manifest_digest,
                    config_digest,
                    json.dumps(list(layers)),
                    size,
                    image.created.isoformat(),
                ),
            )
        return image

    @staticmethod
    def _row(row: tuple[str, str, str, str, int, str]) -> StoredImage:
        name, manifest, config, layers, size, created = row
        return StoredImage(
            name=name,
            manifest_digest=manifest,
            config_digest=config,
            layers=tuple(json.loads(layers)),
            size=size,
            created=datetime.fromisoformat(created),
        )

    def lookup(self, name: str) -> StoredImage | None:
        """The image called `name`; `busybox` and `docker.io/library/busybox:latest` match."""
        canonical = parse_reference(name).canonical
        with self._db() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM images WHERE canonical = ?", (canonical,)
            ).fetchone()
        return None if row is None else self._row(row)

    def list(self) -> list[StoredImage]:
        with self._db() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM images ORDER BY name").fetchall()
        return [self._row(row) for row in rows]

    def remove(self, name: str) -> bool:
        """Forget `name`; its blobs stay until `gc()`. False if there was no such image."""
        canonical = parse_reference(name).canonical
        with self._db() as db:
            cursor = db.execute("DELETE FROM images WHERE canonical = ?", (canonical,))
            return cursor.rowcount > 0

    def gc(self) -> int:
        """Delete blobs and root filesystems no image refers to, and leftover scratch files.

        Returns the bytes freed. Waits for running imports and rootfs builds to finish.
        """
        freed = 0
        with _flock(self.root / "store.lock", exclusive=True):
            images = self.list()
            blobs = {
                digest_hex(d)
                for image in images
                for d in (image.manifest_digest, image.config_digest, *image.layers)
            }
            manifests = {digest_hex(image.manifest_digest) for image in images}
            for path in self._blobs.iterdir():
                if path.name not in blobs:
                    freed += _tree_allocated(path)
                    _remove(path)
            for path in self._rootfs.iterdir():
                hex_part = path.name.split(".", 1)[0]
                if hex_part not in manifests or path.suffix not in (".ext4", ".lock"):
                    freed += _tree_allocated(path)
                    _remove(path)
            # Nothing else runs while we hold the exclusive lock, so all scratch is stale.
            for path in self.tmp_dir.iterdir():
                freed += _tree_allocated(path)
                _remove(path)
        return freed

    # -- what sandboxes use --------------------------------------------------------------

    def config(self, image: StoredImage) -> ImageConfig:
        return parse_image_config(self._read_document(image.config_digest, "image config"))

    def rootfs_path(self, image: StoredImage) -> Path:
        """Where the image's root filesystem is (or will be, once built)."""
        return self._rootfs / f"{digest_hex(image.manifest_digest)}.ext4"

    def rootfs(self, image: StoredImage, log: Log = _quiet) -> Path:
        """The image's root filesystem as an ext4 file, built on first use.

        Layers are applied in order into a scratch directory, packed with mkfs.ext4 and
        renamed into place, so a reader never sees a partial file. Concurrent callers
        build it once. Treat the file as read-only: every sandbox of the image shares it.
        """
        out = self.rootfs_path(image)
        if _sealed(out):
            return out
        with self.lease(), _flock(out.with_suffix(".lock"), exclusive=True):
            if not out.is_file():
                self._build_rootfs(image, out, log)
            elif not _sealed(out):
                _seal(out)  # built by an older version: padded and made read-only once
        return out

    def _build_rootfs(self, image: StoredImage, out: Path, log: Log) -> None:
        for digest in image.layers:
            if not self.has_blob(digest):
                raise ImageError(
                    f"image {image.name} is damaged: layer {digest} is missing from the store",
                    hint=f"import {image.name} again",
                )
        started = time.monotonic()
        log(f"building the root filesystem of {image.name} ({len(image.layers)} layers)")
        # mkdtemp makes a 0700 directory: setuid binaries unpacked below it stay out of
        # reach of other host users while they sit on the host file system.
        work = Path(tempfile.mkdtemp(dir=self.tmp_dir, prefix="rootfs-"))
        try:
            tree = work / "root"
            tree.mkdir(mode=0o755)
            # Here, not at the top: zstandard, gzip and tarfile are for building only, and a
            # warm `run` (root filesystem already built) does not pay for them.
            from matchlock.image.layers import apply_layer

            count = len(image.layers)
            for i, digest in enumerate(image.layers, 1):
                with self.blob_path(digest).open("rb") as blob:
                    apply_layer(blob, tree, expected_digest=digest, label=f"{i}/{count} {digest}")
            partial = work / "rootfs.ext4"
            make_ext4(tree, partial)
            with partial.open("rb") as f:
                os.fsync(f.fileno())
            size_mib = partial.stat().st_size / MIB
            _seal(partial)
            partial.replace(out)
            _fsync_dir(out.parent)
        except OSError as exc:
            raise ImageError(
                f"cannot build the root filesystem of {image.name}: {exc.strerror or exc}",
                hint=f"check free disk space under {self.root}",
            ) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log(f"root filesystem ready ({size_mib:.0f} MiB) in {time.monotonic() - started:.1f}s")


def _seal(path: Path) -> None:
    """Give a root filesystem its fixed device capacity (sparse: no blocks are written) and
    make it read-only. Done once, by the store: sandboxes share the file and never change it
    (a snapshot template stays valid for every image because the kernel probed this size)."""
    if path.stat().st_size < ROOTFS_DEVICE_BYTES:
        os.truncate(path, ROOTFS_DEVICE_BYTES)
    os.chmod(path, 0o444)


def _sealed(path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return st.st_size >= ROOTFS_DEVICE_BYTES and not st.st_mode & 0o222


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
