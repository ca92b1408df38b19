"""The supervisor's framing (sandbox/wire.py), byte for byte, and its request validation."""

from __future__ import annotations

import pytest

from matchlock.sandbox import request, wire


def test_frames_encode_byte_for_byte() -> None:
    assert wire.encode(wire.STDOUT, b"hi") == b"O\x00\x00\x00\x02hi"
    assert wire.encode(wire.STDIN) == b"I\x00\x00\x00\x00"
    assert wire.encode_signal(2) == b"S\x00\x00\x00\x04\x00\x00\x00\x02"
    assert wire.encode_resize(30, 100) == b"W\x00\x00\x00\x04\x00\x1e\x00\x64"
    assert wire.encode_json(wire.EXIT, {"code": 7}) == b'X\x00\x00\x00\x0a{"code":7}'
    assert wire.encode_json(wire.REQUEST, {"op": "shutdown"}) == (
        b'H\x00\x00\x00\x11{"op":"shutdown"}')


def test_decoder_reassembles_any_split() -> None:
    stream = (wire.encode(wire.STDOUT, b"a" * 300) + wire.encode(wire.STDERR, b"")
              + wire.encode_json(wire.EXIT, {"code": 0}))
    for step in (1, 2, 5, 7, len(stream)):
        dec = wire.Decoder()
        frames = []
        for i in range(0, len(stream), step):
            frames += dec.feed(stream[i : i + step])
        assert [f.type for f in frames] == [wire.STDOUT, wire.STDERR, wire.EXIT]
        assert frames[0].payload == b"a" * 300
        assert frames[2].json() == {"code": 0}
        assert dec.pending == 0


