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

IDLE_ENV = "MATCHLOCK_FORKSERVER_IDLE"
MAGIC = b"MLFS1"
# Set in a process the server forked: its `run` is served, never forwarded again.
served = False
FIRST_REPLY_S = 30.0
# What the server needs of the client's environment to import the same code; nothing else
# (no secret a user exports) is passed to it. The fork gets the client's whole environment.
_SERVER_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYTHONPATH",
               "PYTHONHOME", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX",
               "PYTHONSAFEPATH", "PYTHONWARNINGS", "MATCHLOCK_HOME", "MATCHLOCK_STATE_DIR",
               "MATCHLOCK_CACHE_DIR", IDLE_ENV)
# Passed on to the fork (what the in-process `run` reacts to, and SIGQUIT's dump).
_SIGNALS = (_signal.SIGHUP, _signal.SIGINT, _signal.SIGQUIT, _signal.SIGTERM)


def key(ctx: bytes) -> bytes:
    """This install (interpreter, package, version) and a digest of `ctx`, this process's
    security context (`context`): the name of the server that serves it. Only a name: each
    side checks the other's context itself, from the kernel (`verify_peer`)."""
    from binascii import crc32

    import matchlock

    return os.fsencode(f"{sys.executable}\0{os.path.dirname(matchlock.__file__)}\0"
                       f"{matchlock.__version__}\0{crc32(ctx):08x}")


_NAMESPACES = ("mnt", "net", "pid", "user", "uts", "ipc", "cgroup", "time")
_CONTEXT_LINES = (b"Uid:", b"Gid:", b"Groups:", b"NoNewPrivs:", b"Seccomp", b"Cap",
                  b"Speculation")


def context(pid: int | str) -> bytes | None:
    """What a fork of the server must share with its client, read from /proc: namespaces,
    root, uids, gids, groups, capability sets, no_new_privs, seccomp, speculation controls,
    personality, audit login and session, LSM label. None when any of it cannot be read."""
    base = f"/proc/{pid}"
    parts = []
    try:
        for ns in _NAMESPACES:
            parts.append(os.fsencode(os.readlink(f"{base}/ns/{ns}")))
        parts.append(os.fsencode(os.readlink(f"{base}/root")))
        for name in ("status", "personality", "loginuid", "sessionid"):
            with open(f"{base}/{name}", "rb") as f:
                data = f.read()
            if name == "status":
                parts += [ln for ln in data.split(b"\n") if ln.startswith(_CONTEXT_LINES)]
            else:
                parts.append(data)
    except OSError:
        return None
    try:
        with open(f"{base}/attr/current", "rb") as f:
            parts.append(f.read())
    except OSError:
        parts.append(b"-")  # no LSM
    return b"\0".join(parts)


def confined(ctx: bytes) -> bool:
    """no_new_privs or a seccomp filter: what more such a process may not do (a filter's
    rules, a Landlock domain) cannot be read from /proc, so it is never served."""
    lines = ctx.split(b"\0")
    return b"NoNewPrivs:\t0" not in lines or b"Seccomp:\t0" not in lines


SO_PEERCRED = 17
SO_PEERPIDFD = 77  # Linux 6.5


def verify_peer(sock: socket, own: bytes) -> int | None:
    """The pid of the process at the other end of sock, when it is this user's and has
    exactly the context `own`; else None. The peer is pinned by a pidfd (from the kernel
    with the connection on Linux >= 6.5): its /proc is read while the pidfd shows it alive,
    so no other process can have taken its pid meanwhile."""
    import select
    from _socket import SOL_SOCKET

    try:
        cred = sock.getsockopt(SOL_SOCKET, SO_PEERCRED, 12)
        pid = int.from_bytes(cred[0:4], sys.byteorder)
        if int.from_bytes(cred[4:8], sys.byteorder) != os.geteuid() or pid <= 0:
            return None
        try:
            pidfd = int.from_bytes(sock.getsockopt(SOL_SOCKET, SO_PEERPIDFD, 4), sys.byteorder)
        except OSError:
            # An older kernel: pidfd_open on the pid from SO_PEERCRED, which another process
            # could have taken if the peer died first; only where pids are not soon reused.
            with open("/proc/sys/kernel/pid_max", "rb") as f:
                if int(f.read()) < 4194304:
                    return None
            pidfd = os.pidfd_open(pid)
    except (OSError, ValueError):
        return None
    try:
        theirs = context(pid)
        p = select.poll()
        p.register(pidfd, select.POLLIN)
        alive = not p.poll(0)
    finally:
        os.close(pidfd)
    if theirs is None or not alive or theirs != own or confined(theirs):
        return None
    return pid


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


def socket_path(ctx: bytes) -> str:
    from binascii import crc32

    from matchlock.paths import state_dir_str

    return os.path.join(state_dir_str(), f"forkserver-{crc32(key(ctx)):08x}.sock")


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
    own = context("self")
    if own is None or confined(own):
        return None  # never served (see `confined`); nothing is started for it either
    path = socket_path(own)
    if not _private_dir(os.path.dirname(path)):
        return None
    for _ in range(2):  # a stale server (an upgrade, an edit) is replaced once
        try:
            got = _connect_or_start(path, own)
        except OSError:
            return None
        if got is None:
            return None
        sock, server = got
        try:
            return _serve(sock, argv, server)
        except _Stale:
            continue
        finally:
            sock.close()
    return None


def _private_dir(d: str) -> bool:
    """The state dir, made if missing, is this user's and nobody else may write in it (a
    lock, log or socket there must be ours)."""
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.stat(d)
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


class _Stale(Exception):
    """The server is not this install's code any more; it has stopped listening."""


