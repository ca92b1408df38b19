"""The state database without VMs: migrations, concurrent writers (threads and processes),
liveness from pid + start time, id prefixes, and what the config keeps of secrets."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from matchlock.errors import MatchlockError
from matchlock.state import db as dbmod
from matchlock.state import endings, registry
from matchlock.state.config import secret_entry


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("MATCHLOCK_STATE_DIR", str(tmp_path))
    yield tmp_path
    for key in [k for k in dbmod._open if k[0].startswith(str(tmp_path))]:
        dbmod._open.pop(key).close()


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as c:
        return {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_fresh_database_is_wal_private_and_current(state: Path) -> None:
    registry.create_dir("img")
    path = state / "state.db"
    assert path.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("PRAGMA user_version").fetchone()[0] == dbmod.SCHEMA_VERSION
    assert {"sandboxes", "lifecycle", "cleanup"} <= _tables(path)


def test_migration_from_v1_keeps_rows_and_imports_old_directories(state: Path) -> None:
    # A sandbox of the file-based layout (before any database), stopped cleanly.
    old = state / "sandboxes" / "vm-0000abcd"
    old.mkdir(parents=True)
    (old / "owner.json").write_text(json.dumps({
        "id": "vm-0000abcd", "image": "alpine", "pid": 1, "pid_start": 7, "created": 5.0}))
    (old / "stopped.json").write_text(json.dumps({"reason": "kill", "stopped": 9.0}))
    path = state / "state.db"
    v1 = dbmod.Database(path, dbmod.MIGRATIONS[:1])
    with v1.write() as c:
        c.execute("INSERT INTO sandboxes (id, image, phase, created, updated, owner_pid,"
                  " owner_start) VALUES ('vm-11111111', 'busybox', 'removed', 1, 1, 1, 1)")
    v1.close()
    assert "cleanup" not in _tables(path)
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == 1
    current = dbmod.Database(path)
    assert "cleanup" in _tables(path)
    with current.read() as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == dbmod.SCHEMA_VERSION
        rows = dict(c.execute("SELECT id, phase FROM sandboxes").fetchall())
    current.close()
    assert rows == {"vm-11111111": "removed", "vm-0000abcd": "stopped"}
    e = registry.lookup("vm-0000abcd")
    assert e.status == "stopped" and e.record is not None and e.record.end_detail == "kill"


def test_a_failed_migration_leaves_the_old_database(state: Path) -> None:
    path = state / "state.db"
    dbmod.Database(path, dbmod.MIGRATIONS[:1]).close()

    def broken(c: sqlite3.Connection, p: Path) -> None:
        c.execute("CREATE TABLE half (x)")
        c.execute("THIS IS NOT SQL")

    with pytest.raises(MatchlockError, match="state database"):
        dbmod.Database(path, (dbmod.MIGRATIONS[0], broken))
    assert "half" not in _tables(path)
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == 1


def test_a_newer_database_is_refused_in_one_line(state: Path) -> None:
    path = state / "state.db"
    dbmod.Database(path).close()
    with sqlite3.connect(path) as c:
        c.execute("PRAGMA user_version = 99")
    with pytest.raises(MatchlockError, match="schema version 99, newer"):
        dbmod.Database(path)


def _writer(state_dir: str, n: int, out: multiprocessing.Queue[object]) -> None:
    os.environ["MATCHLOCK_STATE_DIR"] = state_dir
    try:
        ids = []
        for _ in range(n):
            _, owner = registry.create_dir("img")
            registry.set_phase(owner.id, "running")
            registry.add_event(owner.id, "note", "x")
            registry.record_end(owner.id, endings.Ending("exit", "done", 0))
            registry.set_phase(owner.id, "removed")
            ids.append(owner.id)
        out.put(ids)
    except BaseException as e:  # reported to the parent, which fails the test
        out.put(repr(e))


def test_concurrent_writers_processes_and_threads(state: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    q: multiprocessing.Queue[object] = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(state), 25, q)) for _ in range(4)]
    for p in procs:
        p.start()
    results: list[object] = []
    threads = [threading.Thread(target=lambda: _writer(str(state), 25, q)) for _ in range(3)]
    for t in threads:
        t.start()
    # Readers meanwhile: never an error, never a half-written sandbox.
    for _ in range(50):
        for e in registry.entries(include_removed=True):
            assert e.record is not None and e.record.image == "img"
    for t in threads:
        t.join()
    results = [q.get(timeout=120) for _ in range(7)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    errors = [r for r in results if not isinstance(r, list)]
    assert errors == []
    ids = [i for r in results if isinstance(r, list) for i in r]
    assert len(ids) == len(set(ids)) == 175
    every = {e.owner.id: e for e in registry.entries(include_removed=True)}
    assert set(every) == set(ids)
    for sid in ids[:10]:
        phases = [h["phase"] for h in registry.history(sid)]
        assert phases == ["creating", "running", "note", "removed"]
        assert every[sid].record is not None and every[sid].record.end_reason == "exit"


def test_a_dead_owner_is_crashed_never_running(state: Path) -> None:
    # A child creates a sandbox, says it is running, and dies without a word.
    code = ("from matchlock.state import registry\n"
            "_, o = registry.create_dir('img'); registry.set_phase(o.id, 'running');"
            " print(o.id)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=os.environ.copy()).stdout.strip()
    with sqlite3.connect(state / "state.db") as c:
        assert c.execute("SELECT phase FROM sandboxes WHERE id=?", (out,)).fetchone()[0] == \
            "running"
    [e] = registry.entries()
    assert e.status == "crashed" and e.record is not None
    assert e.record.end_reason == "owner-crash"
    assert [h["phase"] for h in registry.history(out)][-1] == "crashed"
    # A live pid with another start time (a recycled pid, or a reboot) is no owner either.
    _, o = registry.create_dir("img")
    with dbmod.database().write() as c:
        c.execute("UPDATE sandboxes SET owner_pid = 1, owner_start = -5 WHERE id = ?", (o.id,))
    assert registry.lookup(o.id).status == "crashed"
    # Our own pid and start time, recorded in another boot: not us (start times repeat).
    _, other = registry.create_dir("img")
    registry.set_phase(other.id, "running")
    with dbmod.database().write() as c:
        c.execute("UPDATE sandboxes SET boot_id = 'earlier' WHERE id = ?", (other.id,))
    assert registry.lookup(other.id).status == "crashed"
    # Our own sandbox (alive) stays as recorded.
    _, mine = registry.create_dir("img")
    registry.set_phase(mine.id, "running")
    assert registry.lookup(mine.id).status == "running"


def test_an_owner_that_finished_is_not_overwritten_by_a_reader(state: Path) -> None:
    _, o = registry.create_dir("img")
    stale = registry.lookup(o.id).record
    assert stale is not None
    registry.set_phase(o.id, "stopped", "clean")  # the owner finished after the read
    with dbmod.database().write() as c:
        c.execute("UPDATE sandboxes SET owner_pid = 1, owner_start = -5 WHERE id = ?", (o.id,))
    dead = registry.Record(**{**stale.__dict__, "owner_pid": 1, "owner_start": -5})
    [fresh] = registry._reconcile([dead])
    assert fresh.phase == "stopped"


def test_prefixes_and_one_line_errors(state: Path) -> None:
    ids = set()
    while len({i[:4] for i in ids}) == len(ids) or len(ids) < 2:
        ids.add(registry.create_dir("img")[1].id)
    full = sorted(ids)[0]
    assert registry.lookup(full).owner.id == full
    assert registry.lookup(full[3:]).owner.id == full  # without vm-
    dup = next(i[:4] for i in ids if sum(j.startswith(i[:4]) for j in ids) > 1)
    with pytest.raises(MatchlockError, match="ambiguous"):
        registry.lookup(dup)
    with pytest.raises(MatchlockError, match="no such sandbox"):
        registry.lookup("vm-ffffffff" if "vm-ffffffff" not in ids else "vm-fffffffe")
    with pytest.raises(MatchlockError, match="invalid sandbox id"):
        registry.lookup("../etc")
    registry.set_phase(full, "removed")
    with pytest.raises(MatchlockError, match="no such sandbox"):
        registry.lookup(full)
    assert registry.lookup(full, include_removed=True).status == "removed"


def test_ended_phases_do_not_go_back(state: Path) -> None:
    _, o = registry.create_dir("img")
    registry.set_phase(o.id, "stopped")
    registry.set_phase(o.id, "running")
    assert registry.lookup(o.id).status == "stopped"
    registry.record_end(o.id, endings.Ending("kill", "first", None))
    registry.record_end(o.id, endings.Ending("error", "second", None))
    r = registry.lookup(o.id).record
    assert r is not None and (r.end_reason, r.end_detail) == ("kill", "first")


def test_gc_removes_stray_directories_and_old_records(state: Path) -> None:
    stray = state / "sandboxes" / "vm-deadbeef"
    stray.mkdir(parents=True)
    os.utime(stray, (0, 0))
    _, o = registry.create_dir("img")
    registry.set_phase(o.id, "removed")
    with dbmod.database().write() as c:
        c.execute("UPDATE sandboxes SET updated = 0 WHERE id = ?", (o.id,))
    collected = registry.gc()
    assert [c.id for c in collected] == ["vm-deadbeef"] and not stray.exists()
    with pytest.raises(MatchlockError):
        registry.lookup(o.id, include_removed=True)
    assert registry.history(o.id) == []  # its lifecycle rows went with it


def test_secret_specs_keep_names_and_hosts_only() -> None:
    assert secret_entry("TOKEN=s3cr3t-value@api.example.com,*.x.test") == {
        "name": "TOKEN", "hosts": ["api.example.com", "*.x.test"]}
    assert secret_entry("TOKEN@a.test") == {"name": "TOKEN", "hosts": ["a.test"]}
    assert secret_entry("K=/run/k@a.test", from_file=True) == {
        "name": "K", "hosts": ["a.test"], "file": "/run/k"}
    # A value holding '@' is still cut away (hosts come after the last '@').
    assert "v@l" not in json.dumps(secret_entry("K=v@lue@h.test"))


def test_a_zombie_is_not_alive() -> None:
    import signal

    old = signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # SIG_IGN (another test) auto-reaps
    try:
        _zombie_check()
    finally:
        signal.signal(signal.SIGCHLD, old)


def _zombie_check() -> None:
    # The child waits for its stdin to close, so its start time is read while it still runs.
    child = subprocess.Popen(["sh", "-c", "read x"], stdin=subprocess.PIPE)
    start = registry.proc_start_time(child.pid)
    assert child.stdin is not None
    child.stdin.close()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
    assert start is not None
    assert not registry.alive(child.pid, start)  # not reaped yet, but ended
    child.wait()
    assert registry.alive(os.getpid(), registry.proc_start_time(os.getpid()))


def test_an_old_supervisor_that_stopped_after_the_upgrade(state: Path) -> None:
    # Imported as running (owner.json only); then its old code stops it: stopped.json.
    old = state / "sandboxes" / "vm-0000abce"
    old.mkdir(parents=True)
    (old / "owner.json").write_text(json.dumps({
        "id": "vm-0000abce", "image": "alpine", "pid": os.getpid(),
        "pid_start": registry.proc_start_time(os.getpid()), "created": 5.0}))
    assert registry.lookup("vm-0000abce").status == "running"
    (old / "stopped.json").write_text(json.dumps({"reason": "kill", "stopped": 9.0}))
    with dbmod.database().write() as c:  # its owner has gone since
        c.execute("UPDATE sandboxes SET owner_pid = 1, owner_start = -5")
    e = registry.lookup("vm-0000abce")
    assert e.status == "stopped" and e.record is not None and e.record.end_reason == "kill"


def test_log_prints_console_then_supervisor_log_and_escapes_for_terminals(
        state: Path) -> None:
    from click.testing import CliRunner

    from matchlock.cli.log import _escape, log

    path, o = registry.create_dir("img")
    (path / "console.log").write_bytes(b"[ 1.0] kernel line\n")
    (path / "supervisor.log").write_bytes(b"out \x1b]0;title\x07\n")
    registry.set_phase(o.id, "stopped")
    r = CliRunner().invoke(log, ["-f", o.id])  # ended: -f returns at once
    assert r.exit_code == 0, r.output
    assert r.stdout_bytes == b"[ 1.0] kernel line\nout \x1b]0;title\x07\n"  # piped: as is
    assert _escape(b"a\x1b[2Jb\tc\n\x7f") == b"a\\x1b[2Jb\tc\n\\x7f"
