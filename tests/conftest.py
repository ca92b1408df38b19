"""Every test session runs under a temporary MATCHLOCK_HOME: no test reads or writes the
user's real cache (`~/.cache/matchlock`) or state (`~/.matchlock`).

Only the immutable boot artifacts (kernel, agent builds, initramfs images, the accelerator
probe's verdicts), which take minutes to build, are copied in once per session; images,
root filesystems, disk templates and snapshot templates are made fresh under the temporary
home. At the end of the session the real directories are compared with how they were at its
start, and any change fails the run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from matchlock import paths
from tests import procs

REAL_CACHE = paths.cache_dir()
REAL_STATE = paths.state_dir()
BOOT_ARTIFACTS = ("kernel", "agent", "initramfs", "accel")


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under root (not following symlinks): (mode, size, mtime_ns)."""
    out: dict[str, tuple[int, int, int]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def _changes(before: dict[str, tuple[int, int, int]],
             after: dict[str, tuple[int, int, int]]) -> list[str]:
    return ([f"added {p}" for p in sorted(after.keys() - before.keys())]
            + [f"removed {p}" for p in sorted(before.keys() - after.keys())]
            + [f"changed {p}" for p in sorted(before.keys() & after.keys())
               if before[p] != after[p]])


def stop_fork_servers(under: Path) -> None:
    """End the fork servers (cli/forkserver.py) that this session's `run`s started under
    `under`: one whose socket is removed exits (they would otherwise idle for minutes)."""
    for pid in procs.fork_servers(under):
        argv = procs.cmdline(pid).split(b"\0")
        if b"matchlock.cli.forkserver" in argv[:-1]:
            Path(os.fsdecode(argv[argv.index(b"matchlock.cli.forkserver") + 1])).unlink(
                missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def matchlock_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    before = {root: _snapshot(root) for root in (REAL_CACHE, REAL_STATE)}
    home = tmp_path_factory.mktemp("matchlock-home")
    cache = home / "cache"
    cache.mkdir()
    for name in BOOT_ARTIFACTS:
        if (REAL_CACHE / name).is_dir():
            shutil.copytree(REAL_CACHE / name, cache / name, symlinks=True)
    saved = {k: os.environ.get(k) for k in
             ("MATCHLOCK_HOME", "MATCHLOCK_CACHE_DIR", "MATCHLOCK_STATE_DIR")}
    os.environ.update(MATCHLOCK_HOME=str(home), MATCHLOCK_CACHE_DIR=str(cache),
                      MATCHLOCK_STATE_DIR=str(home))
    yield home
    stop_fork_servers(tmp_path_factory.getbasetemp())
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    changed = [f"{root}: {c}" for root in before for c in _changes(before[root], _snapshot(root))]
    if changed:
        pytest.fail("tests wrote to the real matchlock home (or something else ran matchlock "
                    "meanwhile): " + "; ".join(changed[:20]), pytrace=False)
