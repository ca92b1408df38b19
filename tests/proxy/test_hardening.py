"""Issue 9 on loopback, as a hostile guest would try it: fronting through almost-HTTP, raw TCP
where only the web is allowed, oversized first lines, placeholders in raw bytes, and secret
values coming back through every way a response can carry them."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest
from proxy_testutil import LenientOrigin, Rig
from test_proxy import ProxiedHTTPS, get, https_setup, last_event
from websockets.sync.client import connect as ws_connect

from matchlock.net.secrets import SecretSet, make_secret

pytestmark = pytest.mark.timeout(60)

VALUE = "the-real-secret-value-42"


@pytest.fixture(scope="module")
def lenient() -> Iterator[LenientOrigin]:
    origin = LenientOrigin()
    yield origin
    origin.close()


def exchange(port: int, data: bytes, *, timeout: float = 5) -> bytes:
    """Send `data` on a fresh connection, read until close/reset/timeout."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    out = b""
    try:
        s.sendall(data)
        while chunk := s.recv(65536):
            out += chunk
            if b"vhost=" in out or (b"X-Matchlock-Blocked" in out and out.endswith(b"\n")):
                break
    except (ConnectionResetError, TimeoutError, BrokenPipeError):
        pass
    finally:
        s.close()
    return out


FRONTING = [
    b"GET  / HTTP/1.1\r\nHost: evil.test\r\n\r\n",  # two spaces (the reported example)
    b"GET\t/ HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    b"GET /\t HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    b" GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    b"GET / HTTP/1.1 \r\nHost: evil.test\r\n\r\n",
    b"GET\x0b/ HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n",  # well-formed: 403 for the Host mismatch
]


@pytest.mark.parametrize("request_bytes", FRONTING)
def test_almost_http_never_reaches_another_vhost(
    rig: Rig, lenient: LenientOrigin, request_bytes: bytes
) -> None:
    # The origin itself takes the spelling and routes it by Host (so the test can fail)…
    direct = exchange(lenient.port, request_bytes)
    assert b"vhost=evil.test" in direct, direct
    # …but through the proxy, with only front.test allowed on that port, it never gets there.
    port = lenient.port
    rig.configure([f"front.test:{port}"], pins=["front.test:127.0.0.1"])
    rig.aim("front.test", port)
    before = len(lenient.served)
    got = exchange(rig.proxy_port, request_bytes)
    assert got.startswith((b"HTTP/1.1 400", b"HTTP/1.1 403")), got
    assert b"X-Matchlock-Blocked: 1" in got
    assert lenient.served[before:] == []
    assert last_event(rig).action == "block"


@pytest.mark.parametrize("request_bytes", FRONTING[:3])
def test_almost_http_dribbled_byte_by_byte_is_still_http(
    rig: Rig, lenient: LenientOrigin, request_bytes: bytes
) -> None:
    port = lenient.port
    rig.configure([f"front.test:{port}"], pins=["front.test:127.0.0.1"])
    rig.aim("front.test", port)
    before = len(lenient.served)
    s = socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=5)
    got = b""
    try:
        for i in range(len(request_bytes)):
            s.sendall(request_bytes[i : i + 1])
            time.sleep(0.002)
        got = s.recv(4096)
    except (ConnectionResetError, BrokenPipeError):
        pass
    s.close()
    assert got.startswith((b"HTTP/1.1 400", b"HTTP/1.1 403")), got
    assert lenient.served[before:] == []


def test_raw_tcp_only_where_the_port_was_named(rig: Rig) -> None:
    # `echo.test` (no port) opens 80 and 443 for HTTP and TLS; raw bytes there are refused.
    rig.configure(["echo.test"], pins=["echo.test:127.0.0.1"])
    rig.aim("echo.test", 80)
    s = socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=5)
    s.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
    with pytest.raises((ConnectionResetError, TimeoutError)):
        assert s.recv(100) == b""
    ev = last_event(rig)
    assert ev.action == "block" and "only HTTP and TLS may go to port 80" in ev.reason
    assert "echo.test:80" in ev.reason  # says how to allow it
    # Named explicitly, the same bytes are spliced (to the echo server's port here).
    rig.configure([f"echo.test:{rig.echo_port}"], pins=["echo.test:127.0.0.1"])
    rig.aim("echo.test", rig.echo_port)
    s = socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=5)
    s.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
    assert s.recv(100) == b"SSH-2.0-OpenSSH_9.2\r\n"
    s.close()


def test_a_silent_guest_on_a_web_port_does_not_go_raw(rig: Rig) -> None:
    rig.configure(["echo.test"], pins=["echo.test:127.0.0.1"], sniff_wait=0.05)
    rig.aim("echo.test", 80)
    s = socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=5)
    time.sleep(0.3)  # silence: on a named port this would become raw TCP
    s.sendall(b"GET  / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 400")  # still parsed as HTTP, and refused


