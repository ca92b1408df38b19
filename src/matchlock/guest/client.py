"""The host's connection to the guest agent: one reader thread, many channels.

The reader thread is the only one that reads the socket. Which frames a channel may carry and
when is decided by the pure codec (`protocol.ChannelTable`); this module only moves bytes and
wakes consumers. The rules that keep one channel from stalling the others:

- an exec's output and a file read's data are credited: the guest sends at most
  `OUTPUT_WINDOW` (payload bytes plus a fixed cost per frame, the measure of the channel's
  buffer here) the host has not acknowledged, and the host acknowledges (OUTPUT_ACK, from its
  own thread) only what the consumer took, or dropped for an abandoned channel; so a slow
  consumer slows its process (or its read), its buffer stays under the window, and the
  reader never waits for it;
- other channels buffer at most `CHANNEL_BUFFER` bytes of events for their consumer; the
  reader waits for room only while that consumer is still listening, and never longer than
  the channel's `stall` bound (None: as long as the consumer lives);
- a consumer that fails, gives up or times out *abandons* its channel: what it had buffered is
  dropped, and frames that still arrive for it are discarded by the codec until its last one;
- every wait is bounded or woken: file operations have deadlines, sends time out after
  `SEND_TIMEOUT`, and `abort()` (used by timeouts and signals) fails every waiter at once.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator

from matchlock.guest import protocol as p
from matchlock.guest.protocol import Kind, Output, T

__all__ = ["AgentConnection", "AgentGone", "ChannelStalled", "Exec", "ExecEvent", "FileOpError",
           "Output", "Stream"]

CHANNEL_BUFFER = 4 << 20  # bytes of undelivered events per channel
SEND_TIMEOUT = 30.0  # a guest that takes no byte for this long is gone
FILE_STALL = 10.0  # a file consumer that takes nothing for this long loses its channel


class AgentGone(Exception):
    """The connection to the agent ended or broke the protocol."""


class ChannelStalled(AgentGone):
    """This channel (only) was given up: its consumer or its guest side stopped moving."""


ExecEvent = Output | p.ExitStatus


class _Channel:
    def __init__(self, cid: int, kind: Kind, lock: threading.Lock, stall: float | None) -> None:
        self.id = cid
        self.kind = kind
        self.pid: int | None = None  # an exec's, from STARTED
        self.cond = threading.Condition(lock)  # the connection's lock
        self.events: collections.deque[p.ChannelEvent] = collections.deque()
        self.size = 0
        self.stall = stall
        self.done = False  # the terminal event is buffered (or was taken)
        self.abandoned = False
        self.error: AgentGone | None = None


def _size(ev: p.ChannelEvent) -> int:
    data = getattr(ev, "data", None)
    return p.output_cost(len(data) if isinstance(data, bytes) else 0)


class AgentConnection:
    def __init__(self, sock: socket.socket, on_log: Callable[[str], None] | None = None) -> None:
        self._sock = sock
        self._sock.settimeout(SEND_TIMEOUT)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._table = p.ChannelTable()
        self._channels: dict[int, _Channel] = {}
        self._control: queue.Queue[object] = queue.Queue(16)
        self._on_log = on_log
        self.error: str | None = None
        self.hello: p.Hello | None = None
        self._acks_due = threading.Condition(self._lock)
        self._reader = threading.Thread(target=self._read_loop, name="agent-reader", daemon=True)
        self._reader.start()
        self._acker = threading.Thread(target=self._ack_loop, name="agent-acker", daemon=True)
        self._acker.start()

    def _ack_loop(self) -> None:
        """Sends OUTPUT_ACK frames. Its own thread: the reader must never wait on a send (the
        guest may be waiting for the reader), and consumers should not pay for one per event;
        acknowledgements that pile up while a send is under way go out as one frame."""
        while True:
            with self._lock:
                while not (acks := self._table.take_acks()) and self.error is None:
                    self._acks_due.wait()
                if self.error is not None:
                    return
            try:
                for cid, n in acks:
                    self.send(T.OUTPUT_ACK, cid, p.encode_output_ack(n))
            except AgentGone:
                return

    # --- reading ---------------------------------------------------------------------------

    def _read_loop(self) -> None:
        decoder = p.FrameDecoder()
        try:
            while self.error is None:
                try:
                    data = self._sock.recv(262144)
                except TimeoutError:
                    continue  # the timeout bounds sends; an idle guest is fine
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
        with self._lock:
            if self.error is None:
                self.error = reason
            gone = AgentGone(self.error)
            for ch in self._channels.values():
                if ch.error is None:
                    ch.error = gone
                ch.cond.notify_all()
            self._channels.clear()
            self._table.close_all()
            self._acks_due.notify_all()
        _force_put(self._control, gone)

    def abort(self, reason: str) -> None:
        """Fail every operation now (a timeout, a signal): waiters wake with AgentGone."""
        self._fail(reason)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _dispatch(self, frame: p.Frame) -> None:
        if frame.channel == 0:
            self._dispatch_control(frame)
            return
        with self._lock:
            closed, event = self._table.receive(frame)
            ch = self._channels.get(frame.channel)
            if closed:
                self._channels.pop(frame.channel, None)
            if ch is None:
                self._acks_due.notify()  # output of an abandoned exec: acknowledged at once
                return
            if event is None:
                ch.cond.notify_all()  # stdin credit
                return
            if isinstance(event, p.Started) and ch.kind == Kind.EXEC:
                ch.pid = event.pid  # nobody waits for it: no wake-up for the consumer
                return
            if not closed and ch.size >= CHANNEL_BUFFER:
                self._wait_room(ch)
            if not ch.abandoned:
                ch.events.append(event)
                ch.size += _size(event)
                ch.done = ch.done or closed
            ch.cond.notify_all()

    def _wait_room(self, ch: _Channel) -> None:
        """Wait (lock held) until the consumer made room, left, or the stall bound passed;
        in the last case the channel is given up, not the connection."""
        deadline = None if ch.stall is None else time.monotonic() + ch.stall
        while ch.size >= CHANNEL_BUFFER and not ch.abandoned and ch.error is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                ch.error = ChannelStalled(f"channel {ch.id}: its reader stopped taking data")
                self._abandon_locked(ch)
                return
            ch.cond.wait(left if left is not None else 1.0)

    def _abandon_locked(self, ch: _Channel) -> None:
        ch.abandoned = True
        ch.events.clear()
        ch.size = 0
        self._table.abandon(ch.id)
        self._channels.pop(ch.id, None)
        ch.cond.notify_all()
        self._acks_due.notify()

    def _dispatch_control(self, frame: p.Frame) -> None:
        item: object
        if frame.type == T.HELLO:
            if self.hello is not None:
                raise p.ProtocolError("second HELLO")
            hello = p.parse_hello(frame.payload)
            if hello.version != p.PROTOCOL_VERSION:
                raise p.ProtocolError(f"agent speaks protocol {hello.version}")
            self.hello = item = hello
        elif frame.type == T.RESULT:
            item = p.parse_result(frame.payload)
        elif frame.type == T.PONG:
            item = frame.payload
        elif frame.type == T.LOG:
            line = p.parse_log(frame.payload)
            if self._on_log:
                self._on_log(line)
            return
        else:
            raise p.ProtocolError(f"{frame.type.name} on the control channel")
        try:
            self._control.put_nowait(item)
        except queue.Full:
            raise p.ProtocolError("control answers nobody asked for") from None

    # --- channels --------------------------------------------------------------------------

    def _open(self, kind: Kind, stall: float | None) -> _Channel:
        with self._lock:
            if self.error is not None:
                raise AgentGone(self.error)
            cid = self._table.open(kind)
            ch = _Channel(cid, kind, self._lock, stall)
            self._channels[cid] = ch
            return ch

    def _next(self, ch: _Channel, timeout: float | None) -> p.ChannelEvent:
        """The channel's next event; AgentGone when the connection or the channel failed,
        ChannelStalled when nothing came within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not ch.events:
                if ch.error is not None:
                    raise ch.error
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise ChannelStalled(f"the guest agent stopped answering "
                                         f"(channel {ch.id}, {timeout:.0f}s)")
                ch.cond.wait(left)
            ev = ch.events.popleft()
            ch.size -= _size(ev)
            ch.cond.notify_all()
            if (isinstance(ev, Output | p.FileData) and not ch.abandoned
                    and self._table.output_taken(ch.id, len(ev.data))):
                self._acks_due.notify()
            return ev

    def abandon(self, ch: _Channel) -> None:
        """Stop listening to a channel: buffered events are dropped, later ones discarded."""
        with self._lock:
            if not ch.done and not ch.abandoned:
                self._abandon_locked(ch)

    # --- sending ---------------------------------------------------------------------------

    def send(self, ftype: T, channel: int, payload: bytes = b"") -> None:
        if self.error is not None:
            raise AgentGone(self.error)
        data = p.encode_frame(ftype, channel, payload)
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except TimeoutError:
                reason = f"the guest agent took no data for {SEND_TIMEOUT:.0f}s"
                self.abort(reason)
                raise AgentGone(reason) from None
            except OSError as e:
                raise AgentGone(self.error or f"cannot send to the guest agent: {e}") from e

    def _control_reply(self, timeout: float) -> object:
        try:
            item = self._control.get(timeout=timeout)
        except queue.Empty:
            raise AgentGone(f"the guest agent did not answer within {timeout:.0f}s") from None
        if isinstance(item, AgentGone):
            _force_put(self._control, item)  # every later waiter learns it too
            raise item
        return item

    def wait_hello(self, timeout: float) -> p.Hello:
        item = self._control_reply(timeout)
        if not isinstance(item, p.Hello):
            raise AgentGone("the guest agent did not start with HELLO")
        return item

    def setup(self, req: p.SetupRequest, timeout: float = 30.0,
              late_ca: Callable[[], bytes] | None = None) -> p.Result:
        """SETUP; with `late_ca`, its PEM (it may wait for the proxy) follows as a CA frame
        right behind SETUP, without waiting for SETUP's RESULT: the guest does SETUP meanwhile.
        The first failure of the two is returned."""
        self.send(T.SETUP, 0, req.encode())
        if late_ca is not None:
            self.send(T.CA, 0, p.encode_ca(late_ca()))
        item = self._control_reply(timeout)
        if not isinstance(item, p.Result):
            raise AgentGone("unexpected answer to SETUP")
        if late_ca is not None:
            ca = self._control_reply(timeout)
            if not isinstance(ca, p.Result):
                raise AgentGone("unexpected answer to CA")
            if not item.errno:
                item = ca
        return item

    def prepare(self, req: p.PrepareRequest, timeout: float = 30.0) -> p.Result:
        self.send(T.PREPARE, 0, req.encode())
        item = self._control_reply(timeout)
        if not isinstance(item, p.Result):
            raise AgentGone("unexpected answer to PREPARE")
        return item

    def resume(self, clock_ns: int, entropy: bytes, timeout: float = 10.0) -> p.Result:
        """After the VM was paused: set the guest's wall clock again, mix in entropy."""
        self.send(T.RESUME, 0, p.encode_resume(clock_ns, entropy))
        item = self._control_reply(timeout)
        if not isinstance(item, p.Result):
            raise AgentGone("unexpected answer to RESUME")
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

    # --- operations ------------------------------------------------------------------------

    def exec(self, req: p.ExecRequest, stall: float | None = None) -> Exec:
        """Start a process. `stall`: how long its output may wait for this consumer before
        the exec's channel is given up (None: as long as the consumer is alive)."""
        ch = self._open(Kind.EXEC, stall)
        try:
            self.send(T.EXEC, ch.id, req.encode())
        except BaseException:
            self.abandon(ch)
            raise
        return Exec(self, ch)

    def connect(self, port: int) -> Stream:
        """Open a TCP connection to 127.0.0.1:`port` in the guest (a published port)."""
        payload = p.encode_connect(port)
        ch = self._open(Kind.CONNECT, None)  # guest data is windowed: the buffer never fills
        try:
            self.send(T.CONNECT, ch.id, payload)
        except BaseException:
            self.abandon(ch)
            raise
        return Stream(self, ch)

    @contextlib.contextmanager
    def _file_op(self, kind: Kind) -> Iterator[_Channel]:
        ch = self._open(kind, FILE_STALL)
        try:
            yield ch
        finally:
            self.abandon(ch)  # a no-op once its RESULT was taken

    def _file_events(self, ch: _Channel, timeout: float) -> Iterator[p.ChannelEvent]:
        while True:
            ev = self._next(ch, timeout)
            yield ev
            if isinstance(ev, p.Result):
                return

    def _file_data(self, ch: _Channel, path: str, limit: int | None,
                   timeout: float) -> Iterator[bytes]:
        """A FILE_READ's data as it arrives, until its RESULT; FileOpError for the guest's
        error or past `limit` bytes."""
        total = 0
        for ev in self._file_events(ch, timeout):
            if isinstance(ev, p.FileData):
                total += len(ev.data)
                if limit is not None and total > limit:
                    raise FileOpError(27, f"{path}: larger than {limit} bytes")  # EFBIG
                yield ev.data
            elif isinstance(ev, p.Result) and ev.errno:
                raise FileOpError(ev.errno, ev.message)

    def read_file(self, path: str, limit: int, timeout: float = 60.0) -> bytes:
        with self._file_op(Kind.FILE_READ) as ch:
            self.send(T.FILE_READ, ch.id, p.encode_path(path))
            return b"".join(self._file_data(ch, path, limit, timeout))

    def write_file(self, path: str, data: bytes, mode: int = 0o644, timeout: float = 60.0) -> None:
        self.write_file_chunks(path, (data,), mode, timeout)

    def read_file_chunks(self, path: str, limit: int | None = None,
                         timeout: float = FILE_STALL) -> Generator[bytes, None, None]:
        """The file's content as the guest sends it, a frame at a time, without a whole-file
        buffer. `timeout`: the longest the guest may send nothing. Closing the iterator early
        (or an error, or more than `limit` bytes) ends the guest's operation (KILL)."""
        with self._file_op(Kind.FILE_READ) as ch:
            self.send(T.FILE_READ, ch.id, p.encode_path(path))
            try:
                yield from self._file_data(ch, path, limit, timeout)
            finally:
                self._kill_file_op(ch)  # a no-op once the guest's RESULT came

    def write_file_chunks(self, path: str, chunks: Iterable[bytes], mode: int = 0o644,
                          timeout: float = FILE_STALL) -> int:
        """Stream `chunks` into a new file at `path` (renamed over it only once all arrived);
        returns the size. If `chunks` raises, the guest drops what it wrote (KILL) and the
        exception propagates: a partial file is never committed."""
        with self._file_op(Kind.FILE_WRITE) as ch:
            self.send(T.FILE_WRITE, ch.id, p.encode_path(path, mode))
            total, sent_end = 0, False
            try:
                for chunk in chunks:
                    if ch.done or ch.error is not None:
                        break  # the guest answered early (a failure): its RESULT tells
                    view = memoryview(chunk)
                    for off in range(0, len(view), p.MAX_DATA):
                        self.send(T.FILE_DATA_IN, ch.id, bytes(view[off : off + p.MAX_DATA]))
                    total += len(view)
                self.send(T.FILE_DATA_IN, ch.id, b"")
                sent_end = True
                for ev in self._file_events(ch, timeout):
                    if isinstance(ev, p.Result) and ev.errno:
                        raise FileOpError(ev.errno, ev.message)
            finally:
                if not sent_end:
                    self._kill_file_op(ch)
            return total

    def _kill_file_op(self, ch: _Channel) -> None:
        """End a file operation the host gave up on, so the guest closes its side too."""
        if not (ch.done or ch.abandoned or ch.error):
            with contextlib.suppress(AgentGone):
                self.send(T.KILL, ch.id)

    def list_files(self, path: str, timeout: float = 60.0) -> list[p.DirEntry]:
        with self._file_op(Kind.FILE_LIST) as ch:
            self.send(T.FILE_LIST, ch.id, p.encode_path(path))
            entries: list[p.DirEntry] = []
            for ev in self._file_events(ch, timeout):
                if isinstance(ev, p.DirEntry):
                    entries.append(ev)
                elif isinstance(ev, p.Result) and ev.errno:
                    raise FileOpError(ev.errno, ev.message)
            return entries

    def close(self) -> None:
        self.abort(self.error or "the connection was closed")
        self._sock.close()


