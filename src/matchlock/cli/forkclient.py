"""The `matchlock run` side of the fork server (cli/forkserver.py): hand this process's
arguments, environment, working directory and standard streams to a warm, pre-imported
process of the same install, and wait for it.

A fresh `run` spends ~90 ms of CPU importing the sandbox machinery before the VM can start,
and a sandbox with a network another ~100 ms on the network stack's imports; every `run`
paid both again. The fork server has imported them once; each `run` becomes a fork of it
that is, from then on, exactly the process this one would have been (its own sandbox,
secrets and exit), so sandboxes share no process with one another. This client stays small:
Python's start-up, the argument reader, and the C modules used here.

`MATCHLOCK_FORKSERVER=0` turns it off (every `run` then imports what it needs itself).
When the server cannot be reached or started, `run` goes on in-process as before: the
command never runs twice, because the request is only ever handed over once.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal  # no stubs for _signal: the same functions, typed
    from _socket import socket
else:
    import _signal

ENV = "MATCHLOCK_FORKSERVER"
IDLE_ENV = "MATCHLOCK_FORKSERVER_IDLE"
MAGIC = b"MLFS1"
# Set in a process the server forked: its `run` is served, never forwarded again.
served = False
# What the server needs of the client's environment to import the same code; nothing else
# (no secret a user exports) is passed to it. The fork gets the client's whole environment.
FIRST_REPLY_S = 30.0
_SERVER_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYTHONPATH",
               "PYTHONHOME", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX",
               "PYTHONSAFEPATH", "PYTHONWARNINGS", "MATCHLOCK_HOME", "MATCHLOCK_STATE_DIR",
               "MATCHLOCK_CACHE_DIR", IDLE_ENV)
# Passed on to the fork (what the in-process `run` reacts to, and SIGQUIT's dump).
_SIGNALS = (_signal.SIGHUP, _signal.SIGINT, _signal.SIGQUIT, _signal.SIGTERM)


def key() -> bytes:
    """This install and this process's security context. A server of another install
    (another venv, an upgrade) is never used, and neither is one started from another
    context: it would run the fork with the other context's namespaces, root, credentials,
    capabilities, no_new_privs, seccomp filters or LSM label (a `run` inside a sandbox of
    its own would step out of it). What a fork can take over per run (resource limits,
    cgroup, CPU affinity, priority, OOM score) is sent with the request instead."""
    import matchlock

    return os.fsencode(f"{sys.executable}\0{os.path.dirname(matchlock.__file__)}\0"
                       f"{matchlock.__version__}\0") + context()


def context() -> bytes:
    parts = []
    for ns in ("mnt", "net", "pid", "user", "uts", "ipc", "cgroup", "time"):
        try:
            parts.append(os.fsencode(os.readlink(f"/proc/self/ns/{ns}")))
        except OSError:
            parts.append(b"-")
    parts.append(os.fsencode(os.readlink("/proc/self/root")))
    with open("/proc/self/status", "rb") as f:
        parts += [line for line in f.read().split(b"\n") if line.startswith(_CONTEXT_LINES)]
    try:
        with open("/proc/self/attr/current", "rb") as f:
            parts.append(f.read())
    except OSError:
        parts.append(b"-")
    return b"\0".join(parts)


_CONTEXT_LINES = (b"Uid:", b"Gid:", b"Groups:", b"NoNewPrivs:", b"Seccomp", b"Cap",
                  b"Speculation_Store_Bypass:")


def attributes() -> list[bytes]:
    """What a fork takes over from its client for one run (cli/forkserver.py adopts them,
    or hands the run back when it cannot)."""
    import resource

    out = []
    for name in RLIMITS:
        if not hasattr(resource, name):  # Python names fewer than the kernel has
            continue
        soft, hard = resource.getrlimit(getattr(resource, name))
        out.append(b"%s=%d,%d" % (name.encode(), soft, hard))
    with open("/proc/self/cgroup", "rb") as f:
        out.append(b"cgroup=" + f.read().strip())
    out.append(b"affinity=" + b",".join(b"%d" % c for c in sorted(os.sched_getaffinity(0))))
    out.append(b"nice=%d" % os.getpriority(os.PRIO_PROCESS, 0))
    with open("/proc/self/oom_score_adj", "rb") as f:
        out.append(b"oom=" + f.read().strip())
    return out


RLIMITS = ("RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE",
            "RLIMIT_RSS", "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_AS",
            "RLIMIT_LOCKS", "RLIMIT_SIGPENDING", "RLIMIT_MSGQUEUE", "RLIMIT_NICE",
            "RLIMIT_RTPRIO", "RLIMIT_RTTIME")


def socket_path() -> str:
    from binascii import crc32

    from matchlock.paths import state_dir_str

    return os.path.join(state_dir_str(), f"forkserver-{crc32(key()):08x}.sock")


def encode(fields: list[bytes]) -> bytes:
    """Length-prefixed fields (`<len>:<bytes>`): any byte may appear in an argument or in
    the environment."""
    return b"".join(b"%d:%s" % (len(f), f) for f in fields)


def decode(data: bytes) -> list[bytes]:
    """encode's inverse; ValueError for anything else."""
    out: list[bytes] = []
    i = 0
    while i < len(data):
        colon = data.index(b":", i, i + 12)
        digits = data[i:colon]
        if not digits.isdigit():
            raise ValueError("bad field length")
        n = int(digits)
        end = colon + 1 + n
        if end > len(data):
            raise ValueError("truncated field")
        out.append(data[colon + 1:end])
        i = end
    return out


