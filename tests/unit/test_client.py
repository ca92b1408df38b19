"""The agent client against a scripted hostile guest on a socketpair."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from matchlock.guest import protocol as p
from matchlock.guest.client import AgentConnection, AgentGone, Output
from matchlock.guest.protocol import T


def gframe(t: int, ch: int, payload: bytes = b"") -> bytes:
    return bytes([t, 0, 0, 0]) + struct.pack(">II", ch, len(payload)) + payload


def hello() -> bytes:
    return gframe(T.HELLO, 0, struct.pack(">IQ", 1, 5) + b"test")


def read_frame(sock: socket.socket) -> p.Frame:
    head = b""
    while len(head) < 12:
        head += sock.recv(12 - len(head))
    t, ch, n = struct.unpack(">B3xII", head)
    body = b""
    while len(body) < n:
        body += sock.recv(n - len(body))
    return p.Frame(T(t), ch, body)


def send_file_data(guest: socket.socket, ch: int, frames: int, size: int = 65536
                   ) -> list[p.Frame]:
    """FILE_DATA frames as the agent sends them: within the channel's credit, waiting for the
    host's OUTPUT_ACKs when it runs out. Returns the other frames read meanwhile."""
    used, others = 0, []
    for _ in range(frames):
        while used + p.output_cost(size) > p.OUTPUT_WINDOW:
            f = read_frame(guest)
            if f.type == T.OUTPUT_ACK and f.channel == ch:
                used -= struct.unpack(">I", f.payload)[0]
            else:
                others.append(f)
        guest.sendall(gframe(T.FILE_DATA, ch, b"x" * size))
        used += p.output_cost(size)
    return others


def next_request(guest: socket.socket) -> p.Frame:
    """The next host frame that is not an OUTPUT_ACK (credit returned for file data)."""
    while (f := read_frame(guest)).type == T.OUTPUT_ACK:
        pass
    return f


@pytest.fixture
def pair() -> tuple[AgentConnection, socket.socket]:
    host, guest = socket.socketpair()
    return AgentConnection(host), guest


def test_exec_round_trip(pair: tuple[AgentConnection, socket.socket]) -> None:
    conn, guest = pair
    guest.sendall(hello())
    assert conn.wait_hello(5).agent == "test"
    ex = conn.exec(p.ExecRequest(argv=["x"]))
    f = read_frame(guest)
    assert f.type == T.EXEC and f.channel == ex.channel
    guest.sendall(
        gframe(T.STARTED, ex.channel, struct.pack(">I", 9))
        + gframe(T.STDOUT, ex.channel, b"a")
        + gframe(T.STDERR, ex.channel, b"b")
        + gframe(T.EXIT, ex.channel, struct.pack(">iI", 3, 0))
    )
    events = list(ex.events())
    assert events == [Output("stdout", b"a"), Output("stderr", b"b"), p.ExitStatus(3, 0)]
    assert ex.pid == 9


def test_started_needs_no_consumer(pair: tuple[AgentConnection, socket.socket]) -> None:
    # STARTED only records the pid (its consumer is not woken for it); a second one is still
    # a protocol error.
    conn, guest = pair
    guest.sendall(hello())
    conn.wait_hello(5)
    ex = conn.exec(p.ExecRequest(argv=["x"]))
    guest.sendall(gframe(T.STARTED, ex.channel, struct.pack(">I", 7)))
    deadline = time.monotonic() + 5
    while ex.pid is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert ex.pid == 7
    guest.sendall(gframe(T.STARTED, ex.channel, struct.pack(">I", 8)))
    with pytest.raises(AgentGone, match="second STARTED"):
        list(ex.events())


