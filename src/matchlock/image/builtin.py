"""The built-in default image: a static busybox with a minimal /etc, made on the host.

It needs no registry or download: the one layer is built from Debian's busybox-static
(`/bin/busybox`). The layer tar is deterministic (sorted entries, fixed mtime and owners),
so its digest, and the image's, depend only on the busybox binary.
"""

from __future__ import annotations

import io
import platform
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from matchlock.errors import SetupMissing
from matchlock.image.digest import sha256_digest
from matchlock.image.oci import (
    OCI_CONFIG,
    OCI_LAYER_TAR,
    OCI_LAYOUT_VERSION,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    build_index,
    build_manifest,
    dump_json,
)
from matchlock.image.safefs import UnsafePath, split_relative
from matchlock.image.store import ImageStore, StoredImage

if TYPE_CHECKING:
    import tarfile

BUILTIN_TAG = "matchlock-builtin:busybox"
BUSYBOX = Path("/bin/busybox")
LAYOUT_REF_NAME = "busybox"
_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MTIME = 0
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
_INSTALL_HINT = "install Debian's busybox-static (apt-get install busybox-static)"

_PASSWD = b"""\
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
user:x:1000:1000:user:/home/user:/bin/sh
"""
_GROUP = b"""\
root:x:0:
nogroup:x:65534:
user:x:1000:
"""
# (path, mode, uid, gid). proc/sys/dev/run are mount points for the guest.
_DIRS = [
    ("bin", 0o755, 0, 0),
    ("dev", 0o755, 0, 0),
    ("etc", 0o755, 0, 0),
    ("home", 0o755, 0, 0),
    ("home/user", 0o755, 1000, 1000),
    ("proc", 0o555, 0, 0),
    ("root", 0o700, 0, 0),
    ("run", 0o755, 0, 0),
    ("sbin", 0o755, 0, 0),
    ("sys", 0o555, 0, 0),
    ("tmp", 0o1777, 0, 0),
    ("usr", 0o755, 0, 0),
    ("usr/bin", 0o755, 0, 0),
    ("usr/sbin", 0o755, 0, 0),
    ("var", 0o755, 0, 0),
]


@dataclass(frozen=True)
class BuiltinImage:
    """The image's three blobs and their descriptors."""

    layer: bytes
    config: bytes
    manifest: bytes
    platform: Platform

    @property
    def layer_digest(self) -> str:
        return sha256_digest(self.layer)

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)


def _is_static_elf(path: Path) -> bool:
    """True unless the ELF file asks for a dynamic loader (has a PT_INTERP segment)."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF":
                return False
            endian = "<" if head[5] == 1 else ">"
            if head[4] == 2:  # 64-bit
                (phoff,) = struct.unpack_from(endian + "Q", head, 32)
                phentsize, phnum = struct.unpack_from(endian + "HH", head, 54)
            else:
                (phoff,) = struct.unpack_from(endian + "I", head, 28)
                phentsize, phnum = struct.unpack_from(endian + "HH", head, 42)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            pt_interp = 3
            return all(
                struct.unpack_from(endian + "I", table, i * phentsize)[0] != pt_interp
                for i in range(phnum)
            )
    except (OSError, struct.error, IndexError):
        return False


def _applets(busybox: Path) -> list[str]:
    try:
        result = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SetupMissing(f"cannot run {busybox} --list-full: {exc}", hint=_INSTALL_HINT) from None
    applets = []
    for line in result.stdout.splitlines():
        try:
            parts = split_relative(line.strip(), "applet")
        except UnsafePath:
            continue
        if parts and parts != ("bin", "busybox"):
            applets.append("/".join(parts))
    if not applets:
        raise SetupMissing(f"{busybox} --list-full listed no applets", hint=_INSTALL_HINT)
    return applets


def _info(name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    import tarfile  # building only: a stored built-in image does not need it

    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = _MTIME
    return info


def _layer(busybox: Path) -> bytes:
    import tarfile

    entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
    for path, mode, uid, gid in _DIRS:
        entries[path] = (_info(path, tarfile.DIRTYPE, mode, uid, gid), None)
    binary = busybox.read_bytes()
    entries["bin/busybox"] = (_info("bin/busybox", tarfile.REGTYPE, 0o755), binary)
    entries["etc/passwd"] = (_info("etc/passwd", tarfile.REGTYPE, 0o644), _PASSWD)
    entries["etc/group"] = (_info("etc/group", tarfile.REGTYPE, 0o644), _GROUP)
    for applet in _applets(busybox):
        parent = applet.rpartition("/")[0]
        if parent and parent not in entries:
            entries[parent] = (_info(parent, tarfile.DIRTYPE, 0o755), None)
        if applet not in entries:
            link = _info(applet, tarfile.SYMTYPE, 0o777)
            link.linkname = "/bin/busybox"
            entries[applet] = (link, None)

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(entries, key=lambda p: p.split("/")):
            info, data = entries[name]
            if data is None:
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def build_builtin(busybox: Path = BUSYBOX) -> BuiltinImage:
    """Build the built-in image's blobs in memory (busybox is ~2 MiB)."""
    if not busybox.is_file():
        raise SetupMissing(f"{busybox} not found: the built-in image needs it", hint=_INSTALL_HINT)
    if not _is_static_elf(busybox):
        raise SetupMissing(
            f"{busybox} is not a static executable, so it cannot run inside the image",
            hint=_INSTALL_HINT,
        )
    arch = _ARCH.get(platform.machine(), platform.machine())
    layer = _layer(busybox)
    config = dump_json(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Env": [_PATH], "Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer)]},
            "history": [{"created_by": "matchlock built-in busybox image"}],
        }
    )
    manifest = build_manifest(
        Descriptor(OCI_CONFIG, sha256_digest(config), len(config)),
        [Descriptor(OCI_LAYER_TAR, sha256_digest(layer), len(layer))],
    )
    return BuiltinImage(layer, config, manifest, Platform("linux", arch))


def ensure_builtin(store: ImageStore) -> StoredImage:
    """The built-in image from the store, adding it first if it is not there."""
    existing = store.lookup(BUILTIN_TAG)
    if existing is not None and all(
        store.has_blob(d)
        for d in (existing.manifest_digest, existing.config_digest, *existing.layers)
    ):
        return existing
    image = build_builtin()
    with store.lease():
        for blob, digest in (
            (image.layer, image.layer_digest),
            (image.config, image.config_digest),
            (image.manifest, image.manifest_digest),
        ):
            store.put_blob_stream(io.BytesIO(blob), digest)
        return store.tag(
            BUILTIN_TAG, image.manifest_digest, image.config_digest, [image.layer_digest]
        )


def write_oci_layout(dest: Path, *, ref_name: str = LAYOUT_REF_NAME) -> str:
    """Write the built-in image as an OCI image layout at `dest`; return the manifest digest.

    The index names the manifest `ref_name` (so `skopeo copy oci:DEST:busybox ...` works).
    """
    image = build_builtin()
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for blob in (image.layer, image.config, image.manifest):
        (blobs / sha256_digest(blob).split(":", 1)[1]).write_bytes(blob)
    (dest / "oci-layout").write_bytes(dump_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}))
    manifest = Descriptor(
        OCI_MANIFEST,
        image.manifest_digest,
        len(image.manifest),
        platform=image.platform,
        annotations={"org.opencontainers.image.ref.name": ref_name},
    )
    (dest / "index.json").write_bytes(build_index([manifest]))
    return image.manifest_digest
