"""Confinement of the VMM, after Firecracker's jailer: seccomp, an unprivileged uid, an empty root.

QEMU is started as root (it must open /dev/kvm, the disks, the template's RAM file and the
console log, and a chroot needs root) and confines itself at the end of its start-up, before
the guest runs a single instruction or a migration stream is read:

- `-chroot` into an empty, root-owned, read-only directory: after start-up the VMM sees no
  host file; anything it needs later comes in as a file descriptor (QMP `getfd`);
- `-runas UID:GID` with a uid/gid of its own per sandbox, so that two VMMs cannot signal or
  ptrace each other and own no file anywhere (no capabilities are left after the switch);
- `-sandbox on,...`: QEMU's seccomp filter (no exec/fork, obsolete or resource-control calls).

QEMU 7.2 applies its seccomp filter early, so `elevateprivileges=deny` would kill QEMU in its
own `-runas` (SIGSYS in setgid). The filter built here, installed before exec, takes that
role: the only credential changes it lets through are the exact ones `-runas UID:GID` makes;
any other set*id call fails or kills the process.

The uid change also clears PR_SET_PDEATHSIG, which tied the VMM's life to its owner's. The
VMM is therefore made the leader of a session whose controlling terminal is a pseudo-terminal
held by the owner: when the owner dies (even by SIGKILL) the kernel hangs that terminal up and
sends the VMM SIGHUP, on which QEMU exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from matchlock.errors import MatchlockError
from matchlock.paths import runtime_dir

# A range that no distribution or systemd hands out (systemd's UIDS-GIDS.md lists
# 1879048192-2147352575 as unused); one uid and gid per concurrently running sandbox.
UID_BASE = 1_900_000_000
UID_SLOTS = 65536
SECCOMP_OPTIONS = "obsolete=deny,spawn=deny,resourcecontrol=deny"


def enabled() -> bool:
    """The uid drop and the chroot need root; unprivileged owners' VMMs already run as them."""
    return os.geteuid() == 0


def sandbox_arg(drops_privileges: bool) -> str:
    # With -runas, QEMU's own elevateprivileges=deny would kill it during the drop: our
    # set*id filter (setid_filter) stands in for it.
    elevate = "allow" if drops_privileges else "deny"
    return f"on,{SECCOMP_OPTIONS},elevateprivileges={elevate}"


# --- the empty root ------------------------------------------------------------------------


def private_dir(path: Path) -> None:
    """A directory of this user's that nobody else may enter (made if missing)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise MatchlockError(f"{path} is not a directory owned by this user",
                             hint="remove it; matchlock recreates it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def root_owned_dir(path: Path) -> None:
    """A directory of root's that nobody can write (made if missing): what a VMM's chroot
    and the directories in it must be, so the unprivileged VMM can change nothing there."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o555)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise MatchlockError(f"{path} (for the VMM's root) is not a directory owned by root",
                             hint="remove it; matchlock recreates it")
    if stat.S_IMODE(st.st_mode) != 0o555:
        os.chmod(path, 0o555)


def root_path(base: Path | None = None) -> Path:
    return (base or runtime_dir()) / "vmm-root"


def empty_root(base: Path | None = None) -> Path:
    """The VMM's root after start-up: an empty directory, root's, that nobody can write."""
    root = root_path(base)
    private_dir(root.parent)
    root_owned_dir(root)
    if os.listdir(root):
        raise MatchlockError(f"the VMM's root {root} is not empty",
                             hint="someone put files in it: inspect, then remove it")
    return root


# --- per-sandbox user ids ------------------------------------------------------------------


@dataclass
class VmmIdentity:
    """A uid/gid reserved for one sandbox's VMM while the owner holds `_fd`'s lock."""

    uid: int
    gid: int
    _path: Path
    _fd: int = field(repr=False)

    def release(self) -> None:
        """Free the ids; only once the VMM has exited (reaped)."""
        if self._fd >= 0:
            # Unlinked while still locked: whoever opened the old file before the unlink sees
            # that it is no longer the file at the path, and retries.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            os.close(self._fd)
            self._fd = -1


def acquire_identity(base: Path | None = None) -> VmmIdentity:
    """Reserve a free uid/gid (host-wide: a lock file per slot under the runtime dir).

    The search starts at a random slot, so a uid is seldom handed out again soon after its
    sandbox ended (a VMM whose owner was SIGKILLed exits on SIGHUP a moment later)."""
    import secrets  # here: random, base64 and hmac are not for every CLI start-up

    ids = (base or runtime_dir()) / "vmm-ids"
    private_dir(ids)
    start = secrets.randbelow(UID_SLOTS)
    for i in range(UID_SLOTS):
        slot = (start + i) % UID_SLOTS
        path = ids / str(slot)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.fstat(fd)
            now = os.stat(path, follow_symlinks=False)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                return VmmIdentity(UID_BASE + slot, UID_BASE + slot, path, fd)
        except (BlockingIOError, FileNotFoundError):
            pass
        os.close(fd)
    raise MatchlockError("no free user id for another VMM",
                         hint=f"{UID_SLOTS} sandboxes are running on this host")