@pytest.mark.parametrize(
    "evil",
    [
        gframe(T.STDOUT, 99, b"x"),  # channel never opened
        gframe(T.STDIN_ACK, 1, struct.pack(">I", 10)),  # ack for unsent stdin
        gframe(T.DIRENT, 1, b""),  # file frame on an exec channel
        gframe(T.EXIT, 1, struct.pack(">iI", 999, 0)),  # impossible exit code
        gframe(T.STDOUT, 1, b""),  # empty output frame
        hello(),  # second HELLO
    ],
)
def test_hostile_frames_end_the_connection(
    pair: tuple[AgentConnection, socket.socket], evil: bytes
) -> None:
    conn, guest = pair
    guest.sendall(hello())
    conn.wait_hello(5)
    ex = conn.exec(p.ExecRequest(argv=["x"]))
    guest.sendall(evil)
    with pytest.raises(AgentGone):
        list(ex.events())
    assert conn.error is not None


def test_nothing_accepted_after_exit(pair: tuple[AgentConnection, socket.socket]) -> None:
    conn, guest = pair
    guest.sendall(hello())
    conn.wait_hello(5)
    ex = conn.exec(p.ExecRequest(argv=["x"]))
    guest.sendall(gframe(T.EXIT, ex.channel, struct.pack(">iI", 0, 0)))
    assert list(ex.events()) == [p.ExitStatus(0, 0)]
    guest.sendall(gframe(T.STDOUT, ex.channel, b"late"))
    # The late frame ends the connection: whichever comes first, the failure reaches a new
    # exec either when it is sent or while it waits for events.
    with pytest.raises(AgentGone):
        ex2 = conn.exec(p.ExecRequest(argv=["y"]))
        list(ex2.events())
    assert conn.error is not None and "not open" in conn.error


def test_stdin_respects_the_window(pair: tuple[AgentConnection, socket.socket]) -> None:
    conn, guest = pair
    guest.sendall(hello())
    conn.wait_hello(5)
    ex = conn.exec(p.ExecRequest(argv=["cat"], stdin=True))
    read_frame(guest)
    total = p.STDIN_WINDOW * 3
    writer = threading.Thread(target=ex.write_stdin, args=(b"z" * total,))
    writer.start()
    received = 0
    outstanding = 0
    while received < total:
        f = read_frame(guest)
        assert f.type == T.STDIN
        received += len(f.payload)
        outstanding += len(f.payload)
        assert outstanding <= p.STDIN_WINDOW
        if outstanding == p.STDIN_WINDOW or received == total:
            guest.sendall(gframe(T.STDIN_ACK, ex.channel, struct.pack(">I", outstanding)))
            outstanding = 0
    writer.join(5)
    assert not writer.is_alive()


def test_peer_hangup_is_reported(pair: tuple[AgentConnection, socket.socket]) -> None:
    conn, guest = pair
    guest.close()
    with pytest.raises(AgentGone):
        conn.wait_hello(5)


def test_an_abandoned_read_never_stalls_the_connection(
    pair: tuple[AgentConnection, socket.socket],
) -> None:
    # A read over its limit gives up while the guest keeps sending far more than a channel
    # buffers; the late frames are dropped and the next operation is answered at once.
    from matchlock.guest.client import FileOpError

    conn, guest = pair
    guest.sendall(hello())
    conn.wait_hello(5)

    def guest_side() -> None:
        f = read_frame(guest)
        assert f.type == T.FILE_READ
        # 20 MiB, inside the window: the host acknowledges what it drops at once.
        others = send_file_data(guest, f.channel, 320)
        guest.sendall(gframe(T.RESULT, f.channel, struct.pack(">i", 0)))
        f2 = others[0] if others else next_request(guest)
        assert f2.type == T.FILE_LIST
        guest.sendall(gframe(T.RESULT, f2.channel, struct.pack(">i", 2) + b"nope"))

    t = threading.Thread(target=guest_side, daemon=True)
    t.start()
    with pytest.raises(FileOpError):
        conn.read_file("/big", 1 << 20, timeout=5)
    with pytest.raises(FileOpError, match="nope"):
        conn.list_files("/x", timeout=5)
    t.join(10)
    assert not t.is_alive() and conn.error is None


