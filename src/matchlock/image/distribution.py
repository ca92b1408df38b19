"""Pure pieces of the OCI distribution protocol (no I/O): what to accept, how to read
answers. Used by `registry.py`; unit-tested on their own."""

from __future__ import annotations

import json
import re
from typing import Any

from matchlock.image.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
)

MANIFEST_ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
SCHEMA1_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRIES = 3  # for overloaded registries (429, 5xx)
_MAX_RETRY_AFTER_S = 10.0
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """`bytes 100-199/1000` -> (100, 199, 1000); None if absent or malformed."""
    match = _CONTENT_RANGE_RE.fullmatch((value or "").strip())
    if match is None:
        return None
    start, end = int(match.group(1)), int(match.group(2))
    total = None if match.group(3) == "*" else int(match.group(3))
    if end < start or (total is not None and end >= total):
        return None
    return start, end, total


def error_summary(body: bytes) -> str:
    """`CODE: message` from a distribution-spec error body, or '' if it is not one."""
    try:
        doc = json.loads(body[:65536])
        first = doc["errors"][0]
        code, message = str(first.get("code", "")), str(first.get("message", ""))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""
    return ": ".join(part for part in (code, message) if part)[:200]


def sniff_media_type(header: str | None, raw: bytes) -> str:
    """The manifest's media type: Content-Type if it is a manifest type, else the body's."""
    declared = (header or "").split(";", 1)[0].strip().lower()
    if declared in INDEX_TYPES | MANIFEST_TYPES | SCHEMA1_TYPES:
        return declared
    try:
        doc: Any = json.loads(raw)
    except ValueError:
        return declared
    if not isinstance(doc, dict):
        return declared
    media_type = doc.get("mediaType")
    if isinstance(media_type, str) and media_type:
        return media_type
    if doc.get("schemaVersion") == 1:
        return "application/vnd.docker.distribution.manifest.v1+json"
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc and "layers" in doc:
        return OCI_MANIFEST
    return declared


def retry_after(value: str | None, attempt: int) -> float:
    """Seconds to wait before retry `attempt`: the server's Retry-After, or a backoff."""
    try:
        seconds = float(value) if value else 0.0
    except ValueError:
        seconds = 0.0
    backoff: float = 0.5 * 2.0**attempt
    return min(max(seconds, backoff), _MAX_RETRY_AFTER_S)
