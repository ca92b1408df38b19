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


def test_clones_of_an_image_template_share_no_random_state_nor_identity(ml: Run) -> None:
    # The image template holds the root mounted and the sandbox init running; everything per
    # sandbox comes after the restore and must differ between its clones.
    ml("run", "--", "true", check=True)
    ml("run", "--", "true", check=True)  # the first run saved the image template
    assert any((t / "upper").exists() for t in _templates())
    fields = {
        "uuid": "cat /proc/sys/kernel/random/uuid",
        "boot_id": "cat /proc/sys/kernel/random/boot_id",
        "urandom": "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
        "hostname": "hostname",
        "etc_hostname": "cat /etc/hostname",
        "ca": "cat /etc/matchlock/ca.pem 2>/dev/null | sha256sum",
        "init": "cat /proc/1/comm",
    }
    script = "; ".join(f"echo {k}=$({cmd})" for k, cmd in fields.items())
    seen: dict[str, set[str]] = {k: set() for k in fields}
    for _ in range(3):
        r = ml("run", "--", "sh", "-c", script, check=True)
        got = dict(line.split("=", 1) for line in r.stdout.decode().splitlines())
        assert set(got) == set(fields), r.stdout
        for k, v in got.items():
            seen[k].add(v)
    assert seen["init"] == {"matchlock-init"}
    assert all(len(seen[k]) == 3 for k in ("uuid", "boot_id", "urandom", "hostname")), seen
    assert seen["etc_hostname"] == seen["hostname"]
    if os.geteuid() == 0:  # a sealed network, so a CA per sandbox
        assert len(seen["ca"]) == 3, seen["ca"]


def test_a_damaged_template_is_replaced_by_a_cold_boot(ml: Run) -> None:
    ml("run", "--", "true", check=True)
    for t in _templates():
        (t / "state").write_bytes(b"garbage")
    r = ml("run", "--", "sh", "-c", "echo still works")
    assert (r.returncode, r.stdout) == (0, b"still works\n"), r.stderr
    # The templates of this machine shape were rebuilt: the generic one and the image's
    # (others heal when next used).
    healed = [t for t in _templates() if (t / "state").read_bytes() != b"garbage"]
    assert sorted((t / "upper").exists() for t in healed) == [False, True]
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
