#!/usr/bin/env python3
"""Cold-boot time of a guest kernel under QEMU microvm, to a marker printed by /init.

Measures wall time from spawning QEMU to the marker line on the serial console, and to QEMU's
exit, over N runs; then QEMU's VmRSS 3 s after the marker, median of 3 extra runs in which the
guest idles instead of rebooting. The initramfs is a static busybox plus a three-line /init, so
the numbers are kernel boot plus VMM start-up and nothing of matchlock's own.

    kernel_boot.py --kernel PATH [--runs N] [--acpi]    one kernel
    kernel_boot.py --both [--minimal PATH] [--cloud PATH] [--runs N]
        the matchlock kernel (default: the cached build) against Debian's cloud kernel
        (default: the current bookworm linux-image-*-cloud-amd64, fetched with apt-get download
        and unpacked to an uncompressed vmlinux; nothing is installed on the host)

Runs of the two kernels are interleaved so drift in host load affects both alike.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MARKER = b"MLK-BOOT-MARKER"
RUN_TIMEOUT_S = 60.0
RSS_DELAY_S = 3.0
RSS_RUNS = 3
BUSYBOX = Path("/bin/busybox")
# Kernel decompressors put this lz4 "legacy frame" magic in front of the payload.
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox echo {MARKER.decode()}
[ -n "$mlk_hold" ] && /bin/busybox sleep 60
/bin/busybox reboot -f
"""


# --- initramfs (cpio "newc") ----------------------------------------------------------------


def _cpio_entry(
    ino: int, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
) -> bytes:
    namez = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0]
    head = b"070701" + b"".join(b"%08x" % f for f in fields) + namez
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def make_initramfs(path: Path, init_script: str = INIT_SCRIPT) -> None:
    entries = [
        ("dev", 0o040755, b"", (0, 0)),
        ("dev/console", 0o020600, b"", (5, 1)),
        ("dev/null", 0o020666, b"", (1, 3)),
        ("bin", 0o040755, b"", (0, 0)),
        ("bin/busybox", 0o100755, BUSYBOX.read_bytes(), (0, 0)),
        ("proc", 0o040755, b"", (0, 0)),
        ("sys", 0o040755, b"", (0, 0)),
        ("tmp", 0o041777, b"", (0, 0)),
        ("init", 0o100755, init_script.encode(), (0, 0)),
    ]
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        out += _cpio_entry(ino, name, mode, data, rdev)
    out += _cpio_entry(len(entries) + 1, "TRAILER!!!", 0)
    path.write_bytes(bytes(out))


# --- kernels ------------------------------------------------------------------------------


def default_minimal_kernel() -> Path:
    try:
        from matchlock.vm.kernel import cached_kernel
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
        from matchlock.vm.kernel import cached_kernel
    path = cached_kernel()
    if path is None:
        sys.exit("the matchlock kernel is not built: run `matchlock setup` or pass --minimal PATH")
    return path


def fetch_cloud_kernel(workdir: Path) -> Path:
    """Debian bookworm's current cloud kernel as an uncompressed vmlinux (PVH-bootable)."""
    deps = subprocess.run(
        ["apt-cache", "depends", "linux-image-cloud-amd64"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"Depends: (linux-image-[\w.+-]+-cloud-amd64)", deps)
    if m is None:
        sys.exit("apt-cache knows no linux-image-cloud-amd64; run apt-get update")
    pkg = m.group(1)
    vmlinux = workdir / f"vmlinux-{pkg.removeprefix('linux-image-')}"
    if vmlinux.is_file():
        return vmlinux
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        subprocess.run(["apt-get", "download", "-q", pkg], cwd=tmp, check=True)
        deb = next(Path(tmp).glob(f"{pkg}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), "root"], cwd=tmp, check=True)
        bzimage = next(Path(tmp, "root", "boot").glob("vmlinuz-*")).read_bytes()
        start = bzimage.find(LZ4_LEGACY_MAGIC)
        if start < 0:
            sys.exit(f"{pkg}: no lz4 payload in vmlinuz (not an lz4-compressed kernel?)")
        partial = vmlinux.with_suffix(".partial")
        with partial.open("wb") as out:
            # lz4 complains about the bzImage trailer after the payload; the output is complete.
            subprocess.run(["lz4", "-dc"], input=bzimage[start:], stdout=out, check=False)
        if partial.read_bytes()[:4] != b"\x7fELF":
            sys.exit(f"{pkg}: the lz4 payload did not decompress to an ELF vmlinux")
        partial.replace(vmlinux)
    return vmlinux


# --- one boot -----------------------------------------------------------------------------


def host_tsc_khz() -> int:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":", 1)[1]) * 1000)
    raise SystemExit("cannot read the host TSC rate from /proc/cpuinfo")


def qemu_argv(kernel: Path, initrd: Path, *, acpi: bool, memory_mb: int, hold: bool) -> list[str]:
    khz = host_tsc_khz()
    # HZ=250 in both kernels, so loops-per-jiffy = kHz * 1000 / 250.
    append = (
        f"console=ttyS0 quiet panic=-1 reboot=t tsc_early_khz={khz} lpj={khz * 4} no_timer_check"
    )
    if hold:
        append += " mlk_hold=1"
    return [
        "qemu-system-x86_64",
        "-M",
        "microvm" if acpi else "microvm,acpi=off",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        f"{memory_mb}M",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        append,
    ]


