"""Exec output credit (OUTPUT_ACK) in the host codec, byte for byte, and the accounting that
holds a hostile guest to its window."""

from __future__ import annotations

import struct

import pytest

from matchlock.guest import protocol as p
from matchlock.guest.protocol import T


def _out(ch: int, n: int, t: T = T.STDOUT) -> p.Frame:
    return p.Frame(t, ch, b"x" * n)


def test_output_ack_encoding() -> None:
    assert p.encode_frame(T.OUTPUT_ACK, 7, p.encode_output_ack(65600)) == (
        b"\x0f\0\0\0\0\0\0\x07\0\0\0\x04\0\x01\0\x40")
    assert p.OUTPUT_WINDOW == 1 << 20
    assert p.encode_output_ack(p.OUTPUT_WINDOW) == b"\0\x10\0\0"
    for bad in (0, -1, p.OUTPUT_WINDOW + 1):
        with pytest.raises(ValueError):
            p.encode_output_ack(bad)
    assert p.output_cost(1) == 65 and p.output_cost(65536) == 65600
    # OUTPUT_ACK is a host frame: a guest sending one breaks the protocol.
    with pytest.raises(p.ProtocolError):
        p.FrameDecoder().feed(b"\x0f\0\0\0\0\0\0\x01\0\0\0\x04\0\0\0\x01")


def test_the_window_counts_payload_and_a_cost_per_frame() -> None:
    t = p.ChannelTable()
    cid = t.open(p.Kind.EXEC)
    # Exactly the window, in stdout and stderr together, is fine.
    full = p.OUTPUT_WINDOW // p.output_cost(65536)
    for i in range(full):
        t.receive(_out(cid, 65536, T.STDERR if i % 2 else T.STDOUT))
    rest = p.OUTPUT_WINDOW - full * p.output_cost(65536) - p.OUTPUT_FRAME_COST
    t.receive(_out(cid, rest))
    with pytest.raises(p.ProtocolError, match="beyond the window"):
        t.receive(_out(cid, 1))


def test_tiny_frames_cannot_flood_the_host() -> None:
    t = p.ChannelTable()
    cid = t.open(p.Kind.EXEC)
    with pytest.raises(p.ProtocolError, match="beyond the window"):
        for _ in range(p.OUTPUT_WINDOW):
            t.receive(_out(cid, 1))
    # The frame count was bounded by the per-frame cost, not by the bytes.
    assert p.OUTPUT_WINDOW // p.output_cost(1) == p.OUTPUT_WINDOW // 65


def test_taken_output_is_acknowledged_once_and_reopens_the_window() -> None:
    t = p.ChannelTable()
    cid = t.open(p.Kind.EXEC)
    other = t.open(p.Kind.EXEC)
    full = p.OUTPUT_WINDOW // p.output_cost(65536)
    for _ in range(full):
        t.receive(_out(cid, 65536))
    assert t.take_acks() == []  # nothing taken yet
    # Gathered until a batch is due.
    batch = -(-p.OUTPUT_ACK_BATCH // p.output_cost(65536))
    due = [t.output_taken(cid, 65536) for _ in range(batch)]
    assert due == [False] * (batch - 1) + [True]
    t.receive(_out(other, 10))
    assert not t.output_taken(other, 10)  # not due yet, but goes out with the next
    assert sorted(t.take_acks()) == [(cid, batch * 65600), (other, 74)]
    assert t.take_acks() == []
    # Room for `batch` more full frames now, not one more.
    for _ in range(batch):
        t.receive(_out(cid, 65536))
    with pytest.raises(p.ProtocolError):
        t.receive(_out(cid, 65536))


def test_taking_more_than_was_received_is_a_host_bug() -> None:
    t = p.ChannelTable()
    cid = t.open(p.Kind.EXEC)
    t.receive(_out(cid, 100))
    with pytest.raises(ValueError):
        t.output_taken(cid, 101)
    with pytest.raises(ValueError):
        t.output_taken(cid, 0)


def test_abandoned_output_is_acknowledged_as_it_comes() -> None:
    t = p.ChannelTable()
    cid = t.open(p.Kind.EXEC)
    t.receive(_out(cid, 1000))
    t.receive(_out(cid, 2000))
    assert not t.output_taken(cid, 1000)
    t.abandon(cid)
    assert t.take_acks() == [(cid, p.output_cost(1000) + p.output_cost(2000))]
    assert t.receive(_out(cid, 500, T.STDERR)) == (False, None)
    assert t.take_acks() == [(cid, p.output_cost(500))]
    assert not t.output_taken(cid, 500)  # racing the abandonment: a no-op
    assert t.take_acks() == []
    # Credit comes back as the frames arrive: an abandoned exec never waits on the host.
    for _ in range(3):
        t.receive(_out(cid, 65536))
    assert t.take_acks() == [(cid, 3 * 65600)]


def test_ended_channels_need_no_acknowledgement() -> None:
    t = p.ChannelTable()
    cid = t.open(p.Kind.EXEC)
    t.receive(_out(cid, 10))
    assert not t.output_taken(cid, 10)
    assert t.receive(p.Frame(T.EXIT, cid, struct.pack(">iI", 0, 0)))[0] is True
    assert t.take_acks() == []
    assert not t.output_taken(cid, 10)  # popped after the EXIT: nothing to do
    assert t.take_acks() == []


def test_connect_channels_keep_their_own_window() -> None:
    t = p.ChannelTable()
    cid = t.open(p.Kind.CONNECT)
    t.receive(p.Frame(T.STARTED, cid, b"\0\0\0\0"))
    for _ in range(p.SOCK_WINDOW // 65536):  # no per-frame cost on CONNECT channels
        t.receive(_out(cid, 65536))
    assert not t.output_taken(cid, 65536)  # not an exec: no OUTPUT_ACK
    assert t.take_acks() == []
    assert t.delivered(cid, 65536)
