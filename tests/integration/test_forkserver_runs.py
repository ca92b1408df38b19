"""`matchlock run` served by the fork server (cli/forkserver.py), with real sandboxes: the
client's streams, directory, stdin and signals reach the run; a killed client takes its
sandbox down; and no process holds another run's secrets — not the server, not a sibling.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import procs

from .conftest import MATCHLOCK, leftovers, new_owner, sandbox_owners

pytestmark = pytest.mark.vm


def test_stdin_directory_and_exit_code_are_the_client_s(state_dir: Path,
                                                        tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_text("from the host\n")
    r = subprocess.run([MATCHLOCK, "run", "-i", "-v", "./sub:/workspace/sub", "--", "sh", "-c",
                        "cat /workspace/sub/f; cat; exit 7"], input=b"piped in\n",
                       capture_output=True, cwd=tmp_path, timeout=180)
    assert (r.returncode, r.stdout) == (7, b"from the host\npiped in\n"), r.stderr
    assert procs.fork_servers(state_dir), "the run did not go through the fork server"
    assert leftovers(state_dir) == []


def test_sigint_reaches_the_command_as_in_process(state_dir: Path) -> None:
    results = []
    for served in ("1", "0"):
        proc = subprocess.Popen(
            [MATCHLOCK, "run", "--", "sh", "-c",
             "trap 'echo got INT; exit 3' INT; echo ready; while :; do sleep 0.1; done"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "MATCHLOCK_FORKSERVER": served})
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        results.append((proc.returncode, out))
    assert results[0] == results[1] == (3, b"got INT\n")
    assert leftovers(state_dir) == []


def _wait_state(pid: int, want: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while procs.state(pid) not in want:
        assert time.monotonic() < deadline, (pid, procs.state(pid), want)
        time.sleep(0.05)


def test_ctrl_z_stops_the_run_and_fg_resumes_it(state_dir: Path) -> None:
    before = sandbox_owners()
    proc = subprocess.Popen([MATCHLOCK, "run", "--", "sh", "-c",
                             "echo ready; sleep 3; echo after"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    owner = new_owner(before)
    proc.send_signal(signal.SIGTSTP)
    _wait_state(proc.pid, "T")
    _wait_state(owner, "T")  # the owner stops with its client, as one process would
    time.sleep(4)  # the guest's sleep ends meanwhile; its output waits for the owner
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (0, b"after\n"), err
    assert leftovers(state_dir) == []


def test_a_killed_client_takes_its_sandbox_down(state_dir: Path) -> None:
    before = sandbox_owners()
    proc = subprocess.Popen([MATCHLOCK, "run", "--", "sh", "-c", "echo ready; sleep 600"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    owner = new_owner(before)
    assert owner != proc.pid  # served: the fork owns it
    proc.kill()
    proc.wait()
    # Hung up like a closed terminal: the owner forwards, then ends the sandbox itself.
    assert procs.gone(owner, 60)
    assert leftovers(state_dir) == []  # no `gc` needed


@pytest.mark.skipif(os.geteuid() != 0, reason="a secret needs the sealed network (root)")
def test_no_process_holds_another_run_s_secret(state_dir: Path) -> None:
    values = {n: f"fsv-{n}-" + os.urandom(12).hex() for n in ("A", "B")}
    before = sandbox_owners()
    runs = {}
    owners = {}
    for n, value in values.items():
        runs[n] = subprocess.Popen(
            [MATCHLOCK, "run", "--secret", f"TOK_{n}@api.test", "--", "sh", "-c",
             f"echo $TOK_{n}; echo ready; sleep 600"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, f"TOK_{n}": value})
        stdout = runs[n].stdout
        assert stdout is not None
        placeholder = stdout.readline()
        assert placeholder.startswith(b"SANDBOX_SECRET_") and value.encode() not in placeholder
        assert stdout.readline() == b"ready\n"
        owners[n] = new_owner(before)
        before = sandbox_owners()
    try:
        servers = procs.fork_servers(state_dir)
        assert len(servers) == 1, [Path(f"/proc/{p}/cmdline").read_bytes() for p in servers]
        [server] = servers
        server_memory = procs.memory(server)
        for n, value in values.items():
            other = "B" if n == "A" else "A"
            assert value.encode() in procs.memory(owners[n])  # the positive control
            assert value.encode() not in procs.memory(owners[other])
            assert value.encode() not in server_memory
            assert value.encode() not in Path(f"/proc/{server}/environ").read_bytes()
    finally:
        for p in runs.values():
            p.send_signal(signal.SIGTERM)
        for p in runs.values():
            p.communicate(timeout=60)
    assert leftovers(state_dir) == []


def _hand_over_and_leave(state_dir: Path, argv: list[str]) -> int:
    """A client that hands its run over and is gone at once (killed right after): the pid
    of the fork that got the run."""
    import socket as socketmod
    import sys

    from matchlock.cli import forkclient

    subprocess.run([MATCHLOCK, "run", "--cpus", "x", "--", "true"], capture_output=True,
                   timeout=60)  # the server is up
    [sock_path] = state_dir.glob("forkserver-*.sock")
    s = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_SEQPACKET)
    s.connect(str(sock_path))
    s.sendall(forkclient.MAGIC + b" " + forkclient.key(forkclient.context("self") or b""))
    reply = s.recv(64)
    assert reply.startswith(b"P"), reply
    null = os.open(os.devnull, os.O_RDWR)
    cwd = os.open("/", os.O_PATH | os.O_DIRECTORY)
    body = forkclient.request([os.fsencode(a) for a in argv],
                              [k + b"=" + v for k, v in os.environb.items()], 0o22, b"012",
                              forkclient.attributes())
    fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (null, null, null, cwd))
    s.sendmsg([body], [(socketmod.SOL_SOCKET, socketmod.SCM_RIGHTS, fds)])
    os.close(null)
    os.close(cwd)
    s.close()  # gone
    return int(reply[1:])


def test_a_client_gone_right_after_the_hand_over_runs_nothing_on(state_dir: Path) -> None:
    fork = _hand_over_and_leave(state_dir, ["matchlock", "run", "--", "sleep", "600"])
    # The hang-up was held until the fork could act on it: the run ends, nothing is left.
    assert procs.gone(fork, 90)
    assert leftovers(state_dir) == []


def test_a_server_killed_mid_run_still_tells_the_client_its_code(state_dir: Path) -> None:
    proc = subprocess.Popen([MATCHLOCK, "run", "--", "sh", "-c", "echo ready; sleep 3; exit 5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    [server] = procs.fork_servers(state_dir)
    os.kill(server, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 5, err
    assert leftovers(state_dir) == []
