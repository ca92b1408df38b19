"""The QEMU command line, which is pure: what each sandbox option turns into."""

from __future__ import annotations

from pathlib import Path

from matchlock.vm.qemu import Disk, VMConfig, command_line


def cfg(**kw: object) -> VMConfig:
    base: dict[str, object] = dict(
        kernel=Path("/k/vmlinux"), initrd=Path("/k/init.cpio"), accel="tcg", vcpus=2,
        memory_mb=768, console_log=Path("/s/console.log"), control_fd=7,
    )
    base.update(kw)
    return VMConfig(**base)  # type: ignore[arg-type]


def test_tcg_machine() -> None:
    argv = command_line(cfg())
    # The `max` model without ERMS/FSRM: the guest kernel's user copies are then `rep movsq`,
    # which TCG runs 8 bytes an iteration (`rep movsb`: one).
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert argv[argv.index("-cpu") + 1] == "max,erms=off,fsrm=off"
    assert argv[argv.index("-m") + 1] == "768M" and argv[argv.index("-smp") + 1] == "2"
    assert "memory-backend-memfd,id=mem,size=768M,share=on" in argv
    assert "socket,id=ctl,fd=7" in argv
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert "-incoming" not in argv and "-mon" not in argv


def test_kvm_uses_the_host_cpu() -> None:
    argv = command_line(cfg(accel="kvm"))
    assert argv[argv.index("-accel") + 1] == "kvm" and argv[argv.index("-cpu") + 1] == "host"


def test_disks_qmp_and_restore() -> None:
    argv = command_line(cfg(disks=[Disk(Path("/img/root,1.ext4"), readonly=True),
                                   Disk(Path("/s/upper"))],
                            qmp_fd=9, ram_file=Path("/t/ram"), incoming=True))
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives == [
        "file=/img/root,,1.ext4,if=none,id=d0,format=raw,cache=unsafe,auto-read-only=off,"
        "readonly=on",
        "file=/s/upper,if=none,id=d1,format=raw,cache=unsafe,auto-read-only=off",
    ]
    assert "memory-backend-file,id=mem,size=768M,mem-path=/t/ram,share=off" in argv
    assert argv[argv.index("-incoming") + 1] == "defer"
    assert "socket,id=qmp,fd=9" in argv


def test_a_restore_onto_shared_ram_maps_it_shared() -> None:
    # Only shared RAM is left out of a snapshot's migration stream (x-ignore-shared).
    argv = command_line(cfg(ram_file=Path("/proc/self/fd/7"), ram_shared=True, incoming=True))
    assert "memory-backend-file,id=mem,size=768M,mem-path=/proc/self/fd/7,share=on" in argv


def test_seccomp_is_always_on() -> None:
    argv = command_line(cfg())
    assert argv[argv.index("-sandbox") + 1] == (
        "on,obsolete=deny,spawn=deny,resourcecontrol=deny,elevateprivileges=deny")
    assert "-runas" not in argv and "-chroot" not in argv


def test_confined_vmm_drops_to_its_uid_in_an_empty_root() -> None:
    argv = command_line(cfg(runas=(1900000007, 1900000007), chroot=Path("/run/ml/vmm-root")))
    assert argv[argv.index("-runas") + 1] == "1900000007:1900000007"
    assert argv[argv.index("-chroot") + 1] == "/run/ml/vmm-root"
    # QEMU 7.2's elevateprivileges=deny would kill it in its own -runas: the owner's set*id
    # filter stands in for it (tests/unit/test_vmm_confine.py).
    sandbox = argv[argv.index("-sandbox") + 1].split(",")
    assert sandbox[0] == "on" and "elevateprivileges=allow" in sandbox
    assert {"obsolete=deny", "spawn=deny", "resourcecontrol=deny"} <= set(sandbox)


def test_nothing_is_opened_by_path_after_the_drop() -> None:
    """Restores take the migration stream as a descriptor (QMP getfd), never a path or a
    command (spawn=deny forbids exec:)."""
    argv = command_line(cfg(runas=(1, 1), chroot=Path("/e"), ram_file=Path("/t/ram"),
                            incoming=True))
    assert argv[argv.index("-incoming") + 1] == "defer"
    assert not any(a.startswith(("exec:", "file:")) for a in argv)


def test_extra_disks_come_after_root_and_upper() -> None:
    """The guest names virtio disks in command-line order: vda/vdb stay root and upper."""
    late = ["-device", "virtio-blk-device,drive=mlvol0,serial=mlvol0"]
    argv = command_line(cfg(disks=[Disk(Path("/r"), readonly=True), Disk(Path("/u"))],
                            extra_args=["-device", "virtio-net-device"], late_args=late))
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices[-3:] == ["virtio-blk-device,drive=d0", "virtio-blk-device,drive=d1",
                            late[1]]
    assert argv[-2:] == late
