"""What the proxy makes of a connection's first bytes (decides what may be spliced raw)."""

from __future__ import annotations

import pytest

from matchlock.net.proxy import H2_PREFACE, MAX_FIRST_LINE, classify


@pytest.mark.parametrize(
    "data,kind",
    [
        (b"", "more"),
        (b"\x16", "more"),
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "tls"),  # malformed: tls handler refuses
        (H2_PREFACE[:10], "more"),
        (H2_PREFACE + b"\x00\x00", "h2"),
        (b"GET / HTTP/1.1\r\n", "http"),
        (b"get /x HTTP/1.0\n", "http"),
        (b"\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\n\r\n", "http"),
        (b"GET / HTT", "more"),
        (b"\r\n", "more"),
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", "raw"),
        (b"get mykey\r\n", "raw"),  # memcached
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", "raw"),  # PostgreSQL SSLRequest
        (b"*1\r\n$4\r\nPING\r\n", "raw"),  # redis
        (b"A" * MAX_FIRST_LINE, "raw"),
        (b"QUIT", "more"),  # could still become "QUIT / HTTP/1.1"
        (b"GET /x HTTP/1.1 extra", "raw"),
        (b"GET /x\x00", "raw"),
        (b"\x41\x00\x00\x01\x85", "raw"),  # binary that starts with a letter (MySQL)
    ],
)
def test_classify(data: bytes, kind: str) -> None:
    assert classify(data) == kind
