"""Network hook rules in the proxy on loopback: real TLS, real origins, HTTP/1.1 and HTTP/2,
callbacks over a real unix socket (the SDK's own callback server)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from proxy_testutil import Rig

from matchlock.net.hookrun import Hooks
from matchlock.net.hooks import MAX_BODY, compile_rules
from matchlock.net.secrets import SecretSet, make_secret
from matchlock.sdk.hooks import HookServer
from matchlock.sdk.types import (
    NetworkBodyTransform,
    NetworkHookRequest,
    NetworkHookRequestMutation,
    NetworkHookResponseMutation,
    NetworkHookResult,
    NetworkHookRule,
)

pytestmark = pytest.mark.timeout(60)
PROTOCOLS = ["http/1.1", "h2"]


class ProxiedHTTPS(http.client.HTTPSConnection):
    def __init__(self, rig: Rig, host: str, port: int) -> None:
        super().__init__(host, port, context=rig.client_context(), timeout=10)
        self._proxy = ("127.0.0.1", rig.proxy_port)

    def connect(self) -> None:
        sock = socket.create_connection(self._proxy, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def setup(rig: Rig, rules: list[dict[str, Any]], socket_path: str = "",
          secrets: SecretSet | None = None) -> None:
    port = rig.https.port
    rig.configure([f"origin.test:{port}", f"other.test:{port}"],
                  pins=["origin.test:127.0.0.1", "other.test:127.0.0.1"], secrets=secrets,
                  hooks=Hooks(compile_rules(rules, socket_path)))
    rig.aim("origin.test", port)


def fetch(rig: Rig, proto: str, path: str, method: str = "GET", body: bytes | None = None,
          **headers: str) -> tuple[int, dict[str, str], bytes]:
    """One request through the proxy: (status, lower-cased headers, body)."""
    if proto == "h2":
        with httpx.Client(http2=True, verify=rig.client_context(), timeout=10) as client:
            r = client.request(
                method, f"https://127.0.0.1:{rig.proxy_port}{path}", content=body,
                headers={"Host": f"origin.test:{rig.https.port}", **headers},
                extensions={"sni_hostname": "origin.test"})
            assert r.http_version == "HTTP/2"
            return r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content
    conn = ProxiedHTTPS(rig, "origin.test", rig.https.port)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def events(rig: Rig, action: str) -> list[Any]:
    for _ in range(200):
        found = [e for e in rig.audit.events if e.action == action]
        if found:
            return found
        time.sleep(0.01)
    return []


@contextmanager
def callbacks(*rules: NetworkHookRule) -> Iterator[HookServer]:
    server = HookServer(list(rules), [f"network_hook_{i + 1}" for i in range(len(rules))])
    try:
        yield server
    finally:
        server.close()


# -- static rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_before_mutations_reach_the_origin(rig: Rig, proto: str) -> None:
    setup(rig, [
        {"name": "tag", "hosts": ["origin.test"], "methods": ["GET"], "path": "/v1/*",
         "set_headers": {"x-tag": "t1", "X-Replaced": "new"}, "delete_headers": ["x-drop"],
         "set_query": {"added": "a b"}, "delete_query": ["gone"], "rewrite_path": "/echo"},
        {"name": "elsewhere", "hosts": ["other.test"], "set_headers": {"X-Other": "1"}},
    ])
    status, _, body = fetch(rig, proto, "/v1/x?keep=1&gone=2", **{
        "X-Drop": "d", "X-Replaced": "old", "X-Kept": "k"})
    assert status == 200
    seen = json.loads(body)
    assert seen["target"] == "/echo?added=a+b&keep=1"
    h = seen["headers"]
    assert (h["x-tag"], h["x-replaced"], h["x-kept"]) == ("t1", "new", "k")
    assert "x-drop" not in h and "x-other" not in h
    assert h["host"] == f"origin.test:{rig.https.port}"
    ev = events(rig, "allow")[-1]
    assert ev.reason.endswith("; hooks: tag") and ev.path == "/v1/x"
    # Not matching (path): untouched.
    _, _, body = fetch(rig, proto, "/echo?gone=2", **{"X-Drop": "d"})
    seen = json.loads(body)
    assert seen["target"] == "/echo?gone=2" and seen["headers"]["x-drop"] == "d"


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_before_block_is_a_403_with_an_audit_event(rig: Rig, proto: str) -> None:
    setup(rig, [{"name": "no-delete", "methods": ["DELETE"], "action": "block"}])
    before = len(rig.https.seen)
    status, headers, body = fetch(rig, proto, "/echo", method="DELETE")
    assert status == 403 and headers["x-matchlock-blocked"] == "1"
    assert b"blocked by network hook no-delete (before phase, the rule)" in body
    assert len(rig.https.seen) == before  # never reached the origin
    ev = events(rig, "block")[-1]
    assert ev.status == 403 and "no-delete" in ev.reason and ev.method == "DELETE"
    assert fetch(rig, proto, "/echo")[0] == 200


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_hooks_see_placeholders_and_cannot_move_them(rig: Rig, proto: str) -> None:
    """A hook's own headers meet the same secret scoping as the guest's: a placeholder is
    replaced for its hosts only, and refused anywhere else."""
    tok = make_secret("TOK", "value-of-tok-1234", ["origin.test"])
    other = make_secret("OTHER", "value-of-other-5678", ["elsewhere.test"])
    setup(rig, [
        {"name": "fine", "path": "/echo", "set_headers": {"X-Tok": tok.placeholder}},
        {"name": "smuggle", "path": "/smuggle",
         "set_headers": {"X-Other": other.placeholder}},
    ], secrets=SecretSet([tok, other]))
    status, _, body = fetch(rig, proto, "/echo")
    assert status == 200 and rig.https.seen[-1].headers["x-tok"] == "value-of-tok-1234"
    assert b"value-of-tok" not in body  # masked on the way back
    before = len(rig.https.seen)
    status, _, body = fetch(rig, proto, "/smuggle")
    assert status == 403 and b"secret placeholder of OTHER" in body
    assert len(rig.https.seen) == before


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_after_headers_and_whole_body_replacement(rig: Rig, proto: str) -> None:
    setup(rig, [{"name": "rewrite", "phase": "after", "path": "/echo",
                 "set_response_headers": {"x-hooked": "yes"},
                 "delete_response_headers": ["content-type"],
                 "body_replacements": [{"find": "origin.test", "replace": "REDACTED-HOST"},
                                       {"find": "REDACTED", "replace": "R"}]}])
    status, headers, body = fetch(rig, proto, "/echo", **{"Accept-Encoding": "gzip"})
    assert status == 200 and headers["x-hooked"] == "yes" and "content-type" not in headers
    assert b"origin.test" not in body and b"R-HOST" in body
    assert int(headers["content-length"]) == len(body)
    seen = json.loads(body)
    assert "accept-encoding" not in seen["headers"]  # a body rule asks for plain bytes
    # Chunked upstream body, made whole with a Content-Length.
    setup(rig, [{"phase": "after", "body_replacements": [{"find": "world", "replace": "hooks"}]}])
    status, headers, body = fetch(rig, proto, "/chunked")
    assert (status, body) == (200, b"hello, hooks") and headers["content-length"] == "12"


def test_http1_keep_alive_survives_rewritten_responses(rig: Rig) -> None:
    setup(rig, [{"phase": "after", "path": "/chunked",
                 "body_replacements": [{"find": "hello", "replace": "bye"}]},
                {"phase": "after", "path": "/echo", "set_response_headers": {"X-A": "1"}}])
    conn = ProxiedHTTPS(rig, "origin.test", rig.https.port)
    for path, want in (("/chunked", b"bye, world"), ("/echo", None), ("/chunked", b"bye, world")):
        conn.request("GET", path)
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200
        if want is not None:
            assert data == want
        else:
            assert resp.getheader("X-A") == "1" and json.loads(data)["target"] == "/echo"
    conn.close()


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_rewrites_cannot_unmask_an_echoed_value(rig: Rig, proto: str) -> None:
    """An innocent replacement (`-` → `_`) applied to an echoed value would produce a form
    the mask no longer knows: values are masked before the replacements too."""
    tok = make_secret("TOK", "value-of-tok-1234", ["origin.test"])
    setup(rig, [{"phase": "after", "body_replacements": [{"find": "-", "replace": "_"},
                                                         {"find": "*", "replace": "#"}]}],
          secrets=SecretSet([tok]))
    for path in ("/echo", "/sse-echo"):
        status, _, body = fetch(rig, proto, path, Authorization=tok.placeholder)
        assert status == 200 and rig.https.seen[-1].headers["authorization"] == tok.value
        assert b"value" not in body and b"#################" in body, body


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_after_block(rig: Rig, proto: str) -> None:
    setup(rig, [{"name": "hide", "phase": "after", "path": "/echo", "action": "block"}])
    status, _, body = fetch(rig, proto, "/echo")
    assert status == 403 and b"network hook hide (after phase" in body
    assert events(rig, "block")[-1].reason.startswith("blocked by network hook hide")


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_body_beyond_the_limit_fails_closed(rig: Rig, proto: str) -> None:
    setup(rig, [{"phase": "after", "body_replacements": [{"find": "a", "replace": "b"}]}])
    status, _, body = fetch(rig, proto, f"/big/{MAX_BODY + 1}")
    assert status == 502 and b"exceeds" in body
    ev = events(rig, "block")[-1]
    assert ev.status == 502 and "whole response body" in ev.reason
    # A response no rule rewrites streams as before, whatever its size.
    setup(rig, [{"phase": "after", "path": "/echo",
                 "body_replacements": [{"find": "a", "replace": "b"}]}])
    status, _, body = fetch(rig, proto, f"/big/{MAX_BODY + 1}")
    assert status == 200 and len(body) == MAX_BODY + 1


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_encoded_bodies_are_not_rewritten_blindly(rig: Rig, proto: str) -> None:
    """A redaction rule cannot be skipped by an origin that compresses: 502."""
    setup(rig, [{"name": "redact", "phase": "after",
                 "body_replacements": [{"find": "secret", "replace": "xxxxxx"}]}])
    status, _, body = fetch(rig, proto, "/gzip")
    assert status == 502 and b"Content-Encoding: gzip" in body
    assert events(rig, "block")[-1].status == 502
    # Headers-only rules leave it alone.
    setup(rig, [{"phase": "after", "set_response_headers": {"X-A": "1"}}])
    status, headers, body = fetch(rig, proto, "/gzip")
    assert status == 200 and headers["x-a"] == "1"


def test_sse_replacement_is_streamed_http1(rig: Rig) -> None:
    setup(rig, [{"phase": "after", "path": "/sse",
                 "body_replacements": [{"find": "event", "replace": "EVT"}]}])
    rig.https.sse_sent.clear()
    got = rig.get_sse_http1()
    data = b"".join(c for _, c in got)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-length" not in head.lower() and b"Transfer-Encoding: chunked" in head
    assert b"data: EVT 0\n\n" in body
    assert b"data: event" not in data and data.count(b"data: EVT ") == 4
    arrivals = [t for t, c in got if b"data: EVT" in c]
    assert len(arrivals) == 4
    for sent, received in zip(rig.https.sse_sent, arrivals, strict=True):
        assert 0 <= received - sent < 0.15, received - sent  # events are 0.2 s apart


def test_sse_replacement_is_streamed_h2(rig: Rig) -> None:
    setup(rig, [{"phase": "after", "path": "/sse",
                 "body_replacements": [{"find": "event", "replace": "EVT"}]}])
    rig.https.sse_sent.clear()
    arrivals: list[float] = []
    text = b""
    with httpx.Client(http2=True, verify=rig.client_context(), timeout=10) as client, \
            client.stream("GET", f"https://127.0.0.1:{rig.proxy_port}/sse",
                          headers={"Host": f"origin.test:{rig.https.port}"},
                          extensions={"sni_hostname": "origin.test"}) as r:
        assert r.http_version == "HTTP/2" and "content-length" not in r.headers
        for chunk in r.iter_raw():
            text += chunk
            if b"data: EVT" in chunk:
                arrivals.append(time.monotonic())
    assert text == b"".join(b"data: EVT %d\n\n" % i for i in range(4))
    assert len(arrivals) == 4
    for sent, received in zip(rig.https.sse_sent, arrivals, strict=True):
        assert 0 <= received - sent < 0.15, received - sent


# -- callbacks ----------------------------------------------------------------------------


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_callbacks_see_placeholders_and_mutate(rig: Rig, proto: str) -> None:
    tok = make_secret("TOK", "value-of-tok-1234", ["origin.test"])
    seen: list[NetworkHookRequest] = []

    def before(req: NetworkHookRequest) -> NetworkHookResult:
        seen.append(req)
        headers = dict(req.request_headers or {})
        headers["X-From-Callback"] = ["1"]
        return NetworkHookResult(request=NetworkHookRequestMutation(
            headers=headers, query={"q": "from-callback"}, path="/echo"))

    def after(req: NetworkHookRequest) -> NetworkHookResult:
        seen.append(req)
        return NetworkHookResult(response=NetworkHookResponseMutation(
            headers={"X-After": ["yes"], **(req.response_headers or {})},
            body_replacements=[NetworkBodyTransform(find="ok", replace="OK!")]))

    with callbacks(NetworkHookRule(name="b", phase="before", path="/anything", hook=before),
                   NetworkHookRule(name="a", phase="after", path="/echo-header",
                                   hook=after)) as server:
        rules = [{"name": "b", "phase": "before", "path": "/anything",
                  "callback_id": "network_hook_1"},
                 {"name": "a", "phase": "after", "path": "/echo-header",
                  "callback_id": "network_hook_2", "timeout_ms": 5000}]
        setup(rig, rules, server.path, SecretSet([tok]))
        status, _, body = fetch(rig, proto, "/anything?q=guest",
                                Authorization=f"Bearer {tok.placeholder}")
        assert status == 200
        origin = rig.https.seen[-1]
        assert origin.target == "/echo?q=from-callback"
        assert origin.headers["x-from-callback"] == "1"
        assert origin.headers["authorization"] == "Bearer value-of-tok-1234"
        b = seen[-1]
        assert (b.phase, b.host, b.method, b.path, b.query) == (
            "before", "origin.test", "GET", "/anything", {"q": "guest"})
        assert b.request_headers is not None
        assert b.request_headers["Authorization"] == [f"Bearer {tok.placeholder}"]
        # After phase: the response headers it gets are masked, the body is rewritten.
        status, headers, body = fetch(rig, proto, "/echo-header",
                                      Authorization=tok.placeholder)
        assert status == 200 and body == b"OK!" and headers["x-after"] == "yes"
        a = seen[-1]
        assert a.phase == "after" and a.status_code == 200 and not a.is_sse
        assert a.response_headers is not None
        assert a.response_headers["X-Echo"] == ["*****************"]
        assert all("value-of-tok" not in json.dumps(vars(r)) for r in seen)
        assert headers["x-echo"] == "*****************"


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_callback_block_and_set_body(rig: Rig, proto: str) -> None:
    def decide(req: NetworkHookRequest) -> NetworkHookResult:
        return NetworkHookResult(action="block" if req.method == "DELETE" else "allow")

    def body(req: NetworkHookRequest) -> NetworkHookResult:
        return NetworkHookResult(response=NetworkHookResponseMutation(set_body=b"replaced"))

    with callbacks(NetworkHookRule(hook=decide), NetworkHookRule(phase="after", hook=body)
                   ) as server:
        setup(rig, [{"name": "gate", "callback_id": "network_hook_1"},
                    {"phase": "after", "path": "/echo", "callback_id": "network_hook_2"}],
              server.path)
        status, _, text = fetch(rig, proto, "/x", method="DELETE")
        assert status == 403 and b"network hook gate (before phase, its callback)" in text
        status, headers, text = fetch(rig, proto, "/echo")
        assert (status, text, headers["content-length"]) == (200, b"replaced", "8")


def _raises(req: NetworkHookRequest) -> NetworkHookResult:
    raise RuntimeError("hook bug")


def _slow(req: NetworkHookRequest) -> NetworkHookResult:
    time.sleep(2)
    return NetworkHookResult()


@pytest.mark.parametrize("proto", PROTOCOLS)
@pytest.mark.parametrize(("hook", "timeout_ms", "reason"), [
    (_raises, 0, "the callback failed: RuntimeError: hook bug"),
    (_slow, 300, "the callback did not answer within 300 ms"),
])
def test_failing_callbacks_fail_closed(rig: Rig, proto: str, hook: Any, timeout_ms: int,
                                       reason: str) -> None:
    with callbacks(NetworkHookRule(hook=hook)) as server:
        setup(rig, [{"name": "h", "callback_id": "network_hook_1", "timeout_ms": timeout_ms}],
              server.path)
        before = len(rig.https.seen)
        started = time.monotonic()
        status, _, body = fetch(rig, proto, "/echo")
        assert status == 502 and reason.encode() in body
        assert time.monotonic() - started < 1.5
        assert len(rig.https.seen) == before
        ev = events(rig, "block")[-1]
        assert ev.status == 502 and reason in ev.reason


@pytest.mark.parametrize("reply", [b"", b"not json\n", b'{"action": "mutate", "request": '
                                   b'{"headers": {"Host": ["other.test"]}}}\n'])
def test_broken_callback_servers_fail_closed(rig: Rig, reply: bytes) -> None:
    """No answer, garbage, or an answer that would redirect: 502, never through."""
    path = os.path.join(tempfile.mkdtemp(prefix="hooktest-"), "hook.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    try:
        setup(rig, [{"name": "h", "callback_id": "network_hook_1"}], path)
        before = len(rig.https.seen)
        status, _, body = fetch(rig, "http/1.1", "/echo")
        assert status == 502 and b"network hook h" in body
        assert len(rig.https.seen) == before
    finally:
        listener.close()
        os.unlink(path)
    # The socket gone altogether.
    status, _, body = fetch(rig, "http/1.1", "/echo")
    assert status == 502 and b"the callback failed" in body
