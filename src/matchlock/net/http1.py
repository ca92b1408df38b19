"""HTTP/1.1 message framing for the proxy, without I/O.

The guest is hostile and the origin is merely untrusted, so parsing is strict where a lenient
reading could make the proxy and the origin disagree about where a request ends (request
smuggling): Content-Length together with Transfer-Encoding, repeated or malformed
Content-Length, obs-fold, bare CR or LF, whitespace before the colon, non-chunked transfer
codings and HTTP/1.0 with Transfer-Encoding are all refused. Requests are re-serialized in a
canonical form (one framing header, hop-by-hop headers dropped) before they go upstream.

Bodies are never buffered: `ChunkedReader` only tracks where the chunked encoding ends, so the
proxy forwards each read as it arrives (SSE streams pass through unbuffered).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

MAX_HEAD = 64 * 1024
MAX_REQUEST_LINE = 8192
MAX_HEADERS = 100
MAX_CHUNK_LINE = 4096
MAX_TRAILERS = 16 * 1024

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_METHOD = re.compile(_TOKEN)
_TARGET = re.compile(rb"[\x21-\x7e]+")
_REQ_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
# Responses come from origins we do not control; tolerate any byte but CR, LF and NUL in values.
_RESP_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\r\n\x00]*?)[ \t]*")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n\x00]*))?")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e]*)?")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_AUTHORITY = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.~!$&'()*+,;=%-]*)(?::([0-9]{1,5}))?")

# Headers that describe one hop; never forwarded as the guest or origin sent them.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"content-length",
    }
)


class HttpError(Exception):
    """The peer sent something we refuse; `status` is what to answer the guest with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Framing(enum.Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until-close"


Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Request:
    method: bytes
    target: bytes  # origin-form ("/path?q") after normalization
    version: bytes  # b"HTTP/1.1" or b"HTTP/1.0"
    headers: Headers
    host: bytes  # authority: Host header or the absolute-form URI's
    framing: Framing = Framing.NONE
    content_length: int = 0
    keep_alive: bool = True
    websocket: bool = False
    connection_tokens: frozenset[bytes] = field(default_factory=frozenset)

    def serialize(self) -> bytes:
        """The canonical head sent upstream: hop-by-hop headers dropped, one framing header.

        Headers the guest listed in `Connection` are hop-by-hop too. The upstream connection is
        ours to manage, so the guest's `Connection: close` is not forwarded (it would defeat
        upstream keep-alive); a WebSocket handshake keeps its Upgrade/Connection pair.
        """
        # Never let `Connection: host` strip the Host we checked against the name.
        drop = HOP_BY_HOP | (self.connection_tokens - {b"host"})
        out = [b"%s %s %s\r\n" % (self.method, self.target, self.version)]
        for name, value in self.headers:
            if name.lower() not in drop:
                out.append(b"%s: %s\r\n" % (name, value))
        if self.websocket:
            out.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
        if self.framing is Framing.CHUNKED:
            out.append(b"Transfer-Encoding: chunked\r\n")
        elif self.framing is Framing.LENGTH:
            out.append(b"Content-Length: %d\r\n" % self.content_length)
        elif self.method in (b"POST", b"PUT", b"PATCH"):
            out.append(b"Content-Length: 0\r\n")
        out.append(b"\r\n")
        return b"".join(out)

    def path(self) -> str:
        """The path without the query, for audit events."""
        return self.target.split(b"?", 1)[0].decode("latin-1")


@dataclass(slots=True)
class Response:
    status: int
    version: bytes
    headers: Headers
    raw: bytes  # the head as received
    framing: Framing = Framing.NONE
    content_length: int = 0
    keep_alive: bool = True  # may the upstream connection be reused afterwards
    has_hop_by_hop: bool = False
    cl_and_te: bool = False

    def head_for_guest(self, close: bool) -> bytes:
        """The head to send the guest; the raw bytes unless something has to change.

        `close`: the proxy will close the guest connection after this response, so say so.
        Upstream hop-by-hop headers (Connection, Keep-Alive) describe the upstream hop and
        are replaced by our own.
        """
        if not self.has_hop_by_hop and not self.cl_and_te and not close:
            return self.raw
        keep = self.status == 101  # the Upgrade/Connection pair is the point of a 101
        drop = (
            frozenset() if keep else frozenset({b"connection", b"keep-alive", b"proxy-connection"})
        )
        out = [self.raw[: self.raw.index(b"\r\n") + 2]]
        for name, value in self.headers:
            low = name.lower()
            if low in drop or (self.cl_and_te and low == b"content-length"):
                continue
            out.append(b"%s: %s\r\n" % (name, value))
        if close and not keep:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        return b"".join(out)

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


def _head_end(buf: bytes | bytearray, start: int) -> int:
    """Offset just past the blank line ending a head, or -1; refuses bare LF early."""
    end = buf.find(b"\r\n\r\n", start)
    if end >= 0:
        return end + 4
    if b"\n\n" in buf[start:]:
        raise HttpError(400, "bare LF line ending in the head")
    if len(buf) - start > MAX_HEAD:
        raise HttpError(431, f"request head larger than {MAX_HEAD} bytes")
    return -1


def _lines(head: bytes) -> list[bytes]:
    if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\r\n"):
        raise HttpError(400, "bare CR or LF in the head")
    lines = head[:-4].split(b"\r\n")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    return lines


def skip_empty_lines(buf: bytearray) -> None:
    """RFC 9112 §2.2: a server should ignore CRLFs before a request line (old clients)."""
    n = 0
    while buf.startswith(b"\r\n", n):
        n += 2
    if n:
        del buf[:n]


def _request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if len(method) > 32 or not _METHOD.fullmatch(method):
        raise HttpError(400, "invalid method")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/"):
            raise HttpError(505, "HTTP version not supported")
        raise HttpError(400, "malformed request line")
    if not _TARGET.fullmatch(target):
        raise HttpError(400, "invalid request target")
    return method, target, version


def parse_request(buf: bytes | bytearray) -> tuple[Request, int] | None:
    """Parse a request head at the start of `buf`: (request, head length) or None for more."""
    end = _head_end(buf, 0)
    if end < 0:
        line_end = buf.find(b"\n", 0, MAX_REQUEST_LINE + 1)
        if line_end < 0 and len(buf) > MAX_REQUEST_LINE:
            raise HttpError(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
        if line_end >= 0:
            # Judged as soon as it is complete: almost-HTTP (and text protocols that look
            # like it) get their 400 at once instead of waiting for a head that never comes.
            if line_end == 0 or buf[line_end - 1] != 0x0D:
                raise HttpError(400, "request line not ended by CRLF")
            _request_line(bytes(buf[: line_end - 1]))
        return None
    if end > MAX_HEAD:
        raise HttpError(431, f"request head larger than {MAX_HEAD} bytes")
    lines = _lines(bytes(buf[:end]))
    if len(lines[0]) > MAX_REQUEST_LINE:
        raise HttpError(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
    method, target, version = _request_line(lines[0])
    headers: Headers = []
    host: bytes | None = None
    cl: bytes | None = None
    te: bytes | None = None
    conn: list[bytes] = []
    upgrade = b""
    for line in lines[1:]:
        m = _REQ_FIELD.fullmatch(line)
        if m is None:
            if line[:1] in (b" ", b"\t"):
                raise HttpError(400, "obsolete line folding (obs-fold) in a header")
            raise HttpError(400, "malformed header field")
        name, value = m.group(1), m.group(2)
        headers.append((name, value))
        low = name.lower()
        if low == b"host":
            if host is not None:
                raise HttpError(400, "more than one Host header")
            host = value
        elif low == b"content-length":
            if cl is not None:
                raise HttpError(400, "more than one Content-Length header")
            cl = value
        elif low == b"transfer-encoding":
            if te is not None:
                raise HttpError(400, "more than one Transfer-Encoding header")
            te = value
        elif low == b"connection":
            conn.extend(t.strip().lower() for t in value.split(b","))
        elif low == b"upgrade":
            upgrade = value.lower()
    req = Request(method, target, version, headers, b"")
    if te is not None:
        if cl is not None:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        if version == b"HTTP/1.0":
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if te.lower() != b"chunked":
            raise HttpError(501, "only Transfer-Encoding: chunked is supported")
        req.framing = Framing.CHUNKED
    elif cl is not None:
        if not _DIGITS.fullmatch(cl):
            raise HttpError(400, "invalid Content-Length")
        req.content_length = int(cl)
        req.framing = Framing.LENGTH if req.content_length else Framing.NONE
    tokens = frozenset(t for t in conn if t)
    req.connection_tokens = tokens
    req.keep_alive = (
        (b"close" not in tokens) if version == b"HTTP/1.1" else (b"keep-alive" in tokens)
    )
    req.websocket = (
        method == b"GET" and b"upgrade" in tokens and upgrade.split(b",")[0].strip() == b"websocket"
    )
    req.host = _request_authority(req, host)
    return req, end


def _request_authority(req: Request, host: bytes | None) -> bytes:
    target = req.target
    if target.startswith(b"/"):
        if host is None:
            raise HttpError(400, "missing Host header")
        return host
    if req.method == b"CONNECT":
        return target  # authority-form; the proxy refuses CONNECT
    if target == b"*" and req.method == b"OPTIONS":
        if host is None:
            raise HttpError(400, "missing Host header")
        return host
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise HttpError(400, "invalid request target")
    slash = rest.find(b"/")
    authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
    if b"@" in authority or not authority:
        raise HttpError(400, "invalid authority in the request target")
    if host is not None and host.lower() != authority.lower():
        raise HttpError(400, "Host header differs from the request target's authority")
    req.target = path
    return authority


def split_authority(authority: bytes) -> tuple[str, int | None]:
    """`host[:port]` → (lower-case host, port or None); HttpError(400) if malformed."""
    m = _AUTHORITY.fullmatch(authority)
    if m is None or not m.group(1):
        raise HttpError(400, "malformed Host")
    host = m.group(1).decode("ascii").lower()
    if host.startswith("["):
        host = host[1:-1]
    if m.group(2) is None:
        return host.rstrip("."), None
    port = int(m.group(2))
    if not 0 < port < 65536:
        raise HttpError(400, "malformed Host port")
    return host.rstrip("."), port


def parse_response(buf: bytes | bytearray, request_method: bytes) -> tuple[Response, int] | None:
    """Parse a response head at the start of `buf`: (response, head length) or None."""
    try:
        end = _head_end(buf, 0)
        if end < 0:
            return None
        if end > MAX_HEAD:
            raise HttpError(502, "response head too large")
        raw = bytes(buf[:end])
        lines = _lines(raw)
    except HttpError as exc:
        raise HttpError(502, f"bad upstream response: {exc.message}") from None
    m = _STATUS_LINE.fullmatch(lines[0])
    if m is None:
        raise HttpError(502, "bad upstream response: malformed status line")
    status = int(m.group(2))
    version = b"HTTP/1." + m.group(1)
    headers: Headers = []
    cls: list[bytes] = []
    te: list[bytes] = []
    conn: list[bytes] = []
    hop = False
    for line in lines[1:]:
        fm = _RESP_FIELD.fullmatch(line)
        if fm is None:
            raise HttpError(502, "bad upstream response: malformed header field")
        name, value = fm.group(1), fm.group(2)
        headers.append((name, value))
        low = name.lower()
        if low == b"content-length":
            cls.append(value)
        elif low == b"transfer-encoding":
            te.append(value)
        elif low in (b"connection", b"keep-alive", b"proxy-connection"):
            hop = True
            if low == b"connection":
                conn.extend(t.strip().lower() for t in value.split(b","))
    resp = Response(status, version, headers, raw, has_hop_by_hop=hop)
    resp.keep_alive = (b"close" not in conn) if version == b"HTTP/1.1" else (b"keep-alive" in conn)
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        resp.framing = Framing.NONE
    elif te:
        codings = [c.strip().lower() for v in te for c in v.split(b",")]
        if codings[-1] == b"chunked":
            resp.framing = Framing.CHUNKED
        else:
            resp.framing = Framing.UNTIL_CLOSE
        resp.cl_and_te = bool(cls)
    elif cls:
        values = {c.strip() for v in cls for c in v.split(b",")}
        if len(values) != 1 or not _DIGITS.fullmatch(next(iter(values))):
            raise HttpError(502, "bad upstream response: invalid Content-Length")
        resp.content_length = int(next(iter(values)))
        resp.framing = Framing.LENGTH if resp.content_length else Framing.NONE
    else:
        resp.framing = Framing.UNTIL_CLOSE
    if resp.framing is Framing.UNTIL_CLOSE:
        resp.keep_alive = False
    return resp, end


class ChunkedReader:
    """Finds the end of a chunked body in a byte stream, byte-exact, without buffering data.

    `feed(data)` returns how many bytes of `data` belong to the body (forward them verbatim);
    `done` tells whether the body, trailers included, is complete. With `decode=True` the
    chunk payloads are also collected in `payload` (for HTTP/2, which has its own framing).
    """

    __slots__ = ("_line", "_remaining", "_state", "_trailer_bytes", "decode", "done", "payload")

    _SIZE, _DATA, _DATA_CR, _DATA_LF, _TRAILER = range(5)

    def __init__(self, decode: bool = False) -> None:
        self._state = self._SIZE
        self._remaining = 0
        self._line = bytearray()
        self._trailer_bytes = 0
        self.decode = decode
        self.done = False
        self.payload: list[bytes] = []

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        pos, n = 0, len(data)
        while pos < n and not self.done:
            state = self._state
            if state == self._DATA:
                take = min(self._remaining, n - pos)
                if self.decode:
                    self.payload.append(bytes(data[pos : pos + take]))
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self._DATA_CR
            elif state == self._DATA_CR:
                if data[pos] != 0x0D:
                    raise HttpError(400, "chunk data not followed by CRLF")
                pos += 1
                self._state = self._DATA_LF
            elif state == self._DATA_LF:
                if data[pos] != 0x0A:
                    raise HttpError(400, "chunk data not followed by CRLF")
                pos += 1
                self._state = self._SIZE
            else:
                pos = self._feed_line(data, pos, n)
        return pos

    def _feed_line(self, data: bytes | bytearray | memoryview, pos: int, n: int) -> int:
        # Lines are short; scan for LF and require the CR right before it.
        chunk = bytes(data[pos : min(n, pos + MAX_CHUNK_LINE + 2)])
        nl = chunk.find(b"\n")
        limit = MAX_CHUNK_LINE if self._state == self._SIZE else MAX_TRAILERS
        if nl < 0:
            self._line += chunk
            if len(self._line) > limit:
                raise HttpError(400, "chunk size or trailer line too long")
            return pos + len(chunk)
        self._line += chunk[: nl + 1]
        line = bytes(self._line)
        self._line.clear()
        if len(line) < 2 or line[-2] != 0x0D or b"\r" in line[:-2]:
            raise HttpError(400, "bare CR or LF in chunked encoding")
        line = line[:-2]
        if self._state == self._SIZE:
            m = _CHUNK_SIZE.fullmatch(line)
            if m is None:
                raise HttpError(400, "invalid chunk size line")
            size = int(m.group(1), 16)
            if size == 0:
                self._state = self._TRAILER
            else:
                self._remaining = size
                self._state = self._DATA
        else:
            self._trailer_bytes += len(line) + 2
            if self._trailer_bytes > MAX_TRAILERS:
                raise HttpError(400, "trailers too large")
            if not line:
                self.done = True
            elif not _REQ_FIELD.fullmatch(line):
                raise HttpError(400, "malformed trailer field")
        return pos + nl + 1
