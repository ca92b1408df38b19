"""Host folders and files in the guest: `-v HOST:GUEST[:ro|overlay|host_fs]`.

Transport: QEMU's virtio-9p (`-fsdev local`), served by the (confined) VMM itself. Every
sandbox with mounts gets the same two share devices whatever the number of mounts, `ml0`
(read-only: `ro` and `overlay` mounts) and `ml1` (read-write: `host_fs`), so one snapshot
template serves every set of mounts, and microvm's eight virtio-mmio transports suffice. Runs
without mounts keep their machine shape (and template) as before.

Each share's root is a tiny detached tmpfs (`fsopen`/`fsmount`: in no mount namespace, gone
when its last descriptor closes, so nothing is ever left in the host's mount table, even after
SIGKILL); entry N in it is the N-th host path, attached as a detached mount of its own
(`open_tree(OPEN_TREE_CLONE)`; a single file is attached on an empty file) with:

- an id map (`MOUNT_ATTR_IDMAP`): the invoking user's uid/gid (SUDO_UID/SUDO_GID under sudo)
  appear as the VMM's per-sandbox uid/gid. The unprivileged VMM can then read and write what
  the user can, and whatever it creates is owned on the host by the user, never by root or by
  the VMM's uid. Files of other users keep their "other" permission bits only;
- `MOUNT_ATTR_RDONLY` for `ro` and `overlay` (on top of QEMU's `readonly=on` for `ml0` and a
  read-only 9p mount in the guest); `nosuid`, `nodev` always.

QEMU opens the share as `/proc/self/fd/N` during start-up, before it chroots and drops to its
uid; 9p then resolves every guest path relative to that directory, one component at a time
with O_NOFOLLOW, and never crosses above it. QEMU 7.2's 9p changes modes through
/proc/self/fd, so a VMM with mounts is chrooted into `share_root()` with a /proc of its own
(see vm/vmm_exec.py).

The guest side (agent, SETUP tag MOUNT): `ro` and `host_fs` bind the 9p entry at the guest
path; `overlay` puts an overlayfs on it whose upper layer is on the sandbox's writable disk
(for a file: a copy on that disk), so the guest may write, and the host never sees it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import posixpath
import re
import shutil
import stat
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matchlock.errors import MatchlockError

MAX_MOUNTS = 16
# Two share devices whatever the number of mounts (microvm has 8 virtio-mmio transports, 4
# of them already taken): ml0 read-only (ro and overlay mounts), ml1 read-write (host_fs).
SHARE_RO, SHARE_RW = 0, 1
DEVICES = "+9p2"  # part of the template's machine-shape key
MODES = {"ro": 0, "overlay": 1, "host_fs": 2}
_ALIASES = {"readonly": "ro"}
KIND_DIR, KIND_FILE = 0, 1
DEFAULT_WORKSPACE = "/workspace"
_GUEST_PATH = re.compile(r"^/[A-Za-z0-9/_.@+-]+$")
# Guest paths a mount may not be on or under: the kernel's and the agent's own.
_RESERVED = ("/proc", "/sys", "/dev")


def tag(slot: int) -> str:
    return f"ml{slot}"


@dataclass(frozen=True)
class MountSpec:
    host: Path  # absolute
    guest: str  # absolute, normalised
    mode: str  # ro | overlay | host_fs
    spec: str = ""  # as the user wrote it, for messages


# --- parsing (pure but for the host path checks) -------------------------------------------


def check_guest_path(path: str, what: str) -> str:
    if not path.startswith("/"):
        raise MatchlockError(f"{what} {path!r} is not an absolute guest path",
                             hint="write it from the guest's root, e.g. /workspace/src")
    if ".." in path.split("/"):
        raise MatchlockError(f"{what} {path!r} contains '..'", hint="give a plain absolute path")
    norm = posixpath.normpath(path)
    if norm == "/":
        raise MatchlockError(f"{what} {path!r} is the guest's root", hint="mount below it")
    if not _GUEST_PATH.match(path):
        raise MatchlockError(f"{what} {path!r} has characters other than letters, digits "
                             "and / _ . @ + -")
    for r in _RESERVED:
        if norm == r or norm.startswith(r + "/"):
            raise MatchlockError(f"{what} {path!r} is inside {r}, which the guest kernel owns")
    return norm


def parse_volume(spec: str, workspace: str, cwd: str | None = None) -> MountSpec:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise MatchlockError(f"invalid -v {spec!r}",
                             hint="use HOST:GUEST[:ro|overlay|host_fs] (no ':' in paths)")
    mode = parts[2].lower() if len(parts) == 3 else "overlay"
    mode = _ALIASES.get(mode, mode)
    if mode not in MODES:
        raise MatchlockError(f"invalid -v {spec!r}: unknown option {parts[2]!r}",
                             hint="use 'ro', 'overlay' or 'host_fs'")
    guest = check_guest_path(parts[1], f"-v {spec!r}: guest path")
    if guest != workspace and not guest.startswith(workspace + "/"):
        raise MatchlockError(f"-v {spec!r}: guest path {guest} is not within the workspace "
                             f"{workspace}", hint="mount below --workspace, or change it")
    host = Path(os.path.abspath(os.path.join(cwd or os.getcwd(), parts[0])))
    try:
        st = os.stat(host)
    except FileNotFoundError:
        raise MatchlockError(f"-v {spec!r}: host path {host} does not exist") from None
    except OSError as e:
        raise MatchlockError(f"-v {spec!r}: host path {host}: {e.strerror}") from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise MatchlockError(f"-v {spec!r}: host path {host} is neither a directory nor a "
                             "regular file")
    return MountSpec(host=host, guest=guest, mode=mode, spec=spec)


def parse_mounts(volumes: Sequence[str], workspace: str | None) -> tuple[MountSpec, ...]:
    """Validate `--workspace` and every `-v` before anything is created."""
    if workspace is not None and not volumes:
        raise MatchlockError("--workspace needs at least one -v HOST:GUEST")
    ws = check_guest_path(workspace or DEFAULT_WORKSPACE, "--workspace")
    specs = tuple(parse_volume(v, ws) for v in volumes)
    if len(specs) > MAX_MOUNTS:
        raise MatchlockError(f"{len(specs)} -v mounts given; at most {MAX_MOUNTS} are supported")
    for i, a in enumerate(specs):
        for b in specs[i + 1:]:
            if a.guest == b.guest:
                raise MatchlockError(f"-v {a.spec!r} and -v {b.spec!r} mount on the same "
                                     f"guest path {a.guest}")
            for outer, inner in ((a, b), (b, a)):
                if inner.guest.startswith(outer.guest + "/"):
                    raise MatchlockError(f"-v {inner.spec!r} is nested inside -v {outer.spec!r}",
                                         hint="mount them side by side")
    return specs


# --- the host side: detached, idmapped mounts handed to QEMU ---------------------------------


def share_root(base: Path | None = None) -> Path:
    """The VMM's root when it serves mounts: root's, read-only, holding one empty `proc`
    directory (QEMU mounts its restricted /proc there, in a mount namespace of its own)."""
    from matchlock.paths import runtime_dir
    from matchlock.vm.confine import private_dir, root_owned_dir

    root = (base or runtime_dir()) / "vmm-root-shares"
    private_dir(root.parent)
    for d in (root, root / "proc"):
        root_owned_dir(d)
    if os.listdir(root) != ["proc"] or os.listdir(root / "proc"):
        raise MatchlockError(f"the VMM's root {root} holds more than an empty proc/",
                             hint="someone put files in it: inspect, then remove it")
    return root

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 428, 429, 430, 431, 432
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 1, 6
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_MOUNT_ATTR_NOEXEC, _MOUNT_ATTR_IDMAP = 0x8, 0x100000
FILE_NAME = "file"


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _syscall(nr: int, *args: object) -> int:
    r = int(_libc.syscall(nr, *args))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def _clone_tree(fd: int) -> int:
    return _syscall(_SYS_OPEN_TREE, fd, b"", _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_EMPTY_PATH)


def _set_attrs(fd: int, attrs: int, userns_fd: int = 0) -> None:
    a = _MountAttr(attrs, 0, 0, userns_fd)
    _syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, ctypes.byref(a), ctypes.sizeof(a))


def owner_ids() -> tuple[int, int]:
    """Whose files the guest's new files become: the invoking user (under sudo, SUDO_UID)."""
    if os.geteuid() == 0:
        uid, gid = os.environ.get("SUDO_UID", ""), os.environ.get("SUDO_GID", "")
        if uid.isdigit() and gid.isdigit():
            return int(uid), int(gid)
    return os.getuid(), os.getgid()


