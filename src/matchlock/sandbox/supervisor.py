"""Detached sandboxes: the per-sandbox supervisor process and its clients.

`matchlock run -d` starts a copy of itself in a new session (`launch`); that copy boots the
sandbox, owns it (its pid is the owner in its record, so the VMM dies with it), listens on
`control.sock` in the sandbox's directory (0600, in a 0700 directory, peers checked by
SO_PEERCRED) and serves exec, shutdown, allow-list changes and port-forward pipes (`serve`);
it also owns the listeners of published ports (`run -d -p`). `run --rm=false` runs the same
supervisor in the foreground, its command attached to the terminal. Detached, it tells the
launcher the sandbox's id on its stdout once the socket listens, then moves its stdout and
stderr to `supervisor.log`.
The wire format is in `sandbox/wire.py`, the reading of requests in `sandbox/request.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from matchlock.errors import MatchlockError
from matchlock.guest.client import AgentGone, Exec, Output
from matchlock.sandbox import request, wire
from matchlock.sandbox.attach import TIMEOUT_EXIT, RunRequest, attach, exec_request
from matchlock.sandbox.control import frames, sock_path
from matchlock.sandbox.core import Sandbox
from matchlock.sandbox.pool import MARKER, write_private
from matchlock.sandbox.ports import PortForwarder
from matchlock.state import registry

SUPERVISE_ENV = "MATCHLOCK_SUPERVISOR"
LOG = "supervisor.log"
HEADER_TIMEOUT = 10.0
MAX_SIGNAL = 64
MAX_PIPES = 256  # concurrent port-forward connections per sandbox


# --- the launcher (`matchlock run -d`) ---------------------------------------------------------


def launch(args: list[str]) -> int:
    """Start the supervisor with the same `run` arguments; print the sandbox's id once it is
    ready. Its error lines are relayed; the exit code is then its own."""
    child: list[_Forked] = []
    pending: list[int] = []

    def forward(signo: int, frame: FrameType | None) -> None:
        # Ctrl-C (or a kill) of `run -d` while the sandbox boots stops the boot: the
        # supervisor aborts it and exits, and its error line is relayed below. A signal that
        # comes before the supervisor exists is passed on as soon as it does.
        if not child:
            pending.append(signo)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(child[0].pid, signal.SIGTERM)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, forward)
    proc = _Forked(args)
    child.append(proc)
    if pending:
        forward(pending[0], None)
    err: list[bytes] = []
    t = threading.Thread(target=lambda: err.append(_read_all(proc.stderr)), daemon=True)
    t.start()
    out = _read_all(proc.stdout)
    sid = out.decode(errors="replace").strip()
    if sid and proc.poll() is None:
        sys.stdout.write(sid + "\n")
        sys.stdout.flush()
        # Only now may the sandbox outlive us: the id is out (see Supervisor._announce).
        with contextlib.suppress(OSError):
            os.write(proc.stdin, b"ok\n")
        os.close(proc.stdin)
        # Until it has read that, the supervisor dies with us (PR_SET_PDEATHSIG); it closes
        # its last end of the stderr pipe once it no longer does. Ending before that would
        # take the sandbox down with us.
        t.join(HEADER_TIMEOUT)
        return 0
    t.join()
    os.close(proc.stdin)
    code = proc.wait()
    sys.stderr.buffer.write(b"".join(err))
    sys.stderr.flush()
    if not err or not b"".join(err).strip():
        sys.stderr.write("matchlock: the sandbox's supervisor ended before it was ready\n")
    return 128 - code if code < 0 else code or 1


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


class _Forked:
    """The supervisor: a fork of this process (still single-threaded: `run -d` calls launch
    before anything starts a thread) that runs `matchlock ARGS` with the variable that makes
    it the supervisor, in a session of its own, its stdin, stdout and stderr pipes to us. A
    fork, not a new interpreter: the modules `run` needs are already imported here (and in
    the fork server's forks, all of them)."""

    def __init__(self, args: list[str]) -> None:
        from matchlock.sandbox import forked

        pipes = [os.pipe() for _ in range(3)]  # stdin, stdout, stderr
        launcher = os.getpid()
        pid = os.fork()
        if pid == 0:  # the supervisor
            try:
                os.setsid()
                for n, (r, w) in enumerate(pipes):
                    os.dup2(r if n == 0 else w, n)
                os.closerange(3, 1 << 20)  # only the three pipes (as the fork server)
                os.environ[SUPERVISE_ENV] = str(launcher)  # it dies with us until ready
                forked.reset_signals()
                forked.reopen_stdio({0, 1, 2})
            except BaseException:
                os._exit(1)
            os._exit(forked.run_to_exit([sys.argv[0], *args]))
        self.pid = pid
        self.returncode: int | None = None
        for n, (r, w) in enumerate(pipes):
            os.close(r if n == 0 else w)
        self.stdin, self.stdout, self.stderr = pipes[0][1], pipes[1][0], pipes[2][0]

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


# --- the supervisor ----------------------------------------------------------------------------


def _set_pdeathsig(signo: int) -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signo, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


class Supervisor:
    """Owns one sandbox and serves its control socket until `kill` (or a signal, or the
    timeout). `foreground` (`run --rm=false`): no detaching; `base`'s command, if it has
    one, runs attached to this process's terminal, and the sandbox stays up after it ends."""

    def __init__(self, sandbox: Sandbox, base: RunRequest, background: list[str] | None,
                 timeout: float | None, *, foreground: bool = False,
                 launcher: int | None = None, pool: str | None = None,
                 entrypoint: str | None = None) -> None:
        self.sandbox = sandbox
        # A warm pool member (`matchlock pool`): paused once ready, serves nothing but a
        # claim (or its pool's release) until claimed; `timeout` counts from the claim.
        self.pool = pool
        self.pooled = pool is not None
        self.entrypoint = entrypoint
        self._t0 = time.monotonic()
        self.launcher = launcher
        self.base = base
        self.background = background
        self.timeout = timeout
        self.foreground = foreground
        self.reason: str | None = None  # why it stops
        self.signo: int | None = None  # the signal that stopped it
        self.timed_out = False
        self._stop = threading.Event()
        self._ready = False
        self._lock = threading.Lock()
        self._attached: Exec | None = None  # the foreground command while it runs
        self._pipes = threading.BoundedSemaphore(MAX_PIPES)

    def stop(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
        self._stop.set()

    def _on_signal(self, signo: int, frame: FrameType | None) -> None:
        # Only record; the watcher thread acts.
        if self.reason is None:
            self.signo = signo
            self.reason = f"stopped by {signal.Signals(signo).name}"

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self.reason is not None:
                self._stop.set()
                break
            if (self.timeout is not None and not self.pooled
                    and time.monotonic() >= self._t0 + self.timeout):
                self.timed_out = True
                self.stop(f"timed out after {self.timeout:g}s")
                break
            if self._ready and self.sandbox.vm_exited():
                # A guest panic or power-off: not `running` any more (the reason says which).
                self.stop(self.sandbox.vm_died().message)
                break
            self._stop.wait(0.1)
        if not self._ready:
            self.sandbox.abort(self.reason or "stopped")
        with self._lock:  # _foreground checks _stop and sets _attached under it
            attached = self._attached
        if attached is not None and attached.status is None:
            # Stopping while the foreground command runs: it goes down with the sandbox.
            with contextlib.suppress(AgentGone):
                attached.kill()

    def run(self) -> int:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, self._on_signal)
        if self.launcher is not None:
            # Until the id is printed, a launcher that dies (even by SIGKILL, or before its
            # own signal handlers were in place) takes the boot with it: nobody would ever
            # learn the id of the sandbox, so nobody would stop it.
            _set_pdeathsig(signal.SIGTERM)
            if os.getppid() != self.launcher:
                self._on_signal(signal.SIGTERM, None)
        threading.Thread(target=self._watch, name="supervisor-watch", daemon=True).start()
        # Published ports are bound first: a port in use fails before the sandbox exists.
        ports = (PortForwarder(self.base.publish, self.base.publish_address)
                 if self.base.publish else None)
        code = 0
        with self.sandbox:
            try:
                try:
                    self.sandbox.start()
                    if ports is not None:
                        self.sandbox.forward(ports)  # closed with the sandbox
                except BaseException:
                    if ports is not None:
                        ports.close()
                    # Never ready: nothing to keep for `rm`; the launcher relays the error.
                    self.sandbox.opts.keep_dir = False
                    raise
            except AgentGone as e:
                raise self.sandbox.agent_failure(e) from None
            except MatchlockError:
                if self.reason is not None:
                    raise MatchlockError(f"the sandbox was stopped: {self.reason}") from None
                raise
            assert self.sandbox.dir is not None
            listener = self._listen(self.sandbox.dir / registry.SOCKET)
            if self.background:
                self._start_background(self.background)
            self._ready = True
            if self.pool is not None:
                # Before the id is out: `matchlock pool` reports a member ready when it has
                # the id, and a claim looks for the marker.
                self.sandbox.pause()  # no CPU while it waits to be claimed
                write_private(self.sandbox.dir / MARKER, self.pool)
            if not self.foreground:
                self._announce(self.sandbox.dir / LOG)
            threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
            failure: MatchlockError | None = None
            if self.foreground:
                try:
                    code = self._foreground()
                except MatchlockError as e:
                    failure = e  # the sandbox still stops and is recorded as stopped
                    self.stop(self.reason or str(e))
            self._stop.wait()
            with contextlib.suppress(OSError):
                listener.close()
            (self.sandbox.dir / registry.SOCKET).unlink(missing_ok=True)
            if not self.foreground:
                print(f"stopping: {self.reason}", flush=True)
        registry.mark_stopped(self.sandbox.dir, self.reason or "stopped")
        if failure is not None:
            raise failure
        return code

    def _foreground(self) -> int:
        """`run --rm=false`: the command (if any) on this terminal, then stay up. Its exit
        code is the run's, once the sandbox is stopped."""
        sid = self.sandbox.id
        sys.stderr.write(f"Sandbox {sid} is running\n  Connect: matchlock exec -it {sid} -- sh\n"
                         f"  Stop:    matchlock kill {sid}\n")
        sys.stderr.flush()
        if not self.base.argv:
            return 0
        with self._lock:
            if self._stop.is_set():
                return 0
            ex = self.sandbox.exec(exec_request(self.sandbox, self.base))
            self._attached = ex
        try:
            code = attach(self.sandbox, ex, self.base.interactive, self.base.tty)
        except AgentGone as e:
            if self.reason is not None:
                raise MatchlockError(f"the sandbox was stopped: {self.reason}") from None
            raise self.sandbox.agent_failure(e) from None
        if self._stop.is_set():
            # Stopped while the command ran: it was killed with the sandbox.
            exit_code = (TIMEOUT_EXIT if self.timed_out else
                         128 + self.signo if self.signo else code)
            raise MatchlockError(f"the sandbox was stopped: {self.reason}", exit_code=exit_code)
        with contextlib.suppress(MatchlockError):
            registry.add_event(sid, "command exited", f"code {code}")
        sys.stderr.write(f"matchlock: the command exited with {code}; sandbox {sid} stays "
                         f"up until `matchlock kill {sid}`\n")
        sys.stderr.flush()
        return code

    def _listen(self, path: Path) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(sock_path(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        s.listen(64)
        return s

    def _announce(self, log: Path) -> None:
        """Tell the launcher the id; from its acknowledgement on (it has printed the id),
        the sandbox outlives it. A launcher that dies before (SIGKILL included) takes the
        sandbox with it: nobody would know its id."""
        try:
            sys.stdout.write(self.sandbox.id + "\n")
            sys.stdout.flush()
        except OSError:  # the launcher is gone (EPIPE): nobody will ever know the id
            self.sandbox.opts.keep_dir = False
            raise MatchlockError("`run -d` ended before it printed the sandbox's id") from None
        # The launcher waits for this end of the stderr pipe to close: once the sandbox no
        # longer dies with it (below), not before.
        spare = os.dup(2) if self.launcher is not None else -1
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)  # the launcher's read of our stdout ends here
        os.dup2(fd, 2)
        os.close(fd)
        if self.launcher is None:
            return
        try:
            ack = b""
            with contextlib.suppress(OSError):
                ack = os.read(0, 16)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            if ack != b"ok\n":
                self.sandbox.opts.keep_dir = False  # never announced: nothing for `rm` to find
                raise MatchlockError("`run -d` ended before it printed the sandbox's id")
            _set_pdeathsig(0)
        finally:
            os.close(spare)

    def _start_background(self, argv: list[str]) -> None:
        req = RunRequest(argv=argv, image=self.base.image, env_files=self.base.env_files,
                         env=self.base.env, workdir=self.base.workdir, user=self.base.user,
                         privileged=self.base.privileged)
        ex = self.sandbox.exec(exec_request(self.sandbox, req))

        def drain() -> None:
            try:
                for ev in ex.events():
                    if isinstance(ev, Output):
                        os.write(1 if ev.stream == "stdout" else 2, ev.data)
                    elif ex.status is not None:
                        print(f"background command exited: {ex.status.code}", flush=True)
                        registry.add_event(self.sandbox.id, "command exited",
                                           f"code {ex.status.code}")
            except (AgentGone, OSError, MatchlockError):
                pass

        threading.Thread(target=drain, name="background", daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    # --- one client ----------------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self._serve_checked(conn)
            except (wire.WireError, MatchlockError) as e:
                with contextlib.suppress(OSError):
                    conn.sendall(wire.encode_json(wire.ERROR, {"message": str(e)}))
            except (OSError, AgentGone):
                pass

    def _serve_checked(self, conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid not in (0, os.geteuid()):
            raise wire.WireError("permission denied")
        conn.settimeout(HEADER_TIMEOUT)
        dec = wire.Decoder()
        incoming = frames(conn, dec)
        first = next(incoming, None)
        if first is None:
            return
        if first.type != wire.REQUEST:
            raise wire.WireError("the first frame must be a request")
        spec = request.parse_request(first.json())
        conn.settimeout(None)
        if spec == "ping":
            conn.sendall(wire.encode_json(wire.EXIT, {"code": 0}))
            return
        if spec == "shutdown":
            conn.sendall(wire.encode_json(wire.EXIT, {"code": 0}))
            self.stop("kill")
            return
        if self._stop.is_set():
            raise MatchlockError("the sandbox is stopping")
        if isinstance(spec, request.PoolRequest):
            conn.sendall(wire.encode_json(wire.ANSWER, self._pool_request(spec)))
            return
        if self.pooled:
            name = (self.pool or "").split(" ")[0]
            raise MatchlockError(f"sandbox {self.sandbox.id} is in warm pool {name}: take one "
                                 f"with `matchlock run -d --pool {name}`")
        if isinstance(spec, request.AllowListRequest):
            conn.sendall(wire.encode_json(wire.ANSWER, self._allow_list(spec)))
            return
        if isinstance(spec, request.ForwardRequest):
            self._forward(conn, incoming, spec.port)
            return
        assert isinstance(spec, request.ExecSpec)
        req = RunRequest(argv=spec.argv, image=self.base.image, env=tuple(spec.env),
                         workdir=spec.workdir, user=spec.user, interactive=spec.stdin,
                         tty=spec.tty, privileged=self.base.privileged)
        ex = self.sandbox.exec(dataclasses.replace(exec_request(self.sandbox, req),
                                                   rows=spec.rows, cols=spec.cols))
        threading.Thread(target=self._client_input, args=(incoming, ex, conn, spec.stdin),
                         daemon=True).start()
        try:
            for ev in ex.events():
                if isinstance(ev, Output):
                    ftype = wire.STDOUT if ev.stream == "stdout" else wire.STDERR
                    conn.sendall(wire.encode(ftype, ev.data))
        except AgentGone:
            raise MatchlockError(
                f"the sandbox stopped ({self.reason})" if self.reason else
                "lost the guest agent") from None
        assert ex.status is not None
        conn.sendall(wire.encode_json(wire.EXIT, {"code": ex.status.code}))

    def _pool_request(self, req: request.PoolRequest) -> dict[str, object]:
        """Claim (resume, start the command) or release (stop) this pool member; only for
        its own pool, once."""
        with self._lock:
            if not self.pooled or req.pool != self.pool or self._stop.is_set():
                raise MatchlockError("not a ready member of this pool")
            self.pooled = False
        assert self.sandbox.dir is not None
        (self.sandbox.dir / MARKER).unlink(missing_ok=True)
        if req.action == "release":
            self.stop("pool closed")
            return {"id": self.sandbox.id}
        try:
            # The guest's clock stood still while paused: RESUME sets it, adds entropy.
            self.sandbox.resume()
        except (MatchlockError, AgentGone) as e:
            self.stop(f"could not resume: {e}")
            raise MatchlockError(f"could not resume the pool member: {e}") from None
        self._t0 = time.monotonic()
        if req.argv:
            from matchlock.sandbox.command import compose_argv

            self._start_background(compose_argv(self.base.image, tuple(req.argv),
                                                self.entrypoint))
        with contextlib.suppress(MatchlockError):
            registry.add_event(self.sandbox.id, "claimed from warm pool",
                               (self.pool or "").split(" ")[0])
        print(f"claimed from warm pool; command: {req.argv or '(none)'}", flush=True)
        return {"id": self.sandbox.id}

    def _allow_list(self, req: request.AllowListRequest) -> dict[str, object]:
        changed: list[str] = []
        if req.action == "add":
            changed = self.sandbox.allow_list_add(req.hosts)
        elif req.action == "delete":
            changed = self.sandbox.allow_list_delete(req.hosts)
        allowed = self.sandbox.allow_list()
        if req.action != "list" and not self.foreground:  # stdout is supervisor.log
            print(f"allow-list {req.action}: {', '.join(changed) or 'no change'}; now: "
                  f"{', '.join(allowed) or '(empty)'}", flush=True)
        return {"changed": changed, "allowed": allowed}

    def _forward(self, conn: socket.socket, incoming: Iterator[wire.Frame], port: int) -> None:
        from matchlock.sandbox.pipe import serve_pipe

        if not self._pipes.acquire(blocking=False):
            raise MatchlockError(f"too many forwarded connections (at most {MAX_PIPES})")
        try:
            stream = self.sandbox.open_port(port)
            serve_pipe(conn, incoming, stream)
        finally:
            self._pipes.release()

    def _client_input(self, frames: Iterator[wire.Frame], ex: Exec, conn: socket.socket,
                      stdin: bool) -> None:
        """The client's stdin and signals; a client that goes away or misbehaves kills its
        command (nobody would read its output)."""
        stdin_open = stdin
        try:
            for f in frames:
                if f.type == wire.STDIN and stdin_open:
                    if f.payload:
                        ex.write_stdin(f.payload)
                    else:
                        ex.close_stdin()
                        stdin_open = False
                elif f.type == wire.RESIZE:
                    ex.resize(*wire.decode_resize(f.payload))
                elif f.type == wire.SIGNAL:
                    signo = wire.decode_signal(f.payload)
                    if not 1 <= signo <= MAX_SIGNAL:
                        raise wire.WireError(f"invalid signal {signo}")
                    ex.signal(signo)
                else:
                    raise wire.WireError(f"unexpected frame {chr(f.type)!r}")
        except (wire.WireError, OSError, AgentGone):
            pass
        # The client closed its connection (it never half-closes) or broke the protocol.
        with contextlib.suppress(AgentGone):
            if ex.status is None:
                ex.kill()
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
