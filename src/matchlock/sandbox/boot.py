"""Boot artifacts (kernel, initramfs with the agent) and the accelerator decision."""

from __future__ import annotations

import fcntl
import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from matchlock.errors import MatchlockError, SetupMissing
from matchlock.guest import build as agent_build
from matchlock.paths import cache_dir
from matchlock.vm import accel, initramfs, kernel, qemu


@dataclass(frozen=True)
class BootArtifacts:
    kernel: Path
    initrd: Path
    key: str


@functools.cache
def artifacts() -> BootArtifacts:
    """Kernel and initramfs for this process; `run` checks them before image work and the
    sandbox uses them again, so the hashing of sources happens once per process."""
    return _artifacts()


def _artifacts() -> BootArtifacts:
    vmlinux = kernel.cached_kernel()
    if vmlinux is None:
        raise SetupMissing(
            "the guest kernel is not built", hint="run `matchlock setup` as root"
        )
    # The agent takes a second to compile, so a changed agent source (an upgrade) is rebuilt
    # here rather than sending the user back to `setup`; build_agent explains a missing compiler.
    agent = agent_build.cached_agent() or agent_build.build_agent(_quiet)
    key = agent_build.agent_key() if not os.environ.get("MATCHLOCK_AGENT") else _file_key(agent)
    initrd = cache_dir() / "initramfs" / f"{key}.cpio"
    if not initrd.exists():
        initrd.parent.mkdir(parents=True, exist_ok=True)
        tmp = initrd.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(initramfs.agent_initramfs(agent.read_bytes()))
        tmp.replace(initrd)
    return BootArtifacts(vmlinux, initrd, f"{kernel.kernel_key()}-{key}")


def _quiet(line: str) -> None:
    pass


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"custom-{st.st_size:x}-{int(st.st_mtime):x}"


@dataclass(frozen=True)
class AccelChoice:
    accel: str
    reason: str


def probe_key(boot: BootArtifacts) -> str:
    return f"{boot.key}-{platform.release()}-{qemu.qemu_version() or 'unknown'}"


def choose_accel(flag: str | None, boot: BootArtifacts) -> AccelChoice:
    """TCG unless KVM is asked for or proven to boot our kernel on this host."""
    wanted = accel.requested_accel(flag)
    if wanted == "tcg":
        return AccelChoice("tcg", "TCG requested")
    pre = accel.kvm_precheck()
    if not pre.usable:
        if wanted == "kvm":
            raise MatchlockError(
                f"KVM was requested but is not usable: {pre.reason}",
                hint="use --accel tcg (software emulation, slower)",
            )
        return AccelChoice("tcg", f"KVM not usable: {pre.reason}")
    if wanted == "kvm":
        return AccelChoice("kvm", "KVM requested")
    key = probe_key(boot)
    status = accel.cached_probe(key)
    if status is None:
        status = _probe_boot()
        accel.store_probe(key, status)
    if status.usable:
        return AccelChoice("kvm", status.reason)
    return AccelChoice("tcg", f"KVM probe failed: {status.reason}")


def _probe_boot() -> accel.KvmStatus:
    # Imported here: the sandbox module imports this one.
    from matchlock.sandbox.core import Sandbox, SandboxOptions

    lock_path = cache_dir() / "accel" / ".probe.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with Sandbox(SandboxOptions(image="(kvm probe)", rootfs=None, accel="kvm",
                                        memory_mb=128, boot_timeout=15.0)) as sb:
                sb.start()
            return accel.KvmStatus(True, "a probe guest booted under KVM")
        except MatchlockError as e:
            return accel.KvmStatus(False, e.message)
