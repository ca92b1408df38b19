"""The pure parts of streamed file transfers: the data channel's framing (rpc/datachan.py)
and the SDK's chunking (sdk/files.py)."""

from __future__ import annotations

import io
import os
import threading

import pytest

from matchlock.rpc import datachan
from matchlock.sdk import files as F


def test_frames_round_trip_through_a_pipe() -> None:
    r, w = os.pipe()
    try:
        sent = [(1, b"a"), (7, os.urandom(datachan.MAX_FRAME)), (1, b""), (2**64 - 1, b"z" * 3)]

        def writer() -> None:  # a full frame is larger than the pipe: write while reading
            for rid, data in sent:
                datachan.write_frame(w, rid, data)
            os.close(w)

        t = threading.Thread(target=writer)
        t.start()
        got = []
        while (frame := datachan.read_frame(r)) is not None:
            got.append(frame)
        t.join()
        assert got == sent
    finally:
        os.close(r)


def test_frame_limits() -> None:
    with pytest.raises(ValueError):
        datachan.header(1, datachan.MAX_FRAME + 1)
    with pytest.raises(datachan.DataChannelError):
        datachan.parse_header(datachan.HEADER.pack(1, datachan.MAX_FRAME + 1))
    assert datachan.parse_header(datachan.header(5, 0)) == (5, 0)


def test_eof_inside_a_frame_is_an_error() -> None:
    r, w = os.pipe()
    try:
        os.write(w, datachan.header(3, 10) + b"12345")
        os.close(w)
        with pytest.raises(datachan.DataChannelError, match="inside a frame"):
            datachan.read_frame(r)
    finally:
        os.close(r)
    r, w = os.pipe()
    os.write(w, b"\0\0\0")  # part of a header
    os.close(w)
    with pytest.raises(datachan.DataChannelError):
        datachan.read_frame(r)
    os.close(r)


def test_parse_fds() -> None:
    r, w = os.pipe()
    try:
        assert datachan.parse_fds(f"{r},{w}") == (r, w)
        for bad in ("", "3", f"{r},{r}", f"1,{w}", "x,y", "900,901"):
            with pytest.raises(datachan.DataChannelError):
                datachan.parse_fds(bad)
        with open(os.devnull) as f, pytest.raises(datachan.DataChannelError,
                                                  match="not a pipe"):
            datachan.parse_fds(f"{f.fileno()},{w}")
    finally:
        os.close(r)
        os.close(w)


def test_chunks_of() -> None:
    data = bytes(range(256)) * 40  # 10240 bytes
    for source in (data, bytearray(data), memoryview(data), io.BytesIO(data),
                   io.BufferedReader(io.BytesIO(data))):
        pieces = list(F.chunks_of(source, 4096))  # type: ignore[arg-type]
        assert [len(x) for x in pieces] == [4096, 4096, 2048]
        assert b"".join(pieces) == data
    assert list(F.chunks_of(b"", 10)) == []
    assert list(F.chunks_of(io.StringIO("héllo"), 100)) == ["héllo".encode()]
    with pytest.raises(ValueError):
        list(F.chunks_of(b"x", 0))


def test_data_params_round_trip() -> None:
    chunk = os.urandom(1000)
    params = F.data_params(9, chunk)
    assert params["id"] == 9 and F.decode_data(params) == chunk
    with pytest.raises(ValueError):
        F.decode_data({"data": "%%%"})
