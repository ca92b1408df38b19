"""Extra disks: `run --disk @VOLUME:/guest/path[:ro]` and `--disk HOSTFILE:/guest/path[:ro]`.

Each disk is an ext4 image file attached as a virtio-blk device and mounted by the agent at
the guest path. The host never mounts it (sandbox/volumes.py).

Slots and snapshot templates. The VMM starts with one *slot* per disk: a virtio-blk device
(serial `mlvol<N>`, which the agent finds it by) over a `raw` node whose child is a `null-co`
placeholder of a fixed 1 TiB capacity. That is all a template sees, so one template serves
every set of disks of the same count and read-only pattern, whatever their files and sizes.
Once the VM runs (restored, or booted and saved), `attach` swaps each placeholder for the
real file: the owner opens it (O_RDONLY for `:ro`), hands the descriptor over QMP (`add-fd`,
SCM_RIGHTS), adds a `file` node on `/dev/fdset/N` and `blockdev-reopen`s the raw node onto
it; the confined VMM opens nothing by path. The guest's idea of the capacity stays 1 TiB:
ext4 only needs the device to be at least as large as the file system, and QEMU refuses any
request beyond the real file's end (a guest cannot grow the file).

Users: a read-write disk holds an exclusive `flock` on its file for the sandbox's life, a
read-only one a shared lock (volumes.open_locked): one writer, or any number of readers.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matchlock.errors import MatchlockError
from matchlock.sandbox import volumes
from matchlock.sandbox.mounts import check_guest_path

if TYPE_CHECKING:
    from matchlock.sandbox.mounts import MountSpec
    from matchlock.vm.qmp import Qmp

SLOT_BYTES = volumes.MAX_SIZE_MB << 20  # the capacity every slot shows the guest
# microvm has 8 virtio-mmio transports; the control port, root and writable layer take 3,
# a NIC 1, mounts 2: a sandbox with all of them has room for 2 disks.
TRANSPORTS = 8
FLAG_RO = 1
_OPTIONS = {"ro": True, "readonly": True, "rw": False}


def serial(slot: int) -> str:
    return f"mlvol{slot}"


@dataclass(frozen=True)
class DiskSpec:
    path: Path  # absolute
    guest: str  # absolute, normalised
    readonly: bool
    volume: str | None = None  # the volume's name for @NAME
    spec: str = ""  # as written, for messages

    @property
    def what(self) -> str:
        return f"volume {self.volume}" if self.volume else f"--disk {self.spec!r}"


def parse_disk(spec: str, cwd: str | None = None) -> DiskSpec:
    """`HOST:GUEST[:ro|readonly|rw]` or `@NAME:GUEST[:ro]` (pure, but for finding the file)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise MatchlockError(f"invalid --disk {spec!r}",
                             hint="use @VOLUME:/guest/path[:ro] or IMAGE.ext4:/guest/path[:ro]")
    readonly = False
    if len(parts) == 3:
        opt = parts[2].lower()
        if opt not in _OPTIONS:
            raise MatchlockError(f"invalid --disk {spec!r}: unknown option {parts[2]!r}",
                                 hint="use 'ro' (or nothing, for read-write)")
        readonly = _OPTIONS[opt]
    return make_disk(parts[0], parts[1], readonly, spec, cwd)


def make_disk(source: str, guest_path: str, readonly: bool, spec: str,
              cwd: str | None = None) -> DiskSpec:
    """One disk from its parts: `@NAME` or a host file, and an absolute guest path (also for
    front ends with structured input, e.g. RPC `extra_disks`, where paths may hold ':')."""
    if not source or not guest_path:
        raise MatchlockError(f"invalid --disk {spec!r}", hint="give a source and a guest path")
    guest = check_guest_path(guest_path, f"--disk {spec!r}: guest path")
    volume = None
    if source.startswith("@"):
        volume = volumes.check_name(source[1:])
        path = volumes.path_of(volume)
        if not path.is_file():
            raise MatchlockError(f"--disk {spec!r}: named volume not found: {volume}",
                                 hint=f"create it with `matchlock volume create {volume}`")
    else:
        path = Path(os.path.abspath(os.path.join(cwd or os.getcwd(), source)))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise MatchlockError(f"--disk {spec!r}: host file {path} does not exist",
                                 hint="create an ext4 image (mkfs.ext4 FILE SIZE) or use "
                                 "a named volume (@NAME)") from None
        except OSError as e:
            raise MatchlockError(f"--disk {spec!r}: host file {path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise MatchlockError(f"--disk {spec!r}: {path} is not a regular file",
                                 hint="give an ext4 image file; block devices are refused")
    return DiskSpec(path=path, guest=guest, readonly=readonly, volume=volume, spec=spec)


def parse_disks(specs: Sequence[str], mounts: Sequence[MountSpec] = (),
                free_slots: int = TRANSPORTS - 3) -> tuple[DiskSpec, ...]:
    return check_disks(tuple(parse_disk(s) for s in specs), mounts, free_slots)


