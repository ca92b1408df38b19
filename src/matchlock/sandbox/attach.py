"""Run one command in a sandbox attached to this process's stdio, under a deadline and signals.

The front end (`matchlock run` today; `exec` and the supervisor next) builds a `RunRequest`
and calls `run_attached`; everything between the flags and the exit code lives here.

Signals and `--timeout` never raise from a signal handler (other threads run: the agent
reader, the egress proxy): the handler only records the signal and wakes `RunControl`'s
thread, which decides. While the sandbox boots, a signal or the deadline aborts it (the VMM is
killed and every wait on the agent fails at once); once the command runs, the first signal is
forwarded to it, a second one (or `KILL_GRACE_S` later) kills it, and if even that is not
answered within another grace period the sandbox is aborted: a guest cannot keep a run alive.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType, TracebackType

from matchlock.errors import MatchlockError
from matchlock.guest.client import AgentGone, Exec, Output
from matchlock.guest.protocol import ExecRequest
from matchlock.image.config import ImageConfig
from matchlock.sandbox.attach_term import pump_stdin, raw_terminal, term_size
from matchlock.sandbox.command import compose_env
from matchlock.sandbox.core import Sandbox
from matchlock.sandbox.ports import PortForwarder, PortSpec

KILL_GRACE_S = 5.0
TIMEOUT_EXIT = 124
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class RunRequest:
    """One command for `run_attached`: what the flags asked for, before the image's defaults."""

    argv: list[str]
    image: ImageConfig
    env_files: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    workdir: str | None = None
    user: str | None = None
    tty: bool = False
    interactive: bool = False
    privileged: bool = False
    timeout: float | None = None
    publish: tuple[PortSpec, ...] = ()  # sandbox.ports.parse_publish
    publish_address: str | tuple[str, ...] = "127.0.0.1"  # one or several host addresses


class RunControl:
    """Turns signals and the deadline into actions on one sandbox, from a thread of its own."""

    def __init__(self, sandbox: Sandbox, timeout: float | None) -> None:
        self.sandbox = sandbox
        self.timeout = timeout
        self.timed_out = False
        self.signo: int | None = None  # the first signal received
        self.aborted = False
        self._exec: Exec | None = None
        self._pending: list[int] = []
        self._wake = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._loop, name="run-control", daemon=True)
        self._old: dict[int, object] = {}

    # --- lifetime ---------------------------------------------------------------------------

    def __enter__(self) -> RunControl:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in _SIGNALS}
        self._thread.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        with self._wake:
            self._done = True
            self._wake.notify_all()
        self._thread.join(KILL_GRACE_S)
        for s, h in self._old.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)  # type: ignore[arg-type]

    def _handler(self, signo: int, frame: FrameType | None) -> None:
        # Only record: runs in the main thread between two bytecodes, maybe inside a lock.
        self._pending.append(signo)
        with self._wake:
            self._wake.notify_all()

    def attach(self, ex: Exec) -> None:
        with self._wake:
            self._exec = ex
            self._wake.notify_all()

    # --- the decisions ----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._decide()
        except Exception as e:  # never a traceback from this thread; end the run instead
            self._abort(f"internal error: {e}")

    def _decide(self) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        kill_at: float | None = None  # when a forwarded signal escalates to KILL
        abort_at: float | None = None  # when an unanswered KILL escalates to the VMM
        while True:
            with self._wake:
                while not self._done and not self._pending:
                    waits = [t for t in (deadline, kill_at, abort_at) if t is not None]
                    left = min(waits) - time.monotonic() if waits else None
                    if left is not None and left <= 0:
                        break
                    self._wake.wait(left)
                if self._done:
                    return
                signals, self._pending[:] = list(self._pending), []
                ex = self._exec
            now = time.monotonic()
            if deadline is not None and now >= deadline and not self.timed_out:
                self.timed_out = True
                self._abort(f"timed out after {self.timeout:g}s")
                deadline = None
            for signo in signals:
                if self.signo is None:
                    self.signo = signo
                if ex is None:
                    self._abort("interrupted")  # still booting: nothing to forward to
                elif kill_at is None and abort_at is None:
                    self._send(ex.signal, signo)
                    kill_at = now + KILL_GRACE_S
                else:
                    kill_at = now  # a second signal: kill now
            if kill_at is not None and now >= kill_at and ex is not None:
                self._send(ex.kill)
                kill_at, abort_at = None, now + KILL_GRACE_S
            if abort_at is not None and now >= abort_at:
                self._abort("the command did not end after SIGKILL")
                abort_at = None

    def _send(self, op: object, *args: int) -> None:
        try:
            op(*args)  # type: ignore[operator]
        except AgentGone:
            self._abort("lost the guest agent")

    def _abort(self, reason: str) -> None:
        self.aborted = True
        self.sandbox.abort(reason)

    def explain(self, error: BaseException) -> MatchlockError:
        """The one-line error for a run that ended with `error` (maybe because we ended it)."""
        if self.timed_out:
            return MatchlockError(f"timed out after {self.timeout:g}s; the sandbox was killed",
                                  exit_code=TIMEOUT_EXIT)
        if self.signo is not None and self.aborted:
            name = "interrupted" if self.signo == signal.SIGINT else (
                f"stopped by {signal.Signals(self.signo).name}")
            return MatchlockError(name, exit_code=128 + self.signo)
        if isinstance(error, AgentGone):
            return self.sandbox.agent_failure(error)
        if isinstance(error, MatchlockError):
            return error
        return MatchlockError(str(error))


