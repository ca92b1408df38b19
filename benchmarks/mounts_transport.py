#!/usr/bin/env python3
"""Shared-folder throughput: virtio-9p vs virtiofsd vs the guest's own disk (TCG here).

In each guest: write 200 MB (dd bs=1M, fsync), drop caches, read it back, then `find` over
10,000 small files that the host created beforehand; on the share and on a virtio-blk ext4 disk
(the guest's own disk, cache=unsafe as matchlock's writable layer). Times come from the guest's
/proc/uptime (10 ms resolution), so VMM start-up and boot are not in them.

    mounts_transport.py [--runs N]                   harness: our kernel, busybox initramfs
    mounts_transport.py --matchlock [--runs N]       the product: `matchlock run -v DIR:...`

The harness runs 9p as matchlock configures it (security_model=none, msize=512000) and
virtiofs as Debian's QEMU 7.2 ships it (/usr/lib/qemu/virtiofsd, cache=auto, shared memfd
RAM, modern virtio-mmio).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_boot import default_minimal_kernel, host_tsc_khz, make_initramfs

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
SMALL_FILES = 10_000
MB = 200

BENCH = f"""
t() {{ read a b < /proc/uptime; echo $a; }}
bench() {{
  d=$1; name=$2
  s=$(t); dd if=/dev/zero of=$d/big bs=1M count={MB} conv=fsync 2>/dev/null; e=$(t)
  echo "RES $name write $s $e"
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
  s=$(t); dd if=$d/big of=/dev/null bs=1M 2>/dev/null; e=$(t)
  echo "RES $name read $s $e"
  rm -f $d/big
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
  s=$(t); n=$(find $d/small | wc -l); e=$(t)
  echo "RES $name find $s $e $n"
}}
"""

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /mnt/share /mnt/disk
""" + BENCH + """
fs=$(sed -n 's/.*mlk_fs=\\([a-z0-9]*\\).*/\\1/p' /proc/cmdline)
if [ "$fs" = 9p ]; then
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 share /mnt/share
else
  mount -t virtiofs share /mnt/share
fi || echo "RES mount-failed"
mount -t ext4 /dev/vda /mnt/disk || echo "RES disk-mount-failed"
bench /mnt/share $fs
bench /mnt/disk disk
echo RES done
reboot -f
"""


def make_small_files(root: Path) -> None:
    small = root / "small"
    for i in range(SMALL_FILES // 100):
        d = small / f"d{i:03d}"
        d.mkdir(parents=True)
        for j in range(100):
            (d / f"f{j:02d}.txt").write_text(f"{i} {j}\n")


def parse(out: str) -> dict[str, float]:
    res: dict[str, float] = {}
    for m in re.finditer(r"RES (\S+) (write|read|find) ([\d.]+) ([\d.]+)", out):
        res[f"{m[1]} {m[2]}"] = float(m[4]) - float(m[3])
    return res


def qemu_base(kernel: Path, initrd: Path, disk: Path, fs: str, memory_mb: int) -> list[str]:
    khz = host_tsc_khz()
    append = (f"console=ttyS0 quiet panic=-1 reboot=t tsc_early_khz={khz} lpj={khz * 4} "
              f"no_timer_check mlk_fs={fs}")
    machine = "microvm,acpi=off" + (",memory-backend=mem" if fs == "virtiofs" else "")
    argv = ["qemu-system-x86_64", "-M", machine, "-accel", "tcg", "-cpu", "max",
            "-m", f"{memory_mb}M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
            "-no-reboot", "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", append,
            "-drive", f"file={disk},if=none,id=d0,format=raw,cache=unsafe",
            "-device", "virtio-blk-device,drive=d0"]
    if fs == "virtiofs":
        argv += ["-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
                 "-global", "virtio-mmio.force-legacy=false"]
    return argv


def harness_once(work: Path, kernel: Path, initrd: Path, fs: str) -> dict[str, float]:
    share = work / f"share-{fs}"
    disk = work / "disk.ext4"
    shutil.rmtree(share, ignore_errors=True)
    share.mkdir()
    make_small_files(share)
    disk.unlink(missing_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(share), str(disk), "1G"], check=True)
    argv = qemu_base(kernel, initrd, disk, fs, 512)
    daemon = None
    if fs == "9p":
        argv += ["-fsdev", f"local,id=f0,path={share},security_model=none,multidevs=remap",
                 "-device", "virtio-9p-device,fsdev=f0,mount_tag=share"]
    else:
        sock = work / "vfs.sock"
        sock.unlink(missing_ok=True)
        daemon = subprocess.Popen([VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={share}",
                                   "-o", "cache=auto", "-o", "sandbox=chroot"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.01)
        argv += ["-chardev", f"socket,id=vfs,path={sock}",
                 "-device", "vhost-user-fs-device,chardev=vfs,tag=share"]
    try:
        out = subprocess.run(argv, capture_output=True, timeout=600).stdout.decode(errors="replace")
    finally:
        if daemon is not None:
            daemon.kill()
            daemon.wait()
    if "RES done" not in out:
        raise SystemExit(f"{fs}: the guest did not finish:\n{out[-2000:]}")
    return parse(out)


def matchlock_once(work: Path) -> dict[str, float]:
    share = work / "share-ml"
    shutil.rmtree(share, ignore_errors=True)
    share.mkdir()
    make_small_files(share)
    matchlock = str(Path(sys.executable).with_name("matchlock"))
    # The guest's own disk: its root (overlay whose upper is the sandbox's ext4 disk); the
    # small files are copied there first (not timed).
    script = BENCH + ("bench /workspace/m 9p-matchlock; mkdir -p /root/b && "
                      "cp -a /workspace/m/small /root/b/ && bench /root/b disk-matchlock; "
                      "echo RES done")
    r = subprocess.run([matchlock, "run", "--memory", "512", "--no-network",
                        "-v", f"{share}:/workspace/m:host_fs", "--", "sh", "-c", script],
                       capture_output=True, timeout=900)
    out = r.stdout.decode(errors="replace")
    if "RES done" not in out:
        raise SystemExit(f"matchlock run failed: {r.stderr.decode()[-2000:]}\n{out[-2000:]}")
    return parse(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--matchlock", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mlk-mounts-bench-"))
    results: dict[str, list[float]] = {}
    if args.matchlock:
        for _ in range(args.runs):
            for k, v in matchlock_once(work).items():
                results.setdefault(k, []).append(v)
    else:
        kernel = default_minimal_kernel()
        initrd = work / "bench.cpio"
        make_initramfs(initrd, INIT)
        for _ in range(args.runs):
            for fs in ("9p", "virtiofs"):  # interleaved: host drift hits both alike
                for k, v in harness_once(work, kernel, initrd, fs).items():
                    results.setdefault(k, []).append(v)
    print(f"| what (TCG, median of {args.runs}) | seconds | MB/s or files/s |")
    print("|---|---|---|")
    for k, vs in sorted(results.items()):
        med = statistics.median(vs)
        rate = (f"{MB / med:.0f} MB/s" if not k.endswith("find")
                else f"{(SMALL_FILES + SMALL_FILES // 100 + 1) / med:.0f} entries/s")
        print(f"| {k} | {med:.2f} (min {min(vs):.2f}, max {max(vs):.2f}) | {rate} |")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    os.sync()


if __name__ == "__main__":
    main()
