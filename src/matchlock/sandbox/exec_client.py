"""The client end of `matchlock exec`: send one exec request over a supervisor's socket, relay
stdin, signals and terminal size, write the output, return the exit code.

Kept free of click and of the sandbox machinery: both the click command (`cli/exec.py`) and
the fast path of the executable (`cli/entry.py`) run it, and a fresh `matchlock exec` is
mostly Python start-up plus what this module imports. Hence the C modules under `signal`,
`selectors` and `threading` (`_signal`, `select`, `_thread`): the Python wrappers import
`enum`, `functools` and `collections`, several ms of that start-up (docs/performance.md).
"""

from __future__ import annotations

import _thread
import os
import select
import sys

from matchlock.errors import MatchlockError
from matchlock.sandbox import wire
from matchlock.sandbox.attach_term import pump_stdin, raw_terminal, term_size

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal  # no stubs for _signal: the same functions, typed
    from _socket import socket
    from collections.abc import Callable, Sequence
else:
    import _signal

_FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT,
              _signal.SIGUSR1, _signal.SIGUSR2)


def run_exec(sock: socket, argv: Sequence[str], env: Sequence[str], workdir: str | None,
             user: str | None, interactive: bool, tty: bool) -> int:
    """Run argv in the sandbox behind `sock` (which this closes); the command's exit code."""
    send_lock = _thread.allocate_lock()

    def send(data: bytes) -> None:
        with send_lock:
            sock.sendall(data)

    rows, cols = term_size()
    send(wire.encode_json(wire.REQUEST, {
        "op": "exec", "argv": list(argv), "env": list(env), "workdir": workdir, "user": user,
        "stdin": interactive, "tty": tty, "rows": rows, "cols": cols,
    }))
    if interactive:  # a daemon thread: exits with the process
        _thread.start_new_thread(pump_stdin, (
            lambda data: send(wire.encode(wire.STDIN, data)),
            lambda: send(wire.encode(wire.STDIN, b"")),
        ))
    with raw_terminal(tty and interactive):
        return _attach(sock, send, tty)


def _attach(sock: socket, send: Callable[[bytes], None], tty: bool) -> int:
    r, w = os.pipe()
    os.set_blocking(w, False)
    old_fd = _signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    handled = (*_FORWARDED, _signal.SIGWINCH) if tty else _FORWARDED
    old = {s: _signal.signal(s, _ignore) for s in handled}
    poll = select.poll()
    poll.register(sock.fileno(), select.POLLIN)
    poll.register(r, select.POLLIN)
    dec = wire.Decoder()
    out = sys.stdout.buffer
    err = sys.stderr.buffer
    try:
        while True:
            for fd, _ in poll.poll():
                if fd == r:
                    for signo in os.read(r, 64):
                        try:
                            if signo == _signal.SIGWINCH:
                                send(wire.encode_resize(*term_size()))
                            else:
                                send(wire.encode_signal(signo))
                        except OSError:
                            pass
                    continue
                data = sock.recv(1 << 20)  # a few output frames per wake-up
                if not data:
                    raise MatchlockError("lost the connection to the sandbox's supervisor")
                for f in dec.feed(data):
                    if f.type in (wire.STDOUT, wire.STDERR):
                        stream = out if f.type == wire.STDOUT else err
                        try:
                            stream.write(f.payload)
                            stream.flush()
                        except BrokenPipeError:
                            return 141
                    elif f.type == wire.EXIT:
                        code = f.json().get("code")
                        return code if isinstance(code, int) else 1
                    elif f.type == wire.ERROR:
                        raise MatchlockError(str(f.json().get("message", "error")))
    except wire.WireError as e:
        raise MatchlockError(f"bad answer from the sandbox's supervisor: {e}") from None
    finally:
        _signal.set_wakeup_fd(old_fd)
        for s, h in old.items():
            _signal.signal(s, h)
        os.close(r)
        os.close(w)
        sock.close()


def _ignore(signo: int, frame: object) -> None:
    """Forwarded signals only wake the loop (through the wakeup fd)."""