def request(argv: list[bytes], env: list[bytes], umask: int, fds: bytes,
            attrs: list[bytes]) -> bytes:
    """What the fork reads: which of fds 0-2 came (b"012", "-" for a closed one), umask,
    argv, the attributes to take over, and the environment."""
    return encode([fds, b"%d" % umask, b"%d" % len(argv), *argv, b"%d" % len(attrs), *attrs,
                   *env])


def run(argv: list[str]) -> int | None:
    """The exit code of `run` served by the fork server, or None to run in-process (the
    server could not be reached or started before the request was handed over; cli/entry.py
    does not call this when MATCHLOCK_FORKSERVER=0)."""
    path = socket_path()
    for _ in range(2):  # a stale server (an upgrade, an edit) is replaced once
        try:
            sock = _connect_or_start(path)
        except OSError:
            return None
        if sock is None:
            return None
        try:
            return _serve(sock, argv)
        except _Stale:
            continue
        finally:
            sock.close()
    return None


class _Stale(Exception):
    """The server is not this install's code any more; it has stopped listening."""


def _connect(path: str) -> socket | None:
    from _socket import AF_UNIX, SOCK_CLOEXEC, SOCK_SEQPACKET, SOL_SOCKET
    from _socket import socket as new_socket

    from matchlock.sandbox.sockpath import sock_path

    s = new_socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC)
    try:
        s.connect(sock_path(path))
        # The server must be this user's (the socket sits in the user's own state dir, but
        # a socket is only as good as the process behind it).
        SO_PEERCRED = 17
        cred = s.getsockopt(SOL_SOCKET, SO_PEERCRED, 12)
        if int.from_bytes(cred[4:8], sys.byteorder) != os.geteuid():
            s.close()
            return None
        s.sendall(MAGIC + b" " + key())
    except OSError:
        s.close()
        return None
    return s


def _connect_or_start(path: str) -> socket | None:
    sock = _connect(path)
    if sock is not None:
        return sock
    import fcntl

    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one `run` starts it; the others wait and connect
        sock = _connect(path)
        if sock is None:
            _start(path)
            sock = _connect(path)
    finally:
        os.close(lock)
    return sock


