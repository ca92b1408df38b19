"""The guest agent, driven over its --stdio test mode on the host (no VM).

The agent is built once per session into a temporary cache. Each test gets a fresh agent
process speaking the real protocol through matchlock.guest.protocol. Execs run in new PID and
mount namespaces with seccomp, which needs root.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import itertools
import os
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.faulty_writer import build_faulty_writer, faulty_writer_output

from matchlock.guest import build
from matchlock.guest.protocol import (
    HEADER,
    MAX_DATA,
    MAX_HOST_PAYLOAD,
    OUTPUT_FRAME_COST,
    OUTPUT_WINDOW,
    STDIN_WINDOW,
    ExecRequest,
    Frame,
    FrameDecoder,
    PrepareRequest,
    SetupRequest,
    T,
    encode_ca,
    encode_connect,
    encode_frame,
    encode_output_ack,
    encode_path,
    encode_resize,
    encode_resume,
    encode_signal,
    encode_sock_ack,
    encode_tlv,
    output_cost,
    parse_dirent,
    parse_exit,
    parse_hello,
    parse_result,
    parse_u32,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="execs need root (namespaces, seccomp)"),
    pytest.mark.skipif(shutil.which("musl-gcc") is None, reason="musl-gcc is not installed"),
    pytest.mark.timeout(120),
]

PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUSYBOX = "/bin/busybox"


@pytest.fixture(scope="session")
def agent_binary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("cache")
    # The environment is restored before yielding: this fixture lives for the whole session,
    # and later tests must see the real cache again.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MATCHLOCK_CACHE_DIR", str(cache))
        mp.delenv("MATCHLOCK_AGENT", raising=False)
        path = build.build_agent(lambda line: print(line))
        assert build.cached_agent() == path
        assert build.build_agent(lambda line: None) == path  # cached: no rebuild
    yield path


@dataclass
class ExecResult:
    stdout: bytes
    stderr: bytes
    code: int
    signal: int
    pid: int | None


class Agent:
    """One `agent --stdio` process and a non-blocking frame pump around it."""

    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen(
            [str(binary), "--stdio"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._win = self.proc.stdin.fileno()
        self._rout = self.proc.stdout.fileno()
        os.set_blocking(self._win, False)
        self._wbuf = bytearray()
        self._dec = FrameDecoder()
        self.inbox: collections.deque[Frame] = collections.deque()
        self._chan = itertools.count(1)
        self.eof = False
        # Exec output is acknowledged as it arrives unless a test turns this off for a
        # channel (CONNECT channels acknowledge with SOCK_ACK, by hand).
        self.no_auto_ack: set[int] = set()
        self.connects: set[int] = set()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    def new_channel(self) -> int:
        return next(self._chan)

    def send_raw(self, data: bytes) -> None:
        self._wbuf += data
        self.pump(0)

    def send(self, ftype: T, chan: int, payload: bytes = b"") -> None:
        if ftype == T.CONNECT:
            self.connects.add(chan)
        self.send_raw(encode_frame(ftype, chan, payload))

    def pump(self, timeout: float) -> None:
        """Move bytes both ways for at most `timeout` seconds (returns after any progress)."""
        wfds = [self._win] if self._wbuf else []
        r, w, _ = select.select([] if self.eof else [self._rout], wfds, [], timeout)
        if w:
            n = os.write(self._win, self._wbuf[:MAX_HOST_PAYLOAD])
            del self._wbuf[:n]
        if r:
            data = os.read(self._rout, 1 << 20)
            if not data:
                self.eof = True
            frames = self._dec.feed(data)
            self.inbox.extend(frames)
            acks: dict[int, int] = {}
            for f in frames:
                if (f.type in (T.STDOUT, T.STDERR) and f.channel not in self.connects
                        and f.channel not in self.no_auto_ack):
                    acks[f.channel] = acks.get(f.channel, 0) + output_cost(len(f.payload))
            for chan, n in acks.items():
                self._wbuf += encode_frame(T.OUTPUT_ACK, chan, encode_output_ack(n))

    def flush(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self._wbuf:
            assert time.monotonic() < deadline, "the agent stopped reading"
            self.pump(0.1)

    def next_frame(
        self, match: Callable[[Frame], bool] = lambda f: True, timeout: float = 20
    ) -> Frame:
        deadline = time.monotonic() + timeout
        while True:
            for i, f in enumerate(self.inbox):
                if match(f):
                    del self.inbox[i]
                    return f
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching frame; inbox: {list(self.inbox)[:5]}")
            assert not self.eof, "the agent exited"
            self.pump(min(left, 0.5))

    def on(self, chan: int, timeout: float = 20) -> Frame:
        return self.next_frame(lambda f: f.channel == chan, timeout)

    # --- exec helpers ---

    def start(self, req: ExecRequest) -> int:
        chan = self.new_channel()
        self.send(T.EXEC, chan, req.encode())
        return chan

    def collect(self, chan: int, timeout: float = 30) -> ExecResult:
        out, err = bytearray(), bytearray()
        pid = None
        deadline = time.monotonic() + timeout
        while True:
            f = self.on(chan, deadline - time.monotonic())
            if f.type == T.STARTED:
                pid = parse_u32(f.payload, "STARTED")
            elif f.type == T.STDOUT:
                out += f.payload
            elif f.type == T.STDERR:
                err += f.payload
            elif f.type == T.EXIT:
                st = parse_exit(f.payload)
                return ExecResult(bytes(out), bytes(err), st.code, st.signal, pid)
            elif f.type != T.STDIN_ACK:
                raise AssertionError(f"unexpected frame {f}")

    def run(
        self,
        argv: list[str],
        *,
        env: list[str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tty: bool = False,
        privileged: bool = False,
        rows: int = 24,
        cols: int = 80,
        timeout: float = 30,
    ) -> ExecResult:
        req = ExecRequest(
            argv,
            env=[PATH] if env is None else env,
            cwd=cwd,
            user=user,
            tty=tty,
            privileged=privileged,
            rows=rows,
            cols=cols,
        )
        return self.collect(self.start(req), timeout)

    def wait_output(self, chan: int, needle: bytes, timeout: float = 10) -> bytes:
        """Consume STDOUT of chan until it contains needle."""
        got = bytearray()
        while needle not in got:
            f = self.on(chan, timeout)
            assert f.type in (T.STARTED, T.STDOUT, T.STDIN_ACK), f
            if f.type == T.STDOUT:
                got += f.payload
        return bytes(got)

    def result(self, chan: int) -> tuple[int, str]:
        f = self.on(chan)
        assert f.type == T.RESULT, f
        r = parse_result(f.payload)
        return r.errno, r.message


@pytest.fixture
def agent(agent_binary: Path) -> Iterator[Agent]:
    a = Agent(agent_binary)
    try:
        hello = a.next_frame(timeout=10)
        assert hello.type == T.HELLO
        yield a
        # The agent survived everything the test did: it still answers.
        a.send(T.PING, 0, b"bye")
        pong = a.next_frame(lambda f: f.type == T.PONG, timeout=10)
        assert pong.payload == b"bye"
    finally:
        a.close()


# --- basics ---------------------------------------------------------------------------------


def test_hello(agent_binary: Path) -> None:
    a = Agent(agent_binary)
    try:
        f = a.next_frame(timeout=10)
        assert f.type == T.HELLO and f.channel == 0
        hello = parse_hello(f.payload)
        assert hello.version == 1
        assert hello.agent.startswith("matchlock-agent")
        assert 0 < hello.boot_ns < time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    finally:
        a.close()


def test_setup_is_a_noop_in_stdio_mode(agent: Agent) -> None:
    req = SetupRequest("box", "vda", None, time.time_ns(), os.urandom(32), ("10.0.0.1 proxy",))
    agent.send(T.SETUP, 0, req.encode())
    assert agent.result(0) == (0, "")
    agent.send(T.SETUP, 0, req.encode())
    assert agent.result(0)[0] == errno.EALREADY


def test_prepare_comes_once_and_only_before_setup(agent: Agent) -> None:
    prep = PrepareRequest("vda", "vdb").encode()
    agent.send(T.PREPARE, 0, prep)
    assert agent.result(0) == (0, "")
    agent.send(T.PREPARE, 0, prep)
    assert agent.result(0)[0] == errno.EALREADY
    req = SetupRequest("box", None, None, time.time_ns(), os.urandom(32))
    agent.send(T.SETUP, 0, req.encode())
    assert agent.result(0) == (0, "")


def test_prepare_after_setup_is_refused(agent: Agent) -> None:
    req = SetupRequest("box", "vda", None, time.time_ns(), os.urandom(32))
    agent.send(T.SETUP, 0, req.encode())
    assert agent.result(0) == (0, "")
    agent.send(T.PREPARE, 0, PrepareRequest("vda", None).encode())
    assert agent.result(0)[0] == errno.EALREADY


PEM = b"-----BEGIN CERTIFICATE-----\nQUJD\n-----END CERTIFICATE-----\n"


def test_a_late_ca_comes_once_right_behind_setup(agent: Agent) -> None:
    # (Installing it is PID 1's job: tests/integration/test_guest_ca.py.)
    agent.send(T.CA, 0, encode_ca(PEM))  # before SETUP
    assert agent.result(0)[0] == errno.EALREADY
    req = SetupRequest("box", "vda", None, time.time_ns(), os.urandom(32))
    agent.send(T.SETUP, 0, req.encode())
    agent.send(T.CA, 0, encode_tlv([(12, PEM), (1, b"host")]))  # pipelined: no wait
    assert agent.result(0) == (0, "")
    code, msg = agent.result(0)
    assert code == errno.EINVAL and "bad field 1" in msg
    agent.send(T.CA, 0, encode_tlv([]))
    assert agent.result(0)[0] == errno.EINVAL
    agent.send(T.CA, 0, encode_ca(PEM))
    assert agent.result(0) == (0, "")
    agent.send(T.CA, 0, encode_ca(PEM))
    assert agent.result(0)[0] == errno.EALREADY


def test_resume_checks_its_fields(agent: Agent) -> None:
    # The clock and entropy themselves are set only as PID 1 (tests/integration/test_pool.py).
    agent.send(T.RESUME, 0, encode_resume(time.time_ns(), os.urandom(32)))
    assert agent.result(0) == (0, "")
    agent.send(T.RESUME, 0, encode_tlv([(5, os.urandom(32))]))  # no CLOCK_NS
    code, msg = agent.result(0)
    assert code == errno.EINVAL and "CLOCK_NS" in msg
    agent.send(T.RESUME, 0, encode_tlv([(4, struct.pack(">Q", 1)), (1, b"host")]))
    code, msg = agent.result(0)
    assert code == errno.EINVAL and "bad field 1" in msg
    agent.send(T.RESUME, 0, encode_tlv([(4, struct.pack(">Q", 1)), (5, b"short")]))
    assert agent.result(0)[0] == errno.EINVAL
    agent.send(T.RESUME, 7, encode_resume(time.time_ns(), os.urandom(32)))  # control only
    agent.send(T.PING, 0, b"still here")
    f = agent.next_frame(lambda f: f.type in (T.PONG, T.RESULT), timeout=10)
    assert (f.type, f.payload) == (T.PONG, b"still here")


def test_shutdown_exits_and_kills_execs(agent_binary: Path) -> None:
    a = Agent(agent_binary)
    try:
        a.next_frame(timeout=10)
        chan = a.start(ExecRequest(["sh", "-c", "echo $PPID; sleep 100"], env=[PATH]))
        assert a.on(chan).type == T.STARTED
        a.send(T.SHUTDOWN, 0)
        assert a.proc.wait(timeout=10) == 0
    finally:
        a.close()


def test_eof_on_input_shuts_down(agent_binary: Path) -> None:
    a = Agent(agent_binary)
    try:
        a.next_frame(timeout=10)
        assert a.proc.stdin is not None
        a.proc.stdin.close()
        assert a.proc.wait(timeout=10) == 0
    finally:
        a.close()


# --- exit status ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code"),
    [(["true"], 0), (["false"], 1), (["sh", "-c", "exit 42"], 42)],
)
def test_exit_codes(agent: Agent, argv: list[str], code: int) -> None:
    r = agent.run(argv)
    assert (r.code, r.signal) == (code, 0)
    assert r.pid is not None and r.pid > 0


def test_death_by_signal(agent: Agent) -> None:
    r = agent.run(["sh", "-c", "kill -TERM $$"])
    assert (r.code, r.signal) == (143, 15)


def test_stdout_and_stderr_are_separate_and_ordered(agent: Agent) -> None:
    script = "for i in 1 2 3; do echo out$i; echo err$i >&2; done"
    r = agent.run(["sh", "-c", script])
    assert r.stdout == b"out1\nout2\nout3\n"
    assert r.stderr == b"err1\nerr2\nerr3\n"
    assert r.code == 0


def test_many_small_writes_keep_each_streams_order(agent: Agent) -> None:
    script = "i=0; while [ $i -lt 2000 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"
    r = agent.run(["sh", "-c", script], timeout=60)
    assert r.code == 0, r.stderr
    assert r.stdout.decode().split() == [f"out{i}" for i in range(2000)]
    assert r.stderr.decode().split() == [f"err{i}" for i in range(2000)]


def test_small_writes_are_coalesced_into_few_frames(agent: Agent) -> None:
    # 20,000 writes of 100 bytes: read as they come, they would be thousands of frames.
    chan = agent.start(ExecRequest(["dd", "if=/dev/zero", "bs=100", "count=20000"], env=[PATH]))
    got, frames = 0, 0
    while (f := agent.on(chan)).type != T.EXIT:
        if f.type == T.STDOUT:
            got, frames = got + len(f.payload), frames + 1
    assert parse_exit(f.payload).code == 0
    assert got == 2_000_000
    assert frames < 1000, frames


def test_held_output_still_goes_out_while_the_command_runs(agent: Agent) -> None:
    # Lines written one by one start holds: what comes during a hold must go out when it ends,
    # not wait for the command to end (a hang-up).
    script = "i=0; while [ $i -lt 50 ]; do echo $i; i=$((i+1)); done; sleep 30"
    chan = agent.start(ExecRequest(["sh", "-c", script], env=[PATH]))
    got = agent.wait_output(chan, b"\n49\n", timeout=5)
    assert got.decode().split() == [str(i) for i in range(50)]
    agent.send(T.KILL, chan)
    assert agent.collect(chan).code == 137


def test_20mb_of_output_is_byte_exact(agent: Agent) -> None:
    script = (
        "exec 3>&1; head -c 20000000 /dev/urandom | tee /dev/fd/3 | sha256sum | cut -d' ' -f1 >&2"
    )
    r = agent.run(["sh", "-c", script], timeout=60)
    assert r.code == 0, r.stderr
    assert len(r.stdout) == 20_000_000
    assert hashlib.sha256(r.stdout).hexdigest() == r.stderr.decode().strip()



# Output goes out zero-copy (splice) in full 64 KiB frames, copied otherwise: whatever the
# mix, each stream arrives byte-exact and in order, and the frames stay in step.


def test_big_stdout_and_stderr_at_once_are_each_byte_exact(agent: Agent, tmp_path: Path) -> None:
    a, b = os.urandom(24_000_000), os.urandom(24_000_000) + b"tail"
    (tmp_path / "a").write_bytes(a)
    (tmp_path / "b").write_bytes(b)
    r = agent.run(["sh", "-c", f"cat {tmp_path}/a & cat {tmp_path}/b >&2; wait"], timeout=90)
    assert r.code == 0
    assert r.stdout == a and r.stderr == b


def test_stdout_closed_early_while_stderr_goes_on(agent: Agent, tmp_path: Path) -> None:
    data = os.urandom(3_000_000)
    (tmp_path / "a").write_bytes(data)
    script = f"cat {tmp_path}/a; exec 1>&-; head -c 2000000 {tmp_path}/a >&2; echo end >&2"
    r = agent.run(["sh", "-c", script], timeout=60)
    assert r.code == 0
    assert r.stdout == data
    assert r.stderr == data[:2_000_000] + b"end\n"


def test_kill_during_bulk_output_leaves_the_stream_in_step(agent: Agent) -> None:
    chan = agent.start(ExecRequest(["cat", "/dev/zero"], env=[PATH]))
    got = 0
    while got < 4 * MAX_DATA:
        f = agent.on(chan)
        assert f.type in (T.STARTED, T.STDOUT), f
        if f.type == T.STDOUT:
            assert f.payload == bytes(len(f.payload))
            got += len(f.payload)
    agent.send(T.KILL, chan)
    r = agent.collect(chan)
    assert r.code == 137 and r.stdout == bytes(len(r.stdout))
    # The next exec's frames are whole and exact: nothing of the killed one was cut.
    r = agent.run(["sh", "-c", "head -c 5000000 /dev/urandom | tee /dev/fd/2 | sha256sum"])
    assert r.code == 0 and len(r.stderr) == 5_000_000
    assert r.stdout.split()[0].decode() == hashlib.sha256(r.stderr).hexdigest()


@pytest.fixture(scope="session")
def faulty_writer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_faulty_writer(tmp_path_factory.mktemp("faulty"))


@pytest.mark.parametrize("every", [1, 5, 64])
def test_writes_from_bad_addresses_leave_the_output_exact(
    agent: Agent, faulty_writer: Path, every: int
) -> None:
    r = agent.run([str(faulty_writer), "3000", str(every)], timeout=60)
    assert r.code == 0 and r.stderr == b""
    assert r.stdout == faulty_writer_output(3000)

# --- stdin ----------------------------------------------------------------------------------


def test_binary_stdin_is_byte_exact_within_the_window(agent: Agent) -> None:
    data = os.urandom(5_000_000)
    chan = agent.start(ExecRequest(["sha256sum"], env=[PATH], stdin=True))
    sent = acked = 0
    out = bytearray()
    while True:
        while sent < len(data) and sent - acked < STDIN_WINDOW:
            n = min(MAX_DATA, len(data) - sent, STDIN_WINDOW - (sent - acked))
            agent.send(T.STDIN, chan, data[sent : sent + n])
            sent += n
            if sent == len(data):
                agent.send(T.STDIN, chan, b"")
        f = agent.on(chan)
        if f.type == T.STDIN_ACK:
            acked += parse_u32(f.payload, "ack")
            assert acked <= sent
        elif f.type == T.STDOUT:
            out += f.payload
        elif f.type == T.EXIT:
            assert parse_exit(f.payload).code == 0
            break
    assert acked == len(data)
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_stdin_the_process_never_reads_does_not_block_the_agent(agent: Agent) -> None:
    idle = agent.start(ExecRequest(["sleep", "60"], env=[PATH], stdin=True))
    for _ in range(STDIN_WINDOW // MAX_DATA):
        agent.send(T.STDIN, idle, b"x" * MAX_DATA)
    agent.flush()
    t0 = time.monotonic()
    r = agent.run(["echo", "still here"])
    assert r.stdout == b"still here\n"
    assert time.monotonic() - t0 < 5
    agent.send(T.KILL, idle)
    r = agent.collect(idle)
    assert (r.code, r.signal) == (137, 9)


def test_stdin_after_the_process_closed_it_is_acked_as_dropped(agent: Agent) -> None:
    script = "exec 0<&-; echo closed; sleep 1; echo done"
    chan = agent.start(ExecRequest(["sh", "-c", script], env=[PATH], stdin=True))
    agent.wait_output(chan, b"closed")
    total = 4 * MAX_DATA
    for _ in range(4):
        agent.send(T.STDIN, chan, b"y" * MAX_DATA)
    acked = 0
    while acked < total:
        f = agent.on(chan)
        assert f.type == T.STDIN_ACK, f  # all of it, before the process ends
        acked += parse_u32(f.payload, "ack")
    assert acked == total
    r = agent.collect(chan)
    assert r.stdout == b"done\n" and r.code == 0


def test_a_reader_that_stops_early(agent: Agent) -> None:
    chan = agent.start(ExecRequest(["head", "-c", "10"], env=[PATH], stdin=True))
    total = 4 * MAX_DATA
    for _ in range(4):
        agent.send(T.STDIN, chan, b"y" * MAX_DATA)
    acked = 0
    out = bytearray()
    while True:
        f = agent.on(chan)
        if f.type == T.STDIN_ACK:
            acked += parse_u32(f.payload, "ack")
        elif f.type == T.STDOUT:
            out += f.payload
        elif f.type == T.EXIT:
            assert parse_exit(f.payload).code == 0
            break
    # STDIN that arrives after EXIT is for a closed channel: ignored, never acknowledged.
    assert acked <= total
    assert out == b"y" * 10


def test_stdin_without_the_flag_is_dev_null(agent: Agent) -> None:
    r = agent.run(["sh", "-c", "cat; echo end"])
    assert r.stdout == b"end\n"


def test_stdin_overrunning_the_window_kills_the_exec(agent: Agent) -> None:
    chan = agent.start(ExecRequest(["sleep", "60"], env=[PATH], stdin=True))
    for _ in range(STDIN_WINDOW // MAX_DATA + 2):
        agent.send(T.STDIN, chan, b"z" * MAX_DATA)
    r = agent.collect(chan)
    assert (r.code, r.signal) == (137, 9)
    log = agent.next_frame(lambda f: f.type == T.LOG)
    assert b"window" in log.payload


# --- command launch -------------------------------------------------------------------------


def test_command_not_found(agent: Agent) -> None:
    r = agent.run(["no-such-command-matchlock"])
    assert r.code == 127
    assert r.stderr == b"matchlock: no-such-command-matchlock: command not found\n"


def test_argv0_is_looked_up_in_the_exec_path_not_the_agents(agent: Agent) -> None:
    r = agent.run(["true"], env=["PATH=/nonexistent"])
    assert r.code == 127
    r = agent.run(["busybox", "true"], env=["PATH=/nonexistent:/bin"])
    assert r.code == 0


def test_missing_explicit_path(agent: Agent) -> None:
    r = agent.run(["/nonexistent/cmd"])
    assert r.code == 127
    assert r.stderr == b"matchlock: /nonexistent/cmd: No such file or directory\n"


def test_permission_denied(agent: Agent, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    r = agent.run([str(script)])
    assert r.code == 126
    assert r.stderr == f"matchlock: {script}: permission denied\n".encode()
    r = agent.run(["script.sh"], env=[f"PATH={tmp_path}"])
    assert r.code == 126
    assert b"permission denied" in r.stderr


def test_cwd(agent: Agent, tmp_path: Path) -> None:
    assert agent.run(["pwd"], cwd=str(tmp_path)).stdout == f"{tmp_path}\n".encode()
    assert agent.run(["pwd"]).stdout == b"/\n"
    r = agent.run(["pwd"], cwd="/nonexistent-dir")
    assert r.code == 126
    assert r.stderr == b"matchlock: cwd /nonexistent-dir: No such file or directory\n"


@pytest.mark.parametrize(
    ("user", "ids"),
    [
        (None, "0 0"),
        ("root", "0 0"),
        ("nobody", "65534 65534"),
        ("65534", "65534 65534"),
        ("1000:1000", "1000 1000"),
        ("4242", "4242 4242"),
        ("nobody:0", "65534 0"),
        ("nobody:root", "65534 0"),
    ],
)
def test_user(agent: Agent, user: str | None, ids: str) -> None:
    r = agent.run(["sh", "-c", 'echo "$(id -u) $(id -g)"'], user=user)
    assert r.code == 0, r.stderr
    assert r.stdout.decode().strip() == ids


def test_supplementary_groups(agent: Agent) -> None:
    # Debian's /etc/group lists no members for root; numeric unknown users get only their gid.
    assert agent.run(["id", "-G"], user="1000:1000").stdout == b"1000\n"
    groups = Path("/etc/group").read_text().splitlines()
    expected = {"0"} | {ln.split(":")[2] for ln in groups if "root" in ln.split(":")[3].split(",")}
    assert set(agent.run(["id", "-G"]).stdout.split()) == {g.encode() for g in expected}


def test_unknown_user_or_group(agent: Agent) -> None:
    r = agent.run(["true"], user="no-such-user-x")
    assert r.code == 126
    assert r.stderr == b'matchlock: user "no-such-user-x": not found in /etc/passwd\n'
    r = agent.run(["true"], user="nobody:no-such-group-x")
    assert r.code == 126
    assert r.stderr == b'matchlock: group "no-such-group-x": not found in /etc/group\n'


def test_environment_is_exactly_what_was_given_plus_home(agent: Agent) -> None:
    r = agent.run(["/usr/bin/env"], env=["A=1", "B=two words", PATH])
    assert sorted(r.stdout.decode().splitlines()) == sorted(
        ["A=1", "B=two words", PATH, "HOME=/root"]
    )
    r = agent.run(["/usr/bin/env"], env=["HOME=/x"], user="nobody")
    assert r.stdout == b"HOME=/x\n"
    home = next(
        ln.split(":")[5]
        for ln in Path("/etc/passwd").read_text().splitlines()
        if ln.startswith("nobody:")
    )
    r = agent.run(["/usr/bin/env"], env=[], user="nobody")
    assert r.stdout == f"HOME={home}\n".encode()
    r = agent.run(["/usr/bin/env"], env=[], user="4242")
    assert r.stdout == b"HOME=/\n"


def test_pid_namespace(agent: Agent) -> None:
    r = agent.run(["sh", "-c", "echo $$; ls /proc; cat /proc/1/comm"])
    lines = r.stdout.decode().split()
    assert lines[0] == "2"  # pid 1 is the sandbox's init
    assert lines[-1] == "matchlock-init"
    pids = sorted(int(x) for x in lines[1:-1] if x.isdigit())
    assert pids[0] == 1 and len(pids) <= 4, pids


def _comms(agent: Agent) -> list[str]:
    # A process may exit between the glob and its read: skip it rather than fail the read.
    r = agent.run(["sh", "-c", "for f in /proc/[0-9]*/comm; do read c < $f && echo $c; done"
                                " 2>/dev/null; true"])
    assert r.code == 0, r.stderr
    return r.stdout.decode().split()


def test_execs_share_the_sandbox_but_never_see_the_agent(agent: Agent) -> None:
    sleeper = agent.start(ExecRequest(["sleep", "60"], env=[PATH]))
    assert agent.on(sleeper).type == T.STARTED
    deadline = time.monotonic() + 10
    while "sleep" not in (comms := _comms(agent)):  # STARTED comes before its execve
        assert time.monotonic() < deadline, comms
    assert sorted(comms) == ["matchlock-init", "sh", "sleep"], comms  # (sh globbed before cat)
    agent_comm = Path(f"/proc/{agent.proc.pid}/comm").read_text().strip()
    assert agent_comm not in comms
    agent.send(T.KILL, sleeper)
    assert agent.collect(sleeper).code == 137


def _alive(agent: Agent, pid: int) -> str:
    """The comm of pid in the sandbox, or "" when it is gone (or a zombie)."""
    r = agent.run(["sh", "-c", f"grep -q '^State:.*Z' /proc/{pid}/status || cat /proc/{pid}/comm"])
    return r.stdout.decode().strip()


def test_a_background_process_outlives_its_exec(agent: Agent) -> None:
    r = agent.run(["sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!"])
    assert r.code == 0
    pid = int(r.stdout)
    for _ in range(3):
        assert _alive(agent, pid) == "sleep"
    # It is still the sandbox's: a signal from a later exec reaches it, and the init reaps it.
    assert agent.run(["kill", str(pid)]).code == 0
    deadline = time.monotonic() + 10
    while _alive(agent, pid):
        assert time.monotonic() < deadline, "the killed orphan was not reaped"
        time.sleep(0.05)


def test_background_child_holding_stdout_ends_the_exec_after_the_grace(agent: Agent) -> None:
    # Output written before the command exits arrives whole (more than a pipe holds), the
    # exit code is the command's, and EXIT waits for the holder only a bounded time.
    t0 = time.monotonic()
    r = agent.run(["sh", "-c", "sleep 1000 & echo $!; head -c 300000 /dev/zero; exit 3"])
    took = time.monotonic() - t0
    assert r.code == 3 and r.signal == 0
    pid_line, _, zeros = r.stdout.partition(b"\n")
    assert zeros == b"\0" * 300000
    assert 0.4 < took < 5, took
    # Its later output is read and dropped: it neither blocks nor dies of SIGPIPE.
    r = agent.run(["sh", "-c", "(sleep 1; head -c 1000000 /dev/zero; sleep 1000) & echo $!"])
    writer = int(r.stdout)
    time.sleep(2)
    assert _alive(agent, writer) == "sleep"
    assert _alive(agent, int(pid_line)) == "sleep"


def test_output_of_a_background_child_before_the_grace_ends_arrives(agent: Agent) -> None:
    r = agent.run(["sh", "-c", "(sleep 0.1; echo late; exec sleep 1000) & echo early"])
    assert r.stdout == b"early\nlate\n" and r.code == 0


def test_kill_during_the_grace_ends_the_exec_at_once(agent: Agent) -> None:
    chan = agent.start(ExecRequest(["sh", "-c", "sleep 1000 & echo $!"], env=[PATH]))
    pid = int(agent.wait_output(chan, b"\n"))
    time.sleep(0.2)  # sh exits right after the echo; the sleep holds its stdout
    agent.send(T.KILL, chan)
    r = agent.collect(chan, timeout=10)
    assert r.code == 0  # the command had exited on its own
    assert _alive(agent, pid) == "sleep"  # KILL is for the command's group; it was done


def test_execs_cannot_signal_the_sandbox_init(agent: Agent) -> None:
    r = agent.run(["sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!"])
    bg = int(r.stdout)
    r = agent.run(["sh", "-c", "kill -9 1; kill -TERM 1; kill -INT 1; echo sent"])
    assert r.stdout == b"sent\n"
    assert _alive(agent, 1) == "matchlock-init"
    assert _alive(agent, bg) == "sleep"


def test_signals_reach_only_their_own_exec(agent: Agent) -> None:
    a = agent.start(ExecRequest(["sh", "-c", "sleep 100 & wait"], env=[PATH]))
    b = agent.start(ExecRequest(["sleep", "100"], env=[PATH]))
    assert agent.on(a).type == T.STARTED and agent.on(b).type == T.STARTED
    time.sleep(0.3)
    agent.send(T.SIGNAL, a, encode_signal(signal.SIGTERM))
    assert agent.collect(a, timeout=10).code == 143
    deadline = time.monotonic() + 10  # a's background sleep was in its group too: it dies
    while (comms := _comms(agent)).count("sleep") != 1:
        assert time.monotonic() < deadline, comms
    agent.send(T.KILL, b)
    assert agent.collect(b, timeout=10).code == 137


def test_background_processes_die_with_the_agent(agent_binary: Path) -> None:
    a = Agent(agent_binary)
    try:
        assert a.next_frame(timeout=10).type == T.HELLO
        r = a.run(["sh", "-c", "exec sleep 4242 >/dev/null 2>&1 &"])
        assert r.code == 0
    finally:
        a.close()
    deadline = time.monotonic() + 10
    while any(_host_cmdline(p) == b"sleep\x004242\x00" for p in os.listdir("/proc")):
        assert time.monotonic() < deadline, "a sandbox process outlived the agent"
        time.sleep(0.05)


def _host_cmdline(pid: str) -> bytes:
    if not pid.isdigit():
        return b""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# --- hardening ------------------------------------------------------------------------------

PTRACE_HELPER = r"""
#include <errno.h>
#include <stdio.h>
#include <sys/ptrace.h>
int main(void) {
    long r = ptrace(PTRACE_TRACEME, 0, 0, 0);
    printf("%ld %d\n", r, r < 0 ? errno : 0);
    return 0;
}
"""


@pytest.fixture(scope="session")
def ptrace_helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    d = tmp_path_factory.mktemp("ptrace")
    (d / "t.c").write_text(PTRACE_HELPER)
    subprocess.run(["gcc", "-O1", "-o", str(d / "t"), str(d / "t.c")], check=True)
    return d / "t"


def test_seccomp_blocks_ptrace_unless_privileged(agent: Agent, ptrace_helper: Path) -> None:
    r = agent.run([str(ptrace_helper)])
    assert r.stdout == f"-1 {errno.EPERM}\n".encode()
    r = agent.run([str(ptrace_helper)], privileged=True)
    assert r.stdout == b"0 0\n"


def _status_fields(out: bytes) -> dict[str, str]:
    fields = {}
    for line in out.decode().splitlines():
        k, _, v = line.partition(":")
        fields[k] = v.strip()
    return fields


def test_capabilities_no_new_privs_and_seccomp_mode(agent: Agent) -> None:
    dropped = {12, 13, 16, 17, 19, 21, 22, 23, 24, 25, 38, 39}
    st = _status_fields(agent.run(["cat", "/proc/self/status"]).stdout)
    bnd = int(st["CapBnd"], 16)
    assert all(not bnd & (1 << c) for c in dropped)
    for name in ("CapPrm", "CapInh", "CapAmb"):
        assert all(not int(st[name], 16) & (1 << c) for c in dropped), name
    assert bnd & (1 << 0)  # CAP_CHOWN stays
    assert int(st["CapEff"], 16) == bnd  # root keeps the rest
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    st = _status_fields(agent.run(["cat", "/proc/self/status"], privileged=True).stdout)
    # Privileged keeps every capability the agent has: here, whatever this host gave us.
    own = _status_fields(Path("/proc/self/status").read_bytes())
    assert int(st["CapBnd"], 16) == int(own["CapBnd"], 16)
    assert own["CapBnd"] != f"{bnd:016x}"
    assert st["NoNewPrivs"] == "0" and st["Seccomp"] == "0"
    st = _status_fields(agent.run(["cat", "/proc/self/status"], user="nobody").stdout)
    assert int(st["CapEff"], 16) == 0


def test_command_gets_the_original_fd_limit(agent: Agent) -> None:
    r = agent.run(["sh", "-c", "ulimit -n"])
    assert int(r.stdout) == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_kernel_files_are_read_only_in_a_default_exec(agent: Agent) -> None:
    # Checked with access(2) only: a write that got through would land on this host.
    script = ("for p in /sys /sys/kernel /proc/sys/kernel/hostname /proc/sysrq-trigger; do "
              "[ -w $p ] && echo $p writable; done; grep -c ' /proc ' /proc/self/mountinfo")
    r = agent.run(["sh", "-c", script])
    assert r.stdout == b"1\n", r.stderr  # nothing writable; the exec's own /proc is mounted


def test_command_gets_default_signal_dispositions(agent: Agent) -> None:
    # The agent ignores SIGPIPE; the command must not inherit that.
    r = agent.run(["sh", "-c", "yes | head -c 3; echo"])
    assert r.stdout == b"y\ny\n"
    st = _status_fields(agent.run(["cat", "/proc/self/status"]).stdout)
    assert int(st["SigIgn"], 16) == 0
    assert int(st["SigBlk"], 16) == 0


# --- signals --------------------------------------------------------------------------------


def test_sigint_reaches_the_command(agent: Agent) -> None:
    chan = agent.start(ExecRequest(["sleep", "100"], env=[PATH]))
    assert agent.on(chan).type == T.STARTED
    time.sleep(0.2)
    agent.send(T.SIGNAL, chan, encode_signal(signal.SIGINT))
    r = agent.collect(chan, timeout=10)
    assert (r.code, r.signal) == (130, 2)


def test_signal_right_after_start_is_not_lost(agent: Agent) -> None:
    chan = agent.start(ExecRequest(["sleep", "100"], env=[PATH]))
    agent.send(T.SIGNAL, chan, encode_signal(signal.SIGTERM))
    r = agent.collect(chan, timeout=10)
    assert (r.code, r.signal) == (143, 15)


def test_kill_ends_a_process_that_ignores_sigterm(agent: Agent) -> None:
    chan = agent.start(ExecRequest(["sh", "-c", "trap '' TERM; echo ready; sleep 100"], env=[PATH]))
    agent.wait_output(chan, b"ready")
    agent.send(T.SIGNAL, chan, encode_signal(signal.SIGTERM))
    with pytest.raises(TimeoutError):
        agent.on(chan, timeout=0.5)
    agent.send(T.KILL, chan)
    r = agent.collect(chan, timeout=10)
    assert (r.code, r.signal) == (137, 9)


def test_frames_for_unknown_channels_are_ignored(agent: Agent) -> None:
    agent.send(T.STDIN, 999, b"data")
    agent.send(T.SIGNAL, 999, encode_signal(9))
    agent.send(T.RESIZE, 999, encode_resize(1, 1))
    agent.send(T.KILL, 999)
    agent.send(T.FILE_DATA_IN, 999, b"x")


# --- output credit (OUTPUT_ACK) ---------------------------------------------------------------


def _output_cost_until_quiet(agent: Agent, chan: int, quiet: float = 0.5) -> tuple[int, int]:
    """(credit used, payload bytes) of the output frames chan sent until it was quiet."""
    used = got = 0
    while True:
        try:
            f = agent.on(chan, timeout=quiet)
        except TimeoutError:
            return used, got
        assert f.type in (T.STARTED, T.STDOUT), f
        if f.type == T.STDOUT:
            used += output_cost(len(f.payload))
            got += len(f.payload)


def test_output_stops_at_the_window_and_other_execs_go_on(agent: Agent) -> None:
    size = 8_000_000
    chan = agent.new_channel()
    agent.no_auto_ack.add(chan)
    agent.send(T.EXEC, chan, ExecRequest(["head", "-c", str(size), "/dev/zero"], env=[PATH])
               .encode())
    used, got = _output_cost_until_quiet(agent, chan)
    assert OUTPUT_WINDOW - MAX_DATA - OUTPUT_FRAME_COST < used <= OUTPUT_WINDOW, used
    # The stalled exec holds nothing else up.
    for i in range(3):
        assert agent.run(["echo", str(i)]).stdout == f"{i}\n".encode()
    # Credit back in pieces: each reopens the window by that much and no more.
    for _ in range(3):
        agent.send(T.OUTPUT_ACK, chan, encode_output_ack(used))
        used, more = _output_cost_until_quiet(agent, chan)
        assert 0 < used <= OUTPUT_WINDOW
        got += more
    agent.no_auto_ack.discard(chan)
    agent.send(T.OUTPUT_ACK, chan, encode_output_ack(used))
    r = agent.collect(chan)
    assert r.code == 0 and got + len(r.stdout) == size


def test_output_credit_covers_stdout_and_stderr_together(agent: Agent) -> None:
    chan = agent.new_channel()
    agent.no_auto_ack.add(chan)
    # stdout is more than what is left of the window plus its pipe (1 MiB): it must block.
    script = "head -c 600000 /dev/zero >&2; head -c 2000000 /dev/zero"
    agent.send(T.EXEC, chan, ExecRequest(["sh", "-c", script], env=[PATH]).encode())
    used, streams = 0, set()
    while True:
        try:
            f = agent.on(chan, timeout=0.5)
        except TimeoutError:
            break
        if f.type in (T.STDOUT, T.STDERR):
            used += output_cost(len(f.payload))
            streams.add(f.type)
    assert OUTPUT_WINDOW - MAX_DATA - OUTPUT_FRAME_COST < used <= OUTPUT_WINDOW
    assert streams == {T.STDOUT, T.STDERR}  # one credit for both
    agent.send(T.KILL, chan)  # the window stays shut: KILL still ends it
    agent.no_auto_ack.discard(chan)
    agent.send(T.OUTPUT_ACK, chan, encode_output_ack(used))
    assert agent.collect(chan).code == 137


def test_a_bad_output_ack_is_logged_and_ignored(agent: Agent) -> None:
    chan = agent.start(ExecRequest(["sh", "-c", "read x; echo $x"], env=[PATH], stdin=True))
    assert agent.on(chan).type == T.STARTED
    agent.send(T.OUTPUT_ACK, chan, encode_output_ack(100))  # nothing was sent yet
    agent.send(T.OUTPUT_ACK, chan, b"\0\0")  # malformed
    agent.send(T.OUTPUT_ACK, 4242, encode_output_ack(1))  # no such channel: ignored
    logs = [agent.next_frame(lambda f: f.type == T.LOG) for _ in range(2)]
    assert all(b"OUTPUT_ACK" in f.payload for f in logs), logs
    agent.send(T.STDIN, chan, b"fine\n")
    r = agent.collect(chan)
    assert r.stdout == b"fine\n" and r.code == 0


# --- PTY ------------------------------------------------------------------------------------


def test_tty(agent: Agent) -> None:
    r = agent.run(["tty"], tty=True)
    assert r.code == 0
    assert re.fullmatch(rb"/dev/pts/\d+\r\n", r.stdout), r.stdout
    r = agent.run(["sh", "-c", "ls -l /proc/self/fd/0 /proc/self/fd/2 | grep -c pts"], tty=True)
    assert r.stdout.strip() == b"2"


def test_tty_size_and_resize(agent: Agent) -> None:
    assert agent.run(["stty", "size"], tty=True).stdout == b"24 80\r\n"
    assert agent.run(["stty", "size"], tty=True, rows=30, cols=100).stdout == b"30 100\r\n"
    chan = agent.start(
        ExecRequest(["sh", "-c", "echo ready; read x; stty size"], env=[PATH], tty=True)
    )
    agent.wait_output(chan, b"ready")
    agent.send(T.RESIZE, chan, encode_resize(50, 132))
    agent.send(T.STDIN, chan, b"go\n")
    r = agent.collect(chan)
    assert b"50 132" in r.stdout
    assert r.code == 0


def test_tty_eof_ends_cat(agent: Agent) -> None:
    chan = agent.start(ExecRequest(["cat"], env=[PATH], tty=True))
    agent.send(T.STDIN, chan, b"hello\n")
    agent.wait_output(chan, b"hello\r\nhello\r\n")  # the echo, then cat's copy
    agent.send(T.STDIN, chan, b"")
    r = agent.collect(chan, timeout=10)
    assert r.code == 0


def test_tty_eof_after_a_partial_line(agent: Agent) -> None:
    chan = agent.start(ExecRequest(["cat"], env=[PATH], tty=True))
    agent.send(T.STDIN, chan, b"partial")
    agent.send(T.STDIN, chan, b"")
    r = agent.collect(chan, timeout=10)
    assert r.code == 0
    assert r.stdout.count(b"partial") == 2  # the echo and cat's output


def test_tty_is_not_hung_up_before_the_exec_ends(agent: Agent) -> None:
    # coreutils cat closes its stdio before exit_group: if the agent closed the PTY master on
    # the slave's EOF, the hang-up would kill cat with SIGHUP in that gap.
    chans = [agent.start(ExecRequest(["cat"], env=[PATH], tty=True)) for _ in range(20)]
    for chan in chans:
        agent.send(T.STDIN, chan, b"x\n")
        agent.send(T.STDIN, chan, b"")
    for chan in chans:
        r = agent.collect(chan)
        assert (r.code, r.signal) == (0, 0)


def test_tty_sigint_via_the_terminal(agent: Agent) -> None:
    chan = agent.start(
        ExecRequest(["sh", "-c", "echo ready; exec sleep 100"], env=[PATH], tty=True)
    )
    agent.wait_output(chan, b"ready")
    time.sleep(0.1)
    agent.send(T.STDIN, chan, b"\x03")
    r = agent.collect(chan, timeout=10)
    assert (r.code, r.signal) == (130, 2)


def test_tty_error_messages_go_to_the_terminal(agent: Agent) -> None:
    r = agent.run(["no-such-command-matchlock"], tty=True)
    assert r.code == 127
    assert b"command not found" in r.stdout


# --- files ----------------------------------------------------------------------------------


def _write_file(agent: Agent, path: str, data: bytes, mode: int | None = None) -> tuple[int, str]:
    chan = agent.new_channel()
    agent.send(T.FILE_WRITE, chan, encode_path(path, mode))
    for off in range(0, len(data), MAX_DATA):
        agent.send(T.FILE_DATA_IN, chan, data[off : off + MAX_DATA])
    agent.send(T.FILE_DATA_IN, chan, b"")
    return agent.result(chan)


def _read_file(agent: Agent, path: str) -> tuple[bytes, int, str]:
    chan = agent.new_channel()
    agent.send(T.FILE_READ, chan, encode_path(path))
    data = bytearray()
    while True:
        f = agent.on(chan)
        if f.type == T.FILE_DATA:
            assert 0 < len(f.payload) <= MAX_DATA
            data += f.payload
            # Credit back, as the host does (FILE_DATA is credited like exec output).
            agent.send(T.OUTPUT_ACK, chan, struct.pack(">I", len(f.payload) + OUTPUT_FRAME_COST))
        else:
            assert f.type == T.RESULT
            r = parse_result(f.payload)
            return bytes(data), r.errno, r.message


def test_file_write_read_list_round_trip(agent: Agent, tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    target = tmp_path / "new" / "sub" / "blob.bin"
    assert _write_file(agent, str(target), data, 0o640) == (0, "")
    assert target.read_bytes() == data
    assert target.stat().st_mode & 0o7777 == 0o640
    assert [p.name for p in target.parent.iterdir()] == ["blob.bin"]  # no temp file left

    got, err, _ = _read_file(agent, str(target))
    assert err == 0 and got == data

    (target.parent / "dir").mkdir()
    (target.parent / "link").symlink_to("blob.bin")
    chan = agent.new_channel()
    agent.send(T.FILE_LIST, chan, encode_path(str(target.parent)))
    entries = {}
    while True:
        f = agent.on(chan)
        if f.type == T.RESULT:
            assert parse_result(f.payload).errno == 0
            break
        assert f.type == T.DIRENT
        d = parse_dirent(f.payload)
        entries[d.name] = d
    assert set(entries) == {"blob.bin", "dir", "link"}
    assert entries["blob.bin"].size == len(data)
    assert entries["blob.bin"].mode == target.stat().st_mode
    assert entries["blob.bin"].mtime == int(target.stat().st_mtime)
    assert entries["dir"].is_dir
    assert entries["link"].mode & 0o170000 == 0o120000  # lstat, not followed


def test_file_write_replaces_and_default_mode(agent: Agent, tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old contents that are longer")
    assert _write_file(agent, str(target), b"new") == (0, "")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o7777 == 0o644
    assert _write_file(agent, str(tmp_path / "empty"), b"") == (0, "")
    assert (tmp_path / "empty").read_bytes() == b""


def test_file_read_stops_at_its_window(agent: Agent, tmp_path: Path) -> None:
    """Without OUTPUT_ACK the agent sends at most OUTPUT_WINDOW of FILE_DATA (payload + frame
    cost) and then waits, answering other channels; acknowledged, it sends the rest."""
    big = tmp_path / "big"
    content = os.urandom(3 << 20)
    big.write_bytes(content)
    chan = agent.new_channel()
    agent.send(T.FILE_READ, chan, encode_path(str(big)))
    got, used = bytearray(), 0
    while True:
        try:
            f = agent.on(chan, timeout=1.5)
        except TimeoutError:
            break  # nothing more without credit
        assert f.type == T.FILE_DATA
        got += f.payload
        used += len(f.payload) + OUTPUT_FRAME_COST
    assert used == OUTPUT_WINDOW  # filled exactly (a short last frame), never past it
    r = agent.run(["true"])  # the agent goes on with other channels
    assert r.code == 0
    agent.send(T.OUTPUT_ACK, chan, struct.pack(">I", used))
    while (f := agent.on(chan)).type == T.FILE_DATA:
        got += f.payload
        agent.send(T.OUTPUT_ACK, chan, struct.pack(">I", len(f.payload) + OUTPUT_FRAME_COST))
    assert f.type == T.RESULT and parse_result(f.payload).errno == 0
    assert bytes(got) == content


def test_kill_ends_a_file_operation(agent: Agent, tmp_path: Path) -> None:
    """KILL on a write mid-way: RESULT ECANCELED, the temporary file is gone, the old file
    stays, and FILE_DATA that still comes for the channel is ignored. On a read: RESULT
    ECANCELED, no more data."""
    target = tmp_path / "f"
    target.write_bytes(b"old")
    chan = agent.new_channel()
    agent.send(T.FILE_WRITE, chan, encode_path(str(target)))
    agent.send(T.FILE_DATA_IN, chan, b"x" * MAX_DATA)
    agent.send(T.KILL, chan)
    err, msg = agent.result(chan)
    assert err == errno.ECANCELED and str(target) in msg
    agent.send(T.FILE_DATA_IN, chan, b"late")
    agent.send(T.FILE_DATA_IN, chan, b"")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]

    big = tmp_path / "big"
    big.write_bytes(os.urandom(8 << 20))
    chan = agent.new_channel()
    agent.send(T.FILE_READ, chan, encode_path(str(big)))
    first = agent.on(chan)
    assert first.type == T.FILE_DATA
    agent.send(T.KILL, chan)
    got = len(first.payload)
    while (f := agent.on(chan)).type == T.FILE_DATA:
        got += len(f.payload)
    assert f.type == T.RESULT and parse_result(f.payload).errno == errno.ECANCELED
    assert got < 8 << 20
    # The agent goes on: another operation works.
    assert _write_file(agent, str(target), b"new") == (0, "")
    assert target.read_bytes() == b"new"


def test_file_errors(agent: Agent, tmp_path: Path) -> None:
    _, err, msg = _read_file(agent, str(tmp_path))
    assert err == errno.EISDIR and str(tmp_path) in msg
    _, err, _ = _read_file(agent, str(tmp_path / "missing"))
    assert err == errno.ENOENT
    _, err, _ = _read_file(agent, "/dev/null")
    assert err == errno.EINVAL
    _, err, _ = _read_file(agent, "relative/path")
    assert err == errno.EINVAL
    err, _ = _write_file(agent, "relative", b"x")
    assert err == errno.EINVAL
    (tmp_path / "adir").mkdir()
    err, _ = _write_file(agent, str(tmp_path / "adir"), b"x")
    assert err != 0
    assert [p.name for p in tmp_path.iterdir()] == ["adir"]  # the temp file was removed
    chan = agent.new_channel()
    agent.send(T.FILE_LIST, chan, encode_path(str(tmp_path / "missing")))
    assert agent.result(chan)[0] == errno.ENOENT


def test_listing_skips_names_that_are_not_utf8(agent: Agent, tmp_path: Path) -> None:
    (tmp_path / "ok").write_text("")
    os.close(os.open(os.fsencode(str(tmp_path)) + b"/bad\xff", os.O_CREAT | os.O_WRONLY))
    chan = agent.new_channel()
    agent.send(T.FILE_LIST, chan, encode_path(str(tmp_path)))
    names = []
    while (f := agent.on(chan)).type == T.DIRENT:
        names.append(parse_dirent(f.payload).name)
    assert names == ["ok"]
    r = parse_result(f.payload)
    assert r.errno == 0 and "skipped 1" in r.message


def test_large_listing_streams(agent: Agent, tmp_path: Path) -> None:
    for i in range(3000):
        (tmp_path / f"file-with-a-rather-long-name-{i:05d}").touch()
    chan = agent.new_channel()
    agent.send(T.FILE_LIST, chan, encode_path(str(tmp_path)))
    count = 0
    while agent.on(chan).type == T.DIRENT:
        count += 1
    assert count == 3000


# --- robustness -----------------------------------------------------------------------------


def _ping(agent: Agent, token: bytes) -> None:
    agent.send(T.PING, 0, token)
    f = agent.next_frame(lambda f: f.type == T.PONG, timeout=10)
    assert f.payload == token


def test_malformed_frames_do_not_crash_the_agent(agent: Agent) -> None:
    # EXEC with a TLV running past the payload, or a NUL in a string: the exec fails cleanly.
    for bad in (
        struct.pack(">HI", 1, 50) + b"true",
        encode_tlv([(1, b"tr\0ue")]),
        encode_tlv([(2, b"NOEQUALS"), (1, b"true")]),
        encode_tlv([(5, b"\0\0")]),
        b"",
    ):
        chan = agent.new_channel()
        agent.send(T.EXEC, chan, bad)
        r = agent.collect(chan)
        assert r.code == 126 and r.stderr.startswith(b"matchlock: bad EXEC request"), r
    _ping(agent, b"1")

    # Oversized payload: skipped as a whole, the stream stays in step.
    agent.send_raw(HEADER.pack(T.EXEC, 5, MAX_HOST_PAYLOAD + 1) + b"\0" * (MAX_HOST_PAYLOAD + 1))
    _ping(agent, b"2")
    # Reserved header bytes set.
    agent.send_raw(b"\x0b\x01\x00\x00" + struct.pack(">II", 0, 3) + b"abc")
    _ping(agent, b"3")
    # Unknown type, control frame on an exec channel, exec frame on the control channel.
    agent.send_raw(HEADER.pack(0x7F, 0, 4) + b"junk")
    agent.send(T.PING, 3, b"x")
    agent.send(T.EXEC, 0, ExecRequest(["true"]).encode())
    agent.send(T.PING, 0, b"p" * 65)  # longer than a PING may be
    # Malformed SIGNAL / RESIZE on a live exec, bad file requests.
    chan = agent.start(ExecRequest(["sleep", "60"], env=[PATH]))
    agent.send(T.SIGNAL, chan, b"\0")
    agent.send(T.SIGNAL, chan, encode_signal(1000))
    agent.send(T.RESIZE, chan, b"\0")
    agent.send(T.EXEC, chan, ExecRequest(["true"]).encode())  # channel in use
    fchan = agent.new_channel()
    agent.send(T.FILE_READ, fchan, struct.pack(">HI", 1, 99))
    assert agent.result(fchan)[0] == errno.EINVAL
    _ping(agent, b"4")
    agent.send(T.KILL, chan)
    assert agent.collect(chan).code == 137
    logs = [f for f in agent.inbox if f.type == T.LOG]
    assert len(logs) >= 8


def test_many_concurrent_execs(agent: Agent) -> None:
    chans = [agent.start(ExecRequest(["sh", "-c", f"echo {i}"], env=[PATH])) for i in range(30)]
    for i, chan in enumerate(chans):
        r = agent.collect(chan)
        assert r.stdout == f"{i}\n".encode() and r.code == 0


def test_no_fd_leaks_into_commands(agent: Agent) -> None:
    other = agent.start(ExecRequest(["sleep", "60"], env=[PATH], stdin=True))
    assert agent.on(other).type == T.STARTED
    r = agent.run(["ls", "/proc/self/fd"])
    assert sorted(r.stdout.split()) == [b"0", b"1", b"2", b"3"]  # 3: ls's own directory fd
    agent.send(T.KILL, other)
    agent.collect(other)


# --- CONNECT (published ports): the agent connects to 127.0.0.1 of its namespace -------------


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.settimeout(20)
    yield s
    s.close()


def _port_of(s: socket.socket) -> int:
    return int(s.getsockname()[1])


def _open(agent: Agent, port: int) -> int:
    chan = agent.new_channel()
    agent.send(T.CONNECT, chan, encode_connect(port))
    f = agent.on(chan)
    assert f.type == T.STARTED and parse_u32(f.payload, "STARTED") == 0, f
    return chan


def _read_guest(agent: Agent, chan: int) -> tuple[bytes, bool]:
    """Data until SOCK_EOF (acknowledging as it comes); (data, saw_eof)."""
    got = bytearray()
    while True:
        f = agent.on(chan)
        if f.type == T.STDOUT:
            got += f.payload
            agent.send(T.SOCK_ACK, chan, encode_sock_ack(len(f.payload)))
        elif f.type == T.SOCK_EOF:
            return bytes(got), True
        elif f.type == T.RESULT:
            agent.inbox.appendleft(f)
            return bytes(got), False
        else:
            assert f.type == T.STDIN_ACK, f


def test_port_relay_both_ways_with_half_closes(agent: Agent, listener: socket.socket) -> None:
    chan = _open(agent, _port_of(listener))
    peer, _ = listener.accept()
    with peer:
        agent.send(T.STDIN, chan, b"to the guest")
        agent.send(T.STDIN, chan, b"")  # half-close
        got = b""
        while True:
            d = peer.recv(100)
            if not d:
                break
            got += d
        assert got == b"to the guest"
        peer.sendall(b"answer after EOF")
        peer.shutdown(socket.SHUT_WR)
        data, eof = _read_guest(agent, chan)
        assert data == b"answer after EOF" and eof
        f = agent.on(chan)
        while f.type == T.STDIN_ACK:
            f = agent.on(chan)
        assert f.type == T.RESULT and parse_result(f.payload).errno == 0


def test_refused_connection_is_a_result(agent: Agent, listener: socket.socket) -> None:
    port = _port_of(listener)
    listener.close()
    chan = agent.new_channel()
    agent.send(T.CONNECT, chan, encode_connect(port))
    errno_, message = agent.result(chan)
    assert errno_ == errno.ECONNREFUSED
    assert str(port) in message


def test_malformed_connect_is_refused(agent: Agent) -> None:
    chan = agent.new_channel()
    agent.send(T.CONNECT, chan, b"\0\0")
    assert agent.result(chan)[0] == errno.EINVAL


def test_port_guest_data_waits_for_acknowledgements(
    agent: Agent, listener: socket.socket
) -> None:
    chan = _open(agent, _port_of(listener))
    peer, _ = listener.accept()
    blob = os.urandom(3 * STDIN_WINDOW)
    with peer:
        peer.setblocking(False)
        sent = 0
        unacked = 0
        got = bytearray()
        # Without SOCK_ACK the agent stops at the window.
        deadline = time.monotonic() + 20
        while unacked < STDIN_WINDOW and time.monotonic() < deadline:
            if sent < STDIN_WINDOW + MAX_DATA:
                with contextlib.suppress(BlockingIOError):
                    sent += peer.send(blob[sent : STDIN_WINDOW + MAX_DATA])
            agent.pump(0.05)
            while agent.inbox and agent.inbox[0].channel == chan:
                f = agent.inbox.popleft()
                assert f.type == T.STDOUT
                got += f.payload
                unacked += len(f.payload)
        assert unacked == STDIN_WINDOW
        agent.pump(0.5)
        assert not [f for f in agent.inbox if f.channel == chan]  # held at the window
        peer.setblocking(True)
        # Acknowledge everything from now on: the rest arrives, byte-exact.
        agent.send(T.SOCK_ACK, chan, encode_sock_ack(unacked))
        def rest() -> None:
            peer.sendall(blob[sent:])
            peer.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=rest)
        t.start()
        data, eof = _read_guest(agent, chan)
        t.join()
        assert eof and hashlib.sha256(bytes(got) + data).digest() == hashlib.sha256(blob).digest()
        agent.send(T.KILL, chan)
        f = agent.on(chan)
        assert f.type == T.RESULT and parse_result(f.payload).errno == errno.ECONNABORTED


def test_host_data_beyond_the_window_ends_the_channel(
    agent: Agent, listener: socket.socket
) -> None:
    # The peer never reads, so what the agent writes piles up in the kernel (the peer's
    # receive buffer, kept small here, and the agent's send buffer, which grows up to
    # tcp_wmem's maximum), then in the agent, which must not buffer past the window. Send
    # more than all of that, whatever this host's buffer sizes are.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    chan = _open(agent, _port_of(listener))
    peer, _ = listener.accept()
    with peer:
        for _ in range((wmem_max + 2 * STDIN_WINDOW) // MAX_DATA + 64):
            agent.send(T.STDIN, chan, b"z" * MAX_DATA)
        agent.flush()
        while True:
            f = agent.on(chan)
            if f.type == T.RESULT:
                assert parse_result(f.payload).errno == errno.EPROTO
                break
            assert f.type == T.STDIN_ACK
        log = agent.next_frame(lambda f: f.type == T.LOG)
        assert b"window" in log.payload
