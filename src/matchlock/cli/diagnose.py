"""`matchlock diagnose`: one line per host check, and the command that fixes each failure."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass

import click

from matchlock.paths import cache_dir

FIX_SETUP = "sudo matchlock setup"
MIN_FREE_BYTES = 2 << 30


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # pass | warn | fail
    message: str
    fix: str | None = None


def _accel() -> Check:
    from matchlock.vm import accel

    pre = accel.kvm_precheck()
    forced = os.environ.get("MATCHLOCK_ACCEL")
    if not pre.usable:
        return Check("accelerator", "warn",
                     f"TCG (software emulation, slower): {pre.reason}",
                     None)
    from matchlock.sandbox import boot

    try:
        arts = boot.artifacts()
    except Exception:
        return Check("accelerator", "warn", f"KVM looks usable ({pre.reason}); not probed yet "
                     "because the kernel or agent is missing", FIX_SETUP)
    choice = boot.choose_accel(forced, arts)
    status = "pass" if choice.accel == "kvm" else "warn"
    return Check("accelerator", status, f"{choice.accel.upper()}: {choice.reason}")


def _qemu() -> Check:
    from matchlock.vm import qemu

    path = shutil.which(qemu.QEMU_BINARY)
    if path is None:
        return Check("qemu", "fail", f"{qemu.QEMU_BINARY} not found", FIX_SETUP)
    return Check("qemu", "pass", f"{path} (QEMU {qemu.qemu_version(path) or 'unknown version'})")


def _kernel() -> Check:
    from matchlock.vm import kernel

    path = kernel.cached_kernel()
    if path is None:
        return Check("kernel", "fail", "guest kernel not built", FIX_SETUP)
    return Check("kernel", "pass", f"{path} ({path.stat().st_size // (1 << 20)} MiB)")


def _agent() -> Check:
    from matchlock.guest import build

    path = build.cached_agent()
    if path is None:
        return Check("agent", "fail", "guest agent not built", FIX_SETUP)
    return Check("agent", "pass", f"{path} ({path.stat().st_size // 1024} KiB)")


def _mkfs() -> Check:
    path = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
    if path is None:
        return Check("e2fsprogs", "fail", "mkfs.ext4 not found", FIX_SETUP)
    return Check("e2fsprogs", "pass", path)


def _disk() -> Check:
    base = cache_dir()
    probe = base
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    msg = f"{free / (1 << 30):.1f} GiB free under {base}"
    if free < MIN_FREE_BYTES:
        return Check("disk", "fail", msg + " (need 2 GiB)", f"free space in {probe}")
    return Check("disk", "pass", msg)


def _privileges() -> Check:
    if os.geteuid() == 0:
        return Check("privileges", "pass", "running as root")
    return Check("privileges", "warn", "not root: `setup` needs root; sandboxes without "
                 "network run unprivileged", None)


def _confinement() -> Check:
    import subprocess

    from matchlock.vm import confine, qemu

    name = "vmm confinement"
    path = shutil.which(qemu.QEMU_BINARY)
    if path is None:
        return Check(name, "fail", f"{qemu.QEMU_BINARY} not found", FIX_SETUP)
    try:
        usage = subprocess.run([path, "-help"], capture_output=True, text=True,
                               timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return Check(name, "fail", f"cannot run {path}: {e}", FIX_SETUP)
    if not any(line.startswith("-sandbox") for line in usage.splitlines()):
        return Check(name, "fail", "this QEMU has no seccomp support (-sandbox)",
                     "install Debian's qemu-system-x86: " + FIX_SETUP)
    if not confine.enabled():
        return Check(name, "warn", "seccomp only: not root, so QEMU runs as you "
                     "(no uid of its own, no chroot)")
    return Check(name, "pass", f"seccomp + uid {confine.UID_BASE}+n per sandbox + chroot "
                 f"{confine.root_path()}")


def run_checks() -> list[Check]:
    return [_accel(), _qemu(), _confinement(), _kernel(), _agent(), _mkfs(), _disk(),
            _privileges()]


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def diagnose(as_json: bool) -> None:
    """Check that this host can run sandboxes; exit 1 when something is missing."""
    checks = run_checks()
    ok = all(c.status != "fail" for c in checks)
    if as_json:
        click.echo(json.dumps({"ok": ok, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        marks = {"pass": "✓", "warn": "⚠", "fail": "✗"}
        for c in checks:
            click.echo(f"{marks[c.status]} {c.name}: {c.message}")
            if c.fix and c.status != "pass":
                click.echo(f"  fix: {c.fix}")
    sys.exit(0 if ok else 1)
