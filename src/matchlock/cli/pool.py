"""`matchlock pool NAME [--size N] [-- RUN OPTIONS]`: keep N paused detached sandboxes of one
configuration ready for `matchlock run -d --pool NAME [-- CMD]` (sandbox/pool.py)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from types import FrameType

import click

from matchlock.errors import MatchlockError

POLL_S = 0.2
STOP_WAIT_S = 20.0
MAX_BACKOFF_S = 30.0
# Options a member cannot take: it is detached and claimed later, each member binds no port.
_REFUSED = ("-d", "--detach", "-i", "--interactive", "-t", "--tty", "--pool", "--pool-member",
            "-p", "--publish", "--rm", "--no-rm")


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("--size", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Sandboxes kept ready.")
@click.argument("name")
@click.argument("run_options", nargs=-1, type=click.UNPROCESSED)
def pool(size: int, name: str, run_options: tuple[str, ...]) -> None:
    """Keep SIZE sandboxes of one configuration (`run` OPTIONS, no command) booted and paused
    until Ctrl-C; `matchlock run -d --pool NAME [-- CMD]` takes one in milliseconds."""
    from matchlock.sandbox.pool import PoolLock, check_name

    check_name(name)
    opts = list(run_options[1:] if run_options[:1] == ("--",) else run_options)
    for tok in opts:
        if tok == "--":
            raise MatchlockError("a pool's members run no command",
                                 hint="give the command to `matchlock run -d --pool NAME -- CMD`")
        if tok in _REFUSED or tok.split("=", 1)[0] in _REFUSED:
            raise MatchlockError(f"`matchlock pool` cannot take {tok}")
    lock = PoolLock(name)
    stop: list[int] = []

    def on_signal(signo: int, frame: FrameType | None) -> None:
        stop.append(signo)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    members: list[str] = []
    try:
        _keep(lock.member_tag, size, opts, members, stop)
    finally:
        _release(lock.member_tag, members)
        lock.release()


def _keep(tag: str, size: int, opts: list[str], members: list[str], stop: list[int]) -> None:
    from matchlock.sandbox.pool import waiting
    from matchlock.state import registry

    backoff = 1.0
    started = 0
    while not stop:
        alive = []
        for sid in members:
            with contextlib.suppress(MatchlockError):
                entry = registry.lookup(sid)
                if entry.status == "running" and waiting(entry.path, tag):
                    alive.append(sid)
        members[:] = alive
        if len(members) >= size:
            time.sleep(POLL_S)
            continue
        r = subprocess.run([sys.executable, "-m", "matchlock.cli.main", "run", "-d",
                            "--pool-member", tag, *opts], capture_output=True, text=True)
        if stop:
            sid = r.stdout.strip()
            if r.returncode == 0 and sid:
                members.append(sid)  # released below
            return
        if r.returncode != 0 or not r.stdout.strip():
            err = r.stderr.strip().splitlines()
            msg = err[-1] if err else f"exit code {r.returncode}"
            if started == 0:  # the configuration itself does not start: say so and stop
                raise MatchlockError(f"the pool's first sandbox did not start: {msg}")
            print(f"matchlock pool: a sandbox did not start ({msg}); retrying in "
                  f"{backoff:g}s", file=sys.stderr, flush=True)
            _sleep(backoff, stop)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            continue
        backoff = 1.0
        started += 1
        sid = r.stdout.strip()
        members.append(sid)
        print(f"ready {sid}", flush=True)


def _sleep(seconds: float, stop: list[int]) -> None:
    deadline = time.monotonic() + seconds
    while not stop and time.monotonic() < deadline:
        time.sleep(POLL_S)


def _release(tag: str, members: list[str]) -> None:
    """Stop every member not claimed, and wait until they are gone."""
    from matchlock.sandbox.pool import ask
    from matchlock.state import registry

    released = [sid for sid in members if ask(sid, "release", tag, []) is not None]
    deadline = time.monotonic() + STOP_WAIT_S
    for sid in released:
        while time.monotonic() < deadline:
            try:
                if registry.lookup(sid).status != "running":
                    break
            except MatchlockError:
                break
            time.sleep(0.1)
        with contextlib.suppress(MatchlockError, subprocess.SubprocessError):
            subprocess.run([sys.executable, "-m", "matchlock.cli.main", "rm", sid],
                           capture_output=True, timeout=60)