def _idmap_userns(owner: tuple[int, int], vmm: tuple[int, int]) -> int:
    """A user namespace that maps the owner's ids on disk to the VMM's ids, as an fd."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise MatchlockError("mounts need util-linux's unshare", hint="apt-get install util-linux")
    proc = subprocess.Popen([unshare, "--user", "--", "sleep", "60"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ours = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(OSError):
                exe = os.readlink(f"/proc/{proc.pid}/exe")
                if os.readlink(f"/proc/{proc.pid}/ns/user") != ours and "sleep" in exe:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise MatchlockError("could not create the user namespace for a mount's id map")
            time.sleep(0.001)
        for name, (disk_id, vmm_id) in (("uid_map", (owner[0], vmm[0])),
                                        ("gid_map", (owner[1], vmm[1]))):
            with open(f"/proc/{proc.pid}/{name}", "w") as f:
                f.write(f"{disk_id} {vmm_id} 1\n")
        return os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        proc.kill()
        proc.wait()


@dataclass
class Shares:
    """What a sandbox's VMM needs for its mounts, and what SETUP tells the agent."""

    qemu_args: list[str] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    setup_fields: tuple[bytes, ...] = ()

    def close(self) -> None:
        """After QEMU opened its exports; nothing stays mounted once every holder is closed."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def setup_field(share: int, entry: int, spec: MountSpec, kind: int) -> bytes:
    return struct.pack(">BBBB", share, MODES[spec.mode], kind, entry) + spec.guest.encode()


def prepare(specs: Sequence[MountSpec], runas: tuple[int, int] | None) -> Shares:
    """Open every host path and build the two share devices: the caller closes what this
    returns once QEMU has started (on error, what was opened is closed here)."""
    if runas is None:
        raise MatchlockError("-v needs matchlock to run as root",
                             hint="mounts are served through idmapped mounts of the host path")
    shares = Shares()
    userns = -1
    fields: list[bytes] = []
    try:
        userns = _idmap_userns(owner_ids(), runas)
        holders = [_holder(), _holder()]
        shares.fds += holders
        for entry, spec in enumerate(specs):
            share = SHARE_RW if spec.mode == "host_fs" else SHARE_RO
            kind = _attach(spec, userns, holders[share], str(entry))
            fields.append(setup_field(share, entry, spec, kind))
        for share, holder in enumerate(holders):
            _set_attrs(holder, _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
                       | _MOUNT_ATTR_NOEXEC)
            shares.qemu_args += _device(share, f"/proc/self/fd/{holder}",
                                        readonly=share == SHARE_RO)
    except OSError as e:
        shares.close()
        raise MatchlockError(f"cannot prepare the mounts: {e.strerror or e}") from None
    except BaseException:
        shares.close()
        raise
    finally:
        if userns >= 0:
            os.close(userns)
    shares.setup_fields = tuple(fields)
    return shares


def _holder() -> int:
    """A small detached tmpfs (in no mount namespace) that the mounts are attached in."""
    fs = _syscall(_SYS_FSOPEN, b"tmpfs", 1)  # FSOPEN_CLOEXEC
    try:
        for k, v in ((b"mode", b"0755"), (b"size", b"64k"), (b"nr_inodes", b"256")):
            _syscall(_SYS_FSCONFIG, fs, _FSCONFIG_SET_STRING, k, v, 0)
        _syscall(_SYS_FSCONFIG, fs, _FSCONFIG_CMD_CREATE, None, None, 0)
        return _syscall(_SYS_FSMOUNT, fs, 1, 0)  # FSMOUNT_CLOEXEC
    finally:
        os.close(fs)


def _attach(spec: MountSpec, userns: int, holder: int, name: str) -> int:
    """Attach the host path, as an idmapped detached mount, at `name` in the holder."""
    try:
        fd = os.open(spec.host, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise MatchlockError(f"-v {spec.spec!r}: cannot open {spec.host}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            kind = KIND_DIR
            os.mkdir(name, 0o755, dir_fd=holder)
        elif stat.S_ISREG(st.st_mode):
            kind = KIND_FILE
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644,
                             dir_fd=holder))
        else:
            raise MatchlockError(f"-v {spec.spec!r}: {spec.host} is neither a directory nor a "
                                 "regular file")
        tree = _clone_tree(fd)
    finally:
        os.close(fd)
    try:
        attrs = _MOUNT_ATTR_IDMAP | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
        if spec.mode != "host_fs":
            attrs |= _MOUNT_ATTR_RDONLY
        try:
            _set_attrs(tree, attrs, userns)
        except OSError as e:
            if e.errno == 22:  # EINVAL: a file system that cannot be idmapped
                raise MatchlockError(f"-v {spec.spec!r}: the file system of {spec.host} does "
                                     "not support idmapped mounts") from None
            raise
        _syscall(_SYS_MOVE_MOUNT, tree, b"", holder, name.encode(), _MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(tree)
    return kind


def _device(share: int, path: str, readonly: bool) -> list[str]:
    fsdev = (f"local,id=share{share},path={path},security_model=none,multidevs=remap"
             + (",readonly=on" if readonly else ""))
    return ["-fsdev", fsdev,
            "-device", f"virtio-9p-device,fsdev=share{share},mount_tag={tag(share)}"]
