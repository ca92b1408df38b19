"""The host's connection to the guest agent: one reader thread, many channels.

The reader thread is the only one that reads the socket. It validates each frame against the
state of its channel (a guest cannot answer for a channel the host never opened, acknowledge
stdin it was never sent, or keep talking after EXIT) and hands events to bounded queues, so a
consumer that stops reading slows the guest down instead of growing host memory.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from matchlock.guest import protocol as p
from matchlock.guest.protocol import T

_QUEUE_DEPTH = 64  # frames of at most 64 KiB each: bounded at 4 MiB per channel


class AgentGone(Exception):
    """The connection to the agent ended or broke the protocol."""


@dataclass(frozen=True)
class Output:
    stream: Literal["stdout", "stderr"]
    data: bytes


ExecEvent = Output | p.ExitStatus


class _Channel:
    def __init__(self, kind: Literal["exec", "file"]) -> None:
        self.kind = kind
        self.events: queue.Queue[object] = queue.Queue(_QUEUE_DEPTH)
        self.unacked = 0
        self.credit = threading.Condition()
        self.closed = False


class AgentConnection:
    def __init__(self, sock: socket.socket, on_log: Callable[[str], None] | None = None) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._channels: dict[int, _Channel] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._control: queue.Queue[object] = queue.Queue(16)
        self._on_log = on_log
        self.error: str | None = None
        self.hello: p.Hello | None = None
        self._reader = threading.Thread(target=self._read_loop, name="agent-reader", daemon=True)
        self._reader.start()

    # --- reading ---------------------------------------------------------------------------

    def _read_loop(self) -> None:
        decoder = p.FrameDecoder()
        try:
            while True:
                data = self._sock.recv(262144)
                if not data:
                    raise AgentGone("the guest agent closed the connection")
                for frame in decoder.feed(data):
                    self._dispatch(frame)
        except p.ProtocolError as e:
            self._fail(f"guest protocol violation: {e}")
        except AgentGone as e:
            self._fail(str(e))
        except OSError as e:
            self._fail(f"connection to the guest agent failed: {e}")

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        with self._lock:
            channels = list(self._channels.values())
        for ch in channels:
            ch.closed = True
            with ch.credit:
                ch.credit.notify_all()
            _force_put(ch.events, AgentGone(reason))
        _force_put(self._control, AgentGone(reason))

    def _dispatch(self, frame: p.Frame) -> None:
        if frame.channel == 0:
            self._dispatch_control(frame)
            return
        with self._lock:
            ch = self._channels.get(frame.channel)
        if ch is None or ch.closed:
            raise p.ProtocolError(f"{frame.type.name} for channel {frame.channel}, not open")
        t = frame.type
        if ch.kind == "exec":
            if t in (T.STDOUT, T.STDERR):
                if not frame.payload:
                    raise p.ProtocolError("empty output frame")
                ch.events.put(Output("stdout" if t == T.STDOUT else "stderr", frame.payload))
            elif t == T.STDIN_ACK:
                n = p.parse_u32(frame.payload, "STDIN_ACK")
                with ch.credit:
                    if n > ch.unacked:
                        raise p.ProtocolError("STDIN_ACK for more bytes than were sent")
                    ch.unacked -= n
                    ch.credit.notify_all()
            elif t == T.STARTED:
                p.parse_u32(frame.payload, "STARTED")
            elif t == T.EXIT:
                status = p.parse_exit(frame.payload)
                self._close_channel(frame.channel, ch)
                ch.events.put(status)
            else:
                raise p.ProtocolError(f"{t.name} on an exec channel")
        else:
            if t == T.FILE_DATA:
                ch.events.put(frame.payload)
            elif t == T.DIRENT:
                ch.events.put(p.parse_dirent(frame.payload))
            elif t == T.RESULT:
                result = p.parse_result(frame.payload)
                self._close_channel(frame.channel, ch)
                ch.events.put(result)
            else:
                raise p.ProtocolError(f"{t.name} on a file channel")

    def _dispatch_control(self, frame: p.Frame) -> None:
        if frame.type == T.HELLO:
            if self.hello is not None:
                raise p.ProtocolError("second HELLO")
            hello = p.parse_hello(frame.payload)
            if hello.version != p.PROTOCOL_VERSION:
                raise p.ProtocolError(f"agent speaks protocol {hello.version}")
            self.hello = hello
            self._control.put(hello)
        elif frame.type == T.RESULT:
            self._control.put(p.parse_result(frame.payload))
        elif frame.type == T.PONG:
            self._control.put(frame.payload)
        elif frame.type == T.LOG:
            line = p.parse_log(frame.payload)
            if self._on_log:
                self._on_log(line)
        else:
            raise p.ProtocolError(f"{frame.type.name} on the control channel")

    def _close_channel(self, cid: int, ch: _Channel) -> None:
        ch.closed = True
        with ch.credit:
            ch.credit.notify_all()
        with self._lock:
            self._channels.pop(cid, None)

    # --- sending ---------------------------------------------------------------------------

    def send(self, ftype: T, channel: int, payload: bytes = b"") -> None:
        if self.error is not None:
            raise AgentGone(self.error)
        data = p.encode_frame(ftype, channel, payload)
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except OSError as e:
                raise AgentGone(f"cannot send to the guest agent: {e}") from e

    def _control_reply(self, timeout: float) -> object:
        try:
            item = self._control.get(timeout=timeout)
        except queue.Empty:
            raise AgentGone(f"the guest agent did not answer within {timeout:.0f}s") from None
        if isinstance(item, AgentGone):
            raise item
        return item

    def wait_hello(self, timeout: float) -> p.Hello:
        item = self._control_reply(timeout)
        if not isinstance(item, p.Hello):
            raise AgentGone("the guest agent did not start with HELLO")
        return item

    def setup(self, req: p.SetupRequest, timeout: float = 30.0) -> p.Result:
        self.send(T.SETUP, 0, req.encode())
        item = self._control_reply(timeout)
        if not isinstance(item, p.Result):
            raise AgentGone("unexpected answer to SETUP")
        return item

    def ping(self, payload: bytes = b"ping", timeout: float = 10.0) -> float:
        start = time.perf_counter()
        self.send(T.PING, 0, payload)
        item = self._control_reply(timeout)
        if item != payload:
            raise AgentGone("PONG does not match PING")
        return time.perf_counter() - start

    def shutdown(self) -> None:
        with contextlib.suppress(AgentGone):
            self.send(T.SHUTDOWN, 0)

    def _open(self, kind: Literal["exec", "file"]) -> tuple[int, _Channel]:
        ch = _Channel(kind)
        with self._lock:
            cid = next(self._ids)
            self._channels[cid] = ch
        return cid, ch

    # --- operations ------------------------------------------------------------------------

    def exec(self, req: p.ExecRequest) -> Exec:
        cid, ch = self._open("exec")
        self.send(T.EXEC, cid, req.encode())
        return Exec(self, cid, ch)

    def _file_events(self, ch: _Channel, timeout: float) -> Iterator[object]:
        while True:
            try:
                item = ch.events.get(timeout=timeout)
            except queue.Empty:
                raise AgentGone("the guest agent stopped answering a file request") from None
            if isinstance(item, AgentGone):
                raise item
            yield item
            if isinstance(item, p.Result):
                return

    def read_file(self, path: str, limit: int, timeout: float = 60.0) -> bytes:
        cid, ch = self._open("file")
        self.send(T.FILE_READ, cid, p.encode_path(path))
        out = bytearray()
        for item in self._file_events(ch, timeout):
            if isinstance(item, bytes):
                out += item
                if len(out) > limit:
                    raise FileOpError(27, f"{path}: larger than {limit} bytes")
            elif isinstance(item, p.Result) and item.errno:
                raise FileOpError(item.errno, item.message)
        return bytes(out)

    def write_file(self, path: str, data: bytes, mode: int = 0o644, timeout: float = 60.0) -> None:
        cid, ch = self._open("file")
        self.send(T.FILE_WRITE, cid, p.encode_path(path, mode))
        for off in range(0, len(data), p.MAX_DATA):
            self.send(T.FILE_DATA_IN, cid, data[off : off + p.MAX_DATA])
        self.send(T.FILE_DATA_IN, cid, b"")
        for item in self._file_events(ch, timeout):
            if isinstance(item, p.Result) and item.errno:
                raise FileOpError(item.errno, item.message)

    def list_files(self, path: str, timeout: float = 60.0) -> list[p.DirEntry]:
        cid, ch = self._open("file")
        self.send(T.FILE_LIST, cid, p.encode_path(path))
        entries: list[p.DirEntry] = []
        for item in self._file_events(ch, timeout):
            if isinstance(item, p.DirEntry):
                entries.append(item)
            elif isinstance(item, p.Result) and item.errno:
                raise FileOpError(item.errno, item.message)
        return entries

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class FileOpError(Exception):
    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


class Exec:
    """One running process in the guest."""

    def __init__(self, conn: AgentConnection, cid: int, ch: _Channel) -> None:
        self._conn = conn
        self.channel = cid
        self._ch = ch
        self.status: p.ExitStatus | None = None

    def events(self) -> Iterator[ExecEvent]:
        """Output in the order the guest produced it, then the exit status."""
        while self.status is None:
            item = self._ch.events.get()
            if isinstance(item, AgentGone):
                raise item
            if isinstance(item, p.ExitStatus):
                self.status = item
            assert isinstance(item, (Output, p.ExitStatus))
            yield item

    def write_stdin(self, data: bytes) -> None:
        """Send stdin, waiting for the guest's acknowledgements to stay inside the window."""
        view = memoryview(data)
        while view:
            with self._ch.credit:
                while self._ch.unacked >= p.STDIN_WINDOW and not self._ch.closed:
                    self._ch.credit.wait()
                if self._ch.closed:
                    return
                n = min(len(view), p.MAX_DATA, p.STDIN_WINDOW - self._ch.unacked)
                self._ch.unacked += n
            self._conn.send(T.STDIN, self.channel, bytes(view[:n]))
            view = view[n:]

    def close_stdin(self) -> None:
        if not self._ch.closed:
            self._conn.send(T.STDIN, self.channel, b"")

    def signal(self, signo: int) -> None:
        if not self._ch.closed:
            self._conn.send(T.SIGNAL, self.channel, p.encode_signal(signo))

    def kill(self) -> None:
        if not self._ch.closed:
            self._conn.send(T.KILL, self.channel)

    def resize(self, rows: int, cols: int) -> None:
        if not self._ch.closed:
            self._conn.send(T.RESIZE, self.channel, p.encode_resize(rows, cols))


def _force_put(q: queue.Queue[object], item: object) -> None:
    """Deliver a terminal item even to a full queue: the consumer must learn the end."""
    while True:
        try:
            q.put_nowait(item)
            return
        except queue.Full:
            with contextlib.suppress(queue.Empty):
                q.get_nowait()
