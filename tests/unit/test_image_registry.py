"""Pure protocol helpers: Content-Range, error bodies, media types, retry delays."""

from __future__ import annotations

import json

import pytest

from matchlock.image.distribution import (
    error_summary,
    parse_content_range,
    retry_after,
    sniff_media_type,
)
from matchlock.image.oci import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from matchlock.image.reference import parse_reference
from matchlock.image.registry import api_host


def test_content_range() -> None:
    assert parse_content_range("bytes 100-199/1000") == (100, 199, 1000)
    assert parse_content_range("bytes 0-0/*") == (0, 0, None)
    for bad in (None, "", "bytes 5-1/10", "bytes 0-10/10", "items 0-1/2", "bytes=0-1/2"):
        assert parse_content_range(bad) is None


def test_error_summary() -> None:
    body = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown",
                                   "detail": {"Tag": "x"}}]}).encode()
    assert error_summary(body) == "MANIFEST_UNKNOWN: manifest unknown"
    for bad in (b"", b"<html>", b"{}", b'{"errors": []}', b'{"errors": [1]}'):
        assert error_summary(bad) == ""


@pytest.mark.parametrize("header, body, expected", [
    (OCI_MANIFEST, b"{}", OCI_MANIFEST),
    (f"{DOCKER_MANIFEST}; charset=utf-8", b"{}", DOCKER_MANIFEST),
    ("application/json", b'{"mediaType": "' + OCI_INDEX.encode() + b'"}', OCI_INDEX),
    ("text/plain", b'{"schemaVersion": 2, "manifests": []}', OCI_INDEX),
    (None, b'{"schemaVersion": 2, "config": {}, "layers": []}', OCI_MANIFEST),
    (None, b'{"schemaVersion": 1}', "application/vnd.docker.distribution.manifest.v1+json"),
    ("application/octet-stream", b"\x00", "application/octet-stream"),
])
def test_sniff_media_type(header: str | None, body: bytes, expected: str) -> None:
    assert sniff_media_type(header, body) == expected


def test_docker_hub_api_host() -> None:
    hub = parse_reference("alpine").registry
    assert api_host(hub) != hub
    assert api_host("127.0.0.1:5000") == "127.0.0.1:5000"


def test_retry_after() -> None:
    assert retry_after("3", 0) == 3.0
    assert retry_after(None, 0) == 0.5 and retry_after("junk", 2) == 2.0
    assert retry_after("3600", 0) == 10.0  # capped: a pull should not hang for an hour
