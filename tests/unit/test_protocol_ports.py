"""CONNECT channels (published ports) in the host codec, byte for byte, and the state machine
that keeps a hostile guest inside them."""

from __future__ import annotations

import struct

import pytest

from matchlock.guest import protocol as p
from matchlock.guest.protocol import T


def gframe(t: T, ch: int, payload: bytes = b"") -> p.Frame:
    return p.Frame(t, ch, payload)


def test_connect_and_ack_encoding() -> None:
    assert p.encode_frame(T.CONNECT, 5, p.encode_connect(8080)) == (
        b"\x0d\0\0\0\0\0\0\x05\0\0\0\x02\x1f\x90")
    assert p.encode_frame(T.SOCK_ACK, 5, p.encode_sock_ack(65536)) == (
        b"\x0e\0\0\0\0\0\0\x05\0\0\0\x04\0\x01\0\0")
    for bad in (0, 65536, -1):
        with pytest.raises(ValueError):
            p.encode_connect(bad)
    for bad in (0, p.SOCK_WINDOW + 1):
        with pytest.raises(ValueError):
            p.encode_sock_ack(bad)


def test_decoder_accepts_sock_eof_only_off_the_control_channel() -> None:
    dec = p.FrameDecoder()
    assert dec.feed(b"\x8c\0\0\0\0\0\0\x03\0\0\0\0") == [p.Frame(T.SOCK_EOF, 3, b"")]
    with pytest.raises(p.ProtocolError):
        p.FrameDecoder().feed(b"\x8c\0\0\0\0\0\0\0\0\0\0\0")


def test_connect_channel_lifecycle() -> None:
    t = p.ChannelTable()
    cid = t.open(p.Kind.CONNECT)
    assert t.stdin_room(cid) == p.STDIN_WINDOW
    assert t.receive(gframe(T.STARTED, cid, b"\0\0\0\0")) == (False, p.Started(0))
    t.stdin_sent(cid, 1000)
    assert t.receive(gframe(T.STDIN_ACK, cid, struct.pack(">I", 1000))) == (False, None)
    assert t.receive(gframe(T.STDOUT, cid, b"x" * 10)) == (False, p.Output("stdout", b"x" * 10))
    assert t.delivered(cid, 10)
    assert t.receive(gframe(T.SOCK_EOF, cid)) == (False, p.SockEof())
    closed, ev = t.receive(gframe(T.RESULT, cid, b"\0\0\0\0"))
    assert closed and ev == p.Result(0, "")
    assert not t.is_open(cid)
    assert not t.delivered(cid, 1)  # gone: nothing to acknowledge


def test_connect_refused_is_a_result_without_started() -> None:
    t = p.ChannelTable()
    cid = t.open(p.Kind.CONNECT)
    closed, ev = t.receive(gframe(T.RESULT, cid, struct.pack(">i", 111) + b"refused"))
    assert closed and ev == p.Result(111, "refused")


@pytest.mark.parametrize("frames, reason", [
    ([(T.STDOUT, b"x")], "before STARTED"),
    ([(T.SOCK_EOF, b"")], "before STARTED"),
    ([(T.STARTED, b"\0\0\0\1")], "must carry 0"),
    ([(T.STARTED, b"\0\0\0\0"), (T.STARTED, b"\0\0\0\0")], "second STARTED"),
    ([(T.STARTED, b"\0\0\0\0"), (T.SOCK_EOF, b"x")], "SOCK_EOF payload"),
    ([(T.STARTED, b"\0\0\0\0"), (T.SOCK_EOF, b""), (T.STDOUT, b"x")], "after SOCK_EOF"),
    ([(T.STARTED, b"\0\0\0\0"), (T.SOCK_EOF, b""), (T.SOCK_EOF, b"")], "after SOCK_EOF"),
    ([(T.STARTED, b"\0\0\0\0"), (T.STDOUT, b"")], "empty output"),
    ([(T.STARTED, b"\0\0\0\0"), (T.STDERR, b"x")], "STDERR on a CONNECT"),
    ([(T.EXIT, b"\0" * 8)], "EXIT on a CONNECT"),
    ([(T.STDIN_ACK, b"\0\0\0\1")], "more bytes than were sent"),
])
def test_connect_channel_rejects(frames: list[tuple[T, bytes]], reason: str) -> None:
    t = p.ChannelTable()
    cid = t.open(p.Kind.CONNECT)
    with pytest.raises(p.ProtocolError, match=reason):
        for ft, payload in frames:
            t.receive(gframe(ft, cid, payload))


def test_guest_data_is_held_to_the_window() -> None:
    t = p.ChannelTable()
    cid = t.open(p.Kind.CONNECT)
    t.receive(gframe(T.STARTED, cid, b"\0\0\0\0"))
    for _ in range(p.SOCK_WINDOW // p.MAX_DATA):
        t.receive(gframe(T.STDOUT, cid, b"y" * p.MAX_DATA))
    with pytest.raises(p.ProtocolError, match="beyond the window"):
        t.receive(gframe(T.STDOUT, cid, b"y"))
    t2 = p.ChannelTable()
    c2 = t2.open(p.Kind.CONNECT)
    t2.receive(gframe(T.STARTED, c2, b"\0\0\0\0"))
    for _ in range(p.SOCK_WINDOW // p.MAX_DATA):
        t2.receive(gframe(T.STDOUT, c2, b"y" * p.MAX_DATA))
    assert t2.delivered(c2, p.MAX_DATA)
    t2.receive(gframe(T.STDOUT, c2, b"y" * p.MAX_DATA))  # room again after the SOCK_ACK
    with pytest.raises(ValueError):
        t2.delivered(c2, p.SOCK_WINDOW + 1)