def _connect(path: str, own: bytes) -> tuple[socket, int] | None:
    """A connection to the server at path and its pid, when it is this user's and in this
    very context: a socket is only as good as the process behind it, and the request (with
    the environment) goes nowhere else."""
    from _socket import AF_UNIX, SOCK_CLOEXEC, SOCK_SEQPACKET
    from _socket import socket as new_socket

    from matchlock.sandbox.sockpath import sock_path

    s = new_socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC)
    try:
        s.connect(sock_path(path))
        server = verify_peer(s, own)
        if server is None:
            s.close()
            return None
        s.sendall(MAGIC + b" " + key(own))
    except OSError:
        s.close()
        return None
    return s, server


def _connect_or_start(path: str, own: bytes) -> tuple[socket, int] | None:
    got = _connect(path, own)
    if got is not None:
        return got
    import fcntl

    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                   0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one `run` starts it; the others wait and connect
        got = _connect(path, own)
        if got is None:
            _start(path)
            got = _connect(path, own)
    finally:
        os.close(lock)
    return got


def _start(path: str) -> None:
    """Start a server for this install at path, returning once it listens (it imports
    after that: the first request waits in its queue meanwhile)."""
    import contextlib

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a dead server's socket (we hold the lock)
    env = {k: os.environ[k] for k in _SERVER_ENV if k in os.environ}
    r, w = os.pipe()
    try:
        # Its own errors (there should be none) go to a log next to its socket.
        log = os.open(path + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                      | os.O_NOFOLLOW, 0o600)
        null = os.open(os.devnull, os.O_RDWR)
        try:
            if os.fstat(log).st_size > 1 << 20:
                os.ftruncate(log, 0)
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


def _serve(sock: socket, argv: list[str], server: int) -> int | None:
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
    fork = _Fork.pin(int(reply[1:]), server)
    if fork is None:
        return None  # not the server's child: nothing is sent to it
    try:
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
            cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None  # no /proc, a directory we may not open: the fork gets nothing
        body = request([os.fsencode(a) for a in argv],
                       [k + b"=" + v for k, v in os.environb.items()], umask, present, attrs)
        fds.append(cwd)
        # Our signals are the fork's from the moment it may run (a Ctrl-C now stops it).
        fork.forward_signals()
        try:
            sock.sendmsg([body], [(SOL_SOCKET, SCM_RIGHTS,
                                   b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))])
        except OSError:
            # E.g. an environment too large for one message. The fork got nothing (a message
            # arrives whole or not at all) and ends when we close; this process runs `run`.
            fork.restore_signals()
            return None
        finally:
            os.close(cwd)
        return _wait(sock, fork)
    finally:
        fork.close()


class _Fork:
    """The fork serving us, pinned by a pidfd (a signal never reaches another process that
    got its pid), and checked to be the server's child."""

    def __init__(self, pidfd: int) -> None:
        self.pidfd = pidfd

    @staticmethod
    def pin(pid: int, server: int) -> _Fork | None:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == server:
                return _Fork(pidfd)
        except (OSError, ValueError):
            pass
        os.close(pidfd)
        return None

    def close(self) -> None:
        os.close(self.pidfd)

    def send(self, signo: int) -> None:
        try:
            _signal.pidfd_send_signal(self.pidfd, signo)
        except ProcessLookupError:
            return  # it has ended (contextlib is not imported here: ~1 ms)

    def forward_signals(self) -> None:
        def forward(signo: int, frame: object) -> None:
            self.send(signo)

        def stop(signo: int, frame: object) -> None:
            # Ctrl-Z: the fork stops with us (as an in-process run would), goes on with us.
            self.send(_signal.SIGSTOP)
            _signal.signal(_signal.SIGTSTP, _signal.SIG_DFL)
            os.kill(os.getpid(), _signal.SIGTSTP)
            _signal.signal(_signal.SIGTSTP, stop)  # resumed (SIGCONT) from here on
            self.send(_signal.SIGCONT)

        for s in _SIGNALS:
            _signal.signal(s, forward)
        _signal.signal(_signal.SIGTSTP, stop)

    def restore_signals(self) -> None:
        _signal.signal(_signal.SIGTSTP, _signal.SIG_DFL)
        for s in _SIGNALS:
            _signal.signal(s, _signal.default_int_handler if s == _signal.SIGINT
                           else _signal.SIG_DFL)


def _wait(sock: socket, fork: _Fork) -> int | None:
    """From the fork on, this process is the fork's stand-in: the signals a terminal or a
    parent sends here are passed on to it, and its end is ours. The fork says how it ends
    ("E<code>"), the server how it ended ("X<wait status>", which also knows a death by a
    signal); the connection ends when both are done with it."""
    code: int | None = None
    while True:
        try:
            msg = sock.recv(64)
        except OSError:
            msg = b""
        if msg == b"R":  # handed back before anything ran: this process runs `run` itself
            fork.restore_signals()
            return None
        if msg.startswith(b"E") and msg[1:].isdigit():
            code = int(msg[1:])
            continue
        if msg.startswith(b"X") and msg[1:].isdigit():
            status = int(msg[1:])
            if os.WIFSIGNALED(status):
                signo = os.WTERMSIG(status)
                sys.stdout.flush()
                if signo not in (_signal.SIGKILL, _signal.SIGSTOP):
                    _signal.signal(signo, _signal.SIG_DFL)
                os.kill(os.getpid(), signo)  # die the same way, for the shell's `$?`
                return 128 + signo
            return os.waitstatus_to_exitcode(status)
        if not msg:
            break
    if code is not None:
        return code  # the server went away; the fork had told us its code
    sys.stderr.write("matchlock: the fork server and the run ended without an exit code "
                     "(see `matchlock ls -a`)\n")
    return 1
