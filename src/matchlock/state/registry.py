"""Per-sandbox state on disk, and garbage collection of sandboxes whose owner died.

Each sandbox lives in `state_dir()/sandboxes/<id>/` with `owner.json` naming the matchlock
process that owns it and the VMM it started. Both are identified by pid *and* start time, so a
recycled pid never makes gc kill an unrelated process or spare a dead sandbox.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from matchlock.paths import state_dir


def sandboxes_root() -> Path:
    return state_dir() / "sandboxes"


def new_id() -> str:
    return "vm-" + secrets.token_hex(4)


def proc_start_time(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot, or None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        # Exited, not yet reaped by its parent (an SDK holding `matchlock rpc` as a child
        # reaps it only when it closes): gone for every purpose here.
        return None
    return int(fields[19])


def alive(pid: int, start: int | None) -> bool:
    return pid > 0 and start is not None and proc_start_time(pid) == start


@dataclass
class Owner:
    id: str
    image: str
    pid: int
    pid_start: int | None
    vmm_pid: int = 0
    vmm_start: int | None = None
    created: float = 0.0

    @classmethod
    def load(cls, path: Path) -> Owner:
        data = json.loads(path.read_text())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)


def create_dir(image: str) -> tuple[Path, Owner]:
    root = sandboxes_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    while True:
        sid = new_id()
        path = root / sid
        try:
            path.mkdir(mode=0o700)
            break
        except FileExistsError:
            continue
    pid = os.getpid()
    owner = Owner(sid, image, pid, proc_start_time(pid), created=time.time())
    owner.save(path / "owner.json")
    return path, owner


def remove_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Collected:
    id: str
    killed_vmm: bool


def gc() -> list[Collected]:
    """Remove every sandbox whose owner is dead, killing its VMM if one still runs."""
    root = sandboxes_root()
    out: list[Collected] = []
    if not root.is_dir():
        return out
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        try:
            owner = Owner.load(path / "owner.json")
        except (OSError, ValueError, TypeError):
            # No readable owner: a sandbox that died while being created. Old enough to be
            # certain nobody is still writing it?
            if time.time() - path.stat().st_mtime < 60:
                continue
            remove_dir(path)
            out.append(Collected(path.name, False))
            continue
        if alive(owner.pid, owner.pid_start) or (path / STOPPED).exists():
            continue  # running, or stopped cleanly and kept for `matchlock rm`
        out.append(collect(path, owner))
    return out


def collect(path: Path, owner: Owner) -> Collected:
    """Kill what a dead owner left running and remove its directory."""
    killed = False
    if alive(owner.vmm_pid, owner.vmm_start):
        try:
            os.kill(owner.vmm_pid, signal.SIGKILL)
            killed = True
        except ProcessLookupError:
            pass
        _wait_gone(owner.vmm_pid, owner.vmm_start)
    remove_dir(path)
    return Collected(owner.id, killed)


def _wait_gone(pid: int, start: int | None, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid, start) and time.monotonic() < deadline:
        time.sleep(0.02)


STOPPED = "stopped.json"  # written by a supervisor that stopped its sandbox cleanly
SOCKET = "control.sock"  # a detached sandbox's supervisor listens here
_ID = re.compile(r"^vm-[0-9a-f]{8}$")


@dataclass(frozen=True)
class Entry:
    path: Path
    owner: Owner
    status: str  # running, stopped or crashed


def status_of(path: Path, owner: Owner) -> str:
    if (path / STOPPED).exists():
        return "stopped"
    if alive(owner.pid, owner.pid_start):
        return "running"
    return "crashed"


def entries() -> list[Entry]:
    root = sandboxes_root()
    out: list[Entry] = []
    if not root.is_dir():
        return out
    for path in sorted(root.iterdir()):
        try:
            owner = Owner.load(path / "owner.json")
        except (OSError, ValueError, TypeError):
            continue
        out.append(Entry(path, owner, status_of(path, owner)))
    return sorted(out, key=lambda e: e.owner.created)


def lookup(sid: str) -> Entry:
    """The sandbox called `sid`, or a one-line MatchlockError."""
    from matchlock.errors import MatchlockError

    if not _ID.match(sid):
        raise MatchlockError(f"invalid sandbox id {sid!r}", hint="ids look like vm-0123abcd")
    path = sandboxes_root() / sid
    try:
        owner = Owner.load(path / "owner.json")
    except FileNotFoundError:
        raise MatchlockError(f"no such sandbox: {sid}", hint="see `matchlock ls`") from None
    except (OSError, ValueError, TypeError):
        raise MatchlockError(f"sandbox {sid} has no readable state") from None
    return Entry(path, owner, status_of(path, owner))


def mark_stopped(path: Path, reason: str) -> None:
    tmp = path / (STOPPED + ".tmp")
    tmp.write_text(json.dumps({"reason": reason, "stopped": time.time()}))
    tmp.replace(path / STOPPED)