def _ack_of(guest: socket.socket) -> tuple[int, int]:
    f = read_frame(guest)
    assert f.type == T.OUTPUT_ACK, f
    return f.channel, struct.unpack(">I", f.payload)[0]


def test_a_consumer_that_stops_reading_holds_only_its_window(
    pair: tuple[AgentConnection, socket.socket],
) -> None:
    conn, guest = pair
    guest.sendall(hello())
    conn.wait_hello(5)
    slow = conn.exec(p.ExecRequest(argv=["yes"]))
    fast = conn.exec(p.ExecRequest(argv=["true"]))
    read_frame(guest), read_frame(guest)  # the two EXECs
    # As much as the window allows (full frames and a smaller one), unread.
    full = p.OUTPUT_WINDOW // p.output_cost(65536)
    sizes = [65536] * full + [p.OUTPUT_WINDOW - full * p.output_cost(65536)
                              - p.OUTPUT_FRAME_COST]
    assert sum(p.output_cost(n) for n in sizes) == p.OUTPUT_WINDOW
    guest.sendall(b"".join(gframe(T.STDOUT, slow.channel, b"y" * n) for n in sizes))
    guest.sendall(gframe(T.STDOUT, fast.channel, b"f") + gframe(T.EXIT, fast.channel,
                                                                 struct.pack(">iI", 0, 0)))
    assert list(fast.events(timeout=5)) == [Output("stdout", b"f"), p.ExitStatus(0, 0)]
    # Nothing is acknowledged until a consumer takes something (fast's "f" was taken after
    # its EXIT: an ended channel needs no acknowledgement).
    guest.settimeout(0.3)
    with pytest.raises(TimeoutError):
        read_frame(guest)
    guest.settimeout(5)
    # Taken output is acknowledged in batches.
    events = slow.events(timeout=5)
    batch = -(-p.OUTPUT_ACK_BATCH // p.output_cost(65536))
    for _ in range(batch):
        assert next(events) == Output("stdout", b"y" * 65536)
    assert _ack_of(guest) == (slow.channel, batch * p.output_cost(65536))
    sizes = sizes[batch:]
    # Abandoning it acknowledges what it had buffered, and what still comes, at once.
    slow.abandon()
    acked = 0
    while acked < sum(p.output_cost(n) for n in sizes):
        ch, n = _ack_of(guest)
        assert ch == slow.channel
        acked += n
    guest.sendall(gframe(T.STDOUT, slow.channel, b"z" * 100))
    assert _ack_of(guest) == (slow.channel, p.output_cost(100))
    guest.sendall(gframe(T.EXIT, slow.channel, struct.pack(">iI", 137, 9)))
    deadline = time.monotonic() + 5
    while conn._table.is_open(slow.channel) or slow.channel in conn._table._open:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert conn.error is None


def test_output_beyond_the_window_ends_the_connection(
    pair: tuple[AgentConnection, socket.socket],
) -> None:
    conn, guest = pair
    guest.sendall(hello())
    conn.wait_hello(5)
    ex = conn.exec(p.ExecRequest(argv=["yes"]))
    read_frame(guest)
    frames = p.OUTPUT_WINDOW // p.output_cost(65536) + 1
    # Sent before the consumer takes anything: the host cannot have acknowledged any of it.
    guest.sendall(b"".join(gframe(T.STDERR, ex.channel, b"e" * 65536) for _ in range(frames)))
    deadline = time.monotonic() + 5
    while conn.error is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert conn.error == "guest protocol violation: exec output beyond the window"
    with pytest.raises(AgentGone, match="beyond the window"):
        list(ex.events(timeout=5))


def test_abort_wakes_every_waiter(pair: tuple[AgentConnection, socket.socket]) -> None:
    conn, guest = pair
    guest.sendall(hello())
    conn.wait_hello(5)
    ex = conn.exec(p.ExecRequest(argv=["sleep"]))
    threading.Timer(0.1, conn.abort, args=("timed out",)).start()
    with pytest.raises(AgentGone, match="timed out"):
        list(ex.events())


def test_channel_table_rules() -> None:
    t = p.ChannelTable()
    r = t.open(p.Kind.FILE_READ)
    with pytest.raises(p.ProtocolError):
        t.receive(p.Frame(T.STDOUT, r, b"x"))
    assert t.receive(p.Frame(T.FILE_DATA, r, b"x")) == (False, p.FileData(b"x"))
    t.abandon(r)
    assert t.receive(p.Frame(T.FILE_DATA, r, b"x")) == (False, None)
    assert t.receive(p.Frame(T.RESULT, r, struct.pack(">i", 0))) == (True, None)
    with pytest.raises(p.ProtocolError, match="not open"):
        t.receive(p.Frame(T.FILE_DATA, r, b"x"))
    e = t.open(p.Kind.EXEC)
    t.receive(p.Frame(T.STARTED, e, struct.pack(">I", 1)))
    with pytest.raises(p.ProtocolError, match="second STARTED"):
        t.receive(p.Frame(T.STARTED, e, struct.pack(">I", 1)))


# --- streamed file operations against a hostile guest ---------------------------------------


def _ready(pair: tuple[AgentConnection, socket.socket]) -> tuple[AgentConnection, socket.socket]:
    conn, guest = pair
    guest.sendall(hello())
    conn.wait_hello(5)
    return conn, guest


def test_streamed_read_of_a_guest_that_stops_mid_file(
    pair: tuple[AgentConnection, socket.socket],
) -> None:
    """The guest sends part of a file and then nothing: the read ends with ChannelStalled
    after its timeout, the host sends KILL for that channel, and an exec on another channel
    is answered normally (the connection is fine)."""
    from matchlock.guest.client import ChannelStalled

    conn, guest = _ready(pair)

    def guest_side() -> None:
        f = read_frame(guest)
        assert f.type == T.FILE_READ
        guest.sendall(gframe(T.FILE_DATA, f.channel, b"b" * 1000))

    t = threading.Thread(target=guest_side, daemon=True)
    t.start()
    got = []
    with pytest.raises(ChannelStalled):
        for c in conn.read_file_chunks("/f", timeout=0.5):
            got.append(c)
    t.join(5)
    assert got == [b"b" * 1000]
    kill = next_request(guest)
    assert kill.type == T.KILL and kill.payload == b""
    ex = conn.exec(p.ExecRequest(argv=["x"]))
    assert next_request(guest).type == T.EXEC
    guest.sendall(gframe(T.RESULT, kill.channel, struct.pack(">i", 125))  # the late answer
                  + gframe(T.EXIT, ex.channel, struct.pack(">iI", 0, 0)))
    assert list(ex.events()) == [p.ExitStatus(0, 0)]
    assert conn.error is None


def test_streamed_read_stops_at_the_limit_and_on_early_close(
    pair: tuple[AgentConnection, socket.socket],
) -> None:
    from matchlock.guest.client import FileOpError

    conn, guest = _ready(pair)

    def guest_sends(n: int) -> int:
        f = next_request(guest)
        assert f.type == T.FILE_READ
        for _ in range(n):
            guest.sendall(gframe(T.FILE_DATA, f.channel, b"x" * 65536))
        return f.channel

    # More than the caller's limit (a file that grows, or a guest that lies): EFBIG, KILL.
    t = threading.Thread(target=guest_sends, args=(4,), daemon=True)
    t.start()
    with pytest.raises(FileOpError, match="larger than 100000"):
        for _ in conn.read_file_chunks("/f", limit=100_000, timeout=5):
            pass
    t.join(5)
    assert next_request(guest).type == T.KILL
    # The consumer stops after the first chunk (closes the iterator): KILL too.
    it = conn.read_file_chunks("/g", timeout=5)
    t = threading.Thread(target=guest_sends, args=(2,), daemon=True)
    t.start()
    assert next(it) == b"x" * 65536
    it.close()
    t.join(5)
    assert next_request(guest).type == T.KILL
    assert conn.error is None


def test_streamed_write_whose_source_fails_is_killed_not_committed(
    pair: tuple[AgentConnection, socket.socket],
) -> None:
    """A source that raises mid-way: the host sends KILL, never the empty FILE_DATA that
    would commit the partial file; the exception reaches the caller."""
    conn, guest = _ready(pair)

    def source() -> Iterator[bytes]:
        yield b"a" * 70000
        raise OSError("source broke")

    frames: list[p.Frame] = []

    def guest_side() -> None:
        while not frames or frames[-1].type != T.KILL:
            frames.append(read_frame(guest))

    t = threading.Thread(target=guest_side, daemon=True)
    t.start()
    with pytest.raises(OSError, match="source broke"):
        conn.write_file_chunks("/w", source())
    t.join(5)
    assert [f.type for f in frames] == [T.FILE_WRITE, T.FILE_DATA_IN, T.FILE_DATA_IN, T.KILL]
    assert [len(f.payload) for f in frames[1:3]] == [65536, 70000 - 65536]  # no end frame


def test_streamed_write_round_trip(pair: tuple[AgentConnection, socket.socket]) -> None:
    conn, guest = _ready(pair)
    got = bytearray()

    def guest_side() -> None:
        f = read_frame(guest)
        assert f.type == T.FILE_WRITE
        while (f := read_frame(guest)).payload:
            assert f.type == T.FILE_DATA_IN and len(f.payload) <= p.MAX_DATA
            got.extend(f.payload)
        guest.sendall(gframe(T.RESULT, f.channel, struct.pack(">i", 0)))

    t = threading.Thread(target=guest_side, daemon=True)
    t.start()
    data = os.urandom(300_000)
    pieces = [data[:1], data[1:200_000], b"", data[200_000:]]
    assert conn.write_file_chunks("/w", pieces) == len(data)
    t.join(5)
    assert bytes(got) == data


def test_a_read_at_its_window_holds_up_nothing_else_and_more_is_a_violation(
    pair: tuple[AgentConnection, socket.socket],
) -> None:
    """FILE_DATA is credited like exec output: a consumer that stops taking a file holds at
    most the window on the host while another channel goes on; a guest that sends past the
    window breaks the protocol (the connection ends, as for exec output)."""
    conn, guest = _ready(pair)
    it = conn.read_file_chunks("/f", timeout=30)
    t = threading.Thread(target=lambda: next(it), daemon=True)  # sends FILE_READ, takes 1
    t.start()
    f = next_request(guest)
    assert f.type == T.FILE_READ
    n = p.OUTPUT_WINDOW // p.output_cost(65536)
    for _ in range(n):
        guest.sendall(gframe(T.FILE_DATA, f.channel, b"x" * 65536))
    t.join(5)
    # The reader is not waiting on the stopped consumer: an exec is answered.
    ex = conn.exec(p.ExecRequest(argv=["x"]))
    assert next_request(guest).type == T.EXEC
    guest.sendall(gframe(T.EXIT, ex.channel, struct.pack(">iI", 0, 0)))
    assert list(ex.events(timeout=5)) == [p.ExitStatus(0, 0)]
    # One taken frame was not yet acknowledged (a batch is 256 KiB): the window is full
    # again after two more frames; the second of them is beyond it.
    guest.sendall(gframe(T.FILE_DATA, f.channel, b"x" * 65536) * 2)
    deadline = time.monotonic() + 5
    while conn.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert conn.error is not None and "beyond the window" in conn.error
