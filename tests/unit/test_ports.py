"""sandbox/ports.py without a VM: -p parsing and its errors, listeners bound all-or-nothing."""

from __future__ import annotations

import contextlib
import socket
import struct
import time

import pytest

from matchlock.errors import MatchlockError
from matchlock.guest import protocol as p
from matchlock.guest.client import AgentConnection, AgentGone
from matchlock.guest.protocol import T
from matchlock.sandbox.ports import PortForwarder, PortSpec, parse_publish


def test_parse_publish() -> None:
    assert parse_publish(["8080", "18080:80", "1:65535"], "127.0.0.1") == [
        PortSpec(8080, 8080), PortSpec(18080, 80), PortSpec(1, 65535)]
    assert parse_publish([], "::1") == []


@pytest.mark.parametrize("specs, address, message", [
    (["abc"], "127.0.0.1", "'abc' is not a port number"),
    (["70000"], "127.0.0.1", "port 70000 is out of range"),
    (["0"], "127.0.0.1", "port 0 is out of range"),
    (["-1"], "127.0.0.1", "is not a port number"),
    (["+80"], "127.0.0.1", "is not a port number"),
    (["٨٠"], "127.0.0.1", "is not a port number"),  # non-ASCII digits
    ([":80"], "127.0.0.1", "'' is not a port number"),
    (["80:"], "127.0.0.1", "'' is not a port number"),
    (["1:2:3"], "127.0.0.1", "'1:2' is not a port number"),
    (["000000080"], "127.0.0.1", "is not a port number"),
    (["80", "8080:80"], "127.0.0.1", None),
    (["80", "80:81"], "127.0.0.1", "host port 80 is given twice"),
    (["80"], "localhost", None),  # = 127.0.0.1, as the reference allows
    (["80"], "myhost", "invalid --address 'myhost'"),
    (["80"], ["127.0.0.1", "::1", "10.0.0.300"], "invalid --address '10.0.0.300'"),
])
def test_parse_publish_errors(specs: list[str], address: str | list[str],
                              message: str | None) -> None:
    if message is None:
        parse_publish(specs, address)
        return
    with pytest.raises(MatchlockError, match=message) as e:
        parse_publish(specs, address)
    assert "\n" not in str(e.value)


def test_listeners_are_all_or_nothing() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        with pytest.raises(MatchlockError, match=f"cannot listen on 127.0.0.1 port {taken}"):
            PortForwarder([PortSpec(free, 80), PortSpec(taken, 80)], "127.0.0.1")
    # The first listener was closed again: its port can be bound.
    with socket.socket() as again:
        again.bind(("127.0.0.1", free))


def test_forwarder_binds_and_closes() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fw = PortForwarder([PortSpec(port, 80)], "127.0.0.1")
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # accepted by the kernel backlog (not relayed: not started)
    fw.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


# --- the relay against a scripted guest agent on a socketpair ---------------------------------


def _gframe(t: int, ch: int, payload: bytes = b"") -> bytes:
    return bytes([t, 0, 0, 0]) + struct.pack(">II", ch, len(payload)) + payload


def _read_frame(sock: socket.socket) -> p.Frame:
    def exact(n: int) -> bytes:
        b = b""
        while len(b) < n:
            d = sock.recv(n - len(b))
            assert d, "the host closed the agent connection"
            b += d
        return b

    t, ch, n = struct.unpack(">B3xII", exact(12))
    return p.Frame(T(t), ch, exact(n))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _started_forwarder() -> tuple[PortForwarder, AgentConnection, socket.socket, int]:
    host, guest = socket.socketpair()
    guest.settimeout(10)
    conn = AgentConnection(host)
    guest.sendall(_gframe(T.HELLO, 0, struct.pack(">IQ", 1, 5) + b"test"))
    conn.wait_hello(5)
    port = _free_port()
    fw = PortForwarder([PortSpec(port, 8080)], "127.0.0.1")
    fw.start(conn)
    return fw, conn, guest, port


