"""`matchlock port-forward`, `run -d -p` (listeners owned by the supervisor) and
`run --rm=false`, with real VMs and the real CLI. Every VM runs with --no-network: the relay
over the agent channel is the only way in. Traffic goes to 127.0.0.1 only."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import MATCHLOCK, leftovers
from .test_ports import MB20, SERVER, _connect, _recv_all

pytestmark = pytest.mark.vm
Run = Callable[..., subprocess.CompletedProcess[bytes]]

PUBLISHED = 18480  # run -d -p PUBLISHED:8080 (the supervisor listens)
FORWARDED = 18481  # port-forward FORWARDED:8080
IDLE = 18482  # port-forward IDLE:8081: nothing listens on 8081 in the guest
RM_FALSE_PORT = 18483  # run --rm=false -p RM_FALSE_PORT:8080


def _echo(port: int, payload: bytes) -> bytes:
    with _connect(port) as s:
        s.sendall(b"echo\n" + payload)
        s.shutdown(socket.SHUT_WR)
        return _recv_all(s)


def _one_line_error(r: subprocess.CompletedProcess[bytes], *words: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr)
    err = r.stderr.decode()
    assert len(err.strip().splitlines()) == 1 and err.startswith("matchlock: "), err
    for w in words:
        assert w in err, err


def _status(ml: Run, sid: str) -> str:
    entries = {e["id"]: e for e in json.loads(ml("ls", "--json", check=True).stdout)}
    return str(entries[sid]["status"])


# Tests that use `ml` come first: its leftover check must not see the module's sandbox.


def test_rm_false_keeps_the_sandbox_after_its_command(ml: Run) -> None:
    proc = subprocess.Popen(
        [MATCHLOCK, "run", "--rm=false", "--no-network", "-p", f"{RM_FALSE_PORT}:8080", "--",
         "sh", "-c", "echo made > /tmp/f; echo hi; exit 3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        first = proc.stderr.readline().decode()
        while first.startswith("matchlock: ") and "root filesystem" in first:
            first = proc.stderr.readline().decode()  # the first run of the image builds it
        assert first.startswith("Sandbox vm-") and first.endswith(" is running\n"), first
        sid = first.split()[1]
        assert proc.stdout.readline() == b"hi\n"
        lines = [proc.stderr.readline().decode() for _ in range(3)]
        assert "the command exited with 3" in lines[-1], lines
        # Still up after its command: exec-able, listed as running, the run still waiting.
        assert proc.poll() is None
        assert _status(ml, sid) == "running"
        r = ml("exec", sid, "--", "cat", "/tmp/f", check=True)
        assert r.stdout == b"made\n"
        # Its published port still relays, to a server started later by an exec.
        server = subprocess.Popen([MATCHLOCK, "exec", sid, "--", "sh", "-c",
                                   "echo ready; echo pong | nc -l -p 8080"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        got = b""
        deadline = time.monotonic() + 60
        while not got and time.monotonic() < deadline:  # nc may not listen yet
            with _connect(RM_FALSE_PORT) as s:
                s.sendall(b"ping\n")
                s.shutdown(socket.SHUT_WR)
                got = _recv_all(s)
        assert got == b"pong\n"
        assert server.communicate(timeout=60)[0] == b"ping\n"
        # Reaped while `kill` waits: a zombie owner would look alive to it (pid and start
        # time still match) until its parent, this test, reaps it.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            code = pool.submit(proc.wait, 60)
            assert ml("kill", sid, check=True).stdout == f"Killed {sid}\n".encode()
            assert code.result() == 3  # the command's exit code, once stopped
        assert _status(ml, sid) == "stopped"
        assert ml("rm", sid, check=True).returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_rm_false_interrupted_while_its_command_runs(ml: Run) -> None:
    proc = subprocess.Popen([MATCHLOCK, "run", "--rm=false", "--", "sh", "-c",
                             "echo started; sleep 600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stderr.readline().decode()
    while "root filesystem" in first:
        first = proc.stderr.readline().decode()
    sid = first.split()[1]
    assert proc.stdout.readline() == b"started\n"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert b"the sandbox was stopped: stopped by SIGINT" in proc.stderr.read()
    assert _status(ml, sid) == "stopped"
    ml("rm", sid, check=True)
    # --timeout bounds the whole life: 124 when it expires during the command.
    r = ml("run", "--rm=false", "--timeout", "3", "--", "sleep", "600")
    assert r.returncode == 124, r.stderr
    assert r.stderr.decode().splitlines()[-1] == (
        "matchlock: the sandbox was stopped: timed out after 3s")
    ml("rm", "--stopped", check=True)


def test_publish_on_several_addresses(ml: Run) -> None:
    proc = subprocess.Popen(
        [MATCHLOCK, "run", "--no-network", "-p", f"{RM_FALSE_PORT}:8080",
         "--address", "127.0.0.1,::1", "--address", "localhost", "--", "sh", "-c",
         "echo ready; echo one | nc -l -p 8080; echo two | nc -l -p 8080"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    for address, want in (("::1", b"one\n"), ("127.0.0.1", b"two\n")):
        got = b""
        deadline = time.monotonic() + 60
        while not got and time.monotonic() < deadline:
            # The guest's next nc may not listen yet: the forwarder then closes or resets
            # the connection, and we try again.
            with socket.create_connection((address, RM_FALSE_PORT), timeout=60) as s:
                s.shutdown(socket.SHUT_WR)
                with contextlib.suppress(ConnectionResetError):
                    got = _recv_all(s)
        assert got == want, address
    assert proc.wait(timeout=60) == 0


def test_rm_false_spellings(ml: Run) -> None:
    r = ml("run", "--rm=maybe", "--", "true")
    _one_line_error(r, "--rm=maybe")
    # `--rm=false` inside the command is the command's own argument.
    r = ml("run", "--", "echo", "--rm=false", check=True)
    assert r.stdout == b"--rm=false\n"
    r = ml("run", "--rm=true", "--", "echo", "ok", check=True)
    assert r.stdout == b"ok\n"


def test_port_forward_errors_are_one_line_before_anything(ml: Run) -> None:
    _one_line_error(ml("port-forward", "vm-0123abcd", "8080"), "vm-0123abcd")
    sid = ml("run", "-d", "--no-network", check=True).stdout.decode().strip()
    try:
        for spec, words in (("abc", ["'abc' is not a port number"]),
                            ("70000", ["out of range"]), ("1:2:3", ["'1:2'"])):
            _one_line_error(ml("port-forward", sid, spec), *words)
        _one_line_error(ml("port-forward", "--address", "nowhere", sid, "80"), "--address")
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            # The free port given first is released again when the busy one fails.
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                free = probe.getsockname()[1]
            r = ml("port-forward", sid, f"{free}:80", f"{port}:80")
            _one_line_error(r, f"cannot listen on 127.0.0.1 port {port}")
            # run -d -p: the supervisor fails before the sandbox exists; the launcher says so.
            r = ml("run", "-d", "--no-network", "-p", f"{port}:80")
            _one_line_error(r, f"cannot listen on 127.0.0.1 port {port}")
            with socket.socket() as again:
                again.bind(("127.0.0.1", free))
        # allow-list on a sandbox without a network; bad hosts are refused first.
        _one_line_error(ml("allow-list", "add", sid, "api.test"), "has no network")
        _one_line_error(ml("allow-list", "add", sid, "10.0.0.1"), "IP addresses cannot")
        _one_line_error(ml("allow-list", "delete", sid, "bad host!"), "invalid")
        _one_line_error(ml("allow-list", "add", sid, " , "), "no host given")
        _one_line_error(ml("allow-list", "add", sid, "*.com.*"), "invalid")
        ml("kill", sid, check=True)
        _one_line_error(ml("port-forward", sid, "8080"), f"sandbox {sid} is stopped")
        _one_line_error(ml("allow-list", "add", sid, "api.test"), f"sandbox {sid} is stopped")
    finally:
        ml("rm", "-f", sid)


# --- one detached sandbox serving SERVER, published with -p and forwarded ------------------


@dataclass
class Served:
    sid: str
    log: Path
    forward: subprocess.Popen[bytes]

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def _wait_listening(port: int) -> None:
    """Until the guest's server answers through `port` (before, a connection is closed
    cleanly: nothing listens on the guest's port yet)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if _echo(port, b"up?") == b"up?":
            return
        time.sleep(0.3)
    raise AssertionError("the guest's server never answered")