def remove_stale_ids(base: Path | None = None) -> int:
    """Delete the slot files nobody holds (an owner killed by SIGKILL leaves its file behind,
    unlocked); for `matchlock gc`, after it has killed orphaned VMMs. Returns how many."""
    ids = (base or runtime_dir()) / "vmm-ids"
    if not ids.is_dir():
        return 0
    removed = 0
    for path in ids.iterdir():
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.fstat(fd)
            now = os.stat(path, follow_symlinks=False)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                os.unlink(path)  # while locked, as release() does
                removed += 1
        except (BlockingIOError, FileNotFoundError):
            pass
        finally:
            os.close(fd)
    return removed


# --- the set*id filter ---------------------------------------------------------------------

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_NR_SETUID, _NR_SETGID, _NR_SETGROUPS = 105, 106, 116
# The rest of what QEMU's elevateprivileges=deny forbids (x86_64 numbers): setpgid, setsid,
# setreuid, setregid, setresuid, setresgid, setfsuid, setfsgid.
_NR_DENIED = (109, 112, 113, 114, 117, 119, 122, 123)

_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
# struct seccomp_data: nr (u32), arch (u32), instruction_pointer (u64), args[6] (u64).
_OFF_NR, _OFF_ARCH, _OFF_ARG0_LO, _OFF_ARG0_HI = 0, 4, 16, 20

_Insn = tuple[int, str | int, str | int, int]  # code, jump-if-true, jump-if-false, k


def _assemble(program: list[_Insn | str]) -> bytes:
    """Classic BPF with symbolic jump targets: a str item is a label, a str jt/jf a target."""
    labels: dict[str, int] = {}
    insns: list[_Insn] = []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    out = bytearray()
    for pc, (code, jt, jf, k) in enumerate(insns):
        def rel(target: str | int, pc: int = pc) -> int:
            off = labels[target] - pc - 1 if isinstance(target, str) else target
            if not 0 <= off <= 255:
                raise ValueError(f"BPF jump out of range at {pc}")
            return off
        out += struct.pack("<HBBI", code, rel(jt), rel(jf), k)
    return bytes(out)


def setid_filter(uid: int, gid: int) -> bytes:
    """seccomp program: setuid(uid), setgid(gid) and setgroups(1, ...) pass (what QEMU's
    `-runas uid:gid` calls; after it, the process holds no capability, so they can only repeat
    the same ids), any other setuid/setgid/setgroups fails with EPERM (QEMU checks that
    setuid(0) fails), and the other set*id calls, another ABI, or x32, kill the process."""
    program: list[_Insn | str] = [
        (_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_JEQ_K, 0, "kill", _AUDIT_ARCH_X86_64),
        (_LD_W_ABS, 0, 0, _OFF_NR),
        (_JGE_K, "kill", 0, _X32_SYSCALL_BIT),
        (_JEQ_K, "uid", 0, _NR_SETUID),
        (_JEQ_K, "gid", 0, _NR_SETGID),
        (_JEQ_K, "groups", 0, _NR_SETGROUPS),
        *[(_JEQ_K, "kill", 0, nr) for nr in _NR_DENIED],
        (_RET_K, 0, 0, _RET_ALLOW),
    ]
    for label, want in (("uid", uid), ("gid", gid), ("groups", 1)):
        program += [
            label,
            (_LD_W_ABS, 0, 0, _OFF_ARG0_LO),
            (_JEQ_K, 0, "eperm", want),
            (_LD_W_ABS, 0, 0, _OFF_ARG0_HI),
            (_JEQ_K, "allow", "eperm", 0),
        ]
    program += [
        "allow", (_RET_K, 0, 0, _RET_ALLOW),
        "eperm", (_RET_K, 0, 0, _RET_ERRNO | errno.EPERM),
        "kill", (_RET_K, 0, 0, _RET_KILL_PROCESS),
    ]
    return _assemble(program)


def filter_supported() -> bool:
    return platform.machine() == "x86_64"


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


class PreparedFilter:
    """A filter laid out in memory before fork, so the child only makes two prctl calls."""

    def __init__(self, program: bytes) -> None:
        self._buf = ctypes.create_string_buffer(program, len(program))
        self._prog = _SockFprog(len(program) // 8, ctypes.addressof(self._buf))
        self._libc = ctypes.CDLL(None, use_errno=True)

    def install(self) -> None:
        """In the child, before exec: no_new_privs (required) then the filter."""
        if self._libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if self._libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER,
                            ctypes.byref(self._prog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
