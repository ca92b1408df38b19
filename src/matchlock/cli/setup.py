"""`matchlock setup`: install host packages and build the guest's boot artifacts (idempotent)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import click

from matchlock.errors import MatchlockError

PACKAGES = [
    "qemu-system-x86", "qemu-utils", "busybox-static", "e2fsprogs", "musl-tools",
    "linux-source-6.1", "flex", "bison", "libelf-dev", "libssl-dev", "bc", "make", "gcc",
    "xz-utils", "nftables", "iproute2",
]


def _missing_packages() -> list[str]:
    if shutil.which("dpkg-query") is None:
        return []
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *PACKAGES],
        capture_output=True, text=True,
    ).stdout
    installed = {ln.split()[0] for ln in out.splitlines() if ln.endswith(" installed")}
    return [p for p in PACKAGES if p not in installed]


def _say(line: str) -> None:
    click.echo(f"setup: {line}", err=True)


@click.command()
@click.option("--skip-packages", is_flag=True, help="Do not call apt-get.")
def setup(skip_packages: bool) -> None:
    """Install QEMU and build tools, then build the guest kernel, agent and default image."""
    from matchlock.guest import build as agent_build
    from matchlock.image.builtin import ensure_builtin
    from matchlock.image.store import ImageStore
    from matchlock.sandbox import boot, disk
    from matchlock.vm import kernel

    missing = [] if skip_packages else _missing_packages()
    if missing:
        if os.geteuid() != 0:
            raise MatchlockError(
                f"packages missing: {' '.join(missing)}", hint="run `sudo matchlock setup`"
            )
        if shutil.which("apt-get") is None:
            raise MatchlockError(
                f"packages missing: {' '.join(missing)}",
                hint="install them with your distribution's package manager",
            )
        _say(f"installing {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing],
                           env=env)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, check=False)
            r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing],
                               env=env)
        if r.returncode != 0:
            raise MatchlockError("apt-get install failed", hint="see the apt output above")
    else:
        _say("host packages present")

    t = time.monotonic()
    agent = agent_build.cached_agent() or agent_build.build_agent(_say)
    _say(f"guest agent: {agent} ({time.monotonic() - t:.1f}s)")
    t = time.monotonic()
    vmlinux = kernel.cached_kernel()
    if vmlinux is None:
        _say("building the guest kernel (a few minutes)")
        vmlinux = kernel.build_kernel(_say)
    _say(f"guest kernel: {vmlinux} ({time.monotonic() - t:.1f}s)")
    arts = boot.artifacts()
    _say(f"initramfs: {arts.initrd}")
    disk.template(5120)
    store = ImageStore()
    img = ensure_builtin(store)
    store.rootfs(img, _say)
    _say(f"default image: {img.name}")
    from matchlock.cli.diagnose import run_checks

    for c in run_checks():
        _say(f"{c.status}: {c.name}: {c.message}")
    sys.exit(0)
