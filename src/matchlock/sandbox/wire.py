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

import json
import struct
from typing import Any, NamedTuple

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
MAX_HOSTS = 1024


class WireError(Exception):
    """The peer sent something that is not a valid frame."""


# NamedTuples, not dataclasses: this module is on the path of every `matchlock exec`, and
# importing dataclasses (with inspect) costs that process ~6 ms.
class Frame(NamedTuple):
    type: int
    payload: bytes

    def json(self) -> dict[str, Any]:
        return decode_json(self.payload)


def encode(ftype: int, payload: bytes = b"") -> bytes:
    if ftype not in TYPES:
        raise ValueError(f"unknown frame type {ftype}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload too large")
    return HEADER.pack(ftype, len(payload)) + payload


def encode_json(ftype: int, obj: dict[str, Any]) -> bytes:
    return encode(ftype, json.dumps(obj, separators=(",", ":")).encode())


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
        obj = json.loads(payload.decode("utf-8"))
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
        self._buf += data
        out: list[Frame] = []
        while len(self._buf) >= HEADER.size:
            ftype, n = HEADER.unpack_from(self._buf)
            if ftype not in TYPES:
                raise WireError(f"unknown frame type {ftype}")
            if n > MAX_PAYLOAD:
                raise WireError(f"frame of {n} bytes is too large")
            if len(self._buf) < HEADER.size + n:
                break
            out.append(Frame(ftype, bytes(self._buf[HEADER.size : HEADER.size + n])))
            del self._buf[: HEADER.size + n]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


def _str_list(v: object, name: str, limit: int = 4096) -> list[str]:
    if not isinstance(v, list) or len(v) > limit or not all(isinstance(s, str) for s in v):
        raise WireError(f"{name} must be a list of strings")
    if any("\0" in s for s in v):
        raise WireError(f"{name} contains a NUL byte")
    return list(v)


def _opt_str(v: object, name: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or "\0" in v or len(v) > 4096:
        raise WireError(f"{name} must be a string")
    return v


class ExecSpec(NamedTuple):
    """An exec request as the supervisor accepts it (every field checked)."""

    argv: list[str]
    env: list[str]
    workdir: str | None
    user: str | None
    stdin: bool
    tty: bool = False
    rows: int = 24
    cols: int = 80


class AllowListRequest(NamedTuple):
    """`allow-list` (read), `allow-list-add` or `allow-list-delete`; hosts are checked by the
    policy's own parser, in the supervisor."""

    action: str  # "list", "add" or "delete"
    hosts: list[str]


class ForwardRequest(NamedTuple):
    """`port-forward`: pipe this connection to 127.0.0.1:`port` in the guest."""

    port: int


ALLOW_LIST_OPS = {"allow-list": "list", "allow-list-add": "add", "allow-list-delete": "delete"}


class PoolRequest(NamedTuple):
    """A warm pool member (`matchlock pool`): `claim` it (resume, then run `argv` in the
    background, as `run -d` would) or `release` it (stop it, unless it was claimed).
    `pool` is the pool's name and instance token: a member of another pool never answers."""

    action: str  # "claim" or "release"
    pool: str
    argv: list[str]


def parse_request(obj: dict[str, Any]
                  ) -> ExecSpec | AllowListRequest | ForwardRequest | PoolRequest | str:
    """The validated request: an ExecSpec, AllowListRequest, ForwardRequest or PoolRequest,
    or the op name "shutdown"/"ping"."""
    op = obj.get("op")
    if op in ("pool-claim", "pool-release"):
        if set(obj) != {"op", "pool", "argv"}:
            raise WireError(f"{op} takes exactly a pool and an argv")
        pool = obj["pool"]
        if not isinstance(pool, str) or not 0 < len(pool) <= 200:
            raise WireError("pool must be a string of 1 to 200 characters")
        return PoolRequest(op.removeprefix("pool-"), pool, _str_list(obj["argv"], "argv"))
    if op in ("shutdown", "ping"):
        if set(obj) != {"op"}:
            raise WireError(f"unexpected fields in {op}")
        return str(op)
    if isinstance(op, str) and op in ALLOW_LIST_OPS:
        action = ALLOW_LIST_OPS[op]
        if set(obj) != ({"op"} if action == "list" else {"op", "hosts"}):
            raise WireError(f"{op} takes exactly " + ("no fields" if action == "list" else
                                                      "a hosts list"))
        hosts = [] if action == "list" else _str_list(obj["hosts"], "hosts", MAX_HOSTS)
        if action != "list" and not hosts:
            raise WireError("hosts must not be empty")
        return AllowListRequest(action, hosts)
    if op == "port-forward":
        port = obj.get("port")
        if set(obj) != {"op", "port"} or isinstance(port, bool) or not isinstance(port, int) \
                or not 1 <= port <= 65535:
            raise WireError("port-forward takes a port from 1 to 65535")
        return ForwardRequest(port)
    if op != "exec":
        raise WireError(f"unknown op {op!r}")
    allowed = {"op", "argv", "env", "workdir", "user", "stdin", "tty", "rows", "cols"}
    extra = set(obj) - allowed
    if extra:
        raise WireError(f"unexpected fields: {', '.join(sorted(extra))}")
    argv = _str_list(obj.get("argv"), "argv")
    if not argv or not argv[0]:
        raise WireError("argv must not be empty")
    env = _str_list(obj.get("env", []), "env")
    for e in env:
        name, sep, _ = e.partition("=")
        if not sep or not name or any(c.isspace() for c in name):
            raise WireError(f"invalid environment entry {e!r}")
    workdir = _opt_str(obj.get("workdir"), "workdir")
    if workdir is not None and not workdir.startswith("/"):
        raise WireError("workdir must be absolute")
    user = _opt_str(obj.get("user"), "user")
    stdin = obj.get("stdin", False)
    tty = obj.get("tty", False)
    if not isinstance(stdin, bool) or not isinstance(tty, bool):
        raise WireError("stdin and tty must be booleans")
    rows, cols = obj.get("rows", 24), obj.get("cols", 80)
    for v in (rows, cols):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 0xFFFF:
            raise WireError("rows and cols must be integers from 1 to 65535")
    return ExecSpec(argv, env, workdir, user, stdin, tty, rows, cols)