def exec_request(sandbox: Sandbox, req: RunRequest) -> ExecRequest:
    """The EXEC for a started sandbox: the image's defaults under the request's choices."""
    cfg = req.image
    egress = sandbox.opts.egress
    env = compose_env(cfg.env, req.env_files, req.env, sandbox.hostname, req.tty,
                      egress.guest_env() if egress else {})
    rows, cols = term_size()
    return ExecRequest(
        argv=req.argv, env=env, cwd=req.workdir or cfg.working_dir or "/",
        user=req.user if req.user is not None else (cfg.user or None),
        tty=req.tty, privileged=req.privileged, stdin=req.interactive, rows=rows, cols=cols,
    )


def run_attached(sandbox: Sandbox, req: RunRequest) -> int:
    """Start `sandbox`, run the command with this process's stdio, tear everything down;
    the command's exit code. Errors (including a timeout or a signal) are MatchlockErrors."""
    # Listeners are bound first: a port in use fails before anything of the sandbox exists.
    ports = PortForwarder(req.publish, req.publish_address) if req.publish else None
    try:
        return _run_attached(sandbox, req, ports)
    finally:
        if ports is not None:
            ports.close()


def _run_attached(sandbox: Sandbox, req: RunRequest, ports: PortForwarder | None) -> int:
    with RunControl(sandbox, req.timeout) as control, sandbox:
        try:
            sandbox.start()
            if ports is not None:
                ports.start(sandbox.conn)
            ex = sandbox.exec(exec_request(sandbox, req))
            control.attach(ex)
            code = attach(sandbox, ex, req.interactive, req.tty)
        except (MatchlockError, AgentGone, OSError) as e:
            raise control.explain(e) from None
        if control.timed_out or (control.aborted and control.signo is not None):
            raise control.explain(AgentGone("ended"))
        return code


def attach(sandbox: Sandbox, ex: Exec, interactive: bool, tty: bool) -> int:
    """Copy the exec's output to stdout/stderr (and stdin to it) until it exits."""
    if interactive:
        threading.Thread(target=pump_stdin, args=(ex.write_stdin, ex.close_stdin,
                                                  (AgentGone, OSError)), daemon=True).start()
    out = sys.stdout.buffer
    err = sys.stderr.buffer
    with _raw_terminal(tty and interactive, ex):
        try:
            for event in ex.events():
                if isinstance(event, Output):
                    stream = out if event.stream == "stdout" else err
                    stream.write(event.data)
                    stream.flush()
        except BrokenPipeError:
            ex.kill()
            return 141
    assert ex.status is not None
    return ex.status.code


@contextmanager
def _raw_terminal(enabled: bool, ex: Exec) -> Iterator[None]:
    """Raw mode, and the local terminal's size changes forwarded to the exec's PTY."""
    if not enabled:
        yield
        return
    resized = threading.Event()
    stop = threading.Event()

    def on_winch(signo: int, frame: FrameType | None) -> None:
        resized.set()  # only record (see the module's docstring); a thread sends the resize

    def forward_resizes() -> None:
        while not stop.is_set():
            if resized.wait(0.2):
                resized.clear()
                try:
                    ex.resize(*term_size())
                except AgentGone:
                    return

    old = signal.signal(signal.SIGWINCH, on_winch)
    threading.Thread(target=forward_resizes, name="resize", daemon=True).start()
    try:
        with raw_terminal(True):
            yield
    finally:
        stop.set()
        signal.signal(signal.SIGWINCH, old)
