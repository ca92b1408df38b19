"""HTTP/1.1 framing byte for byte: smuggling defences, chunked edge cases, pipelining."""

from __future__ import annotations

import pytest

from matchlock.net.http1 import (
    MAX_HEAD,
    ChunkedReader,
    Framing,
    HttpError,
    Request,
    parse_request,
    parse_response,
    skip_empty_lines,
    split_authority,
)


def req(raw: bytes) -> Request:
    parsed = parse_request(raw)
    assert parsed is not None
    return parsed[0]


def refused(raw: bytes, status: int = 400) -> str:
    with pytest.raises(HttpError) as exc:
        parse_request(raw)
    assert exc.value.status == status, exc.value.message
    return exc.value.message


def test_simple_get_and_head_length() -> None:
    raw = b"GET /a?b=1 HTTP/1.1\r\nHost: x.test\r\nAccept: */*\r\n\r\nNEXT"
    parsed = parse_request(raw)
    assert parsed is not None
    r, end = parsed
    assert raw[end:] == b"NEXT"
    assert (r.method, r.target, r.version, r.host) == (b"GET", b"/a?b=1", b"HTTP/1.1", b"x.test")
    assert r.framing is Framing.NONE and r.keep_alive and not r.websocket
    assert r.path() == "/a"


def test_incremental_needs_more() -> None:
    raw = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n"
    for i in range(len(raw)):
        assert parse_request(raw[:i]) is None
    assert req(raw).framing is Framing.LENGTH


def test_canonical_serialization_drops_hop_by_hop() -> None:
    r = req(
        b"POST /p HTTP/1.1\r\nHost: h\r\nConnection: close, X-Secret-Hop\r\nKeep-Alive: 5\r\n"
        b"X-Secret-Hop: 1\r\nTE: trailers\r\nProxy-Authorization: x\r\nContent-Length: 3\r\n"
        b"X-Keep: yes\r\n\r\n"
    )
    assert not r.keep_alive
    assert r.serialize() == (
        b"POST /p HTTP/1.1\r\nHost: h\r\nX-Keep: yes\r\nContent-Length: 3\r\n\r\n"
    )


