"""JSON-RPC 2.0 over newline-delimited JSON, as the reference's `matchlock rpc` speaks it.

Pure: no I/O. A line becomes a `Request` or the error line to answer it with; results,
errors and notifications become the bytes to write. The reference's details kept here:

- an `id` is a non-negative integer below 2**64 or absent/null; any other id (a string, a
  float, a boolean) makes the whole line a parse error, answered without an id;
- `jsonrpc` is not checked; `params` may be anything (each method checks its own);
- responses carry `jsonrpc, result|error, id` in that order, `id` omitted when the request
  had none; notifications carry no id, and their `params` keys are sorted;
- a line is at most `MAX_LINE` bytes. The reference stops reading (and the process ends) at a
  longer line; here it is skipped and answered with -32600, with the request's id when the
  line started with it (the Python SDK writes `"id"` before `"params"`), so the client's
  request fails instead of the whole session.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_LINE = 10 << 20
MAX_ID = (1 << 64) - 1

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL = -32603
VM_FAILED = -32000
EXEC_FAILED = -32001
FILE_FAILED = -32002
CANCELLED = -32003

CANCELLED_MESSAGE = "context canceled"


class RpcError(Exception):
    """An error answer: its JSON-RPC code and one-line message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Request:
    method: str
    id: int | None
    params: Any  # decoded JSON; None when absent


def _reject_constant(name: str) -> Any:
    # Python's decoder accepts NaN and Infinity; JSON (and the reference) do not.
    raise ValueError(f"invalid JSON constant {name}")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _valid_id(value: Any) -> bool:
    return (value is None
            or (type(value) is int and 0 <= value <= MAX_ID))


def parse_line(line: bytes) -> Request | bytes:
    """One input line (without its newline) → the request, or the error line to write."""
    try:
        text = line.decode("utf-8")
        msg = _DECODER.decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return encode_error(None, PARSE_ERROR, "Parse error")
    if not isinstance(msg, dict):
        return encode_error(None, PARSE_ERROR, "Parse error")
    rid = msg.get("id")
    method = msg.get("method", "")
    if not _valid_id(rid) or not isinstance(method, str):
        return encode_error(None, PARSE_ERROR, "Parse error")
    return Request(method=method, id=rid, params=msg.get("params"))


def is_blank(line: bytes) -> bool:
    return not line.strip()


def _dumps(obj: Any, sort: bool = False) -> bytes:
    # ASCII-only output: every byte written is valid UTF-8 whatever a guest put in a name.
    return (json.dumps(obj, separators=(",", ":"), sort_keys=sort, allow_nan=False)
            + "\n").encode()


def encode_result(rid: int | None, result: Any) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "result": result}
    if rid is not None:
        msg["id"] = rid
    return _dumps(msg)


def encode_error(rid: int | None, code: int, message: str) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "error": {"code": code, "message": message}}
    if rid is not None:
        msg["id"] = rid
    return _dumps(msg)


def encode_notification(method: str, params: dict[str, Any], sort: bool = True) -> bytes:
    """Stream notifications have sorted params (Go maps); `event` keeps its struct order."""
    body = json.dumps(params, separators=(",", ":"), sort_keys=sort, allow_nan=False)
    return b'{"jsonrpc":"2.0","method":' + json.dumps(method).encode() + b',"params":' + \
        body.encode() + b"}\n"


def too_long_error(prefix: bytes) -> bytes:
    """The answer to a line over MAX_LINE, given its first bytes."""
    rid = leading_id(prefix)
    return encode_error(rid, INVALID_REQUEST, f"request line exceeds {MAX_LINE} bytes")


# --- the id of a line too long to decode ---------------------------------------------------------


_WS = b" \t\r\n"


def _skip_ws(buf: bytes, i: int) -> int:
    while i < len(buf) and buf[i] in _WS:
        i += 1
    return i


def _string_end(buf: bytes, i: int) -> int:
    """Index just past the JSON string starting at buf[i] == '"', or -1 if cut off."""
    i += 1
    while i < len(buf):
        c = buf[i]
        if c == 0x5C:  # backslash: skip the escaped character
            i += 2
            continue
        if c == 0x22:
            return i + 1
        i += 1
    return -1


def _value_end(buf: bytes, i: int) -> int:
    """Index just past the JSON value starting at buf[i], or -1 if cut off or invalid."""
    if i >= len(buf):
        return -1
    c = buf[i]
    if c == 0x22:
        return _string_end(buf, i)
    if c in b"{[":
        depth = 0
        while i < len(buf):
            c = buf[i]
            if c == 0x22:
                i = _string_end(buf, i)
                if i < 0:
                    return -1
                continue
            if c in b"{[":
                depth += 1
            elif c in b"}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return -1
    j = i
    while j < len(buf) and buf[j] not in b",}]" + _WS:
        j += 1
    return j if j < len(buf) else -1


def leading_id(prefix: bytes) -> int | None:
    """The top-level `id` of a JSON object whose text starts with `prefix`, if the id's
    member is complete within it; None otherwise (or when it is not a valid id)."""
    i = _skip_ws(prefix, 0)
    if i >= len(prefix) or prefix[i] != 0x7B:
        return None
    i += 1
    while True:
        i = _skip_ws(prefix, i)
        if i >= len(prefix) or prefix[i] != 0x22:
            return None
        end = _string_end(prefix, i)
        if end < 0:
            return None
        try:
            key = json.loads(prefix[i:end])
        except ValueError:
            return None
        i = _skip_ws(prefix, end)
        if i >= len(prefix) or prefix[i] != 0x3A:
            return None
        i = _skip_ws(prefix, i + 1)
        vend = _value_end(prefix, i)
        if vend < 0:
            return None
        if key == "id":
            try:
                value = json.loads(prefix[i:vend])
            except ValueError:
                return None
            return value if _valid_id(value) and value is not None else None
        i = _skip_ws(prefix, vend)
        if i >= len(prefix) or prefix[i] != 0x2C:
            return None
        i += 1


# --- framing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TooLong:
    """A line over MAX_LINE (skipped); `prefix` holds its first bytes."""

    prefix: bytes


PREFIX_KEEP = 4096


class LineSplitter:
    """Bytes in, complete lines out, holding at most MAX_LINE bytes of one line."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._skipping: bytes | None = None  # prefix of the oversized line being skipped

    def feed(self, data: bytes) -> list[bytes | TooLong]:
        out: list[bytes | TooLong] = []
        start = 0
        while start < len(data):
            nl = data.find(b"\n", start)
            chunk = data[start:] if nl < 0 else data[start:nl]
            if self._skipping is not None:
                if len(self._skipping) < PREFIX_KEEP:
                    self._skipping += chunk[: PREFIX_KEEP - len(self._skipping)]
                if nl >= 0:
                    out.append(TooLong(self._skipping))
                    self._skipping = None
            elif len(self._buf) + len(chunk) > self.max_line:
                self._skipping = bytes((self._buf + chunk)[:PREFIX_KEEP])
                self._buf.clear()
                if nl >= 0:
                    out.append(TooLong(self._skipping))
                    self._skipping = None
            else:
                self._buf += chunk
                if nl >= 0:
                    out.append(bytes(self._buf))
                    self._buf.clear()
            if nl < 0:
                break
            start = nl + 1
        return out

    def finish(self) -> list[bytes | TooLong]:
        """At end of input: a last line without its newline still counts."""
        if self._skipping is not None:
            prefix, self._skipping = self._skipping, None
            return [TooLong(prefix)]
        if self._buf:
            line = bytes(self._buf)
            self._buf.clear()
            return [line]
        return []
