#!/usr/bin/env python3
"""Extra disks: what a `--disk` costs at start-up and stop, and its throughput in the guest.

    volumes.py [--runs N] [--mb 200] [--accel kvm|tcg|auto] [--json FILE]

1. Start-up and teardown, N runs each (interleaved), with no disk, one read-write and one
   read-only volume, through the Python API (the snapshot path: templates are warmed
   first), p50/p95 of `Sandbox.start()` and `close()` and of the `disk_attach` phase; and
   end to end,
   `matchlock run [--disk @V:/data] -- true` as typed.
2. Throughput in one guest: write MB MiB (`dd ... conv=fsync`), then read them back after
   dropping the guest's page cache, on the volume and on the root disk (the overlay's writable
   layer), timed on the host around each exec; median of 3 rounds, the two disks alternating.

Uses a temporary volume under the current MATCHLOCK_HOME (removed at the end). Every figure is
labelled with the accelerator that produced it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from matchlock.guest.protocol import ExecRequest, ExitStatus, Output
from matchlock.image.resolve import resolve_image
from matchlock.sandbox import volumes
from matchlock.sandbox.core import Sandbox, SandboxOptions
from matchlock.sandbox.disks import parse_disks

MATCHLOCK = str(Path(sys.executable).with_name("matchlock"))
VOLUME = f"bench-{os.getpid()}"
REPEAT = 3


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def ms(values: list[float]) -> str:
    return f"p50 {pct(values, 50) * 1000:7.1f} ms  p95 {pct(values, 95) * 1000:7.1f} ms"


def run(sb: Sandbox, script: str) -> tuple[float, bytes]:
    t = time.perf_counter()
    out = b""
    code = None
    for ev in sb.exec(ExecRequest(argv=["sh", "-c", script], privileged=True)).events():
        if isinstance(ev, Output):
            out += ev.data
        elif isinstance(ev, ExitStatus):
            code = ev.code
    if code != 0:
        raise SystemExit(f"guest command failed ({code}): {script}\n{out.decode()}")
    return time.perf_counter() - t, out


def start_stop(runs: int, accel: str | None) -> tuple[dict[str, dict[str, list[float]]], str]:
    image = resolve_image(None)
    shapes = {"no disk": [], "rw volume": [f"@{VOLUME}:/data"],
              "ro volume": [f"@{VOLUME}:/data:ro"]}
    out: dict[str, dict[str, list[float]]] = {
        label: {"start": [], "close": [], "disk_attach": []} for label in shapes}
    used = ""
    for i in range(runs + 1):  # the first round may build templates; shapes interleaved
        for label, specs in shapes.items():
            res = out[label]
            sb = Sandbox(SandboxOptions(image=image.name, rootfs=image.rootfs, accel=accel,
                                        disks=parse_disks(specs)))
            t0 = time.perf_counter()
            try:
                sb.start()
                t1 = time.perf_counter()
            finally:
                sb.close()
            t2 = time.perf_counter()
            used = sb.accel
            if i == 0:
                continue
            if not sb.restored:
                print(f"warning: {label} run {i} cold-booted", file=sys.stderr)
            res["start"].append(t1 - t0)
            res["close"].append(t2 - t1)
            res["disk_attach"].append(sb.timings.phases.get("disk_attach", 0.0))
    return out, used


def end_to_end(runs: int, accel: str | None) -> dict[str, list[float]]:
    """Interleaved (the machine's load drifts), after one untimed run of each shape."""
    shapes = {"no disk": [], "rw volume": ["--disk", f"@{VOLUME}:/data"]}
    out: dict[str, list[float]] = {label: [] for label in shapes}
    for i in range(runs + 1):
        for label, flags in shapes.items():
            argv = [MATCHLOCK, "run", *flags, *(["--accel", accel] if accel else []), "--", "true"]
            t = time.perf_counter()
            subprocess.run(argv, check=True)
            if i:
                out[label].append(time.perf_counter() - t)
    return out


def throughput(mb: int, accel: str | None) -> dict[str, dict[str, float]]:
    image = resolve_image(None)
    out: dict[str, dict[str, float]] = {}
    opts = SandboxOptions(image=image.name, rootfs=image.rootfs, accel=accel,
                          disks=parse_disks([f"@{VOLUME}:/data"]))
    with Sandbox(opts) as sb:
        sb.start()
        samples: dict[str, dict[str, list[float]]] = {}
        for _ in range(REPEAT):  # alternating, median of each: other load drifts
            for label, path in (("volume", "/data/bench"), ("root disk", "/root/bench")):
                write, _ = run(sb, f"dd if=/dev/zero of={path} bs=1M count={mb} conv=fsync "
                                   "2>/dev/null")
                run(sb, "sync; echo 3 > /proc/sys/vm/drop_caches")
                read, _ = run(sb, f"dd if={path} of=/dev/null bs=1M 2>/dev/null")
                run(sb, f"rm {path}; sync")
                s = samples.setdefault(label, {"write": [], "read": []})
                s["write"].append(write)
                s["read"].append(read)
        for label, s in samples.items():
            write, read = pct(s["write"], 50), pct(s["read"], 50)
            out[label] = {"write_s": write, "read_s": read,
                          "write_mb_s": mb / write, "read_mb_s": mb / read}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--accel", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    volumes.create(VOLUME, max(1024, args.mb * 3))
    try:
        phases, accel = start_stop(args.runs, args.accel)
        e2e = end_to_end(args.runs, args.accel)
        tput = throughput(args.mb, args.accel)
    finally:
        volumes.remove(VOLUME)
    tag = accel.upper()
    print(f"== start-up and teardown, snapshot path, {args.runs} runs ({tag}) ==")
    for label, res in phases.items():
        print(f"{label:<10} start {ms(res['start'])}   close {ms(res['close'])}   "
              f"attach {ms(res['disk_attach'])}")
    print(f"== matchlock run ... -- true, end to end, {args.runs} runs ({tag}) ==")
    for label, times in e2e.items():
        print(f"{label:<10} {ms(times)}")
    print(f"== throughput, {args.mb} MiB in the guest ({tag}) ==")
    for label, r in tput.items():
        print(f"{label:<10} write+fsync {r['write_mb_s']:7.1f} MiB/s ({r['write_s']:.2f} s)   "
              f"read (cold cache) {r['read_mb_s']:7.1f} MiB/s ({r['read_s']:.2f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"accel": accel, "runs": args.runs, "start_stop": phases, "end_to_end": e2e,
             "throughput": tput}, indent=1))


if __name__ == "__main__":
    main()