@dataclass
class Boot:
    marker_s: float | None = None
    exit_s: float | None = None
    rss_kb: int | None = None
    console: bytes = b""


def boot_once(argv: list[str], *, measure_rss: bool) -> Boot:
    result = Boot()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = bytearray()
    try:
        while time.monotonic() - t0 < RUN_TIMEOUT_S:
            if not sel.select(timeout=0.5):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            if result.marker_s is None and MARKER in buf:
                result.marker_s = time.monotonic() - t0
                if measure_rss:
                    time.sleep(RSS_DELAY_S)
                    result.rss_kb = vm_rss_kb(proc.pid)
                    break
        if not measure_rss:
            proc.wait(timeout=max(1.0, RUN_TIMEOUT_S - (time.monotonic() - t0)))
            result.exit_s = time.monotonic() - t0
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sel.close()
        proc.stdout.close()
    result.console = bytes(buf)
    return result


def vm_rss_kb(pid: int) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


# --- series and report ----------------------------------------------------------------------


@dataclass
class Series:
    label: str
    kernel: Path
    acpi: bool
    markers: list[float] = field(default_factory=list)
    exits: list[float] = field(default_factory=list)
    failures: int = 0
    rss_kb: int | None = None


def run_series(series: list[Series], runs: int, initrd: Path, memory_mb: int) -> None:
    for s in series:  # warm-up: page cache for kernel and QEMU, discarded
        boot_once(
            qemu_argv(s.kernel, initrd, acpi=s.acpi, memory_mb=memory_mb, hold=False),
            measure_rss=False,
        )
    for i in range(runs):
        for s in series:
            argv = qemu_argv(s.kernel, initrd, acpi=s.acpi, memory_mb=memory_mb, hold=False)
            b = boot_once(argv, measure_rss=False)
            if b.marker_s is None or b.exit_s is None:
                s.failures += 1
                tail = b.console.decode(errors="replace").strip().splitlines()[-3:]
                print(f"  run {i + 1} {s.label}: FAILED; console tail: {tail}", file=sys.stderr)
                continue
            s.markers.append(b.marker_s)
            s.exits.append(b.exit_s)
            print(
                f"  run {i + 1} {s.label}: marker {b.marker_s:.3f} s, exit {b.exit_s:.3f} s",
                file=sys.stderr,
            )
    for s in series:
        argv = qemu_argv(s.kernel, initrd, acpi=s.acpi, memory_mb=memory_mb, hold=True)
        samples = [boot_once(argv, measure_rss=True).rss_kb for _ in range(RSS_RUNS)]
        valid = [kb for kb in samples if kb is not None]
        s.rss_kb = int(statistics.median(valid)) if valid else None


def print_table(series: list[Series], runs: int, memory_mb: int) -> None:
    print(f"TCG, -smp 1 -m {memory_mb}M, {runs} runs each, {os.cpu_count()} host CPUs")
    print(
        "| kernel | vmlinux | ACPI | marker min / median / max (s) | exit median (s) "
        "| VmRSS 3 s after marker (median of 3) | failed |"
    )
    print("|---|---|---|---|---|---|---|")
    for s in series:
        size = f"{s.kernel.stat().st_size / 1e6:.1f} MB"
        if s.markers:
            mk = f"{min(s.markers):.3f} / {statistics.median(s.markers):.3f} / {max(s.markers):.3f}"
            ex = f"{statistics.median(s.exits):.3f}"
        else:
            mk = ex = "-"
        rss = f"{s.rss_kb / 1024:.0f} MiB" if s.rss_kb else "-"
        acpi = "on" if s.acpi else "off"
        print(f"| {s.label} | {size} | {acpi} | {mk} | {ex} | {rss} | {s.failures} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", type=Path, help="boot this vmlinux (single-kernel mode)")
    ap.add_argument("--acpi", action="store_true", help="single-kernel mode: microvm with ACPI")
    ap.add_argument("--both", action="store_true", help="matchlock kernel vs Debian cloud kernel")
    ap.add_argument("--minimal", type=Path, help="--both: the matchlock vmlinux (default: cached)")
    ap.add_argument("--cloud", type=Path, help="--both: the cloud vmlinux (default: fetch it)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--memory", type=int, default=256, help="guest RAM in MiB")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "matchlock-bench")
    args = ap.parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        sys.exit("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    initrd = args.workdir / "initrd-marker.cpio"
    make_initramfs(initrd)

    if args.both:
        minimal = args.minimal or default_minimal_kernel()
        cloud = args.cloud or fetch_cloud_kernel(args.workdir)
        series = [
            # Each kernel as matchlock would have to run it: the minimal one finds its virtio
            # devices on the command line (acpi=off); Debian's can only find them through ACPI.
            Series("matchlock minimal 6.1", minimal, acpi=False),
            Series(f"Debian cloud ({cloud.name.removeprefix('vmlinux-')})", cloud, acpi=True),
        ]
    elif args.kernel:
        series = [Series(args.kernel.name, args.kernel, acpi=args.acpi)]
    else:
        ap.error("pass --kernel PATH or --both")
    run_series(series, args.runs, initrd, args.memory)
    print_table(series, args.runs, args.memory)


if __name__ == "__main__":
    main()
