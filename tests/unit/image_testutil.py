"""Helpers for the image tests: build small layer tars entry by entry."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

Entry = tuple[tarfile.TarInfo, bytes | None]
MTIME = 1_600_000_000

requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="owners, device nodes and setuid bits need root"
)


def _info(name: str, kind: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = MTIME
    return info


def reg(
    name: str,
    data: bytes = b"",
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    xattrs: dict[str, str] | None = None,
) -> Entry:
    info = _info(name, tarfile.REGTYPE, mode, uid, gid)
    info.size = len(data)
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return info, data


def dir_(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: int = MTIME) -> Entry:
    info = _info(name, tarfile.DIRTYPE, mode, uid, gid)
    info.mtime = mtime
    return info, None


def symlink(name: str, target: str) -> Entry:
    info = _info(name, tarfile.SYMTYPE, 0o777, 0, 0)
    info.linkname = target
    return info, None


def hardlink(name: str, target: str) -> Entry:
    info = _info(name, tarfile.LNKTYPE, 0o644, 0, 0)
    info.linkname = target
    return info, None


def device(name: str, kind: bytes, major: int, minor: int, mode: int = 0o666) -> Entry:
    info = _info(name, kind, mode, 0, 0)
    info.devmajor, info.devminor = major, minor
    return info, None


def fifo(name: str, mode: int = 0o600) -> Entry:
    return _info(name, tarfile.FIFOTYPE, mode, 0, 0), None


def tar_bytes(*entries: Entry) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def apply(root: Path, blob: bytes, expected: str | None = None) -> None:
    from matchlock.image.layers import apply_layer

    apply_layer(io.BytesIO(blob), root, expected_digest=expected)


def debugfs(image: Path, request: str) -> str:
    """Run one debugfs request against an ext4 image file (read-only)."""
    import subprocess

    result = subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    )
    return result.stdout


def debugfs_stat(image: Path, path: str) -> dict[str, str]:
    """`Mode`, `User`, `Group`, `Type`, `Size` of `path` inside the image, as strings."""
    import re

    text = debugfs(image, f"stat {path}")
    fields: dict[str, str] = {}
    for key, value in re.findall(r"(Type|Mode|User|Group|Size):\s+(\S+)", text):
        fields.setdefault(key, value)  # the first "Size:" is the file's; later ones are not
    if not fields:
        raise AssertionError(f"{path} not found in {image}: {text!r}")
    return fields
