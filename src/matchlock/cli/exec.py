"""`matchlock exec`: run a command in a detached sandbox, through its supervisor's socket."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import sys
import threading
from collections.abc import Callable

import click

from matchlock.errors import MatchlockError
from matchlock.sandbox.attach_term import pump_stdin, raw_terminal, term_size

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
              signal.SIGUSR2)


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin to the command.")
@click.option("-t", "--tty", is_flag=True, help="Run the command on a pseudo-terminal.")
@click.option("-w", "--workdir", default=None, help="Working directory in the guest.")
@click.option("-u", "--user", default=None, help="uid, uid:gid, or user name from the image.")
@click.option("-e", "--env", "envs", multiple=True, help="KEY=VALUE, or KEY to copy from the host.")
@click.argument("sandbox_id")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(interactive: bool, tty: bool, workdir: str | None, user: str | None,
          envs: tuple[str, ...], sandbox_id: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in the running sandbox SANDBOX_ID (started with `run -d`)."""
    from matchlock.sandbox import wire
    from matchlock.sandbox.command import parse_env_entry
    from matchlock.sandbox.control import connect

    if command[:1] == ("--",):
        command = command[1:]  # click keeps the `--` that follows a positional argument
    if not command:
        raise MatchlockError("no command given", hint="matchlock exec ID -- CMD")
    if tty and interactive and not sys.stdin.isatty():
        raise MatchlockError("-it needs a terminal on stdin", hint="drop -t to pipe stdin instead")
    if workdir is not None and not workdir.startswith("/"):
        raise MatchlockError(f"--workdir {workdir!r} is not absolute", hint="use an absolute path")
    env = ["=".join(parse_env_entry(e, "-e")) for e in envs]
    if tty:
        env.insert(0, "TERM=" + os.environ.get("TERM", "xterm"))
    sock = connect(sandbox_id)
    send_lock = threading.Lock()

    def send(data: bytes) -> None:
        with send_lock:
            sock.sendall(data)

    rows, cols = term_size()
    send(wire.encode_json(wire.REQUEST, {
        "op": "exec", "argv": list(command), "env": env, "workdir": workdir, "user": user,
        "stdin": interactive, "tty": tty, "rows": rows, "cols": cols,
    }))
    if interactive:
        threading.Thread(target=pump_stdin, args=(
            lambda data: send(wire.encode(wire.STDIN, data)),
            lambda: send(wire.encode(wire.STDIN, b"")),
        ), daemon=True).start()
    with raw_terminal(tty and interactive):
        code = _attach(sock, send, tty)
    sys.exit(code)


def _attach(sock: socket.socket, send: Callable[[bytes], None], tty: bool) -> int:
    from matchlock.sandbox import wire

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
        sock.close()
