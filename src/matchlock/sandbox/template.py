"""Snapshot templates: start a sandbox by restoring a VM that already booted, not booting one.

The first cold boot for a given machine shape (kernel, agent, QEMU, accelerator, memory,
vCPUs, devices) pauses right after the agent's HELLO, before it has touched any disk, and
saves itself: the device state (a small migration stream) and its RAM (copied sparsely from
the VMM's memfd). Later sandboxes of that shape map the RAM file privately (copy-on-write: no
copy, nothing shared is ever written) and load the device state, which takes tens of
milliseconds instead of a kernel boot.

What makes one snapshot valid for every image and sandbox:
- configuration reaches the agent after the restore, over the control channel (SETUP);
- disks are presented at fixed capacities, so the sizes the kernel probed at boot stay true,
  and the agent drops the block cache of each disk before mounting it;
- the agent reseeds the kernel RNG from fresh host entropy in SETUP, so clones share no
  random state from then on.

The VMM is confined (chroot into an empty directory, its own uid, seccomp without exec): the
owner opens the migration stream's file and hands QEMU the descriptor (`migrate "fd:..."`).
Templates are private to their owner: directories 0700, files 0600, and a template appears
only complete (written in a temporary directory, then renamed).

An *image template* goes one step further for one image (and writable-layer size): restored
from the generic template onto a shared copy of its RAM (`shared_ram`), or cold-booted, the
agent is sent PREPARE, which mounts that image's root under a fresh writable layer and starts
the sandbox init (and runs the warm-up command, `WARM_ARGV`), and the VM is saved again, with a
copy of its writable layer (`upper`). Its clones start with the root mounted: each gets its own
copy of that layer, so the guest's cached file-system state and the disk agree. Only sandboxes
without host mounts or extra disks use one (those are mounted before the root switch).
Everything per sandbox (clock, entropy and RNG reseed, hostname, network, CA) still comes after
the restore, in SETUP.

QEMU 7.2 opens the RAM file read-write (it has no read-only file with a private writable
mapping before 8.2's `rom=off`), so a compromised VMM could write to it. The `complete` marker
records the RAM file's size and ctime, which no write, truncation or timestamp change can leave
as it was: a template changed after it was saved is never restored again but rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from matchlock.image.store import ROOTFS_DEVICE_BYTES
from matchlock.paths import cache_dir
from matchlock.sandbox.disk import copy_data, sparse_copy
from matchlock.vm import qemu
from matchlock.vm.qmp import Qmp, QmpError

LAYOUT_VERSION = "1"
ROOT_DEVICE_BYTES = ROOTFS_DEVICE_BYTES  # the image store pads every rootfs to it
UPPER_DEVICE_BYTES = 1 << 40
_MIGRATION_TIMEOUT_S = 30.0
_STREAM_FD = "matchlock-migration"


@dataclass(frozen=True)
class Template:
    dir: Path

    @property
    def ram(self) -> Path:
        return self.dir / "ram"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def upper(self) -> Path:
        """An image template's writable layer as it was when saved (absent otherwise)."""
        return self.dir / "upper"


def enabled() -> bool:
    return os.environ.get("MATCHLOCK_SNAPSHOTS", "1") != "0"


# What an image template runs once before it is saved (PREPARE's warm-up; docs/architecture.md,
# "Image templates"): the image's Python, if it has one, started as every `python3` starts. Its
# libraries and start-up modules are then in each clone's page cache, and the bytecode of those
# modules in its writable layer when the image ships them without (as the official Python
# images do: each start would compile them again, ~0.2 s under TCG). -I: the image's
# environment and directories play no part, so what is written is what Python writes for a
# plain start. An image without python3 costs one failed exec, once.
WARM_ARGV = ("python3", "-I", "-c", "pass")


def warm_command() -> tuple[str, ...]:
    """The warm-up command of new image templates; MATCHLOCK_TEMPLATE_WARM=0 turns it off."""
    return () if os.environ.get("MATCHLOCK_TEMPLATE_WARM", "1") == "0" else WARM_ARGV