def check_disks(disks: tuple[DiskSpec, ...], mounts: Sequence[MountSpec] = (),
                free_slots: int = TRANSPORTS - 3) -> tuple[DiskSpec, ...]:
    """The set: within the free device slots, each file once, no shared or nested paths."""
    if len(disks) > free_slots:
        raise MatchlockError(f"{len(disks)} --disk given; this sandbox has room for "
                             f"{free_slots} (8 virtio devices, shared with the root disk, "
                             "the writable layer, the network and -v mounts)")
    seen: dict[tuple[int, int], DiskSpec] = {}
    for d in disks:
        st = os.stat(d.path)
        other = seen.setdefault((st.st_dev, st.st_ino), d)
        if other is not d:
            raise MatchlockError(f"--disk {d.spec!r} and --disk {other.spec!r} are the same "
                                 "file", hint="attach a file once")
    points = [(d.guest, f"--disk {d.spec!r}") for d in disks]
    points += [(m.guest, f"-v {m.spec!r}") for m in mounts]
    for i, (a, wa) in enumerate(points):
        for b, wb in points[i + 1:]:
            if a == b:
                raise MatchlockError(f"{wa} and {wb} use the same guest path {a}")
            for outer, wo, inner, wi in ((a, wa, b, wb), (b, wb, a, wa)):
                if inner.startswith(outer + "/"):
                    raise MatchlockError(f"{wi} is nested inside {wo}",
                                         hint="mount them side by side")
    return disks


def free_slots(network: bool, mounts: bool) -> int:
    return TRANSPORTS - 3 - (1 if network else 0) - (2 if mounts else 0)


def devices_key(disks: Sequence[DiskSpec]) -> str:
    """The slots' part of a template's machine shape: their count and read-only pattern."""
    return "+vol" + "".join("r" if d.readonly else "w" for d in disks) if disks else ""


def setup_field(slot: int, disk: DiskSpec) -> bytes:
    return struct.pack(">BB", slot, FLAG_RO if disk.readonly else 0) + disk.guest.encode()


@dataclass
class Disks:
    """The opened, locked disk files of one sandbox, and what QEMU and the agent are told."""

    specs: tuple[DiskSpec, ...]
    fds: list[int] = field(default_factory=list)

    @property
    def writable(self) -> bool:
        return any(not d.readonly for d in self.specs)

    def qemu_args(self) -> list[str]:
        args: list[str] = []
        for slot, d in enumerate(self.specs):
            ro = ",read-only=on" if d.readonly else ""
            args += ["-blockdev", f"driver=null-co,node-name=mlph{slot},size={SLOT_BYTES},"
                     f"read-zeroes=on{ro}",
                     "-blockdev", f"driver=raw,node-name=mlvol{slot},file=mlph{slot}{ro}",
                     # A full host disk is an I/O error in the guest, not a paused VM.
                     "-device", f"virtio-blk-device,drive=mlvol{slot},serial={serial(slot)},"
                     "werror=report,rerror=report"]
        return args

    @property
    def setup_fields(self) -> tuple[bytes, ...]:
        return tuple(setup_field(slot, d) for slot, d in enumerate(self.specs))

    def attach(self, qmp: Qmp) -> None:
        """Swap every slot's placeholder for its file (the VM must be running)."""
        for slot, (d, fd) in enumerate(zip(self.specs, self.fds, strict=True)):
            fdset = 100 + slot
            qmp.command("add-fd", fds=[fd], **{"fdset-id": fdset})
            ro = d.readonly
            node: dict[str, Any] = {"node-name": f"mlfile{slot}", "read-only": ro,
                                    "auto-read-only": False}
            qmp.command("blockdev-add", driver="file", filename=f"/dev/fdset/{fdset}", **node)
            qmp.command("blockdev-reopen", options=[{
                "driver": "raw", "node-name": f"mlvol{slot}", "file": f"mlfile{slot}",
                "read-only": ro}])
            placeholder: dict[str, Any] = {"node-name": f"mlph{slot}"}
            qmp.command("blockdev-del", **placeholder)

    def close(self) -> None:
        """Release the locks (call once the VMM, which shares them, is gone)."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def user_may(st: os.stat_result, write: bool, ids: tuple[int, int] | None = None) -> bool:
    """Whether the invoking user (under sudo: SUDO_UID/SUDO_GID, see mounts.owner_ids) could
    open the file so: a host file is attached with root's rights, which must not lend a user
    access to an image they could not open themselves."""
    from matchlock.sandbox.mounts import owner_ids

    uid, gid = ids or owner_ids()
    if uid == 0:
        return True
    if st.st_uid == uid:
        shift = 6
    elif st.st_gid in _groups(uid, gid):
        shift = 3
    else:
        shift = 0
    need = (0o6 if write else 0o4) << shift
    return st.st_mode & need == need


def _groups(uid: int, gid: int) -> set[int]:
    import pwd

    try:
        return {gid, *os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)}
    except KeyError:
        return {gid}


def open_disks(specs: Sequence[DiskSpec]) -> Disks:
    """Open and lock every file, all or nothing."""
    disks = Disks(tuple(specs))
    try:
        for d in specs:
            fd = volumes.open_locked(d.path, write=not d.readonly, what=d.what)
            disks.fds.append(fd)
            size = os.fstat(fd).st_size
            if size > SLOT_BYTES or size < 1 << 20:
                raise MatchlockError(f"{d.what}: {d.path} is {size} bytes; a disk must be "
                                     f"1 MiB to {SLOT_BYTES >> 30} GiB")
            if d.volume is None and not user_may(os.fstat(fd), write=not d.readonly):
                verb = "read" if d.readonly else "write"
                raise MatchlockError(f"{d.what}: you may not {verb} {d.path}",
                                     hint="matchlock opens disk files as root for you: only "
                                     "files your own user could open so are allowed")
            if not volumes.has_ext4_magic(fd):
                raise MatchlockError(f"{d.what}: {d.path} is not an ext4 image",
                                     hint="format it with mkfs.ext4, or use a named volume")
    except BaseException:
        disks.close()
        raise
    return disks