def _start(path: str) -> None:
    """Start a server for this install at path, returning once it listens (it imports
    after that: the first request waits in its queue meanwhile)."""
    import contextlib

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a dead server's socket (we hold the lock)
    env = {k: os.environ[k] for k in _SERVER_ENV if k in os.environ}
    r, w = os.pipe()
    try:
        null = os.open(os.devnull, os.O_RDWR)
        # Its own errors (there should be none) go to a log next to its socket.
        log = os.open(path + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                      0o600)
        if os.fstat(log).st_size > 1 << 20:
            os.ftruncate(log, 0)
        try:
            # -P: nothing from the current directory on sys.path; a new session: no
            # terminal's signals reach it.
            os.posix_spawn(sys.executable,
                           [sys.executable, "-P", "-m", "matchlock.cli.forkserver", path, "3"],
                           env, file_actions=[(os.POSIX_SPAWN_DUP2, null, 0),
                                              (os.POSIX_SPAWN_DUP2, null, 1),
                                              (os.POSIX_SPAWN_DUP2, log, 2),
                                              (os.POSIX_SPAWN_DUP2, w, 3)],
                           setsid=True)
        finally:
            os.close(null)
            os.close(log)
        os.close(w)
        w = -1
        os.read(r, 16)  # "ready" once it listens; nothing if it failed
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def _serve(sock: socket, argv: list[str]) -> int | None:
    """Hand the request to the fork once the server has made it ("P<pid>"), then wait."""
    from _socket import SCM_RIGHTS, SOL_SOCKET

    try:
        # A server still importing on a busy machine takes a second or two; one that does
        # not answer at all is passed over (nothing was sent to it that could run).
        sock.settimeout(FIRST_REPLY_S)
        reply = sock.recv(64)
        sock.settimeout(None)
    except OSError:
        return None
    if reply == b"S":
        raise _Stale
    if not reply.startswith(b"P") or not reply[1:].isdigit():
        return None  # refused, or gone before the fork: nothing ran
    pid = int(reply[1:])
    fds: list[int] = []
    present = b""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            present += b"-"
            continue
        fds.append(fd)
        present += b"%d" % fd
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        attrs = attributes()
    except OSError:
        return None  # e.g. no /proc: the fork gets nothing and ends; this process runs `run`
    body = request([os.fsencode(a) for a in argv],
                   [k + b"=" + v for k, v in os.environb.items()], umask, present, attrs)
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    fds.append(cwd)
    try:
        sock.sendmsg([body], [(SOL_SOCKET, SCM_RIGHTS,
                               b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))])
    except OSError:
        # E.g. an environment too large for one message. The fork got nothing (a message
        # arrives whole or not at all) and ends when we close; this process runs `run`.
        return None
    finally:
        os.close(cwd)
    return _wait(sock, pid)


def _wait(sock: socket, pid: int) -> int | None:
    """From the fork on, this process is the fork's stand-in: the signals a terminal or a
    parent sends here are passed on to it, and its end is ours."""
    def forward(signo: int, frame: object) -> None:
        try:
            os.kill(pid, signo)
        except ProcessLookupError:  # contextlib is not imported here: ~1 ms
            return

    def stop(signo: int, frame: object) -> None:
        # Ctrl-Z: the fork stops with us (as an in-process run would), and goes on with us.
        forward(_signal.SIGSTOP, frame)
        _signal.signal(_signal.SIGTSTP, _signal.SIG_DFL)
        os.kill(os.getpid(), _signal.SIGTSTP)
        _signal.signal(_signal.SIGTSTP, stop)  # resumed (SIGCONT) from here on
        forward(_signal.SIGCONT, frame)

    for s in _SIGNALS:
        _signal.signal(s, forward)
    _signal.signal(_signal.SIGTSTP, stop)
    while True:
        try:
            msg = sock.recv(64)
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
    if msg == b"R":  # handed back before anything ran: this process runs `run` itself
        _signal.signal(_signal.SIGTSTP, _signal.SIG_DFL)
        for s in _SIGNALS:
            _signal.signal(s, _signal.default_int_handler if s == _signal.SIGINT
                           else _signal.SIG_DFL)
        return None
    if msg.startswith(b"X") and msg[1:].lstrip(b"-").isdigit():
        status = int(msg[1:])
        if os.WIFSIGNALED(status):
            signo = os.WTERMSIG(status)
            sys.stdout.flush()
            if signo not in (_signal.SIGKILL, _signal.SIGSTOP):
                _signal.signal(signo, _signal.SIG_DFL)
            os.kill(os.getpid(), signo)  # die the same way, for the shell's `$?`
            return 128 + signo
        return os.waitstatus_to_exitcode(status)
    sys.stderr.write("matchlock: the fork server ended before the command did; its exit "
                     "code is unknown (see `matchlock ls`)\n")
    return 1
