"""Published ports (`run -p`): host TCP listeners relayed over the agent's control channel to
the guest's loopback. Every VM here runs with --no-network: no NIC, the relay is the only way.
Traffic goes to 127.0.0.1 only."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import MATCHLOCK, leftovers

pytestmark = pytest.mark.vm
Run = Callable[..., subprocess.CompletedProcess[bytes]]

HOST_PORT = 18080
IDLE_PORT = 18081  # published, but nothing listens on it in the guest
MB20 = 20 * 1024 * 1024

# The guest's server. One line names what a connection wants:
#   echo      echo until EOF, then close
#   sink      read until EOF, answer "<sha256> <length>", close
#   source N  send "<sha256>\n" then N random bytes, half-close, then print what the host
#             sends after that on stdout ("after: ...")
#   quit      exit the server (and so the run)
SERVER = r"""
import hashlib, os, socket, sys, threading

def line(c):
    b = b""
    while not b.endswith(b"\n"):
        x = c.recv(1)
        if not x:
            break
        b += x
    return b.strip()

def handle(c):
    with c:
        cmd = line(c).split()
        if not cmd:
            return
        if cmd[0] == b"echo":
            while True:
                d = c.recv(65536)
                if not d:
                    return
                c.sendall(d)
        elif cmd[0] == b"sink":
            h, n = hashlib.sha256(), 0
            while True:
                d = c.recv(65536)
                if not d:
                    break
                h.update(d)
                n += len(d)
            c.sendall(f"{h.hexdigest()} {n}".encode())
        elif cmd[0] == b"source":
            data = os.urandom(int(cmd[1]))
            c.sendall(hashlib.sha256(data).hexdigest().encode() + b"\n" + data)
            c.shutdown(socket.SHUT_WR)
            rest = b""
            while True:
                d = c.recv(65536)
                if not d:
                    break
                rest += d
            print("after:", rest.decode(), flush=True)
        elif cmd[0] == b"quit":
            os._exit(0)

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8080))
s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""


def _connect(port: int = HOST_PORT) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    return s


def _recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while True:
        d = s.recv(262144)
        if not d:
            return bytes(out)
        out += d


# Tests that use `ml` come first: its leftover check must not see the module's server VM.


def test_busybox_nc_without_network(ml: Run) -> None:
    # Default image, busybox nc: the guest listens on its loopback, the host connects.
    proc = subprocess.Popen(
        [MATCHLOCK, "run", "--no-network", "-p", "18090:8080", "--", "sh", "-c",
         "echo ready; echo from-guest | nc -l -p 8080"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    got = b""
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:  # nc may not listen yet: then a clean EOF
        with _connect(18090) as s:
            s.sendall(b"from-host\n")
            s.shutdown(socket.SHUT_WR)
            got = _recv_all(s)
        if not got:
            time.sleep(0.5)
    out, err = proc.communicate(timeout=60)
    assert got == b"from-guest\n"
    assert out == b"from-host\n", err
    assert proc.returncode == 0


@pytest.mark.parametrize("args, message", [
    (["-p", "abc"], b"invalid --publish 'abc'"),
    (["-p", "70000"], b"port 70000 is out of range"),
    (["-p", "0:80"], b"port 0 is out of range"),
    (["-p", "8080:"], b"'' is not a port number"),
    (["-p", "1:2:3"], b"invalid --publish '1:2:3'"),
    (["-p", "9000", "-p", "9000:80"], b"host port 9000 is given twice"),
    (["-p", "9000", "--address", "localhost-ish"], b"invalid --address"),
    (["-d", "-p", "9000:"], b"'' is not a port number"),  # checked by the supervisor
])
def test_bad_publish_is_one_line(ml: Run, args: list[str], message: bytes) -> None:
    r = ml("run", *args, "--", "true")
    assert r.returncode == 1
    assert message in r.stderr
    assert r.stderr.count(b"\n") == 1, r.stderr


def test_port_in_use_is_one_line_and_creates_nothing(ml: Run) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = ml("run", "-p", f"{port}:80", "--", "true")
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1 port {port}".encode() in r.stderr
    assert r.stderr.count(b"\n") == 1, r.stderr


@pytest.fixture(scope="module")
def server(state_dir: Path, python_image: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [MATCHLOCK, "run", "--no-network", "--image", python_image,
         "-p", f"{HOST_PORT}:8080", "--publish", f"{IDLE_PORT}:8081",
         "--", "python3", "-u", "-c", SERVER],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"ready\n", proc.stderr.read() if proc.stderr else b""
        yield proc
    finally:
        if proc.poll() is None:
            try:
                with _connect() as s:
                    s.sendall(b"quit\n")
                proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                proc.terminate()
                proc.wait(timeout=60)
        assert leftovers(state_dir) == []


def test_bytes_both_ways_and_host_half_close(server: subprocess.Popen[bytes]) -> None:
    with _connect() as s:
        s.sendall(b"echo\n")
        s.sendall(b"hello, guest\n" * 1000)
        s.shutdown(socket.SHUT_WR)  # the guest sees EOF only now, and still answers after it
        assert _recv_all(s) == b"hello, guest\n" * 1000


def test_guest_half_close_then_host_still_sends(server: subprocess.Popen[bytes]) -> None:
    with _connect() as s:
        s.sendall(b"source 1000\n")
        data = _recv_all(s)  # EOF: the guest shut down its sending side
        digest, _, body = data.partition(b"\n")
        assert len(body) == 1000 and hashlib.sha256(body).hexdigest().encode() == digest
        s.sendall(b"still-open")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""
    assert server.stdout is not None
    assert server.stdout.readline() == b"after: still-open\n"


def test_20_concurrent_connections(server: subprocess.Popen[bytes]) -> None:
    def one(i: int) -> bool:
        payload = os.urandom(100_000 + i)
        with _connect() as s:
            s.sendall(b"echo\n" + payload)
            s.shutdown(socket.SHUT_WR)
            return _recv_all(s) == payload

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        assert all(pool.map(one, range(20)))


def test_20mb_upload_and_download_byte_exact(server: subprocess.Popen[bytes]) -> None:
    data = os.urandom(MB20)
    t0 = time.monotonic()
    with _connect() as s:
        s.sendall(b"sink\n" + data)
        s.shutdown(socket.SHUT_WR)
        answer = _recv_all(s)
    up = time.monotonic() - t0
    assert answer == f"{hashlib.sha256(data).hexdigest()} {MB20}".encode()
    t0 = time.monotonic()
    with _connect() as s:
        s.sendall(f"source {MB20}\n".encode())
        got = _recv_all(s)
    down = time.monotonic() - t0
    digest, _, body = got.partition(b"\n")
    assert len(body) == MB20 and hashlib.sha256(body).hexdigest().encode() == digest
    assert server.stdout is not None
    assert server.stdout.readline() == b"after: \n"
    print(f"\n20 MiB host->guest {MB20 / up / 1e6:.1f} MB/s, guest->host {MB20 / down / 1e6:.1f} "
          "MB/s")


def test_port_where_nothing_listens_is_closed_cleanly(server: subprocess.Popen[bytes]) -> None:
    with _connect(IDLE_PORT) as s:
        s.sendall(b"anyone there?")
        assert _recv_all(s) == b""
    # The server on the other port is unaffected.
    with _connect() as s:
        s.sendall(b"echo\nstill fine")
        s.shutdown(socket.SHUT_WR)
        assert _recv_all(s) == b"still fine"
