"""The QEMU microvm backend: the command line (pure) and the VMM process.

The VMM process is tied to its owner with PR_SET_PDEATHSIG, so a matchlock process killed with
SIGKILL cannot leave a running VM behind; `matchlock gc` removes what remains on disk.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matchlock.errors import SetupMissing
from matchlock.vm.accel import host_tsc_khz

QEMU_BINARY = "qemu-system-x86_64"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Disk:
    path: Path
    fmt: str = "raw"
    readonly: bool = False


@dataclass(frozen=True)
class VMConfig:
    kernel: Path
    initrd: Path
    accel: str
    vcpus: int
    memory_mb: int
    console_log: Path
    control_fd: int
    disks: Sequence[Disk] = field(default_factory=tuple)
    extra_cmdline: Sequence[str] = field(default_factory=tuple)
    qmp_fd: int | None = None
    # Guest RAM: a fresh memfd, or (snapshot restore) a private copy-on-write mapping of a
    # template's RAM file, which every clone shares and none can change.
    ram_file: Path | None = None
    incoming: bool = False
    # Devices set up by others (the NIC) and the descriptors they need inherited.
    extra_args: Sequence[str] = field(default_factory=tuple)
    extra_fds: Sequence[int] = field(default_factory=tuple)


def kernel_cmdline(accel: str, extra: Sequence[str] = ()) -> str:
    args = [
        "console=ttyS0", "quiet", "panic=-1", "reboot=t", "i8042.noaux", "i8042.nopnp",
        "random.trust_cpu=on", "nomodule", "init=/init",
    ]
    if accel == "tcg":
        # Under TCG, PIT calibration of the TSC can fail and hang the guest at 100% CPU.
        khz = host_tsc_khz()
        args += [f"tsc_early_khz={khz}", f"lpj={khz * 4}", "no_timer_check", "tsc=reliable"]
    return " ".join([*args, *extra])


def command_line(cfg: VMConfig, binary: str = QEMU_BINARY) -> list[str]:
    if cfg.accel == "kvm":
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel = ["-accel", "tcg", "-cpu", "max"]
    argv = [
        binary,
        # Guest RAM in a memfd: the host can tell guest memory (RssShmem) from the VMM's own,
        # and a later snapshot/restore path can map the same memory file.
        "-M", "microvm,acpi=off,memory-backend=mem",
        "-object", _ram_backend(cfg),
        *accel,
        "-m", f"{cfg.memory_mb}M",
        "-smp", str(cfg.vcpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(cfg.kernel),
        "-initrd", str(cfg.initrd),
        "-append", kernel_cmdline(cfg.accel, cfg.extra_cmdline),
        "-chardev", f"file,id=con,path={opt_path(cfg.console_log)}",
        "-serial", "chardev:con",
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", f"socket,id=ctl,fd={cfg.control_fd}",
        "-device", "virtserialport,chardev=ctl,name=matchlock",
    ]
    if cfg.qmp_fd is not None:
        argv += ["-chardev", f"socket,id=qmp,fd={cfg.qmp_fd}", "-mon", "chardev=qmp,mode=control"]
    if cfg.incoming:
        argv += ["-incoming", "defer"]
    argv += cfg.extra_args
    for i, disk in enumerate(cfg.disks):
        opts = f"file={opt_path(disk.path)},if=none,id=d{i},format={disk.fmt},cache=unsafe"
        if disk.readonly:
            opts += ",readonly=on"
        argv += ["-drive", opts, "-device", f"virtio-blk-device,drive=d{i}"]
    return argv


def opt_path(path: Path) -> str:
    """A path inside a QEMU option list, where a comma must be doubled."""
    return str(path).replace(",", ",,")


def _ram_backend(cfg: VMConfig) -> str:
    size = f"size={cfg.memory_mb}M"
    if cfg.ram_file is not None:
        return f"memory-backend-file,id=mem,{size},mem-path={opt_path(cfg.ram_file)},share=off"
    return f"memory-backend-memfd,id=mem,{size},share=on"


def find_qemu() -> str:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise SetupMissing(
            f"{QEMU_BINARY} not found",
            hint="run `matchlock setup` as root (installs qemu-system-x86)",
        )
    return path


def _tie_to_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # Own process group: a Ctrl-C typed at the user's terminal must reach the guest command
    # through the agent, not kill the VMM under it.
    os.setpgid(0, 0)


def spawn(cfg: VMConfig, log_path: Path) -> subprocess.Popen[bytes]:
    argv = command_line(cfg, find_qemu())
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=tuple(
                fd for fd in (cfg.control_fd, cfg.qmp_fd, *cfg.extra_fds) if fd is not None
            ),
            preexec_fn=_tie_to_parent,
            close_fds=True,
        )


def qemu_version(binary: str | None = None) -> str | None:
    try:
        out = subprocess.run(
            [binary or QEMU_BINARY, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("QEMU emulator version ").strip() or None
