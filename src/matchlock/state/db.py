"""The state database, `state_dir()/state.db`: SQLite in WAL mode, shared by every matchlock
process on the host (owners, supervisors and CLI commands run concurrently).

- Writes are short `BEGIN IMMEDIATE` transactions: one writer at a time, readers never wait.
  A writer waits up to `BUSY_TIMEOUT_S` for the lock (SQLite's busy handler), then fails with
  one line.
- The schema has a version (`PRAGMA user_version`) and a list of migrations. A process that
  finds an older database upgrades it under an exclusive `flock` on `state.db.lock`, all
  pending migrations in one transaction (SQLite's DDL is transactional: a failed upgrade
  leaves the old database as it was). A database from a newer matchlock is refused.
- The file is the owner's alone (0600 in the 0700 state directory): it names processes,
  images and host paths. It never holds a secret value (see `state/config.py`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from matchlock.errors import MatchlockError
from matchlock.paths import state_dir

DB_NAME = "state.db"
BUSY_TIMEOUT_S = 15.0

Migration = Callable[[sqlite3.Connection, Path], None]


def _v1(conn: sqlite3.Connection, db: Path) -> None:
    for stmt in (
        """CREATE TABLE sandboxes (
            id TEXT PRIMARY KEY,
            image TEXT NOT NULL,
            phase TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            owner_pid INTEGER NOT NULL,
            owner_start INTEGER,
            vmm_pid INTEGER NOT NULL DEFAULT 0,
            vmm_start INTEGER,
            boot_id TEXT,
            config TEXT NOT NULL DEFAULT '{}',
            ended REAL,
            end_reason TEXT,
            end_detail TEXT,
            exit_code INTEGER)""",
        """CREATE TABLE lifecycle (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
            at REAL NOT NULL,
            phase TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '')""",
        "CREATE INDEX lifecycle_by_sandbox ON lifecycle(sandbox_id, seq)",
    ):
        conn.execute(stmt)
    _import_directories(conn, db.parent / "sandboxes")


def _import_directories(conn: sqlite3.Connection, root: Path) -> None:
    """Sandboxes of the file-based layout (before the database): `owner.json`, and
    `stopped.json` for one stopped cleanly. Running ones keep running and show in `ls`."""
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        try:
            owner = json.loads((path / "owner.json").read_text())
            sid, image = str(owner["id"]), str(owner["image"])
            pid, pid_start = int(owner["pid"]), owner.get("pid_start")
            created = float(owner.get("created") or path.stat().st_mtime)
        except (OSError, ValueError, TypeError, KeyError):
            continue  # not a sandbox (gc removes such directories)
        if sid != path.name:
            continue
        try:
            stop = json.loads((path / "stopped.json").read_text())
            phase, ended, detail = "stopped", float(stop["stopped"]), str(stop["reason"])
        except (OSError, ValueError, TypeError, KeyError):
            phase, ended, detail = "running", None, ""
        conn.execute(
            "INSERT OR IGNORE INTO sandboxes (id, image, phase, created, updated, owner_pid,"
            " owner_start, vmm_pid, vmm_start, ended, end_detail) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (sid, image, phase, created, time.time(), pid,
             int(pid_start) if pid_start is not None else None,
             int(owner.get("vmm_pid") or 0), owner.get("vmm_start"), ended, detail or None))
        conn.execute("INSERT INTO lifecycle (sandbox_id, at, phase, detail) VALUES (?,?,?,?)",
                     (sid, time.time(), phase, "imported from the sandbox directory"))


def _v2(conn: sqlite3.Connection, db: Path) -> None:
    conn.execute(
        """CREATE TABLE cleanup (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
            at REAL NOT NULL,
            step TEXT NOT NULL,
            ok INTEGER NOT NULL,
            error TEXT NOT NULL DEFAULT '')""")
    conn.execute("CREATE INDEX cleanup_by_sandbox ON cleanup(sandbox_id, seq)")
    conn.execute("CREATE INDEX sandboxes_by_phase ON sandboxes(phase, created)")


# Version N is reached by applying MIGRATIONS[N-1]; never edit a released one, append.
MIGRATIONS: tuple[Migration, ...] = (_v1, _v2)
SCHEMA_VERSION = len(MIGRATIONS)


def db_path() -> Path:
    return state_dir() / DB_NAME


class Database:
    """One connection per process and file, shared by its threads (under a lock)."""

    def __init__(self, path: Path, migrations: tuple[Migration, ...] = MIGRATIONS) -> None:
        self.path = path
        self._lock = threading.RLock()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            self.conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                        check_same_thread=False)
            self.conn.execute("PRAGMA foreign_keys = ON")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self._upgrade(migrations)
        except sqlite3.Error as e:
            raise self.error(e) from None

    def error(self, e: sqlite3.Error) -> MatchlockError:
        busy = "locked" in str(e) or "busy" in str(e)
        return MatchlockError(f"state database {self.path}: {e}",
                              hint="another matchlock process holds it; retry" if busy else
                              "the file may be damaged; move it away to start afresh")

    def _version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def _upgrade(self, migrations: tuple[Migration, ...]) -> None:
        mode = self.conn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode == "wal" and self._version() == len(migrations):
            return
        lock = os.open(self.path.with_name(self.path.name + ".lock"),
                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.conn.execute("PRAGMA journal_mode = WAL")
            with self.write() as c:
                version = self._version()
                if version > len(migrations):
                    raise MatchlockError(
                        f"state database {self.path} has schema version {version}, newer "
                        f"than this matchlock's ({len(migrations)})",
                        hint="use the newer matchlock, or move the file away")
                for n in range(version, len(migrations)):
                    migrations[n](c, self.path)
                # PRAGMA takes no parameters; the value is our own integer.
                c.execute(f"PRAGMA user_version = {len(migrations)}")
        finally:
            os.close(lock)

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction; the lock is taken at BEGIN so no read-then-write
        inside it ever sees stale data or fails to upgrade."""
        with self._lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise self.error(e) from None
            try:
                yield self.conn
            except BaseException as e:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise self.error(e) from None
                raise
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error as e:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                raise self.error(e) from None

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs (WAL: never waits for a writer)."""
        with self._lock:
            try:
                self.conn.execute("BEGIN")
                yield self.conn
            except sqlite3.Error as e:
                raise self.error(e) from None
            finally:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


_open: dict[tuple[str, int], Database] = {}
_open_lock = threading.Lock()


def database() -> Database:
    """This process's connection to the state database (opened, and upgraded, once)."""
    path = db_path()
    key = (str(path), os.getpid())
    with _open_lock:
        db = _open.get(key)
        if db is None:
            db = _open[key] = Database(path)
        return db
