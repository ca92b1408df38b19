"""ClientHello parsing on real hellos from Python's ssl, split and hostile inputs."""

from __future__ import annotations

import os
import random
import ssl
import struct

import pytest

from matchlock.net.tls_sniff import (
    MAX_HELLO,
    AlertDescription,
    ClientHello,
    Invalid,
    Sniff,
    alert,
    sniff,
)


def real_hello(sni: str | None = "api.example.com", alpn: list[str] | None = None) -> bytes:
    ctx = ssl.create_default_context()
    if sni is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def records(hello: bytes, size: int) -> bytes:
    """Re-frame one ClientHello record into records of `size` bytes of handshake data."""
    body = hello[5:]
    out = b""
    for i in range(0, len(body), size):
        part = body[i : i + size]
        out += bytes([22, 3, 1]) + struct.pack(">H", len(part)) + part
    return out


def test_real_hello_sni_and_alpn() -> None:
    result = sniff(real_hello("API.Example.com", ["h2", "http/1.1"]))
    assert result == ClientHello("api.example.com", ("h2", "http/1.1"))


def test_real_hello_without_sni_or_alpn() -> None:
    assert sniff(real_hello(None)) == ClientHello(None, ())


def test_every_prefix_needs_more() -> None:
    hello = real_hello()
    for i in range(len(hello)):
        assert sniff(hello[:i]) is Sniff.NEED_MORE, i
    assert isinstance(sniff(hello), ClientHello)


def test_split_across_records() -> None:
    hello = real_hello(alpn=["http/1.1"])
    for size in (1, 7, 100):
        framed = records(hello, size)
        assert sniff(framed) == ClientHello("api.example.com", ("http/1.1",))
        assert sniff(framed[:-1]) is Sniff.NEED_MORE


def test_trailing_bytes_after_hello_are_fine() -> None:
    assert isinstance(sniff(real_hello() + b"\x14\x03\x03\x00\x01\x01"), ClientHello)


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"SSH-2.0-OpenSSH\r\n", b"\x00", b"PRI *"])
def test_not_tls(data: bytes) -> None:
    assert sniff(data) is Sniff.NOT_TLS


def test_empty_needs_more() -> None:
    assert sniff(b"") is Sniff.NEED_MORE


def test_oversized_hello_is_invalid() -> None:
    # Declares a 100 KiB handshake message: refused without waiting for it.
    rec = bytes([22, 3, 1, 0x40, 0x00, 1]) + (100 * 1024).to_bytes(3, "big") + b"\0" * 0x3FFC
    assert isinstance(sniff(rec), Invalid)
    # A stream of tiny records that never completes stops at the limit.
    tiny = (bytes([22, 3, 1, 0, 1, 1])) + bytes([22, 3, 1, 0, 1, 0]) * (MAX_HELLO // 6 + 2)
    assert isinstance(sniff(tiny), Invalid)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h[:5] + b"\x02" + h[6:],  # not a ClientHello
        lambda h: h[:3] + b"\x00\x00" + h[5:],  # zero-length record
        lambda h: h[:3] + b"\x48\x01" + h[5:],  # record longer than 2^14
        lambda h: h + b"",  # placeholder (valid)
    ],
)
def test_malformed_headers(mutate: object) -> None:
    hello = real_hello()
    out = mutate(hello)  # type: ignore[operator]
    result = sniff(out)
    if out == hello:
        assert isinstance(result, ClientHello)
    else:
        assert isinstance(result, (Invalid, Sniff))


def _hello_with_extensions(exts: bytes) -> bytes:
    body = b"\x03\x03" + os.urandom(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += struct.pack(">H", len(exts)) + exts
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    return bytes([22, 3, 1]) + struct.pack(">H", len(msg)) + msg


def _ext(etype: int, data: bytes) -> bytes:
    return struct.pack(">HH", etype, len(data)) + data


def _sni(*names: bytes) -> bytes:
    entries = b"".join(b"\x00" + struct.pack(">H", len(n)) + n for n in names)
    return _ext(0, struct.pack(">H", len(entries)) + entries)


def test_synthetic_hello() -> None:
    alpn = b"\x02h2\x08http/1.1"
    data = _hello_with_extensions(_sni(b"x.test") + _ext(16, struct.pack(">H", len(alpn)) + alpn))
    assert sniff(data) == ClientHello("x.test", ("h2", "http/1.1"))


@pytest.mark.parametrize(
    "exts",
    [
        _sni(b"a.test", b"b.test"),  # two host names
        _sni(b"a.test") + _sni(b"b.test"),  # duplicate extension
        _sni(b"bad\x00name"),
        _sni(b"sp ace"),
        _sni(b""),
        _ext(0, b"\x00\x10\x00\x00\x03abc"),  # inner length beyond the extension
        _ext(16, b"\x00\x01\x00"),  # empty ALPN name
        _ext(16, b"\x00\x00"),  # empty ALPN list
        b"\x00\x00\x00\x10\x00",  # extension longer than the block
    ],
)
def test_hostile_extensions_are_invalid(exts: bytes) -> None:
    assert isinstance(sniff(_hello_with_extensions(exts)), Invalid)


def test_fuzz_never_raises() -> None:
    rng = random.Random(4)
    hello = real_hello(alpn=["h2"])
    for _ in range(3000):
        data = bytearray(hello)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cut = rng.randint(0, len(data))
        sniff(bytes(data[:cut]))
    for _ in range(2000):
        sniff(bytes([22, 3]) + os.urandom(rng.randint(0, 600)))


def test_alert_record() -> None:
    assert alert(AlertDescription.UNRECOGNIZED_NAME) == b"\x15\x03\x01\x00\x02\x02\x70"
    assert alert(AlertDescription.ACCESS_DENIED)[-1] == 49
