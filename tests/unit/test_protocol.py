"""The host codec, byte for byte, and its defences against a hostile guest."""

from __future__ import annotations

import struct

import pytest

from matchlock.guest import protocol as p
from matchlock.guest.protocol import T


def frame(t: int, ch: int, payload: bytes, reserved: bytes = b"\0\0\0") -> bytes:
    return bytes([t]) + reserved + struct.pack(">II", ch, len(payload)) + payload


def test_encode_frame_layout() -> None:
    assert p.encode_frame(T.STDIN, 7, b"hi") == b"\x03\0\0\0\0\0\0\x07\0\0\0\x02hi"
    assert p.encode_frame(T.SHUTDOWN, 0) == b"\x0a" + b"\0" * 11


def test_decoder_handles_split_and_coalesced_input() -> None:
    data = frame(0x82, 1, b"abc") + frame(0x83, 1, b"de") + frame(0x84, 1, struct.pack(">iI", 3, 0))
    dec = p.FrameDecoder()
    got = []
    for i in range(len(data)):
        got += dec.feed(data[i : i + 1])
    assert [(f.type, f.channel, f.payload) for f in got] == [
        (T.STDOUT, 1, b"abc"), (T.STDERR, 1, b"de"), (T.EXIT, 1, struct.pack(">iI", 3, 0))
    ]
    assert dec.pending == 0
    again = p.FrameDecoder().feed(data)
    assert again == got


def test_decoder_gives_the_same_frames_for_any_split_of_the_stream() -> None:
    frames = [frame(0x82 + i % 2, 1 + i % 3, bytes([i]) * (i * 997 % 70000 % 65537))
              for i in range(40)]
    frames = [f for f in frames if f[8:12] != b"\0\0\0\0"]  # no empty output frames
    data = b"".join(frames)
    whole = p.FrameDecoder().feed(data)
    assert len(whole) == len(frames)
    for step in (1000, 4096, 65536 + 11, 300000):
        dec = p.FrameDecoder()
        got = []
        for i in range(0, len(data), step):
            got += dec.feed(data[i : i + step])
        assert got == whole and dec.pending == 0


@pytest.mark.parametrize(
    "data, reason",
    [
        (frame(0x02, 1, b""), "unknown frame type"),  # a host type coming from the guest
        (frame(0x7F, 1, b""), "unknown frame type"),
        (frame(0x82, 1, b"", reserved=b"\0\1\0"), "reserved"),
        (frame(0x81, 3, b""), "HELLO on channel 3"),
        (frame(0x82, 0, b"x"), "STDOUT on the control channel"),
    ],
)
def test_decoder_rejects_malformed_headers(data: bytes, reason: str) -> None:
    with pytest.raises(p.ProtocolError, match=reason):
        p.FrameDecoder().feed(data)


def test_decoder_rejects_oversized_length_before_buffering() -> None:
    header = bytes([0x82, 0, 0, 0]) + struct.pack(">II", 1, p.MAX_GUEST_PAYLOAD + 1)
    dec = p.FrameDecoder()
    with pytest.raises(p.ProtocolError, match="exceeds"):
        dec.feed(header)


def test_exec_request_encoding() -> None:
    req = p.ExecRequest(argv=["ls", "-l"], env=["A=1"], cwd="/w", user="1000:1000",
                        tty=True, stdin=True, rows=30, cols=100)
    fields = p.decode_tlv(req.encode())
    assert fields == [
        (1, b"ls"), (1, b"-l"), (2, b"A=1"), (3, b"/w"), (4, b"1000:1000"),
        (5, struct.pack(">I", p.EXEC_TTY | p.EXEC_STDIN)),
        (6, struct.pack(">H", 30)), (7, struct.pack(">H", 100)),
    ]
    assert req.encode()[:8] == b"\x00\x01\x00\x00\x00\x02ls"


@pytest.mark.parametrize("bad", [
    p.ExecRequest(argv=[]),
    p.ExecRequest(argv=["a\0b"]),
    p.ExecRequest(argv=["a"], env=["NOEQUALS"]),
    p.ExecRequest(argv=["a"], env=["=x"]),
])
def test_exec_request_refuses_bad_values(bad: p.ExecRequest) -> None:
    with pytest.raises(ValueError):
        bad.encode()


