"""The fork server: one warm process per user, install and state directory that has imported
what `matchlock run` needs, and forks once per `run` (cli/forkclient.py is the other side).

Started by the first `run` that finds none (`python -P -m matchlock.cli.forkserver PATH FD`),
in a session of its own, with only the environment it needs to import (no secret a user
exports reaches it). It listens on PATH (a 0600 SOCK_SEQPACKET socket in the user's 0700
state directory), then imports, then serves:

1. a client connects; one that is not this user's or not in this server's security context,
   as its /proc tells (`forkclient.verify_peer`, the client checks the server the same way),
   is closed unheard. It sends the install key; a key that is not this server's, or source
   files changed since the import (an upgrade, an edit), get "S" (stale) and the client
   starts a new server;
2. the server forks and tells the client the fork's pid ("P<pid>": the client passes its
   signals on to it); only then does the client send its request (argv, environment, umask,
   and, as SCM_RIGHTS, its fds 0-2 and working directory), which the fork reads itself: the
   server never holds any client's environment. The fork becomes that client's `run`
   (entry.main) and exits as it would have; a fork without a whole request exits 125 and
   runs nothing;
3. when its run is over, the fork sends its exit code ("E<code>"); when the fork has ended,
   the server sends its wait status ("X<status>"). A client that goes away (killed) hangs
   its fork up (SIGHUP), as a closed terminal would.

It stops listening when it has been idle (no request, no fork alive) for
MATCHLOCK_FORKSERVER_IDLE seconds (300 by default), as soon as its socket is removed or
replaced, or when a dependency or the interpreter changed on disk, and exits once its last
fork has ended.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import select
import signal
import socket
import sys
import time

from matchlock.cli import forkclient
from matchlock.cli.forkclient import verify_peer
from matchlock.sandbox import forked

IDLE_S = 300.0
_HELD = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT}
TICK_S = 2.0  # how often an idle server looks at its socket
MAX_REQUEST = 1 << 20
# What `run` imports on its way to a sandbox, with and without a network; the fork then
# imports nothing of its own on the common paths. Lazy parts are named too (dnspython's
# parser, the hooks, mounts, disks).
PRELOAD = (
    "matchlock.cli.entry", "matchlock.cli.fastrun", "matchlock.cli.runbody",
    "matchlock.cli.signals", "matchlock.cli.main", "matchlock.cli.run",
    "matchlock.image.resolve", "matchlock.sandbox.attach", "matchlock.sandbox.core",
    "matchlock.sandbox.supervisor", "matchlock.sandbox.boot", "matchlock.sandbox.network",
    "matchlock.sandbox.ports", "matchlock.sandbox.mounts", "matchlock.sandbox.disks",
    "matchlock.sandbox.template", "matchlock.state.config", "matchlock.state.db",
    "matchlock.net.stack", "matchlock.net.nic", "matchlock.net.firewall",
    "matchlock.net.proxy", "matchlock.net.certs", "matchlock.net.upstream",
    "matchlock.net.audit", "matchlock.net.dns", "matchlock.net.dnsanswer",
    "matchlock.net.policy", "matchlock.net.secrets", "matchlock.net.secret_sources",
    "matchlock.net.addressing", "matchlock.net.hookrun", "matchlock.vm.qemu",
    "matchlock.vm.vmm_exec", "matchlock.vm.confine", "matchlock.guest.client",
    "asyncio", "concurrent.futures", "uvloop",
)


class _Fork:
    __slots__ = ("conn", "hung_up", "pid", "pidfd")

    def __init__(self, pid: int, pidfd: int, conn: socket.socket) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.conn = conn
        self.hung_up = False


class Server:
    def __init__(self, path: str) -> None:
        from matchlock.sandbox.sockpath import sock_path

        self.path = path
        own = forkclient.context("self")
        if own is None or forkclient.confined(own):
            raise OSError("this process's context cannot be served")
        self.context = own
        self.key = forkclient.key(own)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # 0600 from its creation on
        try:
            self.sock.bind(sock_path(path))
        finally:
            os.umask(old)
        self.sock.listen(128)
        self.ino = os.stat(path).st_ino
        self.idle_s = _idle_seconds()
        self.forks: dict[int, _Fork] = {}  # by pidfd
        self.conns: dict[int, _Fork] = {}  # by connection fd
        self.ep = select.epoll()
        self.listening = True
        self.sources: dict[str, tuple[int, int]] = {}
        self.dependencies: dict[str, tuple[int, int]] = {}

    # --- set-up ------------------------------------------------------------------------

    def preload(self) -> None:
        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except ImportError:
                continue  # optional parts (e.g. uvloop): the fork imports or skips them
        self.sources = _sources()
        self.dependencies = _dependencies()
        # Objects that exist now are never collected by a fork's GC passes: their pages stay
        # shared with this process instead of being copied into every fork.
        gc.collect()
        gc.freeze()

    # --- the loop ----------------------------------------------------------------------

    def serve(self, ready_fd: int) -> socket.socket | None:
        """Serve until idle; in a fork, return its connection (nothing else of the server's
        stays open there)."""
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
        self.preload()
        _log(f"serving {self.path}")
        self.ep.register(self.sock.fileno(), select.EPOLLIN)
        last = time.monotonic()
        while self.listening or self.forks:
            for fd, _ in self.ep.poll(TICK_S):
                if fd == self.sock.fileno():
                    conn = self._accept()
                    if conn is not None:
                        return conn  # in the fork
                elif fd in self.forks:
                    self._reap(self.forks[fd])
                elif fd in self.conns:
                    self._hang_up(self.conns[fd])
                last = time.monotonic()
            if self.listening and not self.forks and time.monotonic() - last >= self.idle_s:
                self._stop_listening("idle")
            elif self.listening and not self._socket_is_ours():
                self._stop_listening("its socket was removed or replaced")
        return None

    def _accept(self) -> socket.socket | None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return None
        try:
            conn.settimeout(1.0)
            # The peer's context as the kernel tells it, never as the client says: a client
            # under other namespaces, credentials, capabilities, no_new_privs, seccomp or LSM
            # label gets no fork of this (less confined) process.
            if verify_peer(conn, self.context) is None:
                conn.close()
                return None
            hello = conn.recv(4096)
            ours = hello == forkclient.MAGIC + b" " + self.key
            if not ours or self._stale():
                if ours:
                    # Changed sources: a new server takes over, and no client may queue on
                    # this socket once the client below hears "S".
                    self._stop_listening("its sources changed")
                conn.send(b"S")
                conn.close()
                return None
        except OSError:
            conn.close()
            return None
        pid = os.fork()
        if pid == 0:
            # The client's signals (and the hang-up of a client that is gone) wait until
            # the fork has become that client's run: held, not lost (the server ignores them).
            signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._close_in_fork(conn)
            return conn
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # pragma: no cover - Linux < 5.3: no fork server (see forkclient)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            conn.close()
            return None
        f = _Fork(pid, pidfd, conn)
        self.forks[pidfd] = f
        self.conns[conn.fileno()] = f
        self.ep.register(pidfd, select.EPOLLIN)
        # Only the peer's hang-up: the request waiting in the socket is the fork's to read.
        self.ep.register(conn.fileno(), select.EPOLLRDHUP)
        try:
            conn.send(b"P%d" % pid)
        except OSError:
            self._hang_up(f)
        if self._upgraded():
            # This run goes on with the code it started with; the next one gets a new
            # server (a library or the interpreter changed on disk).
            self._stop_listening("a dependency or the interpreter changed")
        return None

    def _reap(self, f: _Fork) -> None:
        _, status = os.waitpid(f.pid, 0)
        self.ep.unregister(f.pidfd)
        os.close(f.pidfd)
        del self.forks[f.pidfd]
        if not f.hung_up:
            self.ep.unregister(f.conn.fileno())
        del self.conns[f.conn.fileno()]
        with contextlib.suppress(OSError):
            f.conn.send(b"X%d" % status)
        f.conn.close()

    def _hang_up(self, f: _Fork) -> None:
        """The client is gone: its fork is told as a terminal's hang-up would tell it."""
        if f.hung_up:
            return
        f.hung_up = True
        self.ep.unregister(f.conn.fileno())
        with contextlib.suppress(ProcessLookupError):
            os.kill(f.pid, signal.SIGHUP)

    def _stop_listening(self, why: str) -> None:
        if not self.listening:
            return
        _log(f"stops listening: {why}")
        self.listening = False
        self.ep.unregister(self.sock.fileno())
        if self._socket_is_ours():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.sock.close()

    def _socket_is_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.ino
        except OSError:
            return False

    def _stale(self) -> bool:
        return _sources() != self.sources

    def _upgraded(self) -> bool:
        return _dependencies() != self.dependencies or _replaced_mappings()

    def _close_in_fork(self, conn: socket.socket) -> None:
        """Nothing of the server's, nor any other client's connection, stays in a fork."""
        self.ep.close()
        self.sock.close()
        for f in self.forks.values():
            os.close(f.pidfd)
            f.conn.close()
        self.forks.clear()
        self.conns.clear()
        conn.settimeout(10.0)


