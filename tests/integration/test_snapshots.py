"""Start-up from snapshot templates: clones share no random state, and a bad template heals."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from matchlock.paths import cache_dir

pytestmark = pytest.mark.vm
Run = Callable[..., subprocess.CompletedProcess[bytes]]


def _templates() -> list[Path]:
    root = cache_dir() / "templates"
    return sorted(p for p in root.iterdir() if (p / "complete").exists()) if root.exists() else []


def test_restored_clones_draw_different_random_bytes(ml: Run) -> None:
    ml("run", "--", "true", check=True)  # makes sure the template exists
    assert _templates()
    script = "head -c 32 /dev/urandom | od -An -tx1; cat /proc/sys/kernel/random/uuid"
    outs = {ml("run", "--", "sh", "-c", script, check=True).stdout for _ in range(3)}
    assert len(outs) == 3


def test_a_damaged_template_is_replaced_by_a_cold_boot(ml: Run) -> None:
    ml("run", "--", "true", check=True)
    for t in _templates():
        (t / "state").write_bytes(b"garbage")
    r = ml("run", "--", "sh", "-c", "echo still works")
    assert (r.returncode, r.stdout) == (0, b"still works\n"), r.stderr
    # The template of this machine shape was rebuilt (others heal when next used).
    healed = [t for t in _templates() if (t / "state").read_bytes() != b"garbage"]
    assert len(healed) == 1
    r = ml("run", "--", "true")
    assert r.returncode == 0


def test_cold_boot_path_still_works(ml: Run) -> None:
    env_before = os.environ.get("MATCHLOCK_SNAPSHOTS")
    os.environ["MATCHLOCK_SNAPSHOTS"] = "0"
    try:
        r = ml("run", "--", "sh", "-c", "echo cold; exit 5")
    finally:
        if env_before is None:
            del os.environ["MATCHLOCK_SNAPSHOTS"]
        else:
            os.environ["MATCHLOCK_SNAPSHOTS"] = env_before
    assert (r.returncode, r.stdout) == (5, b"cold\n"), r.stderr
