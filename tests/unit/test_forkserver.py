"""The fork server (cli/forkserver.py) and its client (cli/forkclient.py), without a VM: real
server processes, each under a private state dir, driven by `run`s that end in the fork
before a sandbox would start (an invalid --cpus), and by hand-made clients playing the
attacker: another uid, a wrong key, a malformed request.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests import procs

from matchlock.cli import forkclient

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "bin" / "matchlock"
BAD_RUN = ["run", "--cpus", "abc", "--", "true"]  # fails in the fork, before any sandbox
BAD_RUN_ERROR = b"matchlock: invalid --cpus 'abc'; use a number such as 1 or 0.5\n"


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    yield d
    for pid in procs.fork_servers(d):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _env(state: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MATCHLOCK_")}
    return {**env, "MATCHLOCK_STATE_DIR": str(state), "MATCHLOCK_CACHE_DIR": str(state / "c"),
            **extra}


def _run(state: Path, args: list[str], **extra: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, str(LAUNCHER), *args], capture_output=True,
                          timeout=60, env=_env(state, **extra), stdin=subprocess.DEVNULL)


def _socket(state: Path) -> Path:
    [sock] = state.glob("forkserver-*.sock")
    return sock


# --- the wire format ------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    [], [b""], [b"a", b"", b"\x00\xff:", b"12:34", b"x" * 70000],
])
def test_fields_round_trip(fields: list[bytes]) -> None:
    assert forkclient.decode(forkclient.encode(fields)) == fields


@pytest.mark.parametrize("data", [b"3:ab", b"x:abc", b"-1:", b"1", b":a", b"99999999999999:a"])
def test_malformed_fields_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        forkclient.decode(data)


# --- served runs ----------------------------------------------------------------------------


def test_a_run_is_served_by_a_fork_and_answers_as_in_process(state: Path) -> None:
    served = _run(state, BAD_RUN)
    [server] = procs.fork_servers(state)
    local = _run(state, BAD_RUN, MATCHLOCK_FORKSERVER="0")
    assert (served.returncode, served.stdout, served.stderr) == (1, b"", BAD_RUN_ERROR)
    assert (local.returncode, local.stdout, local.stderr) == (1, b"", BAD_RUN_ERROR)
    # The next run uses the same server; the disabled one started none.
    assert _run(state, BAD_RUN).returncode == 1
    assert procs.fork_servers(state) == [server]
    sock = _socket(state)
    assert sock.stat().st_mode & 0o777 == 0o600


def test_the_client_imports_nothing_heavy(state: Path, tmp_path: Path) -> None:
    _run(state, BAD_RUN)  # the server is up
    out = tmp_path / "modules"
    code = ("import sys\nsys.argv = ['matchlock', *sys.argv[1:]]\n"
            "from matchlock.cli.entry import main\n"
            "try:\n    main()\nfinally:\n"
            f"    open({str(out)!r}, 'w').write('\\n'.join(sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code, *BAD_RUN], capture_output=True,
                       timeout=60, env=_env(state), stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stderr) == (1, BAD_RUN_ERROR)
    mods = set(out.read_text().split())
    ours = {m for m in mods if m.startswith("matchlock")}
    assert ours <= {"matchlock", "matchlock.cli", "matchlock.cli.entry", "matchlock.cli.fastrun",
                    "matchlock.cli.forkclient", "matchlock.errors", "matchlock.paths",
                    "matchlock.sandbox", "matchlock.sandbox.sockpath"}, sorted(ours)
    assert not mods & {"typing", "re", "json", "socket", "threading", "subprocess",
                       "pathlib", "asyncio", "ssl", "click", "sqlite3", "dataclasses"}


def test_the_server_never_holds_a_client_s_environment(state: Path) -> None:
    value = "fs-secret-" + os.urandom(8).hex()
    r = _run(state, BAD_RUN, SOME_API_TOKEN=value)
    assert r.returncode == 1
    [server] = procs.fork_servers(state)
    assert value.encode() not in Path(f"/proc/{server}/environ").read_bytes()
    assert value.encode() not in Path(f"/proc/{server}/cmdline").read_bytes()
    assert value.encode() not in procs.memory(server)


def test_an_idle_server_exits(state: Path) -> None:
    _run(state, BAD_RUN, MATCHLOCK_FORKSERVER_IDLE="0.5")
    [server] = procs.fork_servers(state)
    assert procs.gone(server, 10)
    assert list(state.glob("forkserver-*.sock")) == []


def test_a_removed_socket_ends_the_server(state: Path) -> None:
    _run(state, BAD_RUN)
    [server] = procs.fork_servers(state)
    _socket(state).unlink()
    assert procs.gone(server, 10)


def test_changed_sources_make_a_new_server(state: Path, tmp_path: Path) -> None:
    # A copy of the package (another install: its own key and server), then an edit.
    pkg = tmp_path / "pkg"
    shutil.copytree(ROOT / "src" / "matchlock", pkg / "matchlock",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PYTHONPATH": str(pkg)}
    code = ("import sys\nsys.argv = ['matchlock', *sys.argv[1:]]\n"
            "from matchlock.cli.entry import main\nmain()\n")

    def run() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-c", code, *BAD_RUN], capture_output=True,
                              timeout=60, env=_env(state, **env), stdin=subprocess.DEVNULL)

    assert run().stderr == BAD_RUN_ERROR
    [old] = procs.fork_servers(state)
    edited = pkg / "matchlock" / "errors.py"
    edited.write_text(edited.read_text() + "\n# an upgrade\n")
    assert run().stderr == BAD_RUN_ERROR
    assert procs.gone(old, 10)
    [new] = procs.fork_servers(state)
    assert new != old


# --- hostile clients ------------------------------------------------------------------------


def _hello_bytes() -> bytes:
    """The hello of a client in this (the test's, and so the server's) context."""
    return forkclient.MAGIC + b" " + forkclient.key(forkclient.context("self") or b"")


def _hello(sock: socket.socket, hello: bytes | None = None) -> None:
    sock.sendall(hello or _hello_bytes())


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    s.connect(str(path))
    return s


def test_a_wrong_key_gets_no_fork(state: Path) -> None:
    _run(state, BAD_RUN)
    with _connect(_socket(state)) as s:
        s.sendall(forkclient.MAGIC + b" another-install")
        assert s.recv(64) == b"S"
        assert s.recv(64) == b""
    assert len(procs.fork_servers(state)) == 1  # still serving its own install


@pytest.mark.parametrize("body", [b"", b"garbage", forkclient.encode([b"012", b"18", b"9"])])
def test_a_malformed_request_runs_nothing(state: Path, body: bytes) -> None:
    _run(state, BAD_RUN)
    with _connect(_socket(state)) as s:
        _hello(s)
        if body:
            s.sendall(body)  # and no descriptors
        else:
            s.shutdown(socket.SHUT_WR)
        reply = s.recv(64)
        assert reply.startswith(b"P")
        status = s.recv(64)
    assert status == b"X%d" % (125 << 8)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_is_refused(state: Path) -> None:
    _run(state, BAD_RUN)
    sock = _socket(state)
    sock.chmod(0o666)  # as if its mode had been opened up: the server checks the peer
    # A path the other user can reach (the test's own directories are 0700).
    open_dir = Path(tempfile.mkdtemp())
    open_dir.chmod(0o755)
    link = open_dir / "s"
    os.link(sock, link)
    try:
        assert _attacker(link, "nobody") == b"refused"  # closed unheard: no fork, no "P"
    finally:
        shutil.rmtree(open_dir)


def _attacker(sock: Path, confine: str) -> bytes:
    """What a client confined by `confine` (in a child process) hears from the server when
    it sends the server's own key: b"refused" when it gets no fork."""
    hello = _hello_bytes()  # the server's key, made before the child confines itself
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if confine == "nobody":
                os.setgid(65534)
                os.setuid(65534)
            elif confine == "no_new_privs":
                assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
            elif confine == "netns":
                assert libc.unshare(0x40000000) == 0  # CLONE_NEWNET
            with _connect(sock) as s:
                try:
                    _hello(s, hello)  # the real key: a forged claim costs nothing to make
                    reply = s.recv(64)
                except (BrokenPipeError, ConnectionResetError):
                    reply = b""
                os.write(w, reply or b"refused")
        except BaseException as e:
            os.write(w, repr(e).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    try:
        return os.read(r, 200)
    finally:
        os.close(r)


@pytest.mark.skipif(os.geteuid() != 0, reason="a new network namespace needs root")
@pytest.mark.parametrize("confine", ["no_new_privs", "netns"])
def test_a_confined_client_gets_no_fork_even_with_the_server_s_key(state: Path,
                                                                 confine: str) -> None:
    _run(state, BAD_RUN)
    assert _attacker(_socket(state), confine) == b"refused"
    assert _attacker(_socket(state), "none").startswith(b"P")  # the control: served


def test_a_confined_run_is_not_served(state: Path) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv")
    r = subprocess.run([setpriv, "--no-new-privs", sys.executable, str(LAUNCHER), *BAD_RUN],
                       capture_output=True, timeout=60, env=_env(state),
                       stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stderr) == (1, BAD_RUN_ERROR)
    assert procs.fork_servers(state) == []  # answered in-process; no server started for it


def test_only_run_is_served(state: Path) -> None:
    _run(state, BAD_RUN)
    with _connect(_socket(state)) as s:
        _hello(s)
        assert s.recv(64).startswith(b"P")
        body = forkclient.request([b"matchlock", b"setup"], [], 0o22, b"", [])
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            s.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                null.to_bytes(4, sys.byteorder))])
        finally:
            os.close(null)
        assert s.recv(64) == b"X%d" % (125 << 8)
