"""sandbox/pipe.py without a VM: the supervisor's end of a port-forward pipe between a
scripted guest agent (socketpair) and a client speaking the wire frames byte for byte."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

from tests.unit.test_ports import _gframe, _read_frame

from matchlock.guest.client import AgentConnection
from matchlock.guest.protocol import T
from matchlock.sandbox import wire
from matchlock.sandbox.control import frames
from matchlock.sandbox.pipe import serve_pipe


class Rig:
    """A started pipe: `guest` is the agent's end, `client` the supervisor client's."""

    def __init__(self) -> None:
        host, self.guest = socket.socketpair()
        self.guest.settimeout(10)
        self.conn = AgentConnection(host)
        self.guest.sendall(_gframe(T.HELLO, 0, struct.pack(">IQ", 1, 5) + b"test"))
        self.conn.wait_hello(5)
        self.client, server = socket.socketpair()
        self.client.settimeout(10)
        stream = self.conn.connect(8080)
        f = _read_frame(self.guest)
        assert f.type == T.CONNECT and f.payload == struct.pack(">H", 8080)
        self.ch = f.channel
        self.thread = threading.Thread(
            target=self._serve, args=(server, frames(server, wire.Decoder()), stream),
            daemon=True)
        self.thread.start()

    @staticmethod
    def _serve(server: socket.socket, incoming: Iterator[wire.Frame], stream: object) -> None:
        with server:
            serve_pipe(server, incoming, stream)  # type: ignore[arg-type]

    def client_frames(self) -> list[wire.Frame]:
        dec = wire.Decoder()
        out: list[wire.Frame] = []
        while True:
            data = self.client.recv(65536)
            if not data:
                assert dec.pending == 0
                return out
            out += dec.feed(data)

    def close(self) -> None:
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.conn.close()
        self.client.close()


def test_bytes_and_half_closes_both_ways_then_a_clean_end() -> None:
    rig = Rig()
    try:
        rig.guest.sendall(_gframe(T.STARTED, rig.ch, b"\0\0\0\0"))
        rig.client.sendall(b"D\x00\x00\x00\x04ping" + b"F\x00\x00\x00\x00")
        f = _read_frame(rig.guest)
        assert (f.type, f.channel, f.payload) == (T.STDIN, rig.ch, b"ping")
        f = _read_frame(rig.guest)
        assert (f.type, f.payload) == (T.STDIN, b"")  # the client's half-close
        rig.guest.sendall(_gframe(T.STDIN_ACK, rig.ch, struct.pack(">I", 4))
                          + _gframe(T.STDOUT, rig.ch, b"pong"))
        f = _read_frame(rig.guest)  # acknowledged once the client's socket took it
        assert (f.type, f.channel, f.payload) == (T.SOCK_ACK, rig.ch, struct.pack(">I", 4))
        rig.guest.sendall(_gframe(T.SOCK_EOF, rig.ch) + _gframe(T.RESULT, rig.ch, b"\0" * 4))
        got = rig.client_frames()
        assert [(f.type, f.payload) for f in got] == [
            (wire.DATA, b"pong"), (wire.FIN, b""), (wire.EXIT, b'{"code":0}')]
    finally:
        rig.close()


def test_refused_in_the_guest_is_an_error_frame_not_connected() -> None:
    rig = Rig()
    try:
        rig.guest.sendall(_gframe(T.RESULT, rig.ch, struct.pack(">i", 111) + b"refused"))
        got = rig.client_frames()
        assert [f.type for f in got] == [wire.ERROR]
        assert got[0].json() == {"message": "refused", "errno": 111, "connected": False}
    finally:
        rig.close()


def test_reset_after_connecting_is_reported_as_connected() -> None:
    rig = Rig()
    try:
        rig.guest.sendall(_gframe(T.STARTED, rig.ch, b"\0\0\0\0")
                          + _gframe(T.RESULT, rig.ch, struct.pack(">i", 104) + b"reset"))
        got = rig.client_frames()
        assert got[-1].json() == {"message": "reset", "errno": 104, "connected": True}
    finally:
        rig.close()


def test_client_closing_without_fin_kills_the_guest_side() -> None:
    rig = Rig()
    try:
        rig.guest.sendall(_gframe(T.STARTED, rig.ch, b"\0\0\0\0"))
        rig.client.sendall(b"D\x00\x00\x00\x01x")
        assert _read_frame(rig.guest).payload == b"x"
        rig.client.shutdown(socket.SHUT_WR)  # EOF without F: the host client was reset
        f = _read_frame(rig.guest)
        assert (f.type, f.channel) == (T.KILL, rig.ch)
        rig.guest.sendall(_gframe(T.RESULT, rig.ch, struct.pack(">i", 104) + b"killed"))
    finally:
        rig.close()


def test_a_frame_out_of_place_kills_the_guest_side() -> None:
    rig = Rig()
    try:
        rig.guest.sendall(_gframe(T.STARTED, rig.ch, b"\0\0\0\0"))
        rig.client.sendall(wire.encode(wire.STDIN, b"exec-only"))
        f = _read_frame(rig.guest)
        assert (f.type, f.channel) == (T.KILL, rig.ch)
        rig.guest.sendall(_gframe(T.RESULT, rig.ch, struct.pack(">i", 104) + b"killed"))
    finally:
        rig.close()
