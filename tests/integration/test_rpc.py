"""`matchlock rpc` driven with raw JSON lines: the reference's error codes, concurrency,
cancellation, stdin EOF and signals, and nothing left behind however the process ends."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .rpc_util import BUILTIN, Rpc, error, wait_no_leftovers

pytestmark = pytest.mark.vm
Run = Callable[..., subprocess.CompletedProcess[bytes]]


def _ls(ml: Run) -> dict[str, str]:
    return {e["id"]: e["status"] for e in json.loads(ml("ls", "--json", check=True).stdout)}


def test_protocol_errors(ml: Run) -> None:
    rpc = Rpc()
    rpc.send_raw(b"not json\n")
    assert rpc.next() == {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}}
    rpc.send_raw(b'{"jsonrpc": "2.0", "method": "exec", "id": "7", "params": {}}\n')
    assert rpc.next() == {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}}
    rpc.send_raw(b"\n   \n")  # ignored
    assert error(rpc.call("nope", rid=19)) == (-32601, "Method not found")
    # parameters first, then "is there a sandbox"
    assert error(rpc.call("allow_list_add", {"hosts": [" ", ""]}, rid=40)) == (
        -32602, "hosts is required")
    assert error(rpc.call("port_forward", {"hosts": ["a.com"]}, rid=41)) == (
        -32602, "forwards is required")
    assert error(rpc.call("allow_list_delete", {"hosts": ["a.com"]}, rid=42)) == (
        -32000, "VM not created")
    assert error(rpc.call("exec", {"command": "true"}, rid=20)) == (-32000, "VM not created")
    assert error(rpc.call("create", {"image": BUILTIN, "network": {
        "no_network": True, "allowed_hosts": ["a.com"]}}, rid=21)) == (
        -32602, "invalid configuration: network.no_network cannot be combined with "
        "network.allowed_hosts")
    code, msg = error(rpc.call("create", {"image": BUILTIN, "vfs": {
        "workspace": "/workspace", "mounts": {"/workspace": {"type": "memory"}},
        "interception": {"rules": [{"ops": ["write"], "action": "block"}]}}}, rid=22))
    assert code == -32602 and msg.startswith("vfs.interception is not supported")
    rpc.send("exec_pipe", {"command": "cat"})  # no id
    assert rpc.next() == {"jsonrpc": "2.0", "error": {
        "code": -32600, "message": "exec_pipe requires a request id"}}
    # stdin for nothing, cancel of nothing
    rpc.send("exec_pipe.stdin", {"id": 99, "data": "aGk="}, rid=23)
    assert rpc.call("cancel", {"id": 99}, rid=24) == {
        "jsonrpc": "2.0", "result": {"cancelled": False}, "id": 24}
    # a 12 MiB line: answered with its id (written before the payload), and the session
    # goes on
    big = (b'{"jsonrpc": "2.0", "method": "write_file", "id": 25, "params": {"path": "/x", '
           b'"content": "' + b"A" * (12 << 20) + b'"}}\n')
    rpc.send_raw(big)
    assert rpc.next() == {"jsonrpc": "2.0", "id": 25, "error": {
        "code": -32600, "message": "request line exceeds 10485760 bytes"}}
    assert error(rpc.call("nope", rid=26))[0] == -32601
    assert rpc.finish() == 0
    assert all(line.endswith(b"\n") for line in rpc.raw)
    assert _ls(ml) == {}


def test_session_concurrency_cancel_close(ml: Run, state_dir: Path) -> None:
    rpc = Rpc()
    sid = rpc.create()
    assert _ls(ml) == {sid: "running"}
    assert error(rpc.call("create", {"image": BUILTIN}, rid=2))[0] == -32000

    # concurrent: the slow request started first answers last
    rpc.send("exec", {"command": "sleep 1; echo slow"}, 3)
    rpc.send("exec", {"command": "echo fast"}, 4)
    rpc.send("list_files", {"path": "/"}, 5)
    order = []
    for _ in range(3):
        msg = rpc.next()
        order.append(msg["id"])
        if msg["id"] == 3:
            assert base64.b64decode(msg["result"]["stdout"]) == b"slow\n"
    assert order[-1] == 3 and sorted(order) == [3, 4, 5]

    # cancel of a running exec: the cancel's answer, then -32003 for the exec
    t0 = time.monotonic()
    rpc.send("exec_stream", {"command": "echo started; sleep 60"}, 6)
    first = rpc.next()
    assert first["method"] == "exec_stream.stdout"
    rpc.send("cancel", {"id": 6}, 7)
    assert rpc.next() == {"jsonrpc": "2.0", "result": {"cancelled": True}, "id": 7}
    assert rpc.next() == {"jsonrpc": "2.0", "error": {
        "code": -32003, "message": "context canceled"}, "id": 6}
    assert time.monotonic() - t0 < 20
    # (the answer comes after the guest reported the exec's end: every process of an exec
    # dies with it)

    # a PTY: its size, a resize, stdin; stdin_eof stops forwarding but keeps the terminal
    rpc.send("exec_tty", {"command": "stty size; read x; stty size; echo got:$x",
                          "rows": 30, "cols": 100}, 20)
    assert rpc.next() == {"jsonrpc": "2.0", "method": "exec_tty.ready", "params": {"id": 20}}
    screen = b""
    while b"30 100\r\n" not in screen:
        msg = rpc.next()
        assert msg["method"] == "exec_tty.stdout"
        screen += base64.b64decode(msg["params"]["data"])
    rpc.send("exec_tty.resize", {"id": 20, "rows": 40, "cols": 120}, 21)
    rpc.send("exec_tty.stdin", {"id": 20, "data": base64.b64encode(b"hey\n").decode()}, 22)
    rpc.send("exec_tty.stdin_eof", {"id": 20}, 23)
    answer, before = rpc.until(20)
    screen += b"".join(base64.b64decode(m["params"]["data"]) for m in before)
    assert answer["result"]["exit_code"] == 0
    assert b"40 120\r\ngot:hey\r\n" in screen, screen
    assert all(m["method"] == "exec_tty.stdout" for m in before)  # no answer to 21-23

    # Ctrl-C in the client's terminal reaches the rpc process too: the client decides
    rpc.send("exec", {"command": "sleep 0.5; echo still"}, 24)
    rpc.proc.send_signal(signal.SIGINT)
    assert base64.b64decode(rpc.until(24)[0]["result"]["stdout"]) == b"still\n"

    # files errors carry -32002
    code, msg = error(rpc.call("read_file", {"path": "/nonexistent"}, rid=9))
    assert code == -32002 and "nonexistent" in msg
    assert error(rpc.call("write_file", {"path": "/x", "content": "%%%"}, rid=10)) == (
        -32602, "invalid base64 in content")

    # close: kept as stopped for `matchlock rm` (what the SDK's remove() runs)
    assert rpc.call("close", {"timeout_seconds": 2.0}, rid=11) == {
        "jsonrpc": "2.0", "result": {}, "id": 11}
    assert error(rpc.call("exec", {"command": "true"}, rid=12)) == (-32000, "VM closed")
    assert rpc.finish() == 0
    assert _ls(ml) == {sid: "stopped"}
    assert ml("rm", sid, check=True).stdout.decode() == f"Removed {sid}\n"
    assert wait_no_leftovers(state_dir) == []


def test_close_cancels_what_runs_after_its_timeout(ml: Run, state_dir: Path) -> None:
    rpc = Rpc()
    sid = rpc.create()
    rpc.send("exec", {"command": "sleep 60"}, 2)
    time.sleep(0.3)
    t0 = time.monotonic()
    rpc.send("close", {"timeout_seconds": 0.5}, 3)
    answers = {rpc.next()["id"]: None for _ in range(2)}
    assert set(answers) == {2, 3}
    assert time.monotonic() - t0 < 15
    assert rpc.finish() == 0
    ml("rm", sid, check=True)
    assert wait_no_leftovers(state_dir) == []


def test_stdin_eof_without_close_cancels_and_removes(ml: Run, state_dir: Path) -> None:
    rpc = Rpc()
    rpc.create()
    rpc.send("exec_pipe", {"command": "cat"}, 2)
    assert rpc.next() == {"jsonrpc": "2.0", "method": "exec_pipe.ready", "params": {"id": 2}}
    rpc.send("exec_pipe.stdin", {"id": 2, "data": base64.b64encode(b"x" * 10).decode()}, 3)
    assert rpc.next()["method"] == "exec_pipe.stdout"
    rpc.close_stdin()  # the pipe's stdin is never closed: EOF of the session ends it
    assert rpc.next() == {"jsonrpc": "2.0", "error": {
        "code": -32003, "message": "context canceled"}, "id": 2}
    assert rpc.proc.wait(30) == 0
    assert wait_no_leftovers(state_dir, 5) == []
    assert _ls(ml) == {}


def test_rm_force_of_a_running_rpc_sandbox(ml: Run, state_dir: Path) -> None:
    rpc = Rpc()
    sid = rpc.create()
    r = ml("rm", "-f", sid)
    assert (r.returncode, r.stdout.decode(), r.stderr) == (0, f"Removed {sid}\n", b"")
    assert rpc.proc.wait(30) == 0
    assert wait_no_leftovers(state_dir) == []


@pytest.mark.parametrize("signo", [signal.SIGKILL, signal.SIGTERM])
def test_nothing_left_when_the_rpc_process_is_killed(ml: Run, state_dir: Path,
                                                     signo: int) -> None:
    rpc = Rpc()
    sid = rpc.create()
    rpc.send("exec", {"command": "sleep 60"}, 2)
    assert _ls(ml) == {sid: "running"}
    if signo == signal.SIGTERM:
        # `matchlock kill` stops an rpc sandbox by signalling its owner, the rpc process
        assert ml("kill", sid, check=True).stdout.decode() == f"Killed {sid}\n"
    else:
        os.kill(rpc.proc.pid, signo)
    rpc.proc.wait(30)
    # SIGTERM: the process removes its sandbox; SIGKILL: the VMM dies with it and the
    # reaper removes the rest
    assert wait_no_leftovers(state_dir) == []
    assert _ls(ml) == {}
    if signo == signal.SIGTERM:
        assert rpc.proc.returncode == 0


@pytest.mark.parametrize("delay", [0.05, 0.3])
def test_signal_while_booting_stops_the_boot(ml: Run, state_dir: Path, delay: float) -> None:
    rpc = Rpc()
    rpc.send("nope", None, 1)
    rpc.next()  # the process is up
    rpc.send("create", {"image": BUILTIN}, 2)
    time.sleep(delay)
    rpc.proc.send_signal(signal.SIGTERM)
    answer = rpc.next()
    if "error" in answer:  # stopped while booting (else it had finished booting)
        code, message = error(answer)
        assert code == -32000 and "SIGTERM" in message, message
    assert rpc.proc.wait(30) == 0
    assert wait_no_leftovers(state_dir) == []
    assert _ls(ml) == {}


def test_network_block_becomes_an_event(ml: Run, state_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the sandbox network needs root")
    rpc = Rpc()
    rpc.create({"network": {"allowed_hosts": ["allowed.test"], "block_private_ips": True}})
    # TEST-NET-1 is never routed; the proxy refuses it by policy before any dial.
    request = "GET /x?tok=1 HTTP/1.1\\r\\nHost: 192.0.2.1\\r\\n\\r\\n"
    rpc.send("exec", {"command": f"printf '{request}' | nc -w 5 192.0.2.1 80"}, 2)
    answer, before = rpc.until(2)
    assert "result" in answer
    events = [m["params"] for m in before if m.get("method") == "event"]
    deadline = time.monotonic() + 5
    while not events and time.monotonic() < deadline:
        msg = rpc.next(5)
        if msg.get("method") == "event":
            events.append(msg["params"])
    assert events, "no event notification"
    ev = events[0]
    assert ev["type"] == "network" and ev["network"]["blocked"] is True
    assert b"403 Forbidden" in base64.b64decode(answer["result"]["stdout"])
    assert ev["network"]["host"] == "192.0.2.1" and ev["network"]["block_reason"]
    assert ev["network"]["url"] == "http://192.0.2.1/x"  # never the query
    assert ev["network"]["status_code"] == 403
    assert isinstance(ev["timestamp"], int) and ev["timestamp"] > 1_700_000_000
    rpc.finish()
    assert wait_no_leftovers(state_dir) == []


def test_launch_entrypoint_log_stream_and_failure(ml: Run, state_dir: Path) -> None:
    rpc = Rpc()
    rpc.create({"launch_entrypoint": True, "image_config": {
        "entrypoint": ["sh", "-c"], "cmd": ["echo started; sleep 1; echo later; sleep 100"]}})
    answer = rpc.call("log", rid=2)
    assert base64.b64decode(answer["result"]["content"]) == b"started\n"
    rpc.send("log_stream", None, 3)
    got = b""
    while got != b"started\nlater\n":
        msg = rpc.next(10)
        assert msg["method"] == "log_stream.data" and msg["params"]["id"] == 3
        got += base64.b64decode(msg["params"]["data"])
    rpc.send("cancel", {"id": 3}, 4)
    answer, before = rpc.until(3)
    assert error(answer) == (-32003, "context canceled")
    assert before == [{"jsonrpc": "2.0", "result": {"cancelled": True}, "id": 4}]
    rpc.send("log_stream", None)  # needs an id
    assert error(rpc.next())[0] == -32600
    assert rpc.finish() == 0  # the entrypoint still runs: stopped with the sandbox

    # an entrypoint that fails at once fails the create, and nothing is kept
    rpc = Rpc()
    answer = rpc.call("create", {"image": BUILTIN, "launch_entrypoint": True,
                                 "image_config": {"cmd": ["sh", "-c", "exit 7"]}})
    assert error(answer) == (-32000, "start image entrypoint: exit code 7")
    assert rpc.finish() == 0
    assert wait_no_leftovers(state_dir) == []


def test_many_concurrent_requests(ml: Run, state_dir: Path) -> None:
    rpc = Rpc()
    rpc.create()
    n = 12
    for i in range(n):
        rpc.send("exec_stream", {"command": f"seq 1 2000 | sed 's/^/{i}:/'"}, 100 + i)
        rpc.send("exec_pipe", {"command": "cat"}, 200 + i)
        rpc.send("write_file", {"path": f"/tmp/f{i}", "content": base64.b64encode(
            bytes([i]) * 70000).decode()}, 300 + i)
    streams: dict[int, bytes] = {}
    piped: dict[int, bytes] = {}
    answers: dict[int, dict[str, object]] = {}
    while len(answers) < 3 * n:
        msg = rpc.next(60)
        if msg.get("method") == "exec_pipe.ready":
            rid = msg["params"]["id"]
            rpc.send("exec_pipe.stdin", {"id": rid, "data": base64.b64encode(
                f"pipe {rid}\n".encode()).decode()}, 1000 + rid)
            rpc.send("exec_pipe.stdin_eof", {"id": rid}, 2000 + rid)
        elif msg.get("method") == "exec_stream.stdout":
            rid = msg["params"]["id"]
            streams[rid] = streams.get(rid, b"") + base64.b64decode(msg["params"]["data"])
        elif msg.get("method") == "exec_pipe.stdout":
            rid = msg["params"]["id"]
            piped[rid] = piped.get(rid, b"") + base64.b64decode(msg["params"]["data"])
        else:
            assert "result" in msg, msg
            answers[msg["id"]] = msg["result"]
    for i in range(n):
        assert streams[100 + i] == b"".join(f"{i}:{k}\n".encode() for k in range(1, 2001))
        assert piped[200 + i] == f"pipe {200 + i}\n".encode()
        assert answers[100 + i]["exit_code"] == 0 and answers[300 + i] == {}
    for i in range(n):  # nothing was ever answered for the stdin notifications
        answer = rpc.call("read_file", {"path": f"/tmp/f{i}"}, rid=400 + i)
        assert base64.b64decode(answer["result"]["content"]) == bytes([i]) * 70000
    assert rpc.finish() == 0
    assert wait_no_leftovers(state_dir) == []


def test_extra_disks_keep_data_across_sessions(ml: Run, state_dir: Path) -> None:
    info = json.loads(ml("volume", "create", "rpcdata", "--size", "16", "--json",
                         check=True).stdout)
    try:
        rpc = Rpc()
        rpc.create({"extra_disks": [{"host_path": info["path"], "guest_mount": "/data"}]})
        answer = rpc.call("exec", {"command": "echo kept > /data/f; sync"}, rid=2)
        assert answer["result"]["exit_code"] == 0, answer
        assert rpc.finish() == 0
        rpc = Rpc()
        rpc.create({"extra_disks": [{"host_path": "@rpcdata", "guest_mount": "/data",
                                     "readonly": True}]})
        answer = rpc.call("read_file", {"path": "/data/f"}, rid=2)
        assert base64.b64decode(answer["result"]["content"]) == b"kept\n"
        answer = rpc.call("exec", {"command": "touch /data/g"}, rid=3)
        assert answer["result"]["exit_code"] != 0  # read-only
        assert rpc.finish() == 0
        rpc = Rpc()
        code, message = error(rpc.call("create", {"image": BUILTIN, "extra_disks": [
            {"host_path": "@nosuchvolume", "guest_mount": "/data"}]}))
        assert code == -32602 and "named volume not found: nosuchvolume" in message
        assert rpc.finish() == 0
    finally:
        ml("volume", "rm", "rpcdata")
    assert wait_no_leftovers(state_dir) == []


def test_timeout_seconds_stops_the_sandbox(ml: Run, state_dir: Path) -> None:
    rpc = Rpc()
    t0 = time.monotonic()
    sid = rpc.create({"resources": {"timeout_seconds": 2}})
    rpc.send("exec", {"command": "sleep 60"}, 2)
    assert error(rpc.until(2, timeout=30)[0]) == (-32003, "context canceled")
    assert 1.5 < time.monotonic() - t0 < 20
    assert error(rpc.call("exec", {"command": "true"}, rid=3)) == (
        -32000, "VM timed out after 2s (resources.timeout_seconds)")
    assert _ls(ml) == {sid: "stopped"}
    assert rpc.call("close", {"timeout_seconds": 1}, rid=4)["result"] == {}
    assert rpc.finish() == 0
    ml("rm", sid, check=True)
    assert wait_no_leftovers(state_dir) == []


def test_upstream_ca_from_the_environment(ml: Run, tmp_path: Path) -> None:
    """An SDK cannot pass --upstream-ca: `matchlock rpc` takes MATCHLOCK_UPSTREAM_CA, and a
    file that is not there is a parameter error before anything boots."""
    rpc = Rpc(env={**os.environ, "MATCHLOCK_UPSTREAM_CA": str(tmp_path / "missing.pem")})
    code, msg = error(rpc.call("create", {"image": BUILTIN, "network": {
        "allowed_hosts": ["a.test"]}}, rid=1))
    assert code == -32602 and "missing.pem" in msg
    assert rpc.finish() == 0
    assert _ls(ml) == {}


def test_allow_list_and_port_forward(ml: Run, state_dir: Path) -> None:
    """allow_list_add/delete answer as the reference (added/removed, the whole list, null when
    empty; a bad pattern is -32602); port_forward binds, relays to the guest's port over the
    agent (no NIC needed), and a second call replaces the first set of listeners."""
    import socket

    rpc = Rpc()
    rpc.create({"network": {"allowed_hosts": ["a.test"]}})
    ok = rpc.call("allow_list_add", {"hosts": ["b.test", " b.test ", "", "a.test"]}, rid=2)
    assert ok["result"] == {"added": ["b.test"], "allowed_hosts": ["a.test", "b.test"]}
    ok = rpc.call("allow_list_delete", {"hosts": ["a.test", "c.test"]}, rid=3)
    assert ok["result"] == {"removed": ["a.test"], "allowed_hosts": ["b.test"]}
    ok = rpc.call("allow_list_delete", {"hosts": ["b.test"]}, rid=4)
    assert ok["result"] == {"removed": ["b.test"], "allowed_hosts": None}
    code, _ = error(rpc.call("allow_list_add", {"hosts": ["bad host/x"]}, rid=5))
    assert code == -32602

    rpc.send("exec", {"command": "echo pong | nc -l -p 8080"}, rid=6)
    bound = rpc.call("port_forward", {"forwards": [{"local_port": 0, "remote_port": 8080}]},
                     rid=7)["result"]["bindings"]
    assert len(bound) == 1 and bound[0]["address"] == "127.0.0.1"
    assert bound[0]["remote_port"] == 8080 and bound[0]["local_port"] > 0
    got = b""
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:  # nc may not listen yet
        with socket.create_connection(("127.0.0.1", bound[0]["local_port"]), 10) as c:
            c.shutdown(socket.SHUT_WR)
            got = c.recv(100)
        time.sleep(0.1)
    assert got == b"pong\n"
    first = bound[0]["local_port"]
    again = rpc.call("port_forward", {"forwards": [{"local_port": 0, "remote_port": 9}],
                                      "addresses": ["127.0.0.1"]}, rid=8)["result"]["bindings"]
    with pytest.raises(OSError):  # the first listener is gone
        socket.create_connection(("127.0.0.1", first), 2).close()
    assert rpc.call("close", {"timeout_seconds": 5}, rid=9)["result"] == {}
    with pytest.raises(OSError):  # and the second with the sandbox
        socket.create_connection(("127.0.0.1", again[0]["local_port"]), 2).close()
    assert rpc.finish() == 0
    ml("rm", *_ls(ml), check=True)
    assert wait_no_leftovers(state_dir) == []

    rpc = Rpc()
    rpc.create({"network": {"no_network": True}})
    assert error(rpc.call("allow_list_add", {"hosts": ["a.test"]}, rid=2)) == (
        -32000, "allow-list updates unavailable: sandbox was started without network "
        "interception")
    assert rpc.finish() == 0
    assert wait_no_leftovers(state_dir) == []
