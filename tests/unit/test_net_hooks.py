"""Network hook rules, pure: compilation, matching, mutations, callback JSON, SSE rewriting."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from matchlock.net import http1
from matchlock.net.hookrun import Hooks
from matchlock.net.hooks import (
    MAX_SSE_LINE,
    HookError,
    PathGlob,
    Replacement,
    RequestView,
    ResponsePlan,
    SseRewriter,
    apply_answer_to_request,
    apply_request_rule,
    apply_response_rule,
    callback_request,
    compile_rule,
    compile_rules,
    parse_answer,
    path_forms,
    replace_all,
)


def rule(**kw: Any) -> Any:
    r = compile_rule(kw, 0)
    assert r is not None
    return r


def view(target: str = "/v1/x?b=2&a=1", headers: list[tuple[str, str]] | None = None
         ) -> RequestView:
    return RequestView("api.test", "GET", target, headers or [("Accept", "*/*")])


def test_compilation_canonicalises_and_drops_what_cannot_act() -> None:
    r = rule(set_headers={"x-api-key": "k", "": "dropped"}, delete_headers=["x-trace", " "],
             body_replacements=[{"find": "", "replace": "x"}])
    assert r.action == "mutate" and r.phase == "before"
    assert r.set_headers == (("X-Api-Key", "k"),) and r.delete_headers == ("X-Trace",)
    assert r.body_replacements == ()  # an empty find is dropped
    assert compile_rule({"action": "allow"}, 0) is None
    # An after-phase mutation on a before rule does nothing: dropped.
    assert compile_rule({"set_response_headers": {"X-A": "1"}}, 0) is None
    assert rule(action="block").action == "block"
    assert rule(callback_id="network_hook_1").action == "allow"
    cfg = compile_rules([{"action": "allow"}, {"action": "block", "name": "b"}])
    assert [r.name for r in cfg.rules] == ["b"]


def test_matching() -> None:
    r = rule(action="block", hosts=["*.example.com", "api.test"], methods=["post"],
             path="/v1/*")
    assert r.matches("a.example.com", "POST", "/v1/chat")
    assert r.matches("api.test", "post", "/v1/x")
    assert not r.matches("example.com", "POST", "/v1/chat")  # the apex is not a subdomain
    assert not r.matches("api.test", "GET", "/v1/x")
    assert not r.matches("api.test", "POST", "/v1/a/b")  # `*` stops at '/'
    assert rule(action="block").matches("any.test", "DELETE", "")
    assert rule(action="block", path="/").matches("h.test", "GET", "")  # empty path is "/"


@pytest.mark.parametrize(("pattern", "path", "ok"), [
    ("/a/?", "/a/b", True), ("/a/?", "/a/bc", False), ("/[ab]x", "/bx", True),
    ("/[^ab]x", "/cx", True), ("/[^ab]x", "/ax", False), ("/\\*", "/*", True),
    ("/\\*", "/x", False), ("/a.b", "/aXb", False), ("*", "/x", False),
])
def test_path_glob(pattern: str, path: str, ok: bool) -> None:
    assert PathGlob(pattern).matches(path) is ok


@pytest.mark.parametrize(("path", "forms"), [
    ("/admin/x", ("/admin/x",)),
    ("//admin//x", ("//admin//x", "/admin/x")),
    ("/v1/../admin/x", ("/v1/../admin/x", "/admin/x")),
    ("/./admin/./x/", ("/./admin/./x/", "/admin/x/")),
    ("/../..", ("/../..", "/")),
    ("", ("/",)),
])
def test_path_forms(path: str, forms: tuple[str, ...]) -> None:
    assert path_forms(path) == forms


def test_block_rules_see_through_path_tricks() -> None:
    r = rule(action="block", path="/admin/*")
    for path in ("/admin/x", "//admin/x", "/v1/../admin/x", "/./admin//x"):
        assert r.matches("h.test", "GET", path), path
    v = view("/v1/%2e%2e/admin/x")
    assert v.path == "/v1/../admin/x" and r.matches("h.test", "GET", v.path)


def test_request_mutations_byte_for_byte() -> None:
    v = view(headers=[("Accept", "*/*"), ("X-Trace", "t"), ("x-api-key", "old")])
    apply_request_rule(rule(set_headers={"X-API-KEY": "new"}, delete_headers=["x-trace"],
                            set_query={"c": "a b&c", "a": "9"}, delete_query=["b"],
                            rewrite_path="/v2/caf\u00e9 50%"), v)
    assert v.headers == [("Accept", "*/*"), ("X-Api-Key", "new")]
    # sorted keys, form-encoded; the path is encoded, % included
    assert v.target == "/v2/caf%C3%A9%2050%25?a=9&c=a+b%26c"
    assert v.path == "/v2/caf\u00e9 50%" and v.changed


def test_query_untouched_without_query_rules() -> None:
    v = view("/x?z=1&a=%7e&a=2")
    apply_request_rule(rule(set_headers={"X-A": "1"}), v)
    assert v.target == "/x?z=1&a=%7e&a=2"
    apply_request_rule(rule(delete_query=["z"]), v)
    assert v.target == "/x?a=~&a=2"  # repeated keys kept, re-encoded


def test_header_values_are_utf8_on_the_wire() -> None:
    r = rule(set_headers={"X-Name": "caf\u00e9"})
    assert r.set_headers == (("X-Name", "caf\u00c3\u00a9"),)  # latin-1 view of the UTF-8


def test_callback_request_json() -> None:
    v = view(headers=[("Accept", "*/*"), ("accept", "x"), ("Authorization", "Bearer PH")])
    r = rule(callback_id="network_hook_3")
    assert callback_request(r, "before", v) == {
        "callback_id": "network_hook_3", "phase": "before", "host": "api.test",
        "method": "GET", "path": "/v1/x", "query": {"b": "2", "a": "1"},
        "request_headers": {"Accept": ["*/*", "x"], "Authorization": ["Bearer PH"]}}
    after = callback_request(r, "after", v, 200, [("Content-Type", "text/event-stream")],
                             True)
    assert after["status_code"] == 200 and after["is_sse"] is True
    assert after["response_headers"] == {"Content-Type": ["text/event-stream"]}


def test_callback_answers() -> None:
    a = parse_answer({"action": "allow", "request": {"headers": {"X-A": ["1", "2"]},
                                                     "query": {"q": "v"}, "path": "/new"}},
                     "before", "r")
    assert a.action == "mutate" and a.headers == [("X-A", "1"), ("X-A", "2")]
    v = view()
    apply_answer_to_request(a, v)
    assert v.headers == [("X-A", "1"), ("X-A", "2")]  # full replacement
    assert v.target == "/new?q=v"
    assert parse_answer({}, "before", "r").action == "allow"
    assert parse_answer({"action": "block"}, "after", "r").action == "block"
    body = base64.b64encode(b"new body").decode()
    resp = parse_answer({"response": {"headers": {"Content-Length": ["5"], "X-B": "1"},
                                      "set_body_base64": body,
                                      "body_replacements": [{"find": "a", "replace": "b"}]}},
                        "after", "r")
    assert resp.action == "mutate" and resp.headers == [("X-B", "1")]
    assert resp.set_body == b"new body" and resp.body_replacements == (Replacement(b"a", b"b"),)


@pytest.mark.parametrize(("payload", "message"), [
    ({"error": "boom"}, "the callback failed: boom"),
    ([], "something other than an object"),
    ({"action": "drop"}, "unknown action"),
    ({"request": {"headers": {"Host": ["evil.test"]}}}, "header Host cannot be changed"),
    ({"request": {"headers": {"Transfer-Encoding": "chunked"}}}, "cannot be changed"),
    ({"request": {"headers": {"X-A": ["1\r\nX-B: 2"]}}}, "contains CR, LF"),
    ({"request": {"headers": {"X A": "1"}}}, "invalid header name"),
    ({"request": {"path": "http://evil.test/"}}, "must start with a single '/'"),
    ({"request": {"query": {"a": 1}}}, "request.query must be an object of strings"),
])
def test_bad_callback_answers_fail_closed(payload: Any, message: str) -> None:
    with pytest.raises(HookError, match=None) as exc:
        parse_answer(payload, "before", "r")
    assert message in str(exc.value)


def test_bad_response_answers() -> None:
    with pytest.raises(HookError, match="not base64"):
        parse_answer({"response": {"set_body_base64": "***"}}, "after", "r")
    with pytest.raises(HookError, match="contains CR, LF"):
        parse_answer({"response": {"headers": {"X-A": "a\nb"}}}, "after", "r")


def test_response_rules() -> None:
    plan = ResponsePlan(headers=[("Content-Type", "text/plain"), ("Server", "x")])
    apply_response_rule(rule(phase="after", set_response_headers={"x-new": "1"},
                             delete_response_headers=["server"],
                             body_replacements=[{"find": "a", "replace": "bb"}]), plan)
    assert plan.headers == [("Content-Type", "text/plain"), ("X-New", "1")]
    assert plan.buffered and not plan.is_sse
    assert replace_all(b"banana", plan.replacements) == b"bbbnbbnbb"
    sse = ResponsePlan(headers=[("content-type", "Text/Event-Stream; charset=utf-8")],
                       replacements=[Replacement(b"x", b"y")])
    assert sse.is_sse and not sse.buffered


def test_sse_rewriter_streams_data_lines_only() -> None:
    rw = SseRewriter([Replacement(b"secret", b"public"), Replacement(b"pub", b"PUB")])
    out = rw.feed(b"event: secret\ndata: a secret\r\n")
    assert out == b"event: secret\ndata: a PUBlic\r\n"  # sequential, like bytes.replace
    assert rw.feed(b"data: sec") == b""  # an unfinished line is held
    assert rw.feed(b"ret\n\nid: 1\r") == b"data: PUBlic\n\n"  # a final CR may be half a CRLF
    assert rw.feed(b"\ndata:secret") == b"id: 1\r\n"
    assert rw.finish() == b"data:PUBlic"
    cr = SseRewriter([Replacement(b"a", b"b")])
    assert cr.feed(b"data: a\rdata: a\r") == b"data: b\r"  # CR-only line endings


def test_sse_rewriter_bounds_a_line() -> None:
    rw = SseRewriter([Replacement(b"a", b"b")])
    with pytest.raises(HookError):
        rw.feed(b"data: " + b"x" * MAX_SSE_LINE)


def test_hooks_rewrite_the_request_but_keep_host_and_framing() -> None:
    parsed = http1.parse_request(
        b"POST /v1/x?k=PH HTTP/1.1\r\nHost: api.test\r\nContent-Length: 3\r\n"
        b"Connection: x-custom\r\nX-Custom: guest\r\nAuthorization: Bearer PH\r\n\r\n")
    assert parsed is not None
    req = parsed[0]
    hooks = Hooks(compile_rules([
        {"set_headers": {"X-Custom": "hook"}, "rewrite_path": "/v2/y", "set_query": {"z": "1"}},
        {"phase": "after", "action": "block", "path": "/nope"},
    ]))
    out = asyncio.run(hooks.before(req, "api.test"))
    assert isinstance(out, RequestView)
    assert req.serialize() == (
        b"POST /v2/y?k=PH&z=1 HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer PH\r\n"
        b"X-Custom: hook\r\nContent-Length: 3\r\n\r\n")
    assert hooks.matching_after(out) == []
