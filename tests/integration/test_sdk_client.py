"""This project's SDK (`from matchlock import Client, AsyncClient, ...`) in this process,
against real VMs: many clients at once, concurrency on one sandbox, streaming, error types."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from matchlock import (
    AsyncClient,
    Client,
    Config,
    MatchlockError,
    PortForwardBinding,
    RPCError,
    Sandbox,
)

from .conftest import MATCHLOCK
from .rpc_util import BUILTIN, wait_no_leftovers

pytestmark = pytest.mark.vm
Run = Callable[..., subprocess.CompletedProcess[bytes]]
CONFIG = Config(binary_path=MATCHLOCK)


def test_eight_clients_at_once(ml: Run, state_dir: Path) -> None:
    """Eight clients in eight threads, each with its own sandbox and rpc process: each boots,
    runs commands and moves a file of its own; all succeed; nothing is left behind."""
    n = 8
    results: dict[int, Any] = {}
    start = threading.Barrier(n)

    def one(i: int) -> None:
        try:
            start.wait()
            with Client(CONFIG) as c:
                vm = c.launch(Sandbox(BUILTIN).with_env("WHO", f"client-{i}"))
                payload = bytes([i]) * (100_000 + i)
                c.write_file(f"/tmp/mine-{i}", payload)
                r = c.exec(f"echo $WHO; ls /tmp | grep -c mine-; wc -c < /tmp/mine-{i}")
                back = c.read_file(f"/tmp/mine-{i}")
                results[i] = (vm, r.exit_code, r.stdout.split(), back == payload)
            c.remove()
        except BaseException as e:  # reported below with the client's number
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    errors = {i: r for i, r in results.items() if isinstance(r, BaseException)}
    assert errors == {}
    assert sorted(results) == list(range(n))
    assert len({r[0] for r in results.values()}) == n  # eight distinct sandboxes
    for i, (_, code, out, same) in results.items():
        # each sandbox has exactly its own file
        assert (code, out, same) == (0, [f"client-{i}", "1", str(100_000 + i)], True)
    assert wait_no_leftovers(state_dir) == []


def test_async_client_concurrent_execs_on_one_sandbox(ml: Run, state_dir: Path) -> None:
    """Six execs that each sleep 1 s, awaited together, finish in about 1 s (not 6), each
    with its own output; files move concurrently with them."""

    async def main() -> tuple[list[Any], float, list[bytes]]:
        async with AsyncClient(CONFIG) as c:
            await c.launch(Sandbox(BUILTIN))
            await c.exec("true")
            t0 = time.monotonic()
            execs = [c.exec(f"sleep 1; echo done-{i}; exit {i}") for i in range(6)]
            writes = [c.write_file(f"/tmp/f{i}", f"content {i}") for i in range(6)]
            results = await asyncio.gather(*execs, *writes)
            wall = time.monotonic() - t0
            reads = await asyncio.gather(*(c.read_file(f"/tmp/f{i}") for i in range(6)))
        await c.remove()
        return results[:6], wall, reads

    results, wall, reads = asyncio.run(main())
    assert [(r.exit_code, r.stdout) for r in results] == [(i, f"done-{i}\n") for i in range(6)]
    assert 1.0 <= wall < 3.5, wall
    assert reads == [f"content {i}".encode() for i in range(6)]
    assert wait_no_leftovers(state_dir) == []


class Stamped(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.at: list[tuple[float, str]] = []

    def write(self, s: str) -> int:
        self.at.append((time.monotonic(), s))
        return super().write(s)


def test_exec_stream_chunks_arrive_as_produced(ml: Run, state_dir: Path) -> None:
    with Client(CONFIG) as c:
        c.launch(Sandbox(BUILTIN))
        out, err = Stamped(), Stamped()
        t0 = time.monotonic()
        r = c.exec_stream("for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.6; done",
                          stdout=out, stderr=err)
        t_end = time.monotonic()
        binary = io.BytesIO()
        rb = c.exec_stream(r"printf '\377\000\200x'", stdout=binary)
    c.remove()
    assert r.exit_code == 0 and rb.exit_code == 0
    assert out.getvalue() == "out1\nout2\nout3\n" and err.getvalue() == "err1\nerr2\nerr3\n"
    assert [s for _, s in out.at] == ["out1\n", "out2\n", "out3\n"]
    times = [t for t, _ in out.at]
    # the first line arrived while the command was still running (it runs >= 1.8 s)...
    assert times[0] - t0 < (t_end - t0) - 1.0
    # ...and the lines came apart, as the guest printed them
    assert times[1] - times[0] > 0.3 and times[2] - times[1] > 0.3
    assert binary.getvalue() == b"\xff\x00\x80x"  # a binary writer gets the bytes unchanged
    assert wait_no_leftovers(state_dir) == []


def test_error_types(ml: Run, state_dir: Path, tmp_path: Path) -> None:
    c = Client(CONFIG)
    c.start()
    try:
        _errors(c)
    finally:
        c.close()
    c.remove()
    assert wait_no_leftovers(state_dir) == []
    with pytest.raises(FileNotFoundError):  # as the official SDK: Popen's own error
        Client(Config(binary_path=str(tmp_path / "no-matchlock"))).start()


def _errors(c: Client) -> None:
    with pytest.raises(RPCError) as before:
        c.exec("true")
    assert (before.value.code, before.value.message) == (-32000, "VM not created")
    assert before.value.is_vm_error() and isinstance(before.value, MatchlockError)

    with pytest.raises(RPCError) as bad:
        c.launch(Sandbox("no-such-image-here:1"))
    assert bad.value.is_vm_error() and "no-such-image-here" in bad.value.message

    vm = c.launch(Sandbox(BUILTIN))
    with pytest.raises(RPCError) as missing:
        c.read_file("/no/such/file")
    assert missing.value.is_file_error() and missing.value.code == RPCError.FILE_FAILED
    with pytest.raises(RPCError) as params:
        c.exec("pwd", working_dir="relative")
    assert params.value.code == RPCError.INVALID_PARAMS
    with pytest.raises(TimeoutError, match=r"request exec \(id=\d+\) timed out after 0.5s"):
        c.exec("sleep 30", timeout=0.5)
    assert c.exec("echo still here").stdout == "still here\n"  # the cancel left it usable
    c.close()
    with pytest.raises(MatchlockError, match="Matchlock process not running") as closed:
        c.exec("true")
    assert not isinstance(closed.value, RPCError)
    listed = subprocess.run([MATCHLOCK, "ls"], capture_output=True, text=True).stdout
    assert vm in listed and "stopped" in listed  # until remove()


def test_timeout_seconds_closes_the_sandbox(ml: Run, state_dir: Path) -> None:
    with Client(CONFIG) as c:
        c.launch(Sandbox(BUILTIN).with_timeout(2))
        assert c.exec("echo up").stdout == "up\n"
        time.sleep(2.5)
        with pytest.raises(RPCError) as late:
            c.exec("true")
    c.remove()
    assert late.value.is_vm_error() and "timed out" in late.value.message
    assert wait_no_leftovers(state_dir) == []


def test_sandbox_killed_from_outside(ml: Run, state_dir: Path) -> None:
    """`matchlock kill ID` while a command runs: the call in flight fails with RPCError
    -32003 (cancelled), later calls with MatchlockError (the rpc process is gone)."""
    c = Client(CONFIG)
    c.start()
    try:
        vm = c.launch(Sandbox(BUILTIN))
        failure: list[BaseException] = []

        def long_exec() -> None:
            try:
                c.exec("sleep 60")
            except BaseException as e:
                failure.append(e)

        t = threading.Thread(target=long_exec)
        t.start()
        time.sleep(0.5)
        k = subprocess.run([MATCHLOCK, "kill", vm], capture_output=True, text=True, timeout=60)
        assert k.returncode == 0, k.stderr
        t.join(30)
        assert not t.is_alive()
        # the server cancels what is in flight, then exits: the sandbox is gone with it
        assert len(failure) == 1 and isinstance(failure[0], RPCError), failure
        assert (failure[0].code, failure[0].message) == (-32003, "context canceled")
        with pytest.raises(MatchlockError, match="not running"):
            c.exec("true")
    finally:
        c.close()
    subprocess.run([MATCHLOCK, "rm", "-f", vm], capture_output=True)
    assert wait_no_leftovers(state_dir) == []


def test_async_cancellation_cancels_in_the_sandbox(ml: Run, state_dir: Path) -> None:
    """A task that gives up on an exec (asyncio.wait_for) cancels it in the sandbox: the
    command stops (its heartbeat file stops changing), the sandbox goes on. (Each exec has a
    PID namespace of its own, so the heartbeat is how another exec can tell.)"""
    beat = "i=0; while true; do i=$((i+1)); echo $i > /tmp/beat; sleep 0.2; done"

    async def main() -> tuple[list[str], str]:
        async with AsyncClient(CONFIG) as c:
            await c.launch(Sandbox(BUILTIN))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(c.exec(beat), 1.5)
            await asyncio.sleep(0.5)
            beats = []
            for _ in range(3):
                beats.append((await c.read_file("/tmp/beat")).decode())
                await asyncio.sleep(0.6)
            after = (await c.exec("echo still here")).stdout
        await c.remove()
        return beats, after

    beats, after = asyncio.run(main())
    assert int(beats[0]) > 1 and len(set(beats)) == 1, beats  # it ran, then stopped
    assert after == "still here\n"
    assert wait_no_leftovers(state_dir) == []


CTRL_C = """
import sys, time
from matchlock import Client, Config, Sandbox
c = Client(Config(binary_path=sys.argv[1]))
c.start()
c.launch(Sandbox("matchlock-builtin:busybox"))
print("ready", flush=True)
try:
    c.exec("i=0; while true; do i=$((i+1)); echo $i > /tmp/beat; sleep 0.2; done")
