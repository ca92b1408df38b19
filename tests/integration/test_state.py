"""The state database with real VMs through the CLI: concurrent commands, crashes and a
simulated host reboot, end reasons in `inspect`, `log -f`, and no secret value in the DB."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import MATCHLOCK, db_file_bytes, leftovers

pytestmark = pytest.mark.vm
Run = Callable[..., subprocess.CompletedProcess[bytes]]


def _json(r: subprocess.CompletedProcess[bytes]) -> object:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _start(ml: Run, *flags: str) -> str:
    r = ml("run", "-d", *flags, check=True)
    return r.stdout.decode().strip()


def _inspect(ml: Run, sid: str) -> dict[str, object]:
    data = _json(ml("inspect", sid))
    assert isinstance(data, dict)
    return data


def _end(ml: Run, sid: str) -> dict[str, object]:
    end = _inspect(ml, sid)["end"]
    assert isinstance(end, dict), end
    return end


def _status(ml: Run, sid: str) -> str:
    return str(_json(ml("get", sid))["status"])  # type: ignore[index]


def _wait_status(ml: Run, sid: str, want: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (status := _status(ml, sid)) != want:
        assert time.monotonic() < deadline, f"{sid} still {status}, wanted {want}"
        time.sleep(0.2)


def _newest_id(ml: Run) -> str:
    rows = _json(ml("ls", "-a", "--json"))
    assert isinstance(rows, list) and rows
    return str(rows[0]["id"])


def _db_phase(state_dir: Path, sid: str) -> str:
    with contextlib.closing(sqlite3.connect(state_dir / "state.db", timeout=15)) as db, db:
        return str(db.execute("SELECT phase FROM sandboxes WHERE id = ?", (sid,)).fetchone()[0])


def _netns_users(inode: str) -> list[str]:
    """Processes in, or descriptors on, a network namespace (`net:[N]`)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "ns" / "net") == inode:
                found.append(f"pid {proc.name}")
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == inode:
                    found.append(f"fd {fd}")
        except OSError:
            continue
    return found


def _nothing_left(state_dir: Path, sid: str, vmm: int, netns: str | None) -> None:
    assert not (state_dir / "sandboxes" / sid).exists()  # disk, socket, logs
    assert not Path(f"/proc/{vmm}").exists(), "the VMM survived"
    assert leftovers(state_dir) == []
    assert str(state_dir) not in Path("/proc/self/mountinfo").read_text()
    if netns is not None:
        deadline = time.monotonic() + 10
        while _netns_users(netns) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _netns_users(netns) == [], "the sandbox's network namespace (and nft table) lives"


def test_parallel_run_d_and_rm_while_ls_loops(ml: Run) -> None:
    stop = threading.Event()
    listings: list[subprocess.CompletedProcess[bytes]] = []

    def lister() -> None:
        while not stop.is_set():
            listings.append(subprocess.run([MATCHLOCK, "ls", "--json"], capture_output=True,
                                           timeout=60))

    t = threading.Thread(target=lister)
    t.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            started = list(pool.map(lambda _: ml("run", "-d"), range(4)))
        ids = [r.stdout.decode().strip() for r in started]
        assert all(r.returncode == 0 for r in started), [r.stderr for r in started]
        assert len(set(ids)) == 4
        running = {e["id"]: e["status"] for e in _json(ml("ls", "--json"))}  # type: ignore[union-attr]
        assert all(running[i] == "running" for i in ids), running
        with ThreadPoolExecutor(4) as pool:
            removed = list(pool.map(lambda sid: ml("rm", "-f", sid), ids))
        assert [r.stdout.decode() for r in removed] == [f"Removed {i}\n" for i in ids], \
            [r.stderr for r in removed]
    finally:
        stop.set()
        t.join()
    assert len(listings) >= 5
    for r in listings:
        assert r.returncode == 0 and r.stderr == b"", r.stderr
        json.loads(r.stdout)
    every = {e["id"]: e for e in _json(ml("ls", "-a", "--json"))}  # type: ignore[union-attr]
    for sid in ids:
        assert every[sid]["status"] == "removed" and every[sid]["end_reason"] == "kill"