def test_relay_round_trip_with_half_closes_and_acks() -> None:
    fw, conn, guest, port = _started_forwarder()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            f = _read_frame(guest)
            assert f.type == T.CONNECT and f.payload == struct.pack(">H", 8080)
            ch = f.channel
            guest.sendall(_gframe(T.STARTED, ch, b"\0\0\0\0"))
            client.sendall(b"ping")
            client.shutdown(socket.SHUT_WR)
            f = _read_frame(guest)
            assert (f.type, f.channel, f.payload) == (T.STDIN, ch, b"ping")
            f = _read_frame(guest)
            assert (f.type, f.payload) == (T.STDIN, b"")  # the client's half-close
            guest.sendall(_gframe(T.STDIN_ACK, ch, struct.pack(">I", 4))
                          + _gframe(T.STDOUT, ch, b"pong"))
            assert client.recv(10) == b"pong"
            f = _read_frame(guest)
            assert (f.type, f.channel, f.payload) == (T.SOCK_ACK, ch, struct.pack(">I", 4))
            guest.sendall(_gframe(T.SOCK_EOF, ch) + _gframe(T.RESULT, ch, b"\0\0\0\0"))
            assert client.recv(10) == b""
    finally:
        fw.close()
        conn.close()


def test_refused_in_the_guest_closes_the_client_cleanly() -> None:
    fw, conn, guest, port = _started_forwarder()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            f = _read_frame(guest)
            guest.sendall(_gframe(T.RESULT, f.channel, struct.pack(">i", 111) + b"refused"))
            assert client.recv(10) == b""  # EOF, not a reset
    finally:
        fw.close()
        conn.close()


def test_reset_in_the_guest_resets_the_client() -> None:
    fw, conn, guest, port = _started_forwarder()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            ch = _read_frame(guest).channel
            guest.sendall(_gframe(T.STARTED, ch, b"\0\0\0\0")
                          + _gframe(T.RESULT, ch, struct.pack(">i", 104) + b"reset"))
            with pytest.raises(ConnectionResetError):
                client.recv(10)
    finally:
        fw.close()
        conn.close()


def test_client_gone_kills_the_guest_side() -> None:
    fw, conn, guest, port = _started_forwarder()
    try:
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        ch = _read_frame(guest).channel
        guest.sendall(_gframe(T.STARTED, ch, b"\0\0\0\0"))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset
        f = _read_frame(guest)
        assert (f.type, f.channel) == (T.KILL, ch)
    finally:
        fw.close()
        conn.close()


def test_guest_data_beyond_the_window_ends_the_connection() -> None:
    host, guest = socket.socketpair()
    guest.settimeout(10)
    conn = AgentConnection(host)
    try:
        guest.sendall(_gframe(T.HELLO, 0, struct.pack(">IQ", 1, 5) + b"test"))
        conn.wait_hello(5)
        stream = conn.connect(8080)  # nobody reads it: no SOCK_ACK is ever sent
        ch = _read_frame(guest).channel
        guest.sendall(_gframe(T.STARTED, ch, b"\0\0\0\0"))
        with contextlib.suppress(OSError):
            for _ in range(p.SOCK_WINDOW // p.MAX_DATA + 1):
                guest.sendall(_gframe(T.STDOUT, ch, b"x" * p.MAX_DATA))
        deadline = time.monotonic() + 10
        while conn.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert conn.error is not None and "beyond the window" in conn.error
        with pytest.raises(AgentGone):
            while stream.read(5) is not None:
                pass
    finally:
        conn.close()


def test_bindings_any_free_port_and_several_addresses() -> None:
    fw = PortForwarder([PortSpec(0, 8080), PortSpec(0, 9090)],
                       ["127.0.0.1", "localhost", "::1"])
    try:
        # localhost is 127.0.0.1: bound once; every (address, spec) gets its own real port.
        assert [(b.address, b.remote_port) for b in fw.bindings] == [
            ("127.0.0.1", 8080), ("127.0.0.1", 9090), ("::1", 8080), ("::1", 9090)]
        assert all(b.local_port > 0 for b in fw.bindings)
        for b in fw.bindings:
            with socket.create_connection((b.address, b.local_port), timeout=5):
                pass  # listening (accepted by the backlog: not started)
    finally:
        fw.close()
    for b in fw.bindings:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((b.address, b.local_port), timeout=5)
