"""Build small OCI image layouts for the tests and push them with skopeo."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class Image:
    """One image manifest with its config and (gzip) layers, as bytes."""

    manifest: bytes
    config: bytes
    layers: tuple[bytes, ...]
    platform: dict[str, str]

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)

    def blobs(self) -> list[bytes]:
        return [self.manifest, self.config, *self.layers]


def make_image(tars: list[bytes], *, arch: str = "amd64", os_name: str = "linux",
               variant: str | None = None, cmd: tuple[str, ...] = ("sh",)) -> Image:
    """An image whose layers are `tars` (uncompressed tar bytes), gzipped."""
    layers = tuple(gz(t) for t in tars)
    platform = {"architecture": arch, "os": os_name}
    if variant:
        platform["variant"] = variant
    config = _json({
        **platform,
        "config": {"Cmd": list(cmd), "Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [digest_of(t) for t in tars]},
    })
    manifest = _json({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": digest_of(x), "size": len(x)}
                   for x in layers],
    })
    return Image(manifest, config, layers, platform)


def write_layout(dest: Path, ref: str, images: list[Image], *, as_index: bool) -> str:
    """An OCI layout naming `ref`: one image, or an index of all of them. Returns its digest."""
    if dest.exists():
        shutil.rmtree(dest)
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for image in images:
        for blob in image.blobs():
            (blobs / digest_of(blob).split(":")[1]).write_bytes(blob)
    annotations = {"org.opencontainers.image.ref.name": ref}
    if as_index:
        index = _json({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": i.digest,
                           "size": len(i.manifest), "platform": i.platform} for i in images],
        })
        (blobs / digest_of(index).split(":")[1]).write_bytes(index)
        top = {"mediaType": OCI_INDEX, "digest": digest_of(index), "size": len(index)}
    else:
        (image,) = images
        top = {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest)}
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (dest / "index.json").write_bytes(_json({
        "schemaVersion": 2, "manifests": [{**top, "annotations": annotations}],
    }))
    return str(top["digest"])


def skopeo_push(layout: Path, ref: str, dest: str, *, creds: str | None = None,
                cert_dir: Path | None = None, all_images: bool = False) -> None:
    """Copy `oci:layout:ref` to `docker://dest` unchanged."""
    cmd = ["skopeo", "copy", "-q"]
    if _has_preserve():
        cmd.append("--preserve-digests")
    if all_images:
        cmd.append("--all")
    if cert_dir is not None:
        cmd += ["--dest-cert-dir", str(cert_dir)]
    else:
        cmd.append("--dest-tls-verify=false")
    if creds is not None:
        cmd += ["--dest-creds", creds]
    cmd += [f"oci:{layout}:{ref}", f"docker://{dest}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr}")


_PRESERVE: bool | None = None


def _has_preserve() -> bool:
    """skopeo >= 1.10 can refuse to change digests; older ones keep gzip layers as they are."""
    global _PRESERVE
    if _PRESERVE is None:
        out = subprocess.run(["skopeo", "copy", "--help"], capture_output=True, text=True)
        _PRESERVE = "--preserve-digests" in out.stdout
    return _PRESERVE