except KeyboardInterrupt:
    time.sleep(0.5)
    beats = []
    for _ in range(3):
        beats.append(c.read_file("/tmp/beat").decode())
        time.sleep(0.6)
    print(" ".join(beats), flush=True)
c.close()
c.remove()
"""


def test_ctrl_c_cancels_the_running_exec(ml: Run, state_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C in a program waiting on exec: the command is cancelled in the sandbox (its
    heartbeat stops), and the program can go on using and close the sandbox."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C)
    p = subprocess.Popen([sys.executable, str(script), MATCHLOCK], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline() == "ready\n"
    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    beats = out.split()
    assert int(beats[0]) > 1 and len(set(beats)) == 1, beats
    assert wait_no_leftovers(state_dir) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_allow_list_and_port_forward(ml: Run, state_dir: Path) -> None:
    """This SDK's allow_list_add/delete (not in the official SDK) and port_forward."""
    if os.geteuid() != 0:
        pytest.skip("the sandbox network needs root")
    port = _free_port()
    with Client(CONFIG) as c:
        c.launch(Sandbox(BUILTIN).allow_host("a.test"))
        assert c.allow_list_add("b.test", "*.c.test") == ["a.test", "b.test", "*.c.test"]
        assert c.allow_list_delete("a.test") == ["b.test", "*.c.test"]
        with pytest.raises(RPCError) as bad:
            c.allow_list_add("bad host/x")
        assert bad.value.code == RPCError.INVALID_PARAMS

        server = threading.Thread(target=c.exec, args=("echo pong | nc -l -p 8080",))
        server.start()
        assert c.port_forward(f"{port}:8080") == [PortForwardBinding("127.0.0.1", port, 8080)]
        got = b""
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:  # nc may not listen yet
            with socket.create_connection(("127.0.0.1", port), 10) as s:
                s.shutdown(socket.SHUT_WR)
                got = s.recv(100)
            time.sleep(0.1)
        server.join(30)
    c.remove()
    assert got == b"pong\n"
    with pytest.raises(OSError):  # the listener closed with the sandbox
        socket.create_connection(("127.0.0.1", port), 2).close()
    assert wait_no_leftovers(state_dir) == []