class FileOpError(Exception):
    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


class Exec:
    """One running process in the guest."""

    def __init__(self, conn: AgentConnection, ch: _Channel) -> None:
        self._conn = conn
        self._ch = ch
        self.channel = ch.id
        self.status: p.ExitStatus | None = None

    @property
    def pid(self) -> int | None:
        """The process's pid in the guest, once it started."""
        return self._ch.pid

    def events(self, timeout: float | None = None) -> Iterator[ExecEvent]:
        """Output in the order the guest produced it, then the exit status. Raises
        AgentGone when the connection fails or is aborted, ChannelStalled when nothing
        arrived for `timeout` seconds (the exec is abandoned then, not the connection)."""
        try:
            while self.status is None:
                ev = self._conn._next(self._ch, timeout)
                if isinstance(ev, p.ExitStatus):
                    self.status = ev
                assert isinstance(ev, (Output, p.ExitStatus))
                yield ev
        finally:
            if self.status is None:
                # The consumer is gone (an error, a timeout, a broken pipe): nobody will read
                # this process's output, so it must not run on in the guest either.
                with contextlib.suppress(AgentGone):
                    self.kill()
                self.abandon()

    def abandon(self) -> None:
        """Stop listening (kill the process first if it should not run on)."""
        self._conn.abandon(self._ch)

    @property
    def _open(self) -> bool:
        return not (self._ch.done or self._ch.abandoned or self._ch.error)

    def write_stdin(self, data: bytes) -> None:
        """Send stdin, waiting for the guest's acknowledgements to stay inside the window."""
        _write_window(self._conn, self._ch, data)

    def close_stdin(self) -> None:
        if self._open:
            self._conn.send(T.STDIN, self.channel, b"")

    def signal(self, signo: int) -> None:
        if self._open:
            self._conn.send(T.SIGNAL, self.channel, p.encode_signal(signo))

    def kill(self) -> None:
        if self._open:
            self._conn.send(T.KILL, self.channel)

    def resize(self, rows: int, cols: int) -> None:
        if self._open:
            self._conn.send(T.RESIZE, self.channel, p.encode_resize(rows, cols))