def test_request_after_a_pause_without_a_server_greeting_is_refused(rig: Rig) -> None:
    rig.configure([f"echo.test:{rig.echo_port}"], pins=["echo.test:127.0.0.1"], sniff_wait=0.05)
    rig.aim("echo.test", rig.echo_port)
    s = socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=5)
    time.sleep(0.3)  # the echo server says nothing: no server-speaks-first protocol here
    s.sendall(b"EHLO  / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    with pytest.raises((ConnectionResetError, TimeoutError)):
        assert s.recv(100) == b""
    assert "after a pause, the server silent" in last_event(rig).reason


@pytest.mark.parametrize("piece", [1, 100, 4096])
def test_oversized_first_line_is_refused_whatever_the_timing(rig: Rig, piece: int) -> None:
    rig.configure([f"echo.test:{rig.echo_port}"], pins=["echo.test:127.0.0.1"])
    rig.aim("echo.test", rig.echo_port)
    data = b"A" * 9000  # a token that never ends
    s = socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=10)
    got = b""
    try:
        for i in range(0, len(data), piece):
            s.sendall(data[i : i + piece])
            if piece < 4096 and i % 2048 == 0:
                time.sleep(0.01)
        got = s.recv(4096)
    except (ConnectionResetError, BrokenPipeError):
        pass
    s.close()
    assert not got.startswith(b"AAAA")  # never echoed: never spliced
    assert got.startswith(b"HTTP/1.1 414") or got == b"", got


def test_placeholder_in_raw_tcp_is_refused_and_audited(rig: Rig) -> None:
    secret = make_secret("API_KEY", VALUE, ["echo.test"])
    rig.configure([f"echo.test:{rig.echo_port}"], pins=["echo.test:127.0.0.1"],
                  secrets=SecretSet([secret]))
    rig.aim("echo.test", rig.echo_port)
    s = socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=5)
    s.sendall(b"\x00\x01binary then ")
    assert s.recv(100) == b"\x00\x01binary then "
    ph = secret.placeholder.encode()
    got = b""
    # Split across writes: the first piece passes (a prefix of a placeholder is nothing; raw
    # bytes are never held back, that would stall protocols), the completing one does not.
    s.sendall(ph[:10])
    got += s.recv(100)
    with pytest.raises((ConnectionResetError, BrokenPipeError, TimeoutError)):
        s.sendall(ph[10:] + b"\n")
        time.sleep(0.05)
        got += s.recv(100)
        assert s.recv(100) == b""
    assert got == ph[:10]
    ev = last_event(rig)
    assert ev.action == "block" and "API_KEY" in ev.reason and "raw TCP" in ev.reason


# --- secret values must not come back ----------------------------------------------------


def _secret_rig(rig: Rig) -> str:
    secret = make_secret("API_KEY", VALUE, ["origin.test"])
    https_setup(rig, secrets=SecretSet([secret]))
    return secret.placeholder


def test_value_split_across_chunks_and_trailers_is_masked(rig: Rig) -> None:
    placeholder = _secret_rig(rig)
    s = socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=10)
    ctx = rig.client_context()
    with ctx.wrap_socket(s, server_hostname="origin.test") as tls:
        tls.sendall(
            f"GET /echo-split HTTP/1.1\r\nHost: origin.test:{rig.https.port}\r\n"
            f"Authorization: {placeholder}\r\nConnection: close\r\n\r\n".encode()
        )
        raw = b""
        while chunk := tls.recv(65536):
            raw += chunk
    assert rig.https.seen[-1].headers["authorization"] == VALUE  # the origin got the value
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    # Decode the chunked body as a client would.
    payload, rest = b"", body
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        payload += rest[:size]
        rest = rest[size + 2 :]
    assert payload == b"*" * len(VALUE)
    assert VALUE.encode() not in raw  # not in chunk extensions or trailers either
    for cut in range(4, len(VALUE)):  # nor any long piece of it
        assert VALUE[:cut].encode() + b"\r\n" not in raw or cut < 8


def test_value_in_an_interim_1xx_head_is_masked(rig: Rig) -> None:
    placeholder = _secret_rig(rig)
    s = socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=10)
    with rig.client_context().wrap_socket(s, server_hostname="origin.test") as tls:
        tls.sendall(
            f"GET /hints HTTP/1.1\r\nHost: origin.test:{rig.https.port}\r\n"
            f"Authorization: {placeholder}\r\nConnection: close\r\n\r\n".encode()
        )
        raw = b""
        while chunk := tls.recv(65536):
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 103")
    assert b"Link: <" + b"*" * len(VALUE) + b">" in raw
    assert VALUE.encode() not in raw and raw.endswith(b"ok")


