"""A buffered byte stream over asyncio's reader/writer, and the body relays built on it.

Relays forward every read as soon as it arrives (no body is ever buffered whole), and wait
for the destination's write buffer to drain, so memory stays flat whatever the body size.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

from matchlock.net.http1 import ChunkedReader, HttpError, Response, parse_response
from matchlock.net.masking import ValueMask

READ_SIZE = 256 * 1024
READ_HIGH = _HIGH_WATER = 1024 * 1024  # pause reading from a peer with this much unconsumed
_WRITE_HIGH = 1024 * 1024  # drain() waits while the transport holds more than this


class IncompleteBody(Exception):
    """The sender closed before the end of a framed body."""


class Refused(Exception):
    """A splice's gate refused the first bytes."""


# Sees the bytes of one direction before they are forwarded: None = forward, "more" = hold
# until more bytes come, anything else = refuse for that reason.
Guard = Callable[[bytes], "str | None"]
MAX_GATED = 16 * 1024


class Stream(asyncio.Protocol):
    """One side of a proxied connection, as an asyncio protocol with an await-able reader.

    Leaner than asyncio's StreamReader/StreamWriter, and without their copies: received
    chunks are handed out as the transport delivered them (no bytearray in between), which is
    what keeps a large download's CPU per byte down. `buf` holds bytes read but not used yet
    (a partial head, the start of the next pipelined request).

    `deadline` (loop time, 0 = none) lets the proxy's reaper close connections that sit idle
    between requests or dribble a head, without arming a timer per read.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.deadline = 0.0
        self.received = 0  # bytes delivered by the transport so far
        self.read_high = _HIGH_WATER  # pause the transport with this much unread
        self.transport: asyncio.Transport | None = None
        self._chunks: deque[bytes] = deque()
        self._pending = 0
        self._eof = False
        self._lost = False
        self._exc: BaseException | None = None
        self._reader: asyncio.Future[None] | None = None
        self._read_paused = False
        self._write_paused = False
        self._drainer: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        self._tls = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        self._tls = transport.get_extra_info("sslcontext") is not None
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # small writes (SSE events) must not wait
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self._chunks.append(data)
        self._pending += len(data)
        if self._pending > self.read_high and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        # Plain TCP: keep the write side open (half-close); the proxy closes when done.
        # TLS has no half-close (and asyncio warns when asked for one).
        return not self._tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._lost = True
        self._exc = exc
        self._wake_reader()
        for waiter in (self._drainer, self._closed):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drainer is not None and not self._drainer.done():
            self._drainer.set_result(None)

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    # -- reading ---------------------------------------------------------------------------

    async def recv(self) -> bytes:
        """The next chunk from the transport (ignores `buf`); b"" at EOF."""
        while not self._chunks:
            if self._eof:
                return b""
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        data = self._chunks.popleft()
        self._pending -= len(data)
        resume = self._read_paused and self._pending <= self.read_high // 4
        if resume and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    async def fill(self) -> bool:
        """Read more into `buf`; False at EOF."""
        data = await self.recv()
        if not data:
            return False
        self.buf += data
        return True

    async def read_some(self) -> bytes:
        """Buffered bytes first, then whatever the next read brings (b"" at EOF)."""
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            return data
        return await self.recv()

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is not None and not self._lost:
            self.transport.write(data)

    async def drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("connection lost")
        if not self._write_paused:
            return
        self._drainer = asyncio.get_running_loop().create_future()
        try:
            await self._drainer
        finally:
            self._drainer = None
        if self._lost:
            raise ConnectionResetError("connection lost")

    async def drain_below(self, limit: int) -> None:
        """Wait until at most `limit` bytes are queued for the peer (a tighter drain())."""
        if self.transport is None or self.transport.get_write_buffer_size() <= limit:
            return await self.drain()
        self.transport.set_write_buffer_limits(high=limit)  # pauses us now if over it
        try:
            await self.drain()
        finally:
            if not self._lost:
                self.transport.set_write_buffer_limits(high=_WRITE_HIGH)

    @property
    def unread(self) -> int:
        """Bytes received and held here, not consumed yet."""
        return self._pending + len(self.buf)

    @property
    def unsent(self) -> int:
        """Bytes queued in the transport for the peer."""
        return 0 if self.transport is None else self.transport.get_write_buffer_size()

    # -- state and closing -----------------------------------------------------------------

    def closed(self) -> bool:
        return self._lost or self.transport is None or self.transport.is_closing()

    def reusable(self) -> bool:
        """Idle and healthy: nothing unread, not closed by either side."""
        return not self.buf and not self._chunks and not self._eof and not self.closed()

    def can_write_eof(self) -> bool:
        return self.transport is not None and self.transport.can_write_eof()

    def write_eof(self) -> None:
        if self.can_write_eof() and not self.closed():
            assert self.transport is not None
            with contextlib.suppress(OSError, RuntimeError):
                self.transport.write_eof()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def reset(self) -> None:
        """Abort with an RST (SO_LINGER 0), so the peer sees a refused connection at once."""
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

    async def close(self) -> None:
        """Flush what is queued, then close (TLS: with close_notify)."""
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.close()
        if self._lost:
            return
        self._closed = asyncio.get_running_loop().create_future()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self._closed
        if not self._lost:
            self.transport.abort()


class Writer(Protocol):
    """Where a body is copied to: a Stream, or a filter in front of one."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    async def drain(self) -> None: ...


