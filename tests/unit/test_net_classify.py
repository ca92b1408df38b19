"""What the proxy makes of a connection's first bytes (decides what may be spliced raw).

The property that matters for security: whatever an origin could read as a request line is
never "raw", at any point while its bytes trickle in. Two real parsers are the oracles: h11
(strict) and Python's http.server (lenient: repeated whitespace, tabs, HTTP/0.9 lines).
"""

from __future__ import annotations

import io
from http.server import BaseHTTPRequestHandler

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matchlock.net.classify import H2_PREFACE, MAX_FIRST_LINE, classify


@pytest.mark.parametrize(
    "data,kind",
    [
        (b"", "more"),
        (b"\x16", "tls"),
        (H2_PREFACE[:10], "more"),
        (H2_PREFACE + b"\x00\x00", "h2"),
        (b"GET / HTTP/1.1\r\n", "http"),
        (b"get /x HTTP/1.0\n", "http"),
        (b"\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\n\r\n", "http"),
        (b"GET / HTT", "http"),  # decided by "GET " already
        (b"GET", "more"),
        (b"\r\n", "more"),
        # The fronting spellings of issue 9: lenient origins route all of these by Host.
        (b"GET  / HTTP/1.1\r\nHost: evil.test\r\n\r\n", "http"),
        (b"GET\t/ HTTP/1.1\r\n", "http"),
        (b" GET / HTTP/1.1\r\n", "http"),
        (b"GET /\r\n", "http"),  # HTTP/0.9
        (b"GET /x HTTP/1.1 extra", "http"),
        (b"GET\x0b/ HTTP/1.1\r\n", "http"),
        (b"GET\xa0/ HTTP/1.1\r\n", "http"),  # NBSP: str.split() splits there
        (b"GET/ HTTP/1.1\r\n", "http"),
        (b"G3T / HTTP/1.1\r\n", "http"),
        (b"get / HTTP/1.1\r\n", "http"),  # lower case: Go's and h11's servers take it
        (b"get /", "more"),  # the line is awaited: it may still name a version
        (b"get mykey\r\n", "raw"),  # memcached: no origin reads this as a request
        (b"ping over tcp", "more"),
        (b"ping over tcp\r\n", "raw"),
        (b"SET key value\r\n", "http"),  # upper-case word and a space: refused, a known cost
        (b"X" * MAX_FIRST_LINE, "http"),  # undecided at the limit: the strict parser refuses
        (b" " * MAX_FIRST_LINE, "http"),
        # What stays raw: protocols no origin reads as a request.
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", "raw"),
        (b"SSH-2.0-OpenSSH_9.2p1", "more"),  # the whole line is awaited
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", "raw"),  # PostgreSQL SSLRequest
        (b"*1\r\n$4\r\nPING\r\n", "raw"),  # redis
        (b"PING\r\n", "raw"),
        (b"\x41\x00\x00\x01\x85", "raw"),  # binary that starts with a letter
    ],
)
def test_classify(data: bytes, kind: str) -> None:
    assert classify(data) == kind


# --- oracles ---------------------------------------------------------------------------------


def h11_accepts(data: bytes) -> bool:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        return isinstance(conn.next_event(), h11.Request)
    except h11.RemoteProtocolError:
        return False


class _Lenient(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def lenient_accepts(data: bytes) -> bool:
    """Python's http.server request-line parsing (what `GET  / HTTP/1.1` gets past)."""
    h = _Lenient.__new__(_Lenient)
    line, sep, rest = data.partition(b"\n")
    if not sep:
        return False
    h.rfile = io.BytesIO(rest)
    h.wfile = io.BytesIO()
    h.raw_requestline = line + sep
    h.client_address = ("guest", 0)
    h.request_version = h.default_request_version
    h.close_connection = True
    h.requestline = ""
    h.command = ""
    try:
        return bool(h.parse_request())
    except Exception:
        return False


def assert_never_raw(data: bytes) -> None:
    for end in range(1, len(data) + 1):
        assert classify(data[:end]) != "raw", (data, end)


_METHODS = st.sampled_from(
    ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "PROPFIND", "M-SEARCH", "X_Y"]
)
_WS = st.text(alphabet=" \t\x0b\x0c\x1c\x1f\x85\xa0", min_size=1, max_size=3)
_TARGET = st.sampled_from(["/", "/x?y=1", "*", "http://evil.test/", "//a", "a", "/%00"])
_VERSION = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "http/1.1", "HTTP/2.0", "HTTP/0.9", ""])


@st.composite
def request_like(draw: st.DrawFn) -> bytes:
    method = draw(_METHODS)
    if draw(st.booleans()):
        method = method.lower()
    parts = [draw(st.text(alphabet="\r\n ", max_size=2)), method, draw(_WS), draw(_TARGET)]
    version = draw(_VERSION)
    if version:
        parts += [draw(_WS), version]
    parts.append(draw(st.sampled_from(["\r\n", "\n", " \r\n"])))
    parts.append("Host: evil.test\r\n\r\n")
    return "".join(parts).encode("latin-1")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_like())
def test_nothing_an_origin_reads_as_a_request_is_raw(data: bytes) -> None:
    if h11_accepts(data) or lenient_accepts(data.lstrip(b"\r\n")):
        assert_never_raw(data)


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_accepted_by_an_oracle_are_not_raw(data: bytes) -> None:
    if h11_accepts(data) or lenient_accepts(data):
        assert_never_raw(data)


def test_the_oracles_accept_the_fronting_spellings() -> None:
    # Keeps the property tests honest: they only test something if the oracles say yes.
    assert lenient_accepts(b"GET  / HTTP/1.1\r\n\r\n")
    assert lenient_accepts(b"GET\t/ HTTP/1.1\r\n\r\n")
    assert lenient_accepts(b"GET /\r\n")
    assert h11_accepts(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert not h11_accepts(b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n")