def key(boot_key: str, accel: str, vcpus: int, memory_mb: int, devices: str) -> str:
    binary = shutil.which(qemu.QEMU_BINARY) or qemu.QEMU_BINARY
    try:
        st = os.stat(binary)
        qemu_id = f"{st.st_size}-{st.st_mtime_ns}"
    except OSError:
        qemu_id = "missing"
    parts = [LAYOUT_VERSION, boot_key, accel, str(vcpus), str(memory_mb), devices, qemu_id,
             qemu.kernel_cmdline(accel), " ".join(qemu.accel_args(accel))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def image_key(tkey: str, rootfs: Path, upper_mb: int, warm: tuple[str, ...] = ()) -> str:
    """The image template of machine shape `tkey` for one root file system (the very file:
    a rebuilt rootfs is a new inode), one writable-layer size and one warm-up command."""
    st = rootfs.stat()
    parts = [tkey, "image", str(rootfs.resolve()), str(st.st_dev), str(st.st_ino),
             str(st.st_size), str(st.st_mtime_ns), str(upper_mb), *warm]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def _root() -> Path:
    root = cache_dir() / "templates"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(root.stat().st_mode) != 0o700:
        os.chmod(root, 0o700)
    return root


def find(tkey: str) -> Template | None:
    t = Template(_root() / tkey)
    try:
        mode = stat.S_IMODE(t.dir.stat().st_mode)
    except FileNotFoundError:
        return None
    if mode & 0o077:
        discard(t)  # written by an older version, readable by others: rebuilt once
        return None
    try:
        recorded = (t.dir / "complete").read_text()
        current = _identity(t)
    except FileNotFoundError:
        return None  # being written, or removed
    if recorded != current:
        discard(t)  # changed since it was saved (or saved by an older version)
        return None
    return t


def _identity(t: Template) -> str:
    """Size and ctime of the RAM file (and of the writable layer, when there is one)."""
    out = ""
    for f in (t.ram, t.upper):
        try:
            st = f.stat()
        except FileNotFoundError:
            if f == t.ram:
                raise
            continue
        out += f"{st.st_size} {st.st_ctime_ns}\n"
    return out


def discard(t: Template) -> None:
    shutil.rmtree(t.dir, ignore_errors=True)


def _memfd_of(pid: int, size: int) -> Path:
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("/memfd:") and entry.stat().st_size == size:
            return entry
    raise QmpError("cannot find the VM's memory to snapshot it")


def shared_ram(t: Template) -> int:
    """A memfd holding a copy of `t`'s RAM (its data regions; holes stay holes), for a VM that
    will be saved as an image template: mapped shared, its pages stay out of the migration
    stream (x-ignore-shared leaves shared RAM out, and QEMU 7.2 has no such switch for a private
    mapping), and the new template's RAM is copied from it as after a cold boot. Restored from
    the private mapping instead, the stream held every page the VM had (~40 MB) and each clone
    loaded them all into memory of its own: restore ~100-140 ms instead of ~30-50 under TCG."""
    fd = os.memfd_create("matchlock-ram", os.MFD_CLOEXEC)
    try:
        with open(t.ram, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            os.ftruncate(fd, size)
            copy_data(src.fileno(), fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create_private(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                   0o600)


def save(qmp: Qmp, pid: int, tkey: str, memory_mb: int, *, upper: Path | None = None,
         rootfs: Path | None = None) -> Template:
    """Snapshot a running VM (paused meanwhile) as the template `tkey`: a VM whose RAM is a
    memfd (cold-booted, or restored onto `shared_ram`). `upper`: the VM's writable layer,
    copied along, and `rootfs` the image's root (an image template: dropped, like every other
    image template, once that file is gone or replaced)."""
    root = _root()
    tmp = root / f".{tkey}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    qmp.command("stop")
    try:
        qmp.command("migrate-set-capabilities",
                    capabilities=[{"capability": "x-ignore-shared", "state": True}])
        fd = _create_private(tmp / "state")
        try:
            qmp.send_fd(_STREAM_FD, fd)
        finally:
            os.close(fd)  # QEMU holds its own copy and closes it when the stream ends
        qmp.command("migrate", uri=f"fd:{_STREAM_FD}")
        _wait_migrated(qmp)
        # The RAM must be copied while the VM is still stopped, or it would not match the state;
        # so must the writable layer (QEMU writes it through with cache=unsafe: no cache of
        # its own once stopped).
        sparse_copy(_memfd_of(pid, memory_mb << 20), tmp / "ram", mode=0o600)
        if upper is not None:
            sparse_copy(upper, tmp / "upper", mode=0o600)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        qmp.command("cont")
    if rootfs is not None:
        fd = _create_private(tmp / "image")
        try:
            os.write(fd, _rootfs_identity(rootfs).encode())
        finally:
            os.close(fd)
    fd = _create_private(tmp / "complete")
    try:
        os.write(fd, _identity(Template(tmp)).encode())
    finally:
        os.close(fd)
    final = root / tkey
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another sandbox saved the same shape first
    if rootfs is not None:
        prune_images()
    return Template(final)


def _rootfs_identity(rootfs: Path) -> str:
    st = rootfs.stat()
    return f"{rootfs.resolve()}\n{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns}\n"


def prune_images() -> int:
    """Delete the image templates whose root file system is gone or was replaced (an image
    removed or pulled again): nothing would ever restore them. Returns how many."""
    dropped = 0
    for d in _root().iterdir():
        try:
            path, _, _ = (d / "image").read_text().partition("\n")
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            current = _rootfs_identity(Path(path))
        except OSError:
            current = ""
        if current != (d / "image").read_text():
            discard(Template(d))
            dropped += 1
    return dropped


def restore(qmp: Qmp, t: Template) -> None:
    """Load a template into a VMM started with `incoming` and its RAM file; then run it."""
    qmp.command("migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": True}])
    try:
        fd = os.open(t.state, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise QmpError(f"cannot open the snapshot: {e}") from None
    try:
        qmp.send_fd(_STREAM_FD, fd)
    finally:
        os.close(fd)
    qmp.command("migrate-incoming", uri=f"fd:{_STREAM_FD}")
    _wait_paused(qmp)
    qmp.command("cont")


def _wait_migrated(qmp: Qmp) -> None:
    deadline = time.monotonic() + _MIGRATION_TIMEOUT_S
    while True:
        status = qmp.command("query-migrate").get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled", None):
            raise QmpError(f"saving the snapshot ended as {status}")
        if time.monotonic() > deadline:
            raise QmpError("saving the snapshot timed out")
        time.sleep(0.002)


def _wait_paused(qmp: Qmp) -> None:
    deadline = time.monotonic() + _MIGRATION_TIMEOUT_S
    while True:
        status = qmp.command("query-status").get("status")
        if status == "paused":
            return
        if status != "inmigrate":
            raise QmpError(f"the restored VM is {status}, not paused")
        if time.monotonic() > deadline:
            raise QmpError("restoring the snapshot timed out")
        time.sleep(0.002)


def remove_all() -> int:
    """Delete every template (they are rebuilt on demand); returns the bytes freed."""
    root = _root()
    freed = 0
    if root.exists():
        for t in root.iterdir():
            for f in t.rglob("*"):
                if f.is_file():
                    freed += f.stat().st_blocks * 512
            shutil.rmtree(t, ignore_errors=True)
    return freed
