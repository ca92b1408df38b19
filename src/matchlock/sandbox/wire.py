"""The supervisor's socket protocol: frames, encoded and decoded without I/O.

A frame is one type byte, a big-endian u32 payload length, then the payload. `H` (the
client's request), `X` (the exec's end), `R` (an error) and `A` (the answer to a one-shot
request) carry a JSON object; `I` (stdin; empty = end of stdin), `O` (stdout) and `E` (stderr)
carry raw bytes; `S` carries a signal number as a big-endian u32; `W` a terminal size (rows,
cols: big-endian u16 each). A peer that sends anything else, or a frame longer than
`MAX_PAYLOAD`, is cut off.

A `port-forward` request turns the connection into a byte pipe to a TCP port on the guest's
loopback: `D` frames carry bytes (never empty) both ways, `F` (empty) is a half-close of the
sender's direction. The supervisor ends the pipe with `X` `{"code": 0}` (both sides closed
cleanly) or `R` `{"message", "errno", "connected"}` (refused, or reset once connected). A
client that closes its socket without an `F` first resets the guest connection.
"""

from __future__ import annotations

import struct

from matchlock.sandbox import tinyjson

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

HEADER = struct.Struct(">BI")
MAX_PAYLOAD = 1 << 20
MAX_JSON = 1 << 20

REQUEST = ord("H")
STDIN = ord("I")
STDOUT = ord("O")
STDERR = ord("E")
SIGNAL = ord("S")
EXIT = ord("X")
ERROR = ord("R")
RESIZE = ord("W")
ANSWER = ord("A")
DATA = ord("D")
FIN = ord("F")
TYPES = frozenset({REQUEST, STDIN, STDOUT, STDERR, SIGNAL, EXIT, ERROR, RESIZE, ANSWER, DATA,
                   FIN})
JSON_TYPES = frozenset({REQUEST, EXIT, ERROR, ANSWER})


class WireError(Exception):
    """The peer sent something that is not a valid frame."""


# A tuple by hand, not a NamedTuple or dataclass: this module is on the path of every
# `matchlock exec`, and `typing` (or dataclasses, with inspect) costs that process 4-6 ms.
# The client's requests, which only the supervisor reads, are in `sandbox/request.py`.
class Frame(tuple[int, bytes]):
    __slots__ = ()

    def __new__(cls, type: int, payload: bytes) -> Frame:
        return tuple.__new__(cls, (type, payload))

    @property
    def type(self) -> int:
        return self[0]

    @property
    def payload(self) -> bytes:
        return self[1]

    def __repr__(self) -> str:
        return f"Frame(type={self[0]!r}, payload={self[1]!r})"

    def json(self) -> dict[str, Any]:
        return decode_json(self.payload)


def encode(ftype: int, payload: bytes = b"") -> bytes:
    if ftype not in TYPES:
        raise ValueError(f"unknown frame type {ftype}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload too large")
    return HEADER.pack(ftype, len(payload)) + payload


def encode_json(ftype: int, obj: dict[str, Any]) -> bytes:
    return encode(ftype, tinyjson.dumps(obj).encode())


def encode_signal(signo: int) -> bytes:
    return encode(SIGNAL, struct.pack(">I", signo))


def encode_resize(rows: int, cols: int) -> bytes:
    return encode(RESIZE, struct.pack(">HH", rows, cols))


def decode_resize(payload: bytes) -> tuple[int, int]:
    if len(payload) != 4:
        raise WireError("a resize frame carries 4 bytes")
    rows, cols = struct.unpack(">HH", payload)
    if not rows or not cols:
        raise WireError("a terminal size must not be zero")
    return int(rows), int(cols)


def decode_signal(payload: bytes) -> int:
    if len(payload) != 4:
        raise WireError("a signal frame carries 4 bytes")
    (signo,) = struct.unpack(">I", payload)
    return int(signo)


def decode_json(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_JSON:
        raise WireError("JSON payload too large")
    try:
        obj = tinyjson.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise WireError("invalid JSON payload") from None
    if not isinstance(obj, dict):
        raise WireError("the JSON payload is not an object")
    return obj


class Decoder:
    """Feed bytes in any split; get whole frames out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        # Frames are cut out of one view by offset and the consumed prefix dropped once: one
        # copy per payload, however many frames a read brought.
        if self._buf:
            self._buf += data
            buf: bytes | bytearray = self._buf
        else:
            buf = data
        out: list[Frame] = []
        pos, size, hs = 0, len(buf), HEADER.size
        with memoryview(buf) as view:
            while size - pos >= hs:
                ftype, n = HEADER.unpack_from(buf, pos)
                if ftype not in TYPES:
                    raise WireError(f"unknown frame type {ftype}")
                if n > MAX_PAYLOAD:
                    raise WireError(f"frame of {n} bytes is too large")
                if size < pos + hs + n:
                    break
                out.append(Frame(ftype, bytes(view[pos + hs : pos + hs + n])))
                pos += hs + n
        if buf is self._buf:
            del self._buf[:pos]
        elif pos < size:
            self._buf += buf[pos:]  # a partial frame: at most one
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)
