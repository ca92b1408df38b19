"""Host side of the host/guest agent protocol, without I/O (see docs/guest-protocol.md).

Everything the guest sends is hostile: lengths are bounded before anything is buffered, every
field is checked, and any violation raises ProtocolError, which ends the sandbox.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">B3xII")
HEADER_SIZE = HEADER.size
MAX_GUEST_PAYLOAD = 65536
MAX_HOST_PAYLOAD = 1 << 20
MAX_DATA = 65536
STDIN_WINDOW = 262144
SOCK_WINDOW = 262144  # unacknowledged bytes per CONNECT channel, each direction
# Credit per EXEC channel for STDOUT + STDERR, and per FILE_READ channel for FILE_DATA: each
# frame costs its payload plus
# OUTPUT_FRAME_COST, so a guest cannot make the host hold more than the window in events
# however small its frames are.
OUTPUT_WINDOW = 1 << 20
OUTPUT_FRAME_COST = 64
# Credit taken by a consumer is returned once this much has gathered. A guest that waits at
# the window has used all of it, so its consumer gathers a batch before the buffer runs dry:
# it always gets credit back, and the port carries one OUTPUT_ACK per batch, not per frame.
OUTPUT_ACK_BATCH = OUTPUT_WINDOW // 4


def output_cost(n: int) -> int:
    """Credit an output frame of n payload bytes uses."""
    return n + OUTPUT_FRAME_COST

MAX_LOG_LINE = 4096
_TLV = struct.Struct(">HI")


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot be trusted any more."""


class T(IntEnum):
    """Frame types."""

    # host -> guest
    SETUP = 0x01
    EXEC = 0x02
    STDIN = 0x03
    SIGNAL = 0x04
    RESIZE = 0x05
    FILE_WRITE = 0x06
    FILE_READ = 0x07
    FILE_LIST = 0x08
    FILE_DATA_IN = 0x09
    SHUTDOWN = 0x0A
    PING = 0x0B
    KILL = 0x0C
    CONNECT = 0x0D
    SOCK_ACK = 0x0E
    OUTPUT_ACK = 0x0F
    PREPARE = 0x10
    RESUME = 0x11
    CA = 0x12
    # guest -> host
    HELLO = 0x81
    STDOUT = 0x82
    STDERR = 0x83
    EXIT = 0x84
    STDIN_ACK = 0x85
    FILE_DATA = 0x86
    DIRENT = 0x87
    RESULT = 0x88
    PONG = 0x89
    LOG = 0x8A
    STARTED = 0x8B
    SOCK_EOF = 0x8C


GUEST_TYPES = frozenset(t for t in T if t >= 0x80)
_CONTROL_ONLY = frozenset({T.HELLO, T.PONG, T.LOG})


class SetupTag(IntEnum):
    HOSTNAME = 1
    ROOT_DEV = 2
    UPPER_DEV = 3
    CLOCK_NS = 4
    ENTROPY = 5
    HOSTS_LINE = 6
    RESOLV = 7
    CPU_QUOTA = 8
    NET = 9
    MOUNT = 10
    DISK = 11
    CA = 12
    WARM_ARG = 13  # PREPARE only


class ExecTag(IntEnum):
    ARG = 1
    ENV = 2
    CWD = 3
    USER = 4
    FLAGS = 5
    ROWS = 6
    COLS = 7


class FileTag(IntEnum):
    PATH = 1
    MODE = 2
    NAME = 3
    SIZE = 4
    MTIME = 5


EXEC_TTY = 1
EXEC_PRIVILEGED = 2
EXEC_STDIN = 4


