"""The guest kernel: a minimal Linux 6.1 built from Debian's linux-source-6.1, cached by content.

Stock distribution kernels boot more than twice as slowly under TCG and need their virtio drivers
loaded as modules, so matchlock builds its own (see docs/performance.md, "Guest kernel"). The
build is keyed by the config fragment and the build recipe, so editing the fragment produces a
new kernel next to the old one. The linux-source version it was built from is recorded beside
it: `setup` rebuilds when that package was upgraded, while `run` never depends on the source
package still being installed (nor pays for asking dpkg on every start).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from matchlock import paths
from matchlock.errors import MatchlockError, SetupMissing

KERNEL_SERIES = "6.1"
CONFIG_FRAGMENT = Path(__file__).parent / "kernel" / f"minimal-{KERNEL_SERIES}.config"
SOURCE_PACKAGE = f"linux-source-{KERNEL_SERIES}"
SOURCE_TARBALL = Path("/usr/src") / f"{SOURCE_PACKAGE}.tar.xz"

# Part of the cache key: bump it when a change to the build steps below changes the vmlinux
# they produce, so existing caches are not reused.
_RECIPE_VERSION = "1"

_INSTALL_HINT = f"fix: apt-get install {SOURCE_PACKAGE} build-essential flex bison libelf-dev bc"

# The unpacked tree is ~1.4 GB and the objects add a few hundred MB; failing up front beats
# failing four minutes into the build with ENOSPC.
_MIN_FREE_BYTES = 3 << 30

# Long steps report this often so a user watching the log can tell the build is alive.
_PROGRESS_INTERVAL_S = 30.0

_ELF_PT_NOTE = 4
# The PVH entry point QEMU jumps to when given an uncompressed vmlinux (-kernel vmlinux).
_XEN_ELFNOTE_PHYS32_ENTRY = 18

_Y_LINE = re.compile(r"^(CONFIG_\w+)=y\s*$")
_OFF_LINE = re.compile(r"^# (CONFIG_\w+) is not set\s*$")
_ASSIGN_LINE = re.compile(r"^(CONFIG_\w+)=(.*)$")


def kernel_key() -> str:
    """Short content hash naming one kernel build: fragment + linux-source version + recipe."""
    h = hashlib.sha256()
    h.update(f"recipe={_RECIPE_VERSION}\0series={KERNEL_SERIES}\0".encode())
    h.update(CONFIG_FRAGMENT.read_bytes())
    return h.hexdigest()[:16]


def cached_kernel() -> Path | None:
    """The kernel to boot without building: $MATCHLOCK_KERNEL, else a finished cached build."""
    override = os.environ.get("MATCHLOCK_KERNEL")
    if override and Path(override).is_file():
        return Path(override)
    built = _kernel_root() / kernel_key() / "vmlinux"
    return built if built.is_file() else None


def build_kernel(log: Callable[[str], None]) -> Path:
    """Build (or reuse) the cached minimal kernel and return the path of its stripped vmlinux.

    Concurrent callers serialize on a per-key lock; the loser finds the winner's result.
    """
    key = kernel_key()
    root = _kernel_root()
    target = root / key / "vmlinux"
    if target.is_file() and not _source_upgraded(target):
        return target
    _check_prerequisites()
    root.mkdir(parents=True, exist_ok=True)
    _check_free_space(root)
    with _exclusive_lock(root / f"{key}.lock", log):
        if target.is_file() and not _source_upgraded(target):
            log(f"guest kernel {key} was built by another process")
            return target
        # Holding the lock means no live build of this key exists, so these are leftovers of
        # a build that was killed.
        for stale in root.glob(f"build-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        workdir = Path(tempfile.mkdtemp(prefix=f"build-{key}-", dir=root))
        try:
            _build(workdir, key, target, log)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return target


def _source_upgraded(target: Path) -> bool:
    """True when the installed linux-source differs from the one the cached kernel came from."""
    current = _source_version()
    if current == "missing":
        return False
    try:
        built_from = (target.parent / "source-version").read_text().strip()
    except OSError:
        return True
    return built_from != current


def _kernel_root() -> Path:
    return paths.cache_dir() / "kernel"


def _source_version() -> str:
    try:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        proc = None
    if proc is not None and proc.returncode == 0 and proc.stdout.strip():
        return proc.stdout.strip()
    # Not installed through dpkg (or no dpkg): the tarball's identity still changes when it is
    # replaced, which is all the key needs.
    try:
        st = SOURCE_TARBALL.stat()
    except OSError:
        return "missing"
    return f"size={st.st_size},mtime_ns={st.st_mtime_ns}"


def _check_prerequisites() -> None:
    if platform.machine() not in ("x86_64", "AMD64"):
        raise SetupMissing(
            f"building the guest kernel needs an x86_64 host (this is {platform.machine()})",
            hint="set MATCHLOCK_KERNEL to a prebuilt x86_64 vmlinux",
        )
    if not SOURCE_TARBALL.is_file():
        raise SetupMissing(f"kernel source {SOURCE_TARBALL} not found", hint=_INSTALL_HINT)
    missing = [
        tool
        for tool in ("make", "gcc", "ld", "strip", "flex", "bison", "bc", "tar", "xz")
        if shutil.which(tool) is None
    ]
    # objtool (always built for x86_64) links against libelf; without the header the build
    # fails minutes in with a compiler error that does not name the package.
    if not any(Path(p).is_file() for p in ("/usr/include/libelf.h", "/usr/include/gelf.h")):
        missing.append("libelf headers")
    if missing:
        raise SetupMissing(
            f"cannot build the guest kernel, missing: {', '.join(missing)}", hint=_INSTALL_HINT
        )


def _check_free_space(root: Path) -> None:
    free = shutil.disk_usage(root).free
    if free < _MIN_FREE_BYTES:
        raise SetupMissing(
            f"building the guest kernel needs {_MIN_FREE_BYTES >> 30} GiB free under {root}, "
            f"only {free / (1 << 30):.1f} GiB available",
            hint="free some space or point MATCHLOCK_CACHE_DIR elsewhere",
        )


@contextmanager
def _exclusive_lock(lock_path: Path, log: Callable[[str], None]) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("another matchlock process is building the guest kernel; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _build(workdir: Path, key: str, target: Path, log: Callable[[str], None]) -> None:
    started = time.monotonic()
    src = workdir / "src"
    src.mkdir()
    build_log = workdir / "build.log"
    env = dict(os.environ)
    # Keep this machine's user, host name and clock out of the image (uname -v), so builds of
    # one key differ only where the toolchain differs.
    env.update(
        ARCH="x86_64",
        KBUILD_BUILD_USER="matchlock",
        KBUILD_BUILD_HOST="matchlock",
        KBUILD_BUILD_TIMESTAMP="1970-01-01",
        LC_ALL="C",
    )

    def step(cmd: Sequence[str], what: str, cwd: Path = src, keep_log: bool = False) -> None:
        _run(
            cmd,
            cwd=cwd,
            env=env,
            build_log=build_log,
            log=log,
            what=what,
            key=key if keep_log else None,
        )

    log(f"unpacking {SOURCE_TARBALL} ({_source_version()})")
    step(
        ["tar", "-xf", str(SOURCE_TARBALL), "-C", str(src), "--strip-components=1"],
        "unpacking the kernel source",
        cwd=workdir,
    )

    log(f"configuring: tinyconfig + {CONFIG_FRAGMENT.name}")
    step(["make", "tinyconfig"], "make tinyconfig")
    step(
        ["sh", "scripts/kconfig/merge_config.sh", "-m", ".config", str(CONFIG_FRAGMENT)],
        "merging the config fragment",
    )
    step(["make", "olddefconfig"], "make olddefconfig")
    _verify_config(CONFIG_FRAGMENT.read_text(), (src / ".config").read_text())

    jobs = len(os.sched_getaffinity(0))
    log(f"compiling vmlinux with {jobs} jobs (about 4 minutes on 2 cores)")
    step(["make", f"-j{jobs}", "vmlinux"], "make vmlinux", keep_log=True)

    stripped = workdir / "vmlinux"
    # --strip-all drops symbols only; the PVH entry note lives in an allocated note segment
    # and survives, which _require_pvh_note double-checks.
    step(["strip", "--strip-all", "-o", str(stripped), str(src / "vmlinux")], "stripping vmlinux")
    _require_pvh_note(stripped)

    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / ".config", target.parent / "config")
    (target.parent / "source-version").write_text(_source_version() + "\n")
    # Same filesystem (workdir is under the cache dir), so the kernel appears atomically:
    # a reader sees either no vmlinux or a complete one.
    os.replace(stripped, target)
    size_mb = target.stat().st_size / 1e6
    log(
        f"guest kernel {key} ready: {target} ({size_mb:.1f} MB, "
        f"built in {time.monotonic() - started:.0f} s)"
    )


def _run(
    cmd: Sequence[str],
    *,
    cwd: Path,
    env: dict[str, str],
    build_log: Path,
    log: Callable[[str], None],
    what: str,
    key: str | None = None,
) -> None:
    started = time.monotonic()
    with build_log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        while True:
            try:
                rc = proc.wait(timeout=_PROGRESS_INTERVAL_S)
                break
            except subprocess.TimeoutExpired:
                log(f"  {what}: {time.monotonic() - started:.0f} s")
    if rc == 0:
        return
    tail = _last_error_line(build_log)
    kept = ""
    if key is not None:
        # The work tree is deleted on failure; keep the compiler output for diagnosis.
        saved = build_log.parent.parent / f"{key}.build.log"
        shutil.copyfile(build_log, saved)
        kept = f" (full log: {saved})"
    raise MatchlockError(f"guest kernel build failed at {what} (exit {rc}): {tail}{kept}")


def _last_error_line(build_log: Path) -> str:
    lines = [ln.strip() for ln in build_log.read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if "error" in line.lower() and not line.startswith("make"):
            return line
    return lines[-1] if lines else "no output"


def _verify_config(fragment: str, final: str) -> None:
    """Fail if Kconfig dropped an option the fragment asks for.

    olddefconfig silently turns off any option whose dependencies are unmet, so without this
    check a missing feature would surface only as a guest failure much later.
    """
    wanted_on: list[str] = []
    wanted_off: list[str] = []
    for line in fragment.splitlines():
        if m := _Y_LINE.match(line):
            wanted_on.append(m.group(1))
        elif m := _OFF_LINE.match(line):
            wanted_off.append(m.group(1))
    values: dict[str, str] = {}
    for line in final.splitlines():
        if m := _ASSIGN_LINE.match(line):
            values[m.group(1)] = m.group(2)
    dropped = [sym for sym in wanted_on if values.get(sym) != "y"]
    forced_on = [sym for sym in wanted_off if values.get(sym) in ("y", "m")]
    problems: list[str] = []
    if dropped:
        problems.append(f"not enabled: {', '.join(dropped)}")
    if forced_on:
        problems.append(f"enabled although disabled in the fragment: {', '.join(forced_on)}")
    if problems:
        raise MatchlockError(
            f"guest kernel config does not match {CONFIG_FRAGMENT.name} after make olddefconfig "
            f"({'; '.join(problems)}); a dependency is probably missing from the fragment"
        )


def _require_pvh_note(vmlinux: Path) -> None:
    if not _has_pvh_note(vmlinux.read_bytes()):
        raise MatchlockError(
            f"{vmlinux} has no Xen PVH entry note, so QEMU cannot boot it directly; "
            "CONFIG_PVH must be enabled in the fragment"
        )


def _has_pvh_note(elf: bytes) -> bool:
    # ELF64 little-endian only: the guest is x86_64 and this is the file we just built.
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    (e_phoff,) = struct.unpack_from("<Q", elf, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, e_phoff + i * e_phentsize
        )
        if p_type != _ELF_PT_NOTE:
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + _align4(namesz) + _align4(descsz)
    return False


def _align4(n: int) -> int:
    return (n + 3) & ~3
