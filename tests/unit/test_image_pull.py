"""Manifest resolution and config checks of a pull, against a fake registry client."""

from __future__ import annotations

import hashlib
import json

import pytest

from matchlock.errors import ImageError
from matchlock.image.oci import OCI_INDEX, OCI_MANIFEST, Platform
from matchlock.image.pull import check_config, resolve_manifest
from matchlock.image.reference import parse_reference
from matchlock.image.registry import FetchedManifest

AMD64 = Platform("linux", "amd64")
LAYER = "sha256:" + "1" * 64


def _doc(value: object) -> bytes:
    return json.dumps(value).encode()


def _digest(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


MANIFEST = _doc({
    "schemaVersion": 2, "mediaType": OCI_MANIFEST,
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": "sha256:" + "2" * 64, "size": 10},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": LAYER,
                "size": 5}],
})


def _index(entries: list[tuple[bytes, str, dict[str, str]]]) -> bytes:
    return _doc({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": media_type, "digest": _digest(raw), "size": len(raw), "platform": platform}
        for raw, media_type, platform in entries]})


class FakeRegistry:
    registry = "fake.test"

    def __init__(self, documents: dict[str, tuple[str, bytes]]) -> None:
        self.documents = documents  # tag or digest -> (media type, bytes)
        self.fetched: list[str] = []

    def manifest(self, reference: str, what: str) -> FetchedManifest:
        self.fetched.append(reference)
        media_type, raw = self.documents[reference]
        return FetchedManifest(media_type, _digest(raw), raw)


def test_plain_manifest() -> None:
    client = FakeRegistry({"1": (OCI_MANIFEST, MANIFEST)})
    resolved = resolve_manifest(client, parse_reference("fake.test/a:1"), AMD64)  # type: ignore[arg-type]
    assert resolved.digest == _digest(MANIFEST) and resolved.manifest.layers[0].digest == LAYER


def test_nested_indexes_are_followed() -> None:
    inner = _index([(MANIFEST, OCI_MANIFEST, {"os": "linux", "architecture": "amd64"})])
    outer = _index([(inner, OCI_INDEX, {"os": "linux", "architecture": "amd64"})])
    client = FakeRegistry({"1": (OCI_INDEX, outer), _digest(inner): (OCI_INDEX, inner),
                           _digest(MANIFEST): (OCI_MANIFEST, MANIFEST)})
    resolved = resolve_manifest(client, parse_reference("fake.test/a:1"), AMD64)  # type: ignore[arg-type]
    assert resolved.digest == _digest(MANIFEST)
    assert client.fetched == ["1", _digest(inner), _digest(MANIFEST)]


def test_index_size_must_match() -> None:
    lying = _doc({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": _digest(MANIFEST), "size": len(MANIFEST) + 1,
        "platform": {"os": "linux", "architecture": "amd64"}}]})
    client = FakeRegistry({"1": (OCI_INDEX, lying), _digest(MANIFEST): (OCI_MANIFEST, MANIFEST)})
    with pytest.raises(ImageError, match="size differs"):
        resolve_manifest(client, parse_reference("fake.test/a:1"), AMD64)  # type: ignore[arg-type]


def test_index_loops_end() -> None:
    # An index naming itself cannot exist (its digest would have to contain itself), but
    # deep nesting can: it is cut off.
    docs: dict[str, tuple[str, bytes]] = {}
    raw, media_type = MANIFEST, OCI_MANIFEST
    for _ in range(6):
        raw = _index([(raw, media_type, {"os": "linux", "architecture": "amd64"})])
        media_type = OCI_INDEX
        docs[_digest(raw)] = (OCI_INDEX, raw)
    docs["1"] = (OCI_INDEX, raw)
    with pytest.raises(ImageError, match="nested too deeply"):
        resolve_manifest(FakeRegistry(docs), parse_reference("fake.test/a:1"), AMD64)  # type: ignore[arg-type]


@pytest.mark.parametrize("config, needle", [
    ({"os": "linux", "architecture": "arm64"}, "built for linux/arm64"),
    ({"os": "linux", "architecture": "amd64", "rootfs": {"diff_ids": []}}, "diff_ids"),
    ({"os": "linux", "architecture": "amd64", "config": {"Cmd": 5}}, "config.Cmd"),
    ([], "JSON object"),
])
def test_config_checks(config: object, needle: str) -> None:
    with pytest.raises(ImageError, match=needle):
        check_config(_doc(config), 1, AMD64, "config of x")


def test_good_config() -> None:
    check_config(_doc({"os": "linux", "architecture": "amd64",
                       "rootfs": {"type": "layers", "diff_ids": [LAYER]}}), 1, AMD64, "c")