def _write_window(conn: AgentConnection, ch: _Channel, data: bytes) -> None:
    """Send STDIN frames, waiting for acknowledgements to stay inside the window; returns
    quietly if the channel ends meanwhile (what was not sent is dropped)."""
    view = memoryview(data)
    while view:
        with ch.cond:
            while True:
                if ch.error is not None:
                    raise ch.error
                if ch.done or ch.abandoned or ch.id not in conn._channels:
                    return
                room = conn._table.stdin_room(ch.id)
                if room:
                    break
                ch.cond.wait(1.0)
            n = min(len(view), p.MAX_DATA, room)
            conn._table.stdin_sent(ch.id, n)
        conn.send(T.STDIN, ch.id, bytes(view[:n]))
        view = view[n:]


class Stream:
    """One TCP connection to a port on the guest's loopback (a CONNECT channel).

    `read` gives the guest's bytes (each chunk must be `ack`ed once passed on: the guest sends
    at most `SOCK_WINDOW` unacknowledged bytes), b"" once the guest peer closed its side, and
    None when the channel ended: `result` then says how (errno 0: both sides closed)."""

    def __init__(self, conn: AgentConnection, ch: _Channel) -> None:
        self._conn = conn
        self._ch = ch
        self.channel = ch.id
        self.connected = False
        self.result: p.Result | None = None

    def read(self, timeout: float | None = None) -> bytes | None:
        while self.result is None:
            ev = self._conn._next(self._ch, timeout)
            if isinstance(ev, p.Started):
                self.connected = True
            elif isinstance(ev, Output):
                return ev.data
            elif isinstance(ev, p.SockEof):
                return b""
            elif isinstance(ev, p.Result):
                self.result = ev
        return None

    def ack(self, n: int) -> None:
        conn = self._conn
        with conn._lock:
            ok = not self._ch.abandoned and conn._table.delivered(self.channel, n)
        if ok:
            with contextlib.suppress(AgentGone):
                conn.send(T.SOCK_ACK, self.channel, p.encode_sock_ack(n))

    @property
    def _open(self) -> bool:
        return not (self._ch.done or self._ch.abandoned or self._ch.error)

    def write(self, data: bytes) -> None:
        _write_window(self._conn, self._ch, data)

    def close_write(self) -> None:
        if self._open:
            self._conn.send(T.STDIN, self.channel, b"")

    def kill(self) -> None:
        """Abort the connection (the guest peer sees a reset); the channel's RESULT follows."""
        if self._open:
            self._conn.send(T.KILL, self.channel)

    def abandon(self) -> None:
        self._conn.abandon(self._ch)


def _force_put(q: queue.Queue[object], item: object) -> None:
    """Deliver a terminal item even to a full queue: the consumer must learn the end."""
    while True:
        try:
            q.put_nowait(item)
            return
        except queue.Full:
            with contextlib.suppress(queue.Empty):
                q.get_nowait()
