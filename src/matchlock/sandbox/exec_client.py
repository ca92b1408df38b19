"""The client end of `matchlock exec`: send one exec request over a supervisor's socket, relay
stdin, signals and terminal size, write the output, return the exit code.

Kept free of click and of the sandbox machinery: both the click command (`cli/exec.py`) and
the fast path of the executable (`cli/entry.py`) run it, and a fresh `matchlock exec` is
mostly Python start-up plus what this module imports.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence

from matchlock.errors import MatchlockError
from matchlock.sandbox import wire
from matchlock.sandbox.attach_term import pump_stdin, raw_terminal, term_size

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
              signal.SIGUSR2)


def run_exec(sock: socket.socket, argv: Sequence[str], env: Sequence[str], workdir: str | None,
             user: str | None, interactive: bool, tty: bool) -> int:
    """Run argv in the sandbox behind `sock` (which this closes); the command's exit code."""
    send_lock = threading.Lock()

    def send(data: bytes) -> None:
        with send_lock:
            sock.sendall(data)

    rows, cols = term_size()
    send(wire.encode_json(wire.REQUEST, {
        "op": "exec", "argv": list(argv), "env": list(env), "workdir": workdir, "user": user,
        "stdin": interactive, "tty": tty, "rows": rows, "cols": cols,
    }))
    if interactive:
        threading.Thread(target=pump_stdin, args=(
            lambda data: send(wire.encode(wire.STDIN, data)),
            lambda: send(wire.encode(wire.STDIN, b"")),
        ), daemon=True).start()
    with raw_terminal(tty and interactive):
        return _attach(sock, send, tty)


def _attach(sock: socket.socket, send: Callable[[bytes], None], tty: bool) -> int:
    r, w = os.pipe()
    os.set_blocking(w, False)
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    handled = (*_FORWARDED, signal.SIGWINCH) if tty else _FORWARDED
    old = {s: signal.signal(s, lambda signo, frame: None) for s in handled}
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(r, selectors.EVENT_READ)
    dec = wire.Decoder()
    out = sys.stdout.buffer
    err = sys.stderr.buffer
    try:
        while True:
            for key, _ in sel.select():
                if key.fileobj == r:
                    for signo in os.read(r, 64):
                        with contextlib.suppress(OSError):
                            if signo == signal.SIGWINCH:
                                send(wire.encode_resize(*term_size()))
                            else:
                                send(wire.encode_signal(signo))
                    continue
                data = sock.recv(1 << 16)
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
        signal.set_wakeup_fd(old_fd)
        for s, h in old.items():
            signal.signal(s, h)
        sel.close()
        os.close(r)
        os.close(w)
        sock.close()
