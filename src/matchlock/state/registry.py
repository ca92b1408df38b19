"""Sandboxes: their records in the state database and their directories on disk.

The record (`state.db`, see `state/db.py`) says what a sandbox is and was: image, config,
owner and VMM (each by pid *and* start time, so a recycled pid is never mistaken for them),
its phase, a lifecycle history, cleanup steps and why it ended. The directory
`state_dir()/sandboxes/<id>/` holds its runtime files: writable disk, control socket, logs.

Phases: creating → booting → running → stopping → stopped | removed, or crashed. The phase
is what the owner last wrote; liveness is decided by the owner's pid and start time. A
sandbox in an active phase whose owner is gone (SIGKILL, a host reboot) is `crashed`, never
`running`: readers persist that, inside a write transaction that re-reads the phase, so an
owner that just finished cleanly is never overwritten.

Records of removed sandboxes stay (for `inspect`) until `gc`/`prune` drop those removed
more than `KEEP_REMOVED_S` ago.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matchlock.errors import MatchlockError
from matchlock.paths import state_dir
from matchlock.state import endings
from matchlock.state.db import database

ACTIVE = ("creating", "booting", "running", "stopping")
ENDED = ("stopped", "crashed", "removed")
KEEP_REMOVED_S = 7 * 24 * 3600
ORPHAN_DIR_AGE_S = 60.0
SOCKET = "control.sock"  # a detached sandbox's supervisor listens here
STOPPED = "stopped.json"  # the file-based layout's marker (read by the v1 migration only)
_ID = re.compile(r"^(vm-)?[0-9a-f]{1,8}$")


def sandboxes_root() -> Path:
    return state_dir() / "sandboxes"


def new_id() -> str:
    return "vm-" + os.urandom(4).hex()  # secrets.token_hex(4), without importing secrets


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
    """The process that had this start time still runs (a zombie waiting for its parent to
    reap it has ended: its parent may be the very process asking)."""
    if pid <= 0 or start is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] not in ("Z", "X") and int(fields[19]) == start


_BOOT_ID: list[str] = []


def boot_id() -> str:
    """This boot of the host. Start times count from boot, so after a reboot a pid can come
    back with the same start time (pid 1 always does): a record of another boot names no
    live process."""
    if not _BOOT_ID:
        try:
            _BOOT_ID.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        except OSError:
            _BOOT_ID.append("")
    return _BOOT_ID[0]


def same_boot(recorded: str | None) -> bool:
    return recorded is None or recorded == boot_id()  # None: imported from the file layout


@dataclass
class Owner:
    id: str
    image: str
    pid: int
    pid_start: int | None
    vmm_pid: int = 0
    vmm_start: int | None = None
    created: float = 0.0
    boot_id: str | None = None

    @property
    def alive(self) -> bool:
        return same_boot(self.boot_id) and alive(self.pid, self.pid_start)

    @property
    def vmm_alive(self) -> bool:
        return same_boot(self.boot_id) and alive(self.vmm_pid, self.vmm_start)

    @classmethod
    def load(cls, path: Path) -> Owner:
        """The owner of the sandbox in `path` (kept from the file-based registry)."""
        return lookup(path.name, include_removed=True).owner

    def save(self, path: Path | None = None) -> None:
        """Record the VMM (the only part that changes after creation)."""
        set_vmm(self.id, self.vmm_pid, self.vmm_start)


@dataclass(frozen=True)
class Record:
    id: str
    image: str
    phase: str
    created: float
    updated: float
    owner_pid: int
    owner_start: int | None
    vmm_pid: int
    vmm_start: int | None
    boot_id: str | None
    config: dict[str, Any]
    ended: float | None
    end_reason: str | None
    end_detail: str | None
    exit_code: int | None

    @property
    def owner(self) -> Owner:
        return Owner(self.id, self.image, self.owner_pid, self.owner_start, self.vmm_pid,
                     self.vmm_start, self.created, self.boot_id)


@dataclass(frozen=True)
class Entry:
    path: Path
    owner: Owner
    status: str  # creating, booting, running, stopping, stopped, crashed or removed
    record: Record | None = field(default=None, compare=False)


_COLUMNS = ("id, image, phase, created, updated, owner_pid, owner_start, vmm_pid, vmm_start,"
            " boot_id, config, ended, end_reason, end_detail, exit_code")


def _record(row: tuple[Any, ...]) -> Record:
    try:
        config = json.loads(row[10])
    except ValueError:
        config = {}
    return Record(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8],
                  row[9], config if isinstance(config, dict) else {}, row[11], row[12],
                  row[13], row[14])


def _event(c: sqlite3.Connection, sid: str, phase: str, detail: str = "") -> None:
    c.execute("INSERT INTO lifecycle (sandbox_id, at, phase, detail) VALUES (?,?,?,?)",
              (sid, time.time(), phase, detail))


# --- writes by the owner -------------------------------------------------------------------


def create_dir(image: str, config: dict[str, Any] | None = None) -> tuple[Path, Owner]:
    """A new sandbox: its record (phase `creating`, owned by this process), then its
    directory: a directory never exists without a record naming its owner."""
    root = sandboxes_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    pid = os.getpid()
    owner = Owner("", image, pid, proc_start_time(pid), created=time.time(), boot_id=boot_id())
    text = json.dumps(config or {}, sort_keys=True)
    db = database()
    while True:
        sid = new_id()
        with db.write() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO sandboxes (id, image, phase, created, updated, owner_pid,"
                " owner_start, boot_id, config) VALUES (?,?,?,?,?,?,?,?,?)",
                (sid, image, "creating", owner.created, owner.created, pid, owner.pid_start,
                 owner.boot_id, text))
            if cur.rowcount != 1:
                continue  # an id in use (or kept for inspect): draw another
            _event(c, sid, "creating", f"owner pid {pid}")
        path = root / sid
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            # A stray directory of that name (gc's): never ours, so never removed with ours.
            set_phase(sid, "removed", "directory name taken")
            continue
        owner.id = sid
        return path, owner


def set_phase(sid: str, phase: str, detail: str = "") -> None:
    """Move an active sandbox to `phase` (an ended one only to `removed`)."""
    now = time.time()
    with database().write() as c:
        row = c.execute("SELECT phase FROM sandboxes WHERE id = ?", (sid,)).fetchone()
        if row is None or row[0] == phase or row[0] == "removed":
            return
        if row[0] in ENDED and phase != "removed":
            return
        ended = now if phase in ENDED else None
        c.execute("UPDATE sandboxes SET phase = ?, updated = ?, ended = COALESCE(ended, ?)"
                  " WHERE id = ?", (phase, now, ended, sid))
        _event(c, sid, phase, detail)


def set_vmm(sid: str, pid: int, start: int | None) -> None:
    with database().write() as c:
        c.execute("UPDATE sandboxes SET vmm_pid = ?, vmm_start = ?, updated = ? WHERE id = ?",
                  (pid, start, time.time(), sid))


def cleanup_step(sid: str, step: str, error: str = "") -> None:
    with database().write() as c:
        c.execute("INSERT INTO cleanup (sandbox_id, at, step, ok, error) VALUES (?,?,?,?,?)",
                  (sid, time.time(), step, 0 if error else 1, endings.clean(error)))


def add_event(sid: str, what: str, detail: str = "") -> None:
    """A lifecycle note that is not a phase (`kill requested`, a background command's exit)."""
    with database().write() as c:
        _event(c, sid, what, endings.clean(detail))


def record_end(sid: str, ending: endings.Ending, overwrite: bool = False) -> None:
    """Why it ended; the first cause recorded wins unless `overwrite`."""
    with database().write() as c:
        c.execute(
            "UPDATE sandboxes SET end_reason = ?, end_detail = ?, exit_code = ?,"
            " ended = COALESCE(ended, ?), updated = ? WHERE id = ?"
            + ("" if overwrite else " AND end_reason IS NULL"),
            (ending.reason, endings.clean(ending.detail), ending.exit_code, time.time(),
             time.time(), sid))


def kill_requested(sid: str) -> bool:
    with database().read() as c:
        return c.execute("SELECT 1 FROM lifecycle WHERE sandbox_id = ? AND phase = ?",
                         (sid, "kill requested")).fetchone() is not None


def mark_stopped(path: Path, reason: str) -> None:
    """A supervisor stopped its sandbox cleanly for `reason` (its own words)."""
    sid = path.name
    record_end(sid, endings.from_supervisor(reason, console_findings(path)))
    set_phase(sid, "stopped", endings.clean(reason))


def console_findings(path: Path, nbytes: int = 16384) -> endings.ConsoleFindings:
    """OOM kills and panics in the tail of a sandbox's console log (guest text)."""
    try:
        with open(path / "console.log", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        lines = []
    return endings.scan_console(lines)


# --- reads ---------------------------------------------------------------------------------


def _reconcile(records: list[Record]) -> list[Record]:
    """Records whose owner is gone while the phase says active are crashed: persist that."""
    dead = [r for r in records if r.phase in ACTIVE and not r.owner.alive]
    if not dead:
        return records
    now = time.time()
    with database().write() as c:
        for r in dead:
            row = c.execute("SELECT phase FROM sandboxes WHERE id = ?", (r.id,)).fetchone()
            if row is None or row[0] not in ACTIVE:
                continue  # it finished (or was removed) meanwhile: not a crash
            if _stopped_by_old_owner(c, r.id):
                continue
            end = endings.owner_crash(r.owner_pid)
            c.execute("UPDATE sandboxes SET phase = 'crashed', updated = ?,"
                      " ended = COALESCE(ended, ?), end_reason = COALESCE(end_reason, ?),"
                      " end_detail = COALESCE(end_detail, ?) WHERE id = ?",
                      (now, now, end.reason, end.detail, r.id))
            _event(c, r.id, "crashed", f"owner pid {r.owner_pid} is gone (was {row[0]})")
        rows = c.execute(f"SELECT {_COLUMNS} FROM sandboxes WHERE id IN "
                         f"({','.join('?' * len(records))})",
                         [r.id for r in records]).fetchall()
    fresh = {r.id: r for r in map(_record, rows)}
    return [fresh.get(r.id, r) for r in records]


def _stopped_by_old_owner(c: sqlite3.Connection, sid: str) -> bool:
    """A supervisor of the file-based layout (running across the upgrade) that stopped
    cleanly wrote `stopped.json`, not the database."""
    try:
        stop = json.loads((sandboxes_root() / sid / STOPPED).read_text())
        when, reason = float(stop["stopped"]), endings.clean(str(stop["reason"]))
    except (OSError, ValueError, TypeError, KeyError):
        return False
    c.execute("UPDATE sandboxes SET phase = 'stopped', updated = ?, ended = ?,"
              " end_reason = COALESCE(end_reason, ?), end_detail = COALESCE(end_detail, ?)"
              " WHERE id = ?", (time.time(), when,
                                endings.from_supervisor(reason, endings.ConsoleFindings()).reason,
                                reason, sid))
    _event(c, sid, "stopped", f"{STOPPED} of a supervisor from before the database")
    return True


def _entry(r: Record) -> Entry:
    return Entry(sandboxes_root() / r.id, r.owner, r.phase, r)


def entries(include_removed: bool = False) -> list[Entry]:
    """Every sandbox, oldest first (removed ones only if asked)."""
    # Removed records can pile up (a week of one-shot runs): the phase index skips them.
    phases = (*ACTIVE, *ENDED) if include_removed else (*ACTIVE, "stopped", "crashed")
    with database().read() as c:
        rows = c.execute(f"SELECT {_COLUMNS} FROM sandboxes WHERE phase IN "
                         f"({','.join('?' * len(phases))}) ORDER BY created",
                         phases).fetchall()
    return [_entry(r) for r in _reconcile([_record(row) for row in rows])]


def lookup(sid: str, include_removed: bool = False) -> Entry:
    """The sandbox `sid` names (its id, or an unambiguous prefix, `vm-` optional), or a
    one-line MatchlockError."""
    if not _ID.match(sid):
        raise MatchlockError(f"invalid sandbox id {sid!r}", hint="ids look like vm-0123abcd")
    full = sid if sid.startswith("vm-") else "vm-" + sid
    where = "" if include_removed else " AND phase != 'removed'"
    with database().read() as c:
        # A range on the primary key: ids are [0-9a-z-], all below '~'.
        rows = c.execute(f"SELECT {_COLUMNS} FROM sandboxes WHERE id >= ? AND id < ?{where}"
                         " ORDER BY created", (full, full + "~")).fetchall()
    exact = [row for row in rows if row[0] == full]
    rows = exact or rows
    if not rows:
        raise MatchlockError(f"no such sandbox: {sid}", hint="see `matchlock ls`")
    if len(rows) > 1:
        ids = ", ".join(row[0] for row in rows[:5]) + (", …" if len(rows) > 5 else "")
        raise MatchlockError(f"sandbox id prefix {sid} is ambiguous ({ids})",
                             hint="give more of the id")
    return _entry(_reconcile([_record(rows[0])])[0])


def status_of(path: Path, owner: Owner) -> str:
    """The status of the sandbox in `path` (kept from the file-based registry)."""
    return lookup(path.name, include_removed=True).status


def history(sid: str) -> list[dict[str, Any]]:
    with database().read() as c:
        rows = c.execute("SELECT at, phase, detail FROM lifecycle WHERE sandbox_id = ?"
                         " ORDER BY seq", (sid,)).fetchall()
    return [{"at": at, "phase": phase, "detail": detail} for at, phase, detail in rows]


def cleanup_steps(sid: str) -> list[dict[str, Any]]:
    with database().read() as c:
        rows = c.execute("SELECT at, step, ok, error FROM cleanup WHERE sandbox_id = ?"
                         " ORDER BY seq", (sid,)).fetchall()
    return [{"at": at, "step": step, "ok": bool(ok), "error": error}
            for at, step, ok, error in rows]


# --- removal -------------------------------------------------------------------------------


def remove_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Collected:
    id: str
    killed_vmm: bool


def collect(path: Path, owner: Owner) -> Collected:
    """Remove an ended sandbox: kill a VMM its dead owner left running, delete its directory
    (disk, socket, logs), record each step and the phase `removed`."""
    killed = False
    if owner.vmm_alive:
        try:
            os.kill(owner.vmm_pid, signal.SIGKILL)
            killed = True
        except ProcessLookupError:
            pass
        _wait_gone(owner.vmm_pid, owner.vmm_start)
        if alive(owner.vmm_pid, owner.vmm_start):
            cleanup_step(owner.id, "vmm", f"pid {owner.vmm_pid} survived SIGKILL")
            raise MatchlockError(f"cannot remove {owner.id}: its VM process "
                                 f"{owner.vmm_pid} does not die")
        cleanup_step(owner.id, "vmm", "")
    remove_dir(path)
    cleanup_step(owner.id, "directory", "" if not path.exists() else f"{path} remains")
    set_phase(owner.id, "removed", "VM killed" if killed else "")
    return Collected(owner.id, killed)


def _wait_gone(pid: int, start: int | None, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid, start) and time.monotonic() < deadline:
        time.sleep(0.02)


def purge_removed(older_than: float = KEEP_REMOVED_S) -> int:
    """Forget records of sandboxes removed more than `older_than` seconds ago."""
    with database().write() as c:
        cur = c.execute("DELETE FROM sandboxes WHERE phase = 'removed' AND updated < ?",
                        (time.time() - older_than,))
        return cur.rowcount


def gc() -> list[Collected]:
    """Remove every crashed sandbox (killing a VMM it left), and directories that have no
    record (a crash between the two steps of `create_dir`, or a deleted database)."""
    out = [collect(e.path, e.owner) for e in entries() if e.status == "crashed"]
    root = sandboxes_root()
    if root.is_dir():
        with database().read() as c:
            known = {row[0] for row in c.execute(
                "SELECT id FROM sandboxes WHERE phase != 'removed'").fetchall()}
        for path in sorted(root.iterdir()):
            if path.name in known or not path.is_dir():
                continue
            if time.time() - path.stat().st_mtime < ORPHAN_DIR_AGE_S:
                continue  # maybe being created right now
            remove_dir(path)
            out.append(Collected(path.name, False))
    purge_removed()
    return out
