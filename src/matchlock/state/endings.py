"""Why a sandbox ended, in words a user can act on (no I/O: unit-tested on its own).

Kinds, as `inspect` shows them in `end.reason`:
  exit         the command exited with a code
  signal       the command was killed by a signal in the guest
  oom          the guest's OOM killer killed the command (or one of its processes)
  panic        the guest kernel panicked
  timeout      `--timeout` expired
  kill         `matchlock kill` (or `rm -f`) stopped it
  closed       the SDK closed it (`matchlock rpc`'s `close`)
  interrupted  the owning matchlock process got SIGINT/SIGTERM/SIGHUP
  owner-crash  the owning process died without stopping it (SIGKILL, a host reboot)
  error        anything else (the VM died, the agent was lost, a boot failure): the message

Console evidence (OOM kills, panics) comes from the guest, which is hostile: lines are read
from the tail only, undecodable bytes replaced, control characters dropped, and lengths capped
before anything is stored. A guest can fake an OOM line; it cannot hide the exit code, which
is stored beside it.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

MAX_DETAIL = 300
TIMEOUT_EXIT = 124  # sandbox/attach.py's exit code for --timeout
STOPPED_WHILE_BOOTING = "the sandbox was stopped: "
_OOM = re.compile(r"Out of memory: Killed process (\d+) \(([^)]{0,64})\)")
_PANIC = re.compile(r"Kernel panic - not syncing: ?(.*)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Ending:
    reason: str
    detail: str
    exit_code: int | None = None


@dataclass(frozen=True)
class ConsoleFindings:
    """What the guest's console log says about how it ended."""

    oom_kills: tuple[str, ...] = ()  # "python3 (pid 42)"
    panic: str | None = None


def clean(text: str, limit: int = MAX_DETAIL) -> str:
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def scan_console(lines: list[str]) -> ConsoleFindings:
    kills: list[str] = []
    panic = None
    for line in lines:
        m = _OOM.search(line)
        if m:
            kills.append(clean(f"{m.group(2)} (pid {m.group(1)})", 100))
        p = _PANIC.search(line)
        if p:
            panic = clean(p.group(1)) or "kernel panic"
    return ConsoleFindings(tuple(kills[-8:]), panic)


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def from_exit(code: int, console: ConsoleFindings, kill_requested: bool = False) -> Ending:
    """The command returned `code` (128+N: killed by signal N, as a shell reports it)."""
    if kill_requested:
        # `matchlock kill` of a `run`: its SIGTERM was forwarded and the command ended on it.
        plain = from_exit(code, console)
        return Ending("kill", f"stopped by `matchlock kill`; {plain.detail}", code)
    if console.panic:
        return Ending("panic", f"guest kernel panic: {console.panic}", code)
    oom = ", ".join(console.oom_kills)
    kind = "exit"
    if 128 < code <= 128 + 64:
        sig = code - 128
        if oom and sig == signal.SIGKILL:
            return Ending("oom", f"the guest's OOM killer killed {oom}", code)
        kind, detail = "signal", f"the command was killed by {_signame(sig)}"
    else:
        detail = f"the command exited with code {code}"
    if oom:
        detail += f" (the guest's OOM killer killed {oom})"
    return Ending(kind, detail, code)


def from_error(message: str, exit_code: int, console: ConsoleFindings,
               kill_requested: bool = False) -> Ending:
    """The run raised a one-line error: a timeout, a signal to us, or a failure."""
    if console.panic:
        return Ending("panic", f"guest kernel panic: {console.panic}", None)
    if message.startswith(STOPPED_WHILE_BOOTING):
        # A supervisor stopped while its sandbox booted (sandbox/supervisor.py's words).
        if kill_requested:
            return Ending("kill", "stopped by `matchlock kill` while booting", None)
        return from_supervisor(message[len(STOPPED_WHILE_BOOTING):], console)
    if exit_code == TIMEOUT_EXIT and message.startswith("timed out"):
        return Ending("timeout", clean(message), None)
    if 128 < exit_code <= 128 + 64 and (message == "interrupted"
                                        or message.startswith("stopped by SIG")):
        name = _signame(exit_code - 128)
        if kill_requested:
            return Ending("kill", f"stopped by `matchlock kill` ({name} to its owner)", None)
        return Ending("interrupted", f"matchlock received {name}", None)
    if console.oom_kills:
        message += f" (the guest's OOM killer killed {', '.join(console.oom_kills)})"
    return Ending("error", clean(message), None)


def from_supervisor(reason: str, console: ConsoleFindings) -> Ending:
    """A detached sandbox's supervisor stopped for `reason` (sandbox/supervisor.py's words)."""
    if console.panic:
        return Ending("panic", f"guest kernel panic: {console.panic}", None)
    if reason == "kill":
        return Ending("kill", "stopped by `matchlock kill`", None)
    if reason == "closed":  # `matchlock rpc`: the SDK's close
        return Ending("closed", "closed by its client (rpc `close`)", None)
    if reason.startswith("timed out"):
        return Ending("timeout", clean(reason), None)
    if reason.startswith("stopped by SIG"):
        return Ending("interrupted", f"its supervisor received {reason[len('stopped by '):]}",
                      None)
    return Ending("error", clean(reason), None)


def owner_crash(pid: int) -> Ending:
    return Ending("owner-crash",
                  f"its owner (pid {pid}) died without stopping it (killed, or the host "
                  "rebooted)", None)
