"""Runtime allow-list deletes on the loopback rig: tunnels (raw TCP, WebSocket) that the
policy no longer allows are cut; those it still allows, and HTTP connections, stay."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from proxy_testutil import Rig
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect


def _revoke(rig: Rig, *hosts: str) -> int:
    rig.policy.remove(hosts)

    async def run() -> int:
        return rig.proxy.revoke()

    return int(rig.call(run()))


def test_raw_tunnel_is_cut_when_its_entry_goes(rig: Rig) -> None:
    entry = f"echo.test:{rig.echo_port}"
    rig.configure([entry, "other.test"], pins=["echo.test:127.0.0.1"])
    rig.aim("echo.test", rig.echo_port)
    with socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=5) as s:
        s.sendall(b"SSH-2.0-test\r\n")
        assert s.recv(100) == b"SSH-2.0-test\r\n"
        assert _revoke(rig, "other.test") == 0  # still allowed: kept
        s.sendall(b"\x00\x01")
        assert s.recv(100) == b"\x00\x01"
        assert _revoke(rig, entry) == 1
        with pytest.raises(ConnectionResetError):
            s.sendall(b"\x00\x02")
            for _ in range(50):
                if not s.recv(100):
                    raise AssertionError("EOF instead of a reset")
                time.sleep(0.01)
    assert any(e.action == "block" and e.reason.startswith("allow-list changed")
               for e in rig.audit.events)
    # New connections are refused too (the policy is read per connection).
    with socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=5) as s:
        s.sendall(b"SSH-2.0-test\r\n")
        with pytest.raises(ConnectionResetError):
            s.recv(100)


def test_websocket_is_cut_when_its_host_goes(rig: Rig) -> None:
    entry = f"origin.test:{rig.http.port}"
    rig.configure([entry], pins=["origin.test:127.0.0.1"])
    rig.aim("origin.test", rig.http.port)
    raw = socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=10)
    with ws_connect(f"ws://origin.test:{rig.http.port}/ws", sock=raw) as ws:
        ws.send("before")
        assert ws.recv(timeout=5) == "before"
        assert _revoke(rig, entry) == 1
        with pytest.raises(ConnectionClosed):
            ws.send("after")
            ws.recv(timeout=5)


def test_kept_alive_http_gets_403_on_its_next_request(rig: Rig) -> None:
    entry = f"origin.test:{rig.http.port}"
    rig.configure([entry], pins=["origin.test:127.0.0.1"])
    rig.aim("origin.test", rig.http.port)
    req = f"GET / HTTP/1.1\r\nHost: origin.test:{rig.http.port}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=10) as s:
        s.sendall(req)
        assert _response(s).startswith(b"HTTP/1.1 200")
        assert _revoke(rig, entry) == 0  # not a tunnel: nothing to cut
        s.sendall(req)
        answer = _response(s)
        assert answer.startswith(b"HTTP/1.1 403"), answer
        assert b"X-Matchlock-Blocked: 1" in answer


def _response(s: socket.socket) -> bytes:
    """One whole response with a Content-Length (what stays unread would shift the next)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += s.recv(65536)
    assert len(body) == length
    return head + b"\r\n\r\n" + body


def test_request_body_in_flight_is_cut(rig: Rig) -> None:
    # An endless upload started before the delete must not go on after it.
    entry = f"origin.test:{rig.http.port}"
    rig.configure([entry], pins=["origin.test:127.0.0.1"])
    rig.aim("origin.test", rig.http.port)
    with socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=10) as s:
        s.sendall(f"POST /echo HTTP/1.1\r\nHost: origin.test:{rig.http.port}\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".encode())
        time.sleep(0.3)  # the head and first chunk went upstream; the body goes on
        assert _revoke(rig, entry) == 1
        with pytest.raises(ConnectionResetError):
            for _ in range(100):
                s.sendall(b"5\r\nworld\r\n")
                time.sleep(0.01)
    assert not any(seen.method == "POST" for seen in rig.http.seen)


def test_http2_stream_in_flight_is_cut(rig: Rig) -> None:
    rig.configure([f"origin.test:{rig.https.port}"], pins=["origin.test:127.0.0.1"])
    rig.aim("origin.test", rig.https.port)
    url = f"https://127.0.0.1:{rig.proxy_port}/sse"
    with (httpx.Client(http2=True, verify=rig.client_context(), timeout=10) as client,
          client.stream("GET", url, headers={"Host": f"origin.test:{rig.https.port}"},
                        extensions={"sni_hostname": "origin.test"}) as r):
        assert r.http_version == "HTTP/2" and r.status_code == 200
        chunks = r.iter_raw()
        assert b"event 0" in next(chunks)
        assert _revoke(rig, f"origin.test:{rig.https.port}") == 1
        with pytest.raises(httpx.HTTPError):
            for _ in chunks:
                pass