def _log(line: str) -> None:
    """The server's own log (its stderr: a file next to its socket)."""
    sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()}: {line}\n")
    sys.stderr.flush()


def _idle_seconds() -> float:
    try:
        v = float(os.environ.get(forkclient.IDLE_ENV, IDLE_S))
    except ValueError:
        return IDLE_S
    return v if v >= 0 else IDLE_S


def _replaced_mappings() -> bool:
    """A library or the interpreter this process has mapped was replaced on disk (an
    upgrade of libssl, of Python): forks must not go on running the old one."""
    with open("/proc/self/maps", "rb") as f:
        return any(line.endswith(b" (deleted)") and b"/" in line for line in f.read().split(b"\n"))


def _sources() -> dict[str, tuple[int, int]]:
    """(mtime, size) of every module file of the package, new ones included: an edit or
    an upgrade of matchlock makes the server stale (checked before each fork)."""
    import matchlock

    root = os.path.dirname(matchlock.__file__)
    out: dict[str, tuple[int, int]] = {}
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    if e.name != "__pycache__":
                        stack.append(e.path)
                elif e.name.endswith(".py"):
                    st = e.stat()
                    out[e.path] = (st.st_mtime_ns, st.st_size)
    return out


def _dependencies() -> dict[str, tuple[int, int]]:
    """(mtime, size) of the interpreter and of every other module loaded from a file: an
    upgrade of a dependency makes the server stale (checked while a fork runs: ~2 ms)."""
    out: dict[str, tuple[int, int]] = {}
    for path in {sys.executable, *(getattr(m, "__file__", None) or ""
                                   for m in list(sys.modules.values()))}:
        if path:
            try:
                st = os.stat(path)
            except OSError:
                out[path] = (-1, -1)
                continue
            out[path] = (st.st_mtime_ns, st.st_size)
    return out