def test_websocket_upgrade_head_and_frames_are_masked(rig: Rig) -> None:
    placeholder = _secret_rig(rig)
    raw = socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=10)
    with ws_connect(
        f"wss://origin.test:{rig.https.port}/ws",
        sock=raw,
        ssl=rig.client_context(),
        server_hostname="origin.test",
        additional_headers={"Authorization": placeholder, "X-Ws-Echo-Auth": "1"},
    ) as ws:
        assert ws.response is not None
        assert ws.response.headers["X-Echo"] == "*" * len(VALUE)
        # Compression was not offered upstream, so frames are plain bytes the mask can read.
        assert "X-Offered-Extensions" not in ws.response.headers
        first = ws.recv(timeout=5)  # two fragments joined, a ping between them
        assert first == "*" * len(VALUE)
        ws.send("still works " + "x" * 200)
        assert ws.recv(timeout=5) == "still works " + "x" * 200
    assert rig.https.seen[-1].headers["authorization"] == VALUE


def test_echo_in_plain_body_still_masked_and_framing_intact(rig: Rig) -> None:
    placeholder = _secret_rig(rig)
    conn = ProxiedHTTPS(rig, "origin.test", rig.https.port)
    status, body = get(conn, "/echo", Authorization=placeholder)
    assert status == 200
    assert json.loads(body)["headers"]["authorization"] == "*" * len(VALUE)
    assert get(conn, "/echo")[0] == 200  # keep-alive still in sync


# --- resources -------------------------------------------------------------------------------


def test_connection_cap_refuses_with_one_audit_event_and_recovers(rig: Rig) -> None:
    rig.configure([f"echo.test:{rig.echo_port}"], pins=["echo.test:127.0.0.1"],
                  max_connections=5)
    rig.aim("echo.test", rig.echo_port)
    held_open = []
    for i in range(5):
        s = socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=5)
        s.sendall(b"\x00hold %d" % i)
        assert s.recv(100) == b"\x00hold %d" % i
        held_open.append(s)
    refused = 0
    for _ in range(20):  # a guest looping on connect
        try:
            with socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=5) as s:
                s.sendall(b"\x00more")
                if s.recv(100) == b"":
                    refused += 1
        except (ConnectionResetError, BrokenPipeError):
            refused += 1
    assert refused == 20
    caps = [e for e in rig.audit.events if "too many connections" in e.reason]
    assert 1 <= len(caps) <= 2  # one event per second, not one per attempt
    assert "limit is 5 (--max-connections)" in caps[0].reason
    for s in held_open:
        s.close()
    time.sleep(0.2)
    s = socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=5)
    s.sendall(b"\x00again")
    assert s.recv(100) == b"\x00again"  # capacity is back once connections close
    s.close()


def test_soft_fd_limit_is_raised_and_caps_the_connections() -> None:
    import subprocess
    import sys

    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096))\n"
        "from matchlock.net.limits import connection_cap, raise_nofile_limit\n"
        "soft = raise_nofile_limit()\n"
        "print(soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0], connection_cap(512, soft),"
        " connection_cap(512, 1024), connection_cap(100, 1 << 20))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["4096", "4096", "512", "384", "100"]


def test_short_client_first_message_on_a_named_port_is_relayed(rig: Rig) -> None:
    # `x` could still become `x / HTTP/1.1`: on a port named for raw TCP it is forwarded
    # after a short pause (a prefix is no request), under a guard that stays on.
    rig.configure([f"echo.test:{rig.echo_port}"], pins=["echo.test:127.0.0.1"], sniff_wait=0.05)
    rig.aim("echo.test", rig.echo_port)
    s = socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=5)
    s.sendall(b"x")
    assert s.recv(10) == b"x"
    # …and the guard is still on: the line turning into a request line is refused.
    with pytest.raises((ConnectionResetError, BrokenPipeError, TimeoutError)):
        s.sendall(b"yz  / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
        time.sleep(0.1)
        assert s.recv(100) == b""
    assert "http after a pause" in last_event(rig).reason


def test_short_message_on_a_web_port_waits_for_a_request(rig: Rig) -> None:
    rig.configure(["echo.test"], pins=["echo.test:127.0.0.1"], sniff_wait=0.05)
    rig.aim("echo.test", 80)
    s = socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=5)
    s.sendall(b"GE")
    time.sleep(0.3)  # not raw: still waiting for the request line
    s.sendall(b"T  / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 400")


def test_a_silent_connection_to_a_denied_port_is_reset_at_once_with_the_reason(rig: Rig) -> None:
    rig.configure(["echo.test"], pins=["echo.test:127.0.0.1"], sniff_wait=0.05)
    rig.aim("echo.test", 25)
    s = socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=5)
    started = time.monotonic()
    with pytest.raises((ConnectionResetError, TimeoutError)):
        assert s.recv(100) == b""
    assert time.monotonic() - started < 2  # not the 10 s a request line may take
    ev = last_event(rig)
    assert ev.action == "block" and "port 25 is not allowed" in ev.reason
