"""Parse `WWW-Authenticate` headers (RFC 7235) into challenges. Pure; never raises.

    WWW-Authenticate: Bearer realm="https://auth.example/token",service="reg",scope="a:b:pull"
    WWW-Authenticate: Basic realm="Registry Realm"

One header may carry several challenges separated by commas, and parameter values may be
quoted strings containing commas, so a plain split on "," is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_WS = " \t"


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic"
    params: dict[str, str] = field(default_factory=dict)  # keys lower case

    def get(self, key: str) -> str | None:
        return self.params.get(key)


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def done(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ws(self) -> None:
        while self.peek() and self.peek() in _WS:
            self.pos += 1

    def skip_separators(self) -> None:
        while self.peek() and self.peek() in _WS + ",":
            self.pos += 1

    def token(self) -> str:
        start = self.pos
        while self.peek() and self.peek() in _TCHAR:
            self.pos += 1
        return self.text[start : self.pos]

    def bare_value(self) -> str:
        """An unquoted value. RFC tokens exclude ':' and '/', but servers send bare URLs."""
        start = self.pos
        while self.peek() and self.peek() not in _WS + ',"':
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self) -> str:
        """A quoted-string starting at the opening quote; an unterminated one runs to the end."""
        self.pos += 1
        out = []
        while not self.done():
            c = self.text[self.pos]
            self.pos += 1
            if c == '"':
                break
            if c == "\\" and not self.done():
                c = self.text[self.pos]
                self.pos += 1
            out.append(c)
        return "".join(out)


def _param(s: _Scanner) -> tuple[str, str] | None:
    """`name = value` at the cursor, or None (cursor unchanged) if the next thing is not one."""
    start = s.pos
    name = s.token()
    s.skip_ws()
    if not name or s.peek() != "=":
        s.pos = start
        return None
    s.pos += 1
    s.skip_ws()
    value = s.quoted() if s.peek() == '"' else s.bare_value()
    return name.lower(), value


def parse_challenges(header: str) -> list[Challenge]:
    """All challenges in one header value, in order. Garbage is skipped, never raised on."""
    s = _Scanner(header)
    out: list[Challenge] = []
    while True:
        s.skip_separators()
        if s.done():
            return out
        scheme = s.token()
        if not scheme:
            s.pos += 1  # not a token character: skip it and resynchronise
            continue
        params: dict[str, str] = {}
        s.skip_ws()
        while (item := _param(s)) is not None:
            params.setdefault(item[0], item[1])
            s.skip_ws()
            if s.peek() != ",":
                break
            s.skip_separators()
        # A token68 credential (`Negotiate abc==`) is not used by registries: skip it.
        if not params and s.peek() and s.peek() != ",":
            while s.peek() and s.peek() not in _WS + ",":
                s.pos += 1
        out.append(Challenge(scheme.lower(), params))