class _Record:
    """What `@dataclass(frozen=True)` gives these message classes (keyword or positional init,
    equality and hash by value within a class, repr, no assignment, copy), as plain classes with
    __slots__: every `matchlock run` imports this module, and a frozen dataclass costs ~0.4 ms
    to create (docs/performance.md, "CLI overhead"). Subclasses name their fields in
    `_fields`, in order (also their __slots__), and set them with `_set` in __init__."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()
    __match_args__: tuple[str, ...]

    def __init_subclass__(cls) -> None:
        type.__setattr__(cls, "__match_args__", cls._fields)  # positional match patterns

    def _set(self, *values: object) -> None:
        for name, value in zip(self._fields, values, strict=True):
            object.__setattr__(self, name, value)

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Record) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{self.__class__.__qualname__}({fields})"

    def __getstate__(self) -> tuple[object, ...]:  # copy and pickle, despite __setattr__
        return self._values()

    def __setstate__(self, state: tuple[object, ...]) -> None:
        self._set(*state)

    def __setattr__(self, name: str, value: object) -> None:
        from dataclasses import FrozenInstanceError

        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        from dataclasses import FrozenInstanceError

        raise FrozenInstanceError(f"cannot delete field {name!r}")


class Frame(_Record):
    _fields = ("type", "channel", "payload")
    __slots__ = _fields
    type: T
    channel: int
    payload: bytes

    def __init__(self, type: T, channel: int, payload: bytes) -> None:
        self._set(type, channel, payload)


def encode_frame(ftype: T, channel: int, payload: bytes = b"") -> bytes:
    if not 0 <= channel <= 0xFFFFFFFF:
        raise ValueError(f"channel out of range: {channel}")
    if len(payload) > MAX_HOST_PAYLOAD:
        raise ValueError(f"payload too large: {len(payload)}")
    return HEADER.pack(int(ftype), channel, len(payload)) + payload


class FrameDecoder:
    """Incremental decoder for guest frames; never buffers more than one bounded frame."""

    def __init__(self, max_payload: int = MAX_GUEST_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max = max_payload

    def feed(self, data: bytes) -> list[Frame]:
        # Frames are cut out of one view by offset and the consumed prefix is dropped once:
        # one copy per payload, however many frames a read brought.
        if self._buf:
            self._buf += data
            buf: bytes | bytearray = self._buf
        else:
            buf = data
        frames: list[Frame] = []
        pos, size = 0, len(buf)
        with memoryview(buf) as view:
            while size - pos >= HEADER_SIZE:
                raw_type, channel, length = HEADER.unpack_from(buf, pos)
                if buf[pos + 1] or buf[pos + 2] or buf[pos + 3]:
                    raise ProtocolError("reserved header bytes are not zero")
                if raw_type not in GUEST_TYPES:
                    raise ProtocolError(f"unknown frame type 0x{raw_type:02x}")
                if length > self._max:
                    raise ProtocolError(f"frame payload of {length} bytes exceeds {self._max}")
                ftype = T(raw_type)
                if ftype in _CONTROL_ONLY and channel != 0:
                    raise ProtocolError(f"{ftype.name} on channel {channel}")
                if ftype not in _CONTROL_ONLY and ftype != T.RESULT and channel == 0:
                    raise ProtocolError(f"{ftype.name} on the control channel")
                end = pos + HEADER_SIZE + length
                if size < end:
                    break
                frames.append(Frame(ftype, channel, bytes(view[pos + HEADER_SIZE:end])))
                pos = end
        if buf is self._buf:
            del self._buf[:pos]
        elif pos < size:
            self._buf += buf[pos:]  # a partial frame: at most one
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)


# --- TLV -------------------------------------------------------------------------------------


def encode_tlv(fields: Iterable[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for tag, value in fields:
        out += _TLV.pack(tag, len(value)) + value
    return bytes(out)


def decode_tlv(payload: bytes) -> list[tuple[int, bytes]]:
    fields: list[tuple[int, bytes]] = []
    off = 0
    while off < len(payload):
        if len(payload) - off < _TLV.size:
            raise ProtocolError("truncated TLV header")
        tag, length = _TLV.unpack_from(payload, off)
        off += _TLV.size
        if length > len(payload) - off:
            raise ProtocolError("TLV value runs past the payload")
        fields.append((tag, payload[off : off + length]))
        off += length
    return fields


def _text(value: str, what: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise ValueError(f"{what} contains a NUL byte")
    return raw


def _guest_text(raw: bytes, what: str) -> str:
    if b"\0" in raw:
        raise ProtocolError(f"{what} contains a NUL byte")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"{what} is not UTF-8") from e


# --- host -> guest messages ------------------------------------------------------------------


class NetConfig(_Record):
    _fields = ("address", "prefix", "gateway", "mtu")
    __slots__ = _fields
    address: str
    prefix: int
    gateway: str
    mtu: int

    def __init__(self, address: str, prefix: int, gateway: str, mtu: int = 1500) -> None:
        self._set(address, prefix, gateway, mtu)

    def encode(self) -> bytes:
        import ipaddress

        addr = ipaddress.IPv4Address(self.address).packed
        gw = ipaddress.IPv4Address(self.gateway).packed
        if not 1 <= self.prefix <= 30 or not 576 <= self.mtu <= 65535:
            raise ValueError("prefix or MTU out of range")
        return addr + bytes([self.prefix]) + gw + struct.pack(">I", self.mtu)


@dataclass(frozen=True)
class SetupRequest:
    hostname: str
    root_dev: str | None  # None: PREPARE mounted the root (and the upper) already
    upper_dev: str | None
    clock_ns: int
    entropy: bytes
    hosts_lines: tuple[str, ...] = ()
    resolv: str | None = None
    cpu_quota_us: int = 0
    net: NetConfig | None = None
    mounts: tuple[bytes, ...] = ()  # sandbox.mounts.setup_field
    disks: tuple[bytes, ...] = ()  # sandbox.disks.setup_field
    ca: bytes | None = None  # the sandbox CA (PEM), for the agent to install

    def encode(self) -> bytes:
        fields: list[tuple[int, bytes]] = [
            (SetupTag.HOSTNAME, _text(self.hostname, "hostname")),
            (SetupTag.CLOCK_NS, struct.pack(">Q", self.clock_ns)),
            (SetupTag.ENTROPY, self.entropy),
        ]
        if self.root_dev:
            fields.append((SetupTag.ROOT_DEV, _text(self.root_dev, "root device")))
        if self.upper_dev:
            fields.append((SetupTag.UPPER_DEV, _text(self.upper_dev, "upper device")))
        fields += [(SetupTag.HOSTS_LINE, _text(line, "hosts line")) for line in self.hosts_lines]
        if self.resolv is not None:
            fields.append((SetupTag.RESOLV, _text(self.resolv, "resolv.conf")))
        if self.cpu_quota_us:
            fields.append((SetupTag.CPU_QUOTA, struct.pack(">I", self.cpu_quota_us)))
        if self.net is not None:
            fields.append((SetupTag.NET, self.net.encode()))
        fields += [(SetupTag.MOUNT, m) for m in self.mounts]
        fields += [(SetupTag.DISK, d) for d in self.disks]
        if self.ca is not None:
            fields.append(_ca_field(self.ca))
        return encode_tlv(fields)


def _ca_field(pem: bytes) -> tuple[int, bytes]:
    if not 0 < len(pem) <= 65536 or b"\0" in pem:
        raise ValueError("the CA must be 1 to 65536 bytes of PEM")
    return SetupTag.CA, pem


def encode_ca(pem: bytes) -> bytes:
    """CA (frame 0x12): the sandbox CA, after a SETUP that went without it."""
    return encode_tlv([_ca_field(pem)])


def encode_resume(clock_ns: int, entropy: bytes) -> bytes:
    """RESUME after a pause: the wall clock to set again and fresh entropy (32…256 bytes)."""
    if not 32 <= len(entropy) <= 256:
        raise ValueError("entropy must be 32 to 256 bytes")
    return encode_tlv([(SetupTag.CLOCK_NS, struct.pack(">Q", clock_ns)),
                       (SetupTag.ENTROPY, entropy)])


class PrepareRequest(_Record):
    """The sandbox-independent part of SETUP, done once in an image template: the root, the
    files SETUP fills in, and with `net` (a NIC) eth0, the same in every sandbox. Every SETUP
    after a PREPARE with `net` must carry the same NET and a RESOLV, and SETUP or the CA frame
    the CA (PREPARE sends empty RESOLV and CA fields: their values are each clone's own)."""

    _fields = ("root_dev", "upper_dev", "net", "clock_ns", "warm")
    __slots__ = _fields
    root_dev: str
    upper_dev: str | None
    net: NetConfig | None
    clock_ns: int | None  # the wall clock, for the times of what PREPARE creates
    warm: tuple[str, ...]  # a command the template runs once (see PREPARE), or ()

    def __init__(self, root_dev: str, upper_dev: str | None, net: NetConfig | None = None,
                 clock_ns: int | None = None, warm: Sequence[str] = ()) -> None:
        self._set(root_dev, upper_dev, net, clock_ns, tuple(warm))

    def encode(self) -> bytes:
        fields = [(SetupTag.ROOT_DEV, _text(self.root_dev, "root device"))]
        if self.clock_ns is not None:
            fields.append((SetupTag.CLOCK_NS, struct.pack(">Q", self.clock_ns)))
        if self.upper_dev:
            fields.append((SetupTag.UPPER_DEV, _text(self.upper_dev, "upper device")))
        if self.net is not None:
            fields += [(SetupTag.NET, self.net.encode()), (SetupTag.RESOLV, b""),
                       (SetupTag.CA, b"")]
        if len(self.warm) > 16 or any(not a or len(a.encode()) > 1024 for a in self.warm):
            raise ValueError("warm-up command: at most 16 arguments of 1 to 1024 bytes")
        fields += [(SetupTag.WARM_ARG, _text(a, "warm-up argument")) for a in self.warm]
        return encode_tlv(fields)


@dataclass(frozen=True)
class ExecRequest:
    argv: Sequence[str]
    env: Sequence[str] = ()
    cwd: str | None = None
    user: str | None = None
    tty: bool = False
    privileged: bool = False
    stdin: bool = False
    rows: int = 24
    cols: int = 80

    def encode(self) -> bytes:
        if not self.argv:
            raise ValueError("argv is empty")
        fields: list[tuple[int, bytes]] = [(ExecTag.ARG, _text(a, "argument")) for a in self.argv]
        for kv in self.env:
            if "=" not in kv or kv.startswith("="):
                raise ValueError(f"environment entry {kv!r} is not KEY=VALUE")
            fields.append((ExecTag.ENV, _text(kv, "environment entry")))
        if self.cwd:
            fields.append((ExecTag.CWD, _text(self.cwd, "working directory")))
        if self.user:
            fields.append((ExecTag.USER, _text(self.user, "user")))
        flags = (
            (EXEC_TTY if self.tty else 0)
            | (EXEC_PRIVILEGED if self.privileged else 0)
            | (EXEC_STDIN if self.stdin else 0)
        )
        fields.append((ExecTag.FLAGS, struct.pack(">I", flags)))
        if self.tty:
            fields.append((ExecTag.ROWS, struct.pack(">H", _u16(self.rows))))
            fields.append((ExecTag.COLS, struct.pack(">H", _u16(self.cols))))
        return encode_tlv(fields)


def _u16(n: int) -> int:
    return max(0, min(0xFFFF, n))


def encode_signal(signo: int) -> bytes:
    return struct.pack(">I", signo)


def encode_resize(rows: int, cols: int) -> bytes:
    return struct.pack(">HH", _u16(rows), _u16(cols))


def encode_connect(port: int) -> bytes:
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    return struct.pack(">H", port)


def encode_sock_ack(n: int) -> bytes:
    if not 0 < n <= SOCK_WINDOW:
        raise ValueError(f"acknowledgement out of range: {n}")
    return struct.pack(">I", n)


def encode_output_ack(n: int) -> bytes:
    if not 0 < n <= OUTPUT_WINDOW:
        raise ValueError(f"acknowledgement out of range: {n}")
    return struct.pack(">I", n)


def encode_path(path: str, mode: int | None = None) -> bytes:
    fields: list[tuple[int, bytes]] = [(FileTag.PATH, _text(path, "path"))]
    if mode is not None:
        fields.append((FileTag.MODE, struct.pack(">I", mode & 0o7777)))
    return encode_tlv(fields)


# --- guest -> host messages ------------------------------------------------------------------


class Hello(_Record):
    _fields = ("version", "boot_ns", "agent")
    __slots__ = _fields
    version: int
    boot_ns: int
    agent: str

    def __init__(self, version: int, boot_ns: int, agent: str) -> None:
        self._set(version, boot_ns, agent)


class ExitStatus(_Record):
    _fields = ("code", "signal")
    __slots__ = _fields
    code: int
    signal: int

    def __init__(self, code: int, signal: int) -> None:
        self._set(code, signal)


class Result(_Record):
    _fields = ("errno", "message")
    __slots__ = _fields
    errno: int
    message: str

    def __init__(self, errno: int, message: str) -> None:
        self._set(errno, message)


class DirEntry(_Record):
    _fields = ("name", "mode", "size", "mtime")
    __slots__ = _fields
    name: str
    mode: int
    size: int
    mtime: int

    def __init__(self, name: str, mode: int, size: int, mtime: int) -> None:
        self._set(name, mode, size, mtime)

    @property
    def is_dir(self) -> bool:
        return (self.mode & 0o170000) == 0o040000


def _exact(payload: bytes, n: int, what: str) -> None:
    if len(payload) != n:
        raise ProtocolError(f"{what} payload must be {n} bytes, got {len(payload)}")


def parse_hello(payload: bytes) -> Hello:
    if len(payload) < 12 or len(payload) > 12 + 256:
        raise ProtocolError("malformed HELLO")
    version, boot_ns = struct.unpack_from(">IQ", payload)
    return Hello(version, boot_ns, _guest_text(payload[12:], "agent version"))


def parse_exit(payload: bytes) -> ExitStatus:
    _exact(payload, 8, "EXIT")
    code, sig = struct.unpack(">iI", payload)
    if not 0 <= code <= 255:
        raise ProtocolError(f"exit code {code} out of range")
    if sig > 64 or (sig and code != 128 + sig):
        raise ProtocolError(f"inconsistent exit status {code}/{sig}")
    return ExitStatus(code, sig)


def parse_u32(payload: bytes, what: str) -> int:
    _exact(payload, 4, what)
    return int(struct.unpack(">I", payload)[0])


def parse_result(payload: bytes) -> Result:
    if len(payload) < 4:
        raise ProtocolError("malformed RESULT")
    (err,) = struct.unpack_from(">i", payload)
    if err < 0 or err > 4095:
        raise ProtocolError(f"RESULT errno {err} out of range")
    return Result(err, _guest_text(payload[4:], "result message"))


def parse_dirent(payload: bytes) -> DirEntry:
    got: dict[int, bytes] = {}
    for tag, value in decode_tlv(payload):
        if tag in got:
            raise ProtocolError(f"DIRENT field {tag} repeated")
        got[tag] = value
    try:
        name = _guest_text(got[FileTag.NAME], "file name")
        mode_raw, size_raw, mtime_raw = got[FileTag.MODE], got[FileTag.SIZE], got[FileTag.MTIME]
    except KeyError as e:
        raise ProtocolError(f"DIRENT lacks field {e.args[0]}") from None
    if not name or "/" in name or name in (".", ".."):
        raise ProtocolError(f"bad file name {name!r} in DIRENT")
    if len(mode_raw) != 4 or len(size_raw) != 8 or len(mtime_raw) != 8:
        raise ProtocolError("DIRENT field of the wrong size")
    return DirEntry(
        name,
        struct.unpack(">I", mode_raw)[0],
        struct.unpack(">Q", size_raw)[0],
        struct.unpack(">q", mtime_raw)[0],
    )


def parse_log(payload: bytes) -> str:
    if len(payload) > MAX_LOG_LINE:
        raise ProtocolError("LOG line too long")
    return payload.decode("utf-8", "replace")


# --- per-channel state (which guest frames are valid when) ------------------------------------


class Kind(IntEnum):
    """What a channel was opened for; decides which guest frames it may carry."""

    EXEC = 1
    FILE_READ = 2
    FILE_WRITE = 3
    FILE_LIST = 4
    CONNECT = 5


class Output(_Record):
    _fields = ("stream", "data")
    __slots__ = _fields
    stream: str  # "stdout" or "stderr"
    data: bytes

    def __init__(self, stream: str, data: bytes) -> None:
        self._set(stream, data)


class Started(_Record):
    _fields = ("pid",)
    __slots__ = _fields
    pid: int

    def __init__(self, pid: int) -> None:
        self._set(pid)


class FileData(_Record):
    _fields = ("data",)
    __slots__ = _fields
    data: bytes

    def __init__(self, data: bytes) -> None:
        self._set(data)


class SockEof(_Record):
    """The guest peer of a CONNECT channel closed its sending side."""

    _fields = ()
    __slots__ = _fields


ChannelEvent = Output | Started | ExitStatus | FileData | DirEntry | Result | SockEof

_ALLOWED: dict[Kind, frozenset[T]] = {
    Kind.EXEC: frozenset({T.STDOUT, T.STDERR, T.STDIN_ACK, T.STARTED, T.EXIT}),
    Kind.FILE_READ: frozenset({T.FILE_DATA, T.RESULT}),
    Kind.FILE_WRITE: frozenset({T.RESULT}),
    Kind.FILE_LIST: frozenset({T.DIRENT, T.RESULT}),
    Kind.CONNECT: frozenset({T.STARTED, T.STDOUT, T.SOCK_EOF, T.STDIN_ACK, T.RESULT}),
}
# Channels whose guest data is credited (OUTPUT_WINDOW, returned with OUTPUT_ACK).
_CREDITED = (Kind.EXEC, Kind.FILE_READ)
_TERMINAL = {Kind.EXEC: T.EXIT, Kind.FILE_READ: T.RESULT, Kind.FILE_WRITE: T.RESULT,
             Kind.FILE_LIST: T.RESULT, Kind.CONNECT: T.RESULT}


class _ChannelState:
    __slots__ = ("abandoned", "eof", "kind", "started", "unacked", "undelivered")

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self.abandoned = False  # the host stopped listening; frames are dropped until the end
        self.started = False
        self.unacked = 0  # stdin bytes sent and not yet acknowledged
        self.eof = False  # CONNECT: the guest sent SOCK_EOF
        self.undelivered = 0  # guest output the host has not acknowledged (SOCK_ACK, OUTPUT_ACK)


class ChannelTable:
    """The host's view of every open channel, without I/O or threads.

    `receive` validates a guest frame against its channel's kind and state and turns it into
    an event; the terminal frame (EXIT, RESULT) closes the channel. A channel the host
    abandoned (its consumer failed, gave up or timed out) stays known until its terminal frame
    arrives, and everything it still receives is dropped, so a late answer is never mistaken
    for a protocol violation and never waits for a consumer that is gone. Callers serialise
    access (one lock)."""

    def __init__(self) -> None:
        self._open: dict[int, _ChannelState] = {}
        self._next = 1
        self._acks: dict[int, int] = {}  # EXEC output taken or dropped, not yet acknowledged

    def open(self, kind: Kind) -> int:
        cid = self._next
        self._next = cid + 1 if cid < 0xFFFFFFFF else 1
        if cid in self._open:
            raise ProtocolError("no free channel id")
        self._open[cid] = _ChannelState(kind)
        return cid

    def is_open(self, cid: int) -> bool:
        st = self._open.get(cid)
        return st is not None and not st.abandoned

    def abandon(self, cid: int) -> None:
        """The host no longer wants this channel's events (they are dropped from now on). The
        EXEC output it had buffered and not passed on is acknowledged (see take_acks), and so
        is every later output frame as it arrives: the guest's window keeps moving, so a
        process whose channel nobody listens to any more is never stuck."""
        st = self._open.get(cid)
        if st is not None:
            st.abandoned = True
            if st.kind in _CREDITED:
                self._ack(cid, st, st.undelivered)

    def _ack(self, cid: int, st: _ChannelState, n: int) -> None:
        if n:
            st.undelivered -= n
            self._acks[cid] = self._acks.get(cid, 0) + n

    def output_taken(self, cid: int, n: int) -> bool:
        """The consumer of an EXEC channel took an output frame of n payload bytes: its cost
        is to be acknowledged. True when the acknowledgements gathered should go out now
        (take_acks). Nothing to do once the channel is closed or abandoned."""
        st = self._open.get(cid)
        if st is None or st.abandoned or st.kind not in _CREDITED:
            return False
        cost = output_cost(n)
        if n <= 0 or cost > st.undelivered:
            raise ValueError("acknowledging bytes that were not received")
        self._ack(cid, st, cost)
        return self._acks[cid] >= OUTPUT_ACK_BATCH

    def take_acks(self) -> list[tuple[int, int]]:
        """(channel, bytes) of OUTPUT_ACK frames to send now, one per channel (each ≤ the
        window); channels that closed meanwhile need none."""
        acks = [(cid, n) for cid, n in self._acks.items() if cid in self._open]
        self._acks.clear()
        return acks

    def stdin_room(self, cid: int) -> int:
        """Bytes of stdin the host may send now (the window less what is unacknowledged)."""
        st = self._open.get(cid)
        if st is None or st.abandoned or st.kind not in (Kind.EXEC, Kind.CONNECT):
            return 0
        return max(0, STDIN_WINDOW - st.unacked)

    def stdin_sent(self, cid: int, n: int) -> None:
        st = self._open.get(cid)
        if st is not None:
            if n > STDIN_WINDOW - st.unacked:
                raise ValueError("stdin beyond the window")
            st.unacked += n

    def delivered(self, cid: int, n: int) -> bool:
        """The host passed on n bytes a CONNECT channel received; True when the guest should
        get a SOCK_ACK for them (the channel is still open)."""
        st = self._open.get(cid)
        if st is None or st.kind != Kind.CONNECT:
            return False
        if not 0 < n <= st.undelivered:
            raise ValueError("acknowledging bytes that were not received")
        st.undelivered -= n
        return True

    def receive(self, frame: Frame) -> tuple[bool, ChannelEvent | None]:
        """(closed, event) for a guest frame on channel ≥ 1. `event` is None when there is
        nothing for a consumer (an acknowledgement, or a frame of an abandoned channel);
        `closed` says the frame ended the channel (it is forgotten)."""
        st = self._open.get(frame.channel)
        if st is None:
            raise ProtocolError(f"{frame.type.name} for channel {frame.channel}, not open")
        t = frame.type
        if t not in _ALLOWED[st.kind]:
            raise ProtocolError(f"{t.name} on a {st.kind.name} channel")
        event: ChannelEvent | None
        if st.kind == Kind.CONNECT and t in (T.STDOUT, T.SOCK_EOF) and (st.eof or not st.started):
            raise ProtocolError(f"{t.name} {'after SOCK_EOF' if st.eof else 'before STARTED'}")
        if t in (T.STDOUT, T.STDERR):
            if not frame.payload:
                raise ProtocolError("empty output frame")
            if st.kind == Kind.CONNECT:
                st.undelivered += len(frame.payload)
                if st.undelivered > SOCK_WINDOW:
                    raise ProtocolError("connection data beyond the window")
            else:
                st.undelivered += output_cost(len(frame.payload))
                if st.undelivered > OUTPUT_WINDOW:
                    raise ProtocolError("exec output beyond the window")
                if st.abandoned:
                    self._ack(frame.channel, st, output_cost(len(frame.payload)))
            event = Output("stdout" if t == T.STDOUT else "stderr", frame.payload)
        elif t == T.SOCK_EOF:
            _exact(frame.payload, 0, "SOCK_EOF")
            st.eof = True
            event = SockEof()
        elif t == T.STDIN_ACK:
            n = parse_u32(frame.payload, "STDIN_ACK")
            if n > st.unacked:
                raise ProtocolError("STDIN_ACK for more bytes than were sent")
            st.unacked -= n
            event = None
        elif t == T.STARTED:
            if st.started:
                raise ProtocolError("second STARTED")
            st.started = True
            event = Started(parse_u32(frame.payload, "STARTED"))
            if st.kind == Kind.CONNECT and event.pid != 0:
                raise ProtocolError("STARTED of a CONNECT channel must carry 0")
        elif t == T.EXIT:
            event = parse_exit(frame.payload)
        elif t == T.FILE_DATA:
            if not frame.payload:
                raise ProtocolError("empty FILE_DATA frame")
            st.undelivered += output_cost(len(frame.payload))
            if st.undelivered > OUTPUT_WINDOW:
                raise ProtocolError("file data beyond the window")
            if st.abandoned:
                self._ack(frame.channel, st, output_cost(len(frame.payload)))
            event = FileData(frame.payload)
        elif t == T.DIRENT:
            event = parse_dirent(frame.payload)
        else:
            event = parse_result(frame.payload)
        closed = t == _TERMINAL[st.kind]
        if closed:
            del self._open[frame.channel]
            self._acks.pop(frame.channel, None)
        if st.abandoned:
            event = None
        return closed, event

    def close_all(self) -> list[int]:
        ids = list(self._open)
        self._open.clear()
        self._acks.clear()
        return ids