# --- in the fork ---------------------------------------------------------------------------


def become_client(conn: socket.socket) -> list[str]:
    """Read the client's request and take over its streams, directory, umask, environment
    and arguments."""
    try:
        data, anc, flags, _ = conn.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(4 * 4))
    except OSError:  # no request within the timeout: the client went away
        os._exit(125)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds += [int.from_bytes(payload[i:i + 4], sys.byteorder)
                    for i in range(0, usable, 4)]
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ValueError("truncated")
        fields = forkclient.decode(data)
        present, umask, argc = fields[0], int(fields[1]), int(fields[2])
        argv = fields[3:3 + argc]
        nattrs = int(fields[3 + argc])
        attrs = fields[4 + argc:4 + argc + nattrs]
        env = fields[4 + argc + nattrs:]
        wanted = [int(c) for c in present.decode() if c != "-"]
        if (len(fds) != len(wanted) + 1 or len(argv) != argc or argv[1:2] != [b"run"]
                or len(attrs) != nattrs or not set(wanted) <= {0, 1, 2}
                or not 0 <= umask <= 0o777):
            raise ValueError("bad request")
    except (ValueError, IndexError, UnicodeDecodeError):
        os._exit(125)  # a client that is not ours, or one that went away: nothing ran
    try:
        adopt(attrs)
    except (OSError, ValueError):
        # Something of the client's that this fork cannot take on (a higher hard limit,
        # another cgroup it may not enter): the client runs `run` itself.
        with contextlib.suppress(OSError):
            conn.send(b"R")
        os._exit(125)
    streams = dict(zip(wanted, fds, strict=False))
    null = os.open(os.devnull, os.O_RDWR)
    for n in (0, 1, 2):
        # One the client had closed is /dev/null, as cli/entry.py makes it in-process (and
        # never the server's own log).
        os.dup2(streams.get(n, null), n)  # inheritable, as a process's 0-2 are
    for fd in (null, *streams.values()):
        os.close(fd)
    cwd = fds[-1]
    os.fchdir(cwd)
    os.close(cwd)
    os.umask(umask)
    os.environ.clear()
    for entry in env:
        k, eq, v = entry.partition(b"=")
        if eq and k:
            with contextlib.suppress(ValueError):  # a NUL byte: not an environment entry
                os.environb[k] = v
    time.tzset()  # the client's TZ, for the times `run` prints
    forkclient.served = True
    # `ps -o comm`, `top`: a run, not the server.
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as f:
        f.write("matchlock-run")
    forked.reset_signals()
    forked.reopen_stdio({0, 1, 2})
    return [os.fsdecode(a) for a in argv]