def test_connection_host_token_cannot_strip_host() -> None:
    r = req(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: host\r\n\r\n")
    assert b"Host: h\r\n" in r.serialize()


def test_chunked_request_serialized_with_one_framing_header() -> None:
    r = req(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n")
    assert r.framing is Framing.CHUNKED
    assert r.serialize().count(b"Transfer-Encoding") == 1


@pytest.mark.parametrize(
    "raw,status",
    [
        # CL + TE (CL.TE / TE.CL smuggling)
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 4\r\n\r\n",
            400,
        ),
        # repeated / invalid Content-Length
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4, 4\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +4\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x4\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
        # TE variants
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n", 501),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        # whitespace before the colon, obs-fold, bare CR / LF
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length : 4\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n chunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: h\n\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x7fb\r\n\r\n", 400),
        # request line
        (b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET / HTTP/1.1 \r\nHost: h\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET /\xff HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
        (b"GET / FOO/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET foo HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET ftp://h/ HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        # Host
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET http://a.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n", 400),
        (b"GET http://u@a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n", 400),
    ],
)
def test_refused(raw: bytes, status: int) -> None:
    refused(raw, status)


def test_limits() -> None:
    big = b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    refused(big, 431)
    refused(b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * (MAX_HEAD + 10), 431)  # never ends
    many = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: 1\r\n" * 200 + b"\r\n"
    refused(many, 431)


def test_absolute_form_becomes_origin_form() -> None:
    r = req(b"GET HTTP://a.test:8080/x?y HTTP/1.1\r\nHost: a.test:8080\r\n\r\n")
    assert (r.host, r.target) == (b"a.test:8080", b"/x?y")
    r = req(b"GET http://a.test HTTP/1.1\r\n\r\n")
    assert (r.host, r.target) == (b"a.test", b"/")


def test_connect_and_options() -> None:
    assert req(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n").host == b"a.test:443"
    assert req(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n").target == b"*"


def test_keep_alive_rules() -> None:
    assert not req(b"GET / HTTP/1.0\r\nHost: h\r\n\r\n").keep_alive
    assert req(b"GET / HTTP/1.0\r\nHost: h\r\nConnection: Keep-Alive\r\n\r\n").keep_alive
    assert not req(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: foo, CLOSE\r\n\r\n").keep_alive


def test_websocket_detection() -> None:
    ws = req(
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\n"
        b"Sec-WebSocket-Key: k\r\n\r\n"
    )
    assert ws.websocket
    out = ws.serialize()
    assert (
        b"Connection: Upgrade\r\nUpgrade: websocket\r\n" in out and b"Sec-WebSocket-Key: k" in out
    )
    h2c = req(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    assert not h2c.websocket and b"h2c" not in h2c.serialize()


def test_pipelined_requests() -> None:
    buf = bytearray(
        b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok"
        b"\r\nGET /3 HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    targets = []
    while buf:
        skip_empty_lines(buf)
        parsed = parse_request(buf)
        assert parsed is not None
        r, end = parsed
        del buf[:end]
        targets.append(r.target)
        if r.framing is Framing.LENGTH:
            del buf[: r.content_length]
    assert targets == [b"/1", b"/2", b"/3"]


def test_split_authority() -> None:
    assert split_authority(b"A.Test:8443") == ("a.test", 8443)
    assert split_authority(b"a.test") == ("a.test", None)
    assert split_authority(b"[::1]:80") == ("::1", 80)
    for bad in (b"", b":80", b"a.test:99999", b"a.test:x", b"a b"):
        with pytest.raises(HttpError):
            split_authority(bad)


# -- chunked ---------------------------------------------------------------------------------


def feed_all(data: bytes, step: int, decode: bool = False) -> tuple[int, ChunkedReader]:
    parser = ChunkedReader(decode=decode)
    used = 0
    for i in range(0, len(data), step):
        piece = data[i : i + step]
        n = parser.feed(piece)
        used += n
        if parser.done:
            break
        assert n == len(piece)
    return used, parser


CHUNKED = b'5\r\nhello\r\n7;ext="q;x"\r\n, world\r\n0\r\nX-T: 1\r\n\r\n'


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_chunked_end_found_exactly(step: int) -> None:
    used, parser = feed_all(CHUNKED + b"NEXT REQUEST", step, decode=True)
    assert parser.done and used == len(CHUNKED)
    assert b"".join(parser.payload) == b"hello, world"


def test_chunked_large_and_uppercase_hex() -> None:
    body = b"A" * 0x1F0
    data = b"1F0\r\n" + body + b"\r\n0\r\n\r\n"
    used, parser = feed_all(data, 64, decode=True)
    assert parser.done and used == len(data) and b"".join(parser.payload) == body


@pytest.mark.parametrize(
    "data",
    [
        b"5\r\nhelloXX0\r\n\r\n",  # missing CRLF after data
        b"5\nhello\r\n0\r\n\r\n",  # bare LF in size line
        b"5\r\nhello\n0\r\n\r\n",  # bare LF after data
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"5 5\r\nhello\r\n0\r\n\r\n",
        b"11111111111111111\r\n",  # more than 16 hex digits
        b"5;\x00\r\nhello\r\n0\r\n\r\n",
        b"0\r\nbad trailer\r\n\r\n",
        b"0\r\nX: a\rb\r\n\r\n",
        b"F" * 5000,  # endless size line
    ],
)
def test_chunked_malformed(data: bytes) -> None:
    with pytest.raises(HttpError):
        feed_all(data, 3)


def test_chunked_trailer_size_limit() -> None:
    data = b"0\r\n" + b"X: " + b"a" * 5000 + b"\r\n" * 1
    data += (b"Y: " + b"b" * 3000 + b"\r\n") * 10 + b"\r\n"
    with pytest.raises(HttpError):
        feed_all(data, 100)


# -- responses ---------------------------------------------------------------------------------


def resp(raw: bytes, method: bytes = b"GET"):  # type: ignore[no-untyped-def]
    parsed = parse_response(raw, method)
    assert parsed is not None
    return parsed[0]


def test_response_framing() -> None:
    assert resp(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n").framing is Framing.LENGTH
    assert resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").framing is Framing.CHUNKED
    r = resp(b"HTTP/1.1 200 OK\r\n\r\n")
    assert r.framing is Framing.UNTIL_CLOSE and not r.keep_alive
    assert resp(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"HEAD").framing is Framing.NONE
    for code in (b"204", b"304", b"100"):
        assert (
            resp(b"HTTP/1.1 " + code + b" X\r\nContent-Length: 5\r\n\r\n").framing is Framing.NONE
        )
    assert (
        resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n").framing is Framing.UNTIL_CLOSE
    )
    assert resp(b"HTTP/1.1 200\r\nContent-Length: 1, 1\r\n\r\n").content_length == 1
    assert not resp(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keep_alive
    assert not resp(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n bad fold\r\n\r\n",
        b"HTTP/1.1 200 OK\nX: y\r\n\r\n",
    ],
)
def test_bad_responses_are_502(raw: bytes) -> None:
    with pytest.raises(HttpError) as exc:
        parse_response(raw, b"GET")
    assert exc.value.status == 502


def test_response_head_for_guest() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    assert resp(raw).head_for_guest(close=False) == raw
    assert resp(raw).head_for_guest(close=True) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
    )
    both = resp(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n"
        b"Keep-Alive: timeout=5\r\n\r\n"
    )
    assert both.head_for_guest(close=False) == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    ws = resp(b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert b"Connection: Upgrade" in ws.head_for_guest(close=False)
