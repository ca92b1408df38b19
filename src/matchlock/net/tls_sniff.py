"""Read the SNI and ALPN of a TLS ClientHello from a connection's first bytes (pure).

The proxy decides on the name *before* any handshake, so this parser sees raw guest bytes:
everything is bounds-checked, the ClientHello may be split across records and reads, and the
total looked at is capped (MAX_HELLO) so a guest cannot make the proxy buffer without end.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_HELLO = 16 * 1024
_HANDSHAKE = 22
_ALERT = 21
_CLIENT_HELLO = 1
_EXT_SNI = 0
_EXT_ALPN = 16
_MAX_RECORD = 16384


class Sniff(enum.Enum):
    NEED_MORE = "need more bytes"
    NOT_TLS = "not TLS"


@dataclass(frozen=True, slots=True)
class ClientHello:
    sni: str | None
    alpn: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Invalid:
    """Looks like TLS but is malformed or too large: the connection must be dropped."""

    reason: str


SniffResult = ClientHello | Invalid | Sniff


class AlertDescription(enum.IntEnum):
    HANDSHAKE_FAILURE = 40
    ACCESS_DENIED = 49
    DECODE_ERROR = 50
    INTERNAL_ERROR = 80
    UNRECOGNIZED_NAME = 112


def alert(description: AlertDescription) -> bytes:
    """A fatal alert record, sent in the clear before any handshake."""
    return bytes([_ALERT, 3, 1, 0, 2, 2, int(description)])


def looks_like_tls(data: bytes) -> bool:
    return len(data) >= 1 and data[0] == _HANDSHAKE and (len(data) < 2 or data[1] == 3)


def sniff(data: bytes) -> SniffResult:
    """Classify the first bytes of a connection; `data` may grow between calls."""
    if not data:
        return Sniff.NEED_MORE
    if not looks_like_tls(data):
        return Sniff.NOT_TLS
    # Reassemble the handshake message from consecutive handshake records.
    body = bytearray()
    pos = 0
    need: int | None = None
    while need is None or len(body) < need:
        if pos + 5 > len(data):
            return _more(data)
        ctype, major, _minor, length = data[pos], data[pos + 1], data[pos + 2], _u16(data, pos + 3)
        if ctype != _HANDSHAKE or major != 3:
            return Invalid("record before the end of the ClientHello is not a handshake record")
        if length == 0 or length > _MAX_RECORD:
            return Invalid("bad TLS record length")
        if pos + 5 + length > len(data):
            if pos + 5 + length > MAX_HELLO:
                return Invalid("ClientHello larger than the limit")
            return Sniff.NEED_MORE
        body += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if need is None and len(body) >= 4:
            if body[0] != _CLIENT_HELLO:
                return Invalid("first handshake message is not a ClientHello")
            need = 4 + (body[1] << 16 | body[2] << 8 | body[3])
            if need > MAX_HELLO:
                return Invalid("ClientHello larger than the limit")
    try:
        return _parse_hello(bytes(body[4:need]))
    except _Malformed as exc:
        return Invalid(str(exc))


def _more(data: bytes) -> SniffResult:
    return (
        Invalid("ClientHello larger than the limit") if len(data) >= MAX_HELLO else Sniff.NEED_MORE
    )


class _Malformed(Exception):
    pass


def _u16(data: bytes | bytearray, pos: int) -> int:
    return data[pos] << 8 | data[pos + 1]


class _Reader:
    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos, self.end = data, pos, len(data) if end is None else end

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise _Malformed("truncated ClientHello")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return _u16(self.take(2), 0)

    def vector(self, length: int) -> _Reader:
        start = self.pos
        self.take(length)
        return _Reader(self.data, start, start + length)

    @property
    def left(self) -> int:
        return self.end - self.pos


def _parse_hello(msg: bytes) -> ClientHello:
    r = _Reader(msg)
    if r.u8() != 3:
        raise _Malformed("unsupported ClientHello version")
    r.take(1 + 32)  # minor version, random
    sid = r.u8()
    if sid > 32:
        raise _Malformed("session id too long")
    r.take(sid)
    suites = r.u16()
    if suites < 2 or suites % 2:
        raise _Malformed("bad cipher suite list")
    r.take(suites)
    compressions = r.u8()
    if compressions < 1:
        raise _Malformed("no compression methods")
    r.take(compressions)
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    if r.left == 0:  # no extensions at all (very old clients)
        return ClientHello(None, ())
    exts = r.vector(r.u16())
    if r.left:
        raise _Malformed("trailing bytes after extensions")
    seen: set[int] = set()
    while exts.left:
        etype, elen = exts.u16(), exts.u16()
        ext = exts.vector(elen)
        if etype in seen:
            raise _Malformed(f"duplicate extension {etype}")
        seen.add(etype)
        if etype == _EXT_SNI:
            sni = _parse_sni(ext)
        elif etype == _EXT_ALPN:
            alpn = _parse_alpn(ext)
    return ClientHello(sni, alpn)


def _parse_sni(ext: _Reader) -> str | None:
    if ext.left == 0:
        return None  # allowed in a ServerHello; tolerate
    names = ext.vector(ext.u16())
    if ext.left:
        raise _Malformed("trailing bytes in server_name")
    host: str | None = None
    while names.left:
        kind = names.u8()
        raw = names.take(names.u16())
        if kind != 0:
            continue
        if host is not None:
            raise _Malformed("more than one host_name in server_name")
        if not raw or len(raw) > 255 or not all(0x21 <= b < 0x7F for b in raw):
            raise _Malformed("server_name is not a printable ASCII host name")
        host = raw.decode("ascii").lower()
    return host


def _parse_alpn(ext: _Reader) -> tuple[str, ...]:
    protos = ext.vector(ext.u16())
    if ext.left:
        raise _Malformed("trailing bytes in ALPN")
    out = []
    while protos.left:
        raw = protos.take(protos.u8())
        if not raw:
            raise _Malformed("empty ALPN protocol name")
        out.append(raw.decode("latin-1"))
    if not out:
        raise _Malformed("empty ALPN list")
    return tuple(out)