async def copy_length(src: Stream, dst: Writer, length: int) -> int:
    """Forward exactly `length` body bytes; extra bytes stay in `src.buf`."""
    left = length
    if src.buf:
        take = min(left, len(src.buf))
        dst.write(bytes(src.buf[:take]))
        del src.buf[:take]
        left -= take
        await dst.drain()
    while left:
        data = await src.recv()
        if not data:
            raise IncompleteBody(f"closed {left} bytes before the end of the body")
        if len(data) > left:  # the start of the next message: keep it
            src.buf += data[left:]
            data = data[:left]
        dst.write(data)
        left -= len(data)
        await dst.drain()
    return length


async def copy_chunked(src: Stream, dst: Writer) -> int:
    """Forward a chunked body verbatim up to its last byte; returns the bytes forwarded."""
    parser = ChunkedReader()
    total = 0
    data = bytes(src.buf)
    src.buf.clear()
    while True:
        if data:
            used = parser.feed(data)
            if used:
                dst.write(data[:used] if used < len(data) else data)
                total += used
            if parser.done:
                src.buf += data[used:]
                await dst.drain()
                return total
            await dst.drain()
        data = await src.recv()
        if not data:
            raise IncompleteBody("closed before the end of a chunked body")


async def copy_until_close(src: Stream, dst: Writer) -> int:
    total = 0
    data = await src.read_some()
    while data:
        dst.write(data)
        total += len(data)
        await dst.drain()
        data = await src.recv()
    return total


async def pump(src: Stream, dst: Stream) -> int:
    """One direction of a byte splice: copy until EOF, then half-close the destination."""
    total = 0
    try:
        total = await copy_until_close(src, dst)
    except (ConnectionError, OSError):
        dst.abort()
        src.abort()
    else:
        dst.write_eof()
    return total


async def _guarded(src: Stream, dst: Stream, guard: Guard) -> int:
    """Forward `src` to `dst`, showing `guard` every piece first: it may refuse (Refused),
    or answer "more" to see the next piece together with this one (held meanwhile, at most
    MAX_GATED bytes: a guard that cannot decide by then refuses, whatever the timing)."""
    held = b""
    total = 0
    try:
        while True:
            data = await src.read_some()
            if not data:
                if held:
                    raise Refused("the connection ended before its first bytes could be checked")
                dst.write_eof()
                return total
            held += data
            verdict = guard(held)
            if verdict == "more":
                if len(held) >= MAX_GATED:
                    raise Refused(f"first {len(held)} bytes still undecided")
                continue
            if verdict is not None:
                raise Refused(verdict)
            dst.write(held)
            total += len(held)
            held = b""
            await dst.drain()
    except (ConnectionError, OSError):
        dst.abort()
        src.abort()
        return total


async def splice(a: Stream, b: Stream, guard: Guard | None = None) -> tuple[int, int]:
    """Bytes both ways until both directions end: (a→b, b→a).

    Plain TCP keeps half-closes (one side may finish sending and still receive). TLS cannot
    half-close, so there the first direction to end closes both, or the other would hang.
    `guard` inspects what a sends before it is forwarded (see `_guarded`).
    """
    half = a.can_write_eof() and b.can_write_eof()
    ab = asyncio.ensure_future(pump(a, b) if guard is None else _guarded(a, b, guard))
    ba = asyncio.ensure_future(pump(b, a))
    try:
        if not half:
            await asyncio.wait((ab, ba), return_when=asyncio.FIRST_COMPLETED)
            if ab.done() and ab.exception() is not None:
                raise ab.exception()  # type: ignore[misc]
            await asyncio.gather(a.close(), b.close())
        up, down = await asyncio.gather(ab, ba)
    finally:
        ab.cancel()
        ba.cancel()
    return up, down


__all__ = [
    "READ_SIZE",
    "HttpError",
    "IncompleteBody",
    "Refused",
    "Stream",
    "copy_chunked",
    "copy_length",
    "copy_until_close",
    "pump",
    "splice",
]


async def read_response(
    up: Stream, method: bytes, guest: Writer | None, mask: ValueMask | None = None
) -> Response:
    """The final response head. 1xx informational responses (but 101) go on to `guest`
    (HTTP/1), masked like every head, or are dropped when it is None (HTTP/2 clients here do
    not await them)."""
    while True:
        parsed = parse_response(up.buf, method) if up.buf else None
        if parsed is None:
            if not await up.fill():
                raise IncompleteBody("upstream closed before a response")
            continue
        resp, end = parsed
        del up.buf[:end]
        if 100 <= resp.status < 200 and resp.status != 101:
            if guest is not None:
                guest.write(resp.raw if mask is None else mask.all(resp.raw))
            continue
        return resp
