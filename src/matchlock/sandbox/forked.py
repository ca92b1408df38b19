"""A forked copy of a matchlock process that becomes a fresh `matchlock` command.

Starting a process with `python -m matchlock...` costs its interpreter start and its imports
again (~0.1-0.2 s of CPU before it does anything). A fork of a process that has those
modules already, made while that process has no other thread, costs a few milliseconds; the
copy then takes the streams, environment and arguments it should have started with and runs
the CLI as a new process would. Used by the fork server (cli/forkserver.py) and by `run -d`
for its supervisor (sandbox/supervisor.py).
"""

from __future__ import annotations

import io
import os
import sys


def reset_signals() -> None:
    """Dispositions as a new Python process starts with (SIGPIPE stays ignored: Python's)."""
    import signal

    for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def reopen_stdio(present: set[int]) -> None:
    """sys.stdin/stdout/stderr on fds 0-2 (those in present; None for the others), buffered
    as Python chooses at start-up: stdout line-buffered on a terminal, stderr always."""
    enc = sys.stdout.encoding if sys.stdout is not None else "utf-8"
    errors = (sys.stdout.errors if sys.stdout is not None else None) or "strict"

    def text(fd: int, mode: str) -> io.TextIOWrapper | None:
        if fd not in present:
            return None
        raw = open(fd, mode + "b", closefd=False)  # noqa: SIM115 - lives as sys.std*
        return io.TextIOWrapper(raw, encoding=enc,
                                errors="backslashreplace" if fd == 2 else errors,
                                line_buffering=fd == 2 or os.isatty(fd))

    sys.stdin = text(0, "r")
    sys.stdout = text(1, "w")
    sys.stderr = text(2, "w")


def fill_std_fds() -> None:
    """A closed stdin, stdout or stderr becomes /dev/null (stdin reads as empty, output is
    dropped), as daemons do: otherwise the next file this process opens would take its
    number, and a command's input or output would be some other file."""
    missing = set()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            missing.add(fd)
    if not missing:
        return
    for fd in sorted(missing):
        got = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
        if got != fd:
            os.dup2(got, fd)
            os.close(got)
    reopen_stdio({0, 1, 2})


def run_cli(argv: list[str]) -> None:
    """Run `matchlock ARGV[1:]` in this process, as bin/matchlock would (never returns:
    SystemExit carries the code up to the interpreter's own exit)."""
    sys.argv = argv
    from matchlock.cli.entry import main

    main()
    raise SystemExit(0)


def run_to_exit(argv: list[str]) -> int:
    """run_cli in a fork that must not unwind the stack it was forked from (nor run the
    parent's exit handlers): the exit code, once the streams are flushed, for os._exit."""
    code = 1
    try:
        run_cli(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    return code
