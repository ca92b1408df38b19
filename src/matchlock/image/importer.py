"""Import an image from `docker save` output or an OCI image layout into the store.

Accepted sources: an OCI layout directory, an OCI layout packed as a tar, a docker-save tar
(the classic layout, or the newer one that is an OCI layout plus manifest.json), or a stream
of either tar (spooled to disk first, since tar members are read out of order).
Every blob is verified against its digest before the image is named.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from matchlock.errors import ImageError
from matchlock.image.config import image_config_from_json
from matchlock.image.digest import CHUNK, sha256_digest, verify_digest
from matchlock.image.oci import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_LAYER_TAR,
    Descriptor,
    build_manifest,
    diff_ids,
    get_str,
    layer_media_type,
    malformed,
    parse_index,
    parse_json_object,
    parse_manifest,
)
from matchlock.image.reference import parse_reference
from matchlock.image.sources import ArchiveSource, DirSource, TarSource, read_document
from matchlock.image.store import ImageStore, StoredImage

# The guests are x86_64 VMs, so that is the one platform an image can be run on.
TARGET_OS = "linux"
TARGET_ARCH = "amd64"
_MAX_INDEX_DEPTH = 4
_NAMED_DIGEST_RE = re.compile(r"(?:.*/)?([0-9a-f]{64})(?:\.tar|\.json)?")


def import_image(store: ImageStore, tag: str, source: Path | BinaryIO) -> StoredImage:
    """Import the image in `source` and name it `tag` (replacing an image of that name)."""
    parse_reference(tag)  # a bad name should fail before a long copy
    where = str(source) if isinstance(source, Path) else "standard input"
    try:
        # The lease keeps gc() from deleting the spool file and new blobs before they are
        # named.
        with store.lease():
            if isinstance(source, Path):
                return _import_path(store, tag, source)
            return _import_stream(store, tag, source)
    except (OSError, tarfile.TarError, EOFError) as exc:
        # Reached by archives that end early or fail to read midway through.
        reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
        raise ImageError(
            f"cannot import {tag} from {where}: {reason}",
            hint="check that the archive is complete and readable, then import it again",
        ) from None


def _spool(store: ImageStore, source: BinaryIO, spool: Path, fd: int) -> None:
    try:
        with open(fd, "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
    except OSError as exc:
        raise ImageError(
            f"cannot spool standard input to {store.tmp_dir}: {exc.strerror or exc}",
            hint="check free disk space in the cache directory",
        ) from None


def _import_stream(store: ImageStore, tag: str, source: BinaryIO) -> StoredImage:
    fd, spool_name = tempfile.mkstemp(dir=store.tmp_dir, prefix="import-", suffix=".tar")
    spool = Path(spool_name)
    try:
        _spool(store, source, spool, fd)
        if spool.stat().st_size == 0:
            raise ImageError(
                "no image data on standard input",
                hint="pipe an archive in (e.g. `docker save IMAGE | matchlock image import "
                "TAG`) or pass a file or directory",
            )
        with contextlib.closing(TarSource(spool, "image archive on standard input")) as src:
            return _import_from(store, tag, src)
    finally:
        spool.unlink(missing_ok=True)


def _import_path(store: ImageStore, tag: str, path: Path) -> StoredImage:
    if path.is_dir():
        return _import_from(store, tag, DirSource(path))
    if not path.exists():
        raise ImageError(
            f"cannot import {path}: no such file or directory",
            hint="pass a docker-save tar, an OCI layout directory or its tar, or - for stdin",
        )
    with contextlib.closing(TarSource(path)) as src:
        return _import_from(store, tag, src)


def _import_from(store: ImageStore, tag: str, src: ArchiveSource) -> StoredImage:
    # Newer docker save output is also an OCI layout; the OCI index keeps the original
    # manifest (and its digest), so it wins over manifest.json.
    if src.exists("oci-layout") and src.exists("index.json"):
        return _import_oci(store, tag, src)
    if src.exists("manifest.json"):
        return _import_docker(store, tag, src)
    raise ImageError(
        f"{src.description} is neither a docker save archive nor an OCI image layout",
        hint="expected manifest.json, or oci-layout and index.json, at its top level",
    )


# -- OCI image layout ----------------------------------------------------------------------


def _blob_name(digest: str) -> str:
    algorithm, _, hex_part = digest.partition(":")
    return f"blobs/{algorithm}/{hex_part}"


def _read_blob_document(src: ArchiveSource, desc: Descriptor, what: str) -> bytes:
    raw = read_document(src, _blob_name(desc.digest), what)
    verify_digest(sha256_digest(raw), desc.digest, f"{what} in {src.description}")
    if len(raw) != desc.size:
        raise malformed(what, f"its size is {len(raw)} bytes, the descriptor says {desc.size}")
    return raw


def _copy_blob(store: ImageStore, src: ArchiveSource, desc: Descriptor, what: str) -> None:
    if not store.has_blob(desc.digest):
        with src.open(_blob_name(desc.digest)) as f:
            store.put_blob_stream(f, desc.digest, what=f"{what} in {src.description}")
    size = store.blob_path(desc.digest).stat().st_size
    if size != desc.size:
        raise malformed(what, f"its size is {size} bytes, the manifest says {desc.size}")


def _is_target(desc: Descriptor) -> bool:
    p = desc.platform
    return p is not None and p.os == TARGET_OS and p.architecture == TARGET_ARCH


def _choose(descriptors: list[Descriptor], what: str) -> Descriptor:
    candidates = [d for d in descriptors if d.media_type in INDEX_TYPES | MANIFEST_TYPES]
    matching = [d for d in candidates if _is_target(d)]
    if matching:
        return matching[0]
    unmarked = [d for d in candidates if d.platform is None]
    if len(unmarked) == 1:
        return unmarked[0]
    if not candidates:
        raise malformed(what, "it lists no image manifest")
    if not unmarked:
        platforms = ", ".join(sorted({str(d.platform) for d in candidates}))
        raise ImageError(
            f"{what} has no {TARGET_OS}/{TARGET_ARCH} image (only {platforms})",
            hint=f"export or pull the {TARGET_OS}/{TARGET_ARCH} variant of the image",
        )
    raise ImageError(
        f"{what} lists {len(unmarked)} images without a platform; cannot tell which to use",
        hint="export a single image into the archive",
    )


def _check_config(config: dict[str, Any]) -> None:
    """Refuse images built for another platform: they cannot boot in our guests."""
    os_name = get_str(config, "os", "image config")
    arch = get_str(config, "architecture", "image config")
    if (os_name or TARGET_OS) != TARGET_OS or (arch or TARGET_ARCH) != TARGET_ARCH:
        raise ImageError(
            f"the image is built for {os_name}/{arch}; matchlock runs {TARGET_OS}/{TARGET_ARCH}",
            hint=f"use the {TARGET_OS}/{TARGET_ARCH} variant of the image",
        )
    image_config_from_json(config)  # reject unusable configs now, not at first run


def _import_oci(store: ImageStore, tag: str, src: ArchiveSource) -> StoredImage:
    layout = parse_json_object(read_document(src, "oci-layout", "oci-layout"), "oci-layout")
    version = get_str(layout, "imageLayoutVersion", "oci-layout", required=True) or ""
    if not version.startswith("1."):
        raise malformed("oci-layout", f"unsupported imageLayoutVersion {version!r}")
    what = f"index.json of {src.description}"
    desc = _choose(parse_index(read_document(src, "index.json", what), what), what)
    for _ in range(_MAX_INDEX_DEPTH):
        if desc.media_type not in INDEX_TYPES:
            break
        raw = _read_blob_document(src, desc, "image index")
        desc = _choose(parse_index(raw), f"image index {desc.digest}")
    else:
        raise malformed(what, "image indexes are nested too deeply")

    manifest_raw = _read_blob_document(src, desc, "image manifest")
    manifest = parse_manifest(manifest_raw)
    config_raw = _read_blob_document(src, manifest.config, "image config")
    config = parse_json_object(config_raw, "image config")
    _check_config(config)
    ids = diff_ids(config)
    if ids is not None and len(ids) != len(manifest.layers):
        raise malformed(
            "image config", f"it lists {len(ids)} diff_ids for {len(manifest.layers)} layers"
        )

    count = len(manifest.layers)
    for i, layer in enumerate(manifest.layers, 1):
        _copy_blob(store, src, layer, f"layer {i}/{count} ({layer.digest})")
    store.put_blob_stream(BytesIO(config_raw), manifest.config.digest, what="image config")
    store.put_blob_stream(BytesIO(manifest_raw), desc.digest, what="image manifest")
    return store.tag(tag, desc.digest, manifest.config.digest, [d.digest for d in manifest.layers])


# -- docker save -------------------------------------------------------------------------


def _named_digest(path: str) -> str | None:
    """The digest a docker-save file name carries (`<hex>.json`, `blobs/sha256/<hex>`)."""
    match = _NAMED_DIGEST_RE.fullmatch(path)
    return f"sha256:{match.group(1)}" if match else None


def _docker_entries(raw: bytes) -> list[dict[str, Any]]:
    what = "manifest.json"
    try:
        entries = parse_json_object(b'{"e":' + raw + b"}", what)["e"]
    except ImageError:
        raise malformed(what, "not valid JSON") from None
    if not isinstance(entries, list) or not entries:
        raise malformed(what, "expected a non-empty list of images")
    for entry in entries:
        if not isinstance(entry, dict):
            raise malformed(what, "each image must be an object")
        layers = entry.get("Layers")
        if not isinstance(entry.get("Config"), str) or not isinstance(layers, list):
            raise malformed(what, "each image needs 'Config' (string) and 'Layers' (list)")
        if not all(isinstance(layer, str) for layer in layers):
            raise malformed(what, "'Layers' must list file names")
    return entries


def _pick_docker_entry(entries: list[dict[str, Any]], tag: str) -> dict[str, Any]:
    if len(entries) == 1:
        return entries[0]
    wanted = parse_reference(tag).canonical
    for entry in entries:
        repo_tags = entry.get("RepoTags") or []
        for repo_tag in repo_tags if isinstance(repo_tags, list) else []:
            with contextlib.suppress(ImageError):
                if isinstance(repo_tag, str) and parse_reference(repo_tag).canonical == wanted:
                    return entry
    raise ImageError(
        f"the archive holds {len(entries)} images and none is tagged {tag}",
        hint="import it under one of the tags listed in its manifest.json, or save one image",
    )


def _magic(src: ArchiveSource, name: str) -> bytes:
    with src.open(name) as f:
        return f.read(4)


def _import_docker(store: ImageStore, tag: str, src: ArchiveSource) -> StoredImage:
    what = f"manifest.json of {src.description}"
    entry = _pick_docker_entry(_docker_entries(read_document(src, "manifest.json", what)), tag)
    config_name: str = entry["Config"]
    layer_names: list[str] = entry["Layers"]

    config_raw = read_document(src, config_name, "image config")
    config_digest = sha256_digest(config_raw)
    # Config files are named after their digest (the image ID): a mismatch means tampering.
    verify_digest(config_digest, _named_digest(config_name), f"image config {config_name!r}")
    config = parse_json_object(config_raw, "image config")
    _check_config(config)
    ids = diff_ids(config)
    if ids is not None and len(ids) != len(layer_names):
        raise malformed(
            "image config", f"it lists {len(ids)} diff_ids for {len(layer_names)} layers"
        )

    layers: list[Descriptor] = []
    count = len(layer_names)
    for i, name in enumerate(layer_names):
        media_type = layer_media_type(_magic(src, name))
        # An uncompressed layer's digest is its diff_id, which the config fixes; compressed
        # ones (newer docker) are named after their own digest.
        expected = ids[i] if ids is not None and media_type == OCI_LAYER_TAR else None
        expected = expected or _named_digest(name)
        label = f"layer {i + 1}/{count} ({name}) in {src.description}"
        with src.open(name) as f:
            digest = store.put_blob_stream(f, expected, what=label)
        layers.append(Descriptor(media_type, digest, store.blob_path(digest).stat().st_size))

    store.put_blob_stream(BytesIO(config_raw), config_digest, what="image config")
    manifest_raw = build_manifest(Descriptor(OCI_CONFIG, config_digest, len(config_raw)), layers)
    manifest_digest = store.put_blob_stream(BytesIO(manifest_raw), None, what="image manifest")
    return store.tag(tag, manifest_digest, config_digest, [d.digest for d in layers])
