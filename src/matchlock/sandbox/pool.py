"""Warm pools for the CLI: `matchlock pool NAME` keeps N detached sandboxes of one
configuration booted and paused; `matchlock run -d --pool NAME [-- CMD]` claims one.

A member is an ordinary detached sandbox (`run -d`, its own supervisor, id, hostname, CA,
network namespace, RNG seeded at SETUP) started by the pool process with the pool's `run`
options and `--pool-member "NAME TOKEN"`: once ready its supervisor pauses the VM (QEMU
`stop`) and writes the marker file `pool` in its directory; it then refuses everything but a
claim or its pool's release. A claim resumes it (QEMU `cont`, then the agent's RESUME sets the
guest clock and adds entropy), starts the command in the background and removes the marker; the
pool process sees the marker gone and starts a replacement.

Exact configuration: a claim names the pool and takes its configuration as it is (`run
--pool` refuses every other option), and members carry the token of the pool process that
started them, so a member of an earlier pool of the same name (another configuration) is never
handed out. The pool process holds `pools/NAME.lock` (flock) while it runs; its token is in
`pools/NAME` (0600). Secrets come from the pool process's environment, as for `run -d`.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
from pathlib import Path

from matchlock.errors import MatchlockError
from matchlock.paths import state_dir

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
MARKER = "pool"  # in a pool member's directory while it waits: "NAME TOKEN"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise MatchlockError(f"invalid pool name {name!r}",
                             hint="use letters, digits, '.', '_' and '-' (at most 63)")
    return name


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, owner-only, never through a symlink planted there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _dir() -> Path:
    d = state_dir() / "pools"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


class PoolLock:
    """Held by the running `matchlock pool NAME` process: one pool of a name at a time."""

    def __init__(self, name: str) -> None:
        self.name = check_name(name)
        d = _dir()
        self._fd = os.open(d / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise MatchlockError(f"pool {name} is already running") from None
        self.token = secrets.token_hex(16)
        tmp = d / f".{name}.{os.getpid()}"
        write_private(tmp, self.token)
        os.replace(tmp, d / name)

    @property
    def member_tag(self) -> str:
        return f"{self.name} {self.token}"

    def release(self) -> None:
        (_dir() / self.name).unlink(missing_ok=True)
        os.close(self._fd)


def live_tag(name: str) -> str:
    """'NAME TOKEN' of the running pool NAME, or a one-line error."""
    d = _dir()
    check_name(name)
    try:
        fd = os.open(d / f"{name}.lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MatchlockError(f"pool {name} is not running",
                             hint=f"start it with `matchlock pool {name} -- RUN OPTIONS`") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f"{name} {(d / name).read_text().strip()}"  # held: the pool runs
        raise MatchlockError(f"pool {name} is not running",
                             hint=f"start it with `matchlock pool {name} -- RUN OPTIONS`")
    finally:
        os.close(fd)


def waiting(path: Path, tag: str) -> bool:
    """Is the sandbox in `path` a ready, unclaimed member of the pool `tag`?"""
    try:
        return (path / MARKER).read_text() == tag
    except OSError:
        return False


def ask(sid: str, action: str, tag: str, argv: list[str]) -> str | None:
    """Claim or release member `sid`; its id, or None when it was not (any more) a ready
    member (claimed by someone else, stopping, gone)."""
    from matchlock.sandbox import wire
    from matchlock.sandbox.control import connect, request

    try:
        s = connect(sid)
    except MatchlockError:
        return None
    with s:
        try:
            f = request(s, {"op": f"pool-{action}", "pool": tag, "argv": argv})
        except (OSError, wire.WireError):
            return None
    if f is None or f.type != wire.ANSWER:
        return None
    answer = f.json()
    return str(answer["id"]) if isinstance(answer.get("id"), str) else None


def claim(name: str, argv: list[str]) -> str:
    """Take a ready member of the running pool NAME; its id."""
    from matchlock.state import registry

    tag = live_tag(name)
    for entry in registry.entries():
        if entry.status == "running" and waiting(entry.path, tag):
            sid = ask(entry.owner.id, "claim", tag, argv)
            if sid is not None:
                return sid
    raise MatchlockError(f"pool {name} has no ready sandbox",
                         hint="its replacements are starting; try again, or use a larger "
                              "--size")
