"""The rpc wire format (rpc/protocol.py), byte for byte against the reference's transcripts
(spec §3.8), without I/O."""

from __future__ import annotations

import json

import pytest

from matchlock.rpc import protocol as p


def test_transcript_answers_byte_for_byte() -> None:
    assert p.encode_error(None, p.PARSE_ERROR, "Parse error") == (
        b'{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"}}\n')
    assert p.encode_error(19, p.METHOD_NOT_FOUND, "Method not found") == (
        b'{"jsonrpc":"2.0","error":{"code":-32601,"message":"Method not found"},"id":19}\n')
    assert p.encode_error(20, p.VM_FAILED, "VM not created") == (
        b'{"jsonrpc":"2.0","error":{"code":-32000,"message":"VM not created"},"id":20}\n')
    assert p.encode_result(1, {"id": "vm-3f9c2a1b"}) == (
        b'{"jsonrpc":"2.0","result":{"id":"vm-3f9c2a1b"},"id":1}\n')
    assert p.encode_result(14, {}) == b'{"jsonrpc":"2.0","result":{},"id":14}\n'
    assert p.encode_result(11, {"cancelled": True}) == (
        b'{"jsonrpc":"2.0","result":{"cancelled":true},"id":11}\n')
    assert p.encode_error(10, p.CANCELLED, p.CANCELLED_MESSAGE) == (
        b'{"jsonrpc":"2.0","error":{"code":-32003,"message":"context canceled"},"id":10}\n')
    assert p.encode_result(3, {"duration_ms": 12, "exit_code": 0}) == (
        b'{"jsonrpc":"2.0","result":{"duration_ms":12,"exit_code":0},"id":3}\n')


def test_notifications_have_sorted_params_and_no_id() -> None:
    assert p.encode_notification("exec_stream.stdout", {"id": 3, "data": "MQo="}) == (
        b'{"jsonrpc":"2.0","method":"exec_stream.stdout","params":{"data":"MQo=","id":3}}\n')
    assert p.encode_notification("exec_pipe.ready", {"id": 4}) == (
        b'{"jsonrpc":"2.0","method":"exec_pipe.ready","params":{"id":4}}\n')
    # `event` keeps the reference's struct order.
    assert p.encode_notification("event", {"type": "network", "timestamp": 1}, sort=False) == (
        b'{"jsonrpc":"2.0","method":"event","params":{"type":"network","timestamp":1}}\n')


def test_output_is_ascii_whatever_the_text() -> None:
    line = p.encode_error(1, p.FILE_FAILED, "caf\u00e9 \ud800")
    line.decode("ascii")
    assert json.loads(line)["error"]["message"] == "caf\u00e9 \ud800"


def test_parse_python_sdk_request() -> None:
    req = p.parse_line(b'{"jsonrpc": "2.0", "method": "exec_stream", "id": 3, '
                       b'"params": {"command": "true", "working_dir": "/tmp"}}')
    assert req == p.Request("exec_stream", 3, {"command": "true", "working_dir": "/tmp"})
    assert p.parse_line(b'{"method":"cancel","params":{"id":1}}') == p.Request(
        "cancel", None, {"id": 1})
    assert p.parse_line(b'{"method":"x","id":null}') == p.Request("x", None, None)
    assert p.parse_line(b'{"method":"x","id":18446744073709551615}') == p.Request(
        "x", 2**64 - 1, None)
    # jsonrpc is not checked, as in the reference
    assert p.parse_line(b'{"jsonrpc":"1.0","method":"x","id":0}') == p.Request("x", 0, None)


PARSE_ERROR_LINE = b'{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"}}\n'


@pytest.mark.parametrize("line", [
    b"not json",
    b'{"method":"exec","id":"1"}',  # string id: the whole line is a parse error
    b'{"method":"exec","id":1.0}',
    b'{"method":"exec","id":true}',
    b'{"method":"exec","id":-1}',
    b'{"method":"exec","id":18446744073709551616}',
    b'{"method":3,"id":1}',
    b"[1,2]",
    b"3",
    b'{"method":"exec","id":1,"params":NaN}',
    b'{"method":"exec","id":1',
    b'\xff{"method":"exec"}',
    b"[" * 100000,
])
def test_parse_errors(line: bytes) -> None:
    assert p.parse_line(line) == PARSE_ERROR_LINE


def test_blank_lines() -> None:
    assert p.is_blank(b"")
    assert p.is_blank(b"  \r")
    assert not p.is_blank(b"{}")


@pytest.mark.parametrize(("prefix", "rid"), [
    (b'{"jsonrpc": "2.0", "method": "write_file", "id": 7, "params": {"content": "AAAA', 7),
    (b'{"id":12,"params":{"x":"', 12),
    (b'{"a":{"id":5,"b":[1,2,{"c":"}"}]},"id":9,"params":', 9),
    (b'{"s":"\\"id\\": 4","id":8,', 8),
    (b'{"jsonrpc": "2.0", "method": "write_file", "params": {"id": 3, "content": "AAA', None),
    (b'{"id":"7","params":', None),
    (b'{"id":-1,', None),
    (b'{"id":1', None),  # the number may continue
    (b"[1,", None),
])
def test_leading_id(prefix: bytes, rid: int | None) -> None:
    assert p.leading_id(prefix) == rid


def test_too_long_answer_names_the_request() -> None:
    prefix = b'{"jsonrpc": "2.0", "method": "write_file", "id": 7, "params": {"content": "'
    assert json.loads(p.too_long_error(prefix)) == {
        "jsonrpc": "2.0", "id": 7,
        "error": {"code": -32600, "message": f"request line exceeds {p.MAX_LINE} bytes"}}
    assert "id" not in json.loads(p.too_long_error(b"xxxx"))


def test_splitter_any_split_and_final_line() -> None:
    stream = b'{"a":1}\n\n{"b":2}\r\n{"c":3}'
    for step in (1, 2, 3, 7, len(stream)):
        s = p.LineSplitter()
        out: list[bytes | p.TooLong] = []
        for i in range(0, len(stream), step):
            out += s.feed(stream[i : i + step])
        out += s.finish()
        assert out == [b'{"a":1}', b"", b'{"b":2}\r', b'{"c":3}']


def test_splitter_skips_an_oversized_line_and_goes_on() -> None:
    s = p.LineSplitter(max_line=10)
    out = s.feed(b'{"id":1,"x":"')
    out += s.feed(b"y" * 50)
    assert out == []  # nothing buffered beyond the limit while skipping
    out += s.feed(b'"}\n{"ok":1}\n')
    assert out == [p.TooLong(b'{"id":1,"x":"' + b"y" * 50 + b'"}'), b'{"ok":1}']
    # exactly max_line fits
    s = p.LineSplitter(max_line=4)
    assert s.feed(b"abcd\nabcde\n") == [b"abcd", p.TooLong(b"abcde")]
    s = p.LineSplitter(max_line=4)
    assert s.feed(b"abcdef") == []
    assert s.finish() == [p.TooLong(b"abcdef")]


def test_splitter_keeps_a_bounded_prefix() -> None:
    s = p.LineSplitter(max_line=100)
    out = s.feed(b"z" * 100000 + b"\n")
    assert len(out) == 1 and isinstance(out[0], p.TooLong)
    assert len(out[0].prefix) == p.PREFIX_KEEP
