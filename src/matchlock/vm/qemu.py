"""The QEMU microvm backend: the command line (pure) and the VMM process.

The VMM process is tied to its owner, so a matchlock process killed with SIGKILL cannot leave a
running VM behind: PR_SET_PDEATHSIG until QEMU drops its privileges (which clears it), then
SIGHUP from a controlling terminal that the owner holds (see `vm.confine`). `matchlock gc`
removes what remains on disk.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matchlock.errors import SetupMissing
from matchlock.vm import confine
from matchlock.vm.accel import host_tsc_khz

QEMU_BINARY = "qemu-system-x86_64"


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
    # ram_file mapped shared instead (a memfd of the owner's, as /proc/self/fd/N): the VM then
    # writes into it, and a snapshot leaves it out of the migration stream (x-ignore-shared).
    ram_shared: bool = False
    incoming: bool = False
    # Devices set up by others (the NIC) and the descriptors they need inherited.
    extra_args: Sequence[str] = field(default_factory=tuple)
    extra_fds: Sequence[int] = field(default_factory=tuple)
    # Confinement (vm.confine): after start-up QEMU becomes runas=(uid, gid) inside the empty
    # directory `chroot`. Without a NIC, private_netns gives it a network namespace of its own
    # with no interface up. QEMU's seccomp filter is always on.
    runas: tuple[int, int] | None = None
    chroot: Path | None = None
    private_netns: bool = False
    # A VMM serving mounts (sandbox.mounts): QEMU 7.2's 9p server changes modes through
    # /proc/self/fd/N, so its chroot (then `mounts.share_root()`) gets a /proc, of QEMU's own
    # mount namespace, showing only the VMM's own processes (see vmm_exec.py).
    chroot_proc: bool = False
    # Device arguments placed after `disks`: extra disks (sandbox.disks), which must not take
    # the names vda/vdb (the guest names virtio disks in command-line order).
    late_args: Sequence[str] = field(default_factory=tuple)


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


def accel_args(accel: str) -> list[str]:
    """The accelerator and CPU model (part of a snapshot template's identity)."""
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    # Without ERMS/FSRM the guest kernel copies to and from user memory with `rep movsq`, which
    # TCG emulates 8 bytes per iteration, instead of `rep movsb` (one): ~25 % less QEMU CPU per
    # MB of exec output (docs/performance.md, "Exec output").
    return ["-accel", "tcg", "-cpu", "max,erms=off,fsrm=off"]


def command_line(cfg: VMConfig, binary: str = QEMU_BINARY) -> list[str]:
    accel = accel_args(cfg.accel)
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
        "-sandbox", confine.sandbox_arg(cfg.runas is not None),
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
    # QEMU 7.2 (Debian 12) syntax; from 8.1 the same is `-run-with user=UID:GID,chroot=DIR`,
    # and -chroot is deprecated there.
    if cfg.runas is not None:
        uid, gid = cfg.runas
        argv += ["-runas", f"{uid}:{gid}"]
    if cfg.chroot is not None:
        argv += ["-chroot", str(cfg.chroot)]
    argv += cfg.extra_args
    for i, disk in enumerate(cfg.disks):
        # auto-read-only=off: with -drive's default (on), QEMU reopens the image *by path*
        # when the block layer drops or regains write permission (saving or loading a
        # snapshot), which a VMM in an empty chroot without root cannot do.
        opts = (f"file={opt_path(disk.path)},if=none,id=d{i},format={disk.fmt},cache=unsafe,"
                "auto-read-only=off")
        if disk.readonly:
            opts += ",readonly=on"
        argv += ["-drive", opts, "-device", f"virtio-blk-device,drive=d{i}"]
    argv += cfg.late_args
    return argv


def opt_path(path: Path) -> str:
    """A path inside a QEMU option list, where a comma must be doubled."""
    return str(path).replace(",", ",,")


def _ram_backend(cfg: VMConfig) -> str:
    size = f"size={cfg.memory_mb}M"
    if cfg.ram_file is not None:
        share = "on" if cfg.ram_shared else "off"
        return f"memory-backend-file,id=mem,{size},mem-path={opt_path(cfg.ram_file)},share={share}"
    return f"memory-backend-memfd,id=mem,{size},share=on"


def find_qemu() -> str:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise SetupMissing(
            f"{QEMU_BINARY} not found",
            hint="run `matchlock setup` as root (installs qemu-system-x86)",
        )
    return path


_WRAPPER = Path(__file__).with_name("vmm_exec.py")


def wrapper_argv(cfg: VMConfig, argv: list[str], ctty: int | None) -> list[str]:
    """The VMM's command line behind `vmm_exec.py`, which does in a single-threaded process
    of its own what must happen between fork and QEMU's exec (see that module)."""
    out = [sys.executable, "-I", "-S", str(_WRAPPER)]
    if ctty is not None:
        out += ["--ctty", str(ctty)]
    if cfg.private_netns:
        out.append("--netns")
    if cfg.chroot_proc and cfg.chroot is not None:
        out += ["--proc", str(cfg.chroot / "proc")]
    if cfg.runas is not None and confine.filter_supported():
        out += ["--filter", confine.setid_filter(*cfg.runas).hex()]
    return [*out, "--", *argv]


@dataclass
class Vmm:
    """The QEMU process and the terminal whose hang-up stops it when the owner dies."""

    proc: subprocess.Popen[bytes]
    hangup_fd: int | None

    def close_hangup(self) -> None:
        if self.hangup_fd is not None:
            os.close(self.hangup_fd)
            self.hangup_fd = None


def spawn(cfg: VMConfig, log_path: Path) -> Vmm:
    master = slave = None
    if cfg.runas is not None:
        master, slave = os.openpty()  # close-on-exec; the slave is passed on to the wrapper
    argv = wrapper_argv(cfg, command_line(cfg, find_qemu()), slave)
    fds = [fd for fd in (cfg.control_fd, cfg.qmp_fd, *cfg.extra_fds) if fd is not None]
    if slave is not None:
        fds.append(slave)
    try:
        with open(log_path, "ab") as log:
            # No preexec_fn: the owner has threads. start_new_session (setsid, done by C code
            # in the child) makes the VMM a session leader: a Ctrl-C typed at the user's
            # terminal reaches the guest command through the agent, not the VMM under it.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=tuple(fds),
                start_new_session=True,
                close_fds=True,
                env={**os.environ, "MATCHLOCK_VMM_OWNER": str(os.getpid())},
            )
    except BaseException:
        if master is not None:
            os.close(master)
        raise
    finally:
        if slave is not None:
            os.close(slave)
    return Vmm(proc, master)


def qemu_version(binary: str | None = None) -> str | None:
    try:
        out = subprocess.run(
            [binary or QEMU_BINARY, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("QEMU emulator version ").strip() or None