@pytest.mark.parametrize("data", [
    b"Z\x00\x00\x00\x00",  # unknown type
    b"O\xff\xff\xff\xff",  # longer than MAX_PAYLOAD
])
def test_decoder_rejects_bad_frames(data: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.Decoder().feed(data)


@pytest.mark.parametrize("payload", [b"\xff", b"[1]", b"nope", b'"s"'])
def test_json_payload_must_be_an_object(payload: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_json(payload)


def test_resize_payload() -> None:
    assert wire.decode_resize(b"\x00\x1e\x00\x64") == (30, 100)
    for bad in (b"\x00\x1e", b"\x00\x00\x00\x64", b"\x00\x1e\x00\x00"):
        with pytest.raises(wire.WireError):
            wire.decode_resize(bad)


def test_signal_payload_is_four_bytes() -> None:
    assert wire.decode_signal(b"\x00\x00\x00\x0f") == 15
    with pytest.raises(wire.WireError):
        wire.decode_signal(b"\x00\x0f")


def test_valid_requests() -> None:
    spec = request.parse_request({"op": "exec", "argv": ["sh", "-c", "x"], "env": ["A=b"],
                               "workdir": "/tmp", "user": "1000", "stdin": True})
    assert spec == request.ExecSpec(["sh", "-c", "x"], ["A=b"], "/tmp", "1000", True)
    assert request.parse_request({"op": "exec", "argv": ["true"]}) == request.ExecSpec(
        ["true"], [], None, None, False)
    assert request.parse_request({"op": "exec", "argv": ["sh"], "tty": True, "rows": 30,
                               "cols": 100}) == request.ExecSpec(["sh"], [], None, None, False,
                                                              True, 30, 100)
    assert request.parse_request({"op": "shutdown"}) == "shutdown"
    assert request.parse_request({"op": "ping"}) == "ping"


@pytest.mark.parametrize("obj", [
    {},
    {"op": "reboot"},
    {"op": "shutdown", "force": True},
    {"op": "exec"},
    {"op": "exec", "argv": []},
    {"op": "exec", "argv": [""]},
    {"op": "exec", "argv": "true"},
    {"op": "exec", "argv": ["true", 1]},
    {"op": "exec", "argv": ["a\0b"]},
    {"op": "exec", "argv": ["true"], "env": ["NOEQUALS"]},
    {"op": "exec", "argv": ["true"], "env": ["=v"]},
    {"op": "exec", "argv": ["true"], "env": ["A B=v"]},
    {"op": "exec", "argv": ["true"], "workdir": "relative"},
    {"op": "exec", "argv": ["true"], "workdir": 5},
    {"op": "exec", "argv": ["true"], "user": ["root"]},
    {"op": "exec", "argv": ["true"], "stdin": "yes"},
    {"op": "exec", "argv": ["true"], "tty": 1},
    {"op": "exec", "argv": ["true"], "rows": 0},
    {"op": "exec", "argv": ["true"], "cols": 70000},
    {"op": "exec", "argv": ["true"], "rows": True},
    {"op": "exec", "argv": ["true"], "cols": "80"},
    {"op": "exec", "argv": ["true"], "pty": True},
])
def test_invalid_requests_are_refused(obj: dict[str, object]) -> None:
    with pytest.raises(wire.WireError):
        request.parse_request(obj)


# --- allow-list and port-forward ---------------------------------------------------------


def test_new_frames_byte_for_byte() -> None:
    assert wire.encode(wire.DATA, b"\x00\xffab") == b"D\x00\x00\x00\x04\x00\xffab"
    assert wire.encode(wire.FIN) == b"F\x00\x00\x00\x00"
    assert wire.encode_json(wire.ANSWER, {"changed": ["a.test"], "allowed": []}) == (
        b'A\x00\x00\x00\x23{"changed":["a.test"],"allowed":[]}')
    assert wire.encode_json(wire.REQUEST, {"op": "port-forward", "port": 8080}) == (
        b'H\x00\x00\x00\x21{"op":"port-forward","port":8080}')
    assert wire.encode_json(wire.REQUEST, {"op": "allow-list-add", "hosts": ["x.test"]}) == (
        b'H\x00\x00\x00\x2a{"op":"allow-list-add","hosts":["x.test"]}')
    stream = b"D\x00\x00\x00\x02hiF\x00\x00\x00\x00" + wire.encode_json(wire.EXIT, {"code": 0})
    frames = wire.Decoder().feed(stream)
    assert [(f.type, f.payload) for f in frames[:2]] == [(wire.DATA, b"hi"), (wire.FIN, b"")]
    assert frames[2].json() == {"code": 0}


def test_allow_list_and_forward_requests() -> None:
    assert request.parse_request({"op": "allow-list-add", "hosts": ["a.test", "b.test:22"]}) == (
        request.AllowListRequest("add", ["a.test", "b.test:22"]))
    assert request.parse_request({"op": "allow-list-delete", "hosts": ["a.test"]}) == (
        request.AllowListRequest("delete", ["a.test"]))
    assert request.parse_request({"op": "allow-list"}) == request.AllowListRequest("list", [])
    assert request.parse_request({"op": "port-forward", "port": 1}) == request.ForwardRequest(1)
    assert request.parse_request({"op": "port-forward", "port": 65535}) == (
        request.ForwardRequest(65535))


@pytest.mark.parametrize("obj", [
    {"op": "allow-list-add"},
    {"op": "allow-list-add", "hosts": []},
    {"op": "allow-list-add", "hosts": "a.test"},
    {"op": "allow-list-add", "hosts": ["a.test", 3]},
    {"op": "allow-list-add", "hosts": ["a\0.test"]},
    {"op": "allow-list-add", "hosts": ["a.test"] * (request.MAX_HOSTS + 1)},
    {"op": "allow-list-delete", "hosts": ["a.test"], "all": True},
    {"op": "allow-list", "hosts": ["a.test"]},
    {"op": "port-forward"},
    {"op": "port-forward", "port": 0},
    {"op": "port-forward", "port": 65536},
    {"op": "port-forward", "port": "80"},
    {"op": "port-forward", "port": True},
    {"op": "port-forward", "port": 80.0},
    {"op": "port-forward", "port": 80, "host": "10.0.0.1"},
])
def test_invalid_allow_list_and_forward_requests(obj: dict[str, object]) -> None:
    with pytest.raises(wire.WireError):
        request.parse_request(obj)
