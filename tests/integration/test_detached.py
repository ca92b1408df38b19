"""Detached sandboxes end to end: `run -d`, `exec`, `ls`, `kill`, `rm`, a crashed supervisor
and `gc`, with real VMs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import MATCHLOCK, leftovers

pytestmark = pytest.mark.vm
Run = Callable[..., subprocess.CompletedProcess[bytes]]


def _start(ml: Run, *flags: str) -> str:
    r = ml("run", "-d", *flags, check=True)
    sid = r.stdout.decode().strip()
    assert sid.startswith("vm-") and len(r.stdout.splitlines()) == 1, r.stdout
    return sid


def _ls(ml: Run) -> dict[str, dict[str, object]]:
    r = ml("ls", "--json", check=True)
    return {e["id"]: e for e in json.loads(r.stdout)}


def _one_line_error(r: subprocess.CompletedProcess[bytes], *words: str) -> None:
    assert r.returncode != 0
    err = r.stderr.decode()
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("matchlock: "), err
    for w in words:
        assert w in err, err


def test_exec_many_in_a_row_and_at_once(ml: Run, state_dir: Path) -> None:
    sid = _start(ml)
    try:
        entry = _ls(ml)[sid]
        assert entry["status"] == "running" and entry["image"]
        assert isinstance(entry["pid"], int) and entry["pid"] > 0
        sock = state_dir / "sandboxes" / sid / "control.sock"
        assert sock.stat().st_mode & 0o777 == 0o600
        # 20 in a row: exit codes and separate streams; each leaves a file for the next.
        for i in range(20):
            r = ml("exec", sid, "--", "sh", "-c",
                   f"echo out{i}; echo err{i} >&2; echo {i} >> /tmp/log; exit {i % 4}")
            assert r.returncode == i % 4, r.stderr
            assert r.stdout == f"out{i}\n".encode()
            assert r.stderr == f"err{i}\n".encode()
        r = ml("exec", sid, "--", "cat", "/tmp/log", check=True)
        assert r.stdout.decode().split() == [str(i) for i in range(20)]
        # 4 at once, each with its own binary stdin.
        blobs = [os.urandom(256 * 1024 + n) + bytes(range(256)) for n in range(4)]

        def one(n: int) -> subprocess.CompletedProcess[bytes]:
            return ml("exec", "-i", sid, "--", "sh", "-c", f"sha256sum; echo e{n} >&2; exit {n}",
                      input=blobs[n])

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(4)))
        for n, r in enumerate(results):
            assert r.returncode == n, r.stderr
            assert r.stdout.decode().split()[0] == hashlib.sha256(blobs[n]).hexdigest()
            assert r.stderr == f"e{n}\n".encode()
        # -e, -w, -u
        r = ml("exec", "-e", "A=b c", "-w", "/tmp", "-u", "65534", sid, "--", "sh", "-c",
               'echo "$A"; pwd; id -u', check=True)
        assert r.stdout.decode().split("\n")[:3] == ["b c", "/tmp", "65534"]
        # kill: stopped, still listed, exec refused; rm: gone.
        assert ml("kill", sid, check=True).stdout == f"Killed {sid}\n".encode()
        assert _ls(ml)[sid]["status"] == "stopped"
        _one_line_error(ml("exec", sid, "--", "true"), sid, "stopped")
        assert not (state_dir / "sandboxes" / sid / "upper.ext4").exists()
        assert ml("rm", sid, check=True).stdout == f"Removed {sid}\n".encode()
        assert sid not in _ls(ml)
    finally:
        ml("rm", "-f", sid)


def test_ctrl_c_reaches_the_command(ml: Run, state_dir: Path) -> None:
    sid = _start(ml)
    try:
        p = subprocess.Popen(
            [MATCHLOCK, "exec", sid, "--", "sh", "-c",
             "trap 'echo got INT; exit 3' INT; echo ready; while :; do sleep 0.1; done"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None
        assert p.stdout.readline() == b"ready\n"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 3, err
        assert out == b"got INT\n"
        # A client that goes away takes its command with it; the sandbox stays.
        p = subprocess.Popen([MATCHLOCK, "exec", sid, "--", "sh", "-c", "echo up; sleep 1000"],
                             stdout=subprocess.PIPE)
        assert p.stdout is not None and p.stdout.readline() == b"up\n"
        p.kill()
        p.wait()
        r = ml("exec", sid, "--", "true")
        assert r.returncode == 0, r.stderr
    finally:
        ml("rm", "-f", sid)


def test_state_and_background_processes_persist_between_execs(ml: Run, python_image: str) -> None:
    sid = _start(ml, "--image", python_image)
    try:
        # A server started in the background by one exec returns at once and serves the next.
        t0 = time.monotonic()
        r = ml("exec", sid, "--", "sh", "-c",
               "cd /tmp && echo served > index.html && "
               "nohup python3 -m http.server 8000 >/tmp/log 2>&1 &")
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 < 30
        deadline = time.monotonic() + 60
        while True:
            r = ml("exec", sid, "--", "wget", "-qO-", "http://127.0.0.1:8000/index.html")
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert (r.returncode, r.stdout) == (0, b"served\n"), r.stderr
        # A background child that keeps stdout open: the exec still ends with its own code.
        t0 = time.monotonic()
        r = ml("exec", sid, "--", "sh", "-c", "sleep 1000 & echo started; exit 4")
        assert (r.returncode, r.stdout) == (4, b"started\n"), r.stderr
        assert time.monotonic() - t0 < 30
        r = ml("exec", sid, "--", "ps", "-o", "comm", check=True)
        assert r.stdout.split().count(b"sleep") == 1, r.stdout
        assert b"python3" in r.stdout.split()
    finally:
        ml("rm", "-f", sid)


def test_exec_streams_64mib_each_way_byte_exact(ml: Run) -> None:
    # Through the supervisor's socket: stdin in, back out in 4 KiB guest writes, and stderr
    # alongside (its own stream, in order).
    sid = _start(ml, "--no-network")
    try:
        data = os.urandom(64 << 20)
        r = ml("exec", "-i", sid, "--", "sh", "-c",
               "echo begin >&2; dd bs=4096 2>/dev/null; echo end >&2", input=data, timeout=600)
        assert r.returncode == 0, r.stderr
        assert r.stderr == b"begin\nend\n"
        assert len(r.stdout) == len(data)
        assert hashlib.sha256(r.stdout).digest() == hashlib.sha256(data).digest()
    finally:
        ml("rm", "-f", sid)


def test_one_shot_run_with_a_background_child_still_ends(ml: Run) -> None:
    # The VM goes away with the command, background processes and all (ml checks leftovers).
    t0 = time.monotonic()
    r = ml("run", "--", "sh", "-c", "sleep 1000 & echo hi; exit 6")
    assert (r.returncode, r.stdout) == (6, b"hi\n"), r.stderr
    assert time.monotonic() - t0 < 60


def test_background_command_and_timeout_bound_the_lifetime(ml: Run, state_dir: Path) -> None:
    sid = _start(ml, "--timeout", "20", "--", "sh", "-c", "echo made > /tmp/made")
    try:
        deadline = time.monotonic() + 60
        while True:
            r = ml("exec", sid, "--", "cat", "/tmp/made")
            # The shell creates the file before it writes to it: an exec in between reads it
            # empty.
            if (r.returncode == 0 and r.stdout) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.stdout == b"made\n", r.stderr
        deadline = time.monotonic() + 90
        while _ls(ml)[sid]["status"] == "running":
            assert time.monotonic() < deadline, "--timeout did not stop the sandbox"
            time.sleep(0.5)
        assert _ls(ml)[sid]["status"] == "stopped"
        log = (state_dir / "sandboxes" / sid / "supervisor.log").read_text()
        assert "timed out after 20s" in log
    finally:
        ml("rm", "-f", sid)


def test_kill_9_of_the_supervisor_shows_crashed_and_gc_cleans(ml: Run, state_dir: Path) -> None:
    sid = _start(ml)
    pid = int(str(_ls(ml)[sid]["pid"]))
    vmm = json.loads(ml("inspect", sid, check=True).stdout)["vmm"]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _ls(ml)[sid]["status"] != "crashed":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    while Path(f"/proc/{vmm}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{vmm}").exists(), "the VMM outlived its supervisor"
    _one_line_error(ml("exec", sid, "--", "true"), sid, "crashed")
    r = ml("gc", check=True)
    assert f"removed {sid}" in r.stdout.decode()
    assert leftovers(state_dir) == []
    assert sid not in _ls(ml)


def test_kill_all_and_rm_force(ml: Run) -> None:
    a, b = _start(ml), _start(ml)
    _one_line_error(ml("rm", a), a, "running")
    r = ml("list", "--json", "--running", check=True)
    assert {e["id"] for e in json.loads(r.stdout)} == {a, b}
    r = ml("ls", check=True)
    assert r.stdout.decode().split()[:5] == ["ID", "STATUS", "IMAGE", "CREATED", "PID"]
    r = ml("kill", "--all", check=True)
    assert set(r.stdout.decode().splitlines()) == {f"Killed {a}", f"Killed {b}"}
    statuses = _ls(ml)
    assert statuses[a]["status"] == statuses[b]["status"] == "stopped"
    assert json.loads(ml("ls", "--running", "--json", check=True).stdout) == []
    r = ml("rm", "--stopped", check=True)
    assert set(r.stdout.decode().splitlines()) == {f"Removed {a}", f"Removed {b}"}
    c = _start(ml)
    ml("rm", "-f", c, check=True)
    assert _ls(ml) == {}


def test_bad_input_is_one_line(ml: Run) -> None:
    _one_line_error(ml("exec", "vm-00000000", "--", "true"), "no such sandbox", "vm-00000000")
    _one_line_error(ml("exec", "../etc", "--", "true"), "invalid sandbox id")
    _one_line_error(ml("kill", "vm-00000000"), "no such sandbox")
    _one_line_error(ml("rm", "vm-00000000"), "no such sandbox")
    _one_line_error(ml("kill"), "--all")
    _one_line_error(ml("rm"), "--stopped")
    _one_line_error(ml("rm", "--stopped", "vm-00000000"), "--stopped")
    _one_line_error(ml("run", "-d", "-i", "--", "true"), "-d")
    _one_line_error(ml("run", "-d", "-t", "--", "true"), "-d")
    _one_line_error(ml("run", "-d", "--cpus", "x"), "--cpus")


def test_supervisor_refuses_bad_clients_and_keeps_serving(ml: Run, state_dir: Path) -> None:
    import socket

    from matchlock.sandbox import wire

    sid = _start(ml)
    try:
        path = str(state_dir / "sandboxes" / sid / "control.sock")
        bad = [
            b"garbage!",  # unknown frame type
            wire.encode(wire.STDIN, b"x"),  # not a request first
            wire.encode(wire.REQUEST, b"[1,2]"),  # not an object
            wire.encode_json(wire.REQUEST, {"op": "reboot"}),
            wire.encode_json(wire.REQUEST, {"op": "exec", "argv": ["true"], "pty": True}),
            wire.encode_json(wire.REQUEST, {"op": "exec", "argv": ["true"], "workdir": "tmp"}),
            wire.encode_json(wire.REQUEST, {"op": "exec", "argv": [], "env": ["A=b"]}),
        ]
        for data in bad:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(30)
                s.connect(path)
                s.sendall(data)
                got = wire.Decoder().feed(s.recv(65536))
                assert got and got[0].type == wire.ERROR, (data, got)
        # A bad signal ends that client's command; the sandbox is unharmed.
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(60)
            s.connect(path)
            s.sendall(wire.encode_json(wire.REQUEST, {"op": "exec", "argv": ["sleep", "100"]})
                      + wire.encode_signal(1000))
            while s.recv(65536):  # ends (the command is killed), never hangs
                pass
        r = ml("exec", sid, "--", "echo", "still here", check=True)
        assert r.stdout == b"still here\n"
    finally:
        ml("rm", "-f", sid)


def test_exec_with_a_pty(ml: Run, state_dir: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    from .test_interactive import _expect

    sid = _start(ml)
    try:
        pid, fd = pty.fork()
        if pid == 0:
            os.execv(MATCHLOCK, [MATCHLOCK, "exec", "-it", "-e", "PS1=PROMPT> ", sid, "--", "sh"])
        try:
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
            buf = bytearray()
            _expect(fd, b"PROMPT> ", buf)
            os.write(fd, b"stty size; tty\r")
            _expect(fd, b"30 100", buf)
            _expect(fd, b"/dev/pts/", buf)
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
            time.sleep(0.5)
            os.write(fd, b"stty size\r")
            _expect(fd, b"40 120", buf)
            os.write(fd, b"sleep 100\r")
            time.sleep(1)
            os.write(fd, b"\x03")  # Ctrl-C at the terminal reaches the guest's sleep
            _expect(fd, b"PROMPT> ", buf)
            os.write(fd, b"exit 5\r")
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 5
        finally:
            os.close(fd)
        _one_line_error(ml("exec", "-it", sid, "--", "sh"), "terminal")
    finally:
        ml("rm", "-f", sid)


@pytest.mark.parametrize("signo", [signal.SIGINT, signal.SIGKILL])
@pytest.mark.parametrize("delay", [0.05, 0.3, 0.5])
def test_ctrl_c_of_run_d_while_booting_leaves_nothing(ml: Run, state_dir: Path,
                                                      delay: float, signo: int) -> None:
    """Interrupted at any point of its start (also before its own handlers are in place, or
    by SIGKILL, which it cannot pass on), `run -d` leaves no sandbox behind that nobody
    knows the id of."""
    ml("run", "--", "true", check=True)  # the image's rootfs exists: no progress lines
    p = subprocess.Popen([MATCHLOCK, "run", "-d"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    time.sleep(delay)
    p.send_signal(signo)
    out, err = p.communicate(timeout=120)
    if out.strip():  # the id was printed (it was ready first): the user's sandbox, however
        # the launcher ended after that (even killed while Python shuts down)
        assert re.fullmatch(rb"vm-[0-9a-f]{8}\n", out), out
        ml("rm", "-f", out.decode().strip(), check=True)
    elif signo == signal.SIGINT:
        assert out == b""
        assert len(err.splitlines()) == 1 and err.startswith(b"matchlock: "), err
    deadline = time.monotonic() + 30
    while leftovers(state_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(state_dir) == []


def test_rm_of_a_crashed_sandbox_cleans_it(ml: Run, state_dir: Path) -> None:
    sid = _start(ml)
    os.kill(int(str(_ls(ml)[sid]["pid"])), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _ls(ml)[sid]["status"] != "crashed":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert ml("remove", sid, check=True).stdout == f"Removed {sid}\n".encode()
    assert leftovers(state_dir) == []