def adopt(attrs: list[bytes]) -> None:
    """Take on the client's resource limits, cgroup, CPU affinity, priority and OOM score
    (forkclient.attributes); OSError or ValueError when one cannot be."""
    import resource

    for attr in attrs:
        name, _, value = attr.decode().partition("=")
        if name in forkclient.RLIMITS and hasattr(resource, name):
            soft, hard = (int(v) for v in value.split(","))
            which = getattr(resource, name)
            if resource.getrlimit(which) != (soft, hard):
                resource.setrlimit(which, (soft, hard))
        elif name == "cgroup":
            _enter_cgroup(value)
        elif name == "affinity":
            cpus = {int(c) for c in value.split(",") if c}
            if cpus != os.sched_getaffinity(0):
                os.sched_setaffinity(0, cpus)
        elif name == "nice":
            if os.getpriority(os.PRIO_PROCESS, 0) != int(value):
                os.setpriority(os.PRIO_PROCESS, 0, int(value))
        elif name == "oom":
            with open("/proc/self/oom_score_adj", "r+") as f:
                if f.read().strip() != value:
                    f.seek(0)
                    f.write(value)
        else:
            raise ValueError(f"unknown attribute {name}")


def _enter_cgroup(wanted: str) -> None:
    with open("/proc/self/cgroup") as f:
        if f.read().strip() == wanted:
            return
    # cgroup v2: one "0::/path" line. Anything else (v1 hierarchies): not taken on here.
    if not wanted.startswith("0::/") or "\n" in wanted or "/../" in wanted + "/":
        raise ValueError("cgroup")
    with open(f"/sys/fs/cgroup{wanted[3:]}/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))


def main(argv: list[str]) -> None:
    path, ready_fd = argv[1], int(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Nothing of the client that started it: not its directory (which could not be
    # unmounted), not the descriptors it inherited (a lock, a pipe's end) but the ready pipe.
    os.chdir("/")
    os.closerange(ready_fd + 1, 1 << 20)
    os.closerange(3, ready_fd)
    try:
        server = Server(path)
    except OSError:
        os.close(ready_fd)  # the client sees nothing and runs in-process
        return
    conn = server.serve(ready_fd)
    if conn is None:
        return
    try:
        argv = become_client(conn)
    except KeyboardInterrupt:  # a Ctrl-C held since the fork: as `run` answers one
        sys.stderr.write("matchlock: interrupted\n")
        os._exit(130)
    code = forked.run_to_exit(argv)  # the run is over: its sandbox gone, its output flushed
    # The client hears the code from us too: if the server is gone by then, it still knows
    # how its run ended (the server adds a death by a signal, which we cannot).
    with contextlib.suppress(OSError):
        conn.send(b"E%d" % (code & 0xFF))
    # No interpreter finalization (~10-30 ms of freeing what the server imported, while the
    # client waits): nothing is left to do, every thread of a run is a daemon and matchlock
    # registers no exit handler.
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv)
