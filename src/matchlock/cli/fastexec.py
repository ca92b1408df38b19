"""`matchlock exec ID -- CMD` without click: the argument parser (pure) and the path that
connects straight to the supervisor's socket.

An agent calls exec for every tool call, so its fixed cost matters: click and the registry
cost more than the exec itself. The fast path takes only what it fully understands; for
anything else (`--help`, an unknown flag, a bad value, a sandbox that does not answer) it
steps aside and the click command gives the usual help or one-line error.
"""

from __future__ import annotations

import os
import sys

from matchlock.errors import MatchlockError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from _socket import socket

_FLAGS = {"-i": "interactive", "--interactive": "interactive", "-t": "tty", "--tty": "tty"}
_VALUES = {"-w": "workdir", "--workdir": "workdir", "-u": "user", "--user": "user",
           "-e": "env", "--env": "env"}


class ExecArgs:
    """The parsed arguments. A plain class: NamedTuple would import `typing` (~4 ms)."""

    __slots__ = ("argv", "env", "interactive", "sandbox_id", "tty", "user", "workdir")

    def __init__(self, sandbox_id: str, argv: list[str], env: list[str], workdir: str | None,
                 user: str | None, interactive: bool, tty: bool) -> None:
        self.sandbox_id = sandbox_id
        self.argv = argv
        self.env = env
        self.workdir = workdir
        self.user = user
        self.interactive = interactive
        self.tty = tty

    def _fields(self) -> tuple[object, ...]:
        return (self.sandbox_id, self.argv, self.env, self.workdir, self.user,
                self.interactive, self.tty)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExecArgs) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable lists inside, as the tuple had

    def __repr__(self) -> str:
        return "ExecArgs" + repr(self._fields())


def parse(args: list[str]) -> ExecArgs | None:
    """click's reading of `exec` arguments (options first, then ID, then the command, a `--`
    after ID dropped), or None for anything this parser does not handle."""
    flags = {"interactive": False, "tty": False}
    values: dict[str, str | None] = {"workdir": None, "user": None}
    env: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("-") or a == "-":
            break
        name, eq, inline = a.partition("=") if a.startswith("--") else (a, "", "")
        if name in _FLAGS and not eq:
            flags[_FLAGS[name]] = True
            i += 1
            continue
        if not name.startswith("--") and len(name) > 2 and name[:2] not in _VALUES:
            # -it, -ti, -iw/dir ...: a cluster of short flags, possibly ending in a value
            j = 1
            while j < len(name) and f"-{name[j]}" in _FLAGS:
                flags[_FLAGS[f"-{name[j]}"]] = True
                j += 1
            if j == len(name):
                i += 1
                continue
            name, inline, eq = f"-{name[j]}", name[j + 1:], "=" if name[j + 1:] else ""
            if name not in _VALUES:
                return None
        elif not name.startswith("--") and len(name) > 2:
            name, inline, eq = name[:2], name[2:], "="
        if name not in _VALUES:
            return None
        if eq:
            value = inline
            i += 1
        elif i + 1 < len(args):
            value = args[i + 1]
            i += 2
        else:
            return None
        if _VALUES[name] == "env":
            env.append(value)
        else:
            values[_VALUES[name]] = value
    rest = args[i:]
    if len(rest) < 2:
        return None
    sid, command = rest[0], rest[1:]
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        return None
    return ExecArgs(sid, command, env, values["workdir"], values["user"], flags["interactive"],
                    flags["tty"])


def checked_env(a: ExecArgs) -> list[str]:
    """The request's environment, after the checks both paths make (MatchlockError)."""
    from matchlock.sandbox.envspec import parse_env_entry

    if a.tty and a.interactive and not sys.stdin.isatty():
        raise MatchlockError("-it needs a terminal on stdin", hint="drop -t to pipe stdin instead")
    if a.workdir is not None and not a.workdir.startswith("/"):
        raise MatchlockError(f"--workdir {a.workdir!r} is not absolute",
                             hint="use an absolute path")
    env = ["=".join(parse_env_entry(e, "-e")) for e in a.env]
    if a.tty:
        env.insert(0, "TERM=" + os.environ.get("TERM", "xterm"))
    return env


def _connect(sid: str) -> socket | None:
    """The running supervisor's socket, or None (the slow path then says why)."""
    # _socket, not socket: the wrapper module imports enum and selectors (~3 ms).
    from _socket import AF_UNIX, SOCK_STREAM
    from _socket import socket as new_socket

    from matchlock.paths import state_dir_str
    from matchlock.sandbox.sockpath import sock_path

    if not sid or "/" in sid or sid.startswith("."):
        return None
    path = os.path.join(state_dir_str(), "sandboxes", sid, "control.sock")
    s = new_socket(AF_UNIX, SOCK_STREAM)
    try:
        s.connect(sock_path(path))
    except OSError:
        s.close()
        return None
    return s


def run(args: list[str]) -> int | None:
    """The exit code of the exec, or None when the click command should handle the call."""
    a = parse(args)
    if a is None:
        return None
    try:
        env = checked_env(a)
    except MatchlockError:
        return None
    sock = _connect(a.sandbox_id)
    if sock is None:
        return None
    from matchlock.sandbox.exec_client import run_exec

    return run_exec(sock, a.argv, env, a.workdir, a.user, a.interactive, a.tty)