def test_on_event_sees_network_decisions(ml: Run, state_dir: Path) -> None:
    """on_event= (not in the official SDK) gets the proxy's decisions as they happen."""
    if os.geteuid() != 0:
        pytest.skip("the sandbox network needs root")
    events: list[dict[str, Any]] = []
    seen = threading.Event()

    def on_event(ev: dict[str, Any]) -> None:
        events.append(ev)
        seen.set()

    with Client(CONFIG, on_event=on_event) as c:
        c.launch(Sandbox(BUILTIN).allow_host("allowed.test").block_private_ips())
        # TEST-NET-1 is never routed; the proxy refuses it by policy before any dial.
        request = "GET /x?tok=1 HTTP/1.1\\r\\nHost: 192.0.2.1\\r\\n\\r\\n"
        r = c.exec(f"printf '{request}' | nc -w 5 192.0.2.1 80")
        seen.wait(10)
    c.remove()
    assert "403 Forbidden" in r.stdout
    assert len(events) == 1, events
    net = events[0]["network"]
    assert events[0]["type"] == "network" and net["blocked"] is True
    assert (net["host"], net["url"], net["status_code"]) == ("192.0.2.1", "http://192.0.2.1/x",
                                                             403)
    assert wait_no_leftovers(state_dir) == []
