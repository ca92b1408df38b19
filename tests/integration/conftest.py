"""Fixtures for tests that boot real microVMs through the `matchlock` CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MATCHLOCK = str(Path(sys.executable).with_name("matchlock"))
TESTDATA = Path(os.environ.get("MATCHLOCK_TESTDATA", Path.home() / ".cache/matchlock-testdata"))
PYTHON_IMAGE = "python:3.12-alpine"


@pytest.fixture(scope="session")
def state_dir(matchlock_home: Path) -> Path:
    """Where sandboxes live in this session: the session's temporary MATCHLOCK_HOME
    (tests/conftest.py), never the user's."""
    return matchlock_home


def db_file_bytes(state: Path) -> bytes:
    """The bytes of state.db and its WAL/shm files, read by another process. Opening and
    closing any descriptor on them here would drop the POSIX locks of every SQLite
    connection this (pytest) process holds to that database (a lock is per process and
    file, not per descriptor), and another process could then checkpoint the WAL from under
    it: "database disk image is malformed"."""
    files = sorted(str(p) for p in state.glob("state.db*"))
    if not files:
        return b""
    return subprocess.run(["cat", *files], capture_output=True, check=True).stdout


def _vmm_processes(state_dir: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd and str(state_dir).encode() in cmd:
            pids.append(int(entry.name))
    return pids


def sandbox_owners(env: dict[str, str] | None = None) -> dict[str, int]:
    """Running sandboxes' ids and the pids of the processes that own them (`matchlock ls`).
    The owner of a `matchlock run` is not always that process: the fork server's fork that
    serves it is (cli/forkserver.py)."""
    r = subprocess.run([MATCHLOCK, "ls", "--json", "--running"], capture_output=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return {s["id"]: s["pid"] for s in json.loads(r.stdout)}


def new_owner(before: dict[str, int], env: dict[str, str] | None = None,
              timeout: float = 30) -> int:
    """The owner pid of the one sandbox running now that was not in `before`."""
    deadline = time.monotonic() + timeout
    while True:
        new = {k: v for k, v in sandbox_owners(env).items() if k not in before}
        if len(new) == 1:
            return next(iter(new.values()))
        assert time.monotonic() < deadline, new
        time.sleep(0.1)


def leftovers(state_dir: Path) -> list[str]:
    found = [f"vmm pid {pid}" for pid in _vmm_processes(state_dir)]
    root = state_dir / "sandboxes"
    if root.exists():
        found += [f"sandbox dir {p.name}" for p in root.iterdir()]
    return found


@pytest.fixture
def ml(state_dir: Path) -> Iterator[object]:
    """Run the CLI; after the test, assert that no VM process or sandbox file is left."""

    def run(*args: str, input: bytes | None = None, timeout: float = 180,
            check: bool = False) -> subprocess.CompletedProcess[bytes]:
        r = subprocess.run([MATCHLOCK, *args], input=input, capture_output=True,
                           timeout=timeout, env=os.environ.copy())
        if check and r.returncode != 0:
            raise AssertionError(f"matchlock {args} -> {r.returncode}: {r.stderr.decode()}")
        return r

    yield run
    found = leftovers(state_dir)
    if found:
        # This test fails; what it left must not fail every later one as well.
        for args in (["kill", "--all"], ["gc"], ["prune"]):
            subprocess.run([MATCHLOCK, *args], capture_output=True, timeout=120)
        for pid in _vmm_processes(state_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert found == []


@pytest.fixture(scope="session")
def python_image(state_dir: Path) -> str:
    layout = TESTDATA / "python-3.12-alpine"
    if not (layout / "index.json").exists():
        pytest.fail(f"test data missing: {layout} (run scripts/testdata.sh)")
    r = subprocess.run([MATCHLOCK, "image", "import", PYTHON_IMAGE, str(layout)],
                       capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    return PYTHON_IMAGE


def have_setup() -> bool:
    return shutil.which("qemu-system-x86_64") is not None
