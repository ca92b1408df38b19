"""`diagnose`, `setup` and the errors a user sees when the host is not ready."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import MATCHLOCK


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MATCHLOCK, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_diagnose_reports_every_check_and_the_accelerator() -> None:
    r = _run("diagnose", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is True
    assert set(checks) >= {"accelerator", "qemu", "kernel", "agent", "e2fsprogs", "disk",
                           "privileges"}
    accel = checks["accelerator"]["message"]
    if Path("/sys/module/kvm_pvm").exists():
        # This machine's /dev/kvm is the PVM nested hypervisor: it must be recognised.
        assert accel.startswith("TCG") and "kvm_pvm" in accel
    else:
        assert accel.startswith(("TCG", "KVM"))
    assert "QEMU" in checks["qemu"]["message"]


def test_diagnose_fails_with_the_fix_when_setup_is_missing(tmp_path: Path) -> None:
    r = _run("diagnose", env={"MATCHLOCK_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 1
    assert "✗ kernel: guest kernel not built" in r.stdout
    assert "  fix: sudo matchlock setup" in r.stdout


def test_run_without_a_kernel_says_what_to_do(tmp_path: Path) -> None:
    r = _run("run", "--", "true", env={"MATCHLOCK_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "matchlock: the guest kernel is not built; run `matchlock setup` as root"
    ]


@pytest.mark.skipif(not Path("/sys/module/kvm_pvm").exists(), reason="needs the PVM host")
def test_forcing_kvm_on_a_pvm_host_is_refused_with_a_reason() -> None:
    r = _run("run", "--accel", "kvm", "--", "true")
    assert r.returncode == 1
    assert "KVM was requested but is not usable" in r.stderr
    assert "--accel tcg" in r.stderr
    r = _run("run", "--", "true", env={"MATCHLOCK_ACCEL": "kvm"})
    assert r.returncode == 1 and "not usable" in r.stderr


def test_setup_is_idempotent() -> None:
    r = _run("setup", "--skip-packages")
    assert r.returncode == 0, r.stderr
    assert "guest kernel:" in r.stderr and "default image:" in r.stderr
    assert "building the guest kernel" not in r.stderr
