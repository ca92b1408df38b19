"""OCI/Docker manifest, index and descriptor documents: parsing (defensively) and writing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from matchlock.errors import ImageError
from matchlock.image.digest import validate_digest

# Manifests, indexes and configs are small; anything larger is not a real image document and
# would only cost memory.
MAX_DOCUMENT_BYTES = 16 << 20

OCI_LAYOUT_VERSION = "1.0.0"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
LAYER_TYPES = frozenset(
    {
        OCI_LAYER_TAR,
        OCI_LAYER_GZIP,
        OCI_LAYER_ZSTD,
        DOCKER_LAYER_GZIP,
        # Non-distributable variants carry the same bytes; only their push policy differs.
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

_MALFORMED_HINT = "the image is malformed; re-export or re-pull it"


def layer_media_type(magic: bytes) -> str:
    """The OCI layer media type matching a blob's first bytes."""
    if magic.startswith(_GZIP_MAGIC):
        return OCI_LAYER_GZIP
    if magic.startswith(_ZSTD_MAGIC):
        return OCI_LAYER_ZSTD
    return OCI_LAYER_TAR


def malformed(what: str, why: str) -> ImageError:
    return ImageError(f"{what} is malformed: {why}", hint=_MALFORMED_HINT)


def parse_json_object(raw: bytes, what: str) -> dict[str, Any]:
    """Decode a JSON object; any decoding problem becomes an ImageError naming `what`."""
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise malformed(what, f"it is larger than {MAX_DOCUMENT_BYTES >> 20} MiB")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # RecursionError: deeply nested arrays are a cheap way to crash a naive parser.
        raise malformed(what, f"not valid JSON ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise malformed(what, "expected a JSON object")
    return value


def dump_json(value: dict[str, Any]) -> bytes:
    """Compact JSON with a stable byte form, so documents we write have stable digests."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def get_str(obj: dict[str, Any], key: str, what: str, *, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise malformed(what, f"{key!r} is missing")
        return None
    if not isinstance(value, str):
        raise malformed(what, f"{key!r} must be a string")
    return value


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.platform is not None:
            platform: dict[str, str] = {
                "os": self.platform.os,
                "architecture": self.platform.architecture,
            }
            if self.platform.variant:
                platform["variant"] = self.platform.variant
            out["platform"] = platform
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


def parse_descriptor(obj: Any, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise malformed(what, "a descriptor must be a JSON object")
    media_type = get_str(obj, "mediaType", what) or ""
    digest = validate_digest(get_str(obj, "digest", what, required=True) or "", f"{what} digest")
    size = obj.get("size")
    # bool is an int subclass in Python; a JSON `true` is not a size.
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise malformed(what, "'size' must be a non-negative integer")
    platform = None
    raw_platform = obj.get("platform")
    if raw_platform is not None:
        if not isinstance(raw_platform, dict):
            raise malformed(what, "'platform' must be an object")
        platform = Platform(
            os=get_str(raw_platform, "os", what) or "",
            architecture=get_str(raw_platform, "architecture", what) or "",
            variant=get_str(raw_platform, "variant", what),
        )
    annotations: dict[str, str] = {}
    raw_annotations = obj.get("annotations")
    if raw_annotations is not None:
        if not isinstance(raw_annotations, dict) or not all(
            isinstance(v, str) for v in raw_annotations.values()
        ):
            raise malformed(what, "'annotations' must map strings to strings")
        annotations = dict(raw_annotations)
    return Descriptor(media_type, digest, size, platform, annotations)


def _descriptor_list(doc: dict[str, Any], key: str, what: str) -> list[Descriptor]:
    items = doc.get(key)
    if not isinstance(items, list):
        raise malformed(what, f"{key!r} must be a list")
    return [parse_descriptor(item, f"{what} {key}[{i}]") for i, item in enumerate(items)]


def _check_schema(doc: dict[str, Any], what: str) -> None:
    if doc.get("schemaVersion") != 2:
        raise malformed(what, "only schemaVersion 2 is supported")


def parse_index(raw: bytes, what: str = "image index") -> list[Descriptor]:
    doc = parse_json_object(raw, what)
    _check_schema(doc, what)
    return _descriptor_list(doc, "manifests", what)


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]


def parse_manifest(raw: bytes, what: str = "image manifest") -> Manifest:
    doc = parse_json_object(raw, what)
    _check_schema(doc, what)
    media_type = doc.get("mediaType")
    if media_type is not None and media_type not in MANIFEST_TYPES:
        raise malformed(what, f"unsupported media type {media_type!r}")
    config = parse_descriptor(doc.get("config"), f"{what} config")
    layers = _descriptor_list(doc, "layers", what)
    for i, layer in enumerate(layers):
        if layer.media_type not in LAYER_TYPES:
            raise malformed(what, f"layer {i} has unsupported media type {layer.media_type!r}")
    return Manifest(config, tuple(layers))


def build_manifest(config: Descriptor, layers: list[Descriptor]) -> bytes:
    """An OCI image manifest for the given blobs, as stable bytes."""
    return dump_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
    )


def build_index(manifests: list[Descriptor]) -> bytes:
    return dump_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [m.to_json() for m in manifests],
        }
    )


def diff_ids(config: dict[str, Any], what: str = "image config") -> list[str] | None:
    """The config's `rootfs.diff_ids` (uncompressed layer digests), or None if absent."""
    rootfs = config.get("rootfs")
    if rootfs is None:
        return None
    if not isinstance(rootfs, dict):
        raise malformed(what, "'rootfs' must be an object")
    ids = rootfs.get("diff_ids")
    if ids is None:
        return None
    if not isinstance(ids, list):
        raise malformed(what, "'rootfs.diff_ids' must be a list")
    return [validate_digest(d, f"{what} diff_id") for d in ids]