def test_setup_request_round_trip() -> None:
    req = p.SetupRequest(hostname="h", root_dev="vda", upper_dev="vdb", clock_ns=5,
                         entropy=b"\x01" * 32, hosts_lines=("10.0.0.1 x",), resolv="nameserver 1\n")
    fields = dict((t, v) for t, v in p.decode_tlv(req.encode()) if t != p.SetupTag.HOSTS_LINE)
    assert fields[p.SetupTag.HOSTNAME] == b"h"
    assert fields[p.SetupTag.CLOCK_NS] == struct.pack(">Q", 5)
    assert fields[p.SetupTag.UPPER_DEV] == b"vdb"
    assert fields[p.SetupTag.RESOLV] == b"nameserver 1\n"


def test_tlv_rejects_truncation() -> None:
    good = p.encode_tlv([(1, b"abc")])
    with pytest.raises(p.ProtocolError):
        p.decode_tlv(good[:-1])
    with pytest.raises(p.ProtocolError):
        p.decode_tlv(good + b"\0")


def test_parse_hello() -> None:
    h = p.parse_hello(struct.pack(">IQ", 1, 123) + b"agent 1")
    assert h == p.Hello(1, 123, "agent 1")
    with pytest.raises(p.ProtocolError):
        p.parse_hello(b"\0\0\0\1")
    with pytest.raises(p.ProtocolError):
        p.parse_hello(struct.pack(">IQ", 1, 0) + b"x\0")


@pytest.mark.parametrize("code, sig, ok", [
    (0, 0, True), (42, 0, True), (130, 2, True), (255, 0, True),
    (-1, 0, False), (256, 0, False), (3, 9, False), (128 + 65, 65, False),
])
def test_parse_exit_validates(code: int, sig: int, ok: bool) -> None:
    payload = struct.pack(">iI", code, sig)
    if ok:
        assert p.parse_exit(payload) == p.ExitStatus(code, sig)
    else:
        with pytest.raises(p.ProtocolError):
            p.parse_exit(payload)


def test_parse_result_and_dirent() -> None:
    assert p.parse_result(struct.pack(">i", 2) + b"no such file") == p.Result(2, "no such file")
    with pytest.raises(p.ProtocolError):
        p.parse_result(struct.pack(">i", -5))
    ent = p.encode_tlv([(p.FileTag.NAME, b"f"), (p.FileTag.MODE, struct.pack(">I", 0o40755)),
                        (p.FileTag.SIZE, struct.pack(">Q", 4096)),
                        (p.FileTag.MTIME, struct.pack(">q", -1))])
    d = p.parse_dirent(ent)
    assert d == p.DirEntry("f", 0o40755, 4096, -1) and d.is_dir
    for name in (b"", b"..", b"a/b"):
        bad = p.encode_tlv([(p.FileTag.NAME, name), (p.FileTag.MODE, b"\0" * 4),
                            (p.FileTag.SIZE, b"\0" * 8), (p.FileTag.MTIME, b"\0" * 8)])
        with pytest.raises(p.ProtocolError):
            p.parse_dirent(bad)


def test_setup_carries_disks_after_mounts() -> None:
    req = p.SetupRequest(hostname="h", root_dev="vda", upper_dev="vdb", clock_ns=1,
                         entropy=b"\0" * 32, mounts=(b"\0\0\0\0/m",),
                         disks=(b"\x00\x00/data", b"\x01\x01/ro"))
    fields = p.decode_tlv(req.encode())
    assert fields[-3:] == [(p.SetupTag.MOUNT, b"\0\0\0\0/m"), (11, b"\x00\x00/data"),
                           (11, b"\x01\x01/ro")]
    assert p.SetupTag.DISK == 11


