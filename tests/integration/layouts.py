"""OCI image layouts for tests: the built-in busybox image plus a layer of the test's."""

from __future__ import annotations

import gzip
from pathlib import Path

from matchlock.image.builtin import build_builtin
from matchlock.image.digest import sha256_digest
from matchlock.image.oci import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYOUT_VERSION,
    OCI_MANIFEST,
    Descriptor,
    build_index,
    build_manifest,
    dump_json,
    parse_json_object,
)


def write_layout_with_layer(dest: Path, extra: bytes) -> None:
    """The built-in busybox image plus one more layer (a gzip tar)."""
    base = build_builtin()
    config = parse_json_object(base.config, "config")
    config["rootfs"]["diff_ids"].append(sha256_digest(gzip.decompress(extra)))
    config_raw = dump_json(config)
    manifest = build_manifest(
        Descriptor(OCI_CONFIG, sha256_digest(config_raw), len(config_raw)),
        [Descriptor(OCI_LAYER_TAR, base.layer_digest, len(base.layer)),
         Descriptor(OCI_LAYER_GZIP, sha256_digest(extra), len(extra))],
    )
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for blob in (base.layer, extra, config_raw, manifest):
        (blobs / sha256_digest(blob).split(":", 1)[1]).write_bytes(blob)
    (dest / "oci-layout").write_bytes(dump_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}))
    (dest / "index.json").write_bytes(build_index([Descriptor(
        OCI_MANIFEST, sha256_digest(manifest), len(manifest), platform=base.platform)]))