@pytest.fixture(scope="module")
def served(state_dir: Path, python_image: str) -> Iterator[Served]:
    r = subprocess.run([MATCHLOCK, "run", "-d", "--no-network", "--image", python_image,
                        "-p", f"{PUBLISHED}:8080", "--", "python3", "-u", "-c", SERVER],
                       capture_output=True, timeout=180)
    assert r.returncode == 0, r.stderr
    sid = r.stdout.decode().strip()
    fwd = None
    try:
        _wait_listening(PUBLISHED)
        fwd = subprocess.Popen([MATCHLOCK, "port-forward", "--address", "127.0.0.1", sid,
                                f"{FORWARDED}:8080", f"{IDLE}:8081"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert fwd.stderr is not None
        for port, remote in ((FORWARDED, 8080), (IDLE, 8081)):
            line = f"Forwarding 127.0.0.1:{port} -> sandbox:{remote}\n"
            assert fwd.stderr.readline() == line.encode()
        yield Served(sid, state_dir / "sandboxes" / sid / "supervisor.log", fwd)
    finally:
        if fwd is not None and fwd.poll() is None:
            fwd.send_signal(signal.SIGINT)
            fwd.wait(timeout=30)
        subprocess.run([MATCHLOCK, "kill", sid], capture_output=True, timeout=120)
        subprocess.run([MATCHLOCK, "rm", sid], capture_output=True, timeout=120)
        assert leftovers(state_dir) == []


def test_published_with_detach(served: Served) -> None:
    payload = os.urandom(300_000)
    assert _echo(PUBLISHED, payload) == payload


def test_forward_host_half_close(served: Served) -> None:
    with _connect(FORWARDED) as s:
        s.sendall(b"echo\n")
        s.sendall(b"hello, guest\n" * 1000)
        s.shutdown(socket.SHUT_WR)  # the guest sees EOF only now, and still answers after it
        assert _recv_all(s) == b"hello, guest\n" * 1000


def test_forward_guest_half_close_then_host_still_sends(served: Served) -> None:
    with _connect(FORWARDED) as s:
        s.sendall(b"source 1000\n")
        data = _recv_all(s)  # EOF: the guest shut down its sending side
        digest, _, body = data.partition(b"\n")
        assert len(body) == 1000 and hashlib.sha256(body).hexdigest().encode() == digest
        s.sendall(b"still-open")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""
    deadline = time.monotonic() + 30
    while "after: still-open" not in served.log_lines():
        assert time.monotonic() < deadline, served.log_lines()
        time.sleep(0.1)


def test_forward_30_concurrent_connections_on_both_paths(served: Served) -> None:
    def one(i: int) -> bool:
        payload = os.urandom(100_000 + i)
        return _echo(FORWARDED if i % 3 else PUBLISHED, payload) == payload

    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        assert all(pool.map(one, range(30)))


def test_forward_20mb_both_ways_byte_exact(served: Served) -> None:
    data = os.urandom(MB20)
    t0 = time.monotonic()
    with _connect(FORWARDED) as s:
        s.sendall(b"sink\n" + data)
        s.shutdown(socket.SHUT_WR)
        answer = _recv_all(s)
    up = time.monotonic() - t0
    assert answer == f"{hashlib.sha256(data).hexdigest()} {MB20}".encode()
    t0 = time.monotonic()
    with _connect(FORWARDED) as s:
        s.sendall(f"source {MB20}\n".encode())
        got = _recv_all(s)
    down = time.monotonic() - t0
    digest, _, body = got.partition(b"\n")
    assert len(body) == MB20 and hashlib.sha256(body).hexdigest().encode() == digest
    print(f"\nport-forward 20 MiB host->guest {MB20 / up / 1e6:.1f} MB/s, guest->host "
          f"{MB20 / down / 1e6:.1f} MB/s")


def test_forward_to_a_port_where_nothing_listens(served: Served) -> None:
    with _connect(IDLE) as s:
        s.sendall(b"anyone there?")
        assert _recv_all(s) == b""  # a clean close, as with -p
    assert _echo(FORWARDED, b"still fine") == b"still fine"


def test_client_reset_does_not_disturb_the_others(served: Served) -> None:
    s = _connect(FORWARDED)
    s.sendall(b"echo\npartial")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()  # RST
    assert _echo(FORWARDED, b"next") == b"next"


def test_forward_ends_when_the_sandbox_stops(served: Served) -> None:
    # Last in the module: stops the sandbox.
    r = subprocess.run([MATCHLOCK, "kill", served.sid], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert served.forward.wait(timeout=30) == 1
    assert served.forward.stderr is not None
    err = served.forward.stderr.read().decode()
    assert err == f"matchlock: sandbox {served.sid} stopped\n", err
    for port in (FORWARDED, PUBLISHED):
        with pytest.raises(ConnectionRefusedError):
            _connect(port).close()