def test_prepare_carries_the_warm_up_command_in_order_and_bounds_it() -> None:
    req = p.PrepareRequest("vda", "vdb", warm=("python3", "-I", "-c", "pass"))
    fields = p.decode_tlv(req.encode())
    assert [v for t, v in fields if t == p.SetupTag.WARM_ARG] == [b"python3", b"-I", b"-c",
                                                                   b"pass"]
    assert p.SetupTag.WARM_ARG == 13
    for bad in (("",), ("x" * 1025,), ("a",) * 17, ("a\0b",)):
        with pytest.raises(ValueError):
            p.PrepareRequest("vda", None, warm=bad).encode()


def test_prepare_carries_the_root_and_setup_after_it_does_not() -> None:
    prep = dict(p.decode_tlv(p.PrepareRequest(root_dev="vda", upper_dev="vdb").encode()))
    assert prep == {p.SetupTag.ROOT_DEV: b"vda", p.SetupTag.UPPER_DEV: b"vdb"}
    req = p.SetupRequest(hostname="h", root_dev=None, upper_dev=None, clock_ns=1,
                         entropy=b"\x02" * 32)
    tags = {t for t, _v in p.decode_tlv(req.encode())}
    assert p.SetupTag.ROOT_DEV not in tags and p.SetupTag.UPPER_DEV not in tags
    assert p.SetupTag.ENTROPY in tags


def test_the_ca_travels_in_setup_and_a_nic_template_is_told_what_setup_brings() -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nQUJD\n-----END CERTIFICATE-----\n"
    req = p.SetupRequest(hostname="h", root_dev=None, upper_dev=None, clock_ns=1,
                         entropy=b"\x02" * 32, ca=pem)
    assert (12, pem) in p.decode_tlv(req.encode()) and p.SetupTag.CA == 12
    assert p.decode_tlv(p.encode_ca(pem)) == [(12, pem)] and p.T.CA == 0x12
    for bad in (b"", b"a\0b", b"x" * 65537):
        with pytest.raises(ValueError):
            p.SetupRequest(hostname="h", root_dev=None, upper_dev=None, clock_ns=1,
                           entropy=b"\x02" * 32, ca=bad).encode()
    net = p.NetConfig("10.0.0.2", 24, "10.0.0.1", 1500)
    prep = p.decode_tlv(p.PrepareRequest("vda", "vdb", net=net).encode())
    assert prep[2:] == [(p.SetupTag.NET, net.encode()), (p.SetupTag.RESOLV, b""),
                        (p.SetupTag.CA, b"")]
    timed = dict(p.decode_tlv(p.PrepareRequest("vda", "vdb", clock_ns=7).encode()))
    assert timed[p.SetupTag.CLOCK_NS] == struct.pack(">Q", 7)
    assert p.SetupTag.ENTROPY not in timed  # random state is each clone's, from SETUP


def test_message_records_behave_as_frozen_dataclasses() -> None:
    # guest/protocol.py's plain slotted classes keep what the dataclasses gave (issue 10).
    import copy
    import dataclasses
    import pickle

    e = p.DirEntry("a", 0o40755, 1, -2)
    assert e == p.DirEntry(name="a", mode=0o40755, size=1, mtime=-2) and e.is_dir
    assert e != p.DirEntry("a", 0o40755, 1, -3)
    assert p.Started(3) != p.FileData(3)  # type: ignore[arg-type]  # equal fields, other class
    assert p.Result(0, "") != (0, "")
    assert hash(p.Output("stdout", b"x")) == hash(p.Output("stdout", b"x"))
    assert repr(e) == "DirEntry(name='a', mode=16877, size=1, mtime=-2)"
    assert repr(p.SockEof()) == "SockEof()" and p.SockEof() == p.SockEof()
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.name = "b"
    with pytest.raises(dataclasses.FrozenInstanceError):
        del e.name
    with pytest.raises(AttributeError):
        e.other = 1
    assert copy.copy(e) == e and pickle.loads(pickle.dumps(e)) == e
    assert p.NetConfig("10.0.0.2", 24, "10.0.0.1").mtu == 1500
    assert p.ExitStatus.__match_args__ == ("code", "signal")
    with pytest.raises(TypeError):
        p.Hello(1, 2)  # type: ignore[call-arg]
