"""The exec client's JSON (sandbox/tinyjson.py) must read and write exactly what the `json`
package does: the same text out, the same value in, the same error for anything malformed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matchlock.sandbox import tinyjson

SCALARS = st.none() | st.booleans() | st.integers() | st.text()
VALUES = st.recursive(
    SCALARS | st.floats(allow_nan=False),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=20,
)


def json_reading(text: str) -> tuple[str, Any]:
    try:
        return "ok", json.loads(text)
    except ValueError as e:
        return "error", str(e)


def tiny_reading(text: str) -> tuple[str, Any]:
    try:
        return "ok", tinyjson.loads(text)
    except ValueError as e:
        return "error", str(e)


@settings(max_examples=1500, deadline=None)
@given(VALUES)
def test_writes_what_json_writes(value: Any) -> None:
    assert tinyjson.dumps(value) == json.dumps(value, separators=(",", ":"))


@settings(max_examples=1500, deadline=None)
@given(VALUES, st.sampled_from([None, 0, 2]))
def test_reads_what_json_reads(value: Any, indent: int | None) -> None:
    text = json.dumps(value, indent=indent, ensure_ascii=indent == 2)
    assert tiny_reading(text) == json_reading(text)


JSONISH = st.text(alphabet='{}[],:"\\ \t\n\r-+.eE0123456789tfnrulsaxyzu\u00e9\x01\ud800',
                  max_size=30)


@settings(max_examples=3000, deadline=None)
@given(JSONISH)
def test_malformed_text_gets_json_s_own_answer(text: str) -> None:
    assert tiny_reading(text) == json_reading(text), text


@pytest.mark.parametrize("text", [
    '{"code":0}', '{"code": -3}', '{"message":"no such user \\"x\\" \\u00e9\\ud83d\\ude00"}',
    '{"message":"refused","errno":111,"connected":false}', ' {"a": [1, "b", null, true]} ',
    '{"code":0,"code":5}',
])
def test_control_messages_take_the_fast_reader(text: str) -> None:
    # The replies a `matchlock exec` reads must not need `json` (which costs that process
    # ~6 ms): the fast reader alone reads them, and as json does.
    assert tinyjson.parse(text) == json.loads(text)


@pytest.mark.parametrize("text", ['{"a":1.5}', '{"a":1e3}', '{"a":NaN}', '[1,]', '{"a":01}',
                                  '{"a":1}x', '\ufeff{}', '{"a":"\x01"}', "[" * 40 + "]" * 40])
def test_the_rest_goes_to_json(text: str) -> None:
    with pytest.raises((tinyjson._Unsupported, ValueError, IndexError)):
        tinyjson.parse(text)
    assert tiny_reading(text) == json_reading(text)


def test_the_request_of_an_exec() -> None:
    req = {"op": "exec", "argv": ["sh", "-c", "echo \u00e9 \"$X\"\n", "\udcff"],
           "env": ["TERM=xterm"], "workdir": None, "user": "1000:1000", "stdin": True,
           "tty": False, "rows": 24, "cols": 80}
    assert tinyjson.dumps(req) == json.dumps(req, separators=(",", ":"))
    assert tinyjson.parse(tinyjson.dumps(req)) == req
