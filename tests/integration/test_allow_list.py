"""`matchlock allow-list add|delete` on a running detached sandbox, with a real VM and the
tests' upstream namespace (10.99.0.0/24; run under `flock /tmp/ml-netns.lock`).

The sandbox starts with networking and an empty allow-list (nothing reachable), is opened
with `add`, and closed again with `delete` while a guest process holds a kept-alive HTTP
connection and a raw TCP connection open: the next request on the first gets a 403, the second
is cut, and a new connection to the name's (cached) address is refused."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import MATCHLOCK
from .test_network import UPSTREAM, Upstream, upstream  # noqa: F401 (a fixture)

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]
Run = Callable[..., subprocess.CompletedProcess[bytes]]

FETCH = """
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=20) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception as e:
    print("ERR", type(e).__name__)
"""

# Holds a kept-alive HTTP connection and a raw TCP connection across the host's `delete`.
HOLD = """
import http.client, os, socket, time
c = http.client.HTTPConnection("api.test", 80, timeout=20)
c.request("GET", "/before-delete")
r = c.getresponse(); r.read()
first, addr = c.sock, c.sock.getpeername()[0]
t = socket.create_connection(("api.test", 7), timeout=20)
t.sendall(b"one")
print(r.status, t.recv(10).decode(), flush=True)
while not os.path.exists("/tmp/go"):
    time.sleep(0.05)
c.request("GET", "/after-delete-kept-alive")
same = c.sock is first
r = c.getresponse(); r.read()
print(r.status, same, r.getheader("X-Matchlock-Blocked"), flush=True)
try:
    t.sendall(b"two")
    print("TCP", t.recv(10).decode() or "EOF", flush=True)
except OSError as e:
    print("TCP", type(e).__name__, flush=True)
try:
    n = socket.create_connection((addr, 80), timeout=20)
    n.sendall(b"GET /after-delete-new HTTP/1.1\\r\\nHost: api.test\\r\\n\\r\\n")
    print("NEW", n.recv(12).decode() or "EOF", flush=True)
except OSError as e:
    print("NEW", type(e).__name__, flush=True)
"""


def _fetch(ml: Run, sid: str, url: str) -> str:
    r = ml("exec", sid, "--", "python3", "-c", FETCH, url)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip()


def test_add_then_delete_at_run_time(ml: Run, upstream: Upstream,  # noqa: F811
                                     python_image: str, state_dir: Path) -> None:
    r = ml("run", "-d", "--image", python_image,
           "--add-host", f"api.test:{UPSTREAM}", "--upstream-ca", str(upstream.ca),
           "--upstream-dns", f"{UPSTREAM}:53", check=True)
    sid = r.stdout.decode().strip()
    try:
        # Networking, but nothing allowed yet.
        assert _fetch(ml, sid, "http://api.test/") == "ERR URLError"
        r = ml("allow-list", "list", sid, check=True)
        assert r.stdout == b"Current allow-list: (empty: all egress denied)\n"
        # Opened without a restart; entries normalized, duplicates dropped.
        r = ml("allow-list", "add", sid, "API.test, api.test:7", "api.test", check=True)
        assert r.stdout.decode().splitlines() == [
            f"Added to {sid}: api.test,api.test:7", "Current allow-list: api.test,api.test:7"]
        r = ml("allow-list", "add", sid, "api.test", check=True)
        assert r.stdout.decode().splitlines() == [
            f"No new hosts were added to {sid}", "Current allow-list: api.test,api.test:7"]
        assert _fetch(ml, sid, "http://api.test/") == "200"
        assert _fetch(ml, sid, "https://api.test/") == "200"

        hold = subprocess.Popen([MATCHLOCK, "exec", sid, "--", "python3", "-c", HOLD],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert hold.stdout is not None
        try:
            assert hold.stdout.readline() == b"200 one\n"
            r = ml("allow-list", "delete", sid, "api.test,api.test:7", "other.test",
                   check=True)
            assert r.stdout.decode().splitlines() == [
                f"Removed from {sid}: api.test,api.test:7",
                "Current allow-list: (empty: all egress denied)"]
            ml("exec", sid, "--", "touch", "/tmp/go", check=True)
            out, err = hold.communicate(timeout=120)
        finally:
            if hold.poll() is None:
                hold.kill()
                hold.wait()
        lines = out.decode().splitlines()
        # The same kept-alive connection: the next request is refused by the proxy.
        assert lines[0] == "403 True 1", (lines, err)
        # The raw tunnel was cut when its entry went away (reset, or EOF: never data).
        assert lines[1] in ("TCP EOF", "TCP ConnectionResetError"), lines
        # A new connection to the name's address (as the guest cached it) is refused.
        assert lines[2] in ("NEW HTTP/1.1 403", "NEW EOF", "NEW ConnectionResetError"), lines
        heads = upstream.log("http.log")
        assert "/before-delete" in heads
        assert "after-delete" not in heads
        # New lookups fail again.
        assert _fetch(ml, sid, "http://api.test/") == "ERR URLError"
        r = ml("allow-list", "delete", sid, "api.test", check=True)
        assert r.stdout.decode().splitlines()[0] == f"No hosts were removed from {sid}"
        # Bad input changes nothing.
        for bad in ("10.99.0.2", "*.test.*", "api.test:0", "a b"):
            r = ml("allow-list", "add", sid, f"ok.test,{bad}")
            assert r.returncode == 1 and r.stderr.count(b"\n") == 1, r.stderr
        assert ml("allow-list", "list", sid, check=True).stdout == (
            b"Current allow-list: (empty: all egress denied)\n")
        ml("kill", sid, check=True)
        # The cut is audited, with why.
        audit = (state_dir / "sandboxes" / sid / "network.log").read_text()
        assert "allow-list changed" in audit, audit[-2000:]
    finally:
        ml("kill", sid)
        ml("rm", sid)
