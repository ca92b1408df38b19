"""State persists between the execs of one sandbox, background processes included (real VM).

Every exec of a sandbox runs in one PID and mount namespace owned by a small init the agent
starts at the first exec; see docs/guest-protocol.md "Process model". One booted sandbox
serves the module (the agent API, not a CLI process per command).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from matchlock.guest.client import Output
from matchlock.guest.protocol import OUTPUT_WINDOW, ExecRequest, ExitStatus, output_cost

from .guest_util import Guest, booted

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def box() -> Iterator[Guest]:
    with booted(None, None) as g:  # busybox, no NIC (loopback only)
        yield g


def _alive(box: Guest, pid: int) -> str:
    """comm of pid in the sandbox, "" when it is gone or a zombie."""
    _, out, _ = box.sh(f"grep -q '^State:.*Z' /proc/{pid}/status || cat /proc/{pid}/comm")
    return out.strip()


def test_a_background_sleep_is_seen_by_later_execs(box: Guest) -> None:
    code, out, _ = box.sh("sleep 1000 >/dev/null 2>&1 & echo $!")
    assert code == 0
    pid = int(out)
    code, ps, _ = box.sh("ps -o pid,comm")
    assert code == 0
    assert any(ln.split() == [str(pid), "sleep"] for ln in ps.splitlines()), ps
    assert box.sh(f"kill {pid}")[0] == 0
    deadline = time.monotonic() + 10
    while _alive(box, pid):  # the sandbox init reaps the orphan
        assert time.monotonic() < deadline, "the killed sleep was never reaped"


def test_a_server_started_in_one_exec_answers_in_another(box: Guest) -> None:
    # busybox httpd daemonizes: its exec ends at once, the server stays.
    t0 = time.monotonic()
    code, _, err = box.sh("mkdir -p /tmp/www && echo hello-from-httpd > /tmp/www/index.html && "
                          "httpd -p 127.0.0.1:8000 -h /tmp/www")
    assert code == 0, err
    assert time.monotonic() - t0 < 10
    # A second server, started with & and holding no output: its exec returns promptly too.
    t0 = time.monotonic()
    code, _, err = box.sh("httpd -f -p 127.0.0.1:8001 -h /tmp/www >/tmp/httpd.log 2>&1 &")
    assert code == 0, err
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 20
    while True:
        code, out, err = box.sh("wget -qO- http://127.0.0.1:8000/ && "
                                "wget -qO- http://127.0.0.1:8001/")
        if code == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (code, out) == (0, "hello-from-httpd\n" * 2), err


def test_background_child_holding_stdout_returns_within_the_grace(box: Guest) -> None:
    t0 = time.monotonic()
    code, out, _ = box.sh("sleep 1000 & echo $!; echo done; exit 7")
    took = time.monotonic() - t0
    assert code == 7
    pid, done = out.split()
    assert done == "done"
    assert took < 5, took
    assert _alive(box, int(pid)) == "sleep"  # not killed when its exec ended
    # The same with a PTY: the terminal stays with the holder, the exec ends.
    ex = box.sandbox.exec(ExecRequest(argv=["sh", "-c", "sleep 1000 & exit 5"], env=box.env,
                                      tty=True, user="root"))
    t0 = time.monotonic()
    codes = [ev.code for ev in ex.events() if isinstance(ev, ExitStatus)]
    assert codes == [5] and time.monotonic() - t0 < 5


def test_execs_cannot_see_or_signal_the_agent(box: Guest) -> None:
    code, out, _ = box.sh("cat /proc/1/comm; kill -9 1; kill -TERM 1; kill -INT 1; echo sent")
    assert (code, out) == (0, "matchlock-init\nsent\n")
    # SIGKILL to every process it may signal leaves the sandbox (and the agent) working.
    box.sh("sleep 1000 >/dev/null 2>&1 &")
    box.sh("kill -9 -1")
    assert box.sh("echo ok") == (0, "ok\n", "")
    assert box.sh("cat /proc/1/comm")[1] == "matchlock-init\n"


def test_a_signal_reaches_only_its_own_exec(box: Guest) -> None:
    first = box.sandbox.exec(ExecRequest(argv=["sh", "-c", "sleep 300 & wait"], env=box.env,
                                         user="root"))
    second = box.sandbox.exec(ExecRequest(argv=["sh", "-c", "sleep 301; echo second-done"],
                                          env=box.env, user="root"))
    deadline = time.monotonic() + 20
    while _count(box, "sleep 300") + _count(box, "sleep 301") != 2:
        assert time.monotonic() < deadline
    first.signal(15)
    codes = [ev.code for ev in first.events() if isinstance(ev, ExitStatus)]
    assert codes == [143]
    # The first exec's group (its background sleep too) got the signal, the second did not.
    deadline = time.monotonic() + 10
    while _count(box, "sleep 300"):
        assert time.monotonic() < deadline, "the first exec's background sleep survived"
    assert _count(box, "sleep 301") == 1
    second.kill()
    assert [ev.code for ev in second.events() if isinstance(ev, ExitStatus)] == [137]


def _count(box: Guest, cmdline: str) -> int:
    """Processes in the sandbox whose command line is exactly `cmdline`."""
    _, out, _ = box.sh("for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done | "
                       f"grep -cx '{cmdline} '")
    return int(out)


def _exit_and_output(box: Guest, script: str) -> tuple[int, bytes]:
    ex = box.sandbox.exec(ExecRequest(argv=["sh", "-c", script], env=box.env, user="root"))
    out, code = bytearray(), -1
    for ev in ex.events():
        if isinstance(ev, Output) and ev.stream == "stdout":
            out += ev.data
        elif isinstance(ev, ExitStatus):
            code = ev.code
    return code, bytes(out)


def test_twenty_in_a_row_and_four_at_once_with_background_children(box: Guest) -> None:
    box.sh("rm -f /tmp/seq; kill -9 -1")
    for i in range(20):
        code, out = _exit_and_output(box, f"echo {i} >> /tmp/seq; sleep 1000 & echo out{i}; "
                                          f"exit {i % 5}")
        assert (code, out) == (i % 5, f"out{i}\n".encode())
    code, out = _exit_and_output(box, "cat /tmp/seq")
    assert out.decode().split() == [str(i) for i in range(20)]
    assert _count(box, "sleep 1000") == 20  # each exec's background sleep is still there

    def one(n: int) -> tuple[int, bytes]:
        return _exit_and_output(box, f"sleep 1000 & head -c {100000 + n} /dev/zero; exit {n}")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert results == [(n, b"\0" * (100000 + n)) for n in range(4)]
    assert _count(box, "sleep 1000") == 24
    box.sh("kill -9 -1")
    assert _count(box, "sleep 1000") == 0


def test_an_exec_whose_output_nobody_reads_stalls_only_itself(box: Guest) -> None:
    size = 64 << 20
    slow = box.sandbox.exec(ExecRequest(argv=["head", "-c", str(size), "/dev/zero"],
                                        env=box.env, user="root"))
    conn = box.sandbox.conn
    time.sleep(1)  # time enough to fill its window
    for i in range(5):  # other execs on the same connection are not held up
        t0 = time.monotonic()
        assert box.sh(f"echo {i}") == (0, f"{i}\n", "")
        assert time.monotonic() - t0 < 10
    # The host holds at most the window for it, and it is not done: the guest waits.
    with conn._lock:
        ch = conn._channels[slow.channel]
        held = sum(output_cost(len(e.data)) for e in ch.events if isinstance(e, Output))
        assert OUTPUT_WINDOW - output_cost(65536) < held <= OUTPUT_WINDOW and not ch.done
    # Read at last, everything arrives.
    got, codes = 0, []
    for ev in slow.events():
        if isinstance(ev, Output):
            got += len(ev.data)
        elif isinstance(ev, ExitStatus):
            codes.append(ev.code)
    assert (got, codes) == (size, [0])


def _as(box: Guest, user: str, script: str, cwd: str = "/") -> tuple[int, str, str]:
    ex = box.sandbox.exec(ExecRequest(argv=["sh", "-c", script], env=box.env, cwd=cwd,
                                      user=user))
    out, err, code = bytearray(), bytearray(), -1
    for ev in ex.events(timeout=60):
        if isinstance(ev, Output):
            (out if ev.stream == "stdout" else err).extend(ev.data)
        elif isinstance(ev, ExitStatus):
            code = ev.code
    return code, out.decode(), err.decode()


@pytest.fixture
def etc_restored(box: Guest) -> Iterator[None]:
    assert box.sh("cp -p /etc/passwd /tmp/passwd.orig && cp -p /etc/group /tmp/group.orig")[0] == 0
    yield
    # As uid 0: a name may not resolve any more.
    code, _, err = _as(box, "0", "rm -f /etc/passwd /etc/group && "
                       "cp -p /tmp/passwd.orig /etc/passwd && cp -p /tmp/group.orig /etc/group")
    assert code == 0, err


def test_users_are_looked_up_in_the_files_as_they_are_now(box: Guest, etc_restored: None) -> None:
    # A last line without its newline counts; a group line longer than the agent reads
    # (64 KiB) is skipped, and the lines after it are read as usual.
    long_members = ",".join(f"m{i}" for i in range(12000)) + ",alice"
    script = ("printf '\\nalice:x:2345:2345::/home/alice:/bin/sh' >> /etc/passwd && "
              "printf 'devs:x:777:bob,alice\\nstaff:x:778:alice\\n' >> /etc/group && "
              f"printf 'huge:x:780:{long_members}\\nlate:x:779:carol,alice' >> /etc/group")
    assert box.sh(script)[0] == 0
    assert _as(box, "alice", 'echo "$(id -u) $(id -g) $(id -G) $HOME"') == (
        0, "2345 2345 2345 777 778 779 /home/alice\n", "")
    # Changed between two execs: the next exec sees the change.
    assert box.sh("sed -i 's/^alice:x:2345:/alice:x:2346:/' /etc/passwd && "
                  "sed -i 's/^staff:x:778:alice$/staff:x:778:/' /etc/group")[0] == 0
    assert _as(box, "alice", 'echo "$(id -u) $(id -G)"') == (0, "2346 2345 777 779\n", "")
    assert _as(box, "alice:devs", "id -g") == (0, "777\n", "")


def test_a_fifo_for_etc_passwd_does_not_hold_up_execs(box: Guest, etc_restored: None) -> None:
    assert box.sh("rm /etc/passwd && mkfifo /etc/passwd")[0] == 0
    t0 = time.monotonic()
    assert _as(box, "alice", "true") == (
        126, "", 'matchlock: user "alice": not found in /etc/passwd\n')
    # (Commands that read /etc/passwd themselves would block on it: none here.)
    assert _as(box, "0", 'echo "$HOME"; grep ^Uid: /proc/self/status') == (
        0, "/\nUid:\t0\t0\t0\t0\n", "")
    assert time.monotonic() - t0 < 20


def test_many_execs_at_once_each_get_their_own_user_and_directory(box: Guest) -> None:
    # Every command starts on the agent's memory until its execve (one at a time): none may
    # see another's user, groups or directory.
    users, dirs = ["root", "nobody", "1000", "4242:4243"], ["/", "/tmp", "/etc"]
    cases = [(users[i % 4], dirs[i % 3]) for i in range(32)]
    want = {"root": "0 0", "nobody": "65534 65534", "1000": "1000 1000", "4242:4243": "4242 4243"}

    def one(case: tuple[str, str]) -> tuple[int, str, str]:
        return _as(box, case[0], 'echo "$(id -u) $(id -g) $PWD"', cwd=case[1])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, cases))
    assert results == [(0, f"{want[u]} {cwd}\n", "") for u, cwd in cases]