def test_kill_9_of_the_supervisor_is_crashed_and_gc_leaves_nothing(ml: Run,
                                                                  state_dir: Path) -> None:
    sid = _start(ml)
    info = _inspect(ml, sid)
    owner, vmm = info["owner"], info["vmm"]
    assert isinstance(owner, dict) and isinstance(vmm, dict)
    assert owner["alive"] and vmm["alive"]
    netns = os.readlink(f"/proc/{vmm['pid']}/ns/net")
    os.kill(int(owner["pid"]), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{vmm['pid']}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _db_phase(state_dir, sid) == "running"  # nobody has looked yet
    assert _status(ml, sid) == "crashed"
    assert _db_phase(state_dir, sid) == "crashed"  # and now it is recorded
    end = _end(ml, sid)
    assert end["reason"] == "owner-crash" and str(owner["pid"]) in str(end["detail"])
    r = ml("gc", check=True)
    assert f"removed {sid}" in r.stdout.decode()
    _nothing_left(state_dir, sid, int(vmm["pid"]), netns)
    history = [h["phase"] for h in _inspect(ml, sid)["history"]]  # type: ignore[union-attr]
    assert history[-2:] == ["crashed", "removed"], history


@pytest.mark.parametrize("command", ["gc", "prune"])
def test_host_reboot_leaves_records_that_say_running(ml: Run, state_dir: Path,
                                                     command: str) -> None:
    # What a reboot leaves: a record saying running whose owner and VMM pids now belong to
    # another process, one that even has the recorded start time (ticks since boot repeat
    # across boots: pid 1 always matches), and the sandbox's directory with its disk and a
    # socket file nobody listens on. Only the boot id tells them apart.
    stranger = subprocess.Popen(["sleep", "600"])
    try:
        start = int(Path(f"/proc/{stranger.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        sid = "vm-0eb00700" if command == "gc" else "vm-0eb00701"
        ml("ls", check=True)  # the database exists (a fresh session may have none yet)
        with contextlib.closing(sqlite3.connect(state_dir / "state.db", timeout=15)) as db, db:
            db.execute("INSERT INTO sandboxes (id, image, phase, created, updated, owner_pid,"
                       " owner_start, vmm_pid, vmm_start, boot_id) VALUES (?, 'busybox',"
                       " 'running', ?, ?, ?, ?, ?, ?, 'an-earlier-boot')",
                       (sid, time.time(), time.time(), stranger.pid, start, stranger.pid,
                        start))
        path = state_dir / "sandboxes" / sid
        path.mkdir(parents=True)
        with open(path / "upper.ext4", "wb") as f:
            f.truncate(1 << 30)
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path / "control.sock"))
        s.close()
        assert _status(ml, sid) == "crashed"
        info = _inspect(ml, sid)
        assert info["owner"]["alive"] is False and info["vmm"]["alive"] is False  # type: ignore[index]
        r = ml("exec", sid, "--", "true")
        assert r.returncode != 0 and b"crashed" in r.stderr
        out = ml(command, check=True).stdout.decode()
        assert (f"removed {sid}" if command == "gc" else f"Pruned {sid}") in out, out
        assert not path.exists()
        assert stranger.poll() is None, "gc killed a process that only shares a pid"
        assert _status(ml, sid) == "removed"
        cleanup = _inspect(ml, sid)["cleanup"]
        assert [c["step"] for c in cleanup] == ["directory"], cleanup  # type: ignore[index, union-attr]
        assert leftovers(state_dir) == []
    finally:
        stranger.kill()
        stranger.wait()


def test_end_reasons(ml: Run, state_dir: Path) -> None:
    # The command's exit code (one-shot run: the record outlives the sandbox).
    r = ml("run", "--", "sh", "-c", "exit 7")
    assert r.returncode == 7
    sid = _newest_id(ml)
    assert _end(ml, sid) == {"reason": "exit", "detail": "the command exited with code 7",
                             "exit_code": 7}
    assert _status(ml, sid) == "removed"
    # A signal in the guest.
    assert ml("run", "--", "sh", "-c", "kill -TERM $$").returncode == 143
    end = _end(ml, _newest_id(ml))
    assert end["reason"] == "signal" and "SIGTERM" in str(end["detail"])
    # A guest kernel panic.
    r = ml("run", "--privileged", "--", "sh", "-c", "echo c > /proc/sysrq-trigger; sleep 60")
    assert r.returncode != 0
    end = _end(ml, _newest_id(ml))
    assert end["reason"] == "panic" and "sysrq triggered crash" in str(end["detail"]), end
    # A detached sandbox whose guest panics stops (it is not `running` any more).
    sid = _start(ml, "--privileged")
    ml("exec", sid, "--", "sh", "-c", "echo c > /proc/sysrq-trigger; sleep 60")
    _wait_status(ml, sid, "stopped")
    end = _end(ml, sid)
    assert end["reason"] == "panic" and "sysrq triggered crash" in str(end["detail"]), end
    ml("rm", sid, check=True)
    # --timeout of a one-shot run.
    r = ml("run", "--timeout", "2", "--", "sleep", "100")
    assert r.returncode == 124
    assert _end(ml, _newest_id(ml))["reason"] == "timeout"
    # --timeout of a detached sandbox.
    sid = _start(ml, "--timeout", "3")
    _wait_status(ml, sid, "stopped")
    assert _end(ml, sid) == {"reason": "timeout", "detail": "timed out after 3s",
                             "exit_code": None}
    ml("rm", sid, check=True)
    # kill
    sid = _start(ml)
    ml("kill", sid, check=True)
    end = _end(ml, sid)
    assert end["reason"] == "kill", end
    phases = [h["phase"] for h in _inspect(ml, sid)["history"]]  # type: ignore[union-attr]
    assert phases == ["creating", "booting", "running", "kill requested", "stopping",
                      "stopped"], phases
    ml("rm", sid, check=True)
    # run --rm=false: the command's exit is noted; the sandbox ends by kill.
    p = subprocess.Popen([MATCHLOCK, "run", "--rm=false", "--", "sh", "-c", "exit 4"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stderr is not None
    while b"stays up" not in (line := p.stderr.readline()):
        assert line, "run --rm=false ended early"
    sid = _newest_id(ml)
    ml("kill", sid, check=True)
    p.communicate(timeout=60)
    assert p.returncode == 4
    info = _inspect(ml, sid)
    assert info["end"]["reason"] == "kill", info["end"]  # type: ignore[index]
    notes = [(h["phase"], h["detail"]) for h in info["history"]]  # type: ignore[union-attr]
    assert ("command exited", "code 4") in notes, notes
    ml("rm", sid, check=True)
    # kill of a one-shot run (its owner gets SIGTERM)
    p = subprocess.Popen([MATCHLOCK, "run", "--", "sh", "-c", "echo up; sleep 100"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"up\n"
    sid = _newest_id(ml)
    t = time.monotonic()
    ml("kill", sid, check=True)
    # Not reaped yet by us, its parent: a zombie has ended all the same (kill waited 60 s).
    assert time.monotonic() - t < 30
    p.communicate(timeout=60)
    assert _end(ml, sid)["reason"] == "kill"


def test_oom_in_the_guest(ml: Run, python_image: str) -> None:
    grow = "a = []\nwhile True: a.append(b'x' * (8 << 20))\n"
    r = ml("run", "--image", python_image, "--memory", "128", "--", "python3", "-c", grow,
           timeout=300)
    assert r.returncode == 137, r.stderr
    end = _end(ml, _newest_id(ml))
    assert end["reason"] == "oom" and "python3" in str(end["detail"]), end
    assert end["exit_code"] == 137


def test_get_log_follow_and_no_secret_value_in_the_db(ml: Run, state_dir: Path) -> None:
    value = "sv-" + os.urandom(12).hex()
    env_value = "ev-" + os.urandom(12).hex()
    sid = _start(ml, "--timeout", "4", "--secret", f"API_TOKEN={value}@api.example.test",
                 "-e", f"PLAIN={env_value}", "--",
                 "sh", "-c", "for i in 1 2 3; do echo tick$i; sleep 0.3; done")
    got = _json(ml("get", sid[:7]))  # a prefix will do
    assert _json(ml("stat", sid[3:]))["id"] == sid  # type: ignore[index]
    with contextlib.closing(sqlite3.connect(state_dir / "state.db", timeout=15)) as db, db:
        for twin in ("vm-abab0001", "vm-abab0002"):
            db.execute("INSERT OR IGNORE INTO sandboxes (id, image, phase, created, updated,"
                       " owner_pid) VALUES (?, 'x', 'removed', 0, 0, 0)", (twin,))
    for bad, words in ((["get", "vm-"], "invalid sandbox id"),
                       (["inspect", "abab"], "ambiguous (vm-abab0001, vm-abab0002)"),
                       (["inspect", "vm-fffffff0"], "no such sandbox"),
                       (["log", "zz"], "invalid sandbox id")):
        r = ml(*bad)
        err = r.stderr.decode()
        assert r.returncode == 1 and err.startswith("matchlock: ") and words in err, err
        assert len(err.splitlines()) == 1, err
    assert isinstance(got, dict) and got["id"] == sid and got["status"] == "running"
    cfg = got["config"]
    assert cfg["network"]["secrets"] == [{"name": "API_TOKEN", "hosts": ["api.example.test"]}]
    assert cfg["env"] == ["PLAIN"]
    # log -f follows until the sandbox ends (by its --timeout), then exits 0.
    r = ml("log", "-f", sid, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "tick1\ntick2\ntick3\n" in out and "timed out after 4s" in out, out
    assert _status(ml, sid) == "stopped"
    blob = db_file_bytes(state_dir)
    assert b"API_TOKEN" in blob and b"api.example.test" in blob  # the search is not vacuous
    assert value.encode() not in blob and env_value.encode() not in blob
    ml("rm", sid, check=True)
    r = ml("log", sid)
    assert r.returncode == 1 and b"removed" in r.stderr and len(r.stderr.splitlines()) == 1


HOLD_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_locked_database_never_stops_a_cleanup(ml: Run, state_dir: Path) -> None:
    ml("run", "--", "true", check=True)  # the image's rootfs is built (its lines on stderr)
    p = subprocess.Popen([MATCHLOCK, "run", "-i", "--", "sh", "-c", "echo up; read x; exit 3"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stdin is not None
    assert p.stdout.readline() == b"up\n"
    # Another process holds the write lock for longer than the owner waits (15 s).
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(state_dir / "state.db")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        _, err = p.communicate(b"go\n", timeout=120)
    finally:
        holder.communicate(b"", timeout=30)
    assert p.returncode == 3, err  # the command's code, as always
    lines = err.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("matchlock: warning: not recorded"), err
    assert leftovers(state_dir) == []  # VMM, directory, disk: all gone regardless
