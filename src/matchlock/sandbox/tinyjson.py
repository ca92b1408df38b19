"""JSON for the supervisor's control messages without the `json` package.

`json` imports `re` (and `re` imports `enum`, `functools`...), ~6 ms of a fresh `matchlock
exec`, which only sends one small request and reads one small answer. This module reads and
writes the subset those messages use (objects, arrays, strings, integers, true/false/null)
with CPython's own string codec (`_json`), and hands anything else (floats, deep nesting,
anything malformed) to `json`: for every input the result, or the error, is the `json`
package's own.
"""

from __future__ import annotations

from _json import encode_basestring_ascii as _quote
from _json import scanstring as _scanstring

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_WS = " \t\n\r"
_DIGITS = "0123456789"
_MAX_DEPTH = 32


class _Unsupported(Exception):
    """Outside the subset: `json` decides."""


def dumps(obj: Any) -> str:
    """`json.dumps(obj, separators=(",", ":"))`, the same text."""
    try:
        return _dump(obj, 0)
    except _Unsupported:
        import json

        return json.dumps(obj, separators=(",", ":"))


_MAX_FAST = 16384  # longer texts go to json's C scanner, faster on big requests


def loads(text: str) -> Any:
    """`json.loads(text)`: the same value, or the same ValueError."""
    if len(text) > _MAX_FAST:
        import json

        return json.loads(text)
    try:
        return parse(text)
    except (_Unsupported, ValueError, IndexError):
        import json

        return json.loads(text)


def parse(text: str) -> Any:
    """The fast reader alone: raises _Unsupported (or ValueError/IndexError) for anything it
    does not read exactly as `json` does. `loads` is the public entry."""
    value, i = _value(text, _skip(text, 0), 0)
    if _skip(text, i) != len(text):
        raise _Unsupported
    return value


def _dump(obj: Any, depth: int) -> str:
    if depth > _MAX_DEPTH:
        raise _Unsupported
    if isinstance(obj, str):
        return _quote(obj)
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, int):
        return int.__repr__(obj)  # as json does, also for IntEnum members
    if isinstance(obj, list | tuple):
        return "[" + ",".join(_dump(v, depth + 1) for v in obj) + "]"
    if isinstance(obj, dict):
        parts = []
        for k, v in obj.items():
            if not isinstance(k, str):
                raise _Unsupported  # json's key conversions
            parts.append(_quote(k) + ":" + _dump(v, depth + 1))
        return "{" + ",".join(parts) + "}"
    raise _Unsupported  # floats, and whatever json rejects with its own message


def _skip(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in _WS:
        i += 1
    return i


def _value(s: str, i: int, depth: int) -> tuple[Any, int]:
    c = s[i]
    if c == '"':
        return _scanstring(s, i + 1, True)
    if c == "{":
        return _object(s, i + 1, depth + 1)
    if c == "[":
        return _array(s, i + 1, depth + 1)
    if c == "-" or c in _DIGITS:
        j = i + 1 if c == "-" else i
        if j >= len(s) or s[j] not in _DIGITS:
            raise _Unsupported
        k = j + 1
        if s[j] != "0":
            while k < len(s) and s[k] in _DIGITS:
                k += 1
        if k < len(s) and s[k] in ".eE":
            raise _Unsupported  # a float
        return int(s[i:k]), k
    for word, value in (("true", True), ("false", False), ("null", None)):
        if s.startswith(word, i):
            return value, i + len(word)
    raise _Unsupported


def _object(s: str, i: int, depth: int) -> tuple[dict[str, Any], int]:
    if depth > _MAX_DEPTH:
        raise _Unsupported
    out: dict[str, Any] = {}
    i = _skip(s, i)
    if s[i] == "}":
        return out, i + 1
    while True:
        if s[i] != '"':
            raise _Unsupported
        key, i = _scanstring(s, i + 1, True)
        i = _skip(s, i)
        if s[i] != ":":
            raise _Unsupported
        out[key], i = _value(s, _skip(s, i + 1), depth)
        i = _skip(s, i)
        if s[i] == "}":
            return out, i + 1
        if s[i] != ",":
            raise _Unsupported
        i = _skip(s, i + 1)


def _array(s: str, i: int, depth: int) -> tuple[list[Any], int]:
    if depth > _MAX_DEPTH:
        raise _Unsupported
    out: list[Any] = []
    i = _skip(s, i)
    if s[i] == "]":
        return out, i + 1
    while True:
        value, i = _value(s, i, depth)
        out.append(value)
        i = _skip(s, i)
        if s[i] == "]":
            return out, i + 1
        if s[i] != ",":
            raise _Unsupported
        i = _skip(s, i + 1)
