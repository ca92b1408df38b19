"""The binary data channel between this project's SDK and its `matchlock rpc` child: two
pipes the SDK creates and the child inherits (named by `MATCHLOCK_RPC_DATA_FDS=R,W` in the
child's environment), carrying file
content raw, so streamed transfers skip base64 and JSON (docs/rpc.md, "Data channel").

Each direction is a sequence of frames: request id (u64, big-endian), length (u32), then that
many bytes of content of that request's transfer; length 0 ends the transfer. A frame carries
at most MAX_FRAME bytes. SDK → rpc: the content of `write_file_stream` requests made with
`"via": "fd"`; rpc → SDK: the content of `read_file_stream` requests made with it. Pure
codec plus blocking helpers; no threads here."""

from __future__ import annotations

import os
import stat
import struct

ENV = "MATCHLOCK_RPC_DATA_FDS"
HEADER = struct.Struct(">QI")
MAX_FRAME = 1 << 20


class DataChannelError(Exception):
    """The peer broke the framing, or a descriptor is unusable."""


def header(req_id: int, length: int) -> bytes:
    if not 0 <= length <= MAX_FRAME:
        raise ValueError(f"data frame of {length} bytes (at most {MAX_FRAME})")
    return HEADER.pack(req_id, length)


def parse_header(raw: bytes) -> tuple[int, int]:
    req_id, length = HEADER.unpack(raw)
    if length > MAX_FRAME:
        raise DataChannelError(f"data frame of {length} bytes (at most {MAX_FRAME})")
    return req_id, length


def parse_fds(text: str) -> tuple[int, int]:
    """`R,W` of MATCHLOCK_RPC_DATA_FDS: two distinct inherited pipe descriptors above stdio."""
    try:
        r, w = (int(x) for x in text.split(","))
    except ValueError:
        raise DataChannelError(f"{ENV} wants R,W (two descriptors), not {text!r}") from None
    if r == w or min(r, w) <= 2:
        raise DataChannelError(f"{ENV}: two distinct descriptors above 2")
    for fd in (r, w):
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            raise DataChannelError(f"{ENV}: descriptor {fd} is not open") from None
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise DataChannelError(f"{ENV}: descriptor {fd} is not a pipe")
    return r, w


def read_exact(fd: int, n: int) -> bytes | None:
    """n bytes from fd; None at EOF before the first byte; DataChannelError at EOF inside."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            if got:
                raise DataChannelError("the data channel ended inside a frame")
            return None
        parts.append(chunk)
        got += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_frame(fd: int) -> tuple[int, bytes] | None:
    """The next (request id, content) frame; None at a clean EOF."""
    raw = read_exact(fd, HEADER.size)
    if raw is None:
        return None
    req_id, length = parse_header(raw)
    if not length:
        return req_id, b""
    data = read_exact(fd, length)
    if data is None:
        raise DataChannelError("the data channel ended inside a frame")
    return req_id, data


def write_frame(fd: int, req_id: int, data: bytes | memoryview) -> None:
    """One frame (the caller serialises writers); `data` of at most MAX_FRAME bytes."""
    bufs: list[bytes | memoryview] = [header(req_id, len(data)), data]
    while bufs:
        n = os.writev(fd, bufs)
        while bufs and n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs.pop(0)
        if bufs and n:
            bufs[0] = memoryview(bufs[0])[n:]
