"""What a guest connection's first bytes are: TLS, HTTP, or something that may be spliced raw.

Pure (no I/O), and the proxy's first line of defence against domain fronting: a byte stream
that is spliced raw reaches the origin without the SNI/Host check, so anything an origin could
route by SNI or Host must never be classified raw. Origins are lenient (nginx, Node, Python's
http.server accept repeated spaces, tabs, lower-case methods, HTTP/0.9 lines, leading blank
lines), so the test here is deliberately wider than any one parser:

- a TLS record start (0x16) is TLS;
- the HTTP/2 connection preface is h2;
- a first line whose first word is a method-like token (upper-case letters, `_`, `-`, the
  methods nginx and friends take without a version) followed by whitespace is HTTP, whatever
  follows (this covers `GET  / HTTP/1.1`, `GET\t/`, HTTP/0.9's `GET /`);
- any other first line of printable text is HTTP if it mentions `HTTP/` anywhere (any
  case): the line is awaited whole before it may go raw (`SSH-2.0-…` idents do);
- a first line or a token that grows past MAX_FIRST_LINE without being decided is "http" too,
  so the strict HTTP parser refuses it (never spliced);
- anything else (binary, `*1\r\n` of Redis, an SSH ident without `HTTP/`) is raw.

"http" does not mean the request is valid: the HTTP relay parses it strictly and answers 400
when it is not, so the classifier only has to err towards "http".
"""

from __future__ import annotations

import re
from typing import Literal

from matchlock.net.http1 import MAX_REQUEST_LINE

Kind = Literal["tls", "h2", "http", "raw", "more"]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_FIRST_LINE = MAX_REQUEST_LINE  # undecided beyond this: the HTTP parser refuses it (414)

# Whitespace as lenient parsers split request lines (Python's str.split() on a latin-1 line
# also splits on the C0 separators, NEL and NBSP). CR and LF end the line instead.
_SEPARATORS = b" \t\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0"
_LEADING = _SEPARATORS + b"\r\n"
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_METHOD_CHARS = frozenset(b"-_ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HTTP_SLASH = re.compile(rb"(?i)http/")


def classify(data: bytes) -> Kind:
    """What `data`, the first bytes of a connection, is; "more" = cannot tell yet."""
    if not data:
        return "more"
    if data[0] == 0x16:
        return "tls"
    if H2_PREFACE.startswith(data[: len(H2_PREFACE)]):
        return "h2" if len(data) >= len(H2_PREFACE) else "more"
    return _first_line(data)


def _first_line(data: bytes) -> Kind:
    start = len(data) - len(data.lstrip(_LEADING))
    if start == len(data):
        return "more" if len(data) < MAX_FIRST_LINE else "http"
    # The first word: token characters up to a separator or the end of the line.
    pos = start
    n = len(data)
    while pos < n and data[pos] in _TCHAR:
        pos += 1
    word = data[start:pos]
    if pos == n:  # the word is still growing
        return "more" if n < MAX_FIRST_LINE else "http"
    nxt = data[pos]
    if not word or not (nxt in _SEPARATORS or nxt in b"\r\n" or 0x21 <= nxt <= 0x7E):
        # Binary right at the start or inside the first word (length prefixes, `\x00…`):
        # no origin reads this as a request line.
        return "raw"
    if nxt in _SEPARATORS and all(c in _METHOD_CHARS for c in word):
        return "http"
    # `get key`, `WORD2.0 …`, `GET/…`, `PING\r\n`: no origin takes these without a version,
    # but a lenient one (Go's, h11) takes `get / HTTP/1.1`: decide once the whole line is
    # here.
    end = data.find(b"\n", pos)
    line = data[start:] if end < 0 else data[start:end]
    if _HTTP_SLASH.search(line):
        return "http"
    if end < 0:
        return "more" if n < MAX_FIRST_LINE else "http"
    return "raw"
